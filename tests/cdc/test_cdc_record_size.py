"""Change events at and past ``kafka.max_message_bytes``:

- a record over the limit stops the daemon with :class:`RecordTooLarge` naming the table,
  the row's key, the commit LSN and the largest column, and saying how to go on; nothing
  after it is sent and it is not skipped: with the limit raised, the next start sends it
  (before, the error named only the topic and the raw Avro key and said to raise the
  broker's limits, which did not help: the 8 MiB limit was a constant of the producer);
- through ``send()`` (no bulk path) such a record was taken for an unreachable broker
  and retried for ever without an error naming it;
- a batch of small records followed by one just under the limit goes in two batches, so
  no batch is larger than the limit (the topic's ``max.message.bytes``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from cdc.errors import RecordTooLarge
from cdc.kafka_sink import KafkaOptions, KafkaTransactionalSink
from cdc.pipeline import CdcDaemon
from cdc.resume_position import ResumePosition
from tests.cdc.cdc_support import make_settings, running_daemon, table_events
from tests.fix_kafka import read_topic
from tests.replay.test_replay import Env

LIMIT = 1024 * 1024


def test_an_event_over_the_limit_stops_the_daemon_naming_its_row_and_is_sent_later(
    pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    env = Env(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    try:
        env.sql("create table big (k text, n int, b bytea, note text, primary key (k, n))")
        small = make_settings(
            pg_dsn, kafka_bootstrap, topic_prefix, kafka_max_message_bytes=str(LIMIT)
        )
        daemon = CdcDaemon(small)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                daemon.run()
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            assert daemon.ready.wait(60), "cdc daemon did not become ready"
            # many small rows and one just under the limit, in one transaction: all sent
            env.sql(
                "begin;"
                "insert into big select 'row', g, null, repeat('x', 200) "
                "from generate_series(1, 3000) g;"
                f"insert into big values ('under', 1, '\\x{os.urandom(LIMIT - 4096).hex()}', 'u');"
                "commit"
            )
            events = table_events(kafka_bootstrap, topic_prefix, "big", expect=3001, timeout=60)
            assert len(events) == 3001
            env.sql(f"insert into big values ('over', 7, '\\x{os.urandom(2 * LIMIT).hex()}', 'o')")
            env.sql("insert into big values ('after', 1, null, 'a')")
            thread.join(60)
            assert not thread.is_alive(), "the daemon went on past an event it cannot send"
        finally:
            daemon.request_stop()
            thread.join(30)
        assert failure and isinstance(failure[0], RecordTooLarge), failure
        message = str(failure[0])
        assert "the insert of public.big" in message, message
        assert '(key ["over",7])' in message, message
        assert "at commit LSN " in message, message
        assert f"more than kafka.max_message_bytes ({LIMIT})" in message, message
        assert f"largest columns: b {2 * LIMIT} bytes" in message, message
        assert "not skipped" in message, message
        # the limit raised: the event is sent, and the one after it
        raised = make_settings(
            pg_dsn, kafka_bootstrap, topic_prefix, kafka_max_message_bytes=str(4 * LIMIT)
        )
        with running_daemon(raised):
            events = table_events(kafka_bootstrap, topic_prefix, "big", expect=3003, timeout=60)
        keys = [e["after"]["k"] for e in events[-2:]]
        assert keys == ["over", "after"]
    finally:
        env.close()


@pytest.mark.parametrize("bulk", [True, False])
def test_both_send_paths_refuse_a_record_over_the_limit_precisely(
    bulk: bool, kafka_bootstrap: str, topic_prefix: str
) -> None:
    opts = KafkaOptions(kafka_bootstrap, topic_prefix, f"tx-{topic_prefix}", timeout_s=20)
    opts.max_message_bytes, opts.bulk_records = LIMIT, bulk
    topic = f"{topic_prefix}.public.t"
    sink = KafkaTransactionalSink(opts, "slot")
    try:
        sink.begin()
        with pytest.raises(RecordTooLarge) as caught:
            sink.send(topic, b"k", os.urandom(LIMIT + 10), [])
        assert f"the change event for {topic} (key b'k')" in str(caught.value)
        assert f"more than kafka.max_message_bytes ({LIMIT})" in str(caught.value)
        sink.abort()
        sink.begin()
        for i in range(300):  # about 300 KB, then a record just under the limit
            sink.send(topic, b"%d" % i, os.urandom(1000), [])
        sink.send(topic, b"last", os.urandom(LIMIT - 200), [])
        sink.commit(ResumePosition(1, 301, True))
    finally:
        sink.close()
    records = read_topic(kafka_bootstrap, topic, timeout=60, expect=301)
    assert len(records) == 301


class _Refused:
    """A kafka-python future the broker answered with ``exception``."""

    is_done = True

    def __init__(self, exception: BaseException | None) -> None:
        self.exception = exception

    def failed(self) -> bool:
        return self.exception is not None


def test_a_batch_the_broker_refuses_as_too_large_is_not_retried() -> None:
    """A broker whose ``message.max.bytes`` is below the records refuses them at every try:
    that was a SinkUnavailable, retried for ever; now a RecordTooLarge saying which limits
    to align.  Other refusals stay retryable."""
    from kafka.errors import MessageSizeTooLargeError, NotLeaderForPartitionError

    from cdc.errors import SinkUnavailable
    from cdc.kafka_acks import acknowledgement_error

    at = ResumePosition(7, 3, True)
    ok = _Refused(None)
    error = acknowledgement_error([ok, _Refused(MessageSizeTooLargeError())], at, 10, LIMIT)
    assert isinstance(error, RecordTooLarge)
    assert f"kafka.max_message_bytes ({LIMIT})" in str(error) and str(at) in str(error)
    other = acknowledgement_error([_Refused(NotLeaderForPartitionError())], at, 10, LIMIT)
    assert isinstance(other, SinkUnavailable)
    assert acknowledgement_error([ok, ok], at, 10, LIMIT) is None
