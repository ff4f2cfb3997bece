"""The bucket store in PostgreSQL (schema ``fieldsync_relay`` in the relay's own database).

Tables (migration 1; :data:`MIGRATIONS` is the versioned, append-only list; migration 2
leaves free space in ``buckets`` and ``row_state`` pages for in-place updates)::

    schema_migrations  version, description, applied_at
    meta               one row: head_op_id (highest committed op id), store_id (uuid)
    ops                (bucket, op_id) PK, tbl, row_key, kind PUT|REMOVE, data (canonical
                       JSON text of the projected row, NULL for REMOVE), commit_lsn, seq
    buckets            bucket PK, last_op_id, row_count, checksum (u64 as two's-complement
                       bigint), compacted_below, log_count (ops currently in the log)
    row_state          (tbl, row_key) PK, entries (JSON text [[bucket, op_id, term], ...]:
                       the buckets the row is in, its latest PUT there and its checksum
                       term; ``[]`` is a tombstone), commit_lsn, seq (last applied position)
    table_state        tbl PK, truncated_lsn, truncated_seq (position of the last truncate)
    consumer_progress  (grp, topic, part) PK, next_offset, commit_lsn, seq

Why the store must be its own database: logical decoding is per database, and the relay's
writes must never feed back into the change stream.

Concurrency model
-----------------
- **Op ids become visible in order.**  Every writing transaction (:meth:`PgBucketStore.apply`)
  first takes the transaction-level advisory lock :data:`WRITE_LOCK`, allocates its op ids
  from the sequence while holding it, and holds it until after its commit is visible
  (PostgreSQL releases transaction locks after the commit record is written and the
  transaction has left the proc array).  So a writer that gets the lock next allocates
  higher ids and commits later: once a reader sees op ``n``, every op ``< n`` is already
  visible (or was compacted away).  Without the lock two writers could commit ids out of
  order and a device cursor could skip the lower one forever.
- **Readers** run each :meth:`~PgBucketStore.read_ops` in one ``REPEATABLE READ, READ ONLY``
  transaction, so the ops and the checkpoints (checksum, count, last op id) come from one
  snapshot, and never block writers.
- **Wake-ups.**  Each writing transaction ends with ``pg_notify('fieldsync_relay_ops',
  '<head op id>\\n<bucket>\\n<bucket>…')`` (only ``<head>\\n*`` when the bucket list does not
  fit), delivered at commit to every relay process LISTENing.  One listener thread per
  store object serves all sync and asyncio waiters; a waiter is woken only for its buckets.
  Spurious wake-ups happen (after a reconnect of the listener, or when the bucket list was
  too long) and are harmless: the caller re-reads.
- **One engine at a time.**  :meth:`~PgBucketStore.acquire_leadership` takes a session-level
  advisory lock keyed by the consumer group on the writer connection; the engine applies only
  while it holds it, on that same connection, so a process that lost its connection (and
  with it the lock) cannot write: it must acquire leadership again (and reload its offsets).
- **Compaction** runs per bucket in its own transaction and deletes only ops that are not
  the latest of their row (and, when asked, old REMOVEs); it never changes counts or
  checksums and needs no global lock.

Dedup: a change at or below its row's remembered position, or at or below its table's last
truncate, changes nothing (see :func:`relay.downstream.bucket_store.plan_changes`).  Rows that were in
a bucket keep a tombstone state after a delete or key change, so late or re-delivered older
events of that key stay ignored; :meth:`~PgBucketStore.purge_tombstones` drops tombstones
older than a position the engine knows no event can precede any more.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import orjson
import psycopg

from core.row_wire import CHECKSUM_MODULUS, row_key_text
from relay.downstream.bucket_store import (
    ApplyResult,
    BucketCheckpoint,
    ChangeKind,
    CompactResult,
    Op,
    OpKind,
    OpsPage,
    PartitionProgress,
    Position,
    RowChange,
)
from relay.downstream.planner import (
    BucketDelta,
    BucketEntry,
    Plan,
    RowRef,
    RowState,
    lookup_refs,
    plan_changes,
)
from relay.downstream.rules import Rules
from relay.errors import LeadershipLost, RelayError, StoreError  # noqa: F401 (re-exported)
from relay.pg_listen import PgListener, wake_future

__all__ = [
    "MIGRATIONS",
    "NOTIFY_CHANNEL",
    "SCHEMA",
    "LeadershipLost",
    "PgBucketStore",
    "StoreError",
]

log = logging.getLogger(__name__)

SCHEMA: Final = "fieldsync_relay"
NOTIFY_CHANNEL: Final = "fieldsync_relay_ops"
_LOCK_CLASS: Final = 0x66730001  # advisory lock namespace ("fs" + 1)
WRITE_LOCK: Final = (_LOCK_CLASS, 1)
MIGRATE_LOCK: Final = (_LOCK_CLASS, 2)
_NOTIFY_MAX: Final = 7900  # NOTIFY payloads must stay below 8000 bytes
_HISTORY: Final = 2048  # notifications remembered for waiters that register late


# --------------------------------------------------------------------------- migrations

MIGRATIONS: Final[tuple[tuple[int, str, str], ...]] = (
    (
        1,
        "op logs, bucket checkpoints, row state, table state, consumer progress",
        f"""
        create table {SCHEMA}.meta (
            id int primary key default 1 check (id = 1),
            head_op_id bigint not null default 0,
            store_id uuid not null default gen_random_uuid(),
            created_at timestamptz not null default now()
        );
        insert into {SCHEMA}.meta default values;
        create sequence {SCHEMA}.op_id_seq as bigint minvalue 1 cache 1;
        create table {SCHEMA}.ops (
            bucket text not null,
            op_id bigint not null,
            tbl text not null,
            row_key text not null,
            kind text not null check (kind in ('PUT', 'REMOVE')),
            data text,
            commit_lsn bigint not null,
            seq bigint not null,
            primary key (bucket, op_id)
        );
        create table {SCHEMA}.buckets (
            bucket text primary key,
            last_op_id bigint not null default 0,
            row_count bigint not null default 0,
            checksum bigint not null default 0,
            compacted_below bigint not null default 0,
            epoch bigint not null default 0,
            log_count bigint not null default 0
        );
        create table {SCHEMA}.row_state (
            tbl text not null,
            row_key text not null,
            entries text not null,
            commit_lsn bigint not null,
            seq bigint not null,
            primary key (tbl, row_key)
        );
        create table {SCHEMA}.table_state (
            tbl text primary key,
            truncated_lsn bigint not null,
            truncated_seq bigint not null
        );
        create table {SCHEMA}.consumer_progress (
            grp text not null,
            topic text not null,
            part int not null,
            next_offset bigint not null,
            commit_lsn bigint not null,
            seq bigint not null,
            primary key (grp, topic, part)
        );
        """,
    ),
    (
        2,
        "room for in-place (HOT) updates of bucket checkpoints and row states",
        # every batch rewrites the checkpoint of each bucket it touches and the state of
        # each row it places: with free space on the page the new row version stays there
        # and no index entry is added (full pages made each update grow the indexes)
        f"""
        alter table {SCHEMA}.buckets set (fillfactor = 50);
        alter table {SCHEMA}.row_state set (fillfactor = 80);
        """,
    ),
)


def _i64(u: int) -> int:
    return u - CHECKSUM_MODULUS if u >= 1 << 63 else u


def _u64(i: int) -> int:
    return i % CHECKSUM_MODULUS


_SEP: Final = "\x1f"  # never in canonical JSON text (control characters are escaped)


def _texts(values: Sequence[str]) -> str:
    """One text parameter for ``string_to_array(%s, E'\\x1f')``: much cheaper than a list
    parameter (psycopg dumps lists element by element in Python)."""
    joined = _SEP.join(values)
    if joined.count(_SEP) != max(0, len(values) - 1):
        raise StoreError(f"a value contains the separator character U+001F: {values!r:.200}")
    return joined


def _ints(values: Sequence[int]) -> str:
    """One text parameter for ``string_to_array(%s, ',')::bigint[]``."""
    return ",".join(map(str, values))


_T = "string_to_array(%s, E'\\x1f')"
_I = "string_to_array(%s, ',')::bigint[]"


_WRAP_SUM: Final = (
    "((({}::numeric + {}::numeric + 9223372036854775808) %% 18446744073709551616 "
    "+ 18446744073709551616) %% 18446744073709551616 - 9223372036854775808)::bigint"
)
"""SQL of ``a + b`` wrapping around in two's-complement 64 bits (u64 addition modulo 2**64
on the bigint representation)."""


def _group_lock(group: str) -> tuple[int, int]:
    digest = hashlib.sha256(group.encode("utf-8")).digest()
    return (_LOCK_CLASS + 1, int.from_bytes(digest[:4], "big", signed=True))


# --------------------------------------------------------------------------- notifications


class _Waiter:
    """One waiter: a thread (``event``) or a coroutine (``future`` on ``loop``)."""

    __slots__ = ("buckets", "event", "future", "loop")

    def __init__(
        self,
        buckets: frozenset[str] | None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.buckets = buckets
        self.loop = loop
        self.event = threading.Event() if loop is None else None
        self.future: asyncio.Future[None] | None = loop.create_future() if loop else None

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()
        elif self.loop is not None and self.future is not None:
            wake_future(self.loop, self.future)


class _Listener:
    """Waiters by bucket, woken by the ops channel's LISTEN connection
    (:class:`relay.pg_listen.PgListener`); remembers the last notifications for waiters
    that register late."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._lock = threading.Lock()
        self.head = 0
        self._floor = 0  # waiters with since < floor cannot be checked against the history
        self._history: collections.deque[tuple[int, frozenset[str] | None]] = collections.deque(
            maxlen=_HISTORY
        )
        self._by_bucket: dict[str, set[_Waiter]] = {}
        self._any: set[_Waiter] = set()
        self._pg = PgListener(
            NOTIFY_CHANNEL,
            connect,
            lambda payload: self._deliver(*_parse_payload(payload)),
            self._connected,
            thread_name="bucket-store-listener",
            what="bucket store listener",
            log=log,
        )

    @property
    def ready(self) -> bool:
        """The LISTEN connection was established (at least once)."""
        return self._pg.connected.is_set()

    def start(self, timeout: float = 10.0) -> None:
        self._pg.start(timeout)

    def stop(self) -> None:
        self._pg.stop()

    def register(self, waiter: _Waiter, since: int) -> None:
        with self._lock:
            if since < self._floor or self._missed(waiter, since):
                waiter.wake()
                return
            if waiter.buckets is None:
                self._any.add(waiter)
            else:
                for b in waiter.buckets:
                    self._by_bucket.setdefault(b, set()).add(waiter)

    def unregister(self, waiter: _Waiter) -> None:
        with self._lock:
            self._any.discard(waiter)
            for b in waiter.buckets or ():
                group = self._by_bucket.get(b)
                if group is not None:
                    group.discard(waiter)
                    if not group:
                        del self._by_bucket[b]

    def _missed(self, waiter: _Waiter, since: int) -> bool:
        for head, buckets in reversed(self._history):
            if head <= since:
                return False
            if buckets is None or waiter.buckets is None or buckets & waiter.buckets:
                return True
        # every remembered notification is newer than ``since``: if the history is full,
        # older ones were dropped and may have named the waiter's buckets, so wake it
        return len(self._history) == self._history.maxlen

    def _deliver(self, head: int, buckets: frozenset[str] | None) -> None:
        with self._lock:
            self.head = max(self.head, head)
            self._history.append((head, buckets))
            if buckets is None:
                woken = set(self._any).union(*self._by_bucket.values())
            else:
                woken = set(self._any)
                for b in buckets:
                    woken |= self._by_bucket.get(b, set())
        for w in woken:
            w.wake()

    def _connected(self, conn: psycopg.Connection[Any]) -> None:
        """After each (re)connection: anything may have been missed, wake everyone."""
        row = conn.execute(f"select head_op_id from {SCHEMA}.meta").fetchone()
        self._wake_all(int(row[0]) if row else 0)

    def _wake_all(self, head: int) -> None:
        with self._lock:
            self.head = max(self.head, head)
            self._floor = self.head
            self._history.clear()
            woken = set(self._any).union(*self._by_bucket.values())
        for w in woken:
            w.wake()


def _payload(head: int, buckets: Sequence[str]) -> str:
    text = "\n".join([str(head), *buckets])
    return text if len(text.encode("utf-8")) <= _NOTIFY_MAX else f"{head}\n*"


def _parse_payload(payload: str) -> tuple[int, frozenset[str] | None]:
    head, _, rest = payload.partition("\n")
    if rest == "*":
        return int(head), None
    return int(head), frozenset(rest.split("\n")) if rest else frozenset()


# --------------------------------------------------------------------------- the store


@dataclasses.dataclass
class ConnectionPool:
    """A small pool of connections (thread-safe): the bucket store's reads and the journal
    tables (relay.upstream.journal_api) use it."""

    connect: Callable[[], psycopg.Connection[Any]]
    size: int
    idle: queue.LifoQueue[psycopg.Connection[Any]] = dataclasses.field(
        default_factory=queue.LifoQueue
    )
    closed: bool = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            conn = self.idle.get_nowait()
        except queue.Empty:
            conn = self.connect()
        ok = False
        try:
            yield conn
            ok = True
        finally:
            if ok and not self.closed and not conn.closed and self.idle.qsize() < self.size:
                self.idle.put(conn)
            else:
                conn.close()

    def close(self) -> None:
        self.closed = True
        while True:
            try:
                self.idle.get_nowait().close()
            except queue.Empty:
                return


class PgBucketStore:
    """:class:`relay.downstream.bucket_store.BucketStore` in PostgreSQL.  See the module docstring.

    ``group`` names the consumer whose progress :meth:`apply` records and whose leadership
    lock :meth:`acquire_leadership` takes.  Connections are opened lazily: a writer
    connection (used by :meth:`apply`, :meth:`compact` and leadership, serialized by a
    lock), up to ``read_pool_size`` idle read connections, and one listener connection
    once someone waits for changes.
    """

    def __init__(
        self,
        dsn: str,
        *,
        group: str = "fieldsync-relay",
        password: str | None = None,
        read_pool_size: int = 8,
        connect_timeout: float = 10.0,
    ) -> None:
        self.dsn = dsn
        self.group = group
        self._kw: dict[str, Any] = {"connect_timeout": max(1, int(connect_timeout))}
        if password:
            self._kw["password"] = password
        self._wlock = threading.RLock()
        self._writer: psycopg.Connection[Any] | None = None
        self._leader = False
        self._pool = ConnectionPool(lambda: self._connect(autocommit=False), read_pool_size)
        self._listener = _Listener(lambda: self._connect(autocommit=True))

    # ---- connections

    def _connect(self, autocommit: bool) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.dsn, autocommit=autocommit, **self._kw)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to the bucket store: {exc}") from exc

    def _writer_conn(self) -> psycopg.Connection[Any]:
        if self._writer is not None and self._writer.closed:
            self._writer = None
            if self._leader:
                self._leader = False
                raise LeadershipLost("the bucket store's writer connection was closed")
        if self._writer is None:
            self._writer = self._connect(autocommit=True)
            self._writer.execute(
                "create temp table if not exists trunc_stage "
                "(bucket text, row_key text, term numeric) on commit delete rows"
            )
        return self._writer

    @contextlib.contextmanager
    def _write_txn(self) -> Iterator[psycopg.Connection[Any]]:
        with self._wlock:
            conn = self._writer_conn()
            try:
                with conn.transaction():
                    yield conn
            except psycopg.OperationalError as exc:
                lost = self._leader or conn.closed
                if conn.closed:
                    self._writer = None
                if self._leader and conn.closed:
                    self._leader = False
                    raise LeadershipLost(f"bucket store connection lost: {exc}") from exc
                if lost:
                    raise StoreError(f"bucket store connection lost: {exc}") from exc
                raise StoreError(f"bucket store write failed: {exc}") from exc
            except psycopg.Error as exc:
                raise StoreError(f"bucket store write failed: {exc}") from exc

    # ---- schema

    def migrate(self) -> int:
        """Create the schema and apply every migration not yet applied (idempotent, safe
        to run from several processes at once).  Returns the schema version."""
        with self._wlock:
            conn = self._writer_conn()
            try:
                conn.execute("select pg_advisory_lock(%s, %s)", MIGRATE_LOCK)
                try:
                    return self._migrate(conn)
                finally:
                    conn.execute("select pg_advisory_unlock(%s, %s)", MIGRATE_LOCK)
            except psycopg.Error as exc:
                raise StoreError(f"migrating the bucket store failed: {exc}") from exc

    def _migrate(self, conn: psycopg.Connection[Any]) -> int:
        with conn.transaction():
            conn.execute(f"create schema if not exists {SCHEMA}")
            conn.execute(
                f"create table if not exists {SCHEMA}.schema_migrations ("
                "version int primary key, description text not null, "
                "applied_at timestamptz not null default now())"
            )
        row = conn.execute(
            f"select coalesce(max(version), 0) from {SCHEMA}.schema_migrations"
        ).fetchone()
        current = int(row[0]) if row else 0
        known = MIGRATIONS[-1][0]
        if current > known:
            raise StoreError(
                f"bucket store schema {SCHEMA} is at version {current}, newer than this "
                f"relay knows ({known}); upgrade the relay"
            )
        for version, description, sql in MIGRATIONS:
            if version <= current:
                continue
            with conn.transaction():
                conn.execute(sql)
                conn.execute(
                    f"insert into {SCHEMA}.schema_migrations (version, description) values (%s, %s)",
                    (version, description),
                )
            log.info("bucket store: applied migration %d (%s)", version, description)
            current = version
        return current

    # ---- leadership

    def acquire_leadership(self) -> bool:
        """Try to become the one engine of ``group`` (non-blocking); True when held."""
        with self._wlock:
            if self._leader and self._writer is not None and not self._writer.closed:
                return True
            conn = self._writer_conn()
            try:
                row = conn.execute(
                    "select pg_try_advisory_lock(%s, %s)", _group_lock(self.group)
                ).fetchone()
            except psycopg.Error as exc:
                self._writer = None if conn.closed else self._writer
                raise StoreError(f"cannot take the engine lock: {exc}") from exc
            self._leader = bool(row and row[0])
            return self._leader

    def release_leadership(self) -> None:
        with self._wlock:
            if self._leader and self._writer is not None and not self._writer.closed:
                with contextlib.suppress(psycopg.Error):
                    self._writer.execute(
                        "select pg_advisory_unlock(%s, %s)", _group_lock(self.group)
                    )
            self._leader = False

    @property
    def is_leader(self) -> bool:
        return self._leader

    # ---- writing

    def apply(
        self,
        rules: Rules,
        changes: Sequence[RowChange],
        offsets: Mapping[tuple[str, int], PartitionProgress] | None = None,
    ) -> ApplyResult:
        with self._write_txn() as conn:
            conn.execute("select pg_advisory_xact_lock(%s, %s)", WRITE_LOCK)
            truncated = {
                t: (int(lsn), int(seq))
                for t, lsn, seq in conn.execute(
                    f"select tbl, truncated_lsn, truncated_seq from {SCHEMA}.table_state"
                ).fetchall()
            }
            acc = _Accumulator()
            segment: list[RowChange] = []
            for change in changes:
                if change.kind is ChangeKind.TRUNCATE:
                    if segment:
                        self._apply_segment(conn, rules, segment, truncated, acc)
                        segment = []
                    if change.table in rules.tables:
                        self._truncate(conn, change.table, change.position, truncated, acc)
                else:
                    segment.append(change)
            if segment:
                self._apply_segment(conn, rules, segment, truncated, acc)
            if offsets:
                self._save_progress(conn, offsets)
            if acc.ops:
                conn.execute(f"update {SCHEMA}.meta set head_op_id = %s", (acc.last_op_id,))
                conn.execute(
                    "select pg_notify(%s, %s)",
                    (NOTIFY_CHANNEL, _payload(acc.last_op_id, sorted(acc.buckets))),
                )
        for message in acc.errors:
            log.error("bucket engine: change skipped: %s", message)
        return ApplyResult(
            changes=len(changes),
            skipped_duplicates=acc.duplicates,
            skipped_errors=len(acc.errors),
            ops=acc.ops,
            first_op_id=acc.first_op_id,
            last_op_id=acc.last_op_id,
            buckets=frozenset(acc.buckets),
        )

    def _allocate(self, conn: psycopg.Connection[Any], n: int) -> int:
        """Reserve ``n`` consecutive op ids (caller holds WRITE_LOCK); returns the first."""
        row = conn.execute(
            f"select nextval('{SCHEMA}.op_id_seq'), setval('{SCHEMA}.op_id_seq', "
            f"currval('{SCHEMA}.op_id_seq') + %s - 1)",
            (n,),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def _load_states(
        self, conn: psycopg.Connection[Any], refs: set[RowRef]
    ) -> dict[RowRef, RowState]:
        if not refs:
            return {}
        tables, keys = zip(*refs, strict=True)
        rows = conn.execute(
            f"select s.tbl, s.row_key, s.entries, s.commit_lsn, s.seq "
            f"from unnest({_T}, {_T}) as r(tbl, row_key) "
            f"join {SCHEMA}.row_state s on s.tbl = r.tbl and s.row_key = r.row_key",
            (_texts(tables), _texts(keys)),
        ).fetchall()
        loads = orjson.loads
        new = tuple.__new__
        return {
            (t, k): RowState(tuple([new(BucketEntry, e) for e in loads(entries)]), (lsn, seq))
            for t, k, entries, lsn, seq in rows
        }

    def _load_data(
        self,
        conn: psycopg.Connection[Any],
        rules: Rules,
        changes: Sequence[RowChange],
        states: Mapping[RowRef, RowState],
    ) -> dict[RowRef, dict[str, Any]]:
        """Last stored data of rows whose change lacks unchanged-TOAST values."""
        wanted: list[tuple[str, int, RowRef]] = []
        for c in changes:
            if not c.unchanged or c.before is not None or c.key is None:
                continue
            for key in (c.key, c.old_key):
                if key is None:
                    continue
                ref = (c.table, row_key_text(key))
                state = states.get(ref)
                for e in state.entries if state else ():
                    wanted.append((e.bucket, e.op_id, ref))
        if not wanted:
            return {}
        rows = conn.execute(
            f"select o.bucket, o.op_id, o.data from unnest({_T}, {_I}) "
            f"as w(bucket, op_id) join {SCHEMA}.ops o using (bucket, op_id) "
            f"where o.data is not null",
            (_texts([w[0] for w in wanted]), _ints([w[1] for w in wanted])),
        ).fetchall()
        by_op = {(b, int(i)): d for b, i, d in rows}
        out: dict[RowRef, dict[str, Any]] = {}
        for bucket, op_id, ref in wanted:
            text = by_op.get((bucket, op_id))
            if text is not None:
                out.setdefault(ref, {}).update(json.loads(text))
        return out

    def _apply_segment(
        self,
        conn: psycopg.Connection[Any],
        rules: Rules,
        changes: Sequence[RowChange],
        truncated: Mapping[str, Position],
        acc: _Accumulator,
    ) -> None:
        states = self._load_states(conn, lookup_refs(rules, changes))
        data = self._load_data(conn, rules, changes, states)
        plan = plan_changes(rules, changes, states, truncated, data)
        acc.duplicates += plan.duplicates
        acc.errors.extend(plan.errors)
        first = self._allocate(conn, len(plan.ops)) if plan.ops else 0
        if plan.ops:
            self._write_ops(conn, plan, first)
            counts = collections.Counter(op.bucket for op in plan.ops)
            self._write_buckets(conn, plan.deltas, counts, first)
            acc.add(first, first + len(plan.ops) - 1, plan.deltas)
        if plan.states:
            self._write_states(conn, plan.resolve(first))

    def _write_ops(self, conn: psycopg.Connection[Any], plan: Plan, first: int) -> None:
        with conn.cursor().copy(
            f"copy {SCHEMA}.ops (bucket, op_id, tbl, row_key, kind, data, commit_lsn, seq) "
            "from stdin"
        ) as copy:
            for i, op in enumerate(plan.ops):
                copy.write_row(
                    (
                        op.bucket,
                        first + i,
                        op.table,
                        op.row_key,
                        op.kind.value,
                        op.data_json,
                        op.position[0],
                        op.position[1],
                    )
                )

    def _write_buckets(
        self,
        conn: psycopg.Connection[Any],
        deltas: Mapping[str, BucketDelta],
        op_counts: Mapping[str, int],
        first: int,
    ) -> None:
        """Add a plan's net effect to its buckets' checkpoints (caller holds WRITE_LOCK).

        One statement: the deltas are added in SQL (the checksum as a wrapping 64-bit sum,
        both terms being u64 values stored as two's-complement bigints)."""
        names = sorted(deltas)
        last, counts, sums, logs = [], [], [], []
        for b in names:
            d = deltas[b]
            last.append(first + d.last_index)
            counts.append(d.count)
            sums.append(_i64(d.checksum))
            logs.append(op_counts.get(b, 0))
        conn.execute(
            f"insert into {SCHEMA}.buckets as b "
            "(bucket, last_op_id, row_count, checksum, log_count) "
            f"select * from unnest({_T}, {_I}, {_I}, {_I}, {_I}) "
            "on conflict (bucket) do update set last_op_id = excluded.last_op_id, "
            "row_count = b.row_count + excluded.row_count, "
            f"checksum = {_WRAP_SUM.format('b.checksum', 'excluded.checksum')}, "
            "log_count = b.log_count + excluded.log_count",
            (_texts(names), _ints(last), _ints(counts), _ints(sums), _ints(logs)),
        )

    def _write_states(
        self, conn: psycopg.Connection[Any], states: Mapping[RowRef, RowState]
    ) -> None:
        tables, keys, entries, lsns, seqs = [], [], [], [], []
        dumps = orjson.dumps
        for (t, k), s in states.items():
            tables.append(t)
            keys.append(k)
            entries.append(dumps([[e.bucket, e.op_id, e.checksum] for e in s.entries]).decode())
            lsns.append(s.position[0])
            seqs.append(s.position[1])
        conn.execute(
            f"insert into {SCHEMA}.row_state as s (tbl, row_key, entries, commit_lsn, seq) "
            f"select * from unnest({_T}, {_T}, {_T}, {_I}, {_I}) "
            "on conflict (tbl, row_key) do update set entries = excluded.entries, "
            "commit_lsn = excluded.commit_lsn, seq = excluded.seq",
            (_texts(tables), _texts(keys), _texts(entries), _ints(lsns), _ints(seqs)),
        )

    def _truncate(
        self,
        conn: psycopg.Connection[Any],
        table: str,
        position: Position,
        truncated: dict[str, Position],
        acc: _Accumulator,
    ) -> None:
        if position <= truncated.get(table, (-1, -1)):
            acc.duplicates += 1
            return
        lsn, seq = position
        conn.execute("truncate trunc_stage")
        conn.execute(
            f"with gone as (delete from {SCHEMA}.row_state where tbl = %s "
            "and (commit_lsn, seq) < (%s, %s) returning row_key, entries) "
            "insert into trunc_stage select e ->> 0, gone.row_key, (e ->> 2)::numeric "
            "from gone cross join lateral jsonb_array_elements(gone.entries::jsonb) e",
            (table, lsn, seq),
        )
        per_bucket = conn.execute(
            'select bucket, count(*), sum(term) from trunc_stage group by bucket order by bucket collate "C"'
        ).fetchall()
        total = sum(int(n) for _, n, _ in per_bucket)
        if total:
            first = self._allocate(conn, total)
            conn.execute(
                f"insert into {SCHEMA}.ops (bucket, op_id, tbl, row_key, kind, data, commit_lsn, seq) "
                f'select bucket, %s + row_number() over (order by bucket collate "C", row_key collate "C") - 1, '
                "%s, row_key, 'REMOVE', null, %s, %s from trunc_stage",
                (first, table, lsn, seq),
            )
            deltas: dict[str, BucketDelta] = {}
            index = -1
            for bucket, n, term_sum in per_bucket:
                index += int(n)
                deltas[str(bucket)] = BucketDelta(
                    count=-int(n), checksum=(-int(term_sum)) % CHECKSUM_MODULUS, last_index=index
                )
            self._write_buckets(conn, deltas, {b: -d.count for b, d in deltas.items()}, first)
            acc.add(first, first + total - 1, deltas)
        conn.execute(
            f"insert into {SCHEMA}.table_state (tbl, truncated_lsn, truncated_seq) "
            "values (%s, %s, %s) on conflict (tbl) do update set "
            "truncated_lsn = excluded.truncated_lsn, truncated_seq = excluded.truncated_seq",
            (table, lsn, seq),
        )
        truncated[table] = position

    def _save_progress(
        self, conn: psycopg.Connection[Any], offsets: Mapping[tuple[str, int], PartitionProgress]
    ) -> None:
        items = sorted(offsets.items())
        conn.execute(
            f"insert into {SCHEMA}.consumer_progress as p "
            "(grp, topic, part, next_offset, commit_lsn, seq) "
            "select %s, * from unnest(%s::text[], %s::int[], %s::bigint[], %s::bigint[], %s::bigint[]) "
            "on conflict (grp, topic, part) do update set next_offset = excluded.next_offset, "
            "commit_lsn = greatest(p.commit_lsn, excluded.commit_lsn), "
            "seq = case when (excluded.commit_lsn, excluded.seq) > (p.commit_lsn, p.seq) "
            "then excluded.seq else p.seq end",
            (
                self.group,
                [t for (t, _), _ in items],
                [p for (_, p), _ in items],
                [v.next_offset for _, v in items],
                [v.position[0] for _, v in items],
                [v.position[1] for _, v in items],
            ),
        )

    def load_offsets(self) -> dict[tuple[str, int], PartitionProgress]:
        with self._pool.connection() as conn, conn.transaction():
            rows = conn.execute(
                f"select topic, part, next_offset, commit_lsn, seq from {SCHEMA}.consumer_progress "
                "where grp = %s",
                (self.group,),
            ).fetchall()
        return {
            (str(t), int(p)): PartitionProgress(int(o), (int(lsn), int(seq)))
            for t, p, o, lsn, seq in rows
        }

    # ---- reading

    def bucket_state(self, buckets: Sequence[str]) -> dict[str, BucketCheckpoint]:
        with self._read_txn() as conn:
            return self._checkpoints(conn, buckets)

    async def bucket_state_async(self, buckets: Sequence[str]) -> dict[str, BucketCheckpoint]:
        return await asyncio.to_thread(self.bucket_state, buckets)

    @contextlib.contextmanager
    def _read_txn(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn:
                with conn.transaction():
                    conn.execute("set transaction isolation level repeatable read, read only")
                    yield conn
        except psycopg.Error as exc:
            raise StoreError(f"reading the bucket store failed: {exc}") from exc

    def _checkpoints(
        self, conn: psycopg.Connection[Any], buckets: Sequence[str]
    ) -> dict[str, BucketCheckpoint]:
        names = list(dict.fromkeys(buckets))
        rows = conn.execute(
            f"select bucket, last_op_id, row_count, checksum, compacted_below, epoch "
            f"from {SCHEMA}.buckets "
            "where bucket = any(%s)",
            (names,),
        ).fetchall()
        found = {
            str(b): BucketCheckpoint(str(b), int(last), int(n), _u64(int(c)), int(cb), int(e))
            for b, last, n, c, cb, e in rows
        }
        return {b: found.get(b) or BucketCheckpoint(b, 0, 0, 0, 0) for b in names}

    def read_ops(
        self,
        bucket_cursors: Mapping[str, int],
        limit: int,
        epochs: Mapping[str, int] | None = None,
    ) -> OpsPage:
        if limit < 1:
            raise ValueError(f"read_ops: limit must be >= 1, got {limit}")
        with self._read_txn() as conn:
            checkpoints = self._checkpoints(conn, list(bucket_cursors))
            row = conn.execute(f"select head_op_id from {SCHEMA}.meta").fetchone()
            head = int(row[0]) if row else 0
            resync = frozenset(
                b
                for b, cp in checkpoints.items()
                if cp.needs_resync(bucket_cursors[b], (epochs or {}).get(b))
            )
            todo = [
                (b, bucket_cursors[b])
                for b, cp in checkpoints.items()
                if b not in resync and bucket_cursors[b] < cp.last_op_id
            ]
            rows = []
            if todo:
                rows = conn.execute(
                    "select o.bucket, o.op_id, o.tbl, o.row_key, o.kind, o.data, o.commit_lsn, o.seq "
                    "from unnest(%s::text[], %s::bigint[]) as c(bucket, cursor) "
                    f"cross join lateral (select * from {SCHEMA}.ops o where o.bucket = c.bucket "
                    "and o.op_id > c.cursor order by o.op_id limit %s) o "
                    "order by o.op_id limit %s",
                    ([b for b, _ in todo], [c for _, c in todo], limit, limit),
                ).fetchall()
        ops = tuple(
            Op(int(i), str(b), str(t), str(k), OpKind(kind), d, (int(lsn), int(seq)))
            for b, i, t, k, kind, d, lsn, seq in rows
        )
        full = len(ops) < limit
        upto = ops[-1].op_id if ops else 0
        cursors: dict[str, int] = {}
        for b, cp in checkpoints.items():
            if b in resync:
                cursors[b] = 0
            elif full:
                cursors[b] = max(bucket_cursors[b], cp.last_op_id)
            else:
                cursors[b] = max(bucket_cursors[b], min(upto, cp.last_op_id))
        has_more = any(
            cursors[b] < cp.last_op_id for b, cp in checkpoints.items() if b not in resync
        )
        page_epochs = {b: cp.epoch for b, cp in checkpoints.items()}
        return OpsPage(ops, checkpoints, cursors, resync, has_more, head, page_epochs)

    async def read_ops_async(
        self,
        bucket_cursors: Mapping[str, int],
        limit: int,
        epochs: Mapping[str, int] | None = None,
    ) -> OpsPage:
        return await asyncio.to_thread(self.read_ops, bucket_cursors, limit, epochs)

    # ---- waiting

    def wait_for_change(
        self, buckets: Sequence[str] | None, since_op_id: int, timeout: float
    ) -> int:
        self._listener.start()
        waiter = _Waiter(frozenset(buckets) if buckets is not None else None)
        self._listener.register(waiter, since_op_id)
        try:
            assert waiter.event is not None
            waiter.event.wait(max(0.0, timeout))
        finally:
            self._listener.unregister(waiter)
        return self._listener.head

    async def wait_for_change_async(
        self, buckets: Sequence[str] | None, since_op_id: int, timeout: float
    ) -> int:
        if not self._listener.ready:
            await asyncio.to_thread(self._listener.start)
        waiter = _Waiter(
            frozenset(buckets) if buckets is not None else None, asyncio.get_running_loop()
        )
        self._listener.register(waiter, since_op_id)
        try:
            assert waiter.future is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter.future), max(0.0, timeout))
        finally:
            self._listener.unregister(waiter)
        return self._listener.head

    # ---- maintenance

    def compact(
        self, bucket: str | None = None, drop_removes_below: int | None = None
    ) -> CompactResult:
        """See :meth:`relay.downstream.bucket_store.BucketStore.compact`.  Without ``bucket``, every
        bucket whose log holds more ops than rows (or old REMOVEs to drop) is compacted,
        one bucket per transaction."""
        if bucket is not None:
            names = [bucket]
        else:
            with self._read_txn() as conn:
                names = [
                    str(r[0])
                    for r in conn.execute(
                        f"select bucket from {SCHEMA}.buckets where log_count > row_count "
                        "order by bucket"
                    ).fetchall()
                ]
        deleted = dropped = touched = 0
        below = drop_removes_below if drop_removes_below is not None else 0
        for name in names:
            d, r = self._compact_bucket(name, below)
            deleted += d
            dropped += r
            touched += 1 if d or r else 0
        return CompactResult(deleted, dropped, touched)

    def _compact_bucket(self, bucket: str, below: int) -> tuple[int, int]:
        with self._write_txn() as conn:
            rows = conn.execute(
                f"with ranked as (select op_id, kind, row_number() over "
                f"(partition by tbl, row_key order by op_id desc) as rn "
                f"from {SCHEMA}.ops where bucket = %s) "
                f"delete from {SCHEMA}.ops o using ranked r "
                "where o.bucket = %s and o.op_id = r.op_id "
                "and (r.rn > 1 or (r.kind = 'REMOVE' and r.op_id < %s)) "
                "returning r.rn = 1 as dropped_remove, o.op_id",
                (bucket, bucket, below),
            ).fetchall()
            if not rows:
                return 0, 0
            dropped = [int(i) for is_remove, i in rows if is_remove]
            conn.execute(
                f"update {SCHEMA}.buckets set log_count = log_count - %s, "
                "compacted_below = greatest(compacted_below, %s), "
                "epoch = epoch + (case when %s then 1 else 0 end) where bucket = %s",
                (len(rows), max(dropped, default=0), bool(dropped), bucket),
            )
        return len(rows) - len(dropped), len(dropped)

    def purge_tombstones(self, below: Position) -> int:
        """Forget tombstone row states older than ``below`` (the engine passes a position
        no event still to come can precede); returns how many were dropped."""
        with self._write_txn() as conn:
            cur = conn.execute(
                f"delete from {SCHEMA}.row_state where entries = '[]' and (commit_lsn, seq) < (%s, %s)",
                below,
            )
            return cur.rowcount

    def stats(self) -> dict[str, int]:
        """Totals for monitoring: buckets, rows, ops in the logs, row states, head op id."""
        with self._read_txn() as conn:
            row = conn.execute(
                f"select (select count(*) from {SCHEMA}.buckets), "
                f"(select coalesce(sum(row_count), 0) from {SCHEMA}.buckets), "
                f"(select coalesce(sum(log_count), 0) from {SCHEMA}.buckets), "
                f"(select count(*) from {SCHEMA}.row_state), "
                f"(select head_op_id from {SCHEMA}.meta)"
            ).fetchone()
        assert row is not None
        keys = ("buckets", "rows", "ops", "row_states", "head_op_id")
        return {k: int(v) for k, v in zip(keys, row, strict=True)}

    def close(self) -> None:
        self._listener.stop()
        self._pool.close()
        self.release_leadership()
        with self._wlock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._leader = False

    def __enter__(self) -> PgBucketStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class _Accumulator:
    """Totals of one apply over its segments."""

    ops: int = 0
    first_op_id: int = 0
    last_op_id: int = 0
    duplicates: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    buckets: set[str] = dataclasses.field(default_factory=set)

    def add(self, first: int, last: int, deltas: Mapping[str, BucketDelta]) -> None:
        self.ops += last - first + 1
        self.first_op_id = self.first_op_id or first
        self.last_op_id = last
        self.buckets.update(deltas)
