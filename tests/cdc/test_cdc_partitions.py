"""Change topics with several partitions (``[kafka] topic_partitions``): a row's events stay
in one partition, in order, and the log still rebuilds the table (replay verify)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdc.kafka_bulk import partition_of
from cdc.kafka_sink import KafkaOptions, KafkaTransactionalSink
from cdc.resume_position import ResumePosition
from core.avro_envelope import MAGIC, POSITION_HEADER, parse_position_header
from tests.cdc.cdc_support import make_settings, running_daemon
from tests.fix_kafka import read_topic
from tests.replay.test_replay import Env

PARTITIONS = 3


@pytest.fixture
def env(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Iterator[Env]:
    e = Env(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    e.settings = make_settings(
        pg_dsn, kafka_bootstrap, topic_prefix, kafka_topic_partitions=str(PARTITIONS)
    )
    try:
        yield e
    finally:
        e.close()


def test_a_rows_events_stay_in_one_partition_in_order_and_the_log_verifies(env: Env) -> None:
    env.sql("create table t (id int primary key, v text)")
    with running_daemon(env.settings):
        env.sql("insert into t select g, 'v' || g from generate_series(1, 300) g")
        env.sql("update t set v = 'changed' where id % 2 = 0")
        env.sql("delete from t where id % 7 = 0")
        env.sql("update t set id = id + 1000 where id % 11 = 0")  # key changes
        env.sql("update t set v = 'moved' where id > 1000")
        env.sql("insert into t values (5000, 'last')")
        expected = 300 + 150 + 42 + 24 + 24 + 1
        records = read_topic(env.bootstrap, f"{env.prefix}.public.t", timeout=60, expect=expected)
        result = env.cli("verify", "-q", "--json", "--wait", "60")
    assert len(records) == expected
    by_partition: dict[int, list[tuple[int, int]]] = {}
    partition_of: dict[bytes, set[int]] = {}
    for r in records:
        pos = parse_position_header(dict(r.headers)[POSITION_HEADER])
        by_partition.setdefault(r.partition, []).append(pos)
        partition_of.setdefault(r.key, set()).add(r.partition)
    assert set(by_partition) == set(range(PARTITIONS))  # spread over every partition
    for positions in by_partition.values():
        assert positions == sorted(positions)  # each partition in position order
    assert all(len(parts) == 1 for parts in partition_of.values())  # a key: one partition
    report = json.loads(result.stdout)
    assert report["ok"] is True, report["differences"][:5]
    assert report["rows_compared"] == 300 - 42 + 1


def test_a_row_keeps_its_partition_when_its_key_schema_changes(env: Env) -> None:
    """int → bigint gives the key schema a new fingerprint, which is part of the Kafka
    key's bytes (single-object encoding); the datum (zigzag varint for both) is the same.
    A row's events after the change must stay in the partition of its earlier ones, else
    two engine shares (or one consumer catching up) could apply them out of order."""
    env.sql("create table t (id int primary key, v text)")
    with running_daemon(env.settings):
        env.sql("insert into t select g, 'v' || g from generate_series(1, 60) g")
        env.sql("alter table t alter column id type bigint")
        env.sql("update t set v = 'after'")
        records = read_topic(env.bootstrap, f"{env.prefix}.public.t", timeout=60, expect=120)
    partitions_of: dict[bytes, set[int]] = {}
    for r in records:
        partitions_of.setdefault(bytes(r.key[len(MAGIC) + 8 :]), set()).add(r.partition)
    assert len(partitions_of) == 60
    split = sorted(sorted(parts) for parts in partitions_of.values() if len(parts) > 1)
    assert not split, f"{len(split)} of 60 rows have events in two partitions: {split[:5]}"


@pytest.mark.parametrize("bulk", [True, False])
def test_both_send_paths_put_a_key_in_the_partition_of_its_datum(
    bulk: bool, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The bulk path and ``send()`` (kafka-python's partitioner) agree: a key's partition
    depends on its datum only, whatever fingerprint heads it; a keyless record (a truncate,
    a table without a key) goes to partition 0."""
    opts = KafkaOptions(kafka_bootstrap, topic_prefix, f"tx-{topic_prefix}", timeout_s=20)
    opts.topic_partitions, opts.bulk_records = PARTITIONS, bulk
    topic = f"{topic_prefix}.public.t"
    old, new = MAGIC + bytes(8), MAGIC + bytes(range(1, 9))
    sink = KafkaTransactionalSink(opts, "slot")
    try:
        sink.begin()
        for i in range(40):
            sink.send(topic, old + b"%d" % i, b"old", [])
            sink.send(topic, new + b"%d" % i, b"new", [])
        sink.send(topic, None, b"keyless", [])
        sink.commit(ResumePosition(1, 80, True))
    finally:
        sink.close()
    records = read_topic(kafka_bootstrap, topic, timeout=60, expect=81)
    partitions_of: dict[bytes, set[int]] = {}
    for r in records:
        if r.key is None:
            assert r.partition == 0
            continue
        partitions_of.setdefault(bytes(r.key[len(MAGIC) + 8 :]), set()).add(r.partition)
        assert r.partition == partition_of(bytes(r.key), PARTITIONS)
    assert len(partitions_of) == 40 and all(len(p) == 1 for p in partitions_of.values())
    assert len({p for parts in partitions_of.values() for p in parts}) > 1  # spread
