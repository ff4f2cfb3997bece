"""Slot health: can the replication slot still deliver every change, and how much WAL does
it hold back?

A logical replication slot keeps the WAL from its ``restart_lsn`` on.  With
``max_slot_wal_keep_size`` set, PostgreSQL removes WAL past that size at a checkpoint even
when a slot still needs it, and marks the slot ``wal_status = 'lost'``: the slot can no
longer decode the changes between its confirmed position and now (PostgreSQL 16 and later
also invalidate slots for other reasons: ``conflicting``, ``invalidation_reason``).  A slot
can also be dropped by hand, or be missing after a restore.  In every such case streaming
from a new slot would silently skip the changes in between, so the daemon stops with
:class:`cdc.errors.SlotLost` naming ``fieldsync cdc recover`` (:mod:`cdc.slot_recovery`).

Pure part (no I/O): :class:`SlotHealth` is one reading of ``pg_replication_slots``;
:func:`assess` says whether it is fine, worth a warning (``wal_status = 'unreserved'``, or
the retained WAL past ``cdc.slot_wal_warn_share`` of ``max_slot_wal_keep_size``) or lost;
:func:`start_action` decides at session start, from the slot and the resume position in
Kafka, whether to create the slot (first start), take the initial snapshot again, stream,
or stop.

I/O part: :func:`read_slot_health` (one query on an ordinary connection) and
:class:`SlotWatch`, which the daemon runs every ``cdc.slot_check_interval_s`` on its one
thread: it refreshes the slot and lag metrics, logs a warning when the level or
``wal_status`` changes, and raises :class:`SlotLost` when the slot is lost.

PostgreSQL reports no free disk space through SQL, so without ``max_slot_wal_keep_size``
the retained WAL is reported (``fieldsync_cdc_slot_retained_wal_bytes``) but not compared
with anything: watch the disk of the WAL directory on the host.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from cdc.errors import ReplicationLost, SlotLost, format_lsn, parse_lsn
from cdc.resume_position import ResumePosition

__all__ = [
    "RECOVER_HINT",
    "WAL_STATUSES",
    "Level",
    "SlotHealth",
    "SlotWatch",
    "StartAction",
    "assess",
    "lost_message",
    "read_slot_health",
    "start_action",
]

log = logging.getLogger("fieldsync.cdc")

WAL_STATUSES: Final = ("reserved", "extended", "unreserved", "lost")
"""The values of ``pg_replication_slots.wal_status``."""

RECOVER_HINT: Final = (
    'run `fieldsync cdc recover --config FILE` (docs/cdc.md, "Lost slot"): it makes a new '
    "slot and sends every published table again, so nothing stays missing"
)

_MB: Final = 1024 * 1024

SLOT_QUERY: Final = """
select to_jsonb(s)::text, pg_current_wal_lsn()::text,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint,
       pg_size_bytes(current_setting('max_slot_wal_keep_size', true))
from pg_replication_slots s where s.slot_name = %s
"""


@dataclass(frozen=True, slots=True)
class SlotHealth:
    """One reading of a slot in ``pg_replication_slots`` (None where PostgreSQL has none)."""

    slot: str
    wal_status: str | None
    invalidation: str | None  # why PostgreSQL 16+ invalidated it (conflicting, reason)
    active_pid: int | None
    restart_lsn: int | None
    confirmed_flush_lsn: int | None
    current_wal_lsn: int
    retained_bytes: int | None  # current WAL position minus restart_lsn
    safe_wal_size: int | None  # bytes that can be written before the slot is in danger
    keep_limit_bytes: int | None  # max_slot_wal_keep_size; None: unlimited (-1)

    @property
    def lost(self) -> bool:
        return self.wal_status == "lost" or self.invalidation is not None

    @property
    def share_of_limit(self) -> float | None:
        """Retained WAL as a share of ``max_slot_wal_keep_size`` (None when unlimited)."""
        if self.keep_limit_bytes is None or self.retained_bytes is None:
            return None
        return self.retained_bytes / max(self.keep_limit_bytes, 1)

    @classmethod
    def from_row(
        cls, slot: str, row_json: str, current: str, retained: int | None, limit: int | None
    ) -> SlotHealth:
        """From :data:`SLOT_QUERY`'s row: the slot's row as JSON, the current WAL position,
        the retained bytes and ``max_slot_wal_keep_size`` in bytes (-1: unlimited)."""
        row: dict[str, Any] = json.loads(row_json)
        reason = row.get("invalidation_reason")
        if not reason and row.get("conflicting"):
            reason = "conflicting"
        pid = row.get("active_pid")
        safe = row.get("safe_wal_size")
        return cls(
            slot=slot,
            wal_status=row.get("wal_status"),
            invalidation=str(reason) if reason else None,
            active_pid=int(pid) if pid is not None else None,
            restart_lsn=_lsn(row.get("restart_lsn")),
            confirmed_flush_lsn=_lsn(row.get("confirmed_flush_lsn")),
            current_wal_lsn=parse_lsn(current),
            retained_bytes=int(retained) if retained is not None else None,
            safe_wal_size=int(safe) if safe is not None else None,
            keep_limit_bytes=int(limit) if limit is not None and int(limit) >= 0 else None,
        )


def _lsn(text: Any) -> int | None:
    return parse_lsn(str(text)) if text else None


def _mb(n: int) -> str:
    return f"{n / _MB:.1f} MB"


# --------------------------------------------------------------------------- assessing


class Level(enum.Enum):
    OK = "ok"
    WARN = "warn"
    LOST = "lost"


def lost_message(h: SlotHealth) -> str:
    """Why the slot cannot deliver every change any more, and what to do."""
    if h.invalidation is not None and h.wal_status != "lost":
        why = f"PostgreSQL invalidated it ({h.invalidation})"
    else:
        limit = _mb(h.keep_limit_bytes) if h.keep_limit_bytes is not None else "unlimited"
        why = (
            "wal_status 'lost': PostgreSQL removed WAL it still needed "
            f"(max_slot_wal_keep_size {limit})"
        )
    since = format_lsn(h.confirmed_flush_lsn) if h.confirmed_flush_lsn else "its position"
    return (
        f"replication slot {h.slot!r} is lost ({why}); the changes after {since} cannot be "
        f"streamed from it any more. {RECOVER_HINT}"
    )


def assess(h: SlotHealth, warn_share: float) -> tuple[Level, str]:
    """Whether the slot is fine, worth a warning or lost, with a message saying why."""
    if h.lost:
        return Level.LOST, lost_message(h)
    share = h.share_of_limit
    if h.wal_status == "unreserved":
        return Level.WARN, (
            f"replication slot {h.slot!r} has wal_status 'unreserved': it retains "
            f"{_mb(h.retained_bytes or 0)}, past max_slot_wal_keep_size; the next checkpoint "
            "may remove WAL it needs and the slot is then lost (find why cdc is behind)"
        )
    if share is not None and share >= warn_share and h.keep_limit_bytes is not None:
        return Level.WARN, (
            f"replication slot {h.slot!r} retains {_mb(h.retained_bytes or 0)} of WAL, "
            f"{share:.0%} of max_slot_wal_keep_size ({_mb(h.keep_limit_bytes)}; warning at "
            f"{warn_share:.0%}); past it PostgreSQL removes WAL the slot needs and the slot "
            "is lost (find why cdc is behind)"
        )
    return Level.OK, f"replication slot {h.slot!r}: wal_status {h.wal_status}"


# --------------------------------------------------------------------------- at start


class StartAction(enum.Enum):
    """What a session does with its slot at start (:func:`start_action`)."""

    CREATE = "create"  # no slot and nothing in Kafka: a first start without a snapshot
    CREATE_WITH_SNAPSHOT = "create_with_snapshot"  # no slot, no finished initial snapshot
    RECREATE_WITH_SNAPSHOT = "recreate_with_snapshot"  # a slot, but the snapshot did not finish
    STREAM = "stream"  # the slot is there and healthy: stream from it


def start_action(
    slot_name: str,
    health: SlotHealth | None,
    resume: ResumePosition | None,
    *,
    initial_snapshot: bool,
) -> StartAction:
    """The session's start, from the slot (None: it does not exist) and the resume position
    Kafka holds; :class:`SlotLost` when streaming on would skip changes."""
    if resume is not None and resume.recovering:
        raise SlotLost(
            f"a recovery of slot {slot_name!r} did not finish (the resume position in Kafka "
            "is marked recovering): run `fieldsync cdc recover --config FILE` again"
        )
    need_snapshot = initial_snapshot and (resume is None or not resume.snapshot_done)
    if health is None:
        if need_snapshot:
            return StartAction.CREATE_WITH_SNAPSHOT
        if resume is None:
            return StartAction.CREATE
        raise SlotLost(
            f"replication slot {slot_name!r} does not exist, but Kafka holds a resume position "
            f"for it ({format_lsn(resume.commit_lsn)}:{resume.seq}): it was dropped, or the "
            "database was restored, so the changes since then cannot be read from it; a new "
            f"slot would silently skip them. {RECOVER_HINT}"
        )
    if need_snapshot:
        return StartAction.RECREATE_WITH_SNAPSHOT  # every row is read again: nothing is lost
    if health.lost:
        raise SlotLost(lost_message(health))
    return StartAction.STREAM


# --------------------------------------------------------------------------- I/O


def read_slot_health(conn: psycopg.Connection[Any], slot: str) -> SlotHealth | None:
    """The slot's health now, or None when it does not exist."""
    row = conn.execute(SLOT_QUERY, (slot,)).fetchone()
    if row is None:
        return None
    return SlotHealth.from_row(slot, row[0], row[1], row[2], row[3])


class SlotWatch:
    """Checks the slot every ``interval_s`` (see the module docstring); ``on_reading`` gets
    every reading (the daemon keeps it for the metrics)."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        slot: str,
        *,
        interval_s: float,
        warn_share: float,
        on_reading: Callable[[SlotHealth, Level], None],
    ) -> None:
        self.conn = conn
        self.slot = slot
        self.interval_s = interval_s
        self.warn_share = warn_share
        self.on_reading = on_reading
        self.next_at = 0.0  # time.monotonic() of the next check
        self._last: tuple[Level, str | None] = (Level.OK, None)

    def check(self) -> SlotHealth:
        """Read the slot now; raise :class:`SlotLost` when it is lost or gone."""
        self.next_at = time.monotonic() + self.interval_s
        try:
            health = read_slot_health(self.conn, self.slot)
        except psycopg.OperationalError as exc:
            raise ReplicationLost(f"checking slot {self.slot}: {str(exc).strip()}") from exc
        if health is None:
            raise SlotLost(
                f"replication slot {self.slot!r} disappeared while cdc was streaming from it "
                f"(dropped by hand?). {RECOVER_HINT}"
            )
        level, message = assess(health, self.warn_share)
        self.on_reading(health, level)
        state = (level, health.wal_status)
        if state != self._last:
            if level is Level.OK:
                log.info("%s", message)
            elif level is Level.WARN:
                log.warning("%s", message)
            self._last = state
        if level is Level.LOST:
            raise SlotLost(message)
        return health
