"""How far a consumer of Kafka partitions is behind, read from outside the consumer.

The bucket engine keeps its progress in the bucket store, the applier in the captured
database (the next offset to apply per partition); :func:`partition_lag` compares such
progress with the partitions' end offsets, for ``fieldsync status``.

Lag in records is the end offset minus the next offset to apply (never below the
partition's first offset: what retention removed cannot be applied).  Offsets count
Kafka's transaction markers too (cdc writes in transactions), so a consumer that applied
every record of a partition still sits one offset or more below its end.  A partition
with a gap is therefore *settled*: a ``read_committed`` consumer is put at the next offset
to apply and polled until it either returns a record (something committed waits: the lag
is the gap, an upper bound) or reaches the end without one (nothing waits: 0).  A gap the
time limit leaves undecided keeps its upper bound.  At most one fetch of
:data:`PROBE_FETCH_BYTES` per partition is read, never the whole gap.

Concurrency: each call opens one consumer of its own (no consumer group, nothing
committed) and closes it; it blocks for about ``timeout_s`` at most.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from core.kafka_options import build_client, is_kafka_error, within_timeout
from relay.errors import BrokerUnavailable

__all__ = ["PROBE_FETCH_BYTES", "PartitionLag", "TopicsLag", "partition_lag"]

PROBE_FETCH_BYTES: Final = 64 * 1024
"""The most one fetch of the settling probe reads per partition."""

Partition = tuple[str, int]


@dataclasses.dataclass(frozen=True, slots=True)
class PartitionLag:
    """One partition: its end offset, the next offset the consumer applies, the records
    between them that wait (0 when only transaction markers are left)."""

    topic: str
    partition: int
    end_offset: int
    next_offset: int
    records: int


@dataclasses.dataclass(frozen=True, slots=True)
class TopicsLag:
    """Every partition of the topics that exist, and the topics that do not (yet)."""

    partitions: tuple[PartitionLag, ...]
    missing_topics: tuple[str, ...]

    @property
    def records(self) -> int:
        return sum(p.records for p in self.partitions)


def partition_lag(
    kafka: Mapping[str, Any],
    topics: Sequence[str],
    applied: Mapping[Partition, int],
    *,
    owns: Callable[[int], bool] | None = None,
    timeout_s: float = 10.0,
) -> TopicsLag:
    """The lag of a consumer of ``topics`` whose next offsets are ``applied`` (a partition
    absent from it starts at its beginning); ``owns``: the partitions it consumes (a
    shard's), all when None.  Raises :class:`BrokerUnavailable` naming the brokers."""
    from kafka import KafkaConsumer

    servers = ",".join(kafka.get("bootstrap_servers") or ())
    bounded = within_timeout(dict(kafka), timeout_s)  # each request within timeout_s
    try:
        consumer = build_client(
            KafkaConsumer,
            **bounded,
            isolation_level="read_committed",
            enable_auto_commit=False,
            group_id=None,
            allow_auto_create_topics=False,
            max_partition_fetch_bytes=PROBE_FETCH_BYTES,
            fetch_max_wait_ms=100,
        )
    except Exception as exc:
        if not is_kafka_error(exc):
            raise
        raise BrokerUnavailable(f"cannot reach the Kafka brokers {servers}: {exc}") from exc
    try:
        return _lag(consumer, topics, applied, owns, time.monotonic() + timeout_s)
    except Exception as exc:
        if not is_kafka_error(exc):
            raise
        raise BrokerUnavailable(f"reading offsets from the Kafka brokers {servers}: {exc}") from exc
    finally:
        consumer.close()


def _lag(
    consumer: Any,
    topics: Sequence[str],
    applied: Mapping[Partition, int],
    owns: Callable[[int], bool] | None,
    deadline: float,
) -> TopicsLag:
    from kafka import TopicPartition

    tps: list[Any] = []
    missing: list[str] = []
    for topic in topics:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            missing.append(topic)
            continue
        tps += [TopicPartition(topic, p) for p in sorted(parts) if owns is None or owns(p)]
    if not tps:
        return TopicsLag((), tuple(missing))
    begins = consumer.beginning_offsets(tps)
    ends = consumer.end_offsets(tps)
    starts = {tp: max(applied.get((tp.topic, tp.partition), 0), begins[tp]) for tp in tps}
    gaps = [tp for tp in tps if ends[tp] > starts[tp]]
    empty = _settle(consumer, gaps, starts, ends, deadline) if gaps else set()
    return TopicsLag(
        tuple(
            PartitionLag(
                tp.topic,
                tp.partition,
                ends[tp],
                starts[tp],
                0 if tp in empty else max(0, ends[tp] - starts[tp]),
            )
            for tp in tps
        ),
        tuple(missing),
    )


def _settle(
    consumer: Any,
    gaps: list[Any],
    starts: Mapping[Any, int],
    ends: Mapping[Any, int],
    deadline: float,
) -> set[Any]:
    """The partitions of ``gaps`` that hold nothing committed between their start and end
    (see the module docstring)."""
    consumer.assign(gaps)
    for tp in gaps:
        consumer.seek(tp, starts[tp])
    open_ = set(gaps)
    empty: set[Any] = set()
    while open_ and time.monotonic() < deadline:
        polled = consumer.poll(timeout_ms=200, max_records=len(gaps))
        for tp, records in polled.items():
            if records and tp in open_:
                open_.discard(tp)  # something committed waits: keep the gap
                consumer.pause(tp)
        for tp in list(open_):
            if consumer.position(tp) >= ends[tp]:
                open_.discard(tp)
                empty.add(tp)
    return empty
