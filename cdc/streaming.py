"""One session's streaming: replication messages → decoder → assembler → Kafka batches, and
the slot confirmed behind Kafka.

Batches: events are written in Kafka transactions.  A batch is committed when it holds
``kafka.batch_max_events`` events, when it is ``kafka.batch_max_ms`` old, or as soon as the
stream has nothing more to read right now (so an idle trickle sees low latency).  Each batch
ends with the resume position (see :mod:`cdc.kafka_sink`).  Only after Kafka acknowledged
the commit does the slot's flush position move, and only up to the end of the last
*complete* transaction in it.  Invariant: the flush position passes a transaction with
events only once a committed resume position in Kafka covers the whole of it.  A
transaction whose events all reached Kafka before its end was read (its last event filled a
batch; or it was written before a restart and is now skipped) therefore gets a Kafka
transaction of its own holding just the resume position "complete" before it is confirmed.
When the stream is idle (no open transaction, empty batch, no commit in flight),
keepalives and heartbeat messages move the flush position too, so an idle publication on a
busy server does not pin WAL.

Overlap: :meth:`SessionStream.flush` starts a batch's Kafka commit
(:meth:`cdc.kafka_sink.Sink.start_commit`) and returns; the loop decodes the next batch
meanwhile, and :meth:`SessionStream.settle` takes the commit's outcome (when it is done,
before the next commit starts, or when there is nothing to read: then it waits for it, as
polling the stream meanwhile would cost CPU the commit itself needs on a busy machine).
After such a wait the loop reads again before it commits the open batch: what arrived
during the wait joins that batch, so a commit starts only once a read found nothing more
received (committing what was read before the wait at once would leave the transactions
that arrived during it for one more commit, a whole commit's time later).  Only settle
confirms the slot, so the flush position still covers only what Kafka acknowledged; a
transaction that would be confirmed at once while a commit is in flight is confirmed with
that commit.

Metrics (cdc/metrics.py): per event, one increment of the batch's count of its (topic, op);
the counters, the commit-to-ack histogram and the lag are updated once per Kafka commit.
The lag in seconds counts from the commit time of the last transaction Kafka acknowledged,
or, when events arrive after the stream was idle, of the first of them; it is 0 while the
stream is idle with nothing pending (:attr:`Stats.caught_up`).

Stop: the loop reads on to the end of the transaction it is in (at most
:data:`STOP_GRACE_S`), commits the batch and confirms it, so the slot ends exactly where
Kafka does.

Streamed transactions: inside a stream block the loop hands row changes (Insert, Update,
Delete) to the assembler's spill undecoded (:meth:`cdc.change_assembler.ChangeAssembler.spill_change`);
they are decoded when the transaction is replayed at its Stream Commit.  Every other message
is decoded as it comes.

Reads: the loop takes the messages already received in runs of up to :data:`READ_MANY`
(:meth:`cdc.pg_source.ReplicationStream.read_many`) and handles a run in a tight loop; the
stop flag, the watchdog, the re-snapshot ticks (catalog checks, signals, chunks) and the
batch age are looked at once per run, and the re-snapshot tick also right after a Relation
message, so a changed table is checked before the messages that follow it.

Concurrency: :meth:`SessionStream.run` runs on the daemon's one thread (the Kafka commit in
flight runs on the sink's committer thread, see :mod:`cdc.kafka_sink`); a stop request is
a flag of the daemon, checked at least every :data:`POLL_S` seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg

from cdc import pgoutput_messages as m
from cdc.change_assembler import ChangeAssembler, OutEvent, OutSchema, TxnEnd
from cdc.errors import CdcError, format_lsn
from cdc.fault_points import FAULTS
from cdc.incremental_snapshot_io import IncrementalSnapshots
from cdc.kafka_sink import Sink
from cdc.metrics import OP_OFFSET, EventCounts
from cdc.pg_source import Keepalive, ReplicationStream, XLogData
from cdc.pgoutput_decoder import PgOutputDecoder
from cdc.resume_position import ResumePosition
from cdc.settings import CdcSettings

__all__ = ["POLL_S", "STOP_GRACE_S", "Daemon", "SessionStream", "Stats"]

log = logging.getLogger("fieldsync.cdc")

POLL_S = 0.25
READ_MANY = 256  # messages read and handled in one run of the loop, at most
STOP_GRACE_S = 2.0  # on stop, how long to keep reading to reach the end of the open transaction


@dataclass
class Stats:
    events: int = 0
    transactions: int = 0
    kafka_commits: int = 0
    sessions: int = 0
    flushed_lsn: int = 0
    last_event_commit_ts_us: int = 0
    last_commit_wall: float = 0.0
    snapshot_rows: int = 0
    commit_latencies_ms: list[float] = field(default_factory=list)
    server_wal_end: int = 0  # the server's WAL end as last seen (keepalives, slot checks)
    caught_up: bool = False  # the stream is idle and nothing waits for Kafka
    lag_since_us: int = 0  # commit time the lag in seconds counts from (0: unknown)


class Daemon(Protocol):
    """What the streaming loop needs of the daemon that runs it."""

    s: CdcSettings
    stats: Stats
    counts: EventCounts
    on_commit: Callable[[list[OutEvent]], None] | None
    record_latency: bool

    @property
    def stopping(self) -> bool: ...

    def tick(self) -> None:
        """Notify the service manager's watchdog when due."""
        ...


class _Batch:
    """The open Kafka transaction and what it will confirm."""

    __slots__ = (
        "_last_event",
        "_position",
        "collected",
        "confirm_lsn",
        "events",
        "started",
        "tally",
        "txn_commit_ts",
        "txns",
    )

    def __init__(self) -> None:
        self.events = 0
        self.tally: dict[tuple[str, int], int] = {}  # events per (topic, op byte)
        self.txns = 0  # transactions with events that end in this batch
        self.started = 0.0
        # The resume position is that of the last event sent, or of the last transaction
        # ended (commit lsn, seq, commit time); it is only built when the batch is committed.
        self._last_event: OutEvent | None = None
        self._position: tuple[int, int, int] | None = None
        self.confirm_lsn: int | None = None
        self.txn_commit_ts: list[int] = []
        self.collected: list[OutEvent] = []

    @property
    def empty(self) -> bool:
        return self._last_event is None and self._position is None

    def event_sent(self, out: OutEvent) -> None:
        self._last_event = out
        self._position = None

    def txn_ended(self, commit_lsn: int, seq: int, commit_ts_us: int) -> None:
        """A transaction ended, its last event at ``seq``: the position says it is complete."""
        self._last_event = None
        self._position = (commit_lsn, seq, commit_ts_us)

    @property
    def position(self) -> ResumePosition | None:
        out = self._last_event
        if out is not None:
            return ResumePosition(out.commit_lsn, out.seq, False, commit_ts_us=out.commit_ts_us)
        if self._position is None:
            return None
        commit_lsn, seq, commit_ts_us = self._position
        return ResumePosition(commit_lsn, seq, True, commit_ts_us=commit_ts_us)


class SessionStream:
    """The streaming part of one session (see the module docstring)."""

    def __init__(
        self,
        daemon: Daemon,
        stream: ReplicationStream,
        decoder: PgOutputDecoder,
        asm: ChangeAssembler,
        sink: Sink,
        conn: psycopg.Connection[Any],
        resume: ResumePosition | None,
        resnap: IncrementalSnapshots | None = None,
    ) -> None:
        self.daemon = daemon
        self.pg, self.k = daemon.s.postgres, daemon.s.kafka
        self.stats = daemon.stats
        self.stream = stream
        self.decoder = decoder
        self.asm = asm
        self.sink = sink
        self.conn = conn
        self.resnap = resnap
        self.batch = _Batch()
        # the batch whose Kafka commit is in flight, its position, and when it started
        self.inflight: tuple[_Batch, ResumePosition, float] | None = None
        self.in_kafka = resume  # the resume position Kafka holds (committed or in flight)
        self.max_age = self.k.batch_max_ms / 1000.0
        self.last_heartbeat = time.monotonic()

    def run(self) -> None:
        """Stream until the daemon stops (errors propagate: the session is torn down)."""
        daemon, stream, asm, resnap = self.daemon, self.stream, self.asm, self.resnap
        stream.send_status(self.stats.flushed_lsn)
        stop_by: float | None = None
        while True:
            if daemon.stopping:
                # finish the transaction being read (its rest is on the wire), so the slot
                # can be confirmed exactly up to what Kafka holds; give up after a grace period
                if stop_by is None:
                    stop_by = time.monotonic() + STOP_GRACE_S
                if asm.idle or time.monotonic() >= stop_by:
                    break
            daemon.tick()
            if resnap is not None and not daemon.stopping:
                resnap.tick(self)  # catalog checks, signals, the next re-snapshot chunk
            busy = not self.batch.empty or self.inflight is not None
            msgs = stream.read_many(0.0 if busy else POLL_S, READ_MANY)
            if not msgs:
                self._nothing_to_read()
                continue
            self._messages(msgs)
            if self.inflight is not None and self.sink.commit_done():
                self.settle(None)
            batch = self.batch
            if asm.idle and not batch.empty and time.monotonic() - batch.started >= self.max_age:
                self.flush()
        # stopping: write what we have (a partly read transaction only if the grace period
        # ran out: the resume position covers it), confirm, leave
        if not asm.idle:
            txn = asm.txn
            log.warning(
                "stopping %.0f s into transaction %s, whose rest did not arrive: its events so far"
                " go to Kafka with a resume position that covers them; the slot stays before it,"
                " and the next start resumes after those events",
                STOP_GRACE_S,
                txn.xid if txn is not None else asm.stream_xid,
            )
        try:
            self.flush()
            self.settle(None)
            stream.send_status(self.stats.flushed_lsn)
        except CdcError as exc:
            # the last commit's outcome is unknown (Kafka may hold its events): the slot stays
            # where Kafka's acknowledgements put it, and the next start skips what the resume
            # position in Kafka covers
            log.warning(
                "stopping: the last Kafka commit or the slot's confirmation failed (%s); the slot"
                " stays at %s, and the next start skips the events Kafka already holds",
                exc,
                format_lsn(self.stats.flushed_lsn),
            )

    def _messages(self, msgs: list[XLogData | Keepalive]) -> None:
        """Decode, assemble and send one run of messages (the hot loop)."""
        asm, resnap = self.asm, self.resnap
        decode, feed, handle = self.decoder.decode, asm.feed, self.handle
        spill_change = asm.spill_change
        emit = resnap.stream.emit if resnap is not None else None
        for msg in msgs:
            if type(msg) is Keepalive:
                self._keepalive(msg)
                continue
            assert isinstance(msg, XLogData)
            payload = msg.payload
            # (stream_xid tested here too: outside a stream block no call per message)
            if asm.stream_xid is not None and spill_change(payload, msg.wal_start):
                continue  # a row change in a stream block: decoded when it is replayed
            decoded = decode(payload, msg.wal_start)
            outs = feed(decoded, msg.wal_start)
            if outs:
                handle(emit(outs) if emit is not None else outs)
            if isinstance(decoded, m.LogicalMessage):
                if not decoded.transactional and asm.idle and self.settled:
                    self.stats.flushed_lsn = max(self.stats.flushed_lsn, msg.wal_start)
            elif resnap is not None and isinstance(decoded, m.Relation):
                if not self.daemon.stopping:
                    resnap.tick()  # a changed table is checked before the messages after it

    def flushed_lsn(self) -> int:
        """The slot's flush position: Kafka acknowledged everything the stream read before
        it (:class:`cdc.key_retirement_io.StreamState`)."""
        return self.stats.flushed_lsn

    def drain(self) -> bool:
        """Commit the open batch (between transactions only) and wait for the commit; True
        when nothing waits for Kafka (:class:`cdc.key_retirement_io.StreamState`)."""
        if self.asm.idle:
            self.flush()
        self.settle(None)
        return self.settled

    @property
    def settled(self) -> bool:
        """Nothing waits for Kafka: the batch is empty and no commit is in flight."""
        return self.inflight is None and self.batch.empty

    def _nothing_to_read(self) -> None:
        """Settle the commit in flight, then commit the open batch, or (idle) keep the
        walsender and the slot moving.

        After waiting for a commit in flight, an open batch is not committed yet: the
        transactions that arrived during the wait are read first (the loop reads again at
        once), so they go out in this next commit instead of waiting for one more."""
        if self.inflight is not None:
            self.settle(None)
            if not self.batch.empty:
                return
        if not self.batch.empty:
            self.flush()
            return
        pg, stream = self.pg, self.stream
        if self.asm.idle:
            self.stats.caught_up = True
        now = time.monotonic()
        if now - stream.last_status_sent >= pg.status_interval_s:
            stream.send_status(self.stats.flushed_lsn)
        if (
            pg.heartbeat_interval_s
            and now - self.last_heartbeat >= pg.heartbeat_interval_s
            and self.asm.idle
        ):
            self.last_heartbeat = now
            self.conn.execute("select pg_logical_emit_message(false, 'fieldsync.heartbeat', '')")

    def _keepalive(self, msg: Keepalive) -> None:
        stats, stream = self.stats, self.stream
        if msg.wal_end > stats.server_wal_end:
            stats.server_wal_end = msg.wal_end
        if self.asm.idle and self.settled and msg.wal_end > stats.flushed_lsn:
            stats.flushed_lsn = msg.wal_end
        if (
            msg.reply_requested
            or time.monotonic() - stream.last_status_sent >= self.pg.status_interval_s
        ):
            stream.send_status(stats.flushed_lsn)

    def flush(self) -> None:
        """Start the Kafka commit of the open batch with its resume position (after the
        commit in flight, if any, is settled); :meth:`settle` confirms what it covers."""
        batch = self.batch
        if batch.empty:
            return
        self.settle(None)
        position = batch.position
        assert position is not None
        self.sink.start_commit(position)
        self.in_kafka = position
        self.inflight = (batch, position, time.monotonic())
        self.batch = _Batch()

    def settle(self, timeout_s: float | None) -> bool:
        """Wait up to ``timeout_s`` (None: until it is done) for the commit in flight; once
        Kafka acknowledged it, confirm what its batch covers.  False: still in flight.
        Raises the commit's error (the session ends, the slot stays where it was)."""
        inflight = self.inflight
        if inflight is None:
            return True
        done_at = self.sink.wait_commit(timeout_s)
        if done_at is None:
            return False
        self.inflight = None
        batch, position, t0 = inflight
        if FAULTS.armed:
            FAULTS.hit("after_kafka_commit")
        self._committed(batch, position, done_at)
        log.debug(
            "kafka commit: %d events in %.1f ms, confirmed %s",
            batch.events,
            (time.monotonic() - t0) * 1000,
            format_lsn(self.stats.flushed_lsn),
            extra={"position": format_lsn(position.commit_lsn)},
        )
        return True

    def _committed(self, batch: _Batch, position: ResumePosition, now: float) -> None:
        """Kafka acknowledged ``batch`` at wall-clock time ``now``: count it, confirm it."""
        stats, stream, daemon = self.stats, self.stream, self.daemon
        stats.kafka_commits += 1
        stats.last_commit_wall = now
        daemon.counts.committed(batch.tally, batch.txns, batch.txn_commit_ts, now)
        if position.commit_ts_us:
            stats.lag_since_us = position.commit_ts_us
        if daemon.record_latency:
            stats.commit_latencies_ms.extend(
                (now * 1e6 - ts) / 1000.0 for ts in batch.txn_commit_ts
            )
        if batch.confirm_lsn is not None and batch.confirm_lsn > stats.flushed_lsn:
            stats.flushed_lsn = batch.confirm_lsn
            stream.send_status(stats.flushed_lsn)
        elif time.monotonic() - stream.last_status_sent >= self.pg.status_interval_s:
            stream.send_status(stats.flushed_lsn)
        if daemon.on_commit is not None and batch.collected:
            daemon.on_commit(batch.collected)

    def _begin(self) -> None:
        self.sink.begin()
        self.batch.started = time.monotonic()

    def handle(self, outs: Iterable[OutEvent | OutSchema | TxnEnd]) -> None:
        """Send the assembler's output: events and schemas into the batch, transaction ends
        into what the batch will confirm."""
        stats, sink, daemon = self.stats, self.sink, self.daemon
        for out in outs:
            if isinstance(out, OutEvent):
                batch = self.batch
                if batch.empty:
                    self._begin()
                if stats.caught_up:  # the first event after an idle stream: lag counts from it
                    stats.caught_up = False
                    stats.lag_since_us = out.commit_ts_us or stats.lag_since_us
                sink.send(out.topic, out.key, out.value, out.headers)
                tally = batch.tally
                counted = (out.topic, out.value[OP_OFFSET])
                tally[counted] = tally.get(counted, 0) + 1
                batch.events += 1
                batch.event_sent(out)
                stats.events += 1
                stats.last_event_commit_ts_us = out.commit_ts_us
                if daemon.on_commit is not None:
                    batch.collected.append(out)
                if batch.events >= self.k.batch_max_events:
                    self.flush()
                elif stats.events & 1023 == 0:
                    # a long replay must not starve the walsender (wal_sender_timeout) nor the watchdog
                    daemon.tick()
                    if time.monotonic() - self.stream.last_status_sent >= self.pg.status_interval_s:
                        self.stream.send_status(stats.flushed_lsn)
            elif isinstance(out, OutSchema):
                if self.batch.empty:
                    self._begin()
                sink.publish_schema(out.fingerprint, out.schema_json)
            else:
                self._txn_end(out)

    def _txn_end(self, out: TxnEnd) -> None:
        if out.streamed and FAULTS.armed and FAULTS.due("streamed_txn_end"):
            self.flush()  # Kafka holds the transaction's last events, not its end
            self.settle(None)
            FAULTS.crash("streamed_txn_end")
        stats = self.stats
        stats.transactions += 1
        batch = self.batch
        if batch.empty and (out.events == 0 or _holds_whole(self.in_kafka, out.commit_lsn)):
            # nothing of it is pending, and Kafka's resume position covers it
            # (or it has no events): confirm it right away, or once the commit in flight
            # (which that position may be) is acknowledged
            inflight = self.inflight
            if inflight is not None:
                confirm = inflight[0].confirm_lsn
                if confirm is None or out.end_lsn > confirm:
                    inflight[0].confirm_lsn = out.end_lsn
            elif out.end_lsn > stats.flushed_lsn:
                stats.flushed_lsn = out.end_lsn
            return
        if batch.empty:
            # Kafka holds all its events (written before, or in batches already committed)
            # but its resume position does not say the transaction is complete: write that
            # (a Kafka transaction with only the resume position) before the slot may pass it
            self._begin()
        if out.events:
            batch.txns += 1
        batch.txn_ended(out.commit_lsn, max(out.events - 1, 0), out.commit_ts_us)
        batch.confirm_lsn = out.end_lsn
        batch.txn_commit_ts.append(out.commit_ts_us)
        if time.monotonic() - batch.started >= self.max_age:
            self.flush()


def _holds_whole(position: ResumePosition | None, commit_lsn: int) -> bool:
    """Whether a resume position says Kafka holds the whole transaction at ``commit_lsn``."""
    return position is not None and (
        position.commit_lsn > commit_lsn
        or (position.commit_lsn == commit_lsn and position.complete)
    )
