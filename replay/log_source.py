"""Kafka access: where the log is, and reading partitions to their end.

:class:`LogSource` says where the log is (kafka-python client settings and the topic
prefix) and makes consumers: without a group (partitions are assigned by hand, nothing
is committed) and ``read_committed``, so aborted Kafka transactions of a crashed cdc are
never seen, on brokers that hide them.  It reads small topics whole (``_schemas``,
``_journal``, ``_outcomes``) and keeps the log's :class:`~replay.catalog.LogCatalog`.

Reading to the end
------------------
A read's end is an offset per partition (:func:`read_ends`): the committed end the
broker reports (the last stable offset), or, when the broker reports none because a
transaction is open there (tansu answers 0), the partition's log end.  Progress is the
consumer's position per partition (:class:`Fetcher`), which moves past transaction
markers and past records it does not return, so markers and aborted or fenced
transactions in the middle of a partition never look like missing records.  A read is
complete when every position has reached its end (or, with a stop bound, the partitions
not read to their end hold an event past it), never because nothing came for a while:
when no position moves for ``timeout_s`` (:class:`Watch`), the broker is asked again
and :class:`~replay.errors.LogIncomplete` names each partition and the offsets it could
not read.  Memory is bounded per partition by the caller: a partition it does not want
(its buffer is full) is unassigned, and assigned again at the offset it reached once it
is wanted again (kafka-python's ``pause()`` can leave a paused partition without records
for good when several are read).

Start by position: :func:`offset_of_position` binary-searches a partition for the first
offset at or after it (positions grow with offsets), with single-record probes on a
consumer of its own.

Concurrency: none.  A consumer, and the :class:`Fetcher` and :class:`Watch` over it,
belong to the one thread that reads; every call blocks for at most one poll (200 ms) or
one broker request (``timeout_s``).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from cdc.pipeline import kafka_options
from core.avro_envelope import POSITION_HEADER
from core.kafka_options import build_client
from replay.bounds import Pos
from replay.catalog import LogCatalog
from replay.errors import LogIncomplete, LogUnavailable

__all__ = [
    "Fetcher",
    "LogSource",
    "Watch",
    "beginning_offsets",
    "offset_of_position",
    "position_in_headers",
    "read_ends",
]

_POS = struct.Struct(">QQ")
_POLL_MS: Final = 200


def position_in_headers(headers: Iterable[tuple[str, bytes]]) -> Pos | None:
    """The position in a record's ``fieldsync.pos`` header (None: the record has none)."""
    for name, value in headers:
        if name == POSITION_HEADER:
            hi, lo = _POS.unpack(value)
            return hi, lo
    return None


class LogSource:
    """Where the log is: Kafka client settings (kafka-python keywords) and topic prefix."""

    def __init__(self, kafka: Mapping[str, Any], prefix: str, *, timeout_s: float = 30.0) -> None:
        self.kafka = dict(kafka)
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._catalog: LogCatalog | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> LogSource:
        """From :class:`cdc.settings.CdcSettings` (``[kafka]``: bootstrap, prefix, security)."""
        opts = kafka_options(settings)
        return cls(opts.client_kwargs(), opts.topic_prefix, timeout_s=opts.timeout_s)

    @property
    def where(self) -> str:
        servers = self.kafka.get("bootstrap_servers", "?")
        return ",".join(servers) if isinstance(servers, list | tuple) else str(servers)

    def consumer(self, **overrides: Any) -> Any:
        """A consumer without group (manual assignment), read_committed."""
        config: dict[str, Any] = {
            **self.kafka,
            "group_id": None,
            "enable_auto_commit": False,
            "isolation_level": "read_committed",
            "max_poll_records": 10_000,
            "fetch_max_bytes": 64 << 20,
            "max_partition_fetch_bytes": 16 << 20,
            "fetch_max_wait_ms": 100,
            "allow_auto_create_topics": False,
            **overrides,
        }
        try:
            return build_client(KafkaConsumer, **config)
        except KafkaError as exc:
            raise LogUnavailable(f"cannot reach the Kafka broker at {self.where}: {exc}") from exc

    def catalog(self, *, refresh: bool = False) -> LogCatalog:
        """The log's schemas (``{prefix}._schemas`` read from the beginning)."""
        if self._catalog is None or refresh:
            catalog = self._catalog or LogCatalog(self.prefix)
            for record in self.read_all(f"{self.prefix}._schemas"):
                if record.value:
                    catalog.add(record.value.decode("utf-8"))
            self._catalog = catalog
        return self._catalog

    def topics(self) -> set[str]:
        consumer = self.consumer()
        try:
            return set(consumer.topics())
        except KafkaError as exc:
            raise LogUnavailable(f"cannot list topics on {self.where}: {exc}") from exc
        finally:
            consumer.close()

    def read_all(self, topic: str) -> Iterator[Any]:
        """Every committed record of a small topic, partition by partition (no merge), each
        partition read to its end offset (:class:`Fetcher`)."""
        consumer = self.consumer()
        try:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                return
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            fetcher = Fetcher(self, consumer, tps, f"reading {topic}")
            fetcher.start(beginning_offsets(consumer, tps, self))
            fetcher.refresh_ends()
            records: dict[Any, list[Any]] = {tp: [] for tp in tps}
            watch = Watch(fetcher)
            while due := {tp for tp in tps if fetcher.due(tp)}:
                for tp, recs in fetcher.poll(due).items():
                    records[tp].extend(recs)
                watch.check(due)
            for tp in tps:
                yield from records[tp]
        except KafkaError as exc:
            raise LogUnavailable(f"reading {topic} from {self.where} failed: {exc}") from exc
        finally:
            consumer.close()


def _tp_text(tp: Any) -> str:
    return f"{tp.topic}[{tp.partition}]"


def _end_offsets(consumer: Any, tps: Sequence[Any], source: LogSource) -> dict[Any, int]:
    """The end offsets the consumer's isolation level sees (read_committed: the last stable
    offset)."""
    try:
        found: dict[Any, int] = consumer.end_offsets(
            list(tps), timeout_ms=int(source.timeout_s * 1000)
        )
        return found
    except KafkaError as exc:
        raise LogUnavailable(
            f"the Kafka broker at {source.where} does not answer ({type(exc).__name__}: {exc})"
        ) from exc


def beginning_offsets(consumer: Any, tps: Sequence[Any], source: LogSource) -> dict[Any, int]:
    try:
        found: dict[Any, int] = consumer.beginning_offsets(
            list(tps), timeout_ms=int(source.timeout_s * 1000)
        )
        return found
    except KafkaError as exc:
        raise LogUnavailable(
            f"the Kafka broker at {source.where} does not answer ({type(exc).__name__}: {exc})"
        ) from exc


def read_ends(
    source: LogSource, consumer: Any, tps: Sequence[Any], floor: Mapping[Any, int]
) -> tuple[dict[Any, int], dict[Any, int]]:
    """Where to read each partition to, and the partitions whose committed end the broker
    did not report.

    The end is the committed end (read_committed ListOffsets: the last stable offset; a
    transaction still open beyond it is not part of the log yet).  A broker may answer 0
    instead while a transaction is open in the partition (tansu does): when the answer is
    below what was already read (``floor``) or 0 although the partition holds records, the
    end is the partition's log end (read_uncommitted ListOffsets) and the partition is
    returned in the second map; its records become readable once the transaction ends.
    Positions, not record counts, measure the read, so transaction markers and aborted
    transactions inside the range are no missing records.
    """
    ends = _end_offsets(consumer, tps, source)
    unsure = [tp for tp in tps if ends[tp] <= 0 or ends[tp] < floor.get(tp, 0)]
    if not unsure:
        return dict(ends), {}
    probe = source.consumer(isolation_level="read_uncommitted")
    try:
        logged = _end_offsets(probe, unsure, source)
    finally:
        probe.close()
    out = dict(ends)
    open_: dict[Any, int] = {}
    for tp in unsure:
        if logged[tp] <= 0 and floor.get(tp, 0) <= 0:
            out[tp] = 0  # empty
            continue
        out[tp] = max(logged[tp], floor.get(tp, 0))
        open_[tp] = out[tp]
    return out, open_


class Fetcher:
    """One consumer reading several partitions, each from its own offset up to its own end
    offset (:func:`read_ends`).

    Progress is the consumer's position per partition, which moves past transaction
    markers and records it does not return, never a count of records.  The caller says
    which partitions to fetch on each :meth:`poll` (``want``): a partition it does not
    want (its buffer is full) is *unassigned* and assigned again, at the offset it had
    reached, when wanted again.  (kafka-python's ``pause()`` keeps the records it already
    parsed for a paused partition and gives them back only while no other partition's
    records are in hand; with several partitions a paused one could stay silent for
    good, and a read waited for records that never came.)
    """

    def __init__(self, source: LogSource, consumer: Any, tps: Sequence[Any], what: str) -> None:
        self.source = source
        self.consumer = consumer
        self.tps = list(tps)
        self.what = what
        self.next: dict[Any, int] = dict.fromkeys(self.tps, 0)  # next offset to read
        self.ends: dict[Any, int] = dict.fromkeys(self.tps, 0)
        self.open: dict[Any, int] = {}  # committed end not reported (open transaction)
        self.moves = 0  # polls that moved a position or returned records
        self._assigned: set[Any] = set()

    def start(self, offsets: Mapping[Any, int]) -> None:
        """Read each partition from ``offsets[tp]``."""
        for tp, offset in offsets.items():
            self.next[tp] = offset
            if tp in self._assigned:
                self.consumer.seek(tp, offset)

    def refresh_ends(self, tps: Iterable[Any] | None = None) -> None:
        """Take the partitions' current ends as the end of the read."""
        chosen = self.tps if tps is None else list(tps)
        if not chosen:
            return
        ends, open_ = read_ends(self.source, self.consumer, chosen, self.next)
        self.ends.update(ends)
        for tp in chosen:
            self.open.pop(tp, None)
        self.open.update(open_)

    def due(self, tp: Any) -> bool:
        """Records before the partition's end offset are not read yet."""
        return bool(self.next[tp] < self.ends[tp])

    def poll(self, want: set[Any]) -> dict[Any, list[Any]]:
        """One fetch from the partitions in ``want``; their positions are updated."""
        self._assign(want)
        if not want:
            return {}
        consumer = self.consumer
        try:
            batch: dict[Any, list[Any]] = consumer.poll(timeout_ms=_POLL_MS)
            moved = bool(batch)
            for tp in want:
                position = consumer.position(tp)
                if position != self.next[tp]:
                    moved = True
                    self.next[tp] = position
        except KafkaError as exc:
            raise LogUnavailable(
                f"{self.what}: fetching from {self.source.where} failed: {exc}"
            ) from exc
        if moved:
            self.moves += 1
        return batch

    def _assign(self, want: set[Any]) -> None:
        if want == self._assigned:
            return
        consumer = self.consumer
        if want:
            consumer.assign(sorted(want))
            for tp in want - self._assigned:
                consumer.seek(tp, self.next[tp])
        else:
            consumer.unsubscribe()
        self._assigned = set(want)

    def unread(self, tps: Iterable[Any]) -> list[tuple[str, int, int, int]]:
        """``(topic, partition, first, last)`` offsets not read of each partition."""
        return [
            (tp.topic, tp.partition, self.next[tp], self.ends[tp] - 1)
            for tp in sorted(tps)
            if self.due(tp)
        ]


class Watch:
    """Gives up on a read whose positions stop moving: when no poll has moved a position
    for ``timeout_s``, the ends are asked again (the broker must answer: else
    LogUnavailable) and, if records are still due, :class:`LogIncomplete` names the
    offsets that could not be read.  A deadline for giving up, never a proof of the end:
    a read is complete only when every partition's position reached its end offset."""

    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher
        self.moves = fetcher.moves
        self.since = time.monotonic()

    def check(self, due: Iterable[Any]) -> None:
        fetcher = self.fetcher
        now = time.monotonic()
        if fetcher.moves != self.moves:
            self.moves = fetcher.moves
            self.since = now
            return
        timeout = fetcher.source.timeout_s
        if now - self.since < timeout:
            return
        stuck = [tp for tp in due if fetcher.due(tp)]
        before = {tp: fetcher.ends[tp] for tp in stuck}
        fetcher.refresh_ends(stuck)  # raises LogUnavailable when the broker is gone
        if any(fetcher.ends[tp] != end for tp, end in before.items()):
            self.since = now  # a transaction ended meanwhile: the ends moved
            return
        unread = fetcher.unread(stuck)
        if not unread:
            return
        ranges = ", ".join(f"{t}[{p}] offsets {a}-{b}" for t, p, a, b in unread)
        why = (
            " a Kafka transaction is still open there (a producer that neither committed nor "
            "aborted, e.g. a cdc that was killed and not started again); read_committed "
            "readers cannot read past its first record"
            if any(tp in fetcher.open for tp in stuck)
            else " the broker answers but returns none of them"
        )
        raise LogIncomplete(
            f"{fetcher.what}: could not read {ranges} of {fetcher.source.where} "
            f"(position unchanged for {timeout:.0f} s):{why}",
            unread,
        )


def offset_of_position(source: LogSource, consumer: Any, tp: Any, position: Pos, begin: int) -> int:
    """The first offset of ``tp`` whose record is at or after ``position`` (binary search
    on single-record probes; positions grow with offsets).  Conservative: a few thousand
    records before it, so a stray duplicate cannot make it skip events."""
    end = read_ends(source, consumer, [tp], {tp: begin})[0][tp]
    probe = source.consumer(max_poll_records=1, max_partition_fetch_bytes=1 << 20)
    try:
        fetcher = Fetcher(source, probe, [tp], f"probing {_tp_text(tp)}")
        fetcher.ends[tp] = end
        low, high = begin, end
        while high - low > 1000:
            mid = (low + high) // 2
            found = _probe(fetcher, tp, mid)
            if found is None or found >= position:
                high = mid
            else:
                low = mid
        return int(max(begin, low - 1000))
    finally:
        probe.close()


def _probe(fetcher: Fetcher, tp: Any, offset: int) -> Pos | None:
    """The position of the first record at or after ``offset`` (None: none before the end)."""
    fetcher.start({tp: offset})
    watch = Watch(fetcher)
    while fetcher.due(tp):
        for recs in fetcher.poll({tp}).values():
            for r in recs:
                found = position_in_headers(r.headers)
                if found is not None:
                    return found
        watch.check([tp])
    return None
