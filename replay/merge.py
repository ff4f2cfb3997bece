"""The merge of a log's partitions into position order.

cdc writes each partition in position order, and every record carries its position in
the ``fieldsync.pos`` header, so ordering needs no decoding.  :class:`PartitionMerge`
keeps a buffer per partition and a heap of the buffers' heads (a k-way merge) and hands
out *runs*: the records of the partition with the lowest head up to the next-lowest
head of another partition (with one partition: all it has buffered), so the work per
record is a deque pop, not a heap operation.  Records with a null value (tombstones;
cdc writes none, compaction tools may) are skipped and counted.

Before a run is cut, every partition that still has records due (its position is below
its end offset, replay.log_source) must have one buffered, or its position must have
reached its end: a partition that cannot get there raises
:class:`~replay.errors.LogIncomplete` (:class:`~replay.log_source.Watch`).  Memory is
bounded per partition: a partition with ``_BUFFER_HIGH`` records buffered is not fetched
(unassigned by the :class:`~replay.log_source.Fetcher`) until its buffer drains.

Following the log (export ``--follow``), an empty heap means waiting for new records,
asking the broker for new end offsets every few seconds.

Concurrency: none; the merge belongs to its reader's thread, and blocks only in the
fetcher's polls.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from replay.bounds import Pos
from replay.events import Progress, ReadStats
from replay.log_source import Fetcher, Watch

__all__ = ["PartitionMerge"]

_BUFFER_HIGH: Final = 20_000  # records buffered per partition before it is paused


class PartitionMerge:
    """Buffers per partition, merged into runs of records in position order.

    ``position_of`` gives a record's position (its header, or for a record without one
    its decoded ``source``); ``stats`` counts records and tombstones; ``progress`` is
    told the records fetched and expected after every fetch that brought some.
    """

    def __init__(
        self,
        fetcher: Fetcher,
        stats: ReadStats,
        position_of: Callable[[Any], Pos],
        progress: Progress | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.tps = list(fetcher.tps)
        self.stats = stats
        self.on_idle: Callable[[], None] | None = None  # called before waiting (follow)
        self._position_of = position_of
        self._progress = progress
        self._bufs: dict[Any, deque[tuple[Pos, Any]]] = {tp: deque() for tp in self.tps}
        self._heap: list[tuple[Pos, int, Any]] = []
        self._tick = 0
        self._waiting: set[Any] = set()

    def refresh_ends(self) -> None:
        """Take the partitions' current end offsets as the end of the read."""
        fetcher = self.fetcher
        fetcher.refresh_ends()
        self._waiting = {tp for tp in self.tps if not self._bufs[tp] and fetcher.due(tp)}
        total = sum(max(0, fetcher.ends[tp] - fetcher.next[tp]) for tp in self.tps)
        self.stats.total = self.stats.records + total + sum(len(b) for b in self._bufs.values())

    def holds(self, tp: Any) -> bool:
        """Records of ``tp`` are buffered."""
        return bool(self._bufs[tp])

    def drained(self) -> bool:
        """Nothing buffered and every partition read to the end offsets of the read."""
        return (
            not self._heap
            and not self._waiting
            and not any(self.fetcher.due(tp) for tp in self.tps)
        )

    def next_run(self, follow: bool, stop: Pos | None) -> list[tuple[Pos, Any]] | None:
        """The next records in position order: a run from the partition with the lowest
        head, up to the next-lowest head of another partition (with one partition: all it
        has buffered) and ``stop``.  None: the end of the read, or the head is past stop."""
        while True:
            if self._waiting:
                self._fill(follow)
            heap = self._heap
            if not heap:
                if not follow:
                    return None
                if self.on_idle is not None:
                    self.on_idle()
                self._wait_for_more()
                continue
            pos, _, tp = heap[0]
            if stop is not None and pos > stop:
                return None
            limit = stop
            for i in (1, 2):  # the smallest head of the other partitions is a child of the root
                if i < len(heap) and (limit is None or heap[i][0] < limit):
                    limit = heap[i][0]
            return self._cut(tp, limit)

    def _cut(self, tp: Any, limit: Pos | None) -> list[tuple[Pos, Any]]:
        """The records of ``tp`` up to ``limit``; the heap gets the partition's new head."""
        heap = self._heap
        buf = self._bufs[tp]
        if limit is None or buf[-1][0] <= limit:
            run = list(buf)
            buf.clear()
        else:
            run = []
            while buf and buf[0][0] <= limit:
                run.append(buf.popleft())
        if buf:
            self._tick += 1
            heapq.heapreplace(heap, (buf[0][0], self._tick, tp))
        else:
            heapq.heappop(heap)
            if self.fetcher.due(tp):
                self._waiting.add(tp)
        return run

    def _poll(self, follow: bool = False) -> int:
        """One fetch from every partition with room in its buffer and records due
        (following: every partition with room); returns the records it brought."""
        fetcher = self.fetcher
        want = {
            tp
            for tp, buf in self._bufs.items()
            if len(buf) < _BUFFER_HIGH and (follow or fetcher.due(tp))
        }
        batch = fetcher.poll(want)
        n = 0
        stats = self.stats
        for tp, recs in batch.items():
            buf = self._bufs[tp]
            was_empty = not buf
            for r in recs:
                value = r.value
                if value is None:
                    stats.tombstones += 1
                    continue
                buf.append((self._position_of(r), r))
            n += len(recs)
            if was_empty and buf:
                self._tick += 1
                heapq.heappush(self._heap, (buf[0][0], self._tick, tp))
        if n:
            stats.records += n
            if self._progress is not None:
                self._progress(stats.records, stats.total)
        return n

    def _fill(self, follow: bool) -> None:
        """Poll until every partition that still has records due has one buffered (or its
        position reached its end offset); :class:`LogIncomplete` if one cannot be read."""
        fetcher = self.fetcher
        watch = Watch(fetcher)
        while self._waiting:
            self._poll()
            for tp in list(self._waiting):
                if self._bufs[tp] or not fetcher.due(tp):
                    self._waiting.discard(tp)
            if self._waiting:
                watch.check(self._waiting)
        if follow and self._heap:
            # a partition that looked caught up may have records of the same Kafka
            # transaction as those buffered elsewhere (visible together): look again
            idle = [tp for tp in self.tps if not self._bufs[tp]]
            if idle:
                fetcher.refresh_ends(idle)
                fresh = {tp for tp in idle if fetcher.due(tp)}
                if fresh:
                    self._waiting |= fresh
                    self._fill(False)

    def _wait_for_more(self) -> None:
        """Follow mode with nothing buffered: wait for new records (checks the broker)."""
        fetcher = self.fetcher
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if self._poll(follow=True):
                break
        else:
            fetcher.refresh_ends()
        self._waiting = {tp for tp in self.tps if not self._bufs[tp] and fetcher.due(tp)}
