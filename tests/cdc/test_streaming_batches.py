"""The streaming loop's batches and slot confirmation, against a scripted replication
stream and a recording sink (pure: no PostgreSQL, no broker; the real decoder is replaced
by one that hands the scripted messages through, the assembler is the real one).

For every schedule of arrivals (messages become readable at each read and during each
wait for the commit in flight) and of commit completions:

- every event reaches the sink once, in order, and each commit holds exactly the events
  its batch reported to ``on_commit`` when Kafka acknowledged it;
- a commit's resume position is its last event (or the end of the last transaction it
  completes), and says "complete" only for a transaction all of whose events are in it or
  before it;
- the slot is never confirmed past a transaction whose events Kafka has not acknowledged
  in a commit that covers the whole transaction;
- a commit starts only when a read found nothing more received: what arrived while the loop
  waited for the commit in flight goes out in the very next commit, not one later.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cdc import pgoutput_messages as m
from cdc.change_assembler import ChangeAssembler, OutEvent
from cdc.metrics import EventCounts
from cdc.pg_source import XLogData
from cdc.resume_position import ResumePosition
from cdc.settings import load_cdc_settings
from cdc.streaming import SessionStream, Stats
from tests.cdc.test_change_assembler import REL, FakeCatalog, MemorySpill, ins, txn

SETTINGS = load_cdc_settings(
    None,
    {
        "FIELDSYNC_POSTGRES_DSN": "postgresql://unused",
        "FIELDSYNC_KAFKA_BOOTSTRAP_SERVERS": "unused:9092",
        "FIELDSYNC_KAFKA_TOPIC_PREFIX": "fs",
        # batches end only when a read finds nothing (no size or age limit in reach)
        "FIELDSYNC_KAFKA_BATCH_MAX_EVENTS": "100000",
        "FIELDSYNC_KAFKA_BATCH_MAX_MS": "3600000",
        "FIELDSYNC_POSTGRES_HEARTBEAT_INTERVAL_S": "0",
    },
)


class ScriptedStream:
    """Messages become readable ``arrivals[i]`` at a time: at each read, and during each
    wait for a commit; once the script is used up, all the rest at once."""

    def __init__(self, msgs: Sequence[m.Message], arrivals: Sequence[int]) -> None:
        self.future = [XLogData(1000 + i, 1000 + i, msg) for i, msg in enumerate(msgs)]  # type: ignore[arg-type]
        self.arrivals = list(arrivals)
        self.received: list[XLogData] = []
        self.last_status_sent = 0.0
        self.confirmed: list[tuple[int, list[ResumePosition]]] = []  # flush lsn, acked then
        self.sink: RecordingSink | None = None

    def arrive(self) -> None:
        n = self.arrivals.pop(0) if self.arrivals else len(self.future)
        self.received.extend(self.future[:n])
        del self.future[:n]

    @property
    def done(self) -> bool:
        return not self.future and not self.received

    def read_many(self, timeout: float, limit: int) -> list[XLogData]:
        self.arrive()
        out = self.received[:limit]
        del self.received[:limit]
        return out

    def send_status(
        self, flush_lsn: int, write_lsn: int | None = None, reply: bool = False
    ) -> None:
        assert self.sink is not None
        self.confirmed.append((flush_lsn, list(self.sink.acked)))
        self.last_status_sent = time.monotonic()


@dataclass
class Commit:
    position: ResumePosition
    records: int
    nothing_received: bool  # the stream had nothing received when it started


@dataclass
class RecordingSink:
    """A sink whose commit in flight finishes when the script says (``done``: the answers
    to ``commit_done``, then "not yet"; a wait without a timeout always sees it finish)."""

    stream: ScriptedStream
    done: list[bool]
    open_records: int = 0
    inflight: ResumePosition | None = None
    commits: list[Commit] = field(default_factory=list)
    acked: list[ResumePosition] = field(default_factory=list)

    def begin(self) -> None:
        pass

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Any) -> None:
        self.open_records += 1  # (also while a commit is in flight: the next transaction)

    def publish_schema(self, fingerprint: bytes, schema_json: str) -> None:
        pass

    def start_commit(self, position: ResumePosition) -> None:
        assert self.inflight is None, "a commit started while one was in flight"
        nothing = not self.stream.received
        self.commits.append(Commit(position, self.open_records, nothing))
        self.open_records = 0
        self.inflight = position

    def commit_done(self) -> bool:
        return self.inflight is None or (self.done.pop(0) if self.done else False)

    def wait_commit(self, timeout_s: float | None) -> float | None:
        if self.inflight is None:
            return time.time()
        self.stream.arrive()  # messages arrive while the loop waits
        if timeout_s is not None and not self.commit_done():
            return None
        self.acked.append(self.inflight)
        self.inflight = None
        return time.time()

    def commit(self, position: ResumePosition) -> None:
        self.start_commit(position)
        self.wait_commit(None)

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class PassThroughDecoder:
    def decode(self, payload: Any, wal_start: int) -> m.Message:
        return payload  # type: ignore[no-any-return]


class FakeDaemon:
    s = SETTINGS
    record_latency = False

    def __init__(self, stream: ScriptedStream) -> None:
        self.stream = stream
        self.stats = Stats()
        self.counts = EventCounts("fs")
        self.batches: list[list[OutEvent]] = []
        self.on_commit = self.batches.append

    @property
    def stopping(self) -> bool:
        return self.stream.done

    def tick(self) -> None:
        pass


def workload(sizes: Sequence[int]) -> tuple[list[m.Message], list[tuple[int, int]]]:
    """Transactions of ``sizes`` inserts: the messages, and (commit lsn, events) of each."""
    msgs: list[m.Message] = []
    txns: list[tuple[int, int]] = []
    row = 0
    for k, size in enumerate(sizes):
        lsn = 100_000 * (k + 1)
        changes: list[m.Message] = [REL] if k == 0 else []
        for _ in range(size):
            row += 1
            changes.append(ins(row))
        msgs += txn(k + 1, lsn, *changes)
        txns.append((lsn, size))
    return msgs, txns


def covers(position: ResumePosition, commit_lsn: int) -> bool:
    return position.commit_lsn > commit_lsn or (
        position.commit_lsn == commit_lsn and position.complete
    )


def stream_all(
    sizes: Sequence[int], arrivals: Sequence[int], done: Sequence[bool]
) -> tuple[ScriptedStream, RecordingSink, FakeDaemon, list[tuple[int, int]]]:
    msgs, txns = workload(sizes)
    stream = ScriptedStream(msgs, arrivals)
    sink = RecordingSink(stream, list(done))
    stream.sink = sink
    daemon = FakeDaemon(stream)
    asm = ChangeAssembler(
        db="db",
        topic_prefix="fs",
        catalog=FakeCatalog({16384: ("id",)}),
        spill=MemorySpill(),
        resume=None,
        clock_us=lambda: 1,
    )
    session = SessionStream(
        daemon,
        stream,  # type: ignore[arg-type]
        PassThroughDecoder(),  # type: ignore[arg-type]
        asm,
        sink,
        None,  # type: ignore[arg-type]  (no heartbeats: the connection is never used)
        None,
    )
    session.run()
    return stream, sink, daemon, txns


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=8),
    arrivals=st.lists(st.one_of(st.just(0), st.integers(1, 6)), max_size=40),
    done=st.lists(st.booleans(), max_size=20),
)
def test_batches_and_confirmations_follow_the_delivery_rules(
    sizes: list[int], arrivals: list[int], done: list[bool]
) -> None:
    stream, sink, daemon, txns = stream_all(sizes, arrivals, done)
    assert sink.inflight is None
    assert [c.position for c in sink.commits] == sink.acked
    # every event once, in order; each commit holds what its batch reported
    expected = [(lsn, seq) for lsn, n in txns for seq in range(n)]
    assert [(e.commit_lsn, e.seq) for b in daemon.batches for e in b] == expected
    with_events = [c for c in sink.commits if c.records]
    assert [c.records for c in with_events] == [len(b) for b in daemon.batches]
    # a position is its commit's last event, or complete for a transaction it holds whole
    sent = 0
    for c in sink.commits:
        sent += c.records
        last_lsn, last_seq = expected[sent - 1]
        p = c.position
        if c.records and not p.complete:
            assert (p.commit_lsn, p.seq) == (last_lsn, last_seq)
        else:
            assert p.complete and p.commit_lsn >= last_lsn
            assert sent == sum(n for lsn, n in txns if lsn <= p.commit_lsn)
    # the slot moves only over transactions a committed position covers whole
    ends = {lsn + 8: lsn for lsn, _ in txns}
    for flush_lsn, acked in stream.confirmed:
        if flush_lsn:
            assert any(covers(p, ends[flush_lsn]) for p in acked)
    assert daemon.stats.flushed_lsn == max(ends)
    # no commit starts while messages are waiting to be read
    assert all(c.nothing_received for c in sink.commits)


def test_what_arrives_during_the_wait_for_a_commit_goes_out_in_the_next_one() -> None:
    """Transaction 1 is committed; transaction 2 is read before the loop waits for that
    commit, transactions 3 and 4 arrive during the wait: 2, 3 and 4 go out in one commit
    (not 2 alone, leaving 3 and 4 for one more)."""
    one, two, three_four = 4, 3, 6  # messages: Begin, Relation, Insert, Commit; 3; 3 + 3
    _, sink, _, txns = stream_all([1, 1, 1, 1], [one, 0, two, 0, three_four], [False])
    assert [c.records for c in sink.commits] == [1, 3]
    assert [c.position.commit_lsn for c in sink.commits] == [txns[0][0], txns[3][0]]
