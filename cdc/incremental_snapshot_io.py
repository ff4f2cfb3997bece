"""Incremental re-snapshots in the daemon: catalog checks, chunk reads, watermarks, signals,
and the progress record in Kafka.  The protocol is :mod:`cdc.incremental_snapshot`.

Pieces:

- :class:`IncrementalSnapshots`, one per daemon session.  :meth:`~IncrementalSnapshots.load`
  at start reads the progress and the last recorded catalog back from Kafka and compares the
  catalog now with it; :meth:`~IncrementalSnapshots.tick` (between stream reads) checks the
  catalog every ``cdc.ddl_check_interval_s`` and when a Relation message changed, turns
  signal rows into jobs and, with no chunk in flight, reads the next chunk (low watermark,
  REPEATABLE READ read, high watermark, on its own connection);
  :meth:`~IncrementalSnapshots.message` is the change assembler's observer (watermarks,
  signal rows, keys of changes to the table being read, Relation messages);
  :meth:`~IncrementalSnapshots.emit` wraps the assembler's output and puts a chunk's rows
  before the end of its high watermark's transaction.
- :class:`ProgressSink` wraps the Kafka sink: every Kafka transaction that commits while the
  progress or the recorded catalog changed also carries them, as records of the compacted
  topic ``{prefix}._cdc_resnapshot`` keyed ``{slot}.resnapshot`` and ``{slot}.catalog``
  (a topic of their own: the sink writes them like events, and ``_cdc_state`` takes the
  resume position through another path).  They
  commit atomically with the rows they describe; a daemon killed in between finds the
  previous record and reads that chunk again.  Requests from the signal table are in the
  progress record before the Kafka transaction that holds the signal row's own event (and
  therefore before the slot can be confirmed past it) commits.
- The request path of ``fieldsync cdc snapshot``: :func:`resolve_table`, :func:`check_where`,
  :func:`request_snapshot` (a row in the signal table, which the daemon reads from the
  stream like any operator's; the table is created on first use).

Concurrency: everything runs on the daemon's one thread (the CLI functions in their own
process); the driver keeps one ordinary PostgreSQL connection of its own.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, Final

import psycopg
from psycopg import sql

from cdc import pgoutput_messages as m
from cdc.change_assembler import Out, OutEvent, OutSchema, TxnEnd, TxnInfo, topic_for
from cdc.ddl_detection import (
    TableSignature,
    compare_relations,
    resnapshot_reasons,
    signatures_from_bytes,
    signatures_to_bytes,
)
from cdc.errors import (
    ReplicationLost,
    SinkError,
    SinkUnavailable,
    SnapshotRequestError,
    format_lsn,
)
from cdc.incremental_snapshot import (
    WATERMARK_PREFIX,
    ChunkWindow,
    Job,
    Key,
    Progress,
    Row,
    SignalRequest,
    Visibility,
    Watermark,
    WindowState,
    message_keys,
)
from cdc.kafka_sink import (
    Headers,
    KafkaOptions,
    ResumePosition,
    Sink,
    TopicManager,
    build_client,
)
from cdc.pg_catalog import PK_QUERY, PgCatalog, read_signatures
from cdc.pg_source import connect
from cdc.settings import CdcSettings
from cdc.snapshot import COLUMNS_QUERY
from cdc.where_clause import WhereClause, parse_where
from core.avro_envelope import POSITION_HEADER, Source, TableCodec, position_header
from core.pg_types import ColumnSpec, output_function_text

log = logging.getLogger("fieldsync.cdc")

MAX_FAILURES: Final = 3
"""Chunk reads of one job that may fail in a row before the job is given up (logged)."""
_CHANGES: Final = frozenset({m.Insert, m.Update, m.Delete})
RECENT_XIDS: Final = 1024
"""Transactions read from the stream that a new chunk's snapshot is checked against."""
INCREMENTAL: Final = "incremental"
"""``source.snapshot`` of re-snapshot rows."""


def resnapshot_topic(prefix: str) -> str:
    return f"{prefix}._cdc_resnapshot"


def progress_key(slot: str) -> bytes:
    return f"{slot}.resnapshot".encode()


def catalog_key(slot: str) -> bytes:
    return f"{slot}.catalog".encode()


def split_table(name: str) -> tuple[str, str]:
    """``schema.table`` or ``table`` (schema public), as typed by an operator."""
    if "." in name:
        schema, table = name.split(".", 1)
        return schema, table
    return "public", name


# --------------------------------------------------------------------------- Kafka state


def read_state_records(
    opts: KafkaOptions, keys: Collection[bytes], timeout_s: float = 30.0
) -> dict[bytes, bytes]:
    """The last committed value of each of ``keys`` in ``{prefix}._cdc_resnapshot``
    (read_committed; the topic is created, compacted, if missing)."""
    from kafka import KafkaConsumer, TopicPartition

    from cdc.kafka_sink import _kafka_errors, _settled_end_offsets

    topic = resnapshot_topic(opts.topic_prefix)
    topics = TopicManager(opts)
    try:
        topics.ensure([topic], compacted=True)
    finally:
        topics.close()
    try:
        consumer = build_client(
            KafkaConsumer,
            **opts.client_kwargs(),
            isolation_level="read_committed",
            enable_auto_commit=False,
            group_id=None,
            consumer_timeout_ms=1000,
            fetch_max_wait_ms=min(500, int(opts.timeout_s * 500)),
        )
    except _kafka_errors() as exc:
        raise SinkUnavailable(f"cannot read {topic} from {opts.bootstrap_servers}: {exc}") from exc
    found: dict[bytes, bytes] = {}
    try:
        deadline = time.monotonic() + timeout_s
        parts = consumer.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise SinkUnavailable(f"no partitions for {topic} on {opts.bootstrap_servers}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = _settled_end_offsets(consumer, opts, tps, deadline)
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise SinkUnavailable(f"timed out reading {topic} for the re-snapshot progress")
            for _tp, records in consumer.poll(timeout_ms=500).items():
                for r in records:
                    if r.key in keys:
                        if r.value:
                            found[bytes(r.key)] = bytes(r.value)
                        else:  # a tombstone deletes the record
                            found.pop(bytes(r.key), None)
        return found
    except _kafka_errors() as exc:
        raise SinkUnavailable(f"reading {topic} failed: {exc}") from exc
    finally:
        consumer.close()


class ProgressSink:
    """A :class:`~cdc.kafka_sink.Sink` that adds the re-snapshot state records to every
    Kafka transaction it commits while they changed (see the module docstring)."""

    def __init__(self, inner: Sink, owner: IncrementalSnapshots, topic: str) -> None:
        self.inner = inner
        self.owner = owner
        self.topic = topic

    def begin(self) -> None:
        self.inner.begin()

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        self.inner.send(topic, key, value, headers)

    def publish_schema(self, fingerprint: bytes, schema_json: str) -> None:
        self.inner.publish_schema(fingerprint, schema_json)

    def commit(self, position: ResumePosition) -> None:
        records = self.owner.dirty_records()
        for key, value in records.items():
            self.inner.send(self.topic, key, value, ())
        self.inner.commit(position)
        self.owner.records_written()

    def abort(self) -> None:
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()


# --------------------------------------------------------------------------- SQL


def where_sql(clause: WhereClause) -> tuple[sql.Composable, list[str]]:
    """The clause as SQL with columns as identifiers and every value a bound parameter."""
    parts: list[sql.Composable] = []
    params: list[str] = []
    for c in clause.conditions:
        col = sql.Identifier(c.column)
        if c.op in ("is null", "is not null"):
            parts.append(
                sql.SQL("{} is null" if c.op == "is null" else "{} is not null").format(col)
            )
        elif c.op in ("in", "not in"):
            marks = sql.SQL(", ").join(sql.Placeholder() for _ in c.values)
            parts.append(sql.SQL("{} " + c.op + " ({})").format(col, marks))
            params += c.values
        elif c.op == "between":
            parts.append(
                sql.SQL("{} between {} and {}").format(col, sql.Placeholder(), sql.Placeholder())
            )
            params += c.values
        else:
            assert c.op in ("=", "<>", "<", "<=", ">", ">=")
            parts.append(sql.SQL("{} " + c.op + " {}").format(col, sql.Placeholder()))
            params += c.values
    return sql.SQL(" and ").join(parts), params


def chunk_query(
    schema: str,
    table: str,
    columns: Iterable[str],
    key: Iterable[str],
    after: Key | None,
    where: WhereClause | None,
    limit: int,
) -> tuple[sql.Composed, list[str]]:
    """``select … where (key) > (after) [and (where)] order by key limit n``: the key values
    and the WHERE values are parameters of unknown type, which PostgreSQL reads as the
    columns' types (they are the text the type's output function printed)."""
    key_ids = [sql.Identifier(k) for k in key]
    conds: list[sql.Composable] = []
    params: list[str] = []
    if after is not None:
        conds.append(
            sql.SQL("({}) > ({})").format(
                sql.SQL(", ").join(key_ids), sql.SQL(", ").join(sql.Placeholder() for _ in after)
            )
        )
        params += after
    if where is not None:
        w, p = where_sql(where)
        conds.append(sql.SQL("({})").format(w))
        params += p
    query = sql.SQL("select {} from {}{} order by {} limit {}").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        sql.Identifier(schema, table),
        sql.SQL(" where ") + sql.SQL(" and ").join(conds) if conds else sql.SQL(""),
        sql.SQL(", ").join(key_ids),
        sql.Literal(int(limit)),
    )
    return query, params


# --------------------------------------------------------------------------- requests


def resolve_table(
    conn: psycopg.Connection[Any], publication: str, name: str
) -> tuple[int, str, str]:
    """(oid, schema, table) of a published table; SnapshotRequestError naming what is wrong."""
    schema, table = split_table(name.strip())
    row = conn.execute(
        """select c.oid, c.relkind from pg_class c join pg_namespace n on n.oid = c.relnamespace
           where n.nspname = %s and c.relname = %s""",
        (schema, table),
    ).fetchone()
    if row is None:
        raise SnapshotRequestError(f"table {schema}.{table} does not exist")
    published = [
        f"{s}.{t}"
        for s, t in conn.execute(
            "select schemaname, tablename from pg_publication_tables where pubname = %s "
            "order by 1, 2",
            (publication,),
        ).fetchall()
    ]
    if f"{schema}.{table}" not in published:
        shown = ", ".join(published[:20]) + (" …" if len(published) > 20 else "")
        raise SnapshotRequestError(
            f"table {schema}.{table} is not in publication {publication!r}, so cdc does not "
            f"capture it (published: {shown or 'none'})"
        )
    return int(row[0]), schema, table


def check_where(conn: psycopg.Connection[Any], oid: int, qualified: str, text: str) -> WhereClause:
    """Parse ``text`` and check it against the table: known columns, values of the right type."""
    clause = parse_where(text)
    columns = [
        r[0]
        for r in conn.execute(
            "select attname from pg_attribute where attrelid = %s and attnum > 0 "
            "and not attisdropped order by attnum",
            (oid,),
        ).fetchall()
    ]
    unknown = [c for c in clause.columns if c not in columns]
    if unknown:
        raise SnapshotRequestError(
            f"WHERE clause: {qualified} has no column {unknown[0]!r} (columns: {', '.join(columns)})"
        )
    schema, table = qualified.split(".", 1)
    w, params = where_sql(clause)
    probe = sql.SQL("select 1 from {} where {} limit 0").format(sql.Identifier(schema, table), w)
    try:
        with conn.transaction():
            conn.execute("set transaction read only")
            conn.execute(probe, params)
    except psycopg.Error as exc:
        raise SnapshotRequestError(
            f"WHERE clause {clause.text()} does not fit {qualified}: {str(exc).strip().splitlines()[0]}"
        ) from exc
    return clause


SIGNAL_TABLE_DDL: Final = """
create table if not exists {table} (
    id bigint generated always as identity primary key,
    kind text not null default 'snapshot' check (kind = 'snapshot'),
    table_name text not null,
    where_clause text,
    requested_by text not null default current_user,
    requested_at timestamptz not null default now(),
    status text not null default 'pending',
    status_at timestamptz
)
"""


def signal_table_ddl(name: str) -> str:
    """The SQL that creates the signal table (for a DBA, and in error messages)."""
    schema, table = split_table(name)
    quoted = '"' + schema.replace('"', '""') + '"'
    create = SIGNAL_TABLE_DDL.format(table=f'{quoted}."{table.replace(chr(34), chr(34) * 2)}"')
    return f"create schema if not exists {quoted}; {create.strip()}"


def _oid(conn: psycopg.Connection[Any], schema: str, table: str) -> int | None:
    row = conn.execute(
        "select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace "
        "where n.nspname = %s and c.relname = %s",
        (schema, table),
    ).fetchone()
    return int(row[0]) if row else None


def _publish(conn: psycopg.Connection[Any], schema: str, table: str, publication: str) -> None:
    """Add the table to the publication unless it is there (or the publication is FOR ALL
    TABLES, or does not exist yet: the daemon creates it)."""
    row = conn.execute(
        "select puballtables from pg_publication where pubname = %s", (publication,)
    ).fetchone()
    if row is None or row[0]:
        return
    have = conn.execute(
        "select 1 from pg_publication_tables where pubname = %s and schemaname = %s "
        "and tablename = %s",
        (publication, schema, table),
    ).fetchone()
    if have is None:
        conn.execute(
            sql.SQL("alter publication {} add table {}").format(
                sql.Identifier(publication), sql.Identifier(schema, table)
            )
        )


def attach_signal_table(conn: psycopg.Connection[Any], name: str, publication: str) -> int | None:
    """The signal table's oid, once it is in the publication; None when it does not exist
    (``fieldsync cdc snapshot`` creates it on first use) or cannot be published (a warning
    names the fix)."""
    schema, table = split_table(name)
    try:
        oid = _oid(conn, schema, table)
    except psycopg.OperationalError as exc:
        raise ReplicationLost(f"looking up the signal table {name}: {exc}") from exc
    if oid is None:
        log.info(
            "no signal table %s.%s yet: `fieldsync cdc snapshot` creates it on first use",
            schema,
            table,
        )
        return None
    try:
        _publish(conn, schema, table, publication)
    except psycopg.OperationalError as exc:
        raise ReplicationLost(f"adding the signal table {name} to the publication: {exc}") from exc
    except psycopg.Error as exc:
        log.warning(
            "re-snapshot signals are off: the signal table %s.%s cannot be added to publication "
            "%s (%s). Fix: as its owner, ALTER PUBLICATION %s ADD TABLE %s.%s",
            schema, table, publication, str(exc).strip(), publication, schema, table,
        )  # fmt: skip
        return None
    return oid


def create_signal_table(conn: psycopg.Connection[Any], name: str, publication: str) -> None:
    """Create the signal table (and its schema) if missing and add it to the publication, in
    one transaction; SnapshotRequestError with the DDL to run when the role may not."""
    schema, table = split_table(name)
    try:
        with conn.transaction():
            conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL(SIGNAL_TABLE_DDL).format(table=sql.Identifier(schema, table)))
            _publish(conn, schema, table, publication)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SnapshotRequestError(
            f"the signal table {schema}.{table} does not exist and this role may not create it "
            f"({str(exc).strip()}); as an owner run: {signal_table_ddl(name)}; "
            f"ALTER PUBLICATION {publication} ADD TABLE {schema}.{table}"
        ) from exc


def request_snapshot(
    conn: psycopg.Connection[Any],
    *,
    publication: str,
    signal_table: str,
    table: str,
    where: str | None,
) -> tuple[int, str]:
    """Check a request and insert it into the signal table; (signal id, qualified table)."""
    if not signal_table:
        raise SnapshotRequestError(
            "postgres.signal_table is empty: re-snapshot requests are off (set it, e.g. "
            '"fieldsync.cdc_signals", and restart `fieldsync cdc run`)'
        )
    oid, schema, name = resolve_table(conn, publication, table)
    qualified = f"{schema}.{name}"
    clause = check_where(conn, oid, qualified, where) if where is not None else None
    sschema, stable = split_table(signal_table)
    if _oid(conn, sschema, stable) is None:
        # first use: the daemon sees the table from the next transaction on (a running one
        # adds it to the publication itself only at its next start, so do that here)
        create_signal_table(conn, signal_table, publication)
    row = conn.execute(
        sql.SQL(
            "insert into {} (kind, table_name, where_clause) values ('snapshot', %s, %s) "
            "returning id"
        ).format(sql.Identifier(sschema, stable)),
        (qualified, None if clause is None else clause.text()),
    ).fetchone()
    assert row is not None
    return int(row[0]), qualified


def signal_status(conn: psycopg.Connection[Any], signal_table: str, signal_id: int) -> str:
    schema, table = split_table(signal_table)
    row = conn.execute(
        sql.SQL("select status from {} where id = %s").format(sql.Identifier(schema, table)),
        (signal_id,),
    ).fetchone()
    return str(row[0]) if row else "missing"


# --------------------------------------------------------------------------- the driver


@dataclasses.dataclass(frozen=True, slots=True)
class _Read:
    """One chunk as read: where from, its columns and key, rows, and its snapshot."""

    schema: str
    table: str
    key_names: tuple[str, ...]
    columns: tuple[tuple[str, int, int], ...]
    rows: list[tuple[Key, Row]]
    visibility: Visibility


@dataclasses.dataclass
class _Chunk:
    chunk_id: str
    job: Job
    generation: int
    window: ChunkWindow
    codec: TableCodec
    topic: str
    key_names: tuple[str, ...]
    last_key: Key | None
    complete: bool
    high_lsn: int | None = None  # LSN of the high watermark message
    high_commit: int | None = None  # commit LSN of its transaction
    high_xid: int = 0


class IncrementalSnapshots:
    """Re-snapshots for one daemon session (see the module docstring)."""

    def __init__(
        self,
        settings: CdcSettings,
        *,
        db: str,
        catalog: PgCatalog,
        clock_us: Callable[[], int] = lambda: int(time.time() * 1_000_000),
    ) -> None:
        self.s = settings
        self.pg = settings.postgres
        self.db = db
        self.catalog = catalog
        self.clock_us = clock_us
        self.prefix = settings.kafka.topic_prefix
        self.chunk_rows = settings.cdc.resnapshot_chunk_rows
        self.progress = Progress()
        self.signatures: dict[int, TableSignature] | None = None
        self.signal_oid: int | None = None
        self._signal_name = split_table(self.pg.signal_table) if self.pg.signal_table else None
        self._signal_seen: tuple[int, int] = (0, 0)
        self._dirty_progress = False
        self._dirty_catalog = False
        self._conn: psycopg.Connection[Any] | None = None
        self._chunk: _Chunk | None = None
        self._recent: collections.deque[int] = collections.deque(maxlen=RECENT_XIDS)
        self._last_xid: int | None = None
        self._relations: dict[int, m.Relation] = {}
        self._check_oids: set[int] = set()
        self._next_check = 0.0
        self._codecs: dict[tuple[Any, ...], TableCodec] = {}
        self._statuses: list[tuple[int, str]] = []
        self._session = secrets.token_hex(4)
        self._chunks_made = 0
        self._generations: dict[int, int] = {}
        self._failures = 0

    # ------------------------------------------------------------------ set-up

    def wrap(self, sink: Sink) -> ProgressSink:
        return ProgressSink(sink, self, resnapshot_topic(self.prefix))

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.pg.dsn, self.pg.password)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def load(self, opts: KafkaOptions, *, initial_snapshot: bool, timeout_s: float = 30.0) -> None:
        """Read the progress and the recorded catalog back; set up the signal table; compare
        the catalog with what was recorded (a first start, or one that takes an initial
        snapshot, records it: the snapshot covers every change before)."""
        slot = self.pg.slot
        records = read_state_records(opts, [progress_key(slot), catalog_key(slot)], timeout_s)
        if progress_key(slot) in records:
            try:
                self.progress = Progress.from_bytes(records[progress_key(slot)])
            except (ValueError, KeyError, TypeError) as exc:
                raise SinkError(
                    f"the re-snapshot progress of slot {slot} (key {slot}.resnapshot of "
                    f"{resnapshot_topic(self.prefix)}) cannot be read: {exc}. Fix: write a "
                    "tombstone (null value) for that key; queued re-snapshots are then forgotten"
                ) from exc
        self._signal_seen = (self.progress.signal_lsn, self.progress.signal_id)
        if catalog_key(slot) in records and not initial_snapshot:
            try:
                self.signatures = signatures_from_bytes(records[catalog_key(slot)])
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("the recorded catalog cannot be read (%s): recording it again", exc)
        if initial_snapshot and self.progress.jobs:
            log.info(
                "the initial snapshot covers %d queued re-snapshot(s)", len(self.progress.jobs)
            )
            for job in self.progress.jobs:
                self._status(job.signal_id, "done: covered by the initial snapshot")
            self.progress.jobs.clear()
            self._dirty_progress = True
        conn = self._connection()
        if self._signal_name is not None:
            self.signal_oid = attach_signal_table(conn, self.pg.signal_table, self.pg.publication)
        for job in self.progress.jobs:
            log.info(
                "re-snapshot of %s (%s) %s",
                job.table,
                job.reason,
                f"resumes after key {list(job.after)}" if job.after else "starts",
            )
        self._check_catalog()

    def persist(self, sink: Sink, resume: ResumePosition | None) -> None:
        """Commit changed state records now (in a Kafka transaction of their own, repeating
        the current resume position), so a DDL found at start is not forgotten by a daemon
        killed before its first batch."""
        if not (self._dirty_progress or self._dirty_catalog):
            return
        sink.begin()
        sink.commit(resume if resume is not None else ResumePosition(0, -1, True))

    def dirty_records(self) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        if self._dirty_progress:
            self.progress.signal_lsn, self.progress.signal_id = self._signal_seen
            out[progress_key(self.pg.slot)] = self.progress.to_bytes()
        if self._dirty_catalog and self.signatures is not None:
            out[catalog_key(self.pg.slot)] = signatures_to_bytes(self.signatures)
        return out

    def records_written(self) -> None:
        self._dirty_progress = self._dirty_catalog = False

    # ------------------------------------------------------------------ jobs

    def _queue(self, job: Job) -> None:
        queued = self.progress.add(job)
        self._generations[queued.oid] = self._generations.get(queued.oid, 0) + 1
        self._dirty_progress = True
        log.info(
            "re-snapshot of %s%s queued: %s",
            queued.table,
            f" where {queued.where}" if queued.where else "",
            job.reason,
        )

    def _finish(self, job: Job, status: str) -> None:
        if job in self.progress.jobs:
            self.progress.jobs.remove(job)
        self._dirty_progress = True
        self._status(job.signal_id, status)

    def _status(self, signal_id: int | None, status: str) -> None:
        if signal_id is not None and self._signal_name is not None:
            self._statuses.append((signal_id, status[:500]))

    def _write_statuses(self) -> None:
        if not self._statuses or self._signal_name is None:
            return
        statuses, self._statuses = self._statuses, []
        try:
            conn = self._connection()
            for signal_id, status in statuses:
                conn.execute(
                    sql.SQL("update {} set status = %s, status_at = now() where id = %s").format(
                        sql.Identifier(*self._signal_name)
                    ),
                    (status, signal_id),
                )
        except psycopg.Error as exc:
            log.warning("cannot record the status of re-snapshot signals: %s", str(exc).strip())

    # ------------------------------------------------------------------ catalog

    def _check_catalog(self) -> None:
        self._check_oids.clear()
        interval = self.s.cdc.ddl_check_interval_s
        self._next_check = time.monotonic() + interval if interval else float("inf")
        conn = self._connection()
        try:
            now = read_signatures(conn, self.pg.publication)
            row = conn.execute(
                "select puballtables from pg_publication where pubname = %s",
                (self.pg.publication,),
            ).fetchone()
        except psycopg.OperationalError as exc:
            raise ReplicationLost(f"catalog check failed: {exc}") from exc
        except psycopg.Error as exc:
            log.warning("catalog check failed (tried again later): %s", str(exc).strip())
            return
        all_tables = bool(row and row[0])
        if self.signatures is None:
            self.signatures = now
            self._dirty_catalog = True
            log.info("recorded the catalog of %d published table(s)", len(now))
            return
        for oid, new in now.items():
            if oid == self.signal_oid or (new.schema, new.table) == self._signal_name:
                continue
            old = self.signatures.get(oid)
            if old is None:
                # a table added to a publication of listed tables (postgres.tables grew, or
                # ALTER PUBLICATION … ADD TABLE): rows it had then were never sent.  In a
                # FOR ALL TABLES publication a new table is published from its creation on.
                reasons = (
                    ["added to the publication: its existing rows were never sent"]
                    if self.pg.snapshot == "initial" and not all_tables and self._has_rows(new)
                    else []
                )
            else:
                reasons = resnapshot_reasons(old, new)
            if not reasons:
                continue
            if self.s.cdc.resnapshot_on_ddl:
                self._queue(Job(oid, new.qualified, "; ".join(reasons)))
            else:
                log.warning(
                    "%s: %s; existing rows keep their old values in Kafka (cdc.resnapshot_on_ddl "
                    "is off; `fieldsync cdc snapshot --table %s` sends them)",
                    new.qualified,
                    "; ".join(reasons),
                    new.qualified,
                )
        if now != self.signatures:
            self.signatures = now
            self._dirty_catalog = True

    def _has_rows(self, sig: TableSignature) -> bool:
        try:
            row = (
                self._connection()
                .execute(
                    sql.SQL("select exists (select 1 from {})").format(
                        sql.Identifier(sig.schema, sig.table)
                    )
                )
                .fetchone()
            )
        except psycopg.OperationalError as exc:
            raise ReplicationLost(f"catalog check failed: {exc}") from exc
        except psycopg.Error:
            return True  # cannot tell (no privilege): the job says what is wrong
        return bool(row and row[0])

    # ------------------------------------------------------------------ observer

    def message(self, msg: m.Message, txn: TxnInfo | None) -> None:
        """The change assembler's observer: every message inside a transaction, in commit order
        (on the hot path: a row change of no interest costs two comparisons)."""
        if txn is not None and txn.xid != self._last_xid:
            self._last_xid = txn.xid
            self._recent.append(txn.xid)
        kind = type(msg)
        if kind in _CHANGES:
            change: m.Insert | m.Update | m.Delete = msg  # type: ignore[assignment]
            oid = change.relation_oid
            if oid == self.signal_oid and kind is m.Insert and txn is not None:
                self._signal(change, txn)  # type: ignore[arg-type]
            chunk = self._chunk
            if chunk is not None and oid == chunk.job.oid and txn is not None:
                chunk.window.change(txn.xid, self._keys(change, chunk))
        elif kind is m.LogicalMessage:
            self._watermark(msg, txn)  # type: ignore[arg-type]
        elif kind is m.Relation:
            self._relation(msg)  # type: ignore[arg-type]
        elif kind is m.Truncate:
            chunk = self._chunk
            truncate: m.Truncate = msg  # type: ignore[assignment]
            if chunk is not None and chunk.job.oid in truncate.relation_oids and txn is not None:
                chunk.window.truncate(txn.xid)

    def _watermark(self, msg: m.LogicalMessage, txn: TxnInfo | None) -> None:
        chunk = self._chunk
        if not msg.transactional or msg.prefix != WATERMARK_PREFIX or chunk is None or txn is None:
            return
        mark = Watermark.parse(msg.content)
        if mark is None or mark.chunk != chunk.chunk_id:
            return  # another session's (replayed after a restart): no window of ours
        chunk.window.watermark(mark.mark)
        if mark.mark == "high":
            chunk.high_lsn, chunk.high_commit, chunk.high_xid = msg.lsn, txn.commit_lsn, txn.xid

    def _relation(self, rel: m.Relation) -> None:
        previous = self._relations.get(rel.oid)
        self._relations[rel.oid] = rel
        if self._signal_name == (rel.namespace, rel.name):
            self.signal_oid = rel.oid
        if previous is None:
            return  # the first in this session (the check at start covered the table)
        diff = compare_relations(previous, rel)
        if not diff.changed:
            return
        log.info("relation %s.%s changed: %s", rel.namespace, rel.name, diff.describe())
        self._check_oids.add(rel.oid)
        chunk = self._chunk
        if chunk is not None and chunk.job.oid == rel.oid:
            chunk.window.invalidate("the table changed between the watermarks")

    def _keys(self, msg: m.Insert | m.Update | m.Delete, chunk: _Chunk) -> list[Key] | None:
        rel = self._relations.get(msg.relation_oid)
        if rel is None:
            return None
        names = [c.name for c in rel.columns]
        try:
            positions = [names.index(k) for k in chunk.key_names]
        except ValueError:
            return None
        return message_keys(msg, positions)

    def _signal(self, msg: m.Insert, txn: TxnInfo) -> None:
        rel = self._relations.get(msg.relation_oid)
        if rel is None:
            return
        row = {c.name: v for c, v in zip(rel.columns, msg.new, strict=False)}
        raw_id = row.get("id")
        try:
            signal_id = int(raw_id) if isinstance(raw_id, str) else -1
        except ValueError:
            signal_id = -1
        if (txn.commit_lsn, signal_id) <= self._signal_seen:
            return  # replayed after a restart: taken already
        self._signal_seen = (txn.commit_lsn, signal_id)
        table, where = row.get("table_name"), row.get("where_clause")
        self.progress.requests.append(
            SignalRequest(
                signal_id,
                table if isinstance(table, str) else "",
                where if isinstance(where, str) else None,
                str(row.get("kind") or "snapshot"),
            )
        )
        self._dirty_progress = True

    # ------------------------------------------------------------------ emission

    def emit(self, outs: Iterable[Out]) -> Iterable[Out]:
        """The assembler's output, with a chunk's rows before the end of its high watermark's
        transaction (``outs`` itself while no chunk is in flight)."""
        if self._chunk is None:
            return outs
        return self._emit_around(outs)

    def _emit_around(self, outs: Iterable[Out]) -> Iterator[Out]:
        for out in outs:
            chunk = self._chunk
            if (
                isinstance(out, TxnEnd)
                and chunk is not None
                and chunk.high_commit is not None
                and chunk.high_commit == out.commit_lsn
            ):
                self._chunk = None
                yield from self._emit_chunk(chunk, out)
            else:
                yield out

    def _emit_chunk(self, chunk: _Chunk, end: TxnEnd) -> Iterator[Out]:
        window, job = chunk.window, chunk.job
        if window.state is not WindowState.CLOSED:
            log.info(
                "re-snapshot of %s: chunk %s read again (%s)",
                job.table,
                chunk.chunk_id,
                window.invalid_reason or window.state.value,
            )
            yield end
            return
        rows = window.remaining()
        codec = chunk.codec
        if rows:
            if codec.key_fingerprint is not None and codec.key_schema_json is not None:
                yield OutSchema(codec.key_fingerprint, codec.key_schema_json)
            yield OutSchema(codec.value_fingerprint, codec.value_schema_json)
        seq = end.events
        lsn = chunk.high_lsn if chunk.high_lsn is not None else end.commit_lsn
        for _key, row in rows:
            source = Source(
                self.db,
                codec.schema,
                codec.table,
                lsn,
                end.commit_lsn,
                chunk.high_xid,
                seq,
                end.commit_ts_us,
                INCREMENTAL,
                None,
            )
            key, value = codec.encode_change("r", None, row, source, self.clock_us())
            yield OutEvent(
                chunk.topic,
                key,
                value,
                end.commit_lsn,
                seq,
                [(POSITION_HEADER, position_header(end.commit_lsn, seq))],
                end.commit_ts_us,
            )
            seq += 1
        # every row is handed to the sink: the job moves on (the progress record goes out
        # with this Kafka transaction or a later one, never before the rows)
        if self._generations.get(job.oid, 0) == chunk.generation and job in self.progress.jobs:
            job.after = chunk.last_key
            job.chunks += 1
            job.rows += len(rows)
            self._dirty_progress = True
            log.debug(
                "re-snapshot of %s: chunk %d at %s, %d row(s) (%d dropped for newer changes)",
                job.table,
                job.chunks,
                format_lsn(end.commit_lsn),
                len(rows),
                window.dropped,
            )
            if chunk.complete:
                self._done(job)
        yield dataclasses.replace(end, events=seq)

    # ------------------------------------------------------------------ between reads

    def tick(self) -> None:
        """Catalog checks, signal requests and the next chunk; call between stream reads."""
        self._write_statuses()
        if self._check_oids or time.monotonic() >= self._next_check:
            self._check_catalog()
        if self.progress.requests:
            self._take_requests()
        if self._chunk is None and self.progress.jobs:
            self._next_chunk(self.progress.jobs[0])

    def _take_requests(self) -> None:
        conn = self._connection()
        for request in self.progress.requests:
            try:
                oid, schema, table = resolve_table(conn, self.pg.publication, request.table)
                qualified = f"{schema}.{table}"
                where = (
                    check_where(conn, oid, qualified, request.where).text()
                    if request.where is not None and request.where.strip()
                    else None
                )
                if request.kind != "snapshot":
                    raise SnapshotRequestError(f"unknown signal kind {request.kind!r}")
                if oid == self.signal_oid:
                    raise SnapshotRequestError("the signal table itself is not re-read")
            except psycopg.OperationalError as exc:
                raise ReplicationLost(f"checking re-snapshot signals failed: {exc}") from exc
            except (SnapshotRequestError, psycopg.Error) as exc:
                reason = str(exc).strip() or type(exc).__name__
                log.warning("re-snapshot signal %d rejected: %s", request.signal_id, reason)
                self._status(request.signal_id, f"rejected: {reason}")
                continue
            self._queue(
                Job(
                    oid,
                    qualified,
                    f"signal {request.signal_id}",
                    where,
                    signal_id=request.signal_id,
                )
            )
            self._status(request.signal_id, "accepted")
        self.progress.requests.clear()
        self._dirty_progress = True

    def _next_chunk(self, job: Job) -> None:
        """Read the job's next chunk between two watermarks and register its window (or
        end the job, or leave it for the next tick to try again)."""
        self._chunks_made += 1
        chunk_id = f"{self._session}-{self._chunks_made}"
        generation = self._generations.get(job.oid, 0)
        try:
            read = self._read_between_watermarks(job, chunk_id)
        except psycopg.OperationalError as exc:
            raise ReplicationLost(f"re-snapshot of {job.table}: {exc}") from exc
        except psycopg.Error as exc:
            self._read_failed(job, exc)
            return
        self._failures = 0
        if isinstance(read, str):
            log.warning("re-snapshot of %s ends: %s", job.table, read)
            self._finish(job, read)
            return
        window = ChunkWindow(chunk_id, read.rows, read.visibility)
        unseen = window.registered_after(self._recent)
        if unseen is not None:
            log.info(
                "re-snapshot of %s: transaction %d, already read from the stream, is not "
                "visible to chunk %s; reading it again",
                job.table,
                unseen,
                chunk_id,
            )
            return
        if not read.rows:
            self._done(job)
            return
        self._chunk = _Chunk(
            chunk_id=chunk_id,
            job=job,
            generation=generation,
            window=window,
            codec=self._codec(job.oid, read.schema, read.table, read.columns, read.key_names),
            topic=topic_for(self.prefix, read.schema, read.table),
            key_names=read.key_names,
            last_key=read.rows[-1][0],
            complete=len(read.rows) < self.chunk_rows,
        )

    def _read_between_watermarks(self, job: Job, chunk_id: str) -> _Read | str:
        """Low watermark, the chunk in a REPEATABLE READ transaction, high watermark; a
        string says why the job cannot go on (psycopg errors propagate)."""
        conn = self._connection()
        emit = "select pg_logical_emit_message(true, %s, %s)"
        conn.execute(emit, (WATERMARK_PREFIX, Watermark(chunk_id, "low", job.table).to_json()))
        with conn.transaction():
            conn.execute("set transaction isolation level repeatable read, read only")
            snap = conn.execute("select pg_current_snapshot()::text").fetchone()
            names = conn.execute(
                "select n.nspname, c.relname from pg_class c "
                "join pg_namespace n on n.oid = c.relnamespace where c.oid = %s",
                (job.oid,),
            ).fetchone()
            if names is None or snap is None:
                return "done: the table no longer exists"
            key_names = tuple(str(r[0]) for r in conn.execute(PK_QUERY, (job.oid,)).fetchall())
            if not key_names:
                return (
                    "rejected: the table has no primary key to read it in chunks by (add one, "
                    "or re-create the slot for a full snapshot)"
                )
            columns = tuple(
                (str(n), int(t), int(mod))
                for n, t, mod in conn.execute(COLUMNS_QUERY, (job.oid,)).fetchall()
            )
            query, params = chunk_query(
                str(names[0]),
                str(names[1]),
                [c[0] for c in columns],
                key_names,
                job.after,
                parse_where(job.where) if job.where else None,
                self.chunk_rows,
            )
            with conn.cursor() as cur:
                output_function_text(cur)
                cur.execute(query, params)
                fetched: list[Row] = [tuple(r) for r in cur.fetchall()]
        conn.execute(emit, (WATERMARK_PREFIX, Watermark(chunk_id, "high", job.table).to_json()))
        order = [next(i for i, c in enumerate(columns) if c[0] == k) for k in key_names]
        return _Read(
            schema=str(names[0]),
            table=str(names[1]),
            key_names=key_names,
            columns=columns,
            rows=[(tuple(str(r[i]) for i in order), r) for r in fetched],
            visibility=Visibility.parse(str(snap[0])),
        )

    def _read_failed(self, job: Job, exc: psycopg.Error) -> None:
        """A chunk read failed: start the job over (the last key may no longer read as its
        type: an enum label renamed); give it up when that keeps happening (no privilege)."""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._failures += 1
        if self._failures >= MAX_FAILURES:
            log.error(
                "re-snapshot of %s given up after %d failed reads: %s",
                job.table,
                self._failures,
                reason,
            )
            self._failures = 0
            self._finish(job, f"failed: {reason}")
            return
        log.warning(
            "re-snapshot of %s: reading a chunk failed (%s); it starts over", job.table, reason
        )
        job.after = None
        self._dirty_progress = True

    def _done(self, job: Job) -> None:
        log.info(
            "re-snapshot of %s%s done: %d row(s) in %d chunk(s)",
            job.table,
            f" where {job.where}" if job.where else "",
            job.rows,
            job.chunks,
        )
        self._finish(job, f"done: {job.rows} row(s)")

    def _codec(
        self,
        oid: int,
        schema: str,
        table: str,
        columns: tuple[tuple[str, int, int], ...],
        key_names: tuple[str, ...],
    ) -> TableCodec:
        cache_key = (oid, schema, table, columns, key_names)
        codec = self._codecs.get(cache_key)
        if codec is None:
            codec = self._codecs[cache_key] = TableCodec(
                db=self.db,
                schema=schema,
                table=table,
                columns=[ColumnSpec(n, t, mod, n in key_names) for n, t, mod in columns],
                catalog=self.catalog,
                unchanged_sentinel=m.UNCHANGED_TOAST,
                warn=lambda msg: log.warning("%s", msg),
                namespace_prefix=self.prefix,
            )
        return codec
