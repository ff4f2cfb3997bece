"""Devices whose journal entries wait for a lock another session holds.

An office transaction left open after updating a row (``idle in transaction``), a long
batch job, or DDL waiting for its turn can hold a lock the applier needs.  Waiting for it
would stop every device of the shard's partitions behind that one row.  So the applier's
session has a ``lock_timeout`` (``journal.lock_timeout_ms``); a run that hits it
(SQLSTATE 55P03, :class:`LockWait`) is rolled back and its device is *set aside*:

- the run's entries not applied yet, and every later entry of that device, wait in
  :class:`LockWaits` in their order (a device's entries never overtake each other: a
  later one may depend on an earlier one), and the other devices' runs go on;
- the offsets stored with every transaction stay below the first waiting entry
  (:class:`~relay.upstream.applier_runs.Watermarks` counts the waiting entries as
  pending), so a crash or restart reads them again from Kafka; what was applied
  meanwhile is found in ``applied`` and skipped;
- every ``RETRY_S`` the waiting entries are tried again first, with a short lock timeout
  (``RETRY_LOCK_TIMEOUT_MS``: a lock still held sets them aside again at once instead of
  stalling the others for the full timeout); while any device waits, every run has that
  short timeout (many devices editing the same locked row cost the others one full
  timeout, not one each), so a run that meets a lock then is set aside and retried;
- a warning names the device, the first waiting entry, PostgreSQL's message (which names
  the relation) and the sessions holding locks on the run's tables (pid, state, since
  when, query), once per wait; ``fieldsync_applier_entries_waiting`` counts the waiting
  entries.

Nothing is rejected for a lock: an entry waits as long as the lock is held.

Concurrency: used from the applier's one thread (:class:`~relay.upstream.applier_runs.RunApplier`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

import psycopg

from relay.upstream.applier_metrics import WAITING
from relay.upstream.applier_run import Item

__all__ = ["RETRY_LOCK_TIMEOUT_MS", "RETRY_S", "LockWait", "LockWaits", "lock_holders"]

log = logging.getLogger("relay.upstream.applier")

RETRY_S: Final = 0.5
"""How often the waiting entries are tried again."""
RETRY_LOCK_TIMEOUT_MS: Final = 50
"""The lock timeout of a retry: a lock still held answers at once."""


class LockWait(Exception):
    """A run of ``device`` could not take a lock in time (SQLSTATE 55P03); ``outcomes``:
    those of the part of the run applied before it (its entries are done)."""

    def __init__(self, device: str, cause: psycopg.Error) -> None:
        super().__init__(f"device {device!r}: {cause}")
        self.device = device
        self.cause = cause
        self.outcomes: list[Any] = []


def is_lock_wait(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.errors.LockNotAvailable)


class LockWaits:
    """The entries set aside per device, in their order, and when to try them again."""

    def __init__(self, retry_s: float = RETRY_S) -> None:
        self.retry_s = retry_s
        self._waiting: dict[str, list[Item]] = {}
        self._since: dict[str, float] = {}
        self._next_retry = 0.0

    def __len__(self) -> int:
        return sum(len(v) for v in self._waiting.values())

    def devices(self) -> frozenset[str]:
        return frozenset(self._waiting)

    def due(self) -> bool:
        """Whether entries wait and it is time to try them again."""
        return bool(self._waiting) and time.monotonic() >= self._next_retry

    def items(self) -> list[Item]:
        """Every waiting entry (for the watermarks: their offsets stay pending)."""
        return [i for items in self._waiting.values() for i in items]

    def split(self, items: Sequence[Item]) -> tuple[list[Item], frozenset[str]]:
        """``(to apply now, the devices released for a retry)``.  When a retry is due every
        waiting entry is released, before the new ones (the devices' order); otherwise
        the new entries of a waiting device join its queue and are not tried."""
        if self.due():
            self._next_retry = time.monotonic() + self.retry_s
            released, devices = self.items(), self.devices()
            self._waiting.clear()
            return released + list(items), devices
        now: list[Item] = []
        for item in items:
            device = item.record.device_id if item.record is not None else None
            if device is not None and device in self._waiting:
                self._waiting[device].append(item)
            else:
                now.append(item)
        self._publish()
        return now, frozenset()

    def set_aside(self, device: str, items: Iterable[Item], exc: LockWait | None) -> None:
        """Keep ``items`` of ``device`` waiting (after those already waiting); ``exc``:
        the lock wait that started it (logged by the caller)."""
        self._waiting.setdefault(device, []).extend(items)
        if exc is not None:
            self._since.setdefault(device, time.monotonic())
        self._next_retry = max(self._next_retry, time.monotonic() + self.retry_s)
        self._publish()

    def settled(self, applied: Iterable[str]) -> list[tuple[str, float]]:
        """Devices no longer waiting among ``applied``: ``(device, seconds waited)``."""
        out = []
        for device in applied:
            if device not in self._waiting and device in self._since:
                out.append((device, time.monotonic() - self._since.pop(device)))
        self._publish()
        return out

    def waiting_since(self, device: str) -> bool:
        """Whether ``device`` was already waiting before (its wait is logged once)."""
        return device in self._since

    def forget(self) -> None:
        """Drop every waiting entry: the reader starts again from the stored offsets,
        which are below them, so they are read again."""
        self._waiting.clear()
        self._since.clear()
        self._publish()

    def _publish(self) -> None:
        WAITING.set(len(self))


HOLDERS_QUERY: Final = """
select a.pid, a.state, a.xact_start, left(regexp_replace(a.query, '\\s+', ' ', 'g'), 120)
from pg_stat_activity a
where a.pid <> pg_backend_pid() and a.pid in (
  select l.pid from pg_locks l
  where l.granted and l.relation = any(
    select to_regclass(t)::oid from unnest(%s::text[]) as t where to_regclass(t) is not null))
order by a.xact_start nulls last
limit 5
"""


def lock_holders(conn: psycopg.Connection[Any], tables: Sequence[str]) -> str:
    """The sessions holding locks on ``tables`` (``pid 812, idle in transaction since
    12:00:01, query 'update …'``), for the wait's warning; "" when none is seen or the
    query fails (it only helps the log)."""
    try:
        rows = conn.execute(HOLDERS_QUERY, (list(tables),)).fetchall()
    except psycopg.Error as exc:
        return f"(sessions holding locks not read: {str(exc).strip()})"
    parts = []
    for pid, state, since, query in rows:
        when = f" since {since:%Y-%m-%d %H:%M:%S%z}" if since is not None else ""
        parts.append(f"pid {pid}, {state or 'unknown state'}{when}, last query {query!r}")
    return "; ".join(parts)
