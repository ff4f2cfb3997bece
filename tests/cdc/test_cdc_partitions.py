"""Change topics with several partitions (``[kafka] topic_partitions``): a row's events stay
in one partition, in order, and the log still rebuilds the table (replay verify)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.avro_envelope import POSITION_HEADER, parse_position_header
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
