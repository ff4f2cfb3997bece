"""SQLite triggers that journal an app's writes to the synced tables.

For each synced table three kinds of ``AFTER`` triggers (names start with
``_fieldsync_``) append to ``_fieldsync_journal`` one entry per changed row:

- insert: ``op='insert'``, ``new`` = the row (``json_object`` of every column; a REAL
  with 17 significant digits: local_tables.json_value_sql).  An
  ``INSERT OR REPLACE`` over an existing row (SQLite fires no delete trigger for the row
  it replaces) also records that row as the entry's ``old``: a ``BEFORE INSERT`` trigger
  keeps it in ``_fieldsync_replaced`` for the ``AFTER INSERT`` trigger, which takes it
  (the agent needs it as the received version of the row, device_agent/visible.py; the
  upload leaves ``old`` out of inserts);
- update: ``op='update'``, ``old`` = the row before, ``new`` = the row after; an update
  that changes no column is not journaled; an update that changes the key becomes a
  ``delete`` of the old key and an ``insert`` of the new one (the relay refuses key
  changes, journal.md);
- delete: ``op='delete'``, ``old`` = the row before.

Each entry records the time of the edit (``at_ms``, SQLite's clock) and ``base`` (the
position of the server version the row came from, when the relay sends positions).
Work that need not slow the app's writes down is done later by the agent, in seq order,
before entries are uploaded or listed (:func:`assign_clocks`): the hybrid logical clock
(``hlc_l`` ms, ``hlc_c`` counter; the HLC send rule of core/hlc.py with the edit's
``at_ms`` as wall clock and the persisted ``_fieldsync_clock``, so clocks strictly
increase in seq order, also across restarts) and ``prev_seq`` (the latest earlier entry
of the same row that had not settled when this edit was made).  Values are stored as the app wrote them; the agent converts them into wire
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
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

from device_agent.local_tables import (
    PREFIX,
    LocalTable,
    json_value_sql,
    key_expr,
    lit,
    q,
    transaction,
)

_NOT_APPLYING = f"not exists (select 1 from {PREFIX}applying)"


def trigger_names(table: LocalTable) -> list[str]:
    base = f"{PREFIX}{table.id}"
    return [f"{base}_ins", f"{base}_upd", f"{base}_updkey", f"{base}_del", f"{base}_insrep"]


def _k(table: LocalTable, ref: str) -> str:
    return key_expr(table, ref)


JSON_OBJECT_PAIRS: Final = 50
"""Columns per ``json_object`` call: SQLite limits the arguments of a function
(SQLITE_MAX_FUNCTION_ARG, 127 before 3.48), so a row of more columns is one object text
joined from several calls' members."""

OR_TERMS: Final = 50
"""Terms per parenthesised group of the update trigger's column comparisons: SQLite limits
the depth of an expression tree (SQLITE_MAX_EXPR_DEPTH, 1000), and a chain of ``or`` is as
deep as it is long."""


def _chunks(columns: Sequence[str], size: int) -> list[Sequence[str]]:
    return [columns[i : i + size] for i in range(0, len(columns), size)]


def _row_json(table: LocalTable, ref: str) -> str:
    parts = [
        "json_object("
        + ", ".join(f"{lit(c)}, {json_value_sql(f'{ref}.{q(c)}')}" for c in chunk)
        + ")"
        for chunk in _chunks(table.columns, JSON_OBJECT_PAIRS)
    ]
    if len(parts) == 1:
        return parts[0]
    # each object's members, without its braces, in one object
    members = " || ',' || ".join(f"substr({p}, 2, length({p}) - 2)" for p in parts)
    return f"('{{' || {members} || '}}')"


def _changed(table: LocalTable) -> str:
    return " or ".join(
        "(" + " or ".join(f"old.{q(c)} is not new.{q(c)}" for c in chunk) + ")"
        for chunk in _chunks(table.columns, OR_TERMS)
    )


def _same_key(table: LocalTable, ref: str) -> str:
    return " and ".join(f"{ref}.{q(c)} = new.{q(c)}" for c in table.key)


def _entry(table: LocalTable, op: str, ref: str, old: str, new: str) -> str:
    k = _k(table, ref)
    return f"""insert into {PREFIX}journal (tbl, k, op, old, new, base)
        values ({table.id}, {k}, '{op}', {old}, {new},
            (select pos from {PREFIX}rows where tbl = {table.id} and k = {k}
                order by op_id desc limit 1));"""


def create_sql(table: LocalTable) -> list[str]:
    """The ``CREATE TRIGGER`` statements of one table."""
    t = q(table.local)
    ins, upd, updkey, dele, insrep = (q(n) for n in trigger_names(table))
    changed = _changed(table)
    same_key = " and ".join(f"old.{q(c)} is new.{q(c)}" for c in table.key)
    old_row, new_row = _row_json(table, "old"), _row_json(table, "new")
    k_new = _k(table, "new")
    replaced = f"(select row from {PREFIX}replaced where tbl = {table.id} and k = {k_new})"
    return [
        f"""create trigger if not exists {insrep} before insert on {t}
        when {_NOT_APPLYING} and exists (select 1 from {t} x where {_same_key(table, "x")})
        begin insert or replace into {PREFIX}replaced (tbl, k, row)
            select {table.id}, {k_new}, {_row_json(table, "x")} from {t} x
            where {_same_key(table, "x")}; end""",
        f"""create trigger if not exists {ins} after insert on {t} when {_NOT_APPLYING}
        begin {_entry(table, "insert", "new", replaced, new_row)}
            delete from {PREFIX}replaced where tbl = {table.id} and k = {k_new}; end""",
        f"""create trigger if not exists {upd} after update on {t}
        when {_NOT_APPLYING} and ({same_key}) and ({changed})
        begin {_entry(table, "update", "new", old_row, new_row)} end""",
        f"""create trigger if not exists {updkey} after update on {t}
        when {_NOT_APPLYING} and not ({same_key})
        begin {_entry(table, "delete", "old", old_row, "null")}
              {_entry(table, "insert", "new", "null", new_row)} end""",
        f"""create trigger if not exists {dele} after delete on {t} when {_NOT_APPLYING}
        begin {_entry(table, "delete", "old", old_row, "null")}
            delete from {PREFIX}replaced where tbl = {table.id} and k = {_k(table, "old")}; end""",
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


def assign_clocks(conn: sqlite3.Connection) -> int:
    """Give new journal entries their HLC and ``prev_seq`` (see the module docstring);
    returns how many entries were completed.  Runs in its own transaction."""
    done = 0
    with transaction(conn):
        todo = conn.execute(
            f"""select seq, tbl, k, at_ms, created_at from {PREFIX}journal
                where hlc_l is null order by seq"""
        ).fetchall()
        if not todo:
            return 0
        phys, c = conn.execute(f"select l, c from {PREFIX}clock where id = 1").fetchone()
        for seq, tbl, k, at_ms, created in todo:
            if at_ms > phys:
                phys, c = at_ms, 0
            elif c >= 0xFFFF:
                phys, c = phys + 1, 0
            else:
                c += 1
            prev = conn.execute(
                f"""select max(seq) from {PREFIX}journal where tbl = ? and k = ? and seq < ?
                        and (settled_at is null or settled_at > ?)""",
                (tbl, k, seq, created),
            ).fetchone()[0]
            conn.execute(
                f"update {PREFIX}journal set hlc_l = ?, hlc_c = ?, prev_seq = ? where seq = ?",
                (phys, c, prev, seq),
            )
            done += 1
        conn.execute(f"update {PREFIX}clock set l = ?, c = ? where id = 1", (phys, c))
    return done
