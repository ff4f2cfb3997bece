"""The re-snapshots' side of the replication stream: following it, and putting a chunk's
rows into it (pure, no I/O).

:class:`ChunkTracker` is the change assembler's observer (every message inside a
transaction, in commit order): it follows the watermarks of the chunk in flight, the keys
of the changes to its table (:class:`cdc.incremental_snapshot.ChunkWindow`), the rows of the
signal table (operators' requests) and Relation messages (a table whose columns or key
columns changed is checked against the catalog at the next tick).  :meth:`ChunkTracker.emit`
wraps the assembler's output and puts a chunk's remaining rows, as op ``r`` events, before
the end of its high watermark's transaction; then the job moves on.  A chunk that carries a
:class:`~cdc.key_retirement.RetireSet` holds key texts instead of rows (the changes' keys
are mapped to key texts) and puts delete events of old keys there instead
(:mod:`cdc.key_retirement`).

:class:`Jobs` is the bookkeeping both sides share: the :class:`~cdc.incremental_snapshot.Progress`
(persisted in Kafka when it changed, :mod:`cdc.resnapshot_state`), a generation per table
(a chunk read before its table was queued again is not counted), and the statuses to write
into the signal table.

Concurrency: used from the daemon's one thread; :meth:`ChunkTracker.message` is on the hot
path (a row change of no interest costs two comparisons).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from cdc import pgoutput_messages as m
from cdc.change_assembler import Out, OutEvent, OutSchema, TxnEnd, TxnInfo
from cdc.errors import format_lsn
from cdc.fault_points import FAULTS
from cdc.incremental_snapshot import (
    WATERMARK_PREFIX,
    ChunkWindow,
    Job,
    Key,
    Progress,
    SignalRequest,
    Watermark,
    WindowState,
    message_keys,
)
from cdc.key_retirement import KEYLESS_DONE, RETIRE_ORIGIN, RetireSet
from cdc.recovery_deletes import DeleteAt, delete_value
from cdc.relation_diff import compare_relations
from core.avro_envelope import POSITION_HEADER, Source, TableCodec, position_header

__all__ = ["INCREMENTAL", "RECENT_XIDS", "ChunkTracker", "InFlightChunk", "Jobs"]

log = logging.getLogger("fieldsync.cdc")

_CHANGES: Final = frozenset({m.Insert, m.Update, m.Delete})
RECENT_XIDS: Final = 1024
"""Transactions read from the stream that a new chunk's snapshot is checked against."""
INCREMENTAL: Final = "incremental"
"""``source.snapshot`` of re-snapshot rows."""


@dataclasses.dataclass
class InFlightChunk:
    """A chunk read between its watermarks, waiting for its high watermark's commit."""

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
    retire: RetireSet | None = None  # the old keys to delete (no rows to send)


class Jobs:
    """The progress, whether it changed since the last commit, generations, and the
    statuses waiting to be written into the signal table (kept only when there is one)."""

    def __init__(self, *, signals: bool) -> None:
        self.progress = Progress()
        self.dirty = False
        self.generations: dict[int, int] = {}
        self._signals = signals
        self._statuses: list[tuple[int, str]] = []

    def queue(self, job: Job) -> None:
        queued = self.progress.add(job)
        self.generations[queued.oid] = self.generations.get(queued.oid, 0) + 1
        self.dirty = True
        log.info(
            "re-snapshot of %s%s queued: %s",
            queued.table,
            f" where {queued.where}" if queued.where else "",
            job.reason,
        )

    def finish(self, job: Job, status: str) -> None:
        if job in self.progress.jobs:
            self.progress.jobs.remove(job)
        self.dirty = True
        self.status(job.signal_id, status)

    def retired(self, job: Job, deleted: int, *, keyless: bool = False) -> None:
        """The old keys of ``job``'s table are deleted: its rows are sent next (``keyless``:
        the table has no key columns now, so none are, and the job is over)."""
        if keyless:
            log.info(
                "re-snapshot of %s: %d old key(s) deleted; the table has no key columns now: "
                "its rows are not sent again",
                job.table,
                deleted,
                extra={"table": job.table},
            )
            self.finish(job, KEYLESS_DONE.format(deleted))
            return
        job.retiring = False
        job.retired += deleted
        self.dirty = True
        log.info(
            "re-snapshot of %s: %d key(s) of the old key schema deleted; the rows follow",
            job.table,
            deleted,
            extra={"table": job.table},
        )

    def done(self, job: Job) -> None:
        retired = f", {job.retired} old key(s) deleted" if job.retire_keys else ""
        log.info(
            "re-snapshot of %s%s done: %d row(s) in %d chunk(s)%s",
            job.table,
            f" where {job.where}" if job.where else "",
            job.rows,
            job.chunks,
            retired,
            extra={"table": job.table},
        )
        self.finish(job, f"done: {job.rows} row(s){retired}")

    def status(self, signal_id: int | None, status: str) -> None:
        if signal_id is not None and self._signals:
            self._statuses.append((signal_id, status[:500]))

    def take_statuses(self) -> list[tuple[int, str]]:
        statuses, self._statuses = self._statuses, []
        return statuses


class ChunkTracker:
    """The stream side of the re-snapshots (see the module docstring)."""

    def __init__(
        self,
        jobs: Jobs,
        *,
        db: str,
        signal_name: tuple[str, str] | None,
        clock_us: Callable[[], int],
    ) -> None:
        self.jobs = jobs
        self.db = db
        self.clock_us = clock_us
        self.signal_name = signal_name
        self.signal_oid: int | None = None
        self.signal_seen: tuple[int, int] = (0, 0)  # (commit LSN, id) of the last signal
        self.chunk: InFlightChunk | None = None
        self.recent: collections.deque[int] = collections.deque(maxlen=RECENT_XIDS)
        self.check_oids: set[int] = set()  # tables whose Relation changed
        self.first_oids: set[int] = set()  # tables whose first Relation of the session came
        self._last_xid: int | None = None
        self._relations: dict[int, m.Relation] = {}

    # ------------------------------------------------------------------ observer

    def message(self, msg: m.Message, txn: TxnInfo | None) -> None:
        """The change assembler's observer: every message inside a transaction, in commit order
        (on the hot path: a row change of no interest costs two comparisons)."""
        if txn is not None and txn.xid != self._last_xid:
            self._last_xid = txn.xid
            self.recent.append(txn.xid)
        kind = type(msg)
        if kind in _CHANGES:
            change: m.Insert | m.Update | m.Delete = msg  # type: ignore[assignment]
            oid = change.relation_oid
            if oid == self.signal_oid and kind is m.Insert and txn is not None:
                self._signal(change, txn)  # type: ignore[arg-type]
            chunk = self.chunk
            if chunk is not None and oid == chunk.job.oid and txn is not None:
                keys = self._keys(change, chunk)
                if chunk.retire is not None:
                    keys = chunk.retire.window_keys(keys)
                chunk.window.change(txn.xid, keys)
        elif kind is m.LogicalMessage:
            self._watermark(msg, txn)  # type: ignore[arg-type]
        elif kind is m.Relation:
            self._relation(msg)  # type: ignore[arg-type]
        elif kind is m.Truncate:
            chunk = self.chunk
            truncate: m.Truncate = msg  # type: ignore[assignment]
            if chunk is not None and chunk.job.oid in truncate.relation_oids and txn is not None:
                chunk.window.truncate(txn.xid)

    def _watermark(self, msg: m.LogicalMessage, txn: TxnInfo | None) -> None:
        chunk = self.chunk
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
        if self.signal_name == (rel.namespace, rel.name):
            self.signal_oid = rel.oid
        if previous is None:
            # the first in this session: the check at start covered the table, unless it is
            # new since (the catalog checks look at the ones they have not recorded)
            self.first_oids.add(rel.oid)
            return
        diff = compare_relations(previous, rel)
        if not diff.changed:
            return
        log.info("relation %s.%s changed: %s", rel.namespace, rel.name, diff.describe())
        self.check_oids.add(rel.oid)
        chunk = self.chunk
        if chunk is not None and chunk.job.oid == rel.oid:
            chunk.window.invalidate("the table changed between the watermarks")

    def _keys(self, msg: m.Insert | m.Update | m.Delete, chunk: InFlightChunk) -> list[Key] | None:
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
        if (txn.commit_lsn, signal_id) <= self.signal_seen:
            return  # replayed after a restart: taken already
        self.signal_seen = (txn.commit_lsn, signal_id)
        table, where = row.get("table_name"), row.get("where_clause")
        self.jobs.progress.requests.append(
            SignalRequest(
                signal_id,
                table if isinstance(table, str) else "",
                where if isinstance(where, str) else None,
                str(row.get("kind") or "snapshot"),
            )
        )
        self.jobs.dirty = True

    # ------------------------------------------------------------------ emission

    def emit(self, outs: Iterable[Out]) -> Iterable[Out]:
        """The assembler's output, with a chunk's rows before the end of its high watermark's
        transaction (``outs`` itself while no chunk is in flight)."""
        if self.chunk is None:
            return outs
        return self._emit_around(outs)

    def _emit_around(self, outs: Iterable[Out]) -> Iterator[Out]:
        for out in outs:
            chunk = self.chunk
            if (
                isinstance(out, TxnEnd)
                and chunk is not None
                and chunk.high_commit is not None
                and chunk.high_commit == out.commit_lsn
            ):
                self.chunk = None
                yield from self._emit_chunk(chunk, out)
            else:
                yield out

    def _emit_chunk(self, chunk: InFlightChunk, end: TxnEnd) -> Iterator[Out]:
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
        if chunk.retire is not None:
            yield from self._emit_retirement(chunk, chunk.retire, end)
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
        if FAULTS.armed:
            FAULTS.hit("resnapshot_chunk")
        # every row is handed to the sink: the job moves on (the progress record goes out
        # with this Kafka transaction or a later one, never before the rows)
        jobs = self.jobs
        if jobs.generations.get(job.oid, 0) == chunk.generation and job in jobs.progress.jobs:
            job.after = chunk.last_key
            job.chunks += 1
            job.rows += len(rows)
            jobs.dirty = True
            log.debug(
                "re-snapshot of %s: chunk %d at %s, %d row(s) (%d dropped for newer changes)",
                job.table,
                job.chunks,
                format_lsn(end.commit_lsn),
                len(rows),
                window.dropped,
            )
            if chunk.complete:
                jobs.done(job)
        yield dataclasses.replace(end, events=seq)

    def _emit_retirement(
        self, chunk: InFlightChunk, retire: RetireSet, end: TxnEnd
    ) -> Iterator[Out]:
        """The deletes of the old keys no row has (their key texts left in the window), at
        ``(H, seq)``; then the job sends its rows."""
        job, seq = chunk.job, end.events
        deleted = 0
        for (text,), _row in chunk.window.remaining():
            for key, fp in retire.by_text[text]:
                at = DeleteAt(self.db, end.commit_lsn, seq, end.commit_ts_us, RETIRE_ORIGIN)
                yield OutEvent(
                    chunk.topic,
                    key,
                    delete_value(key, fp, retire.registry, at),
                    end.commit_lsn,
                    seq,
                    [(POSITION_HEADER, position_header(end.commit_lsn, seq))],
                    end.commit_ts_us,
                )
                seq += 1
                deleted += 1
        if FAULTS.armed and deleted:
            FAULTS.hit("retire_deletes")
        jobs = self.jobs
        if jobs.generations.get(job.oid, 0) == chunk.generation and job in jobs.progress.jobs:
            log.info(
                "re-snapshot of %s: deletes at %s (%d candidate(s) kept: a row has their key "
                "text, or changed while they were read)",
                job.table,
                format_lsn(end.commit_lsn),
                sum(len(v) for v in retire.by_text.values()) - deleted,
                extra={"table": job.table},
            )
            jobs.retired(job, deleted, keyless=retire.texts is None)
        yield dataclasses.replace(end, events=seq)
