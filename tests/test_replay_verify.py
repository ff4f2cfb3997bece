"""``fieldsync replay verify`` sees what it is for: it reads every partition of a
multi-table log to its end (a 50,000-row transaction, transaction markers, aborted and
fenced transactions in the middle of partitions), says which offsets it could not read
when a transaction stays open, and finds a difference in every column kind, including
columns the log never carried for a row."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cdc.avro_envelope import POSITION_HEADER, parse_position_header
from cdc.replay import LogIncomplete, LogReader, LogSource
from tests.cdc_support import running_daemon
from tests.fix_kafka import read_topic
from tests.test_replay import Env


@pytest.fixture
def env(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Iterator[Env]:
    e = Env(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    try:
        yield e
    finally:
        e.close()


def _copy_in_transaction(
    bootstrap: str, transactional_id: str, records: list[Any], *, end: str
) -> Any:
    """Send ``records`` again (same key, value and position header: re-deliveries) in one
    Kafka transaction that ends as ``end`` says: ``abort``; ``fence`` (left open, then a
    new producer with the same transactional id takes over, as a restarted cdc does: Kafka
    aborts the open transaction, tansu commits it); ``open`` (left open; the producer is
    returned, the caller closes it)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
    producer.init_transactions()
    producer.begin_transaction()
    for r in records:
        producer.send(
            r.topic, key=r.key, value=r.value, headers=list(r.headers), partition=r.partition
        )
    producer.flush()
    if end == "abort":
        producer.abort_transaction()
        producer.close()
        return None
    if end == "fence":
        successor = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
        successor.init_transactions()
        successor.close()
        with contextlib.suppress(Exception):  # the fenced producer may complain on close
            producer.close(timeout=2)
        return None
    return producer


def _positions(records: list[Any]) -> list[tuple[int, int]]:
    return [parse_position_header(dict(r.headers)[POSITION_HEADER]) for r in records]


# --------------------------------------------------------------------------- reading


def test_verify_reads_every_partition_of_a_multi_table_log_to_its_end(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three tables, one transaction of 50,000 rows (40,000 of ``c``, 10,000 of ``b``, one
    of ``a``), then re-deliveries of some of their records in an aborted and in a fenced
    Kafka transaction, then more changes: verify without --table reads every partition to
    its end offset and agrees.  (Partitions fill the reader's per-partition buffer while
    the consumer still holds more of their records and other partitions are read: the
    path on which a paused partition stayed silent and the read gave up.)"""
    # a bound below one poll's worth of records (10,000), so every partition of the big
    # transaction reaches it while the consumer holds more of its records
    monkeypatch.setattr("cdc.replay._BUFFER_HIGH", 3_000)
    for t in "abc":
        env.sql(f"create table {t} (id int primary key, v text)")
    with running_daemon(env.settings):
        env.sql("insert into a select g, 'a' || g from generate_series(1, 20) g")
        env.sql("insert into b select g, 'b' || g from generate_series(1, 20) g")
        with env.conn.transaction():
            env.sql("insert into a values (100, 'inside')")
            env.sql("insert into c select g, 'c' || g from generate_series(1, 40000) g")
            env.sql("insert into b select g, 'b' || g from generate_series(100, 10099) g")
        env.sql("insert into a values (101, 'after')")
        env.events("a", 22)  # cdc writes in commit order: the big transaction is in Kafka

        topic = {t: f"{env.prefix}.public.{t}" for t in "abc"}
        c_records = read_topic(env.bootstrap, topic["c"], timeout=60, expect=40_000)
        a_records = read_topic(env.bootstrap, topic["a"], timeout=30, expect=22)
        b_records = read_topic(env.bootstrap, topic["b"], timeout=30, expect=10_020)
        _copy_in_transaction(
            env.bootstrap,
            f"{env.prefix}-crashed",
            c_records[20_000:23_000] + a_records[:5],
            end="abort",
        )
        _copy_in_transaction(
            env.bootstrap,
            f"{env.prefix}-fenced",
            c_records[30_000:31_000] + b_records[5_000:5_300],
            end="fence",
        )
        env.sql("update c set v = 'later' where id <= 10")
        env.sql("update b set v = 'later' where id <= 3")
        env.sql("insert into a values (102, 'last')")
        env.events("a", 23)
        result = env.cli("verify", "-q", "--json", "--wait", "60")
    report = json.loads(result.stdout)
    assert report["ok"] is True, report["differences"][:5]
    assert report["tables"] == ["public.a", "public.b", "public.c"]
    assert report["rows_compared"] == 23 + 10_020 + 40_000

    # every partition was read to the end offset the broker reports now
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=env.bootstrap, isolation_level="read_committed")
    try:
        ends = consumer.end_offsets([TopicPartition(topic[t], 0) for t in "abc"])
    finally:
        consumer.close()
    read = {p["topic"]: p for p in report["partitions"]}
    assert set(read) == set(topic.values())
    for tp, end in ends.items():
        assert read[tp.topic]["end"] == end > 0
        assert read[tp.topic]["read_to"] >= end, read[tp.topic]

    # what a plain read_committed consumer sees, the reader saw: every visible record,
    # the re-delivered ones dropped as duplicates (tansu shows aborted and fenced
    # transactions to read_committed readers; Kafka shows neither)
    visible = [r for t in "abc" for r in read_topic(env.bootstrap, topic[t], timeout=60)]
    distinct = set(_positions(visible))
    stats = report["read"]
    assert stats["records"] == len(visible)
    assert stats["duplicates"] == len(visible) - len(distinct)
    assert stats["events"] == len(distinct) == 23 + 10_020 + 40_000 + 3 + 10  # + updates


def test_a_transaction_left_open_is_named_with_its_offsets_until_it_ends(env: Env) -> None:
    """A producer that neither commits nor aborts (a cdc killed and not started again)
    leaves a transaction open.  Kafka reports the last stable offset as the end, so the
    read ends before it; tansu reports no committed end at all, so the reader reads to
    the partition's log end, and when it cannot get past the open transaction it names
    the partition and the offsets it could not read instead of waiting or calling the
    read complete.  Once the transaction commits, the same read gets every record."""
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    from cdc.avro_envelope import Source, position_header
    from tests.test_replay import _codec

    codec = _codec(env.prefix)
    topic = f"{env.prefix}.public.t"
    admin = KafkaAdminClient(bootstrap_servers=env.bootstrap)
    admin.create_topics([NewTopic(topic, 1, 1), NewTopic(f"{env.prefix}._schemas", 1, 1)])
    admin.close()

    def send(producer: Any, n: int) -> Any:
        lsn = 0x2000 + n
        source = Source("app", "public", "t", lsn, lsn, 1, 0, 1_700_000_000_000_000 + n)
        key, value = codec.encode_change("c", None, [str(n), f"v{n}"], source, 0)
        return producer.send(
            topic, key=key, value=value, headers=[(POSITION_HEADER, position_header(lsn, 0))]
        )

    committed = KafkaProducer(bootstrap_servers=env.bootstrap, transactional_id=f"{env.prefix}-a")
    committed.init_transactions()
    committed.begin_transaction()
    for schema in (codec.value_schema_json, codec.key_schema_json):
        assert schema is not None
        committed.send(f"{env.prefix}._schemas", value=schema.encode())
    for n in range(30):
        send(committed, n)
    committed.commit_transaction()
    committed.close()
    hanging = KafkaProducer(bootstrap_servers=env.bootstrap, transactional_id=f"{env.prefix}-b")
    hanging.init_transactions()
    hanging.begin_transaction()
    first_open = send(hanging, 30).get(timeout=30).offset
    for n in range(31, 35):
        send(hanging, n)
    hanging.flush()
    try:
        source = LogSource({"bootstrap_servers": env.bootstrap}, env.prefix, timeout_s=2)
        try:
            with LogReader(source, ["t"]) as reader:
                ids = [ev.after["id"] for ev in reader.events() if ev.after]
        except LogIncomplete as exc:  # tansu: no committed end while the transaction is open
            assert exc.unread and exc.unread[0][:3] == (topic, 0, first_open)
            assert f"{topic}[0] offsets {first_open}-" in str(exc)
            assert "still open" in str(exc)
        else:  # Kafka: the last stable offset ends the read before the open transaction
            assert ids == list(range(30))
        hanging.commit_transaction()
    finally:
        hanging.close()
    with LogReader(source, ["t"]) as reader:
        assert [ev.after["id"] for ev in reader.events() if ev.after] == list(range(35))
        assert all(p["read_to"] >= p["end"] > first_open for p in reader.read_to())
