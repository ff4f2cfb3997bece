"""The cdc daemon: PostgreSQL replication stream → decoder → assembler → Kafka.

Concurrency model: one thread runs everything (:meth:`CdcDaemon.run`);
kafka-python's own sender thread does the Kafka network I/O.  A stop request
(SIGTERM/SIGINT, or :meth:`CdcDaemon.request_stop` from another thread) is a
flag checked at least every ``cdc.streaming.POLL_S`` seconds.

Sessions: a session connects, reads the resume position back from Kafka, creates the
slot (and takes the initial snapshot, :mod:`cdc.snapshot`) or finds it, sets up the
re-snapshots (:mod:`cdc.incremental_snapshot_io`) and streams
(:class:`cdc.streaming.SessionStream`: batches, flush, slot confirmation, stop).

Faults: a lost PostgreSQL connection or an unreachable broker tears the session
down (the open Kafka transaction is aborted, the slot is not advanced) and a new
session starts after an exponential backoff with jitter.  The new session reads
the resume position back from Kafka and skips what Kafka holds already, so
nothing is lost and nothing is written twice.  Configuration and preflight
errors and protocol violations are fatal (non-zero exit).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

import psycopg

from cdc import pgoutput_messages as m
from cdc.change_assembler import ChangeAssembler, OutEvent, OutSchema
from cdc.errors import ReplicationLost, SinkUnavailable, format_lsn
from cdc.fault_points import FAULTS
from cdc.incremental_snapshot_io import IncrementalSnapshots
from cdc.kafka_sink import KafkaOptions, KafkaTransactionalSink, ResumePosition, Sink
from cdc.kafka_state import read_resume_position
from cdc.pg_catalog import PgCatalog
from cdc.pg_source import (
    ReplicationStream,
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
from cdc.streaming import POLL_S, SessionStream, Stats
from core.systemd_notify import Notifier

log = logging.getLogger("fieldsync.cdc")

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

    def tick(self) -> None:
        """Notify the service manager's watchdog when due."""
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
            extra={"position": format_lsn(self.stats.flushed_lsn)},
        )
        return 0

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            self.tick()
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
                log.info(
                    "created slot %s at %s",
                    pg.slot,
                    format_lsn(slot.consistent_point),
                    extra={"position": format_lsn(slot.consistent_point)},
                )
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
            SessionStream(self, stream, decoder, assembler, sink, conn, resume, resnap).run()
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
                    self.tick()
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


def _lsn(text: str | None) -> int:
    from cdc.errors import parse_lsn

    return parse_lsn(text) if text else 0
