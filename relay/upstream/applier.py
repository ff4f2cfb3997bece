"""The upstream applier: device journal entries from Kafka into the captured PostgreSQL.

Data path::

    {prefix}._journal ──poll──▶ JournalRecord ──▶ runs (one device, one partition)
        ──▶ ONE PostgreSQL transaction per run:
              pg_logical_emit_message(true, 'fieldsync.origin', 'device:<id>')
              idempotency check (fieldsync_applier.applied)
              validate (relay.upstream.journal) ── read rows SELECT … FOR UPDATE ── merge (relay.upstream.merge)
              write rows, applied records, kept conflicts, outbox, Kafka offsets
        ──commit──▶ outbox ──▶ {prefix}._outcomes (keyed by device) ──▶ delete from outbox

Choices (docs/journal.md is the reference):

- **Exactly once.**  Each entry's data write and its idempotency record
  ``fieldsync_applier.applied(device_id, seq, …)`` commit in the same transaction, and so
  do the consumer offsets (``fieldsync_applier.offsets``), which are the only offsets used
  (manual partition assignment; the applier seeks to them at start).  A crash between the
  PostgreSQL commit and anything after it re-reads nothing already applied; a record
  delivered twice (a device re-uploading, a relay retrying) finds its ``(device, seq)``
  in ``applied`` and is skipped.  Offsets only move forward (``greatest``).
- **Runs.**  The records of one poll are grouped by device (each device's in offset
  order; edits of different devices are independent), and each group (at most
  ``batch_max_entries``) is one transaction: its origin message names that device, so cdc
  puts ``device:<id>`` into ``source.origin`` of every change it made.  Each transaction
  stores, per partition, the lowest offset of the poll not applied yet, so after a crash
  the rest is read again and what was applied is skipped by the idempotency check.
- **Reading and writing rows.**  The rows of a run are read with one ``SELECT`` per
  table, without locks; updates and deletes go out as one ``UPDATE … FROM unnest(…)`` /
  ``DELETE … USING unnest(…)`` per table and column set, each row guarded by the
  ``xmin`` the merge saw (optimistic concurrency: a row another transaction changed in
  between is not written, the row count shows it, and the run is rolled back and
  retried, then with ``SELECT … ORDER BY key FOR UPDATE``).  An entry touching a row an
  earlier entry of the run wrote re-reads it first.  Inserts run in a savepoint with ``RETURNING`` so the
  inserted row (defaults, triggers) is checked against the device's buckets before it is
  kept.  Deadlocks and serialization failures retry the run.
- **No entry stops a partition.**  Failures are classified by SQLSTATE
  (:func:`classify_failure`): one caused by what an entry writes (data exception,
  constraint, trigger, program limit; or the applier's own code failing on an entry)
  splits the run in halves until the entry is alone; that entry is rejected
  (``db_error`` / ``internal_error``), kept in ``fieldsync_applier.dead_letters``, counted
  and logged, and the others apply.  Any other failure (connection, shutdown, resources,
  timeouts, privileges, schema) is the database's: the applier backs off and reads the
  same records again, rejecting nothing.
- **Server changes since the base** are found per column by comparing the server's row
  (read as text and converted exactly as cdc converts it, so it compares equal to what
  the device received) with the entry's ``old`` values.
- **The server version's time** (for ``lww``/``fww``): if the row's current version was
  written by the applier (its ``xmin`` equals the transaction id recorded in
  ``fieldsync_applier.row_clock`` for that row), the device HLC of that write; else the
  commit time of ``xmin`` (``pg_xact_commit_timestamp``, when ``track_commit_timestamp``
  is on); else the table's ``time_column`` from the conflicts file; else unknown (older
  than any edit).  Tables whose policies need a time but have neither commit timestamps
  nor a ``time_column`` are refused at start.  A missing row's deletion time is the
  HLC of the applier's delete, else *now*.  ``row_clock`` is kept only for such tables.
- **Outcomes** are recorded in ``applied`` (audit: device, seq, decision, time) and put
  in ``fieldsync_applier.outbox`` in the same transaction (one row per run: the run's
  outcomes, :func:`relay.upstream.journal.encode_outcomes`); after the commit the leader publishes
  the outbox to ``{prefix}._outcomes`` (keyed by device; idempotent producer, in id
  order) and deletes what Kafka acknowledged.  A crash in between publishes those
  outcomes again: consumers keep the latest outcome per ``(device_id, seq)``.
- **When a device sees its edit come back.**  After a transaction's last row write and
  before its commit the applier reads ``pg_current_wal_insert_lsn()`` and puts it into
  the outcome of every entry that wrote its row (``visible_after``;
  :meth:`_RunState.bound_written`).  The commit record is inserted after that position,
  so each change event of those writes has ``commit_lsn`` at or above it; the written
  rows stay locked until the commit, so a later version of them (an office change)
  commits after it as well; and a version committed before the writes has a lower
  ``commit_lsn``.  A device therefore knows, from a received version's position alone,
  whether it includes (or supersedes) its edit.  Outcomes that wrote nothing (rejected,
  a kept conflict with every column held, nothing to change) carry no bound.
- **ask** conflicts are kept in ``fieldsync_applier.conflicts`` with both versions until
  :meth:`ApplierDb.resolve` settles them: the resolution is a new edit (its transaction's
  origin is ``resolve:<conflict id>``) and a ``resolved`` outcome for the device;
  resolving again returns the first resolution and changes nothing.  A device's
  resolution (``claims`` given) is judged by its write rules against the current row,
  like its journal entries; an operator's is trusted.
- **One applier per database, consumer name and shard**: a session advisory lock on the
  connection that writes; others stand by.  With ``shards`` = K, shard *i* consumes the
  partitions *p* with *p* mod K = *i* (devices are independent, so K processes apply in
  parallel); offsets are kept per partition, so K may change between restarts.  Shards
  that overlap by mistake stay correct: an entry's ``applied`` record can be inserted
  only once, and the loser of that race skips the entry as a duplicate.

The applier's session uses cdc's text formats (:data:`core.pg_types.SESSION_SETTINGS`,
TimeZone UTC included) so values read back parse exactly.

Threading: :meth:`Applier.run` in one thread; :meth:`Applier.request_stop` from any.
:class:`ApplierDb` is not thread-safe (one connection).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb, set_json_dumps

from cdc.kafka_sink import build_client
from core.avro_envelope import ORIGIN_MESSAGE_PREFIX, TableCodec
from core.envelope_schema import ColumnType, Kind, column_types_from_value_schema
from core.hlc import Hlc, HybridClock, wall_clock_ms
from core.pg_types import (
    CATALOG_QUERY,
    SESSION_SETTINGS,
    ColumnSpec,
    MappingCatalog,
    TypeInfo,
    output_function_text,
)
from core.row_wire import json_value, row_key_text
from relay.downstream.bucket_engine import FETCH_MAX_WAIT_MS, table_infos_from_conn
from relay.downstream.rules import Rules, TableInfo, canonical_text, load_rules
from relay.errors import (  # noqa: F401 (re-exported)
    ApplierError,
    ConfigError,
    ConflictNotFound,
    RelayError,
    ResolveError,
    ResolveForbidden,
)
from relay.pg_migrations import run_migrations
from relay.upstream.journal import (
    JournalEntry,
    JournalFormatError,
    JournalRecord,
    Outcome,
    OutcomeKind,
    Reason,
    Rejection,
    WriteScope,
    blocked_by,
    check_write,
    coerce_value,
    dump_json,
    encode_outcomes,
    same_value,
    to_pg_text,
    validate_entry,
)
from relay.upstream.merge import (
    Action,
    ConflictPolicies,
    EditTimes,
    MergeResult,
    TablePolicy,
    load_conflicts,
    merge,
)

__all__ = [
    "Applier",
    "ApplierDb",
    "ApplierError",
    "ApplyStats",
    "ConflictNotFound",
    "Delivery",
    "ResolveError",
    "ResolveForbidden",
    "TableMeta",
]

log = logging.getLogger(__name__)

SCHEMA: Final = "fieldsync_applier"
SERVER_NODE: Final = "fieldsync-applier"
_LOCK_CLASS: Final = 0x66730002  # advisory lock namespace ("fs" + 2)
_MIGRATE_LOCK: Final = (_LOCK_CLASS, 0)
_EMIT: Final = "select pg_logical_emit_message(true, %s, %s)"
_XID32: Final = "select pg_current_xact_id()::text::bigint % 4294967296"
_RETRY_ERRORS: Final = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
ENTRY_SQLSTATE_CLASSES: Final = frozenset(
    {"09", "21", "22", "23", "27", "2F", "38", "39", "44", "54", "P0"}
)
"""SQLSTATE classes of errors caused by what an entry writes, which no retry can cure:
triggered action (09), cardinality (21), data (22: value out of range, invalid text,
…), integrity constraints (23), triggered data change (27), routine exceptions raised
by triggers and functions (2F, 38, 39, P0: RAISE), view check option (44), program
limits (54: index row too large, NUL in text).  Every other error (connection lost,
serialization failure, deadlock, lock or statement timeout, shutdown, out of resources,
missing privilege, changed schema, internal) is the database's, not the entry's: the
work is retried."""


class Failure(enum.Enum):
    """What a failure while applying entries is caused by."""

    TRANSIENT = "transient"  # the database (or the applier's view of it): retry
    ENTRY = "entry"  # what one entry writes: reject that entry, go on with the others


def classify_failure(exc: BaseException) -> Failure:
    """:data:`Failure.ENTRY` for a PostgreSQL error of a class in
    :data:`ENTRY_SQLSTATE_CLASSES` and for an unexpected exception of the applier's own
    code while handling entries (it fails the same way every time for that entry);
    :data:`Failure.TRANSIENT` for every other PostgreSQL error (no SQLSTATE: the
    connection), concurrent changes and :class:`ApplierError`."""
    if isinstance(exc, _Concurrent | ApplierError):
        return Failure.TRANSIENT
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate or ""
        return Failure.ENTRY if state[:2] in ENTRY_SQLSTATE_CLASSES else Failure.TRANSIENT
    return Failure.ENTRY


@dataclasses.dataclass(frozen=True)
class _Failed:
    """Why an entry is being rejected after failing alone: the dead letter's content."""

    reason: Reason
    message: str
    sqlstate: str | None

    @classmethod
    def of(cls, exc: BaseException) -> _Failed:
        if isinstance(exc, psycopg.Error):
            return cls(
                Reason.DB_ERROR, f"PostgreSQL refused the write: {_pg_message(exc)}", exc.sqlstate
            )
        return cls(
            Reason.INTERNAL_ERROR,
            f"the applier failed on this entry ({type(exc).__name__}); its log has details",
            None,
        )


MIGRATIONS: Final[tuple[str, ...]] = (
    f"""
    create table {SCHEMA}.applied (
        device_id text not null,
        seq bigint not null,
        outcome text not null,
        reason text,
        message text not null default '',
        tbl text,
        row_key text,
        op text,
        hlc text,
        base_lsn bigint,
        base_seq bigint,
        detail jsonb,
        received_us bigint,
        applied_at timestamptz not null default clock_timestamp(),
        primary key (device_id, seq)
    );
    create index applied_at_idx on {SCHEMA}.applied (applied_at);
    create table {SCHEMA}.conflicts (
        id text primary key,
        device_id text not null,
        seq bigint not null,
        tbl text not null,
        row_key text not null,
        key jsonb not null,
        kind text not null check (kind in ('columns', 'row')),
        held jsonb not null,
        claims jsonb not null,
        status text not null default 'open' check (status in ('open', 'resolved')),
        resolution jsonb,
        created_at timestamptz not null default now(),
        resolved_at timestamptz,
        resolved_by text
    );
    create index conflicts_open_idx on {SCHEMA}.conflicts (device_id, created_at)
        where status = 'open';
    create table {SCHEMA}.offsets (
        consumer text not null,
        topic text not null,
        partition int not null,
        next_offset bigint not null,
        primary key (consumer, topic, partition)
    );
    create table {SCHEMA}.row_clock (
        tbl text not null,
        row_key text not null,
        hlc text not null,
        xid bigint not null,
        deleted boolean not null default false,
        primary key (tbl, row_key)
    );
    create table {SCHEMA}.outbox (
        id bigserial primary key,
        device_id text not null,
        payload bytea not null
    );
    create table {SCHEMA}.bad_records (
        topic text not null,
        partition int not null,
        "offset" bigint not null,
        error text not null,
        raw bytea,
        at timestamptz not null default now(),
        primary key (topic, partition, "offset")
    );
    """,
    f"""
    create table {SCHEMA}.dead_letters (
        topic text not null,
        partition int not null,
        "offset" bigint not null,
        device_id text not null,
        seq bigint not null,
        reason text not null,
        sqlstate text,
        message text not null,
        record bytea,
        at timestamptz not null default now(),
        primary key (topic, partition, "offset")
    );
    create index dead_letters_entry_idx on {SCHEMA}.dead_letters (device_id, seq);
    """,
)


# --------------------------------------------------------------------------- tables


_TABLES_QUERY = """
select n.nspname::text, c.relname::text, a.attname::text, a.atttypid::int8, a.atttypmod,
       format_type(a.atttypid, a.atttypmod),
       coalesce(array_position(i.indkey::int2[], a.attnum) - array_lower(i.indkey::int2[], 1) + 1, 0)
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
left join pg_index i on i.indrelid = c.oid and i.indisprimary
where c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema')
  and n.nspname not like 'pg_toast%%' and n.nspname <> 'fieldsync_applier'
order by n.nspname, c.relname, a.attnum
"""


def _decoded(ct: ColumnType | None, datum: Any) -> Any:
    """cdc's converter output → what an Avro reader decodes (fixed decimals → Decimal)."""
    if ct is None or datum is None:
        return datum
    if ct.kind is Kind.DECIMAL and isinstance(datum, bytes):
        return Decimal(int.from_bytes(datum, "big", signed=True)).scaleb(-(ct.scale or 0))
    if ct.kind is Kind.ARRAY and isinstance(datum, list):
        return [_decoded(ct.element if not isinstance(d, list) else ct, d) for d in datum]
    return datum


class TableMeta:
    """One captured table: columns, key, wire types, text readers, and its SQL."""

    def __init__(
        self,
        name: str,
        columns: Sequence[tuple[str, int, int, str, int]],
        catalog: MappingCatalog,
        db: str,
    ) -> None:
        self.name = name
        self.schema, _, self.table = name.partition(".")
        ordered = sorted((c for c in columns if c[4] > 0), key=lambda c: c[4])
        self.columns: tuple[str, ...] = tuple(c[0] for c in columns)
        self.key: tuple[str, ...] = tuple(c[0] for c in ordered)
        self.info = TableInfo(self.columns, self.key)
        self.casts: dict[str, sql.Composable] = {c[0]: sql.SQL(c[3]) for c in columns}
        codec = TableCodec(
            db=db,
            schema=self.schema,
            table=self.table,
            columns=[ColumnSpec(c[0], c[1], c[2], c[4] > 0) for c in columns],
            catalog=catalog,
            unchanged_sentinel=object(),
            warn=lambda m: log.debug("%s: %s", name, m),
        )
        found = column_types_from_value_schema(json.loads(codec.value_schema_json))
        assert found is not None
        self.types: dict[str, ColumnType] = found[1]
        self._convert = {
            spec.name: c.convert for spec, c in zip(codec.columns, codec.column_codecs, strict=True)
        }
        self.ident = sql.Identifier(self.schema, self.table)
        self._plain_key = all(
            self.types[k].kind not in (Kind.DECIMAL, Kind.NUMERIC, Kind.ARRAY, Kind.INTERVAL)
            for k in self.key
        )
        self._sql: dict[Any, bytes] = {}

    def read(self, texts: Sequence[str | None]) -> dict[str, Any]:
        """A row from its columns' text forms (table order) → wire form."""
        out: dict[str, Any] = {}
        for column, text in zip(self.columns, texts, strict=True):
            if text is None:
                out[column] = None
            else:
                ct = self.types.get(column)
                out[column] = json_value(_decoded(ct, self._convert[column](text)))
        return out

    def pg_text(self, column: str, value: Any) -> str | None:
        return to_pg_text(self.types[column], value)

    def key_id(self, key: Sequence[Any]) -> tuple[Any, ...]:
        """A lookup id of key values (normal wire form) that equal values share
        (decimals by number: ``"1.0"`` and ``"1"`` are one key)."""
        if self._plain_key:
            return tuple(key)
        out: list[Any] = []
        for column, value in zip(self.key, key, strict=True):
            if isinstance(value, str) and self.types[column].kind in (Kind.DECIMAL, Kind.NUMERIC):
                try:
                    value = canonical_text(Decimal(value)) or value
                except ArithmeticError:
                    pass
            elif isinstance(value, list | dict):
                value = json.dumps(value, sort_keys=True)
            out.append(value)
        return tuple(out)

    def _placeholder(self, column: str) -> sql.Composable:
        return sql.SQL("%s::") + self.casts[column]

    def _key_match(self) -> sql.Composable:
        return sql.SQL(" and ").join(
            sql.SQL("{} = {}").format(sql.Identifier(k), self._placeholder(k)) for k in self.key
        )

    def select_sql(self, commit_ts: bool, lock: bool = False) -> bytes:
        """Read (``lock``: and lock) the rows of many keys: ``unnest(text[] per key column)``."""
        cache_key = ("select", commit_ts, lock)
        found = self._sql.get(cache_key)
        if found is None:
            aliases = [sql.Identifier(f"k{i}") for i in range(len(self.key))]
            found = self._cache(
                cache_key,
                sql.SQL(
                    "select t.xmin::text, {ts}, {cols} from {t} as t join unnest({arrays}) as u({aliases})"
                    " on {match} order by {keys}{lock}"
                ).format(
                    lock=sql.SQL(" for update of t" if lock else ""),
                    ts=sql.SQL(
                        "(extract(epoch from pg_xact_commit_timestamp(t.xmin)) * 1000)::bigint::text"
                        if commit_ts
                        else "null::text"
                    ),
                    cols=sql.SQL(", ").join(sql.Identifier("t", c) for c in self.columns),
                    t=self.ident,
                    arrays=sql.SQL(", ").join([sql.SQL("%s::text[]")] * len(aliases)),
                    aliases=sql.SQL(", ").join(aliases),
                    match=self._many_key_match(aliases),
                    keys=sql.SQL(", ").join(sql.Identifier("t", k) for k in self.key),
                ),
            )
        return found

    def _cache(self, key: Any, composed: sql.Composable) -> bytes:
        rendered = composed.as_bytes(None)
        self._sql[key] = rendered
        return rendered

    def _columns(self) -> sql.Composable:
        # no ::text casts: some differ from the output function pgoutput uses
        # (bool::text is 'true', not 't'; inet::text adds the mask; char(n)::text trims)
        return sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)

    def update_sql(self, columns: Sequence[str]) -> bytes:
        cache_key = ("update", tuple(columns))
        found = self._sql.get(cache_key)
        if found is None:
            query = sql.SQL("update {t} set {sets} where {match}").format(
                t=self.ident,
                sets=sql.SQL(", ").join(
                    sql.SQL("{} = {}").format(sql.Identifier(c), self._placeholder(c))
                    for c in columns
                ),
                match=self._key_match(),
            )
            found = self._cache(cache_key, query)
        return found

    def update_many_sql(self, columns: Sequence[str]) -> bytes:
        """One UPDATE for many rows: ``from unnest(text[] per column, text[] per key column)``
        (the keys must be distinct)."""
        cache_key = ("update_many", tuple(columns))
        found = self._sql.get(cache_key)
        if found is None:
            values = [sql.Identifier(f"v{i}") for i in range(len(columns))]
            keys = [sql.Identifier(f"k{i}") for i in range(len(self.key))]
            query = sql.SQL(
                "update {t} as t set {sets} from unnest({arrays}) as u({aliases})"
                " where {match} and t.xmin = u.x::xid"
            ).format(
                t=self.ident,
                sets=sql.SQL(", ").join(
                    sql.SQL("{} = u.{}::{}").format(sql.Identifier(c), v, self.casts[c])
                    for c, v in zip(columns, values, strict=True)
                ),
                arrays=sql.SQL(", ").join([sql.SQL("%s::text[]")] * (len(values) + len(keys) + 1)),
                aliases=sql.SQL(", ").join([*values, *keys, sql.Identifier("x")]),
                match=self._many_key_match(keys),
            )
            found = self._cache(cache_key, query)
        return found

    def delete_many_sql(self) -> bytes:
        found = self._sql.get("delete_many")
        if found is None:
            keys = [sql.Identifier(f"k{i}") for i in range(len(self.key))]
            query = sql.SQL(
                "delete from {t} as t using unnest({arrays}) as u({aliases})"
                " where {match} and t.xmin = u.x::xid"
            ).format(
                t=self.ident,
                arrays=sql.SQL(", ").join([sql.SQL("%s::text[]")] * (len(keys) + 1)),
                aliases=sql.SQL(", ").join([*keys, sql.Identifier("x")]),
                match=self._many_key_match(keys),
            )
            found = self._cache("delete_many", query)
        return found

    def _many_key_match(self, aliases: Sequence[sql.Identifier]) -> sql.Composable:
        return sql.SQL(" and ").join(
            sql.SQL("t.{} = u.{}::{}").format(sql.Identifier(k), a, self.casts[k])
            for k, a in zip(self.key, aliases, strict=True)
        )

    def delete_sql(self) -> bytes:
        found = self._sql.get("delete")
        if found is None:
            query = sql.SQL("delete from {t} where {match}").format(
                t=self.ident, match=self._key_match()
            )
            found = self._cache("delete", query)
        return found

    def insert_sql(self, columns: Sequence[str]) -> bytes:
        cache_key = ("insert", tuple(columns))
        found = self._sql.get(cache_key)
        if found is None:
            query = sql.SQL(
                "insert into {t} ({cols}) values ({vals}) returning xmin::text, {texts}"
            ).format(
                t=self.ident,
                cols=sql.SQL(", ").join(sql.Identifier(c) for c in columns),
                vals=sql.SQL(", ").join(self._placeholder(c) for c in columns),
                texts=self._columns(),
            )
            found = self._cache(cache_key, query)
        return found

    def key_params(self, key: Sequence[Any]) -> list[str | None]:
        return [self.pg_text(c, v) for c, v in zip(self.key, key, strict=True)]


def read_tables(
    conn: psycopg.Connection[Any], names: Iterable[str] | None = None
) -> dict[str, TableMeta]:
    """:class:`TableMeta` of the captured tables (all user tables, or ``names``)."""
    wanted = set(names) if names is not None else None
    rows = conn.execute(_TABLES_QUERY).fetchall()
    by_table: dict[str, list[tuple[str, int, int, str, int]]] = {}
    for nsp, rel, col, oid, typmod, fmt, keypos in rows:
        name = f"{nsp}.{rel}"
        if wanted is None or name in wanted:
            by_table.setdefault(name, []).append(
                (col, int(oid), int(typmod), str(fmt), int(keypos))
            )
    oids = sorted({c[1] for cols in by_table.values() for c in cols})
    catalog = MappingCatalog(
        [
            TypeInfo.from_catalog_row(r)
            for r in conn.execute(CATALOG_QUERY, {"oids": oids}).fetchall()
        ]
    )
    db = str(conn.info.dbname)
    return {name: TableMeta(name, cols, catalog, db) for name, cols in by_table.items()}


# --------------------------------------------------------------------------- the database side


@dataclasses.dataclass(frozen=True)
class Delivery:
    """Where a journal record came from."""

    topic: str
    partition: int
    offset: int


@dataclasses.dataclass
class ApplyStats:
    """Counters since start."""

    records: int = 0
    applied: int = 0
    merged: int = 0
    conflicts: int = 0
    rejected: int = 0
    duplicates: int = 0
    bad_records: int = 0
    dead_letters: int = 0
    runs: int = 0
    run_retries: int = 0
    failures: int = 0
    apply_s: float = 0.0
    published: int = 0


@dataclasses.dataclass
class _Item:
    where: Delivery
    record: JournalRecord | None
    raw: bytes = b""
    error: str = ""
    entry: JournalEntry | None = None
    rejection: Rejection | None = None
    scope: WriteScope | None = None
    show_key: tuple[Any, ...] | None = None  # normal key of a rejected entry (to show the row)


@dataclasses.dataclass
class _Row:
    row: dict[str, Any] | None
    xmin: int | None = None
    commit_ms: int | None = None


@dataclasses.dataclass
class _Clock:
    hlc: Hlc
    xid: int
    deleted: bool


class _Concurrent(Exception):
    """A row changed between reading it and writing it: the run is retried."""


class _Undo(Exception):
    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection


class ApplierDb:
    """The applier's PostgreSQL side: catalog, rules, policies, runs, outbox, resolutions.

    ``rules_path``/``conflicts_path`` are read at :meth:`connect` against the captured
    database's catalog (``conflicts_path`` None: every table ``server_wins``).
    """

    def __init__(
        self,
        dsn: str,
        rules_path: str | Path,
        conflicts_path: str | Path | None = None,
        *,
        password: str | None = None,
        consumer: str = "fieldsync-applier",
        shard: int = 0,
        shards: int = 1,
        max_skew_ms: int = 60_000,
        wall_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.dsn = dsn
        self.password = password
        self.rules_path = rules_path
        self.conflicts_path = conflicts_path
        self.consumer = consumer
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} is not one of 0..{shards - 1}")
        self.shard, self.shards = shard, shards
        self.max_skew_ms = max_skew_ms
        self.wall_ms = wall_ms
        self.clock = HybridClock(SERVER_NODE, wall_ms=wall_ms)
        self.stats = ApplyStats()
        self.conn: psycopg.Connection[Any] | None = None
        self.rules: Rules | None = None
        self.policies = ConflictPolicies()
        self.tables: dict[str, TableMeta] = {}
        self.commit_timestamps = False
        self._scopes: dict[str, WriteScope] = {}
        self._lock_id = 0
        self._raw: psycopg.Cursor[Any] | None = None
        self._last_scope: tuple[dict[str, Any], WriteScope] | None = None

    # ---- connection, catalog, configuration

    def connect(self) -> None:
        """(Re)connect, read the catalog, load rules and policies; raises ConfigError for
        invalid rules/policies, ApplierError when the database is unreachable."""
        self.close()
        kw: dict[str, Any] = {"autocommit": True, "connect_timeout": 10}
        if self.password:
            kw["password"] = self.password
        try:
            conn = psycopg.connect(self.dsn, **kw)
        except psycopg.Error as exc:
            raise ApplierError(f"cannot connect to the captured database: {exc}") from exc
        try:
            for name, value in {**SESSION_SETTINGS, "client_encoding": "UTF8"}.items():
                conn.execute("select set_config(%s, %s, false)", (name, value))
            set_json_dumps(_orjson_text, conn)
            self.commit_timestamps = conn.execute(
                "select current_setting('track_commit_timestamp')"
            ).fetchone() == ("on",)
            infos = table_infos_from_conn(conn)  # as the engine reads them
            rules = load_rules(self.rules_path, infos)
            tables = read_tables(conn, rules.tables)
            types = {t: m.types for t, m in tables.items()}
            policies = (
                load_conflicts(self.conflicts_path, types)
                if self.conflicts_path is not None
                else ConflictPolicies()
            )
            self._check_times(rules, policies)
            self._lock_id = int(
                conn.execute(  # type: ignore[index]
                    "select hashtext(%s)", (f"{self.consumer}/{self.shard}of{self.shards}",)
                ).fetchone()[0]
            )
        except BaseException:
            conn.close()
            raise
        self.conn, self.rules, self.tables, self.policies = conn, rules, tables, policies
        self._scopes.clear()
        self._last_scope = None

    def _check_times(self, rules: Rules, policies: ConflictPolicies) -> None:
        if self.commit_timestamps:
            return
        lacking = sorted(
            t
            for t in rules.tables
            if policies.table(t).timed and policies.table(t).time_column is None
        )
        if lacking:
            raise ConfigError(
                f"{policies.source}: table(s) {', '.join(lacking)} use lww/fww, which needs the time "
                "of the server's row version: turn on track_commit_timestamp in PostgreSQL, or set "
                "time_column for the table in the conflicts file"
            )

    def close(self) -> None:
        self._raw = None
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
            self.conn = None

    def raw_cursor(self) -> psycopg.Cursor[Any]:
        """A cursor of the connection that returns every column as the text PostgreSQL's
        output function prints (what pgoutput sends), whatever its type."""
        if self._raw is None or self._raw.closed:
            cur = self._c().cursor()
            output_function_text(cur)
            self._raw = cur
        return self._raw

    def _c(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed:
            raise ApplierError("the applier's database connection is closed (connect() first)")
        return self.conn

    def migrate(self) -> int:
        """Create ``fieldsync_applier`` and apply pending migrations (safe concurrently)."""
        try:
            return run_migrations(self._c(), SCHEMA, MIGRATIONS, _MIGRATE_LOCK, ApplierError)
        except psycopg.Error as exc:
            raise ApplierError(f"migrating schema {SCHEMA} failed: {exc}") from exc

    def acquire_leadership(self) -> bool:
        """Try the session advisory lock of this consumer name (held until disconnect)."""
        row = (
            self._c()
            .execute("select pg_try_advisory_lock(%s, %s)", (_LOCK_CLASS, self._lock_id))
            .fetchone()
        )
        return bool(row and row[0])

    def release_leadership(self) -> None:
        if self.conn is not None and not self.conn.closed:
            try:
                self.conn.execute("select pg_advisory_unlock(%s, %s)", (_LOCK_CLASS, self._lock_id))
            except psycopg.Error:
                pass

    def load_offsets(self, topic: str) -> dict[int, int]:
        """Next offset per partition of ``topic`` recorded by this consumer."""
        rows = (
            self._c()
            .execute(
                f"select partition, next_offset from {SCHEMA}.offsets where consumer = %s and topic = %s",
                (self.consumer, topic),
            )
            .fetchall()
        )
        return {int(p): int(o) for p, o in rows}

    def _scope(self, claims: Mapping[str, Any]) -> WriteScope:
        assert self.rules is not None
        if self._last_scope is not None and claims == self._last_scope[0]:
            return self._last_scope[1]
        cache_key = json.dumps(claims, sort_keys=True, default=str)
        found = self._scopes.get(cache_key)
        if found is None:
            if len(self._scopes) > 10_000:
                self._scopes.clear()
            found = WriteScope.for_claims(
                self.rules, claims, {t: m.types for t, m in self.tables.items()}
            )
            self._scopes[cache_key] = found
        self._last_scope = (dict(claims), found)
        return found

    # ---- applying

    def apply(
        self, deliveries: Sequence[tuple[Delivery, bytes | None]], run_max: int = 500
    ) -> list[Outcome]:
        """Apply journal records (each partition's in offset order); returns their outcomes
        (duplicates produce none).

        The records are grouped by device (each device's in order; devices are
        independent), at most ``run_max`` per transaction.  Each transaction stores, per
        partition, the lowest offset of this batch not applied yet (a watermark): after a
        crash the records from there on are read again, and those already applied are
        found in ``applied`` and skipped."""
        items: list[_Item] = []
        for where, value in deliveries:
            self.stats.records += 1
            try:
                items.append(_Item(where, JournalRecord.from_bytes(value or b""), value or b""))
            except JournalFormatError as exc:
                items.append(_Item(where, None, value or b"", str(exc)))
        marks = _Watermarks(items)
        outcomes: list[Outcome] = []
        t0 = time.perf_counter()
        for run in _runs(items, run_max):
            outcomes.extend(self._apply_run(run, marks))
        self.stats.apply_s += time.perf_counter() - t0
        return outcomes

    def _apply_run(self, run: list[_Item], marks: _Watermarks) -> list[Outcome]:
        """Apply one run in one transaction.  A failure that a retry cures (deadlock,
        serialization failure, a row changed meanwhile) retries the run; a failure caused
        by an entry (:func:`classify_failure`) splits the run in halves until the entry is
        alone, so the others still apply together, and the entry is rejected and kept as a
        dead letter (:meth:`_apply_alone`).  Any other failure raises ApplierError: the
        applier backs off and reads the same records again."""
        attempt = 0
        while True:
            try:
                self.stats.runs += 1
                # optimistic first (no row locks; writes check xmin), locking after a retry
                outcomes = self._run_txn(run, marks, lock=attempt > 0)
                marks.done(run)
                return outcomes
            except Exception as exc:
                if classify_failure(exc) is Failure.ENTRY:
                    self.stats.run_retries += 1
                    if len(run) > 1:
                        half = len(run) // 2
                        return self._apply_run(run[:half], marks) + self._apply_run(
                            run[half:], marks
                        )
                    return self._apply_alone(run[0], exc, marks)
                if not isinstance(exc, (*_RETRY_ERRORS, _Concurrent)):
                    if isinstance(exc, psycopg.Error):
                        raise ApplierError(f"applying journal entries failed: {exc}") from exc
                    raise
                attempt += 1
                self.stats.run_retries += 1
                if attempt > 5:
                    raise ApplierError(f"a run kept failing ({exc}); giving up for now") from exc
                time.sleep(0.05 * attempt)

    def _apply_alone(self, item: _Item, exc: Exception, marks: _Watermarks) -> list[Outcome]:
        """Reject an entry that failed on its own, keeping it as a dead letter: first with
        the usual bookkeeping (the outcome shows the server's row), and if even that fails
        for the entry's sake, with a minimal record of it."""
        failed = _Failed.of(exc)
        if failed.reason is Reason.INTERNAL_ERROR:
            log.error("applier: unexpected failure on %s", _where(item), exc_info=exc)
        try:
            outcomes = self._run_txn([item], marks, failed=failed)
        except Exception as again:
            if classify_failure(again) is not Failure.ENTRY:
                if isinstance(again, psycopg.Error):
                    raise ApplierError(f"applying journal entries failed: {again}") from again
                raise
            outcomes = self._dead_letter_txn(item, failed, marks)
        marks.done([item])
        if outcomes:  # else it had been applied before (a duplicate): nothing was kept
            self.stats.dead_letters += 1
            log.error(
                "applier: %s rejected (%s), kept as a dead letter, not retried: %s",
                _where(item),
                failed.reason.value,
                failed.message,
            )
        return outcomes

    def _dead_letter_txn(self, item: _Item, failed: _Failed, marks: _Watermarks) -> list[Outcome]:
        """The last resort for an entry whose rejection cannot be recorded in full: the
        ``applied`` record, the outcome and the dead letter carry only the device, the seq
        and the reason (nothing of the entry's content), so they cannot fail for its sake."""
        record = item.record
        if record is None:  # an unreadable record whose keeping aside failed
            raise ApplierError(f"{_where(item)} could not be kept aside in bad_records")
        outcome = Outcome(
            device_id=record.device_id,
            seq=record.seq,
            kind=OutcomeKind.REJECTED,
            reason=failed.reason.value,
            message=_clean(f"entry {record.seq}: {failed.message}"),
            at_us=self.wall_ms() * 1000,
        )
        conn = self._c()
        try:
            with conn.transaction(), conn.cursor() as cur:
                _save_offsets(cur, self.consumer, marks.after([item]))
                cur.execute(
                    f"insert into {SCHEMA}.applied (device_id, seq, outcome, reason, message, "
                    "received_us) values (%s, %s, %s, %s, %s, %s) on conflict do nothing",
                    (
                        record.device_id,
                        record.seq,
                        outcome.kind.value,
                        outcome.reason,
                        outcome.message,
                        record.received_at_us or None,
                    ),
                )
                if cur.rowcount == 0:  # applied meanwhile (an overlapping shard): nothing to do
                    return []
                cur.execute(
                    f"insert into {SCHEMA}.outbox (device_id, payload) values (%s, %s)",
                    (record.device_id, encode_outcomes([outcome])),
                )
                self._write_dead_letter(cur, item, failed)
        except psycopg.Error as exc:
            raise ApplierError(
                f"even the minimal rejection of {_where(item)} failed: {exc}"
            ) from exc
        self._count(outcome)
        return [outcome]

    def _write_dead_letter(self, cur: psycopg.Cursor[Any], item: _Item, failed: _Failed) -> None:
        record = item.record
        assert record is not None
        cur.execute(
            f'insert into {SCHEMA}.dead_letters (topic, partition, "offset", device_id, seq, '
            "reason, sqlstate, message, record) values (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "on conflict do nothing",
            (
                item.where.topic,
                item.where.partition,
                item.where.offset,
                record.device_id,
                record.seq,
                failed.reason.value,
                failed.sqlstate,
                _clean(failed.message),
                item.raw[: 1 << 20],
            ),
        )

    def _run_txn(
        self,
        run: list[_Item],
        marks: _Watermarks,
        *,
        lock: bool = False,
        failed: _Failed | None = None,
    ) -> list[Outcome]:
        conn = self._c()
        outcomes: list[Outcome] = []
        with conn.transaction(), conn.cursor() as cur:
            _save_offsets(cur, self.consumer, marks.after(run))
            first = run[0]
            if first.record is None:
                self._record_bad(cur, run)
                return []
            device = first.record.device_id
            cur.execute(_EMIT, (ORIGIN_MESSAGE_PREFIX, f"device:{device}"))
            todo, known = self._fresh(cur, device, run)
            for item in todo:
                self._prepare(item, failed)
            state = _RunState(self, cur, known, lock_rows=lock)
            state.prefetch([i for i in todo if i.entry is not None])
            for item in todo:
                outcome = self._one(state, item)
                assert item.record is not None
                known[item.record.seq] = (outcome.kind.value, outcome.reason)
                outcomes.append(outcome)
            state.flush()
            outcomes = state.bound_written(outcomes)
            state.write_bookkeeping(outcomes, todo)
            if failed is not None:
                for item in todo:
                    self._write_dead_letter(cur, item, failed)
        for o in outcomes:
            self._count(o)
        return outcomes

    def _count(self, o: Outcome) -> None:
        if o.kind is OutcomeKind.APPLIED:
            self.stats.applied += 1
        elif o.kind is OutcomeKind.MERGED:
            self.stats.merged += 1
        elif o.kind is OutcomeKind.CONFLICT:
            self.stats.conflicts += 1
        else:
            self.stats.rejected += 1

    def _fresh(
        self, cur: psycopg.Cursor[Any], device: str, run: list[_Item]
    ) -> tuple[list[_Item], dict[int, tuple[str, str | None]]]:
        """The items not applied before (idempotency), and the known outcomes of the
        run's seqs and of the entries they depend on (prev_seq)."""
        seqs: set[int] = set()
        for item in run:
            assert item.record is not None
            seqs.add(item.record.seq)
            if item.record.entry is not None and item.record.entry.prev_seq is not None:
                seqs.add(item.record.entry.prev_seq)
        rows = cur.execute(
            # a join, not "seq = any(...)": that filters every applied row of the device
            f"select a.seq, a.outcome, a.reason from unnest(%s::bigint[]) as u(seq) "
            f"join {SCHEMA}.applied as a on a.device_id = %s and a.seq = u.seq",
            (sorted(seqs), device),
        ).fetchall()
        known: dict[int, tuple[str, str | None]] = {int(s): (o, r) for s, o, r in rows}
        todo: list[_Item] = []
        taken: set[int] = set()
        for item in run:
            assert item.record is not None
            seq = item.record.seq
            if seq in known or seq in taken:
                self.stats.duplicates += 1
                continue
            taken.add(seq)
            todo.append(item)
        return todo, known

    def _prepare(self, item: _Item, failed: _Failed | None) -> None:
        record = item.record
        assert record is not None
        if record.rejection is not None or record.entry is None:
            item.rejection = record.rejection
            return
        item.scope = self._scope(record.claims)
        if record.entry.table not in self.tables:
            item.rejection = Rejection(
                Reason.UNKNOWN_TABLE,
                f"entry {record.seq}: {record.entry.table!r} is not a table this device syncs",
            )
            return
        item.entry, item.rejection = validate_entry(record.entry, item.scope, check_rows=False)
        if item.rejection is not None:
            item.entry = None
            meta = self.tables[record.entry.table]
            if len(record.entry.key) == len(meta.key):
                try:
                    item.show_key = tuple(
                        coerce_value(meta.types[c], v)
                        for c, v in zip(meta.key, record.entry.key, strict=True)
                    )
                except ValueError:
                    pass
        elif failed is not None:
            item.rejection = Rejection(failed.reason, f"entry {record.seq}: {failed.message}")

    def _one(self, state: _RunState, item: _Item) -> Outcome:
        record = item.record
        assert record is not None
        entry, scope = item.entry, item.scope
        rejection = item.rejection
        if record.entry is not None and record.rejection is None:
            # made on top of a rejected entry: that is the reason, whatever else is wrong
            rejection = blocked_by(record.entry, state.known_outcome) or rejection
        if rejection is not None or entry is None or scope is None:
            return self._rejected(state, item, rejection)
        meta = self.tables[entry.table]
        policy = self.policies.table(entry.table)
        current = state.row(meta, entry.key)
        times = EditTimes(
            entry.hlc,
            state.server_time(meta, policy, entry.key, current),
            state.now_ms,
            self.max_skew_ms,
        )
        result = merge(
            entry.op, policy, meta.types, meta.key, entry.old, current.row, entry.new, times
        )
        if result.action is Action.INSERT:
            try:
                inserted = state.insert(meta, result.values, scope, entry)
            except _Undo as undo:
                return self._rejected(state, item, undo.rejection)
            if inserted is None:  # the key appeared meanwhile: merge again with that row
                current = state.row(meta, entry.key, reread=True)
                result = merge(
                    entry.op, policy, meta.types, meta.key, entry.old, current.row, entry.new, times
                )
                if result.action is Action.INSERT:
                    raise ApplierError(f"{meta.name}: a row appeared and vanished during an insert")
            else:
                result = dataclasses.replace(result, row=inserted[0])
                state.wrote.add(record.seq)
                if policy.timed:
                    state.clock_written(meta, entry.key, entry.hlc, inserted[1], deleted=False)
        if result.action is not Action.INSERT:
            problem = _permission(scope, meta.name, current.row, result)
            if problem is not None:
                return self._rejected(
                    state, item, Rejection(problem.reason, f"entry {record.seq}: {problem.message}")
                )
            state.write(meta, entry, result, policy)
            if result.action is not Action.NONE:
                state.wrote.add(record.seq)
        return self._outcome(state, item, meta, result)

    def _outcome(
        self, state: _RunState, item: _Item, meta: TableMeta, result: MergeResult
    ) -> Outcome:
        record, entry, scope = item.record, item.entry, item.scope
        assert record is not None and entry is not None and scope is not None
        conflict: dict[str, Any] | None = None
        if result.held or result.held_row is not None:
            conflict_id = str(uuid.uuid4())
            state.conflict(conflict_id, record, meta, entry, result)
            if result.held:
                conflict = {"id": conflict_id, "columns": dict(result.held)}
            else:
                held = result.held_row or {}
                conflict = {
                    "id": conflict_id,
                    "row": {
                        "server": _visible(scope, meta.name, held.get("server")),
                        "device": held.get("device"),
                    },
                }
        return Outcome(
            device_id=record.device_id,
            seq=record.seq,
            kind=result.outcome,
            table=meta.name,
            key=tuple(entry.key),
            message=result.message,
            row=_visible(scope, meta.name, result.row),
            columns=dict(result.columns),
            conflict=conflict,
            hlc=entry.hlc.encode(),
            at_us=state.now_ms * 1000,
        )

    def _rejected(self, state: _RunState, item: _Item, rejection: Rejection | None) -> Outcome:
        record = item.record
        assert record is not None
        if rejection is None:
            rejection = Rejection(Reason.MALFORMED, f"entry {record.seq}: not a readable entry")
        raw_entry = record.entry
        key = item.entry.key if item.entry is not None else item.show_key
        row = None
        if raw_entry is not None and key is not None and item.scope is not None:
            meta = self.tables[raw_entry.table]
            row = _visible(item.scope, meta.name, state.row(meta, key).row)
        return Outcome(
            device_id=record.device_id,
            seq=record.seq,
            kind=OutcomeKind.REJECTED,
            table=raw_entry.table if raw_entry is not None else None,
            key=tuple(raw_entry.key) if raw_entry is not None else None,
            reason=rejection.reason.value,
            message=rejection.message,
            row=row,
            hlc=raw_entry.hlc.encode() if raw_entry is not None else None,
            at_us=state.now_ms * 1000,
        )

    def _record_bad(self, cur: psycopg.Cursor[Any], run: list[_Item]) -> None:
        for item in run:
            log.error(
                "journal record %s/%d@%d cannot be read: %s",
                item.where.topic,
                item.where.partition,
                item.where.offset,
                item.error,
            )
            self.stats.bad_records += 1
            cur.execute(
                f'insert into {SCHEMA}.bad_records (topic, partition, "offset", error, raw) '
                "values (%s, %s, %s, %s, %s) on conflict do nothing",
                (
                    item.where.topic,
                    item.where.partition,
                    item.where.offset,
                    item.error,
                    item.raw[:65536],
                ),
            )

    # ---- outbox

    def pending_outbox(self, limit: int = 5000) -> list[tuple[int, str, bytes]]:
        rows = (
            self._c()
            .execute(
                f"select id, device_id, payload from {SCHEMA}.outbox order by id limit %s", (limit,)
            )
            .fetchall()
        )
        return [(int(i), str(d), bytes(p)) for i, d, p in rows]

    def delete_outbox(self, ids: Sequence[int]) -> None:
        if ids:
            self._c().execute(f"delete from {SCHEMA}.outbox where id = any(%s)", (list(ids),))

    # ---- conflicts

    def open_conflicts(
        self, device_id: str | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Kept conflicts not yet resolved (oldest first), with both versions."""
        rows = (
            self._c()
            .execute(
                f"select id, device_id, seq, tbl, key, kind, held, created_at from {SCHEMA}.conflicts "
                "where status = 'open' and (%s::text is null or device_id = %s) order by created_at, id limit %s",
                (device_id, device_id, limit),
            )
            .fetchall()
        )
        names = ("id", "device_id", "seq", "table", "key", "kind", "held", "created_at")
        return [dict(zip(names, r, strict=True)) for r in rows]

    def resolve(
        self,
        conflict_id: str,
        choice: str,
        values: Mapping[str, Any] | None = None,
        by: str = "",
        *,
        claims: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """Settle a kept conflict: ``server`` (keep the server's current values),
        ``device`` (write the device's values), or ``values`` (write ``values``, wire
        form).  The write is a new edit; resolving a resolved conflict returns its first
        resolution and changes nothing.

        ``claims``: the resolution comes from a device holding a token with these claims
        (the device API), and is judged like a journal entry of it, against the row as it
        is now (:func:`relay.upstream.journal.check_write`: the rows and columns it may write,
        before and after, and no widening); a refusal raises :class:`ResolveForbidden`
        and writes nothing.  None: an operator resolves, trusted (nothing is checked)."""
        if choice not in ("server", "device", "values"):
            raise ResolveError(f"choice must be server, device or values, not {choice!r}")
        if (choice == "values") != (values is not None):
            raise ResolveError("give values exactly when choice is 'values'")
        conn = self._c()
        try:
            with conn.transaction(), conn.cursor() as cur:
                found = cur.execute(
                    f"select device_id, seq, tbl, key, kind, held, claims, status, resolution "
                    f"from {SCHEMA}.conflicts where id = %s for update",
                    (conflict_id,),
                ).fetchone()
                if found is None:
                    raise ConflictNotFound(f"no kept conflict has id {conflict_id!r}")
                device, seq, table, key, kind, held, stored_claims, status, resolution = found
                if status == "resolved":
                    return Outcome.from_json(resolution["outcome"])
                meta = self.tables.get(table)
                if meta is None:
                    raise ResolveError(
                        f"conflict {conflict_id}: table {table} is not synced any more"
                    )
                cur.execute(_EMIT, (ORIGIN_MESSAGE_PREFIX, f"resolve:{conflict_id}"))
                state = _RunState(self, cur, lock_rows=True)
                key = tuple(key)
                current = state.row(meta, key)
                writes, decisions = _resolution(meta, kind, held, choice, values, current.row, key)
                policy = self.policies.table(table)
                hlc = self.clock.now()
                after = state.apply_resolution(meta, key, current.row, writes, policy, hlc)
                scope = self._scope(stored_claims if claims is None else claims)
                if claims is not None and writes:
                    written = list(writes.get("update") or writes.get("insert") or ())
                    problem = check_write(scope, table, current.row, after, written)
                    if problem is not None:
                        raise ResolveForbidden(
                            problem.reason.value,
                            f"conflict {conflict_id}: the resolution is refused as the "
                            f"device's own write would be: {problem.message}",
                        )
                outcome = Outcome(
                    device_id=device,
                    seq=int(seq),
                    kind=OutcomeKind.RESOLVED,
                    table=table,
                    key=key,
                    message=f"conflict {conflict_id} resolved: {choice}"
                    + (
                        ""
                        if current.row is not None or writes.get("insert")
                        else " (the row is gone)"
                    ),
                    row=_visible(scope, table, after),
                    columns=decisions,
                    conflict={"id": conflict_id, "choice": choice, "by": by},
                    hlc=hlc.encode(),
                    at_us=state.now_ms * 1000,
                )
                state.flush()
                if writes:
                    state.wrote.add(int(seq))
                    outcome = state.bound_written([outcome])[0]
                cur.execute(
                    f"update {SCHEMA}.conflicts set status = 'resolved', resolved_at = now(), "
                    "resolved_by = %s, resolution = %s where id = %s",
                    (
                        by,
                        Jsonb({"choice": choice, "values": values, "outcome": outcome.to_json()}),
                        conflict_id,
                    ),
                )
                cur.execute(
                    f"insert into {SCHEMA}.outbox (device_id, payload) values (%s, %s)",
                    (device, encode_outcomes([outcome])),
                )
                return outcome
        except psycopg.Error as exc:
            if classify_failure(exc) is not Failure.ENTRY:
                raise
            raise ResolveError(
                f"conflict {conflict_id}: PostgreSQL refused the resolution: {_pg_message(exc)}"
            ) from exc


def wal_insert_lsn(cur: psycopg.Cursor[Any]) -> int:
    """``pg_current_wal_insert_lsn()`` as an integer (the 64-bit WAL position)."""
    row = cur.execute("select pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    high, _, low = str(row[0]).partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def _where(item: _Item) -> str:
    """``entry 17 of device 'tab-1' (fs._journal/2@451)`` for logs."""
    at = f"{item.where.topic}/{item.where.partition}@{item.where.offset}"
    if item.record is None:
        return f"record {at}"
    return f"entry {item.record.seq} of device {item.record.device_id!r} ({at})"


def _clean(text: str, limit: int = 4000) -> str:
    """Text PostgreSQL can store (no NUL), at most ``limit`` characters."""
    return text.replace("\x00", "\\x00")[:limit]


def _orjson_text(value: Any) -> str:
    return dump_json(value).decode("utf-8")


def _pg_message(exc: psycopg.Error) -> str:
    diag = exc.diag
    text = diag.message_primary or str(exc).splitlines()[0]
    if diag.sqlstate:
        text = f"{text} (SQLSTATE {diag.sqlstate})"
    return text


def _runs(items: Sequence[_Item], limit: int) -> list[list[_Item]]:
    """The items grouped by device, each device's in their order, groups in the order of
    their first item, at most ``limit`` per group; unreadable records alone."""
    groups: dict[str, list[list[_Item]]] = {}
    order: list[list[_Item]] = []
    for item in items:
        if item.record is None:
            order.append([item])
            continue
        runs = groups.setdefault(item.record.device_id, [])
        if not runs or len(runs[-1]) >= limit:
            runs.append([])
            order.append(runs[-1])
        runs[-1].append(item)
    return order


class _Watermarks:
    """Per partition, the offsets of a batch not applied yet."""

    def __init__(self, items: Sequence[_Item]) -> None:
        self.pending: dict[tuple[str, int], set[int]] = {}
        self.end: dict[tuple[str, int], int] = {}
        for item in items:
            tp = (item.where.topic, item.where.partition)
            self.pending.setdefault(tp, set()).add(item.where.offset)
            self.end[tp] = max(self.end.get(tp, 0), item.where.offset + 1)

    def after(self, run: Sequence[_Item]) -> dict[tuple[str, int], int]:
        """The next offset to store per partition of ``run`` once ``run`` is applied."""
        out: dict[tuple[str, int], int] = {}
        for tp in {(i.where.topic, i.where.partition) for i in run}:
            left = self.pending[tp] - {
                i.where.offset for i in run if (i.where.topic, i.where.partition) == tp
            }
            out[tp] = min(left) if left else self.end[tp]
        return out

    def done(self, run: Sequence[_Item]) -> None:
        for item in run:
            self.pending[(item.where.topic, item.where.partition)].discard(item.where.offset)


def _save_offsets(
    cur: psycopg.Cursor[Any], consumer: str, top: Mapping[tuple[str, int], int]
) -> None:
    cur.executemany(
        f"insert into {SCHEMA}.offsets (consumer, topic, partition, next_offset) values (%s, %s, %s, %s) "
        "on conflict (consumer, topic, partition) do update "
        "set next_offset = greatest(offsets.next_offset, excluded.next_offset)",
        [(consumer, t, p, o) for (t, p), o in top.items()],
    )


def _visible(scope: WriteScope, table: str, row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The row as the device may see it (its buckets' columns), None if it may not."""
    if row is None:
        return None
    buckets = scope.row_buckets(table, row)
    if not buckets:
        return None
    return dict(scope.project(table, row, buckets))


def _permission(
    scope: WriteScope, table: str, before: Mapping[str, Any] | None, result: MergeResult
) -> Rejection | None:
    if result.action is Action.UPDATE:
        return check_write(scope, table, before, result.row, list(result.values))
    if result.action is Action.DELETE:
        return check_write(scope, table, before, None, [])
    if before is not None:  # nothing written, but the outcome shows the row
        return check_write(scope, table, before, before, [])
    return None


def _coerced(meta: TableMeta, column: str, value: Any) -> Any:
    """A resolution's value in normal wire form; ResolveError names what is wrong."""
    ct = meta.types.get(column)
    if ct is None:
        raise ResolveError(f"{meta.name}: the resolution names no column {column!r:.80}")
    try:
        return coerce_value(ct, value)
    except ValueError as exc:
        raise ResolveError(
            f"{meta.name}: invalid value in the resolution: {column} ({ct.describe()}): {exc}"
        ) from exc


def _resolution(
    meta: TableMeta,
    kind: str,
    held: Mapping[str, Any],
    choice: str,
    values: Mapping[str, Any] | None,
    current: Mapping[str, Any] | None,
    key: Sequence[Any],
) -> tuple[dict[str, Any], dict[str, str]]:
    """What a resolution writes: ``{"update": {...}}``, ``{"insert": row}``,
    ``{"delete": True}`` or ``{}``; and the per-column decisions."""
    if choice == "server":
        cols = held.keys() if kind == "columns" else (held.get("device") or {}).keys()
        return {}, {c: "server" for c in cols}
    if kind == "columns":
        chosen = (
            {c: h["device"] for c, h in held.items()} if choice == "device" else dict(values or {})
        )
        extra = sorted(set(chosen) - set(held))
        if extra:
            raise ResolveError(f"values for column(s) not in conflict: {', '.join(extra)}")
        decisions = {c: choice for c in chosen}
        if current is None:
            return {}, decisions
    else:
        chosen_row = held.get("device") if choice == "device" else dict(values or {})
        if chosen_row is None:
            return ({"delete": True} if current is not None else {}), {}
        fixed = dict(zip(meta.key, key, strict=True))
        moved = sorted(
            c
            for c in meta.key
            if c in chosen_row
            and not same_value(meta.types[c], _coerced(meta, c, chosen_row[c]), fixed[c])
        )
        if moved:
            raise ResolveError(
                f"{meta.name}: the values change key column(s) {', '.join(moved)}; a "
                "resolution keeps the conflict's row"
            )
        chosen = {**fixed, **chosen_row, **fixed}
        decisions = {c: choice for c in chosen if c not in meta.key}
    normal = {c: _coerced(meta, c, v) for c, v in chosen.items()}
    if current is None:
        return {"insert": normal}, decisions
    sets = {c: v for c, v in normal.items() if not same_value(meta.types[c], current.get(c), v)}
    return ({"update": sets} if sets else {}), decisions


class _RunState:
    """Rows, row clocks and queued writes of one transaction."""

    def __init__(
        self,
        db: ApplierDb,
        cur: psycopg.Cursor[Any],
        known: dict[int, tuple[str, str | None]] | None = None,
        *,
        lock_rows: bool = False,
    ) -> None:
        self.db = db
        self.cur = cur
        self.lock_rows = lock_rows
        self.raw = db.raw_cursor()
        self.outcome_of = known if known is not None else {}
        self.now_ms = db.wall_ms()
        self.rows: dict[tuple[str, tuple[Any, ...]], _Row] = {}
        self.clocks: dict[tuple[str, str], _Clock | None] = {}
        self.dirty: set[tuple[str, tuple[Any, ...]]] = set()
        self.queue: dict[Any, tuple[TableMeta, list[list[Any]]]] = {}
        self.clock_writes: dict[tuple[str, str], tuple[str, str, str, int, bool]] = {}
        self.conflicts: list[tuple[Any, ...]] = []
        self._xid: int | None = None
        self.wrote: set[int] = set()  # seqs whose entry wrote its row in this transaction

    def known_outcome(self, seq: int) -> tuple[str, str | None] | None:
        """Outcome of an earlier entry of the run's device (loaded for every prev_seq)."""
        return self.outcome_of.get(seq)

    # ---- reading

    def prefetch(self, items: Sequence[_Item]) -> None:
        by_table: dict[str, dict[tuple[Any, ...], tuple[Any, ...]]] = {}
        for item in items:
            assert item.entry is not None
            meta = self.db.tables[item.entry.table]
            by_table.setdefault(meta.name, {})[meta.key_id(item.entry.key)] = tuple(item.entry.key)
        for name in sorted(by_table):
            meta = self.db.tables[name]
            keys = list(by_table[name].items())
            for start in range(0, len(keys), 1000):
                chunk = keys[start : start + 1000]
                self._select(meta, [k for _, k in chunk])
                for kid, _ in chunk:
                    self.rows.setdefault((name, kid), _Row(None))
            if self.db.policies.table(name).timed:
                self._load_clocks(meta, [k for _, k in keys])

    def _select(self, meta: TableMeta, keys: Sequence[Sequence[Any]]) -> None:
        params = [list(c) for c in zip(*(meta.key_params(k) for k in keys), strict=True)]
        rows = self.raw.execute(
            meta.select_sql(self.db.commit_timestamps, self.lock_rows), params
        ).fetchall()
        for xmin, committed, *texts in rows:
            row = meta.read(texts)
            kid = meta.key_id([row[k] for k in meta.key])
            commit_ms = int(committed) if committed is not None else None
            self.rows[(meta.name, kid)] = _Row(row, int(xmin), commit_ms)

    def _load_clocks(self, meta: TableMeta, keys: Sequence[Sequence[Any]]) -> None:
        texts = [row_key_text(list(k)) for k in keys]
        for t in texts:
            self.clocks.setdefault((meta.name, t), None)
        for row_key, hlc, xid, deleted in self.cur.execute(
            f"select c.row_key, c.hlc, c.xid, c.deleted from unnest(%s::text[]) as u(k) "
            f"join {SCHEMA}.row_clock as c on c.tbl = %s and c.row_key = u.k",
            (texts, meta.name),
        ).fetchall():
            self.clocks[(meta.name, row_key)] = _Clock(Hlc.decode(hlc), int(xid), bool(deleted))

    def row(self, meta: TableMeta, key: Sequence[Any], reread: bool = False) -> _Row:
        ident = (meta.name, meta.key_id(key))
        if reread or ident in self.dirty or ident not in self.rows:
            self.flush()
            self.rows[ident] = _Row(None)
            self._select(meta, [key])
            self.dirty.discard(ident)
        return self.rows[ident]

    def server_time(
        self, meta: TableMeta, policy: TablePolicy, key: Sequence[Any], current: _Row
    ) -> Hlc | int | None:
        if not policy.timed:
            return None
        row_key = row_key_text(list(key))
        if (meta.name, row_key) not in self.clocks:
            self._load_clocks(meta, [key])
        clock = self.clocks.get((meta.name, row_key))
        if current.row is None:
            return clock.hlc if clock is not None and clock.deleted else self.now_ms
        if clock is not None and not clock.deleted and clock.xid == current.xmin:
            return clock.hlc
        if current.commit_ms is not None:
            return current.commit_ms
        if policy.time_column is not None:
            value = current.row.get(policy.time_column)
            if isinstance(value, int) and not isinstance(value, bool):
                return value // 1000
        return None

    # ---- writing

    def bound_written(self, outcomes: Sequence[Outcome]) -> list[Outcome]:
        """After the transaction's last row write (queued writes flushed) and before its
        commit: the outcomes of entries that wrote their row get ``visible_after``, the
        WAL insert position now.  The commit record, and so the ``commit_lsn`` of every
        change event of these writes, comes after it; the rows stay locked until the
        commit, so any later version of them commits after it too; every version
        committed before the writes has a lower ``commit_lsn`` (docs/journal.md)."""
        if not self.wrote:
            return list(outcomes)
        lsn = wal_insert_lsn(self.cur)
        return [
            dataclasses.replace(o, visible_after=lsn) if o.seq in self.wrote else o
            for o in outcomes
        ]

    def xid(self) -> int:
        if self._xid is None:
            row = self.cur.execute(_XID32).fetchone()
            assert row is not None
            self._xid = int(row[0])
        return self._xid

    def insert(
        self, meta: TableMeta, values: Mapping[str, Any], scope: WriteScope, entry: JournalEntry
    ) -> tuple[dict[str, Any], int] | None:
        """Insert in a savepoint, check the stored row; None if the key exists by now.
        Raises :class:`_Undo` (rolled back) when the device may not have that row."""
        self.flush()
        columns = list(values)
        params = [meta.pg_text(c, values[c]) for c in columns]
        written = [c for c in columns if c not in meta.key or c in (entry.new or {})]
        conn = self.cur.connection
        try:
            with conn.transaction():
                got = self.raw.execute(meta.insert_sql(columns), params).fetchone()
                assert got is not None
                row = meta.read(got[1:])
                problem = check_write(scope, meta.name, None, row, written)
                if problem is not None:
                    raise _Undo(Rejection(problem.reason, f"entry {entry.seq}: {problem.message}"))
        except psycopg.errors.UniqueViolation:
            return None
        ident = (meta.name, meta.key_id([row[k] for k in meta.key]))
        self.rows[ident] = _Row(row, int(got[0]), None)
        return row, int(got[0])

    def write(
        self, meta: TableMeta, entry: JournalEntry, result: MergeResult, policy: TablePolicy
    ) -> None:
        ident = (meta.name, meta.key_id(entry.key))
        xmin = [str(self.rows[ident].xmin)]  # the version the merge saw
        if result.action is Action.UPDATE:
            columns = tuple(sorted(result.values))
            params = [meta.pg_text(c, result.values[c]) for c in columns]
            self._enqueue(
                ("u", meta.name, columns), meta, params + meta.key_params(entry.key) + xmin
            )
            self.dirty.add(ident)
        elif result.action is Action.DELETE:
            self._enqueue(("d", meta.name), meta, meta.key_params(entry.key) + xmin)
            self.dirty.add(ident)
        else:
            return
        if policy.timed:
            self.clock_written(
                meta, entry.key, entry.hlc, self.xid(), deleted=result.action is Action.DELETE
            )

    def clock_written(
        self, meta: TableMeta, key: Sequence[Any], hlc: Hlc, xid: int, *, deleted: bool
    ) -> None:
        """Remember the time of the row version just written (``xid``: its xmin)."""
        row_key = row_key_text(list(key))
        self.clocks[(meta.name, row_key)] = _Clock(hlc, xid, deleted)
        self.clock_writes[(meta.name, row_key)] = (meta.name, row_key, hlc.encode(), xid, deleted)

    def _enqueue(self, key: Any, meta: TableMeta, params: list[Any]) -> None:
        found = self.queue.get(key)
        if found is None:
            self.queue[key] = (meta, [params])
        else:
            found[1].append(params)

    def flush(self) -> None:
        """Send the queued writes: one statement per table and shape (a row is queued at
        most once between flushes: touching it again flushes and re-reads it first)."""
        queued, self.queue = self.queue, {}
        for key, (meta, rows) in queued.items():
            columns = [list(c) for c in zip(*rows, strict=True)]
            if key[0] == "u":
                self.cur.execute(meta.update_many_sql(key[2]), columns)
            else:
                self.cur.execute(meta.delete_many_sql(), columns)
            if self.cur.rowcount != len(rows):
                raise _Concurrent(
                    f"{meta.name}: {len(rows) - self.cur.rowcount} row(s) changed by another "
                    "transaction after they were read"
                )

    def conflict(
        self,
        conflict_id: str,
        record: JournalRecord,
        meta: TableMeta,
        entry: JournalEntry,
        result: MergeResult,
    ) -> None:
        if result.held:
            kind, held = "columns", dict(result.held)
        else:
            kind, held = "row", dict(result.held_row or {})
        self.conflicts.append(
            (
                conflict_id,
                record.device_id,
                record.seq,
                meta.name,
                row_key_text(list(entry.key)),
                Jsonb(list(entry.key)),
                kind,
                Jsonb(held),
                Jsonb(dict(record.claims)),
            )
        )

    def apply_resolution(
        self,
        meta: TableMeta,
        key: Sequence[Any],
        current: Mapping[str, Any] | None,
        writes: Mapping[str, Any],
        policy: TablePolicy,
        hlc: Hlc,
    ) -> dict[str, Any] | None:
        after = dict(current) if current is not None else None
        if "update" in writes:
            sets = writes["update"]
            columns = sorted(sets)
            self.cur.execute(
                meta.update_sql(columns),
                [meta.pg_text(c, sets[c]) for c in columns] + meta.key_params(key),
            )
            after = {**(after or {}), **sets}
        elif "insert" in writes:
            row = writes["insert"]
            columns = list(row)
            got = self.raw.execute(
                meta.insert_sql(columns), [meta.pg_text(c, row[c]) for c in columns]
            ).fetchone()
            assert got is not None
            after = meta.read(got[1:])
        elif writes.get("delete"):
            self.cur.execute(meta.delete_sql(), meta.key_params(key))
            after = None
        if writes and policy.timed:
            self.clock_writes[(meta.name, row_key_text(list(key)))] = (
                meta.name,
                row_key_text(list(key)),
                hlc.encode(),
                self.xid(),
                after is None,
            )
        return after

    def write_bookkeeping(self, outcomes: Sequence[Outcome], items: Sequence[_Item]) -> None:
        cur = self.cur
        entries = {i.record.seq: i.record for i in items if i.record is not None}
        applied = []
        for o in outcomes:
            record = entries[o.seq]
            entry = record.entry
            detail: dict[str, Any] = {}
            if o.columns:
                detail["columns"] = dict(o.columns)
            if o.conflict:
                detail["conflict"] = o.conflict.get("id")
            applied.append(
                (
                    o.device_id,
                    o.seq,
                    o.kind.value,
                    o.reason,
                    o.message,
                    o.table,
                    row_key_text(list(o.key)) if o.key is not None else None,
                    entry.op.value if entry is not None else None,
                    o.hlc,
                    entry.base.commit_lsn if entry is not None and entry.base is not None else None,
                    entry.base.seq if entry is not None and entry.base is not None else None,
                    dump_json(detail).decode("utf-8") if detail else None,
                    record.received_at_us or None,
                )
            )
        if applied:
            with cur.copy(
                f"copy {SCHEMA}.applied (device_id, seq, outcome, reason, message, tbl, row_key, "
                "op, hlc, base_lsn, base_seq, detail, received_us) from stdin"
            ) as copy:
                for row in applied:
                    copy.write_row(row)
            cur.execute(
                f"insert into {SCHEMA}.outbox (device_id, payload) values (%s, %s)",
                (outcomes[0].device_id, encode_outcomes(outcomes)),
            )
        if self.conflicts:
            cur.executemany(
                f"insert into {SCHEMA}.conflicts (id, device_id, seq, tbl, row_key, key, kind, held, claims) "
                "values (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                self.conflicts,
            )
        if self.clock_writes:
            columns = [list(c) for c in zip(*self.clock_writes.values(), strict=True)]
            cur.execute(
                f"insert into {SCHEMA}.row_clock (tbl, row_key, hlc, xid, deleted) "
                "select * from unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::bool[]) "
                "on conflict (tbl, row_key) do update set hlc = excluded.hlc, xid = excluded.xid, "
                "deleted = excluded.deleted",
                columns,
            )


# --------------------------------------------------------------------------- the Kafka side


def ensure_journal_topics(kafka: Mapping[str, Any], topics: Sequence[str], partitions: int) -> None:
    """Create ``topics`` (``_journal`` and ``_outcomes``) with ``partitions`` partitions if
    missing; another process creating them at the same moment is fine."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = build_client(KafkaAdminClient, **kafka)
    try:
        missing = [t for t in topics if t not in set(admin.list_topics())]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([NewTopic(t, partitions, 1) for t in missing])
    finally:
        admin.close()


class Applier:
    """Consumes ``{prefix}._journal`` into ``db`` and publishes outcomes to
    ``{prefix}._outcomes``.  ``kafka``: kafka-python client arguments (e.g.
    :meth:`relay.settings.RelaySettings.kafka_client_kwargs`)."""

    def __init__(
        self,
        db: ApplierDb,
        *,
        kafka: Mapping[str, Any],
        prefix: str,
        batch_max_entries: int = 500,
        batch_max_ms: int = 50,
        topic_partitions: int = 4,
        standby_retry_s: float = 2.0,
        topic_refresh_s: float = 10.0,
    ) -> None:
        self.db = db
        self.kafka = dict(kafka)
        self.journal_topic = f"{prefix}._journal"
        self.outcomes_topic = f"{prefix}._outcomes"
        self.batch_max_entries = batch_max_entries
        self.poll_max = 4 * batch_max_entries  # several devices' runs per poll
        self.batch_max_ms = batch_max_ms
        self.topic_partitions = topic_partitions
        self.standby_retry_s = standby_retry_s
        self.topic_refresh_s = topic_refresh_s
        self.leading = threading.Event()
        self._stop = threading.Event()
        self._reader: _Reader | None = None
        self._producer: Any = None
        self._last_take = 0.0

    @property
    def stats(self) -> ApplyStats:
        return self.db.stats

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Lead (consume, apply, publish) or stand by, until :meth:`request_stop`."""
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._start()
                if not self.db.acquire_leadership():
                    self.db.close()
                    self._stop.wait(self.standby_retry_s)
                    continue
                log.info("applier: leading (consumer %s)", self.db.consumer)
                self.leading.set()
                self._open()
                while not self._stop.is_set():
                    self.step()
                backoff = 0.5
            except ConfigError:
                raise
            except (ApplierError, psycopg.Error) as exc:
                self.db.stats.failures += 1
                log.error("applier: %s; retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception as exc:
                if not _is_kafka_error(exc):
                    raise
                self.db.stats.failures += 1
                log.error("applier: Kafka: %s; retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                self.leading.clear()
                self._close_clients()
                if self._stop.is_set():
                    self.db.release_leadership()
                self.db.close()

    def _start(self) -> None:
        self.db.connect()
        self.db.migrate()

    def ensure_topics(self) -> None:
        ensure_journal_topics(
            self.kafka, (self.journal_topic, self.outcomes_topic), self.topic_partitions
        )

    def _open(self) -> None:
        from kafka import KafkaProducer

        self._close_clients()
        self.ensure_topics()
        self._producer = build_client(KafkaProducer, **self.kafka, acks="all", linger_ms=5)
        self._reader = _Reader(
            self.kafka,
            self.journal_topic,
            self.db.shard,
            self.db.shards,
            self.db.load_offsets(self.journal_topic),
            self.poll_max,
            self.topic_refresh_s,
        )
        self._reader.start()
        self._last_take = time.monotonic()
        self.publish_outbox()

    @property
    def partitions(self) -> frozenset[int]:
        """The ``_journal`` partitions this applier consumes (its shard's)."""
        return frozenset(self._reader.partitions) if self._reader is not None else frozenset()

    def _close_clients(self) -> None:
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        if self._producer is not None:
            try:
                self._producer.close()
            except Exception as exc:  # closing must not hide the original problem
                log.debug("closing the Kafka producer: %s", exc)
            self._producer = None

    def step(self) -> int:
        """Apply what the reader fetched (up to ``4 * batch_max_entries`` records, waiting
        at most ``batch_max_ms`` for the first), publish the outbox; returns the number of
        records applied."""
        assert self._reader is not None
        deliveries = self._reader.take(max(self.batch_max_ms, 1) / 1000)
        if deliveries:
            self._last_take = time.monotonic()
            self.db.apply(deliveries, self.batch_max_entries)
        self.publish_outbox()
        return len(deliveries)

    def publish_outbox(self) -> int:
        """Send the outbox to ``_outcomes`` in id order; delete what Kafka acknowledged."""
        total = 0
        while True:
            rows = self.db.pending_outbox()
            if not rows:
                return total
            for _id, device, payload in rows:
                self._producer.send(self.outcomes_topic, key=device.encode("utf-8"), value=payload)
            self._producer.flush(timeout=60)
            self.db.delete_outbox([i for i, _, _ in rows])
            total += len(rows)
            self.db.stats.published += len(rows)

    def run_until_idle(self, timeout: float = 60.0, idle_polls: int = 2) -> ApplyStats:
        """Lead and consume until every partition is at its end ``idle_polls`` times in a
        row, or ``timeout``; for tests, benchmarks and batch runs."""
        if self.db.conn is None:
            self._start()
        if not self.db.acquire_leadership():
            raise ApplierError(f"another applier of consumer {self.db.consumer!r} is running")
        if self._reader is None:
            self._open()
        self._last_take = time.monotonic()  # only an end seen from now on counts
        deadline = time.monotonic() + timeout
        quiet = 0
        while time.monotonic() < deadline and quiet < idle_polls:
            if self.step():
                quiet = 0
            elif self._at_end():
                quiet += 1
        return self.stats

    def _at_end(self) -> bool:
        """Nothing queued, and the reader found every partition at its end after the
        last batch was taken."""
        reader = self._reader
        return reader is not None and reader.empty() and reader.idle_since > self._last_take

    def close(self) -> None:
        self._close_clients()
        self.db.release_leadership()
        self.db.close()


class _Reader(threading.Thread):
    """Owns the Kafka consumer of ``_journal`` and polls ahead into a bounded queue, so
    fetching overlaps with the applier's database work.

    Partitions of the shard are assigned as they appear (checked every ``refresh_s``)
    and start at ``offsets`` (the stored ones; else at the beginning).  An error ends
    the thread and is raised by the next :meth:`take`.  ``idle_since`` is the time of
    the latest poll that found nothing and every partition at its end.
    """

    def __init__(
        self,
        kafka: Mapping[str, Any],
        topic: str,
        shard: int,
        shards: int,
        offsets: Mapping[int, int],
        poll_max: int,
        refresh_s: float,
    ) -> None:
        super().__init__(name=f"applier-reader-{topic}", daemon=True)
        self.kafka = dict(kafka)
        self.topic = topic
        self.shard, self.shards = shard, shards
        self.offsets = dict(offsets)
        self.poll_max = poll_max
        self.refresh_s = refresh_s
        self.partitions: set[int] = set()
        self.idle_since = 0.0
        self.error: BaseException | None = None
        self._queue: queue.Queue[list[tuple[Delivery, bytes | None]]] = queue.Queue(maxsize=4)
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)

    def empty(self) -> bool:
        return self._queue.empty()

    def take(self, wait_s: float) -> list[tuple[Delivery, bytes | None]]:
        """Queued records, oldest first, at most about ``poll_max`` (waiting up to
        ``wait_s`` for the first batch)."""
        try:
            out = self._queue.get(timeout=wait_s)
        except queue.Empty:
            out = []
        if not out:
            if self.error is not None:
                raise self.error
            if not self.is_alive() and not self._stopping.is_set():
                raise ApplierError("the Kafka reader thread stopped")
            return out
        while len(out) < self.poll_max:
            try:
                out.extend(self._queue.get_nowait())
            except queue.Empty:
                break
        return out

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # handed to the applier thread
            self.error = exc

    def _loop(self) -> None:
        from kafka import KafkaConsumer

        consumer = build_client(
            KafkaConsumer,
            **self.kafka,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            max_poll_records=self.poll_max,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,  # an idle journal is seen within 50 ms
        )
        try:
            refreshed = 0.0
            while not self._stopping.is_set():
                if time.monotonic() - refreshed > self.refresh_s or not self.partitions:
                    self._assign(consumer)
                    refreshed = time.monotonic()
                polled = consumer.poll(timeout_ms=100, max_records=self.poll_max)
                batch = [
                    (Delivery(r.topic, r.partition, r.offset), r.value)
                    for tp in sorted(polled, key=lambda t: t.partition)
                    for r in polled[tp]
                ]
                if batch:
                    self._put(batch)
                elif self._at_end(consumer):
                    self.idle_since = time.monotonic()
        finally:
            consumer.close()

    def _put(self, batch: list[tuple[Delivery, bytes | None]]) -> None:
        while not self._stopping.is_set():
            try:
                self._queue.put(batch, timeout=0.1)
                return
            except queue.Full:
                continue

    def _assign(self, consumer: Any) -> None:
        from kafka import TopicPartition

        parts = {
            p
            for p in consumer.partitions_for_topic(self.topic) or ()
            if p % self.shards == self.shard
        }
        new = sorted(parts - self.partitions)
        if not new:
            return
        consumer.assign([TopicPartition(self.topic, p) for p in sorted(self.partitions | set(new))])
        for p in new:
            tp = TopicPartition(self.topic, p)
            if p in self.offsets:
                consumer.seek(tp, self.offsets[p])
            else:
                consumer.seek_to_beginning(tp)
        self.partitions.update(new)

    def _at_end(self, consumer: Any) -> bool:
        tps = list(consumer.assignment())
        if not tps:
            return True
        ends = consumer.end_offsets(tps)
        return all(consumer.position(tp) >= ends[tp] for tp in tps)


def _is_kafka_error(exc: BaseException) -> bool:
    from kafka.errors import KafkaError

    return isinstance(exc, KafkaError)
