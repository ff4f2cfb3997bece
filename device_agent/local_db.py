"""The device's SQLite database: synced tables from the relay's schema, agent metadata.

Layout (docs/device-agent.md, "Local database"):

- Every table the relay's ``/v1/schema`` lists becomes an ordinary SQLite table that any
  app may read and write with plain sqlite3.  ``public.work_orders`` is named
  ``work_orders``; a table of another schema ``s.t`` is named ``s__t``.  Columns keep
  their names and carry no declared type (values keep the type they were stored with);
  the primary key is the table's key, its columns ``NOT NULL``; indexes the schema lists
  are created too.
- Agent metadata lives in tables whose names start with :data:`PREFIX`
  (``_fieldsync_``); apps must not write them.

Values: the relay sends JSON (docs/events.md).  A value is stored as
:func:`to_sql` makes it (``true``/``false`` as 1/0, objects and arrays as canonical JSON
text, everything else as is) and read back into its wire form with :func:`from_sql`,
given the column's *kind* (``bool``, ``int``, ``float``, ``text``, ``json``), learned
from the first non-null value the relay sends for that column (the schema endpoint has
no column types) and kept in ``_fieldsync_tables.kinds``.

A row's identity inside the metadata tables is ``k``: the key value itself for a
single-column key, the canonical JSON array of the key values for a compound key
(:func:`key_k`).  Triggers (device_agent/triggers.py) compute the same ``k`` in SQL.

Concurrency: one :class:`sqlite3.Connection` per thread; SQLite's WAL mode lets apps
read while the agent writes, and writers take turns (``busy_timeout``).  Nothing here
keeps state outside the database file.
"""

from __future__ import annotations

import dataclasses
import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import orjson

from device_agent.errors import SchemaBlocked, StateError

PREFIX: Final = "_fieldsync_"
DB_VERSION: Final = 3
"""1: the first layout.  2: key columns NOT NULL, ``tables.counters``, ``replaced``, the
journal's index of open entries; rows are re-derived once (see :func:`upgrade_metadata`).
3: the journal's ``await_lsn`` and ``seen_lsn`` (settled edits kept on top until the
server version that includes them arrives) and their index."""
BUSY_TIMEOUT_MS: Final = 30_000
CACHE_KIB: Final = 262_144
"""Page cache of the agent's connection (KiB; SQLite allocates it as pages are used)."""

KINDS: Final = ("bool", "int", "float", "text", "json")

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\Z")

METADATA_DDL: Final = (
    f"""create table if not exists {PREFIX}meta (
        key text primary key, value text)""",
    f"""create table if not exists {PREFIX}tables (
        id integer primary key, name text not null unique, local text not null unique,
        columns text not null, key text not null, rules text not null default '[]',
        indexes text not null default '[]', kinds text not null default '{{}}',
        counters text not null default '[]')""",
    f"""create table if not exists {PREFIX}buckets (
        id integer primary key, name text not null unique,
        count integer not null default 0, checksum text not null default '0',
        last_op_id integer not null default 0, server_count integer, server_checksum text,
        state text not null default 'new', reset_pending integer not null default 0,
        mismatches integer not null default 0, verified_at real)""",
    f"""create table if not exists {PREFIX}rows (
        tbl integer not null, k not null, bucket integer not null, op_id integer not null,
        term integer not null, data text, pos text,
        primary key (tbl, k, bucket)) without rowid""",
    f"""create table if not exists {PREFIX}journal (
        seq integer primary key, tbl integer not null, k not null,
        op text not null, old text, new text, base text,
        hlc_l integer, hlc_c integer, prev_seq integer,
        at_ms integer not null default (cast((julianday('now') - 2440587.5) * 86400000.0 as integer)),
        status text not null default 'pending', created_at real not null default (julianday('now')),
        sent_at real, settled_at real, outcome text, reason text, message text, expect text,
        await_lsn integer, seen_lsn integer)""",
    f"""create table if not exists {PREFIX}clock (
        id integer primary key check (id = 1), l integer not null, c integer not null)""",
    f"insert or ignore into {PREFIX}clock values (1, 0, 0)",
    f"""create table if not exists {PREFIX}applying (flag integer)""",
    f"""create table if not exists {PREFIX}staging (
        seq integer primary key, message blob not null)""",
    f"""create index if not exists {PREFIX}journal_open on {PREFIX}journal (tbl, k, seq)
        where status in ('pending', 'sent')""",
    f"""create table if not exists {PREFIX}replaced (
        tbl integer not null, k not null, row text, primary key (tbl, k)) without rowid""",
    f"""create table if not exists {PREFIX}conflicts (
        id integer primary key, seq integer, tbl integer not null, k not null,
        detail text not null, status text not null default 'open', resolution text,
        created_at real not null default (julianday('now')), resolved_at real)""",
)

JOURNAL_COLUMNS: Final = {"await_lsn": "integer", "seen_lsn": "integer"}
"""Journal columns of later versions (added to an older database before its indexes)."""

METADATA_INDEXES: Final = (
    f"""create index if not exists {PREFIX}journal_awaiting on {PREFIX}journal (tbl, k, seq)
        where await_lsn is not null""",
)
"""Indexes on columns of :data:`JOURNAL_COLUMNS` (created after they exist)."""


# --------------------------------------------------------------------------- schema model


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One synced table as the relay describes it (``/v1/schema``)."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    rules: tuple[str, ...] = ()
    indexes: tuple[tuple[str, ...], ...] = ()
    counters: tuple[str, ...] = ()

    @property
    def local(self) -> str:
        return local_name(self.name)


@dataclasses.dataclass(frozen=True)
class RelaySchema:
    tables: tuple[TableSpec, ...]
    buckets: tuple[str, ...]

    def table(self, name: str) -> TableSpec | None:
        return next((t for t in self.tables if t.name == name), None)


def parse_schema(body: Any) -> RelaySchema:
    """Read a ``/v1/schema`` body; :class:`StateError` names what is wrong.

    ``columns`` may be names or objects ``{"name": …}``; ``indexes`` (optional) lists
    column lists or objects ``{"columns": [...]}``; ``counters`` (optional) names the
    columns the server merges as counters (deltas add).
    """
    if not isinstance(body, dict) or not isinstance(body.get("tables"), list):
        raise StateError("the relay's schema is not an object with a 'tables' list")
    tables = []
    for raw in body["tables"]:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise StateError(f"the relay's schema has a table without a name: {raw!r:.120}")
        name = raw["name"]
        columns = tuple(
            c["name"] if isinstance(c, dict) else str(c) for c in raw.get("columns") or ()
        )
        key = tuple(str(c) for c in raw.get("key") or ())
        if not columns or not key or not set(key) <= set(columns):
            raise StateError(f"the relay's schema of {name} has no columns or an invalid key")
        for col in columns:
            check_identifier(col, f"column of {name}")
        indexes = []
        for ix in raw.get("indexes") or ():
            cols = ix.get("columns") if isinstance(ix, dict) else ix
            if isinstance(cols, list) and cols and all(c in columns for c in cols):
                indexes.append(tuple(str(c) for c in cols))
        counters = tuple(str(c) for c in raw.get("counters") or () if c in columns)
        tables.append(
            TableSpec(name, columns, key, tuple(raw.get("rules") or ()), tuple(indexes), counters)
        )
    locals_ = [t.local for t in tables]
    if len(set(locals_)) != len(locals_):
        raise StateError(f"two synced tables map to the same local name: {sorted(locals_)}")
    return RelaySchema(tuple(tables), tuple(str(b) for b in body.get("buckets") or ()))


def check_identifier(name: str, what: str) -> None:
    if not name or '"' in name or "\x00" in name or name.lower().startswith(PREFIX):
        raise StateError(f"{what} {name!r} cannot be used as a SQLite name")


def local_name(table: str) -> str:
    """``public.t`` → ``t``; ``s.t`` → ``s__t``."""
    schema, _, name = table.rpartition(".")
    local = name if schema in ("", "public") else f"{schema}__{name}"
    check_identifier(local, "table")
    return local


def q(name: str) -> str:
    """A quoted SQLite identifier."""
    return '"' + name.replace('"', '""') + '"'


# --------------------------------------------------------------------------- values


def to_sql(value: Any) -> Any:
    """A wire (JSON) value as stored in SQLite."""
    if isinstance(value, dict | list):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return value


def from_sql(value: Any, kind: str | None) -> Any:
    """A stored value back in wire form (``kind`` from :func:`kind_of`)."""
    if value is None:
        return None
    if kind == "bool" and isinstance(value, int):
        return bool(value)
    if kind == "json" and isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    if kind == "float" and isinstance(value, int):
        return float(value)
    if isinstance(value, bytes):
        import base64

        return base64.b64encode(value).decode("ascii")
    return value


def kind_of(value: Any) -> str | None:
    """The kind of a non-null wire value (None for null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, dict | list):
        return "json"
    return "text"


def key_k(key: Sequence[Any]) -> Any:
    """The metadata identity ``k`` of a row with wire key values ``key``."""
    if len(key) == 1:
        return to_sql(key[0]) if not isinstance(key[0], bool) else int(key[0])
    return orjson.dumps(list(key)).decode()


def k_key(k: Any, kinds: Sequence[str | None]) -> list[Any]:
    """Inverse of :func:`key_k`: the wire key values (``kinds`` of the key columns)."""
    if len(kinds) == 1:
        return [from_sql(k, kinds[0])]
    values: list[Any] = orjson.loads(k)
    return values


# --------------------------------------------------------------------------- connection


def connect(path: str, key: str | None = None) -> sqlite3.Connection:
    """Open the device database (autocommit mode; explicit transactions), WAL, busy timeout.

    ``key``: open with SQLCipher (device_agent/crypto.py).
    """
    if key is not None:
        from device_agent.crypto import connect_encrypted

        conn = connect_encrypted(path, key)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"pragma busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("pragma journal_mode = wal")
    conn.execute("pragma synchronous = normal")
    conn.execute(f"pragma cache_size = -{CACHE_KIB}")
    conn.execute("pragma temp_store = memory")
    return conn


def ensure_metadata(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        for ddl in METADATA_DDL:
            conn.execute(ddl)
        conn.execute(
            f"insert or ignore into {PREFIX}meta values ('db_version', ?)", (str(DB_VERSION),)
        )
        _add_columns(conn)
    upgrade_metadata(conn)


def _add_columns(conn: sqlite3.Connection) -> None:
    """Inside a transaction: the journal columns and indexes of later versions."""
    have = {r[1] for r in conn.execute(f"pragma table_info({PREFIX}journal)")}
    for column, decl in JOURNAL_COLUMNS.items():
        if column not in have:
            conn.execute(f"alter table {PREFIX}journal add column {column} {decl}")
    for ddl in METADATA_INDEXES:
        conn.execute(ddl)


def upgrade_metadata(conn: sqlite3.Connection) -> None:
    """Bring the agent's metadata tables of an older database to :data:`DB_VERSION` (one
    transaction).  From version 1: ``tables.counters``, ``replaced``, the index of open
    journal entries; the ``expect`` holds of version 1 are dropped, and the next schema
    migration (every sync) re-derives every row (:func:`rederive_all`).  From version 2:
    the journal's ``await_lsn`` and ``seen_lsn`` (NULL: entries settled before keep
    nothing on top).  The app's tables are not touched here: their key columns become NOT
    NULL in :func:`apply_schema`."""
    if int(get_meta(conn, "db_version") or DB_VERSION) >= DB_VERSION:
        return
    with transaction(conn):
        version = int(get_meta(conn, "db_version") or DB_VERSION)
        if version >= DB_VERSION:
            return
        for ddl in METADATA_DDL:
            conn.execute(ddl)
        _add_columns(conn)
        if version < 2:
            have = {r[1] for r in conn.execute(f"pragma table_info({PREFIX}tables)")}
            if "counters" not in have:
                conn.execute(
                    f"alter table {PREFIX}tables add column counters text not null default '[]'"
                )
            conn.execute(f"update {PREFIX}journal set expect = null where expect is not null")
            set_meta(conn, "rederive", "1")
        set_meta(conn, "db_version", str(DB_VERSION))


def is_initialized(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "select 1 from sqlite_master where type = 'table' and name = ?", (PREFIX + "meta",)
    ).fetchone()
    return row is not None


class transaction:
    """``with transaction(conn):`` a ``BEGIN IMMEDIATE`` … ``COMMIT`` (rollback on error)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("begin immediate")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("commit")
        else:
            self.conn.execute("rollback")


def get_meta(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute(f"select value from {PREFIX}meta where key = ?", (key,)).fetchone()
    return default if row is None or row[0] is None else str(row[0])


def set_meta(conn: sqlite3.Connection, key: str, value: str | None) -> None:
    conn.execute(f"insert or replace into {PREFIX}meta values (?, ?)", (key, value))


# --------------------------------------------------------------------------- local tables


@dataclasses.dataclass
class LocalTable:
    """A synced table as the device holds it (``_fieldsync_tables``)."""

    id: int
    name: str
    local: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    rules: tuple[str, ...]
    kinds: dict[str, str]
    counters: frozenset[str] = frozenset()

    @property
    def multi(self) -> bool:
        """Rows may arrive through several rules (with different projections)."""
        return len(self.rules) != 1

    def key_kinds(self) -> list[str | None]:
        return [self.kinds.get(c) for c in self.key]


def load_tables(conn: sqlite3.Connection) -> dict[str, LocalTable]:
    out: dict[str, LocalTable] = {}
    for tid, name, local, cols, key, rules, kinds, counters in conn.execute(
        f"""select id, name, local, columns, key, rules, kinds, counters
            from {PREFIX}tables order by id"""
    ):
        out[name] = LocalTable(
            tid,
            name,
            local,
            tuple(orjson.loads(cols)),
            tuple(orjson.loads(key)),
            tuple(orjson.loads(rules)),
            dict(orjson.loads(kinds)),
            frozenset(orjson.loads(counters)),
        )
    return out


def save_kinds(conn: sqlite3.Connection, table: LocalTable) -> None:
    conn.execute(
        f"update {PREFIX}tables set kinds = ? where id = ?",
        (orjson.dumps(table.kinds).decode(), table.id),
    )


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
    notes: list[str] = dataclasses.field(default_factory=list)
    blockers: list[str] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.statements or self.removed_tables or self.changed_tables)


def _pending_count(conn: sqlite3.Connection, tid: int) -> int:
    row = conn.execute(
        f"select count(*) from {PREFIX}journal where tbl = ? and status in ('pending', 'sent')",
        (tid,),
    ).fetchone()
    return int(row[0])


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
        pending = _pending_count(conn, old.id)
        if old.key != spec.key:
            if pending:
                plan.blockers.append(
                    f"{spec.name}: the primary key changed from ({', '.join(old.key)}) to "
                    f"({', '.join(spec.key)}) and {pending} local edit(s) of it are not synced "
                    "yet; sync them first (device-agent sync --once), or discard them with "
                    "device-agent reset"
                )
                continue
            plan.statements.append(f"drop table if exists {q(old.local)}")
            plan.statements += create_table_sql(spec)
            plan.rebuilt_tables.append(spec.name)
            plan.changed_tables.append(spec)
            plan.notes.append(f"{spec.name}: primary key changed; table rebuilt and re-downloaded")
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
            elif pending:
                plan.blockers.append(
                    f"{spec.name}: column {c} was removed on the server and {pending} local "
                    "edit(s) of the table are not synced yet; sync them first"
                )
            else:
                plan.statements.append(f"alter table {q(old.local)} drop column {q(c)}")
                plan.notes.append(f"{spec.name}: column {c} dropped (removed on the server)")
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


def bucket_ids(conn: sqlite3.Connection, names: Iterable[str]) -> dict[str, int]:
    """Ids of buckets (created when new)."""
    out: dict[str, int] = {}
    for name in names:
        conn.execute(f"insert or ignore into {PREFIX}buckets (name) values (?)", (name,))
        row = conn.execute(f"select id from {PREFIX}buckets where name = ?", (name,)).fetchone()
        out[name] = int(row[0])
    return out


def require_initialized(conn: sqlite3.Connection, path: str) -> None:
    """Raise :class:`StateError` unless ``path`` is an initialized device database; bring
    its metadata to the current version (:func:`upgrade_metadata`)."""
    if not is_initialized(conn) or get_meta(conn, "relay_url") is None:
        raise StateError(
            f"{path} is not a device-agent database; run device-agent init --relay URL "
            "--token TOKEN --db PATH first"
        )
    upgrade_metadata(conn)


# --------------------------------------------------------------------------- key columns


def key_expr(table: LocalTable, ref: str) -> str:
    """SQL computing a row's ``k`` (:func:`key_k`) from ``ref`` (a table name or alias)."""
    if len(table.key) == 1:
        return f"{ref}.{q(table.key[0])}"
    return "json_array(" + ", ".join(f"{ref}.{q(c)}" for c in table.key) + ")"


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


def blocked(migration: Migration) -> SchemaBlocked:
    return SchemaBlocked(
        "the server's schema changed and the local tables cannot follow:\n  - "
        + "\n  - ".join(migration.blockers)
    )


def columns_kinds(rows: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for row in rows:
        for c, v in row.items():
            k = kind_of(v)
            if k is not None:
                out.setdefault(c, k)
    return out


def apply_schema(conn: sqlite3.Connection, schema: RelaySchema) -> Migration:
    """Bring the local tables to ``schema`` in one transaction (tables, columns, indexes,
    triggers, ``_fieldsync_tables``); raises :class:`SchemaBlocked` naming what blocks it.

    Buckets holding rows of a table whose key or rules changed are marked for
    re-download (their rows' stored projections no longer fit)."""
    from device_agent import triggers

    with transaction(conn):
        plan = plan_migration(conn, schema)
        if plan.blockers:
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
        for stmt in plan.statements:
            conn.execute(stmt)
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
        for t in load_tables(conn).values():
            triggers.install(conn, t)
        set_meta(conn, "schema", orjson.dumps(schema_json(schema)).decode())
    return plan


def schema_json(schema: RelaySchema) -> dict[str, Any]:
    return {
        "tables": [
            {
                "name": t.name,
                "columns": list(t.columns),
                "key": list(t.key),
                "rules": list(t.rules),
                "indexes": [list(i) for i in t.indexes],
                "counters": list(t.counters),
            }
            for t in schema.tables
        ],
        "buckets": list(schema.buckets),
    }
