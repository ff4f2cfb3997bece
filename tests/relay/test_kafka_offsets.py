"""A consumer's lag read from outside (relay/kafka_offsets.py), against the real broker:
transaction markers after the last applied record are not counted as waiting, records
are, partitions of other shards and topics that do not exist are told apart, and a broker
that does not answer is named."""

from __future__ import annotations

import socket
import uuid

import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from relay.errors import BrokerUnavailable
from relay.kafka_offsets import partition_lag


def test_markers_are_settled_and_records_are_counted(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}.lag"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        admin.close()
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"lag-{uuid.uuid4().hex}"
    )
    try:
        producer.init_transactions()
        producer.begin_transaction()
        for i in range(3):
            producer.send(topic, value=b"v%d" % i, partition=0)
        producer.commit_transaction()
    finally:
        producer.close()
    kafka = {"bootstrap_servers": [kafka_bootstrap]}

    caught_up = partition_lag(kafka, [topic], {(topic, 0): 3})  # the marker sits at offset 3
    assert [
        (p.partition, p.end_offset, p.next_offset, p.records) for p in caught_up.partitions
    ] == [
        (0, 4, 3, 0),
        (1, 0, 0, 0),
    ]
    assert caught_up.records == 0 and caught_up.missing_topics == ()

    fresh = partition_lag(kafka, [topic], {})
    assert fresh.records == 4  # three records and their transaction's marker: an upper bound
    behind = partition_lag(kafka, [topic], {(topic, 0): 2})
    assert behind.records == 2

    shard = partition_lag(kafka, [topic, f"{topic_prefix}.nothing"], {}, owns=lambda p: p == 1)
    assert [p.partition for p in shard.partitions] == [1] and shard.records == 0
    assert shard.missing_topics == (f"{topic_prefix}.nothing",)


def test_a_broker_that_does_not_answer_is_named() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    servers = f"127.0.0.1:{port}"
    kafka = {
        "bootstrap_servers": [servers],
        "request_timeout_ms": 2000,
        "bootstrap_timeout_ms": 2000,
    }
    with pytest.raises(BrokerUnavailable, match=servers):
        partition_lag(kafka, ["t"], {}, timeout_s=2)
