"""SQLite triggers that journal an app's writes to the synced tables.

For each synced table three kinds of ``AFTER`` triggers (names start with
``_fieldsync_``) append to ``_fieldsync_journal`` one entry per changed row:

- insert: ``op='insert'``, ``new`` = the row (``json_object`` of every column);
- update: ``op='update'``, ``old`` = the row before, ``new`` = the row after; an update
  that changes no column is not journaled; an update that changes the key becomes a
  ``delete`` of the old key and an ``insert`` of the new one (the relay refuses key
  changes, journal.md);
- delete: ``op='delete'``, ``old`` = the row before.

Each entry also gets the hybrid logical clock of the edit (``hlc_l`` ms, ``hlc_c``
counter: the ``_fieldsync_clock`` row is advanced by the HLC send rule, relay/hlc.py,
in SQL), ``prev_seq`` (the latest entry of the same row still pending or sent) and
``base`` (the position of the server version the row came from, when the relay sends
positions).  Values are stored as the app wrote them; the agent converts them into wire
form when it uploads (device_agent/sync.py).

Writes the agent makes while applying server changes are not journaled: every trigger
has ``WHEN NOT EXISTS (SELECT 1 FROM _fieldsync_applying)`` and the agent inserts a row
into ``_fieldsync_applying`` inside its apply transaction (apps never see it: it is
deleted before the commit).  For large applies the agent instead drops the tables'
triggers inside the transaction and creates them again before committing
(:func:`suspended`), which is cheaper per row; both are atomic with the apply, and no app
can write in between (SQLite has one writer at a time).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator

from device_agent.local_db import PREFIX, LocalTable, q

# HLC physical time in ms from SQLite's clock.
_NOW_MS = "cast((julianday('now') - 2440587.5) * 86400000.0 as integer)"
_NOT_APPLYING = f"not exists (select 1 from {PREFIX}applying)"

_TICK = f"""update {PREFIX}clock set
        c = case when {_NOW_MS} > l then 0 when c >= 65535 then 0 else c + 1 end,
        l = case when {_NOW_MS} > l then {_NOW_MS} when c >= 65535 then l + 1 else l end
    where id = 1;"""


def trigger_names(table: LocalTable) -> list[str]:
    base = f"{PREFIX}{table.id}"
    return [f"{base}_ins", f"{base}_upd", f"{base}_updkey", f"{base}_del"]


def _k(table: LocalTable, ref: str) -> str:
    if len(table.key) == 1:
        return f"{ref}.{q(table.key[0])}"
    return "json_array(" + ", ".join(f"{ref}.{q(c)}" for c in table.key) + ")"


def _row_json(table: LocalTable, ref: str) -> str:
    return "json_object(" + ", ".join(f"'{c}', {ref}.{q(c)}" for c in table.columns) + ")"


def _entry(table: LocalTable, op: str, ref: str, old: str, new: str) -> str:
    k = _k(table, ref)
    return f"""insert into {PREFIX}journal (tbl, k, op, old, new, base, hlc_l, hlc_c, prev_seq)
        select {table.id}, {k}, '{op}', {old}, {new},
            (select pos from {PREFIX}rows where tbl = {table.id} and k = {k}
                order by op_id desc limit 1),
            l, c,
            (select max(seq) from {PREFIX}journal where tbl = {table.id} and k = {k}
                and status in ('pending', 'sent'))
        from {PREFIX}clock where id = 1;"""


def create_sql(table: LocalTable) -> list[str]:
    """The ``CREATE TRIGGER`` statements of one table."""
    t = q(table.local)
    ins, upd, updkey, dele = (q(n) for n in trigger_names(table))
    changed = " or ".join(f"old.{q(c)} is not new.{q(c)}" for c in table.columns)
    same_key = " and ".join(f"old.{q(c)} is new.{q(c)}" for c in table.key)
    old_row, new_row = _row_json(table, "old"), _row_json(table, "new")
    return [
        f"""create trigger if not exists {ins} after insert on {t} when {_NOT_APPLYING}
        begin {_TICK} {_entry(table, "insert", "new", "null", new_row)} end""",
        f"""create trigger if not exists {upd} after update on {t}
        when {_NOT_APPLYING} and ({same_key}) and ({changed})
        begin {_TICK} {_entry(table, "update", "new", old_row, new_row)} end""",
        f"""create trigger if not exists {updkey} after update on {t}
        when {_NOT_APPLYING} and not ({same_key})
        begin {_TICK} {_entry(table, "delete", "old", old_row, "null")}
              {_TICK} {_entry(table, "insert", "new", "null", new_row)} end""",
        f"""create trigger if not exists {dele} after delete on {t} when {_NOT_APPLYING}
        begin {_TICK} {_entry(table, "delete", "old", old_row, "null")} end""",
    ]


def install(conn: sqlite3.Connection, table: LocalTable) -> None:
    """(Re)create the triggers of ``table`` (drops old ones first: columns may have changed)."""
    drop(conn, table)
    for stmt in create_sql(table):
        conn.execute(stmt)


def drop(conn: sqlite3.Connection, table: LocalTable) -> None:
    for name in trigger_names(table):
        conn.execute(f"drop trigger if exists {q(name)}")


def installed(conn: sqlite3.Connection, table: LocalTable) -> bool:
    names = set(trigger_names(table))
    found = {
        r[0]
        for r in conn.execute(
            "select name from sqlite_master where type = 'trigger' and tbl_name = ?",
            (table.local,),
        )
    }
    return names <= found


@contextlib.contextmanager
def applying(conn: sqlite3.Connection) -> Iterator[None]:
    """Inside an open transaction: the agent's writes are not journaled (flag row)."""
    conn.execute(f"insert into {PREFIX}applying values (1)")
    try:
        yield
    finally:
        conn.execute(f"delete from {PREFIX}applying")


@contextlib.contextmanager
def suspended(conn: sqlite3.Connection, tables: Iterable[LocalTable]) -> Iterator[None]:
    """Inside an open transaction: drop the triggers of ``tables``; recreate them at the end.

    If the block raises, the caller's rollback restores them (DDL is transactional)."""
    chosen = list(tables)
    for t in chosen:
        drop(conn, t)
    yield
    for t in chosen:
        for stmt in create_sql(t):
            conn.execute(stmt)
