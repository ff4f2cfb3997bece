"""Schema follow-up: bringing the device's tables to the relay's ``/v1/schema``.

Every sync reads the relay's schema (device_agent/relay_schema.py) and calls
:func:`apply_schema`, which runs one SQLite transaction:

1. :func:`plan_migration` compares the schema with the tables the device holds
   (``_fieldsync_tables``) and plans: new tables created (key columns ``NOT NULL``, the
   schema's indexes); new columns added and removed ones dropped (``ALTER TABLE``); a
   table whose key changed dropped, created again and downloaded again, its holds
   forgotten (they name rows by the old key), the rows journal entries act on kept and the
   entries named by the new key (device_agent/rekey.py); a column whose kind the schema
   changes (retyped on the server) takes the new kind (:func:`_plan_kinds`).  What
   cannot be done without losing data or breaking the app is a *blocker*, named exactly
   (:class:`~device_agent.errors.SchemaBlocked`, exit 5): a removed column an app's
   index, view or trigger uses, a key change while an entry acting on the table cannot be
   named by the new key (a new key column NULL in its row).  Two only wait for local
   edits (:class:`~device_agent.errors.MigrationWaits`: the sync uploads them and reads
   their outcomes, device_agent/sync.py): a column removal while edits of that table are
   not synced yet (``pending`` or ``sent``), and a change of a column's kind that reads
   stored values otherwise while edits of its table are ``pending`` (they go up with
   their values as made).  Nothing changes when anything blocks.
2. The journal triggers (device_agent/triggers.py) of removed and changed tables are
   dropped and the buckets holding rows of a changed table (key, columns or rules) are
   marked for re-download (their rows' stored projections no longer fit); the planned
   statements run; every table whose key columns are not declared ``NOT NULL`` (a
   database of an earlier layout) is rebuilt (:func:`rebuild_not_null`); the one-off
   repair after an upgrade from layout 1 runs (:func:`rederive_all`).
3. ``_fieldsync_tables`` records the schema, with the column kinds the schema gives
   (:func:`record_kinds`: a column it gives none keeps the kind learned from its values,
   forgotten for rebuilt tables), the triggers of every synced table are created again
   (their columns may have changed) and the schema is stored in ``_fieldsync_meta``.

A table no longer in the schema is kept but no longer journaled.  Rebuilds are plain
SQL (a new table, a copy, a rename), not ``sqlite-utils``' ``table.transform()``: that
would declare the typeless columns ``TEXT`` (stored integers would turn into text), drop
the table's triggers for good and copy rows whose key is NULL (README, "Dependencies
and why").

Concurrency: one ``BEGIN IMMEDIATE`` transaction (DDL is transactional in SQLite), so
apps see the old tables or the new ones, never a half-migrated database; a failure
rolls everything back.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any, Final

import orjson

from device_agent import triggers
from device_agent.errors import MigrationWaits, SchemaBlocked
from device_agent.local_db import get_meta, reads_alike, set_meta
from device_agent.local_tables import (
    PREFIX,
    LocalTable,
    key_expr,
    load_tables,
    q,
    save_kinds,
    transaction,
)
from device_agent.rekey import JournalRow, rekey_entries
from device_agent.relay_schema import RelaySchema, TableSpec, schema_json


def create_table_sql(spec: TableSpec) -> list[str]:
    """``CREATE TABLE`` (key columns NOT NULL) and the schema's indexes."""
    cols = ", ".join(q(c) + (" not null" if c in spec.key else "") for c in spec.columns)
    pk = ", ".join(q(c) for c in spec.key)
    stmts = [f"create table if not exists {q(spec.local)} ({cols}, primary key ({pk}))"]
    for ix in spec.indexes:
        name = f"{spec.local}_{'_'.join(ix)}_idx"
        stmts.append(
            f"create index if not exists {q(name)} on {q(spec.local)} ({', '.join(q(c) for c in ix)})"
        )
    return stmts


@dataclasses.dataclass
class Migration:
    """What :func:`plan_migration` found: statements to run, tables to re-download, problems."""

    statements: list[str] = dataclasses.field(default_factory=list)
    added_tables: list[TableSpec] = dataclasses.field(default_factory=list)
    changed_tables: list[TableSpec] = dataclasses.field(default_factory=list)
    rebuilt_tables: list[str] = dataclasses.field(default_factory=list)
    removed_tables: list[str] = dataclasses.field(default_factory=list)
    counters_changed: list[str] = dataclasses.field(default_factory=list)
    rekeyed: dict[str, dict[int, Any]] = dataclasses.field(default_factory=dict)
    """Tables whose key changed → the new ``k`` of each journal entry acting on their rows."""
    notes: list[str] = dataclasses.field(default_factory=list)
    blockers: list[str] = dataclasses.field(default_factory=list)
    """What blocks the migration until someone acts (named exactly)."""
    waits_for: list[str] = dataclasses.field(default_factory=list)
    """What blocks it only until local edits are synced (their outcomes received)."""

    @property
    def empty(self) -> bool:
        return not (self.statements or self.removed_tables or self.changed_tables)


def _open_edits(conn: sqlite3.Connection, tid: int) -> tuple[int, int]:
    """How many journal entries of the table are ``pending`` and how many ``sent``."""
    row = conn.execute(
        f"""select coalesce(sum(status = 'pending'), 0), coalesce(sum(status = 'sent'), 0)
            from {PREFIX}journal where tbl = ? and status in ('pending', 'sent')""",
        (tid,),
    ).fetchone()
    return int(row[0]), int(row[1])


def _unsynced(pending: int, sent: int) -> str:
    """The open edits of a table, for a message: how many, and what each waits for."""
    parts = ([f"{pending} to upload"] if pending else []) + (
        [f"{sent} awaiting their outcome"] if sent else []
    )
    return f"{pending + sent} local edit(s) of the table are not synced yet ({', '.join(parts)})"


ACTING: Final = "(status in ('pending', 'sent', 'conflict') or await_lsn is not null)"
"""SQL condition of the journal entries that still act on their rows: open, awaiting their
server version, or kept conflicts."""


def _acting_entries(conn: sqlite3.Connection, tid: int) -> list[JournalRow]:
    return [
        JournalRow(
            seq,
            op,
            None if old is None else orjson.loads(old),
            None if new is None else orjson.loads(new),
        )
        for seq, op, old, new in conn.execute(
            f"select seq, op, old, new from {PREFIX}journal where tbl = ? and {ACTING}", (tid,)
        )
    ]


def _app_objects_on(conn: sqlite3.Connection, local: str, column: str) -> list[str]:
    """Indexes, views and triggers not made by the agent that mention ``column`` of ``local``."""
    found = []
    for typ, name, sql in conn.execute(
        "select type, name, sql from sqlite_master where tbl_name = ? and sql is not null",
        (local,),
    ):
        if name.startswith(PREFIX) or typ == "table":
            continue
        if column.lower() in (sql or "").lower():
            found.append(f"{typ} {name}")
    return found


def plan_migration(conn: sqlite3.Connection, schema: RelaySchema) -> Migration:
    """Compare the relay's schema with the local tables (pure apart from reads)."""
    have = load_tables(conn)
    plan = Migration()
    for spec in schema.tables:
        old = have.get(spec.name)
        if old is None:
            plan.statements += create_table_sql(spec)
            plan.added_tables.append(spec)
            plan.notes.append(f"new table {spec.name} (local {spec.local})")
            continue
        pending, sent = _open_edits(conn, old.id)
        if old.key != spec.key:
            rekeyed = rekey_entries(_acting_entries(conn, old.id), spec.key)
            if rekeyed.unnamed:
                plan.blockers.append(
                    f"{spec.name}: the primary key changed from ({', '.join(old.key)}) to "
                    f"({', '.join(spec.key)}) and {len(rekeyed.unnamed)} local edit(s) of it "
                    "cannot be named by the new key (journal "
                    + ", ".join(f"#{seq} {why}" for seq, why in sorted(rekeyed.unnamed.items()))
                    + "); sync them first (device-agent sync --once), or discard them with "
                    "device-agent reset --discard-edits"
                )
                continue
            plan.statements.append(f"drop table if exists {q(old.local)}")
            plan.statements += create_table_sql(spec)
            plan.rebuilt_tables.append(spec.name)
            plan.changed_tables.append(spec)
            plan.notes.append(f"{spec.name}: primary key changed; table rebuilt and re-downloaded")
            if rekeyed.keys:
                plan.rekeyed[spec.name] = rekeyed.keys
                plan.notes.append(
                    f"{spec.name}: {len(rekeyed.keys)} local edit(s) kept on top, named by the "
                    "new key"
                )
            continue
        added = [c for c in spec.columns if c not in old.columns]
        removed = [c for c in old.columns if c not in spec.columns]
        for c in added:
            plan.statements.append(f"alter table {q(old.local)} add column {q(c)}")
            plan.notes.append(f"{spec.name}: new column {c}")
        for c in removed:
            objects = _app_objects_on(conn, old.local, c)
            if objects:
                plan.blockers.append(
                    f"{spec.name}: column {c} was removed on the server but the app's "
                    f"{', '.join(objects)} use it; drop them, then sync again"
                )
            elif pending or sent:
                plan.waits_for.append(
                    f"{spec.name}: column {c} was removed on the server and "
                    f"{_unsynced(pending, sent)}; the migration goes on once each has its "
                    "outcome (every sync uploads them and reads their outcomes)"
                )
            else:
                plan.statements.append(f"alter table {q(old.local)} drop column {q(c)}")
                plan.notes.append(f"{spec.name}: column {c} dropped (removed on the server)")
        _plan_kinds(plan, spec, old, pending)
        if added or removed or spec.rules != old.rules:
            plan.changed_tables.append(spec)
        if frozenset(spec.counters) != old.counters:
            plan.counters_changed.append(spec.name)
        if spec.indexes:
            plan.statements += create_table_sql(spec)[1:]
    names = {t.name for t in schema.tables}
    for name in have:
        if name not in names:
            plan.removed_tables.append(name)
            plan.notes.append(
                f"{name} is no longer synced; the local table is kept but not journaled"
            )
    return plan


def _plan_kinds(plan: Migration, spec: TableSpec, old: LocalTable, pending: int) -> None:
    """The columns of a table whose kind the relay's schema changes (a column retyped on
    the server).  Stored values are kept (their form does not depend on the kind); a
    pending edit's values are turned into wire values when it is uploaded, so while the
    table has pending edits, a change that reads stored values otherwise (to or from
    ``bool``, ``float`` or ``json``) waits for them to be uploaded as they were made.  A
    column whose kind was not known yet (no value received) takes the schema's at once."""
    for column, kind in spec.kinds.items():
        was = old.kinds.get(column)
        if was is None or was == kind or column not in old.columns:
            continue
        if pending and not reads_alike(was, kind):
            plan.waits_for.append(
                f"{spec.name}: column {column} is now of kind {kind} on the server (was "
                f"{was}) and {pending} local edit(s) of the table made before are not "
                "uploaded yet; the migration goes on once they are, with their values as "
                "they were made (every sync uploads them)"
            )
        else:
            plan.notes.append(f"{spec.name}: column {column} is now of kind {kind} (was {was})")


def record_kinds(conn: sqlite3.Connection, specs: Iterable[TableSpec]) -> None:
    """Each table's column kinds as the relay's schema gives them; a column it gives none
    keeps the kind learned from its values, and kinds of columns the table no longer has
    are forgotten (a column added again later may be of another type)."""
    tables = load_tables(conn)
    for spec in specs:
        t = tables[spec.name]
        kinds = {c: k for c, k in t.kinds.items() if c in spec.columns}
        kinds.update(spec.kinds)
        if kinds != t.kinds:
            t.kinds = kinds
            save_kinds(conn, t)


def record_tables(conn: sqlite3.Connection, specs: Iterable[TableSpec]) -> None:
    """Insert or update ``_fieldsync_tables`` rows (kinds are kept)."""
    for spec in specs:
        conn.execute(
            f"""insert into {PREFIX}tables (name, local, columns, key, rules, indexes, counters)
                values (?, ?, ?, ?, ?, ?, ?)
                on conflict (name) do update set columns = excluded.columns,
                    key = excluded.key, rules = excluded.rules, indexes = excluded.indexes,
                    counters = excluded.counters""",
            (
                spec.name,
                spec.local,
                orjson.dumps(list(spec.columns)).decode(),
                orjson.dumps(list(spec.key)).decode(),
                orjson.dumps(list(spec.rules)).decode(),
                orjson.dumps([list(i) for i in spec.indexes]).decode(),
                orjson.dumps(sorted(spec.counters)).decode(),
            ),
        )


def forget_table(conn: sqlite3.Connection, name: str) -> None:
    row = conn.execute(f"select id from {PREFIX}tables where name = ?", (name,)).fetchone()
    if row is None:
        return
    conn.execute(f"delete from {PREFIX}rows where tbl = ?", (row[0],))
    conn.execute(f"delete from {PREFIX}tables where id = ?", (row[0],))


def key_not_null(conn: sqlite3.Connection, local: str, key: Sequence[str]) -> bool:
    """Whether every key column of the local table is declared NOT NULL."""
    info = {r[1]: bool(r[3]) for r in conn.execute(f"pragma table_info({q(local)})")}
    return all(info.get(c, False) for c in key)


def rebuild_not_null(conn: sqlite3.Connection, local: str, key: Sequence[str]) -> int:
    """Inside an open transaction: rebuild ``local`` with its key columns NOT NULL (SQLite
    cannot add the constraint in place).  Columns, their order, declared types and
    defaults are kept; the app's indexes and triggers on the table are created again;
    views keep working (they name the table).  Rows with a NULL key column cannot be
    addressed by any sync (and were never the server's) and are not copied.  Returns
    how many rows were left out."""
    info = list(conn.execute(f"pragma table_info({q(local)})"))
    objects = [
        sql
        for (sql,) in conn.execute(
            """select sql from sqlite_master where tbl_name = ? and type in ('index', 'trigger')
                and sql is not null order by type, name""",
            (local,),
        )
    ]
    defs = []
    for _cid, name, typ, notnull, default, _pk in info:
        parts = [q(name)]
        if typ:
            parts.append(typ)
        if notnull or name in key:
            parts.append("not null")
        if default is not None:
            parts.append(f"default {default}")
        defs.append(" ".join(parts))
    temp = f"{PREFIX}rebuild_{local}"
    names = ", ".join(q(r[1]) for r in info)
    keyed = " and ".join(f"{q(c)} is not null" for c in key)
    before = int(conn.execute(f"select count(*) from {q(local)}").fetchone()[0])
    conn.execute(f"drop table if exists {q(temp)}")
    conn.execute(
        f"create table {q(temp)} ({', '.join(defs)}, primary key ({', '.join(q(c) for c in key)}))"
    )
    conn.execute(f"insert into {q(temp)} ({names}) select {names} from {q(local)} where {keyed}")
    after = int(conn.execute(f"select count(*) from {q(temp)}").fetchone()[0])
    conn.execute(f"drop table {q(local)}")
    # legacy rename: views and triggers elsewhere that name the table are not re-parsed
    # (they name it again once the rename is done)
    conn.execute("pragma legacy_alter_table = on")
    try:
        conn.execute(f"alter table {q(temp)} rename to {q(local)}")
    finally:
        conn.execute("pragma legacy_alter_table = off")
    for sql in objects:
        conn.execute(sql)
    return before - after


def rederive_all(conn: sqlite3.Connection) -> list[str]:
    """Inside an open transaction: the one-off repair after an upgrade from version 1,
    whose agent could leave rows that no bucket holds and stale values: rows no bucket
    holds and no open edit keeps leave the tables, and every bucket is downloaded again
    (replaced atomically with the next complete checkpoint), so every row is re-derived
    from a fresh received version.  Returns notes."""
    notes = []
    conn.execute(f"insert into {PREFIX}applying values (1)")
    try:
        for t in load_tables(conn).values():
            k = key_expr(t, q(t.local))
            gone = conn.execute(
                f"""delete from {q(t.local)} where not exists
                    (select 1 from {PREFIX}rows r where r.tbl = ? and r.k = {k})
                    and not exists (select 1 from {PREFIX}journal j where j.tbl = ? and j.k = {k}
                        and j.status in ('pending', 'sent'))""",
                (t.id, t.id),
            ).rowcount
            if gone:
                notes.append(f"{t.name}: {gone} row(s) no bucket holds removed")
    finally:
        conn.execute(f"delete from {PREFIX}applying")
    conn.execute(f"update {PREFIX}buckets set reset_pending = 1")
    set_meta(conn, "rederive", None)
    notes.append("every bucket is downloaded again once (database upgraded)")
    return notes


def _keep_rows(conn: sqlite3.Connection, table: LocalTable) -> str:
    """Inside an open transaction, before a table whose key changed is dropped: copy the
    rows journal entries act on (their edits show in them) to a temporary table; returns
    its name."""
    stash = f"{PREFIX}rekey_{table.id}"
    conn.execute(f"drop table if exists temp.{q(stash)}")
    conn.execute(
        f"""create temp table {q(stash)} as select * from {q(table.local)} t
            where {key_expr(table, "t")} in
                (select k from {PREFIX}journal where tbl = ? and {ACTING})""",
        (table.id,),
    )
    return stash


def _restore_rows(
    conn: sqlite3.Connection, stash: str, spec: TableSpec, keys: dict[int, Any]
) -> None:
    """Put the kept rows into the table created under the new key (the columns both
    have), and name the journal entries (and their conflicts) by the new key.  The rows
    are derived again when their versions arrive: the table's buckets are downloaded
    again."""
    have = [r[1] for r in conn.execute(f"pragma temp.table_info({q(stash)})")]
    cols = ", ".join(q(c) for c in spec.columns if c in have)
    conn.execute(
        f"insert or replace into {q(spec.local)} ({cols}) select {cols} from temp.{q(stash)}"
    )
    conn.execute(f"drop table temp.{q(stash)}")
    conn.executemany(
        f"update {PREFIX}journal set k = ? where seq = ?", [(k, seq) for seq, k in keys.items()]
    )
    conn.executemany(
        f"update {PREFIX}conflicts set k = ? where seq = ?", [(k, seq) for seq, k in keys.items()]
    )


def blocked(migration: Migration) -> SchemaBlocked:
    """The error naming what blocks ``migration``: :class:`MigrationWaits` when it only
    waits for local edits to be synced."""
    if not migration.blockers:
        return MigrationWaits(
            "the server's schema changed and the local tables follow once local edits are "
            "synced:\n  - " + "\n  - ".join(migration.waits_for)
        )
    return SchemaBlocked(
        "the server's schema changed and the local tables cannot follow:\n  - "
        + "\n  - ".join(migration.blockers + migration.waits_for)
    )


def apply_schema(conn: sqlite3.Connection, schema: RelaySchema) -> Migration:
    """Bring the local tables to ``schema`` in one transaction (tables, columns, indexes,
    triggers, ``_fieldsync_tables``); raises :class:`SchemaBlocked` naming what blocks it
    (:class:`MigrationWaits` when only unsynced local edits do).

    Buckets holding rows of a table whose key or rules changed are marked for
    re-download (their rows' stored projections no longer fit)."""

    with transaction(conn):
        plan = plan_migration(conn, schema)
        if plan.blockers or plan.waits_for:
            raise blocked(plan)
        before = load_tables(conn)
        for name in plan.removed_tables:
            triggers.drop(conn, before[name])
            forget_table(conn, name)
        for t in before.values():
            if t.name in {s.name for s in plan.changed_tables}:
                triggers.drop(conn, t)
                conn.execute(
                    f"""update {PREFIX}buckets set reset_pending = 1 where id in
                        (select distinct bucket from {PREFIX}rows where tbl = ?)""",
                    (t.id,),
                )
            if t.name in plan.rebuilt_tables:
                # its holds name rows by the old key (and the rows go with the table)
                conn.execute(f"delete from {PREFIX}rows where tbl = ?", (t.id,))
        kept = {name: _keep_rows(conn, before[name]) for name in plan.rekeyed}
        for stmt in plan.statements:
            conn.execute(stmt)
        for spec in schema.tables:
            if spec.name in plan.rekeyed:
                _restore_rows(conn, kept[spec.name], spec, plan.rekeyed[spec.name])
        for spec in schema.tables:
            if not key_not_null(conn, spec.local, spec.key):
                dropped = rebuild_not_null(conn, spec.local, spec.key)
                plan.notes.append(
                    f"{spec.name}: key columns declared NOT NULL (table rebuilt"
                    + (f"; {dropped} row(s) with a NULL key left out)" if dropped else ")")
                )
        record_tables(conn, schema.tables)
        if get_meta(conn, "rederive"):
            plan.notes += rederive_all(conn)
        for name in plan.rebuilt_tables:
            conn.execute(f"update {PREFIX}tables set kinds = '{{}}' where name = ?", (name,))
        record_kinds(conn, schema.tables)
        for t in load_tables(conn).values():
            triggers.install(conn, t)
        set_meta(conn, "schema", orjson.dumps(schema_json(schema)).decode())
    return plan
