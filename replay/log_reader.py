"""Reading a log: the events of some tables in position order, deduplicated, within bounds.

How the log is read
-------------------
A table's events are in its topic ``{prefix}.{schema}.{table}`` (docs/events.md), in
one or more partitions.  :class:`LogReader` reads every partition of the topics it is
given with one consumer (``read_committed``; replay.log_source) and merges them by
position (replay.merge).  cdc writes a partition in position order, and a re-delivered
duplicate carries the position of its original, so a record whose position is not above
the last one handed out is a duplicate: dropped and counted.

A read is complete when every partition's position has reached its end offset (taken
when the read starts, or again by :meth:`LogReader.refresh_ends`) or, with a stop bound,
when the partitions not read to their end hold an event past it; a partition that
cannot be read that far raises :class:`~replay.errors.LogIncomplete` naming the offsets
(replay.log_source).  :meth:`LogReader.read_to` says, per partition, how far the read
went and whether it is complete.

Bounds
------
A bound is a position or a time (replay.bounds).  Start by position: each partition is
read from the first offset at or after it (a binary search,
:func:`~replay.log_source.offset_of_position`), and earlier events are skipped.  Start
by time: ``offsets_for_times`` (Kafka record timestamps, which are never before the
commit time unless clocks disagree, so the seek goes ``TIME_SLACK_S`` earlier) and
events before the time are then skipped.  Stop by position: the merge stops at the first
event beyond it (it stays unread).  Stop by time: events committed after it are skipped,
and the read ends at the first event committed more than ``TIME_SLACK_S`` after it
(commit times follow positions except for clock steps).  The events after a stop bound
stay in the reader: :meth:`LogReader.events` may be called again to continue (verify
does).

Concurrency: nothing here is shared between threads; one reader owns one consumer.  A
large read (``PARALLEL_MIN_RECORDS``) may decode in worker processes (``workers``;
replay.decode_workers) without changing the order of events.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError

from core.avro_envelope import decode
from core.errors import DecodeError
from replay.bounds import TIME_SLACK_S, Bound, Pos
from replay.decode_workers import Decoded, Item, decode_in_workers, start_pool
from replay.errors import LogUnavailable, ReplayError
from replay.events import ChangeEvent, Prefilter, Progress, ReadStats
from replay.log_source import (
    Fetcher,
    LogSource,
    beginning_offsets,
    offset_of_position,
    position_in_headers,
    read_ends,
)
from replay.merge import PartitionMerge

__all__ = ["PARALLEL_MIN_RECORDS", "LogReader"]

#: Reads expecting at least this many records decode in a worker process.
PARALLEL_MIN_RECORDS = 50_000


class LogReader:
    """Events of some tables in position order, deduplicated (see the module docstring).

    :meth:`events` may be called again to continue after a stop bound (verify does);
    the record beyond the bound stays buffered.  A read ends when every partition's
    position has reached its end offset (taken at the start, or by :meth:`refresh_ends`)
    or, with a stop bound, when the partitions not read to their end hold an event past
    it; a partition that cannot be read that far raises :class:`LogIncomplete` naming
    the offsets.
    """

    def __init__(
        self,
        source: LogSource,
        tables: Sequence[str],
        *,
        start: Bound | None = None,
        progress: Progress | None = None,
        workers: int | None = None,
    ) -> None:
        self.source = source
        # decode worker processes for large reads (None: one when there are cores to spare;
        # on two cores shared with other work it was no faster than decoding here)
        self._workers = workers if workers is not None else (1 if (os.cpu_count() or 1) >= 4 else 0)
        self._executor: Any = None
        self.catalog = source.catalog()
        self.stats = ReadStats()
        self._start = start
        self._last: Pos = (-1, -1)
        self._consumer = source.consumer()
        self._topic_table: dict[str, str] = {}
        tps: list[Any] = []
        try:
            for name in tables:
                table = self.catalog.resolve(name)
                topic = self.catalog.topic(table)
                self._topic_table[topic] = table
                parts = self._consumer.partitions_for_topic(topic) or set()
                tps.extend(TopicPartition(topic, p) for p in sorted(parts))
            self._tps = tps
            self._fetcher = Fetcher(source, self._consumer, tps, "reading the change log")
            self._merge = PartitionMerge(self._fetcher, self.stats, self._position_of, progress)
            self._run: deque[tuple[Pos, Any]] = deque()  # taken from the merge, not read yet
            if tps:
                self._seek_start(start)
                self.refresh_ends()
        except BaseException:
            self._consumer.close()
            raise

    # -- setup -------------------------------------------------------------------------

    def _seek_start(self, start: Bound | None) -> None:
        consumer = self._consumer
        begin = beginning_offsets(consumer, self._tps, self.source)
        offsets = dict(begin)
        if start is not None and start.time_us is not None:
            at_ms = max(0, int(start.time_us / 1000 - TIME_SLACK_S * 1000))
            try:
                found = consumer.offsets_for_times(dict.fromkeys(self._tps, at_ms))
            except KafkaError as exc:
                raise LogUnavailable(
                    f"offsets_for_times on {self.source.where} failed: {exc}"
                ) from exc
            ends, _ = read_ends(self.source, consumer, self._tps, begin)
            for tp in self._tps:
                hit = found.get(tp)
                offsets[tp] = hit.offset if hit is not None else ends[tp]
        elif start is not None and start.position is not None:
            for tp in self._tps:
                offsets[tp] = offset_of_position(
                    self.source, consumer, tp, start.position, begin[tp]
                )
        self._fetcher.start(offsets)

    def refresh_ends(self) -> None:
        """Take the partitions' current end offsets as the end of the read."""
        self._merge.refresh_ends()

    def read_to(self) -> list[dict[str, Any]]:
        """Per partition: the end offset of the read, the offset the read reached, and
        whether it holds everything up to the read's bound (``complete``: read to the
        end, or stopped at a bound with the next record beyond it in hand)."""
        fetcher = self._fetcher
        held = {(r.topic, r.partition) for _, r in self._run}
        return [
            {
                "topic": tp.topic,
                "partition": tp.partition,
                "end": fetcher.ends[tp],
                "read_to": fetcher.next[tp],
                "complete": not fetcher.due(tp)
                or self._merge.holds(tp)
                or (tp.topic, tp.partition) in held,
            }
            for tp in self._tps
        ]

    def at_end(self) -> bool:
        """Nothing buffered and every partition read to the end offsets of the read."""
        return not self._run and self._merge.drained()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._consumer.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- events ------------------------------------------------------------------------

    def _position_of(self, record: Any) -> Pos:
        found = position_in_headers(record.headers)
        if found is not None:
            return found
        event = self._decode(record)  # a record without header: the position is in source
        return int(event["source"]["commit_lsn"]), int(event["source"]["seq"])

    def _decode(self, record: Any) -> dict[str, Any]:
        try:
            return decode(record.value, self.catalog.registry)
        except DecodeError as exc:
            if "unknown Avro schema fingerprint" in str(exc):
                self.catalog = self.source.catalog(refresh=True)  # published after we started
                try:
                    return decode(record.value, self.catalog.registry)
                except DecodeError as again:
                    exc = again
            raise ReplayError(
                f"cannot decode {record.topic}[{record.partition}]@{record.offset}: {exc}"
            ) from exc

    def events(
        self,
        *,
        stop: Bound | None = None,
        follow: bool = False,
        prefilter: Prefilter | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> Iterator[ChangeEvent]:
        """Events in position order within the start bound (given at construction) and
        ``stop``; ``follow``: keep waiting for new events at the end of the log
        (``on_idle`` is called before each wait, e.g. to flush output).

        Records are selected (dedup, start position, ``prefilter``) here; their values are
        decoded here or, for large reads, by a worker process while this one reads on."""
        self._merge.on_idle = on_idle
        stats = self.stats
        start = self._start
        start_pos = start.position if start is not None else None
        start_time = start.time_us if start is not None else None
        stop_pos = stop.position if stop is not None else None
        stop_time = stop.time_us if stop is not None else None
        slack_us = int(TIME_SLACK_S * 1_000_000)
        topic_table = self._topic_table
        selected = self._select(follow, stop_pos, start_pos, prefilter)
        parallel = (
            not follow and self._workers > 0 and stats.total - stats.records >= PARALLEL_MIN_RECORDS
        )
        decoded = (
            decode_in_workers(selected, self._pool, self._workers, self._decode, self._put_back)
            if parallel
            else self._decoded(selected)
        )
        after_stop: list[Item] = []
        try:
            for pos, record, last, d in decoded:
                source = d["source"]
                if start_time is not None or stop_time is not None:
                    at = source["commit_ts_us"] or d["ts_us"]
                    if start_time is not None and at < start_time:
                        stats.skipped += 1
                        continue
                    if stop_time is not None and at > stop_time:
                        # after the bound: kept unread, so a later call starts with it
                        after_stop.append((pos, record, last))
                        if at > stop_time + slack_us:
                            return
                        continue
                stats.events += 1
                if stats.first_position is None:
                    stats.first_position = pos
                stats.last_position = pos
                value = record.value
                yield ChangeEvent(
                    topic_table[record.topic],
                    pos,
                    d["op"],
                    d["before"],
                    d["after"],
                    d["before_kind"],
                    d["unchanged"],
                    source,
                    value[2:10],
                    record.topic,
                    record.partition,
                    record.offset,
                    d["ts_us"],
                    None if record.key is None else bytes(record.key[2:10]),
                )
        finally:
            decoded.close()  # what it holds goes back to the run
            if after_stop:
                self._put_back(after_stop)
                self._last = after_stop[0][2]

    def _select(
        self, follow: bool, stop: Pos | None, start: Pos | None, prefilter: Prefilter | None
    ) -> Iterator[Item]:
        """Records in position order that are no duplicates, not before ``start`` and
        wanted by ``prefilter``: (position, record, the dedup position before it)."""
        stats = self.stats
        run = self._run
        while True:
            if not run:
                got = self._merge.next_run(follow, stop)
                if not got:
                    if got is None:
                        return
                    continue
                run.extend(got)
            pos, record = run.popleft()
            if pos <= self._last:
                stats.duplicates += 1
                continue
            last, self._last = self._last, pos
            if start is not None and pos < start:
                stats.skipped += 1
                continue
            if prefilter is not None and not prefilter(record):
                stats.skipped += 1
                continue
            yield pos, record, last

    def _put_back(self, items: list[Item]) -> None:
        """Records taken but not handed out go back to the front of the run, in order."""
        self._run.extendleft((pos, record) for pos, record, _ in reversed(items))

    def _decoded(self, items: Iterator[Item]) -> Generator[Decoded, None, None]:
        registry = self.catalog.registry
        for pos, record, last in items:
            try:
                d = decode(record.value, registry)
            except DecodeError:
                d = self._decode(record)  # an unknown schema: read _schemas again
                registry = self.catalog.registry
            yield pos, record, last, d

    def _pool(self) -> Any:
        if self._executor is None:
            self._executor = start_pool(self._workers, list(self.catalog.schema_texts))
        return self._executor
