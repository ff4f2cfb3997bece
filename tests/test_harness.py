"""The test harness itself: real PostgreSQL with logical WAL, a real broker."""

from __future__ import annotations

import psycopg
from kafka import KafkaProducer


def test_postgres_has_logical_wal(pg_conn: psycopg.Connection) -> None:  # type: ignore[type-arg]
    assert pg_conn.execute("show wal_level").fetchone() == ("logical",)


def test_broker_round_trip(kafka_bootstrap: str, topic_prefix: str, kafka_reader) -> None:  # type: ignore[no-untyped-def]
    topic = f"{topic_prefix}.harness"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    producer.send(topic, key=b"k", value=b"v", headers=[("h", b"1")]).get(timeout=10)
    producer.close()
    records = kafka_reader(topic, expect=1)
    assert [(r.key, r.value, r.headers) for r in records] == [(b"k", b"v", [("h", b"1")])]


def test_reading_fewer_records_than_expected_fails_naming_the_topic(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    import pytest

    from tests.fix_kafka import TopicReadTimeout, read_topic

    topic = f"{topic_prefix}.harness_short"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    producer.send(topic, value=b"only one").get(timeout=10)
    producer.close()
    assert [r.value for r in read_topic(kafka_bootstrap, topic)] == [b"only one"]
    with pytest.raises(TopicReadTimeout, match=f"read 1 records of {topic} in 2 s, not 2 records"):
        read_topic(kafka_bootstrap, topic, timeout=2, expect=2)
