"""What ``fieldsync cdc status`` shows, read by one function that ``fieldsync status``
(fieldsync/status.py) calls too.

:func:`read_status` gathers, for the slot of the settings:

- from PostgreSQL (:func:`cdc.pg_source.slot_state`): whether the slot exists, its plugin,
  whether a daemon streams from it (``active``), its confirmed flush and restart
  positions, the server's WAL end, the lag in bytes between them, ``wal_status``,
  ``safe_wal_size`` and the WAL the slot retains (:mod:`cdc.slot_health`); ``slot_lost``
  says why a lost slot cannot deliver every change and names ``fieldsync cdc recover``;
- from Kafka (:mod:`cdc.kafka_state`): the resume position cdc committed with its last
  events (``kafka_position``) and the commit time of that transaction
  (``last_event_time``, ISO 8601 UTC; absent while only snapshot rows were written), and
  the re-snapshots queued or running (:mod:`cdc.resnapshot_state`).

PostgreSQL is asked first: when it cannot be reached, :func:`read_status` raises
(:class:`cdc.errors.ReplicationLost` naming the server).  A broker that cannot be read
does not hide the slot's facts: its error is put under ``kafka_error`` (or
``resnapshot_error`` for the re-snapshot record alone).

Concurrency: each call opens its own connection and consumers and closes them; it blocks
about ``timeout_s`` at most per request (every Kafka request is bounded by it too).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import psycopg

from cdc.errors import SourceError, format_lsn
from cdc.incremental_snapshot import Progress
from cdc.kafka_sink import KafkaOptions
from cdc.kafka_state import read_resume_position
from cdc.pg_source import connect, slot_state
from cdc.pipeline import kafka_options
from cdc.resnapshot_state import progress_key, read_state_records
from cdc.settings import CdcSettings
from cdc.slot_health import lost_message, read_slot_health
from core.errors import FieldsyncError

__all__ = ["iso_time_us", "read_status"]


def iso_time_us(us: int) -> str:
    """Microseconds since the Unix epoch as ISO 8601 in UTC (``2025-01-31T12:00:00.000123Z``)."""
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us // 1_000_000)) + f".{us % 1_000_000:06d}Z"
    )


def read_status(settings: CdcSettings, timeout_s: float = 10.0) -> dict[str, Any]:
    """The slot, the resume position in Kafka and the re-snapshots (module docstring).
    Raises :class:`core.errors.FieldsyncError` when PostgreSQL cannot be read."""
    pg = settings.postgres
    with connect(pg.dsn, pg.password, connect_timeout=max(1, int(timeout_s))) as conn:
        try:
            state = slot_state(conn, pg.slot)
            health = read_slot_health(conn, pg.slot)
        except psycopg.Error as exc:
            raise SourceError(f"reading pg_replication_slots: {str(exc).strip()}") from exc
    out: dict[str, Any] = {"slot": pg.slot, "exists": state is not None}
    if state:
        out.update(state)
    if health is not None:
        out["retained_wal_bytes"] = health.retained_bytes
        if health.lost:
            out["slot_lost"] = lost_message(health)
    timeout = min(timeout_s, settings.kafka.timeout_s)
    opts = dataclasses.replace(kafka_options(settings), timeout_s=timeout)  # every request
    try:
        resume = read_resume_position(opts, pg.slot, timeout_s=timeout)
    except FieldsyncError as exc:
        out["kafka_error"] = str(exc)
        return out
    if resume is not None:
        out["kafka_position"] = {
            "commit_lsn": format_lsn(resume.commit_lsn),
            "seq": resume.seq,
            "complete": resume.complete,
            "snapshot_done": resume.snapshot_done,
        }
        if resume.commit_ts_us:
            out["last_event_time"] = iso_time_us(resume.commit_ts_us)
    out.update(_resnapshots(opts, pg.slot))
    return out


def _resnapshots(opts: KafkaOptions, slot: str) -> dict[str, Any]:
    """Queued and running re-snapshots, from their progress record in Kafka."""
    key = progress_key(slot)
    try:
        found = read_state_records(opts, [key], timeout_s=opts.timeout_s)
        progress = Progress.from_bytes(found[key]) if key in found else Progress()
    except (FieldsyncError, ValueError) as exc:
        return {"resnapshot_error": str(exc)}
    return {
        "resnapshots": [
            {
                "table": j.table,
                "where": j.where,
                "reason": j.reason,
                "after_key": list(j.after) if j.after else None,
                "chunks": j.chunks,
                "rows": j.rows,
                "retiring_old_keys": j.retiring,
            }
            for j in progress.jobs
        ],
        "resnapshot_requests": len(progress.requests),
    }
