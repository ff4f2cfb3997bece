"""``fieldsync cdc recover``: a new replication slot after the old one was lost, without a gap.

When the slot is lost (PostgreSQL removed WAL it needed), gone while Kafka holds a resume
position, or an earlier recovery did not finish, the daemon refuses to stream
(:func:`cdc.slot_health.start_action`).  Recovery, with the daemon stopped:

1. :func:`assess`: the slot's health and the resume position in Kafka; recovery is needed
   exactly when the daemon would refuse to start.  A slot some process still uses is an
   error (stop ``fieldsync cdc run`` first).
2. Mark the resume position in Kafka ``recovering`` (a Kafka transaction of the daemon's
   transactional id: it also fences a daemon still running).  From here until step 6 a
   crash leaves the mark, so the daemon keeps refusing and recovery can be run again; it
   starts over at step 3.
3. Drop the old slot (when there is one) and create a new one; its consistent point ``S``
   is where the daemon will stream from.
4. Request a re-snapshot of every published table with a primary key: a row per table in
   the signal table (``postgres.signal_table``), inserted after the slot exists, so the
   daemon reads the requests from the new slot's stream and re-reads each table in chunks
   between watermarks (docs/cdc.md, "Re-snapshots").  Every chunk is read after ``S``: it
   holds every change committed before ``S`` (the ones the lost slot never delivered), and
   the watermarks keep it from overwriting a newer change of the stream.
5. Deletes made while the slot was lost (:mod:`cdc.recovery_deletes`): rows Kafka holds that
   PostgreSQL no longer has get a delete event at ``(S - 1, seq)``.
6. Commit those deletes with the resume position ``(S - 1, last seq, complete)`` and the mark
   cleared, in one Kafka transaction.  The daemon then streams from ``S``.

Tables without a primary key cannot be re-read in chunks; they are reported (re-create them
in the consumers by hand, or give them a primary key and run ``fieldsync cdc snapshot``).

Concurrency: one thread; the daemon must not run meanwhile (checked: the slot is not in
use, and step 2 fences its producer).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from cdc import pgoutput_messages as m
from cdc.change_assembler import topic_for
from cdc.errors import CdcError, SlotLost, SourceError, format_lsn
from cdc.fault_points import FAULTS
from cdc.kafka_sink import KafkaTransactionalSink
from cdc.kafka_state import read_resume_position
from cdc.pg_catalog import PgCatalog
from cdc.pg_source import connect, create_slot, drop_slot, ensure_publication, preflight
from cdc.pipeline import kafka_options
from cdc.recovery_deletes import DeleteAt, delete_value, live_keys, pg_keys, schema_registry
from cdc.resnapshot_requests import request_snapshot, split_table
from cdc.resume_position import ResumePosition
from cdc.settings import CdcSettings
from cdc.slot_health import SlotHealth, StartAction, read_slot_health, start_action
from cdc.snapshot import SnapshotTable, published_tables
from core.avro_envelope import POSITION_HEADER, TableCodec, position_header

__all__ = ["Assessment", "Recovery", "assess", "recover"]

log = logging.getLogger("fieldsync.cdc")


@dataclass(frozen=True)
class Assessment:
    """Whether recovery is needed, and why (``reason``: the daemon's error, or what it
    does next when it is not needed)."""

    needed: bool
    reason: str
    health: SlotHealth | None
    resume: ResumePosition | None


@dataclass
class Recovery:
    """What recovery did."""

    consistent_point: int = 0
    dropped: bool = False
    signals: list[tuple[str, int]] = field(default_factory=list)  # (table, signal id)
    keyless: list[str] = field(default_factory=list)
    deletes: dict[str, int] = field(default_factory=dict)


def assess(settings: CdcSettings) -> Assessment:
    """Read the slot and the resume position; SourceError when the slot is in use."""
    pg = settings.postgres
    with connect(pg.dsn, pg.password) as conn:
        health = read_slot_health(conn, pg.slot)
    resume = read_resume_position(
        kafka_options(settings), pg.slot, timeout_s=settings.kafka.timeout_s
    )
    if health is not None and health.active_pid is not None:
        raise SourceError(
            f"replication slot {pg.slot!r} is in use by PID {health.active_pid}: stop "
            "`fieldsync cdc run` first"
        )
    try:
        action = start_action(pg.slot, health, resume, initial_snapshot=pg.snapshot == "initial")
    except SlotLost as exc:
        return Assessment(True, str(exc), health, resume)
    next_start = {
        StartAction.CREATE: "creates the slot",
        StartAction.CREATE_WITH_SNAPSHOT: "creates the slot and takes the initial snapshot",
        StartAction.RECREATE_WITH_SNAPSHOT: "takes the initial snapshot again on a new slot",
        StartAction.STREAM: "streams from it",
    }[action]
    state = "healthy" if health is not None else "not there"
    return Assessment(
        False,
        f"nothing to recover: slot {pg.slot!r} is {state} and `fieldsync cdc run` {next_start}",
        health,
        resume,
    )


def recover(
    settings: CdcSettings, found: Assessment, *, echo: Callable[[str], None] = log.info
) -> Recovery:
    """Steps 2 to 6 of the module docstring (``found`` from :func:`assess`, needed)."""
    pg = settings.postgres
    if not pg.signal_table:
        raise CdcError(
            "recovery asks the daemon to re-read every table through the signal table, and "
            'postgres.signal_table is empty: set it (e.g. "fieldsync.cdc_signals")'
        )
    done = Recovery()
    sink = KafkaTransactionalSink(kafka_options(settings), pg.slot)
    conn = connect(pg.dsn, pg.password)
    catalog = PgCatalog(pg.dsn, pg.password)
    try:
        previous = found.resume or ResumePosition(0, -1, True)
        sink.begin()
        sink.commit(dataclasses.replace(previous, recovering=True))
        echo(f"marked the resume position of slot {pg.slot} in Kafka: recovery under way")
        preflight(conn, pg.tables)
        ensure_publication(conn, pg.publication, pg.tables)
        done.dropped = _new_slot(settings, conn, done)
        verb = "dropped and re-created" if done.dropped else "created"
        echo(f"slot {pg.slot} {verb} at {format_lsn(done.consistent_point)}")
        tables = _tables(conn, settings)
        _request_snapshots(conn, settings, tables, done, echo)
        if FAULTS.armed:
            FAULTS.hit("recover_new_slot")
        _write_deletes(settings, conn, catalog, tables, sink, previous, done, echo)
    finally:
        sink.close()
        catalog.close()
        conn.close()
    return done


def _new_slot(settings: CdcSettings, conn: psycopg.Connection[Any], done: Recovery) -> bool:
    pg = settings.postgres
    health = read_slot_health(conn, pg.slot)
    if health is not None:
        drop_slot(conn, pg.slot)
    with connect(pg.dsn, pg.password, replication=True) as rconn:
        slot = create_slot(rconn, pg.slot, export_snapshot=False)
    done.consistent_point = slot.consistent_point
    return health is not None


def _tables(conn: psycopg.Connection[Any], settings: CdcSettings) -> list[SnapshotTable]:
    """The published tables (the signal table among them once it exists)."""
    return published_tables(conn, settings.postgres.publication)


def _request_snapshots(
    conn: psycopg.Connection[Any],
    settings: CdcSettings,
    tables: list[SnapshotTable],
    done: Recovery,
    echo: Callable[[str], None],
) -> None:
    pg = settings.postgres
    covered = _refresh_signals(conn, pg.signal_table)
    if covered:
        echo(
            f"{covered} pending request(s) in {pg.signal_table} marked done: every table is sent again"
        )
    signal = split_table(pg.signal_table)
    for t in tables:
        name = f"{t.schema}.{t.table}"
        if (t.schema, t.table) == signal:
            continue  # not re-read (the daemon refuses): _refresh_signals sent its rows
        if not any(c.is_key for c in t.columns):
            done.keyless.append(name)
            continue
        signal_id, _ = request_snapshot(
            conn, publication=pg.publication, signal_table=pg.signal_table, table=name, where=None
        )
        done.signals.append((name, signal_id))
        echo(f"re-snapshot of {name} requested: signal {signal_id} in {pg.signal_table}")


def _refresh_signals(conn: psycopg.Connection[Any], signal_table: str) -> int:
    """Write every row of the signal table again (an update of each, so the new slot sends
    them all: rows inserted while the slot was lost reach Kafka too), marking the requests
    nobody will read (still pending: inserted before the new slot) done, as the recovery's
    own requests cover them; how many were pending."""
    schema, table = split_table(signal_table)
    found = conn.execute(
        "select to_regclass(format('%%I.%%I', %s::text, %s::text))", (schema, table)
    )
    if found.fetchone() == (None,):
        return 0
    rows = conn.execute(
        sql.SQL(
            "with old as (select id, status = 'pending' as pending from {t}) "
            "update {t} s set "
            "status = case when old.pending then %s else s.status end, "
            "status_at = case when old.pending then now() else s.status_at end "
            "from old where old.id = s.id returning old.pending"
        ).format(t=sql.Identifier(schema, table)),
        ("done: covered by the recovery of the slot",),
    ).fetchall()
    return sum(1 for (pending,) in rows if pending)


def _write_deletes(
    settings: CdcSettings,
    conn: psycopg.Connection[Any],
    catalog: PgCatalog,
    tables: list[SnapshotTable],
    sink: KafkaTransactionalSink,
    previous: ResumePosition,
    done: Recovery,
    echo: Callable[[str], None],
) -> None:
    """Steps 5 and 6: the deletes and the resume position at S - 1, in one Kafka
    transaction (begun once every topic was read)."""
    opts, prefix = kafka_options(settings), settings.kafka.topic_prefix
    lsn = max(done.consistent_point - 1, previous.commit_lsn)
    at = DeleteAt(conn.info.dbname, lsn, 0, int(time.time() * 1_000_000))
    records: list[tuple[str, bytes, bytes]] = []
    for t in tables:
        if not any(c.is_key for c in t.columns):
            continue
        topic = topic_for(prefix, t.schema, t.table)
        live = live_keys(opts, topic, settings.kafka.timeout_s)
        if not live:
            continue
        present = pg_keys(conn, _codec(conn, t, catalog, prefix))
        gone = {k: fp for k, fp in live.items() if k not in present}
        if not gone:
            continue
        registry = schema_registry(opts, gone, settings.kafka.timeout_s)
        for key, fp in sorted(gone.items()):
            at = dataclasses.replace(at, seq=len(records))
            records.append((topic, key, delete_value(key, fp, registry, at)))
        done.deletes[f"{t.schema}.{t.table}"] = len(gone)
        echo(f"{t.schema}.{t.table}: {len(gone)} row(s) deleted while the slot was lost")
    sink.begin()
    for seq, (topic, key, value) in enumerate(records):
        sink.send(topic, key, value, [(POSITION_HEADER, position_header(lsn, seq))])
    last = len(records) - 1
    sink.commit(
        ResumePosition(lsn, last, True, snapshot_done=True, commit_ts_us=previous.commit_ts_us)
    )
    echo(f"resume position in Kafka: {format_lsn(lsn)}:{last}, recovery mark cleared")


def _codec(
    conn: psycopg.Connection[Any], t: SnapshotTable, catalog: PgCatalog, prefix: str
) -> TableCodec:
    return TableCodec(
        db=conn.info.dbname,
        schema=t.schema,
        table=t.table,
        columns=t.columns,
        catalog=catalog,
        unchanged_sentinel=m.UNCHANGED_TOAST,
        warn=lambda msg: log.warning("%s", msg),
        namespace_prefix=prefix,
    )
