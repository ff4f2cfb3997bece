"""The device's SQLite database: connection, the agent's metadata tables, value forms.

Layout (docs/device-agent.md, "Local database"):

- Every table the relay's ``/v1/schema`` lists becomes an ordinary SQLite table that any
  app may read and write with plain sqlite3.  ``public.work_orders`` is named
  ``work_orders``; a table of another schema ``s.t`` is named ``s__t``.  Columns keep
  their names and carry no declared type (values keep the type they were stored with);
  the primary key is the table's key, its columns ``NOT NULL``; indexes the schema lists
  are created too (device_agent/relay_schema.py reads the schema,
  device_agent/schema_sync.py brings the tables to it).
- Agent metadata lives in tables whose names start with :data:`PREFIX`
  (``_fieldsync_``); apps must not write them (:data:`METADATA_DDL`; databases of an
  earlier layout are brought to :data:`DB_VERSION` when opened: :func:`upgrade_metadata`).

Values: the relay sends JSON (docs/events.md).  A value is stored as
:func:`to_sql` makes it (``true``/``false`` as 1/0, objects and arrays as canonical JSON
text, everything else as is: the stored form does not depend on the column) and read
back into its wire form with :func:`from_sql`, given the column's *kind* (``bool``,
``int``, ``float``, ``text``, ``json``: :mod:`core.column_kinds`), kept in
``_fieldsync_tables.kinds``.  The relay's ``/v1/schema`` gives each column's kind
(device_agent/schema_sync.py records it, and records it again when the column is
retyped); from a relay that gives none, a column's kind is learned from the first
non-null value received (:func:`kind_of`, device_agent/bucket_ops.py).

A row's identity inside the metadata tables is ``k``: the key value itself for a
single-column key, the JSON array SQLite's ``json_array`` makes of the stored key values
for a compound key (:func:`key_k`; floats with 17 digits).  Triggers (device_agent/triggers.py) compute the same ``k`` in SQL
(:func:`device_agent.local_tables.key_expr`).

The base every writer of the database shares (:data:`PREFIX`, :func:`q`,
:class:`LocalTable`, :func:`load_tables`, :func:`key_expr`, :class:`transaction`) is
defined in device_agent/local_tables.py, which device_agent/triggers.py imports too.

Concurrency: one :class:`sqlite3.Connection` per thread; SQLite's WAL mode lets apps
read while the agent writes, and writers take turns (``busy_timeout``).  Nothing here
keeps state outside the database file.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Final

import orjson

from device_agent.errors import StateError
from device_agent.local_tables import (
    PREFIX,
    json_value_sql,
    transaction,
)

DB_VERSION: Final = 3
"""1: the first layout.  2: key columns NOT NULL, ``tables.counters``, ``replaced``, the
journal's index of open entries; rows are re-derived once (see :func:`upgrade_metadata`).
3: the journal's ``await_lsn`` and ``seen_lsn`` (settled edits kept on top until the
server version that includes them arrives) and their index."""
BUSY_TIMEOUT_MS: Final = 30_000
CACHE_KIB: Final = 262_144
"""Page cache of the agent's connection (KiB; SQLite allocates it as pages are used)."""

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


_READ_AS_STORED: Final = frozenset({None, "int", "text"})


def reads_alike(kind: str | None, other: str | None) -> bool:
    """Whether :func:`from_sql` reads every stored value alike under both kinds (``int``,
    ``text`` and no kind return values as stored; ``bool``, ``float`` and ``json``
    convert some)."""
    if kind in _READ_AS_STORED and other in _READ_AS_STORED:
        return True
    return kind == other


_BOUNDED_ARRAY: Final = re.compile(r"(\[-?\d+:-?\d+\])+=\{")


def kind_of(value: Any) -> str | None:
    """The kind of a non-null wire value; None for null, and for a text that is an array
    literal with explicit bounds (``[0:1]={7,8}``), which is how an array column's value
    comes when its lower bound is not 1: the column's other values are lists (``json``),
    so such a text decides nothing."""
    if value is None:
        return None
    if type(value) is str and value[:1] == "[" and _BOUNDED_ARRAY.match(value):
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
    """The metadata identity ``k`` of a row with wire key values ``key``: the value of a
    one-column key as stored; else the JSON array the triggers' :func:`key_expr` makes of
    the stored values (for keys of only integers and texts the same text as orjson's;
    others, with floats, booleans or JSON, are rendered by SQLite itself, whose float
    digits no Python formatting reproduces)."""
    if len(key) == 1:
        return to_sql(key[0]) if not isinstance(key[0], bool) else int(key[0])
    if all(type(v) in (int, str) for v in key):
        return orjson.dumps(list(key)).decode()
    return _sqlite_key_text([to_sql(v) for v in key])


_KEY_SQL: dict[int, str] = {}
_key_conn = threading.local()


def _sqlite_key_text(values: Sequence[Any]) -> str:
    conn = getattr(_key_conn, "conn", None)
    if conn is None:
        conn = _key_conn.conn = sqlite3.connect(":memory:")
    n = len(values)
    sql = _KEY_SQL.get(n)
    if sql is None:
        parts = ", ".join(json_value_sql(f"?{i + 1}") for i in range(n))
        sql = _KEY_SQL[n] = f"select json_array({parts})"
    return str(conn.execute(sql, tuple(values)).fetchone()[0])


def k_key(k: Any, kinds: Sequence[str | None]) -> list[Any]:
    """Inverse of :func:`key_k`: the wire key values (``kinds`` of the key columns)."""
    if len(kinds) == 1:
        return [from_sql(k, kinds[0])]
    values: list[Any] = orjson.loads(k)
    if len(values) == len(kinds):
        return [from_sql(v, kind) for v, kind in zip(values, kinds, strict=True)]
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
    migration (every sync) re-derives every row
    (:func:`device_agent.schema_sync.rederive_all`).  From version 2: the journal's
    ``await_lsn`` and ``seen_lsn`` (NULL: entries settled before keep nothing on top).
    The app's tables are not touched here: their key columns become NOT NULL in
    :func:`device_agent.schema_sync.apply_schema`."""
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


def get_meta(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute(f"select value from {PREFIX}meta where key = ?", (key,)).fetchone()
    return default if row is None or row[0] is None else str(row[0])


def set_meta(conn: sqlite3.Connection, key: str, value: str | None) -> None:
    conn.execute(f"insert or replace into {PREFIX}meta values (?, ?)", (key, value))


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
