"""Incremental re-snapshots in the daemon: the driver.  The protocol is
:mod:`cdc.incremental_snapshot`; the parts of the daemon's side are

- :mod:`cdc.resnapshot_stream` (pure): following the stream (watermarks, signal rows, keys
  of changes to the table being read, Relation messages) and putting a chunk's rows into it;
  the jobs' bookkeeping;
- :mod:`cdc.resnapshot_catalog`: catalog checks (DDL that needs a re-snapshot);
- :mod:`cdc.resnapshot_chunks`: reading a chunk between its low and high watermark;
- :mod:`cdc.resnapshot_requests`: the signal table and ``fieldsync cdc snapshot``;
- :mod:`cdc.resnapshot_state`: the progress record and recorded catalog in Kafka;
- :mod:`cdc.key_retirement_io`: a job whose table's key changed deletes the old keys first.

:class:`IncrementalSnapshots`, one per daemon session, ties them together.
:meth:`~IncrementalSnapshots.load` at start reads the progress and the last recorded catalog
back from Kafka and compares the catalog now with it; :meth:`~IncrementalSnapshots.tick`
(between stream reads) writes signal statuses, checks the catalog every
``cdc.ddl_check_interval_s`` and when a Relation message changed, turns signal rows into
jobs and, with no chunk in flight, reads the next chunk (or takes the next step of deleting
old keys, when given the stream's state); its :attr:`~IncrementalSnapshots.stream`
is the change assembler's observer and wraps the assembler's output
(:meth:`cdc.resnapshot_stream.ChunkTracker.emit`); :meth:`~IncrementalSnapshots.wrap` makes
every Kafka transaction that commits while the progress or the recorded catalog changed
carry them.  Requests from the signal table are in the progress record before the Kafka
transaction that holds the signal row's own event (and therefore before the slot can be
confirmed past it) commits.

Concurrency: everything runs on the daemon's one thread; the driver keeps one ordinary
PostgreSQL connection of its own.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Collection
from typing import Any, Final

import psycopg
from psycopg import sql

from cdc import pgoutput_messages as m
from cdc.change_assembler import topic_for
from cdc.ddl_detection import recorded_catalog_from_bytes, signatures_to_bytes
from cdc.errors import ReplicationLost, SinkError, SnapshotRequestError
from cdc.incremental_snapshot import ChunkWindow, Job, Progress
from cdc.kafka_sink import KafkaOptions, Sink
from cdc.key_retirement_io import Retirement, StreamState, take_step
from cdc.pg_catalog import PgCatalog
from cdc.pg_source import connect
from cdc.resnapshot_catalog import CatalogChecks
from cdc.resnapshot_chunks import read_between_watermarks
from cdc.resnapshot_requests import attach_signal_table, check_where, resolve_table, split_table
from cdc.resnapshot_state import (
    ProgressSink,
    catalog_key,
    progress_key,
    read_state_records,
    resnapshot_topic,
)
from cdc.resnapshot_stream import ChunkTracker, InFlightChunk, Jobs
from cdc.resume_position import ResumePosition
from cdc.settings import CdcSettings
from core.avro_envelope import TableCodec
from core.pg_types import ColumnSpec

__all__ = ["MAX_FAILURES", "IncrementalSnapshots"]

log = logging.getLogger("fieldsync.cdc")

MAX_FAILURES: Final = 3
"""Chunk reads of one job that may fail in a row before the job is given up (logged)."""


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
        self.prefix = settings.kafka.topic_prefix
        self.chunk_rows = settings.cdc.resnapshot_chunk_rows
        signal_name = split_table(self.pg.signal_table) if self.pg.signal_table else None
        self.jobs = Jobs(signals=signal_name is not None)
        self.stream = ChunkTracker(self.jobs, db=db, signal_name=signal_name, clock_us=clock_us)
        self.checks = CatalogChecks(settings, self.jobs, self.stream, self._connection)
        self._conn: psycopg.Connection[Any] | None = None
        self._codecs: dict[tuple[Any, ...], TableCodec] = {}
        self.retirement: Retirement | None = None  # set up by load()
        self._session = secrets.token_hex(4)
        self._chunks_made = 0
        self._failures = 0

    @property
    def progress(self) -> Progress:
        return self.jobs.progress

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

    def load(
        self,
        opts: KafkaOptions,
        *,
        initial_snapshot: bool,
        timeout_s: float = 30.0,
        republished: Collection[str] = (),
    ) -> None:
        """Read the progress and the recorded catalog back; set up the signal table; compare
        the catalog with what was recorded (a first start, or one that takes an initial
        snapshot, records it: the snapshot covers every change before).  ``republished``:
        listed tables the start just added back to the publication."""
        slot = self.pg.slot
        self.retirement = Retirement(opts, self.db, self._codec, timeout_s)
        records = read_state_records(opts, [progress_key(slot), catalog_key(slot)], timeout_s)
        if progress_key(slot) in records:
            try:
                self.jobs.progress = Progress.from_bytes(records[progress_key(slot)])
            except (ValueError, KeyError, TypeError) as exc:
                raise SinkError(
                    f"the re-snapshot progress of slot {slot} (key {slot}.resnapshot of "
                    f"{resnapshot_topic(self.prefix)}) cannot be read: {exc}. Fix: write a "
                    "tombstone (null value) for that key; queued re-snapshots are then forgotten"
                ) from exc
        self.stream.signal_seen = (self.progress.signal_lsn, self.progress.signal_id)
        if catalog_key(slot) in records and not initial_snapshot:
            try:
                recorded = recorded_catalog_from_bytes(records[catalog_key(slot)])
                self.checks.signatures, self.checks.unpublished = recorded
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("the recorded catalog cannot be read (%s): recording it again", exc)
        if initial_snapshot and self.progress.jobs:
            log.info(
                "the initial snapshot covers %d queued re-snapshot(s)", len(self.progress.jobs)
            )
            for job in self.progress.jobs:
                self.jobs.status(job.signal_id, "done: covered by the initial snapshot")
            self.progress.jobs.clear()
            self.jobs.dirty = True
        conn = self._connection()
        if self.stream.signal_name is not None:
            self.stream.signal_oid = attach_signal_table(
                conn, self.pg.signal_table, self.pg.publication
            )
        for job in self.progress.jobs:
            log.info(
                "re-snapshot of %s (%s) %s",
                job.table,
                job.reason,
                f"resumes after key {list(job.after)}" if job.after else "starts",
            )
        self.checks.check(republished)

    def persist(self, sink: Sink, resume: ResumePosition | None) -> None:
        """Commit changed state records now (in a Kafka transaction of their own, repeating
        the current resume position), so a DDL found at start is not forgotten by a daemon
        killed before its first batch."""
        if not (self.jobs.dirty or self.checks.dirty):
            return
        sink.begin()
        sink.commit(resume if resume is not None else ResumePosition(0, -1, True))

    def dirty_records(self) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        if self.jobs.dirty:
            self.progress.signal_lsn, self.progress.signal_id = self.stream.signal_seen
            out[progress_key(self.pg.slot)] = self.progress.to_bytes()
        if self.checks.dirty and self.checks.signatures is not None:
            out[catalog_key(self.pg.slot)] = signatures_to_bytes(
                self.checks.signatures, self.checks.unpublished
            )
        return out

    def records_written(self) -> None:
        self.jobs.dirty = self.checks.dirty = False

    def _write_statuses(self) -> None:
        signal_name = self.stream.signal_name
        statuses = self.jobs.take_statuses()
        if not statuses or signal_name is None:
            return
        try:
            conn = self._connection()
            for signal_id, status in statuses:
                conn.execute(
                    sql.SQL("update {} set status = %s, status_at = now() where id = %s").format(
                        sql.Identifier(*signal_name)
                    ),
                    (status, signal_id),
                )
        except psycopg.Error as exc:
            log.warning("cannot record the status of re-snapshot signals: %s", str(exc).strip())

    # ------------------------------------------------------------------ between reads

    def tick(self, stream: StreamState | None = None) -> None:
        """Catalog checks, signal requests and the next chunk; call between stream reads
        (with the stream's state when no transaction is half read: a job retiring old keys
        goes on only then)."""
        self._write_statuses()
        if self.checks.due():
            self.checks.check()
        if self.progress.requests:
            self._take_requests()
        if self.stream.chunk is None and self.progress.jobs:
            job = self.progress.jobs[0]
            if not job.retiring:
                self._next_chunk(job)
            elif stream is not None and self.retirement is not None:
                self._retire(job, self.retirement, stream)

    def _retire(self, job: Job, retirement: Retirement, stream: StreamState) -> None:
        """The next step of retiring the old keys of ``job``'s table (cdc/key_retirement_io.py)."""
        self._chunks_made += 1
        chunk_id = f"{self._session}-{self._chunks_made}"
        generation = self.jobs.generations.get(job.oid, 0)
        try:
            step = retirement.step(self._connection(), job, stream, chunk_id, generation)
        except psycopg.OperationalError as exc:
            raise ReplicationLost(f"re-snapshot of {job.table}: {exc}") from exc
        except psycopg.Error as exc:
            self._read_failed(job, exc)
            return
        if step is not None:
            take_step(step, job, self.jobs, self.stream)

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
                if oid == self.stream.signal_oid:
                    raise SnapshotRequestError("the signal table itself is not re-read")
            except psycopg.OperationalError as exc:
                raise ReplicationLost(f"checking re-snapshot signals failed: {exc}") from exc
            except (SnapshotRequestError, psycopg.Error) as exc:
                reason = str(exc).strip() or type(exc).__name__
                log.warning("re-snapshot signal %d rejected: %s", request.signal_id, reason)
                self.jobs.status(request.signal_id, f"rejected: {reason}")
                continue
            self.jobs.queue(
                Job(
                    oid,
                    qualified,
                    f"signal {request.signal_id}",
                    where,
                    signal_id=request.signal_id,
                )
            )
            self.jobs.status(request.signal_id, "accepted")
        self.progress.requests.clear()
        self.jobs.dirty = True

    def _next_chunk(self, job: Job) -> None:
        """Read the job's next chunk between two watermarks and register its window (or
        end the job, or leave it for the next tick to try again)."""
        self._chunks_made += 1
        chunk_id = f"{self._session}-{self._chunks_made}"
        generation = self.jobs.generations.get(job.oid, 0)
        try:
            read = read_between_watermarks(self._connection(), job, chunk_id, self.chunk_rows)
        except psycopg.OperationalError as exc:
            raise ReplicationLost(f"re-snapshot of {job.table}: {exc}") from exc
        except psycopg.Error as exc:
            self._read_failed(job, exc)
            return
        self._failures = 0
        if isinstance(read, str):
            log.warning("re-snapshot of %s ends: %s", job.table, read, extra={"table": job.table})
            self.jobs.finish(job, read)
            return
        window = ChunkWindow(chunk_id, read.rows, read.visibility)
        unseen = window.registered_after(self.stream.recent)
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
            self.jobs.done(job)
            return
        self.stream.chunk = InFlightChunk(
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
                extra={"table": job.table},
            )
            self._failures = 0
            self.jobs.finish(job, f"failed: {reason}")
            return
        log.warning(
            "re-snapshot of %s: reading a chunk failed (%s); it starts over", job.table, reason
        )
        job.after = None
        self.jobs.dirty = True

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
