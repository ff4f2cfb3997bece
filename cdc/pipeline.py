"""The cdc daemon: PostgreSQL replication stream → decoder → assembler → Kafka.

Concurrency model: one thread runs everything (:meth:`CdcDaemon.run`) but the
Kafka commits, which the sink's committer thread runs while the daemon's thread decodes
the next batch (:mod:`cdc.kafka_sink`); kafka-python's own sender thread does the Kafka
network I/O.  A stop request
(SIGTERM/SIGINT, or :meth:`CdcDaemon.request_stop` from another thread) is a
flag checked at least every ``cdc.streaming.POLL_S`` seconds.

Sessions: a session connects, reads the resume position back from Kafka, creates the
slot (and takes the initial snapshot, :mod:`cdc.snapshot`) or finds it
(:func:`cdc.slot_health.start_action`), sets up the re-snapshots
(:mod:`cdc.incremental_snapshot_io`) and streams (:class:`cdc.streaming.SessionStream`:
batches, flush, slot confirmation, stop).  Every ``cdc.slot_check_interval_s`` the daemon
reads its slot's health (:class:`cdc.slot_health.SlotWatch`, from :meth:`CdcDaemon.tick`).

Slot lost: a slot PostgreSQL reports lost, a slot that is gone while Kafka holds a resume
position, or an unfinished ``fieldsync cdc recover`` stop the daemon with
:class:`cdc.errors.SlotLost` (never retried: streaming from a new slot would skip
changes); the message names ``fieldsync cdc recover`` (:mod:`cdc.slot_recovery`).

Metrics (:mod:`cdc.metrics`): :class:`Live` is the source of the gauges read at scrape
(:class:`cdc.metrics.LiveSource`); the daemon counts failed sessions by side.

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
from typing import Any

import psycopg

from cdc import metrics
from cdc import pgoutput_messages as m
from cdc.change_assembler import ChangeAssembler, OutEvent, OutSchema
from cdc.errors import ReplicationLost, SinkUnavailable, SlotLost, format_lsn
from cdc.fault_points import FAULTS
from cdc.incremental_snapshot_io import IncrementalSnapshots
from cdc.kafka_sink import KafkaOptions, KafkaTransactionalSink, Sink
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
)
from cdc.pgoutput_decoder import PgOutputDecoder
from cdc.resume_position import ResumePosition
from cdc.settings import CdcSettings
from cdc.slot_health import (
    Level,
    SlotHealth,
    SlotWatch,
    StartAction,
    read_slot_health,
    start_action,
)
from cdc.snapshot import PUBLISHED_TABLES, read_snapshot
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
        topic_partitions=k.topic_partitions,
        max_message_bytes=k.max_message_bytes,
        compression=k.compression,
        timeout_s=k.timeout_s,
        security_protocol=k.security_protocol,
        sasl_mechanism=k.sasl_mechanism,
        sasl_username=k.sasl_username,
        sasl_password=k.sasl_password,
        ssl_cafile=k.ssl_cafile,
    )


class Live:
    """What the gauges read from the daemon at scrape (:class:`cdc.metrics.LiveSource`):
    its stats and the parts of the running session, set by the daemon's thread."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.slot: tuple[SlotHealth, bool] | None = None
        self.spill: FileSpillStore | None = None
        self.resnap: IncrementalSnapshots | None = None
        self.snapshot_pending = 0  # tables of the initial snapshot not read yet

    def lag_bytes(self) -> int | None:
        end, flushed = self.stats.server_wal_end, self.stats.flushed_lsn
        return max(0, end - flushed) if end else None

    def lag_seconds(self, now: float) -> float | None:
        stats = self.stats
        if stats.caught_up:
            return 0.0
        since = stats.lag_since_us
        return max(0.0, now - since / 1e6) if since else None

    def spill_bytes(self) -> int | None:
        spill = self.spill
        return spill.pending_bytes if spill is not None else None

    def tables_pending(self) -> int | None:
        resnap = self.resnap
        return self.snapshot_pending + (len(resnap.progress.jobs) if resnap is not None else 0)

    def slot_reading(self) -> tuple[SlotHealth, bool] | None:
        return self.slot

    def slot_read(self, health: SlotHealth, level: Level) -> None:
        """A slot check's reading (:class:`cdc.slot_health.SlotWatch`)."""
        self.slot = (health, level is Level.WARN)
        self.stats.server_wal_end = max(self.stats.server_wal_end, health.current_wal_lsn)


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
        self.counts = metrics.EventCounts(settings.kafka.topic_prefix)
        self.live = Live(self.stats)
        self._slot_watch: SlotWatch | None = None

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
        """Notify the service manager's watchdog, and check the slot, when due."""
        wd = self.notifier.watchdog_interval()
        now = time.monotonic()
        if wd is not None and now - self._last_watchdog >= wd:
            self.notifier.watchdog()
            self._last_watchdog = now
        watch = self._slot_watch
        if watch is not None and now >= watch.next_at:
            watch.check()

    # ------------------------------------------------------------------ run loop

    def run(self) -> int:
        """Run sessions until stopped; return the process exit code."""
        backoff = self.s.cdc.retry_backoff_initial_s
        metrics.LIVE.source = self.live
        while not self.stopping:
            self.stats.sessions += 1
            started = time.monotonic()
            try:
                self._session()
            except RETRYABLE as exc:
                if self.stopping:
                    break
                kafka = isinstance(exc, SinkUnavailable)
                metrics.SESSION_RESTARTS.labels("kafka" if kafka else "postgres").inc()
                if kafka:
                    metrics.KAFKA_ERRORS.inc()
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
        spill = self.live.spill = FileSpillStore(self.s.cdc.spill_dir or None)
        spill.clear()
        rconn = None
        stream: ReplicationStream | None = None
        sink: Sink | None = None
        resnap: IncrementalSnapshots | None = None
        try:
            info = preflight(conn, pg.tables)
            self.db = conn.info.dbname
            republished = ensure_publication(conn, pg.publication, pg.tables)
            # The producer first: its init_transactions() fences a predecessor with the same
            # transactional id and settles that one's open transaction (aborted, or committed
            # if its commit had begun), so the resume position read next is final.
            sink = self._make_sink()
            resume = read_resume_position(
                kafka_options(self.s), pg.slot, timeout_s=self.s.kafka.timeout_s
            )
            health = read_slot_health(conn, pg.slot)
            action = start_action(
                pg.slot, health, resume, initial_snapshot=pg.snapshot == "initial"
            )  # SlotLost when streaming on would skip changes
            need_snapshot = action in (
                StartAction.CREATE_WITH_SNAPSHOT,
                StartAction.RECREATE_WITH_SNAPSHOT,
            )
            # re-snapshots (cdc/incremental_snapshot_io.py): progress and recorded catalog
            # back from Kafka, catalog compared; their records ride on this sink's commits
            resnap = self.live.resnap = IncrementalSnapshots(self.s, db=self.db, catalog=catalog)
            resnap.load(
                kafka_options(self.s),
                initial_snapshot=need_snapshot,
                timeout_s=self.s.kafka.timeout_s,
                republished=republished,
            )
            sink = resnap.wrap(sink)
            if action is StartAction.RECREATE_WITH_SNAPSHOT:
                log.warning(
                    "slot %s exists but no finished snapshot is recorded in Kafka: dropping it and starting over",
                    pg.slot,
                )
                drop_slot(conn, pg.slot)
            elif health is not None and health.active_pid is not None:
                raise ReplicationLost(
                    f"slot {pg.slot} is in use by PID {health.active_pid} (another cdc daemon?)"
                )
            rconn = connect(pg.dsn, pg.password, replication=True)
            if action is not StartAction.STREAM:
                slot = create_slot(rconn, pg.slot, export_snapshot=need_snapshot)
                log.info(
                    "created slot %s at %s",
                    pg.slot,
                    format_lsn(slot.consistent_point),
                    extra={"position": format_lsn(slot.consistent_point)},
                )
                self._slot_watch = _slot_watch(self.s, conn, self.live)
                if need_snapshot and slot.snapshot_name:
                    resume = self._snapshot(
                        slot.snapshot_name, slot.consistent_point, catalog, sink
                    )
                start_lsn = slot.consistent_point
            else:
                assert health is not None
                self._slot_watch = _slot_watch(self.s, conn, self.live)
                start_lsn = 0  # the slot's confirmed_flush_lsn
                self.stats.flushed_lsn = max(
                    self.stats.flushed_lsn, health.confirmed_flush_lsn or 0
                )
            self.stats.caught_up = False
            if resume is not None and not self.stats.lag_since_us:
                self.stats.lag_since_us = resume.commit_ts_us
            resnap.persist(sink, resume)
            proto = pg.proto_version or highest_proto_version(info["server_version"])
            stream = ReplicationStream(
                rconn, pg.slot, pg.publication, start_lsn, proto, pg.streaming
            )
            decoder = PgOutputDecoder(proto)
            spill.use_decoder(decoder.decode_streamed)
            assembler = ChangeAssembler(
                db=self.db,
                topic_prefix=self.s.kafka.topic_prefix,
                catalog=catalog,
                spill=spill,
                resume=resume,
                warn=lambda msg: log.warning("%s", msg),
                observer=resnap.stream,
            )
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
            self._slot_watch = None
            self.live.snapshot_pending = 0
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
        tally: dict[tuple[str, int], int] = {}
        last = ResumePosition(consistent_point, -1, False, snapshot_done=False)
        self.notifier.status("initial snapshot")
        row = sconn.execute(
            "select count(*) from (" + PUBLISHED_TABLES + ") t", (pg.publication,)
        ).fetchone()
        self.live.snapshot_pending = int(row[0]) if row else 0
        table = ""
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
                if out.topic != table:  # the previous table is done
                    self.live.snapshot_pending -= 1 if table else 0
                    table = out.topic
                counted = (out.topic, _R)
                tally[counted] = tally.get(counted, 0) + 1
                if self.on_commit is not None:
                    collected.append(out)
                if batch >= self.s.kafka.batch_max_events:
                    sink.commit(last)
                    self.counts.committed(tally)
                    tally = {}
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
            self.counts.committed(tally)
            self.live.snapshot_pending = 0
            if self.on_commit is not None and collected:
                self.on_commit(collected)
            log.info("initial snapshot done: %d rows", self.stats.snapshot_rows)
            return done
        except SlotLost as exc:
            # no finished snapshot is recorded: the next session starts over with a new slot
            raise ReplicationLost(f"{exc} (during the initial snapshot: it starts over)") from exc
        finally:
            sconn.close()


_R = ord("r")


def _slot_watch(s: CdcSettings, conn: psycopg.Connection[Any], live: Live) -> SlotWatch:
    """Checks of the slot every cdc.slot_check_interval_s (from :meth:`CdcDaemon.tick`)."""
    return SlotWatch(
        conn,
        s.postgres.slot,
        interval_s=s.cdc.slot_check_interval_s,
        warn_share=s.cdc.slot_wal_warn_share,
        on_reading=live.slot_read,
    )
