"""The bucket engine's progress as the bucket store holds it, read from outside the engine
(for ``fieldsync status``).

The engine commits, in the same transaction as the ops, the next offset of every change
topic partition it applied (``fieldsync_relay.consumer_progress``, per consumer group:
:func:`relay.downstream.pg_store_reads.load_offsets`), and the engine of each share leads
while it holds the session advisory lock of the group and share
(:func:`relay.downstream.pg_store_schema.group_lock`).
:func:`read_engine_progress` reads both on one short connection: the offsets to compare
with the topics' end offsets (relay/kafka_offsets.py), and whether an engine runs.
:func:`ruled_topics` names the change topics the engine consumes for a rules file.

Concurrency: each call opens its own connection and closes it; read-only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg

from core.settings_checks import redact_dsn
from relay.downstream.bucket_engine import change_topics
from relay.downstream.pg_store_reads import load_offsets
from relay.downstream.pg_store_schema import SCHEMA, group_lock
from relay.downstream.rules_parser import check_rules_file
from relay.errors import StoreError
from relay.pg_locks import held_advisory_locks

__all__ = ["EngineProgress", "read_engine_progress", "ruled_topics"]


@dataclasses.dataclass(frozen=True)
class EngineProgress:
    """``migrated``: the store's schema exists (an engine started once); ``leading``: an
    engine of ``group`` holds the lock of every share now (``unled``: the shares none
    leads); ``applied``: (topic, partition) → next offset."""

    group: str
    migrated: bool
    leading: bool
    applied: Mapping[tuple[str, int], int]
    unled: tuple[int, ...] = ()


def ruled_topics(rules_path: str | Path, prefix: str) -> dict[str, str]:
    """The change topics (→ table) the engine consumes for the tables of ``rules_path``
    (its structure is checked; the tables' columns are not)."""
    return change_topics(prefix, {t for b in check_rules_file(rules_path) for t in b.tables})


def read_engine_progress(
    dsn: str,
    *,
    group: str,
    password: str | None = None,
    timeout_s: float = 10.0,
    shares: int = 1,
) -> EngineProgress:
    """The engine's committed offsets and whether it leads; :class:`StoreError` naming the
    store when it cannot be read."""
    kw: dict[str, Any] = {"autocommit": True, "connect_timeout": max(1, int(timeout_s))}
    if password:
        kw["password"] = password
    try:
        with psycopg.connect(dsn, **kw) as conn:
            row = conn.execute(
                "select to_regclass(%s) is not null", (f"{SCHEMA}.consumer_progress",)
            ).fetchone()
            migrated = bool(row and row[0])
            applied = (
                {tp: p.next_offset for tp, p in load_offsets(conn, group).items()}
                if migrated
                else {}
            )
            locks = [group_lock(group, share) for share in range(shares)]
            held = set(held_advisory_locks(conn, locks))
            unled = tuple(s for s, lock in enumerate(locks) if lock not in held)
    except psycopg.Error as exc:
        raise StoreError(
            f"cannot read the bucket store ({redact_dsn(dsn)}): {str(exc).strip()}"
        ) from exc
    return EngineProgress(group, migrated, not unled, applied, unled)
