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
