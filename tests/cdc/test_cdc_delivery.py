"""The delivery protocol's invariants, one at a time (the crash test drives them all at once).

- the resume position in ``_cdc_state`` never claims an event the broker does not hold,
  whatever the broker does with a transaction its producer left open;
- a Kafka transaction that brings a new topic commits every record (kafka-python's
  metadata refresh must not forget the other topics' partition leaders);
- the resume position is read only when no transaction on the state topic is open;
- at commit the resume position's partition joins the Kafka transaction with the events';
- a transaction whose events all reached Kafka before its end did is recorded complete
  before the slot passes it;
- the assembler refuses transactions out of commit order (its skipping relies on it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from cdc import pgoutput_messages as m
from cdc.change_assembler import ChangeAssembler, OutEvent, TxnEnd
from cdc.errors import DecodeError, SinkUnavailable, parse_lsn
from cdc.fault_points import ENV_VAR, FaultPoints
from cdc.kafka_sink import KafkaOptions, KafkaTransactionalSink, state_topic
from cdc.kafka_state import read_compacted, read_resume_position
from cdc.pipeline import kafka_options
from cdc.resnapshot_state import read_state_records, resnapshot_topic
from cdc.resume_position import ResumePosition
from tests.cdc.cdc_crash_workload import read_all
from tests.cdc.cdc_support import make_settings, running_daemon, wait_for
from tests.cdc.test_cdc_cli import REPO
from tests.cdc.test_change_assembler import REL, FakeCatalog, MemorySpill, ins, txn


def options(bootstrap: str, prefix: str, **kw: Any) -> KafkaOptions:
    return KafkaOptions(bootstrap, prefix, f"tx-{prefix}", timeout_s=kw.pop("timeout_s", 10), **kw)


def values(bootstrap: str, topic: str) -> list[bytes]:
    return [r.value for r in read_all(bootstrap, topic, timeout=30)]


# --------------------------------------------------------------------------- sink


def test_a_new_topic_in_the_first_transaction_commits_every_record(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A producer that knows topic A from its start-up metadata writes A and a topic B it
    creates in the same Kafka transaction: the commit succeeds and both are complete.
    (kafka-python tracked only B, so the refresh for B dropped A's leader: A's batch
    waited forever, B's batch and the resume position reached the broker.)"""
    opts = options(kafka_bootstrap, topic_prefix)
    a, b = f"{topic_prefix}.public.a", f"{topic_prefix}.public.b"
    first = KafkaTransactionalSink(opts, "slot")
    first.send(a, b"k0", b"a0", [])
    first.commit(ResumePosition(1, 0, True))
    first.close()
    sink = KafkaTransactionalSink(opts, "slot")
    try:
        sink.begin()
        for i in range(3):
            sink.send(a, b"k%d" % i, b"a%d" % (i + 1), [])
        sink.send(b, b"k", b"b0", [])
        sink.commit(ResumePosition(2, 3, True))
    finally:
        sink.close()
    assert values(kafka_bootstrap, a) == [b"a0", b"a1", b"a2", b"a3"]
    assert values(kafka_bootstrap, b) == [b"b0"]
    assert read_resume_position(opts, "slot", timeout_s=60) == ResumePosition(2, 3, True)


def test_records_sent_while_a_commit_is_in_flight_go_into_the_next_transaction(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Records sent while a commit is in flight (``start_commit``) are buffered, not put
    into the committing transaction: each committed resume position covers exactly the
    records sent before it, every record is there once and in order, and a commit that
    needs a full buffer or a schema handed over waits for the commit in flight first."""
    opts = options(kafka_bootstrap, topic_prefix)
    topic = f"{topic_prefix}.public.t"
    sink = KafkaTransactionalSink(opts, "slot")
    sent: list[bytes] = []
    try:
        for t in range(1, 4):
            for i in range(3):
                sent.append(b"%d:%d" % (t, i))
                sink.send(topic, b"k%d" % i, sent[-1], [])
            if t == 2:
                # batch 2 is buffered while commit 1 is in flight: commit 1 holds batch 1 only
                assert sink.wait_commit(None) is not None
                assert values(kafka_bootstrap, topic) == sent[:3]
                assert read_resume_position(opts, "slot", timeout_s=60) == ResumePosition(
                    1, 2, True
                )
                sink.publish_schema(b"\x01" * 8, '{"type": "string"}')
            sink.start_commit(ResumePosition(t, 2, True))
        big = b"x" * 100_000  # three fill a record batch: handed over after commit 3 settles
        for i in range(4):
            sent.append(big + b"%d" % i)
            sink.send(topic, None, sent[-1], [])
        assert sink.wait_commit(None) is not None
        sink.commit(ResumePosition(4, 3, True))
    finally:
        sink.close()
    assert values(kafka_bootstrap, topic) == sent
    assert read_resume_position(opts, "slot", timeout_s=60) == ResumePosition(4, 3, True)


def test_the_resume_positions_partition_joins_the_transaction_with_the_events(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """At commit the state topic's partition joins the Kafka transaction with the events'
    partitions (one AddPartitionsToTxn request), before the resume position is sent; the
    commit holds the events and the resume position as ever."""
    from kafka.structs import TopicPartition

    opts = options(kafka_bootstrap, topic_prefix)
    topic = f"{topic_prefix}.public.t"
    sink = KafkaTransactionalSink(opts, "slot")
    try:
        assert sink._bulk is not None, "this kafka-python lacks the bulk path's internals"
        manager = sink.producer._transaction_manager

        def joined(tp: TopicPartition) -> bool:
            return bool(manager.is_partition_added(tp) or manager.is_partition_pending_add(tp))

        sink.begin()
        sink.send(topic, b"k", b"v", [])
        state = TopicPartition(state_topic(topic_prefix), 0)
        assert not joined(state)
        sink._bulk.hand_over_all(then=(state.topic, b"slot"))
        assert joined(TopicPartition(topic, 0)) and joined(state)
        sink.commit(ResumePosition(1, 0, True))
    finally:
        sink.close()
    assert values(kafka_bootstrap, topic) == [b"v"]
    assert read_resume_position(opts, "slot", timeout_s=60) == ResumePosition(1, 0, True)


CHILD = """
import sys
from cdc.kafka_sink import KafkaOptions, KafkaTransactionalSink
from cdc.resume_position import ResumePosition
bootstrap, prefix = sys.argv[1:3]
sink = KafkaTransactionalSink(KafkaOptions(bootstrap, prefix, "tx-" + prefix, timeout_s=10), "slot")
for t in (1, 2):
    for i in range(3):
        sink.send(prefix + ".public.t", b"k%d" % i, b"%d:%d" % (t, i), [])
    sink.commit(ResumePosition(t, 2, True))
"""


@pytest.mark.parametrize("point", ["after_events_sent", "before_kafka_commit"])
def test_resume_position_never_claims_events_the_broker_lacks(
    point: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A producer killed (SIGKILL) in its second Kafka transaction, after the events were
    acknowledged / after the resume position was too.  Whatever the broker does with the
    open transaction when the next producer fences it (Apache Kafka aborts it; tansu
    commits it), every event at or before the resume position read back is there."""
    env = dict(os.environ, **{ENV_VAR: f"{point}:2"}, PYTHONPATH=str(REPO))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, kafka_bootstrap, topic_prefix],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -9, child.stderr[-2000:]
    assert f"fault point {point} reached" in child.stderr
    opts = options(kafka_bootstrap, topic_prefix)
    KafkaTransactionalSink(opts, "slot").close()  # the next daemon's producer fences it
    resume = read_resume_position(opts, "slot", timeout_s=30)
    assert resume is not None
    held = values(kafka_bootstrap, f"{topic_prefix}.public.t")
    claimed = [b"%d:%d" % (t, i) for t in range(1, resume.commit_lsn + 1) for i in range(3)]
    assert set(claimed) <= set(held), f"resume {resume} but the broker holds only {held}"
    if point == "after_events_sent":
        assert resume == ResumePosition(1, 2, True)


def test_open_transaction_on_the_state_topic_is_waited_for_not_guessed(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """While another producer's transaction on ``_cdc_state`` is open, the resume position
    is not read from what happens to be stable: SinkUnavailable (retried) names the open
    transaction; once it ends, the position it wrote is read."""
    from kafka import KafkaProducer

    opts = options(kafka_bootstrap, topic_prefix, timeout_s=30)
    sink = KafkaTransactionalSink(opts, "slot")
    sink.send(f"{topic_prefix}.public.t", b"k", b"v", [])
    sink.commit(ResumePosition(1, 0, True))
    sink.close()
    other = KafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"other-{topic_prefix}"
    )
    try:
        other.init_transactions()
        other.begin_transaction()
        other.send(
            state_topic(topic_prefix), key=b"slot", value=ResumePosition(2, 0, True).to_json()
        )
        other.flush()
        # the deadline must cover finding the topic on a busy machine before the wait for
        # the open transaction, whose end it would otherwise report instead
        with pytest.raises(SinkUnavailable, match="transaction is still open"):
            read_resume_position(opts, "slot", timeout_s=10)
        other.commit_transaction()
    finally:
        other.close()
    assert read_resume_position(opts, "slot", timeout_s=60) == ResumePosition(2, 0, True)


# --------------------------------------------------------------------------- pipeline


def test_transaction_ending_at_a_batch_boundary_is_recorded_complete(
    pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A transaction of exactly ``batch_max_events`` changes: its last event fills a batch,
    which is committed before its end is read (resume position complete=false).  Its end
    is then recorded (complete=true) before the slot is confirmed past it."""
    settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix, kafka_batch_max_events="50")
    slot = settings.postgres.slot
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table t (id int primary key)")
        with running_daemon(settings):
            conn.execute("insert into t select generate_series(1, 50)")
            end = parse_lsn(conn.execute("select pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]

            def confirmed() -> int:
                row = conn.execute(
                    "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = %s",
                    (slot,),
                ).fetchone()
                return parse_lsn(row[0]) if row and row[0] else 0

            wait_for(lambda: confirmed() >= end, what="the slot to pass the transaction")
            resume = read_resume_position(kafka_options(settings), slot, timeout_s=10)
    assert resume is not None and resume.seq == 49 and resume.complete, resume


def test_a_tombstone_deletes_a_state_record_for_every_reader(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Both compacted state topics are read by one reader with one rule: the last record of
    a key is its value, and a tombstone deletes it, whether or not the broker compacted the
    topic yet.  (The resume position used to skip tombstones and return the value before
    one, until compaction removed that value too.)"""
    from kafka import KafkaProducer

    opts = options(kafka_bootstrap, topic_prefix)
    state, resnapshot = state_topic(topic_prefix), resnapshot_topic(topic_prefix)
    assert read_compacted(opts, state, [b"slot"], timeout_s=10) == {}  # creates the topic
    assert read_state_records(opts, [b"a"], timeout_s=10) == {}
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    try:
        producer.send(state, key=b"slot", value=ResumePosition(5, 1, True).to_json())
        producer.send(state, key=b"other", value=ResumePosition(9, 0, True).to_json())
        producer.send(resnapshot, key=b"a", value=b"first")
        producer.send(resnapshot, key=b"b", value=b"kept")
        producer.flush()
        assert read_resume_position(opts, "slot", timeout_s=60) == ResumePosition(5, 1, True)
        producer.send(state, key=b"slot", value=None)
        producer.send(resnapshot, key=b"a", value=None)
        producer.flush()
        assert read_resume_position(opts, "slot", timeout_s=60) is None
        assert read_resume_position(opts, "other", timeout_s=60) == ResumePosition(9, 0, True)
        assert read_state_records(opts, [b"a", b"b"], timeout_s=60) == {b"b": b"kept"}
        producer.send(state, key=b"slot", value=ResumePosition(7, 0, True).to_json())
        producer.send(resnapshot, key=b"a", value=b"again")
        producer.flush()
    finally:
        producer.close()
    assert read_resume_position(opts, "slot", timeout_s=60) == ResumePosition(7, 0, True)
    assert read_state_records(opts, [b"a", b"b"], timeout_s=60) == {b"a": b"again", b"b": b"kept"}


# --------------------------------------------------------------------------- assembler


def test_transactions_out_of_commit_order_are_refused() -> None:
    asm = ChangeAssembler(
        db="db",
        topic_prefix="fs",
        catalog=FakeCatalog({16384: ("id",)}),
        spill=MemorySpill(),
        resume=ResumePosition(300, 0, True),
    )
    for i, msg in enumerate([REL, *txn(7, 200, ins(1)), *txn(8, 400, ins(2))]):
        list(asm.feed(msg, 1000 + i))
    with pytest.raises(DecodeError, match="not after the previous one"):
        list(asm.feed(m.Begin(350, 5_000_000, 9), 2000))


def test_a_transaction_skipped_whole_still_reports_its_events() -> None:
    """Kafka holds every event of the transaction at 200 but not that it is complete (a
    batch ended at its last event): nothing is written again, and its end still counts
    its events, which is how the pipeline knows to record it complete before confirming."""
    asm = ChangeAssembler(
        db="db",
        topic_prefix="fs",
        catalog=FakeCatalog({16384: ("id",)}),
        spill=MemorySpill(),
        resume=ResumePosition(200, 2, False),
    )
    out: list[Any] = []
    for i, msg in enumerate([REL, *txn(8, 200, ins(1), ins(2), ins(3)), *txn(9, 300, ins(4))]):
        out.extend(asm.feed(msg, 1000 + i))
    assert [(o.commit_lsn, o.seq) for o in out if isinstance(o, OutEvent)] == [(300, 0)]
    assert [(o.commit_lsn, o.events) for o in out if isinstance(o, TxnEnd)] == [(200, 3), (300, 1)]


def test_fault_points_parse_and_count() -> None:
    died: list[str] = []
    faults = FaultPoints.parse("after_kafka_commit:2, spill_replay", died.append)
    assert faults.armed
    faults.hit("after_kafka_commit")
    faults.hit("snapshot_batch")  # not armed: never dies
    assert died == []
    faults.hit("after_kafka_commit")
    faults.hit("spill_replay")
    assert died == ["after_kafka_commit", "spill_replay"]
    assert not FaultPoints.parse("", died.append).armed
    with pytest.raises(ValueError, match="unknown fault point"):
        FaultPoints.parse("nowhere:1")
    with pytest.raises(ValueError, match="name:countdown"):
        FaultPoints.parse("spill_replay:x")
