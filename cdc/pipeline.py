"""The cdc daemon: PostgreSQL replication stream → decoder → assembler → Kafka.

Concurrency model: one thread runs everything (:meth:`CdcDaemon.run`);
kafka-python's own sender thread does the Kafka network I/O.  A stop request
(SIGTERM/SIGINT, or :meth:`CdcDaemon.request_stop` from another thread) is a
flag checked at least every ``POLL_S`` seconds.

Delivery: events are written in Kafka transactions ("batches").  A batch is
committed when it holds ``kafka.batch_max_events`` events, when it is
``kafka.batch_max_ms`` old, or as soon as the stream has nothing more to read
right now (so an idle trickle sees low latency).  Each batch ends with the
resume position (see :mod:`cdc.kafka_sink`).  Only after Kafka acknowledged the
commit does the slot's flush position move, and only up to the end of the last
*complete* transaction in it.  Invariant: the flush position passes a
transaction with events only once a committed resume position in Kafka covers
the whole of it.  A transaction whose events all reached Kafka before its end
was read (its last event filled a batch; or it was written before a restart and
is now skipped) therefore gets a Kafka transaction of its own holding just the
resume position "complete" before it is confirmed.  When the stream is idle (no
open transaction, empty batch), keepalives and heartbeat messages move the
flush position too, so an idle publication on a busy server does not pin WAL.

Stop: the daemon reads on to the end of the transaction it is in (at most
``STOP_GRACE_S``), commits the batch and confirms it, so the slot ends exactly
where Kafka does.

Faults: a lost PostgreSQL connection or an unreachable broker tears the session
down (the open Kafka transaction is aborted, the slot is not advanced) and a new
session starts after an exponential backoff with jitter.  The new session reads
the resume position back from Kafka and skips what Kafka holds already, so
nothing is lost and nothing is written twice.  Configuration and preflight
errors and protocol violations are fatal (non-zero exit).
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import psycopg

from cdc import pgoutput_messages as m
from cdc.change_assembler import ChangeAssembler, OutEvent, OutSchema, TxnEnd
from cdc.errors import CdcError, ReplicationLost, SinkUnavailable, format_lsn
from cdc.fault_points import FAULTS
from cdc.incremental_snapshot_io import IncrementalSnapshots
from cdc.kafka_sink import KafkaOptions, KafkaTransactionalSink, ResumePosition, Sink
from cdc.kafka_state import read_resume_position
from cdc.pg_catalog import PgCatalog
from cdc.pg_source import (
    Keepalive,
    ReplicationStream,
    XLogData,
    connect,
    create_slot,
    drop_slot,
    ensure_publication,
    highest_proto_version,
    preflight,
    slot_state,
)
from cdc.pgoutput_decoder import PgOutputDecoder
from cdc.settings import CdcSettings
from cdc.snapshot import read_snapshot
from cdc.spill_store import FileSpillStore
from core.systemd_notify import Notifier

log = logging.getLogger("fieldsync.cdc")

POLL_S = 0.25
STOP_GRACE_S = 2.0  # on stop, how long to keep reading to reach the end of the open transaction
RETRYABLE: tuple[type[BaseException], ...] = (
    ReplicationLost,
    SinkUnavailable,
    psycopg.OperationalError,
)


def kafka_options(s: CdcSettings) -> KafkaOptions:
    k = s.kafka
    return KafkaOptions(
        bootstrap_servers=k.bootstrap_servers,
        topic_prefix=k.topic_prefix,
        transactional_id=s.effective_transactional_id,
        compression=k.compression,
        timeout_s=k.timeout_s,
        security_protocol=k.security_protocol,
        sasl_mechanism=k.sasl_mechanism,
        sasl_username=k.sasl_username,
        sasl_password=k.sasl_password,
        ssl_cafile=k.ssl_cafile,
    )


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


class _Batch:
    """The open Kafka transaction and what it will confirm."""

    __slots__ = (
        "_last_event",
        "_position",
        "collected",
        "confirm_lsn",
        "events",
        "started",
        "txn_commit_ts",
    )

    def __init__(self) -> None:
        self.events = 0
        self.started = 0.0
        # The resume position is that of the last event sent, or of the last transaction
        # ended; an event's ResumePosition is only built when the batch is committed.
        self._last_event: OutEvent | None = None
        self._position: ResumePosition | None = None
        self.confirm_lsn: int | None = None
        self.txn_commit_ts: list[int] = []
        self.collected: list[OutEvent] = []

    @property
    def empty(self) -> bool:
        return self._last_event is None and self._position is None

    def event_sent(self, out: OutEvent) -> None:
        self._last_event = out
        self._position = None

    def txn_ended(self, position: ResumePosition) -> None:
        self._last_event = None
        self._position = position

    @property
    def position(self) -> ResumePosition | None:
        out = self._last_event
        if out is not None:
            return ResumePosition(out.commit_lsn, out.seq, False, commit_ts_us=out.commit_ts_us)
        return self._position


class CdcDaemon:
    def __init__(
        self,
        settings: CdcSettings,
        *,
        notifier: Notifier | None = None,
        on_commit: Callable[[list[OutEvent]], None] | None = None,
        sink_factory: Callable[[], Sink] | None = None,
        record_latency: bool = False,
    ) -> None:
        self.s = settings
        self.notifier = notifier or Notifier(None)
        self.on_commit = on_commit
        self.record_latency = record_latency
        self._sink_factory = sink_factory
        self._stop = threading.Event()
        self.stats = Stats()
        self._last_watchdog = 0.0
        self.ready = threading.Event()
        self.db = ""

    # ------------------------------------------------------------------ control

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _tick(self) -> None:
        wd = self.notifier.watchdog_interval()
        now = time.monotonic()
        if wd is not None and now - self._last_watchdog >= wd:
            self.notifier.watchdog()
            self._last_watchdog = now

    # ------------------------------------------------------------------ run loop

    def run(self) -> int:
        """Run sessions until stopped; return the process exit code."""
        backoff = self.s.cdc.retry_backoff_initial_s
        while not self.stopping:
            self.stats.sessions += 1
            started = time.monotonic()
            try:
                self._session()
            except RETRYABLE as exc:
                if self.stopping:
                    break
                if time.monotonic() - started > 30:
                    backoff = self.s.cdc.retry_backoff_initial_s
                delay = backoff * (0.5 + random.random())
                log.warning("%s; retrying in %.1fs", exc, delay)
                self.notifier.status(f"retrying: {exc}")
                self._sleep(delay)
                backoff = min(backoff * 2, self.s.cdc.retry_backoff_max_s)
        self.notifier.stopping("stopped")
        log.info(
            "stopped; slot %s confirmed at %s",
            self.s.postgres.slot,
            format_lsn(self.stats.flushed_lsn),
        )
        return 0

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            self._tick()
            self._stop.wait(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def _make_sink(self) -> Sink:
        if self._sink_factory is not None:
            return self._sink_factory()
        return KafkaTransactionalSink(kafka_options(self.s), self.s.postgres.slot)

    def _session(self) -> None:
        pg = self.s.postgres
        conn = connect(pg.dsn, pg.password)
        catalog = PgCatalog(pg.dsn, pg.password)
        spill = FileSpillStore(self.s.cdc.spill_dir or None)
        spill.clear()
        rconn = None
        stream: ReplicationStream | None = None
        sink: Sink | None = None
        resnap: IncrementalSnapshots | None = None
        try:
            info = preflight(conn, pg.tables)
            self.db = conn.info.dbname
            ensure_publication(conn, pg.publication, pg.tables)
            # The producer first: its init_transactions() fences a predecessor with the same
            # transactional id and settles that one's open transaction (aborted, or committed
            # if its commit had begun), so the resume position read next is final.
            sink = self._make_sink()
            resume = read_resume_position(
                kafka_options(self.s), pg.slot, timeout_s=self.s.kafka.timeout_s
            )
            state = slot_state(conn, pg.slot)
            need_snapshot = pg.snapshot == "initial" and (
                resume is None or not resume.snapshot_done
            )
            # re-snapshots (cdc/incremental_snapshot_io.py): progress and recorded catalog
            # back from Kafka, catalog compared; their records ride on this sink's commits
            resnap = IncrementalSnapshots(self.s, db=self.db, catalog=catalog)
            resnap.load(
                kafka_options(self.s),
                initial_snapshot=need_snapshot,
                timeout_s=self.s.kafka.timeout_s,
            )
            sink = resnap.wrap(sink)
            if state is not None and need_snapshot:
                log.warning(
                    "slot %s exists but no finished snapshot is recorded in Kafka: dropping it and starting over",
                    pg.slot,
                )
                drop_slot(conn, pg.slot)
                state = None
            if state is not None and state["active_pid"] is not None:
                raise ReplicationLost(
                    f"slot {pg.slot} is in use by PID {state['active_pid']} (another cdc daemon?)"
                )
            rconn = connect(pg.dsn, pg.password, replication=True)
            if state is None:
                slot = create_slot(rconn, pg.slot, export_snapshot=need_snapshot)
                log.info("created slot %s at %s", pg.slot, format_lsn(slot.consistent_point))
                if need_snapshot and slot.snapshot_name:
                    resume = self._snapshot(
                        slot.snapshot_name, slot.consistent_point, catalog, sink
                    )
                start_lsn = slot.consistent_point
            else:
                start_lsn = 0  # the slot's confirmed_flush_lsn
                self.stats.flushed_lsn = max(
                    self.stats.flushed_lsn, _lsn(state["confirmed_flush_lsn"])
                )
            resnap.persist(sink, resume)
            proto = pg.proto_version or highest_proto_version(info["server_version"])
            stream = ReplicationStream(
                rconn, pg.slot, pg.publication, start_lsn, proto, pg.streaming
            )
            assembler = ChangeAssembler(
                db=self.db,
                topic_prefix=self.s.kafka.topic_prefix,
                catalog=catalog,
                spill=spill,
                resume=resume,
                warn=lambda msg: log.warning("%s", msg),
                observer=resnap.stream,
            )
            decoder = PgOutputDecoder(proto)
            self.ready.set()
            self.notifier.ready(f"streaming slot {pg.slot} from {format_lsn(start_lsn)}")
            log.info(
                "streaming slot %s (protocol %d%s) resume=%s",
                pg.slot,
                proto,
                ", streaming" if stream.streaming else "",
                resume,
            )
            self._stream(stream, decoder, assembler, sink, conn, resume, resnap)
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        finally:
            if sink is not None:
                sink.close()
            if stream is not None:
                stream.close()
            elif rconn is not None:
                rconn.close()
            if resnap is not None:
                resnap.close()
            catalog.close()
            spill.close()
            conn.close()

    # ------------------------------------------------------------------ snapshot

    def _snapshot(
        self, snapshot_name: str, consistent_point: int, catalog: PgCatalog, sink: Sink
    ) -> ResumePosition:
        pg = self.s.postgres
        sconn = connect(pg.dsn, pg.password)
        batch = 0
        collected: list[OutEvent] = []
        last = ResumePosition(consistent_point, -1, False, snapshot_done=False)
        self.notifier.status("initial snapshot")
        try:
            sink.begin()
            for out in read_snapshot(
                sconn,
                snapshot_name,
                pg.publication,
                db=self.db,
                topic_prefix=self.s.kafka.topic_prefix,
                consistent_point=consistent_point,
                catalog=catalog,
                unchanged_sentinel=m.UNCHANGED_TOAST,
                warn=lambda msg: log.warning("%s", msg),
                clock_us=lambda: int(time.time() * 1_000_000),
            ):
                if isinstance(out, OutSchema):
                    sink.publish_schema(out.fingerprint, out.schema_json)
                    continue
                sink.send(out.topic, out.key, out.value, out.headers)
                last = ResumePosition(consistent_point, out.seq, False, snapshot_done=False)
                batch += 1
                self.stats.snapshot_rows += 1
                if self.on_commit is not None:
                    collected.append(out)
                if batch >= self.s.kafka.batch_max_events:
                    sink.commit(last)
                    if FAULTS.armed:
                        FAULTS.hit("snapshot_batch")
                    if self.on_commit is not None:
                        self.on_commit(collected)
                        collected = []
                    sink.begin()
                    batch = 0
                    self._tick()
                if self.stopping:
                    raise ReplicationLost(
                        "stopped during the initial snapshot; it restarts from scratch next time"
                    )
            done = ResumePosition(consistent_point, last.seq, True, snapshot_done=True)
            sink.commit(done)
            if self.on_commit is not None and collected:
                self.on_commit(collected)
            log.info("initial snapshot done: %d rows", self.stats.snapshot_rows)
            return done
        finally:
            sconn.close()

    # ------------------------------------------------------------------ streaming

    def _stream(
        self,
        stream: ReplicationStream,
        decoder: PgOutputDecoder,
        asm: ChangeAssembler,
        sink: Sink,
        conn: psycopg.Connection[Any],
        resume: ResumePosition | None,
        resnap: IncrementalSnapshots | None = None,
    ) -> None:
        pg, k = self.s.postgres, self.s.kafka
        batch = _Batch()
        in_kafka = resume  # the resume position Kafka holds (committed)
        max_age = k.batch_max_ms / 1000.0
        last_heartbeat = time.monotonic()
        stream.send_status(self.stats.flushed_lsn)

        def flush() -> None:
            nonlocal batch, in_kafka
            if batch.empty:
                return
            position = batch.position
            assert position is not None
            t0 = time.monotonic()
            sink.commit(position)
            in_kafka = position
            if FAULTS.armed:
                FAULTS.hit("after_kafka_commit")
            now = time.time()
            self.stats.kafka_commits += 1
            self.stats.last_commit_wall = now
            if self.record_latency:
                self.stats.commit_latencies_ms.extend(
                    (now * 1e6 - ts) / 1000.0 for ts in batch.txn_commit_ts
                )
            if batch.confirm_lsn is not None and batch.confirm_lsn > self.stats.flushed_lsn:
                self.stats.flushed_lsn = batch.confirm_lsn
                stream.send_status(self.stats.flushed_lsn)
            elif time.monotonic() - stream.last_status_sent >= pg.status_interval_s:
                stream.send_status(self.stats.flushed_lsn)
            if self.on_commit is not None and batch.collected:
                self.on_commit(batch.collected)
            log.debug(
                "kafka commit: %d events in %.1f ms, confirmed %s",
                batch.events,
                (time.monotonic() - t0) * 1000,
                format_lsn(self.stats.flushed_lsn),
            )
            batch = _Batch()

        def handle(outs: Iterable[OutEvent | OutSchema | TxnEnd]) -> None:
            for out in outs:
                if isinstance(out, OutEvent):
                    if batch.empty:
                        sink.begin()
                        batch.started = time.monotonic()
                    sink.send(out.topic, out.key, out.value, out.headers)
                    batch.events += 1
                    batch.event_sent(out)
                    self.stats.events += 1
                    self.stats.last_event_commit_ts_us = out.commit_ts_us
                    if self.on_commit is not None:
                        batch.collected.append(out)
                    if batch.events >= k.batch_max_events:
                        flush()
                    elif self.stats.events & 1023 == 0:
                        # a long replay must not starve the walsender (wal_sender_timeout) nor the watchdog
                        self._tick()
                        if time.monotonic() - stream.last_status_sent >= pg.status_interval_s:
                            stream.send_status(self.stats.flushed_lsn)
                elif isinstance(out, OutSchema):
                    if batch.empty:
                        sink.begin()
                        batch.started = time.monotonic()
                    sink.publish_schema(out.fingerprint, out.schema_json)
                else:
                    if out.streamed and FAULTS.armed and FAULTS.due("streamed_txn_end"):
                        flush()  # Kafka holds the transaction's last events, not its end
                        FAULTS.crash("streamed_txn_end")
                    self.stats.transactions += 1
                    if batch.empty and (out.events == 0 or _holds_whole(in_kafka, out.commit_lsn)):
                        # nothing of it is pending, and Kafka's resume position covers it
                        # (or it has no events): confirm it right away
                        if out.end_lsn > self.stats.flushed_lsn:
                            self.stats.flushed_lsn = out.end_lsn
                    else:
                        if batch.empty:
                            # Kafka holds all its events (written before, or in batches
                            # already committed) but its resume position does not say the
                            # transaction is complete: write that (a Kafka transaction with
                            # only the resume position) before the slot may pass it
                            sink.begin()
                            batch.started = time.monotonic()
                        batch.txn_ended(
                            ResumePosition(
                                out.commit_lsn,
                                max(out.events - 1, 0),
                                True,
                                commit_ts_us=out.commit_ts_us,
                            )
                        )
                        batch.confirm_lsn = out.end_lsn
                        batch.txn_commit_ts.append(out.commit_ts_us)
                        if time.monotonic() - batch.started >= max_age:
                            flush()

        stop_by: float | None = None
        while True:
            if self.stopping:
                # finish the transaction being read (its rest is on the wire), so the slot
                # can be confirmed exactly up to what Kafka holds; give up after a grace period
                if stop_by is None:
                    stop_by = time.monotonic() + STOP_GRACE_S
                if asm.idle or time.monotonic() >= stop_by:
                    break
            self._tick()
            if resnap is not None and not self.stopping:
                resnap.tick()  # catalog checks, signals, the next re-snapshot chunk
            msg = stream.read(0.0 if not batch.empty else POLL_S)
            if msg is None:
                if not batch.empty:
                    flush()
                    continue
                now = time.monotonic()
                if now - stream.last_status_sent >= pg.status_interval_s:
                    stream.send_status(self.stats.flushed_lsn)
                if (
                    pg.heartbeat_interval_s
                    and now - last_heartbeat >= pg.heartbeat_interval_s
                    and asm.idle
                ):
                    last_heartbeat = now
                    conn.execute("select pg_logical_emit_message(false, 'fieldsync.heartbeat', '')")
                continue
            if isinstance(msg, Keepalive):
                if asm.idle and batch.empty and msg.wal_end > self.stats.flushed_lsn:
                    self.stats.flushed_lsn = msg.wal_end
                if (
                    msg.reply_requested
                    or time.monotonic() - stream.last_status_sent >= pg.status_interval_s
                ):
                    stream.send_status(self.stats.flushed_lsn)
                continue
            assert isinstance(msg, XLogData)
            decoded = decoder.decode(msg.payload, msg.wal_start)
            outs = asm.feed(decoded, msg.wal_start)
            handle(resnap.stream.emit(outs) if resnap is not None else outs)
            if (
                isinstance(decoded, m.LogicalMessage)
                and not decoded.transactional
                and asm.idle
                and batch.empty
            ):
                self.stats.flushed_lsn = max(self.stats.flushed_lsn, msg.wal_start)
            if asm.idle and not batch.empty and time.monotonic() - batch.started >= max_age:
                flush()
        # stopping: write what we have (a partly read transaction only if the grace period
        # ran out: the resume position covers it), confirm, leave
        with contextlib.suppress(CdcError):
            flush()
            stream.send_status(self.stats.flushed_lsn)


def _holds_whole(position: ResumePosition | None, commit_lsn: int) -> bool:
    """Whether a resume position says Kafka holds the whole transaction at ``commit_lsn``."""
    return position is not None and (
        position.commit_lsn > commit_lsn
        or (position.commit_lsn == commit_lsn and position.complete)
    )


def _lsn(text: str | None) -> int:
    from cdc.errors import parse_lsn

    return parse_lsn(text) if text else 0
