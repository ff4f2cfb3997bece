"""The bucket store in PostgreSQL (schema ``fieldsync_relay`` in the relay's own database).

:class:`PgBucketStore` owns the connections, the engine's leadership and the wake-ups; its
tables, migrations and locks are relay/downstream/pg_store_schema.py, its write path
relay/downstream/pg_store_writes.py and its read path relay/downstream/pg_store_reads.py.
Its calls are timed into ``fieldsync_relay_store_seconds{operation}`` (relay/metrics.py).

Why the store must be its own database: logical decoding is per database, and the relay's
writes must never feed back into the change stream.

Concurrency model
-----------------
- **Op ids become visible in order.**  Every writing transaction (:meth:`PgBucketStore.apply`)
  takes the transaction-level advisory lock
  :data:`relay.downstream.pg_store_schema.WRITE_LOCK` before it writes (planning may come
  first, checked again under the lock: relay/downstream/pg_store_writes.py), allocates its
  op ids from the sequence while holding it, and holds it until after its commit is visible
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
  store object (relay/downstream/store_wakeups.py) serves all sync and asyncio waiters;
  a waiter is woken only for its buckets.
  Spurious wake-ups happen (after a reconnect of the listener, or when the bucket list was
  too long) and are harmless: the caller re-reads.
- **One engine per share at a time.**  :meth:`~PgBucketStore.acquire_leadership` takes a
  session-level advisory lock keyed by the consumer group and the share (the engine's slice
  of the partitions, relay/downstream/bucket_engine.py) on the writer connection; the
  engine applies only while it holds it, on that same connection, so a process that lost
  its connection (and with it the lock) cannot write: it must acquire leadership again (and
  reload its offsets).  The engines of different shares write through WRITE_LOCK like any
  writers; the store tolerates their partitions being applied out of step (see Dedup).
- **Compaction** runs per bucket in its own transaction and deletes only ops that are not
  the latest of their row (and, when asked, old REMOVEs); it never changes counts or
  checksums and needs no global lock.

Dedup: a change at or below its row's remembered position, or at or below its table's last
truncate, changes nothing (see :func:`relay.downstream.planner.plan_changes`).  Rows that were in
a bucket keep a tombstone state after a delete or key change, so late or re-delivered older
events of that key stay ignored; :meth:`~PgBucketStore.purge_tombstones` drops tombstones
older than a position the engine knows no event can precede any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import psycopg

from relay.downstream import pg_store_reads, pg_store_writes
from relay.downstream.bucket_store import (
    ApplyResult,
    BucketCheckpoint,
    CompactResult,
    OpsPage,
    PageRequest,
    PartitionProgress,
    Position,
    RowChange,
)
from relay.downstream.pg_store_schema import (
    MIGRATE_LOCK,
    bind_placement,
    group_lock,
    migrate,
)
from relay.downstream.rules import Rules
from relay.downstream.store_wakeups import OpsListener, Waiter, settle
from relay.downstream.unchanged_fill import SourceRows
from relay.errors import LeadershipLost, StoreError
from relay.metrics import STORE_SECONDS, TOAST_FILLS

__all__ = ["ConnectionPool", "PgBucketStore"]

log = logging.getLogger(__name__)

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


_READ_TXN: Final = (
    "set transaction isolation level repeatable read, read only; "
    "set local enable_seqscan = off; set local enable_bitmapscan = off; set local jit = off"
)
"""Every read: one snapshot, and ops read in op-id order by the primary key's index scan
whatever the statistics say (a bucket holding most of the table must not turn a page of
5,000 ops into a scan and a sort).  No JIT: with sequential scans priced out, the one-row
``meta`` read looks costly enough for PostgreSQL to JIT-compile it (tens of milliseconds,
more than 100 with inlining, on every read)."""


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
        self._share = 0
        self._pool = ConnectionPool(lambda: self._connect(autocommit=False), read_pool_size)
        self._listener = OpsListener(lambda: self._connect(autocommit=True))

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
            pg_store_writes.prepare_writer(self._writer)
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
                    return migrate(conn)
                finally:
                    conn.execute("select pg_advisory_unlock(%s, %s)", MIGRATE_LOCK)
            except psycopg.Error as exc:
                raise StoreError(f"migrating the bucket store failed: {exc}") from exc

    def bind_rules(self, placement: str, source: str, topic_prefix: str) -> str:
        """Record or check the rules' placement: :func:`pg_store_schema.bind_placement`."""
        with self._write_txn() as conn:
            return bind_placement(conn, placement, source, topic_prefix)

    # ---- leadership

    def acquire_leadership(self, share: int = 0) -> bool:
        """Try to become the one engine of ``group``'s ``share`` (non-blocking); True when
        held.  A store leads at most one share: while it leads one, asking for another
        is False."""
        with self._wlock:
            if self._leader and self._writer is not None and not self._writer.closed:
                return self._share == share
            conn = self._writer_conn()
            try:
                row = conn.execute(
                    "select pg_try_advisory_lock(%s, %s)", group_lock(self.group, share)
                ).fetchone()
            except psycopg.Error as exc:
                self._writer = None if conn.closed else self._writer
                raise StoreError(f"cannot take the engine lock of share {share}: {exc}") from exc
            self._leader = bool(row and row[0])
            self._share = share
            return self._leader

    def release_leadership(self) -> None:
        with self._wlock:
            if self._leader and self._writer is not None and not self._writer.closed:
                with contextlib.suppress(psycopg.Error):
                    self._writer.execute(
                        "select pg_advisory_unlock(%s, %s)", group_lock(self.group, self._share)
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
        source: SourceRows | None = None,
    ) -> ApplyResult:
        with STORE_SECONDS.labels("apply").time(), self._write_txn() as conn:
            result, errors, locked = pg_store_writes.apply_changes(
                conn, self.group, rules, changes, offsets, source
            )
        result = dataclasses.replace(result, locked_s=time.perf_counter() - locked)
        _report(result, errors)
        return result

    def load_offsets(self) -> dict[tuple[str, int], PartitionProgress]:
        with (
            STORE_SECONDS.labels("load_offsets").time(),
            self._pool.connection() as conn,
            conn.transaction(),
        ):
            return pg_store_reads.load_offsets(conn, self.group)

    # ---- reading

    def bucket_state(self, buckets: Sequence[str]) -> dict[str, BucketCheckpoint]:
        with STORE_SECONDS.labels("bucket_state").time(), self._read_txn() as conn:
            return pg_store_reads.checkpoints(conn, buckets)

    async def bucket_state_async(self, buckets: Sequence[str]) -> dict[str, BucketCheckpoint]:
        return await asyncio.to_thread(self.bucket_state, buckets)

    @contextlib.contextmanager
    def _read_txn(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn:
                with conn.transaction():
                    conn.execute(_READ_TXN)
                    yield conn
        except psycopg.Error as exc:
            raise StoreError(f"reading the bucket store failed: {exc}") from exc

    def read_ops(
        self,
        bucket_cursors: Mapping[str, int],
        limit: int,
        epochs: Mapping[str, int] | None = None,
    ) -> OpsPage:
        return self.read_pages([PageRequest(bucket_cursors, limit, epochs)])[0]

    async def read_ops_async(
        self,
        bucket_cursors: Mapping[str, int],
        limit: int,
        epochs: Mapping[str, int] | None = None,
    ) -> OpsPage:
        return await asyncio.to_thread(self.read_ops, bucket_cursors, limit, epochs)

    def read_pages(self, requests: Sequence[PageRequest]) -> list[OpsPage]:
        for req in requests:
            if req.limit < 1:
                raise ValueError(f"read_ops: limit must be >= 1, got {req.limit}")
        if not requests:
            return []
        with STORE_SECONDS.labels("read_ops").time(), self._read_txn() as conn:
            return pg_store_reads.read_pages(conn, requests)

    async def read_pages_async(self, requests: Sequence[PageRequest]) -> list[OpsPage]:
        return await asyncio.to_thread(self.read_pages, requests)

    # ---- waiting

    def wait_for_change(
        self, buckets: Sequence[str] | None, since_op_id: int, timeout: float
    ) -> int:
        self._listener.start()
        waiter = Waiter(frozenset(buckets) if buckets is not None else None)
        self._listener.register(waiter, since_op_id)
        try:
            assert waiter.event is not None
            waiter.event.wait(max(0.0, timeout))
        finally:
            self._listener.unregister(waiter)
        return self._listener.head

    async def wait_for_change_async(
        self,
        buckets: Sequence[str] | None,
        since_op_id: int,
        timeout: float,
        until: asyncio.Future[Any] | None = None,
    ) -> int:
        if not self._listener.ready:
            await asyncio.to_thread(self._listener.start)
        loop = asyncio.get_running_loop()
        waiter = Waiter(frozenset(buckets) if buckets is not None else None, loop)
        future = waiter.future
        assert future is not None
        # a timer and a done-callback instead of wait_for/shield/wait: one stream waiting
        # costs a future, a timer handle and its registration, nothing more
        timer = loop.call_later(max(0.0, timeout), settle, future)

        def on_until(_: object) -> None:
            settle(future)

        if until is not None:
            until.add_done_callback(on_until)
        self._listener.register(waiter, since_op_id)
        try:
            await future
        finally:
            timer.cancel()
            if until is not None:
                until.remove_done_callback(on_until)
            self._listener.unregister(waiter)
        return self._listener.head

    def waiting(self, bucket: str) -> int:
        """How many threads and coroutines of this process wait for a change of ``bucket``
        (for monitoring and tests)."""
        return self._listener.waiting(bucket)

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
                names = pg_store_reads.buckets_to_compact(conn)
        deleted = dropped = touched = 0
        below = drop_removes_below if drop_removes_below is not None else 0
        for name in names:
            with STORE_SECONDS.labels("compact").time(), self._write_txn() as conn:
                d, r = pg_store_writes.compact_bucket(conn, name, below)
            deleted += d
            dropped += r
            touched += 1 if d or r else 0
        return CompactResult(deleted, dropped, touched)

    def purge_tombstones(self, below: Position) -> int:
        """Forget tombstone row states older than ``below`` (the engine passes a position
        no event still to come can precede); returns how many were dropped."""
        with STORE_SECONDS.labels("purge_tombstones").time(), self._write_txn() as conn:
            return pg_store_writes.purge_tombstones(conn, below)

    def stats(self) -> dict[str, int]:
        """Totals for monitoring: buckets, rows, ops in the logs, row states, head op id."""
        with self._read_txn() as conn:
            return pg_store_reads.stats(conn)

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


def _report(result: ApplyResult, errors: Sequence[str]) -> None:
    """Log the changes an apply skipped, and count how it filled unchanged TOAST values."""
    for message in errors:
        log.error("bucket engine: change skipped: %s", message)
    for outcome, n in (
        ("source", result.source_filled),
        ("gone", result.source_gone),
        ("unfilled", result.unfilled),
    ):
        if n:
            TOAST_FILLS.labels(outcome).inc(n)
