"""The bucket engine's reader: Kafka change topics → batches of decoded changes.

:class:`ChangeReader` runs one thread that polls the engine's consumer of the change topics
(the tables the rules place), skips events at or below their partition's applied position
from the position header alone (no decoding), drops inserts whose rows no rule places and
makes the changes of updates whose rows land in no bucket and of deletes, read from their
placement and key columns alone (:meth:`relay.downstream.event_decoder.EventDecoder.skim`),
decodes the rest (relay/downstream/event_decoder.py; an unknown schema fingerprint makes it
re-read the schema log, :class:`relay.downstream.bucket_engine.SchemaLog`, for up to
``schema_wait_s``), sorts each batch by position, and hands it over with the partitions'
progress (next offset, highest position) as a :class:`Batch`, or an :class:`Idle` when
nothing came (``at_end``: every assigned partition is at its end).  :attr:`ChangeReader.ends`
holds the end offsets last fetched (when idle, and every :data:`ENDS_REFRESH_S` while busy),
for the engine's lag (relay/metrics.py).

The engine creates and closes the consumers.  Partitions are assigned manually: every
partition of each change topic that exists and the engine's share owns (``owns``), new topics picked up every
``topic_refresh_s`` (every 0.5 s while some are missing); each is sought to the offset the
store committed (``committed``, the engine's dict, kept up to date by the applying thread)
or to its beginning.

Concurrency model: after :meth:`ChangeReader.start` the reader thread is the only user of
the consumers; it hands items over a queue of two, so reading and decoding batch *n+1*
overlaps with the store's transaction for batch *n*.  An exception in the thread is handed
over too and raised by :meth:`ChangeReader.next` in the applying thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from core.avro_envelope import POSITION_HEADER, parse_position_header
from core.errors import DecodeError
from relay.downstream.bucket_store import ApplyResult, PartitionProgress, Position, RowChange
from relay.downstream.event_decoder import EventDecoder, Skimmed
from relay.errors import EngineError

log = logging.getLogger("relay.downstream.bucket_engine")

ENDS_REFRESH_S = 5.0
"""While busy, the reader fetches the partitions' end offsets this often (for the lag)."""


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine started."""

    records: int = 0
    skipped_by_position: int = 0
    placed_nowhere: int = 0
    """Inserts the reader dropped undecoded: their rows land in no bucket."""
    skimmed: int = 0
    """Updates whose rows land in no bucket and deletes, made from their key alone."""
    changes: int = 0
    duplicates: int = 0
    errors: int = 0
    ops: int = 0
    batches: int = 0
    apply_s: float = 0.0
    locked_s: float = 0.0
    """Time the store's write lock was held (all engines' writes serialize on it)."""
    decode_s: float = 0.0

    def applied(self, batch: Batch, result: ApplyResult, seconds: float) -> None:
        """Count a batch the store applied in ``seconds``."""
        self.apply_s += seconds
        self.locked_s += result.locked_s
        self.batches += 1
        self.changes += len(batch.changes) + batch.nowhere
        self.duplicates += result.skipped_duplicates
        self.errors += result.skipped_errors
        self.ops += result.ops


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """Decoded changes in position order, the progress they bring, records they covered,
    and how many inserts among them were dropped undecoded (``nowhere``: no rule places
    their rows)."""

    changes: list[RowChange]
    progress: dict[tuple[str, int], PartitionProgress]
    records: int
    nowhere: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Idle:
    """Nothing new; ``at_end``: every partition was at its end, up to ``position``, and
    ``ends`` (the partitions' end offsets then)."""

    at_end: bool
    position: Position
    ends: Mapping[tuple[str, int], int] = dataclasses.field(default_factory=dict)


class SchemaSource(Protocol):
    """The schema log the decoder's registry is filled from (``{prefix}._schemas``:
    :class:`relay.downstream.bucket_engine.SchemaLog`)."""

    topic: str

    def refresh(self, timeout: float = 10.0) -> int:
        """Read every schema committed so far; returns how many were new."""
        ...


class ChangeReader:
    """Reads and decodes the change topics ``topics`` (topic → table) for the engine.

    ``consumer``: a kafka-python consumer the reader assigns and polls (the engine creates
    and closes it, and ``schemas``); ``committed``: the progress the store holds per
    (topic, partition), where a newly assigned partition starts; ``stats``: the engine's
    counters (records, skipped by position, decode time are counted here)."""

    def __init__(
        self,
        consumer: Any,
        schemas: SchemaSource,
        decoder: EventDecoder,
        *,
        topics: Mapping[str, str],
        committed: Mapping[tuple[str, int], PartitionProgress],
        stats: EngineStats,
        batch_max_events: int,
        batch_max_ms: int,
        topic_refresh_s: float,
        schema_wait_s: float,
        owns: Callable[[int], bool] = lambda _partition: True,
    ) -> None:
        self.stats = stats
        self.batch_max_events = batch_max_events
        self.batch_max_ms = batch_max_ms
        self.topic_refresh_s = topic_refresh_s
        self.schema_wait_s = schema_wait_s
        self._consumer = consumer
        self._schemas = schemas
        self._decoder = decoder
        self._topics = topics
        self._progress = committed
        self._owns = owns
        self.partitions: dict[str, int] = {}
        """Every topic assigned → its number of partitions (those of other shares too)."""
        self._assigned_topics: set[str] = set()
        self._last_topic_check = 0.0
        self._max_position: Position = (0, 0)
        self._seen: dict[tuple[str, int], PartitionProgress] = dict(committed)
        self._batches: queue.Queue[Batch | Idle | BaseException] = queue.Queue(maxsize=2)
        self._reader: threading.Thread | None = None
        self._reader_stop = threading.Event()
        self.ends: Mapping[tuple[str, int], int] = {}
        self._ends_at = 0.0

    def start(self) -> None:
        """Assign the partitions that exist and start the reader thread."""
        self._assign()
        self._reader = threading.Thread(
            target=self._read_loop, name="bucket-engine-reader", daemon=True
        )
        self._reader.start()

    def next(self, timeout: float) -> Batch | Idle | None:
        """The next item the reader thread prepared, waiting up to ``timeout`` seconds
        (``None`` when none came); re-raises what ended the reader thread."""
        try:
            item = self._batches.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self._reader = None  # it has exited
            raise item
        return item

    def stop(self) -> None:
        """Stop the reader thread (what it prepared is dropped)."""
        if self._reader is not None:
            self._reader_stop.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    self._batches.get_nowait()
            self._reader.join(30)
            self._reader = None

    def _assign(self) -> None:
        """Assign the partitions of every change topic that exists (new ones included)."""
        from kafka import TopicPartition

        self._last_topic_check = time.monotonic()
        missing = [t for t in self._topics if t not in self._assigned_topics]
        if not missing:
            return
        existing = self._consumer.topics()
        new = [t for t in missing if t in existing]
        if not new:
            return
        tps = list(self._consumer.assignment())
        fresh: list[Any] = []
        for topic in new:
            parts = self._consumer.partitions_for_topic(topic) or set()
            fresh.extend(TopicPartition(topic, p) for p in sorted(parts) if self._owns(p))
            self.partitions[topic] = len(parts)
        if fresh:
            self._consumer.assign(tps + fresh)
        for tp in fresh:
            done = self._progress.get((tp.topic, tp.partition))
            if done is None:
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, done.next_offset)
        self._assigned_topics.update(new)
        log.info("bucket engine: consuming %s", ", ".join(sorted(new)))

    # ---- the reader thread: the only user of the Kafka consumers once started

    def _read_loop(self) -> None:
        try:
            while not self._reader_stop.is_set():
                missing = len(self._assigned_topics) < len(self._topics)
                since = time.monotonic() - self._last_topic_check
                if since > (0.5 if missing else self.topic_refresh_s):
                    self._assign()
                records = self._poll_batch()
                item: Batch | Idle
                if records:
                    changes, progress, nowhere = self._changes(records)
                    item = Batch(changes, progress, len(records), nowhere)
                    if time.monotonic() - self._ends_at > ENDS_REFRESH_S:
                        self._end_offsets()
                else:
                    at_end = self._at_end()
                    item = Idle(at_end, self._max_position, self.ends if at_end else {})
                while not self._reader_stop.is_set():
                    try:
                        self._batches.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the applying thread, which raises it
            with contextlib.suppress(queue.Full):
                self._batches.put(exc, timeout=5)

    def _poll_batch(self) -> list[Any]:
        out: list[Any] = []
        if not self._consumer.assignment():  # no partition of this share (yet)
            self._reader_stop.wait(self.batch_max_ms / 1000)
            return out
        deadline = time.monotonic() + self.batch_max_ms / 1000
        timeout_ms = max(self.batch_max_ms, 100)
        while len(out) < self.batch_max_events:
            batch = self._consumer.poll(
                timeout_ms=timeout_ms, max_records=self.batch_max_events - len(out)
            )
            got = [r for recs in batch.values() for r in recs]
            out.extend(got)
            if not got or time.monotonic() >= deadline:
                break
            timeout_ms = max(0, int((deadline - time.monotonic()) * 1000))
        return out

    def _changes(
        self, records: Sequence[Any]
    ) -> tuple[list[RowChange], dict[tuple[str, int], PartitionProgress], int]:
        t0 = time.perf_counter()
        nowhere = 0
        skimmed = 0
        skim = self._decoder.skim
        decode = Skimmed.DECODE
        top = self._max_position
        # per partition: [next offset, highest position]; PartitionProgress made at the end
        reached: dict[tuple[str, int], list[Any]] = {}
        changes: list[RowChange] = []
        skipped = 0
        for r in records:
            tp = (r.topic, r.partition)
            at = reached.get(tp)
            if at is None:
                seen = self._seen.get(tp) or PartitionProgress(0)
                at = reached[tp] = [seen.next_offset, seen.position]
            position = _header_position(r)
            if r.value is not None and position is None:
                position = self._decode(r.value, None, r.key).position
            at[0] = r.offset + 1
            if position is None or position <= at[1] or r.value is None:
                skipped += 1
                continue
            at[1] = position
            found = skim(r.value, self._topics[r.topic], position, r.key)
            if found is decode:
                changes.append(self._decode(r.value, position, r.key))
            elif isinstance(found, RowChange):
                skimmed += 1
                changes.append(found)
            else:  # an insert that lands in no bucket
                nowhere += 1
                top = max(top, position)
        self.stats.records += len(records)
        self.stats.skipped_by_position += skipped
        self.stats.placed_nowhere += nowhere
        self.stats.skimmed += skimmed
        progress = {tp: PartitionProgress(o, p) for tp, (o, p) in reached.items()}
        if changes:
            changes.sort(key=_position_of)
            top = max(top, changes[-1].position)
        self._max_position = top
        self._seen.update(progress)
        self.stats.decode_s += time.perf_counter() - t0
        return changes, progress, nowhere

    def _decode(self, value: bytes, position: Position | None, key: bytes | None) -> RowChange:
        try:
            return self._decoder.change(value, position, key)
        except DecodeError as exc:
            if "unknown Avro schema fingerprint" not in str(exc):
                raise EngineError(f"cannot decode the change event at {position}: {exc}") from exc
        deadline = time.monotonic() + self.schema_wait_s
        while time.monotonic() < deadline:
            self._schemas.refresh(timeout=2.0)
            try:
                return self._decoder.change(value, position, key)
            except DecodeError as exc:
                if "unknown Avro schema fingerprint" not in str(exc):
                    raise EngineError(
                        f"cannot decode the change event at {position}: {exc}"
                    ) from exc
            time.sleep(0.2)
        raise EngineError(
            f"the schema of the change event at {position} did not appear in "
            f"{self._schemas.topic} within {self.schema_wait_s}s"
        )

    def _at_end(self) -> bool:
        """Every assigned partition is at its end offset (and every ruled topic that
        exists is assigned)."""
        tps = list(self._consumer.assignment())
        if not tps:
            return True
        ends = self._end_offsets()
        return all(self._consumer.position(tp) >= ends[(tp.topic, tp.partition)] for tp in tps)

    def _end_offsets(self) -> Mapping[tuple[str, int], int]:
        """Fetch the assigned partitions' end offsets into :attr:`ends` (a new dict, so
        other threads read a whole one)."""
        ends = self._consumer.end_offsets(list(self._consumer.assignment()))
        self.ends = {(tp.topic, tp.partition): end for tp, end in ends.items()}
        self._ends_at = time.monotonic()
        return self.ends


def _header_position(record: Any) -> Position | None:
    for name, value in record.headers or ():
        if name == POSITION_HEADER:
            return parse_position_header(value)
    return None


def _position_of(change: RowChange) -> Position:
    return change.position
