"""Reading cdc's compacted state topics back from Kafka.

cdc keeps its own state in compacted topics, written in the same Kafka transactions as the
events they describe: the resume position (``{prefix}._cdc_state``, key = slot, see
:mod:`cdc.kafka_sink`) and the re-snapshot progress and recorded catalog
(``{prefix}._cdc_resnapshot``, see :mod:`cdc.resnapshot_state`).  Both are read by
:func:`read_compacted`, with one rule: the last committed record of a key is its value, and
a tombstone (a null value; an empty one reads the same) deletes the key.  That is what
compaction keeps, so the answer does not depend on whether the broker has compacted the
topic yet.

Reads are ``read_committed`` and go to the end the topic had when the read began, once no
Kafka transaction that was open then is open any more (:func:`_settled_end_offsets`): a
predecessor killed while committing is settled by our producer's ``init_transactions()``,
and reading before its commit markers land would miss its last record.
:func:`scan_topic` is that read for any topic, every record handed to a callback
(``fieldsync cdc recover`` reads the table topics with it, :mod:`cdc.recovery_deletes`).

Concurrency: each call opens its own consumers (no shared state) and closes them; it blocks
for at most ``timeout_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

from cdc.errors import SinkUnavailable
from cdc.kafka_sink import KafkaOptions, TopicManager, state_topic
from cdc.resume_position import ResumePosition
from core.kafka_options import build_client, kafka_errors

__all__ = ["read_compacted", "read_resume_position", "scan_topic"]


def read_compacted(
    opts: KafkaOptions, topic: str, keys: Collection[bytes], timeout_s: float = 30.0
) -> dict[bytes, bytes]:
    """The last committed value of each of ``keys`` in the compacted ``topic`` (created,
    compacted, if missing); a key whose last record is a tombstone is absent.
    SinkUnavailable (retryable) when the broker cannot be read within ``timeout_s``."""
    topics = TopicManager(opts)
    try:
        topics.ensure([topic], compacted=True)
    finally:
        topics.close()
    found: dict[bytes, bytes] = {}

    def keep(record: Any) -> None:
        if record.key in keys:
            if record.value:
                found[bytes(record.key)] = bytes(record.value)
            else:  # a tombstone deletes the key
                found.pop(bytes(record.key), None)

    scan_topic(opts, topic, keep, timeout_s)
    return found


def scan_topic(
    opts: KafkaOptions,
    topic: str,
    visit: Callable[[Any], None],
    timeout_s: float = 30.0,
    *,
    must_exist: bool = True,
) -> bool:
    """Hand every committed record of ``topic``, partition by partition in offset order,
    to ``visit`` (a kafka-python ``ConsumerRecord``), up to the settled end offsets.  The
    read fails (SinkUnavailable) only when no record arrives for ``timeout_s``.  A topic
    the broker does not know is waited for until ``timeout_s`` (``must_exist``), or read as
    empty (returns False)."""
    from kafka import KafkaConsumer, TopicPartition

    try:
        consumer = build_client(
            KafkaConsumer,
            **opts.client_kwargs(),
            isolation_level="read_committed",
            enable_auto_commit=False,
            group_id=None,
            consumer_timeout_ms=1000,
            # kafka-python insists on request_timeout_ms > fetch_max_wait_ms (default 500)
            fetch_max_wait_ms=min(500, int(opts.timeout_s * 500)),
        )
    except kafka_errors() as exc:
        raise SinkUnavailable(f"cannot read {topic} from {opts.bootstrap_servers}: {exc}") from exc
    try:
        deadline = time.monotonic() + timeout_s
        if not must_exist and topic not in consumer.topics():
            return False
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
        _read_to(consumer, tps, ends, visit, timeout_s)
        return True
    except kafka_errors() as exc:
        raise SinkUnavailable(f"reading {topic} failed: {exc}") from exc
    finally:
        consumer.close()


def _read_to(
    consumer: Any,
    tps: list[Any],
    ends: dict[Any, int],
    visit: Callable[[Any], None],
    timeout_s: float,
) -> None:
    """Poll until every partition reached its end offset, handing each record to ``visit``;
    SinkUnavailable when nothing moves for ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while any(consumer.position(tp) < ends[tp] for tp in tps):
        if time.monotonic() > deadline:
            raise SinkUnavailable(
                f"timed out reading {tps[0].topic} "
                f"(at {[consumer.position(tp) for tp in tps]} of {ends})"
            )
        for records in consumer.poll(timeout_ms=500).values():
            for r in records:
                visit(r)
            deadline = time.monotonic() + timeout_s


def read_resume_position(
    opts: KafkaOptions, slot: str, timeout_s: float = 30.0
) -> ResumePosition | None:
    """The last committed resume position of ``slot`` (None if there is none, or its last
    record is a tombstone: the slot's state was deleted)."""
    key = slot.encode()
    found = read_compacted(opts, state_topic(opts.topic_prefix), [key], timeout_s)
    return ResumePosition.from_json(found[key]) if key in found else None


def _settled_end_offsets(
    consumer: Any, opts: KafkaOptions, tps: list[Any], deadline: float
) -> dict[Any, int]:
    """The topic's end offsets once no transaction that was open when we looked is still
    open: its last stable offset (what a read_committed reader can reach) has reached the
    high watermark seen at the start.  A predecessor killed in the middle of committing is
    settled by our producer's init_transactions(); should the broker write its commit
    markers a moment later, reading before them would miss its last records (a resume
    position: events Kafka already holds would be written again).

    Waits until ``deadline`` at most, then raises :class:`SinkUnavailable` (retried):
    reading only what is stable could return an older position, or none at all, which
    would make the daemon drop its slot and start over as if no snapshot had been taken."""
    from kafka import KafkaConsumer

    try:
        probe = build_client(
            KafkaConsumer,
            **opts.client_kwargs(),
            isolation_level="read_uncommitted",
            fetch_max_wait_ms=min(500, int(opts.timeout_s * 500)),  # < request_timeout_ms
        )
    except kafka_errors() as exc:
        raise SinkUnavailable(f"cannot read {tps[0].topic}: {exc}") from exc
    try:
        high = probe.end_offsets(tps)
        stable = consumer.end_offsets(tps)
        while any(stable[tp] < high[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise SinkUnavailable(
                    f"{tps[0].topic}: a Kafka transaction is still open (last stable offsets "
                    f"{ {tp.partition: stable[tp] for tp in tps} }, written "
                    f"{ {tp.partition: high[tp] for tp in tps} }); its last records cannot be "
                    "read until the broker ends it"
                )
            time.sleep(0.05)
            stable = consumer.end_offsets(tps)
        return dict(stable)
    finally:
        probe.close()
