"""Kept conflicts for the device API: who owns one, and resolving it as that device.

A device lists its open conflicts from the outcome store (the open ones are those whose
latest outcome is ``conflict``; rows already cut to what the device may see).  A
resolution goes to the captured database: :class:`ConflictDesk` checks there that the
conflict is the device's own (:class:`~relay.errors.NotOwnDevice`, 403, otherwise) and
settles it with :meth:`relay.upstream.applier_db.ApplierDb.resolve` (a new edit, origin
``resolve:<id>``; resolving again returns the first resolution and writes nothing),
judged by the device's write rules (its token's claims) against the current row like
its journal entries (403 ``forbidden_row`` / ``forbidden_column`` / ``forbidden_move``).
The desk's connection also gives the intake the captured tables' column types
(:meth:`ConflictDesk.types`).

Thread-safe: one captured-database connection, serialized by a lock and (re)connected
on demand; the API calls it from worker threads.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import psycopg

from core.journal_outcomes import Outcome
from core.values import ColumnType
from relay.api_errors import Unavailable
from relay.errors import (
    ApplierError,
    ConfigError,
    ConflictNotFound,
    NotOwnDevice,
    ResolveError,
)
from relay.upstream.applier_db import ApplierDb
from relay.upstream.applier_store import SCHEMA as APPLIER_SCHEMA

__all__ = ["ConflictDesk"]

log = logging.getLogger("relay.upstream.journal_api")


class ConflictDesk:
    """Kept conflicts in the captured database: who owns one, and resolving it through
    :meth:`relay.upstream.applier_db.ApplierDb.resolve`.  One connection, serialized by a lock;
    (re)connected on demand."""

    def __init__(self, db: ApplierDb, retry_s: float = 30.0) -> None:
        self.db = db
        self.retry_s = retry_s
        self._lock = threading.Lock()
        self._types: Mapping[str, Mapping[str, ColumnType]] = {}
        self._failed_at = -math.inf

    def _ensure(self) -> psycopg.Connection[Any]:
        """The connection, (re)connected; the tables' definitions re-read when they
        changed (compared at most once a second: :meth:`ApplierDb.follow_catalog`)."""
        conn = self.db.conn
        if conn is None or conn.closed:
            self.db.connect()
            read = True
        else:
            read = self.db.follow_catalog(())
        if read:
            self._types = {t: m.types for t, m in self.db.tables.items()}
        return self.db.connection()

    def types(self) -> Mapping[str, Mapping[str, ColumnType]]:
        """Column types of the captured tables, as last read (after a failure to connect,
        the next attempt waits ``retry_s``; until then, or if none ever worked, the last
        types, maybe none: the applier checks types anyway)."""
        with self._lock:
            if time.monotonic() - self._failed_at < self.retry_s:
                return self._types
            try:
                self._ensure()
            except (ApplierError, ConfigError, psycopg.Error) as exc:
                self._failed_at = time.monotonic()
                log.warning("journal intake: captured database unavailable (%s)", exc)
            return self._types

    def resolve(
        self,
        device_id: str,
        conflict_id: str,
        choice: str,
        values: Mapping[str, Any] | None,
        claims: Mapping[str, Any],
    ) -> tuple[Outcome, bool]:
        """Settle the device's conflict as that device (its token's ``claims``: judged by
        its write rules against the row as it is now); returns the ``resolved`` outcome and
        whether it had been resolved before (then nothing was written).  Raises
        ConflictNotFound, NotOwnDevice, ResolveForbidden, ResolveError, or Unavailable."""
        if not _is_conflict_id(conflict_id):
            raise ConflictNotFound(f"no kept conflict has id {conflict_id!r:.80}")
        with self._lock:
            try:
                conn = self._ensure()
                try:
                    found = conn.execute(
                        f"select device_id, status from {APPLIER_SCHEMA}.conflicts where id = %s",
                        (conflict_id,),
                    ).fetchone()
                except psycopg.errors.UndefinedTable:
                    found = None  # the applier never ran here: no conflict at all
                if found is None:
                    raise ConflictNotFound(f"no kept conflict has id {conflict_id!r}")
                owner, status = str(found[0]), str(found[1])
                if owner != device_id:
                    raise NotOwnDevice(
                        f"conflict {conflict_id} belongs to another device; device "
                        f"{device_id!r} may resolve only its own"
                    )
                outcome = self.db.resolve(
                    conflict_id, choice, values, by=f"device:{device_id}", claims=claims
                )
                return outcome, status == "resolved"
            except (ConflictNotFound, ResolveError, NotOwnDevice):
                raise
            except (ApplierError, ConfigError, psycopg.Error) as exc:
                log.warning("conflict %s not resolved: %s", conflict_id, exc)
                self.db.close()
                raise Unavailable(
                    "the captured database cannot be used to resolve the conflict now (the "
                    "relay's log says why); retry later"
                ) from exc

    def close(self) -> None:
        with self._lock:
            self.db.close()


def _is_conflict_id(text: str) -> bool:
    """Conflict ids are UUIDs (the applier makes them); anything else names none."""
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False
