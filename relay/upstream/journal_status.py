"""Open conflicts and uploading devices as the relay's outcome store holds them, read from
outside the relay (for ``fieldsync status``).

The outcome store (``fieldsync_relay_journal.outcomes``, relay/upstream/journal_store.py)
keeps the latest outcome of every journal entry: an entry whose latest outcome is
``conflict`` waits for a resolution (a ``resolved`` outcome replaces it).  The intake
records (``intake``) say when the relay took in each entry: the devices that uploaded
lately.  :func:`read_journal_status` counts both on one short connection.

Concurrency: each call opens its own connection and closes it; read-only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg

from core.settings_checks import redact_dsn
from relay.errors import JournalStoreError
from relay.upstream.journal_store import SCHEMA

__all__ = ["JournalStatus", "read_journal_status"]


@dataclasses.dataclass(frozen=True)
class JournalStatus:
    """``migrated``: the journal tables exist (a relay started once); ``open_conflicts``
    and ``conflict_devices``: entries whose latest outcome is ``conflict``, and their
    devices; ``uploading_devices``: devices with an entry taken in within ``recent_s``."""

    migrated: bool
    open_conflicts: int
    conflict_devices: int
    uploading_devices: int
    recent_s: float


def read_journal_status(
    dsn: str, *, password: str | None = None, recent_s: float = 3600.0, timeout_s: float = 10.0
) -> JournalStatus:
    """Open conflicts and recently uploading devices; :class:`JournalStoreError` naming the
    store when it cannot be read."""
    kw: dict[str, Any] = {"autocommit": True, "connect_timeout": max(1, int(timeout_s))}
    if password:
        kw["password"] = password
    try:
        with psycopg.connect(dsn, **kw) as conn:
            row = conn.execute(
                "select to_regclass(%s) is not null", (f"{SCHEMA}.outcomes",)
            ).fetchone()
            if not (row and row[0]):
                return JournalStatus(False, 0, 0, 0, recent_s)
            counts = conn.execute(
                f"select (select count(*) from {SCHEMA}.outcomes where outcome = 'conflict'), "
                f"(select count(distinct device_id) from {SCHEMA}.outcomes "
                "where outcome = 'conflict'), "
                f"(select count(distinct device_id) from {SCHEMA}.intake "
                "where received_at > now() - make_interval(secs => %s))",
                (recent_s,),
            ).fetchone()
    except psycopg.Error as exc:
        raise JournalStoreError(
            f"cannot read the outcome store ({redact_dsn(dsn)}): {str(exc).strip()}"
        ) from exc
    assert counts is not None
    return JournalStatus(True, int(counts[0]), int(counts[1]), int(counts[2]), recent_s)
