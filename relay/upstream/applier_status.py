"""The applier's progress as the captured database holds it, read from outside the applier
(for ``fieldsync status``).

Each applier shard commits, in the transaction of every run, the next ``{prefix}._journal``
offset per partition (``fieldsync_applier.offsets``, per consumer name: one row per
partition, whichever shard wrote it), and leads while it holds its shard's session
advisory lock (:func:`relay.upstream.applier_store.lock_name`).  Entries that failed on
their own wait in ``dead_letters``, unreadable records in ``bad_records``.
:func:`read_applier_progress` reads all of it on one short connection.

Concurrency: each call opens its own connection and closes it; read-only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import psycopg

from core.settings_checks import redact_dsn
from relay.errors import ApplierError
from relay.pg_locks import held_advisory_locks
from relay.upstream.applier_store import (
    LOCK_CLASS,
    SCHEMA,
    count_kept_aside,
    lock_name,
    read_offsets,
)

__all__ = ["ApplierProgress", "read_applier_progress"]


@dataclasses.dataclass(frozen=True)
class ApplierProgress:
    """``migrated``: schema ``fieldsync_applier`` exists (an applier started once);
    ``running_shards``: the shards whose lock is held now; ``applied``: partition → next
    offset of the journal topic; ``dead_letters``/``bad_records``: rows kept aside."""

    consumer: str
    shards: int
    migrated: bool
    running_shards: tuple[int, ...]
    applied: Mapping[int, int]
    dead_letters: int
    bad_records: int


def read_applier_progress(
    dsn: str,
    *,
    consumer: str,
    topic: str,
    shards: int,
    password: str | None = None,
    timeout_s: float = 10.0,
) -> ApplierProgress:
    """The applier's offsets on ``topic``, its running shards and what it kept aside;
    :class:`ApplierError` naming the database when it cannot be read."""
    kw: dict[str, Any] = {"autocommit": True, "connect_timeout": max(1, int(timeout_s))}
    if password:
        kw["password"] = password
    try:
        with psycopg.connect(dsn, **kw) as conn:
            row = conn.execute(
                "select to_regclass(%s) is not null", (f"{SCHEMA}.offsets",)
            ).fetchone()
            migrated = bool(row and row[0])
            applied = read_offsets(conn, consumer, topic) if migrated else {}
            dead, bad = count_kept_aside(conn) if migrated else (0, 0)
            keys = [
                (LOCK_CLASS, int(h))
                for (h,) in conn.execute(
                    "select hashtext(n) from unnest(%s::text[]) with ordinality as u(n, i) "
                    "order by i",
                    ([lock_name(consumer, s, shards) for s in range(shards)],),
                ).fetchall()
            ]
            held = held_advisory_locks(conn, keys)
    except psycopg.Error as exc:
        raise ApplierError(
            f"cannot read the applier's tables in the captured database ({redact_dsn(dsn)}): "
            f"{str(exc).strip()}"
        ) from exc
    running = tuple(s for s, key in enumerate(keys) if key in held)
    return ApplierProgress(consumer, shards, migrated, running, applied, dead, bad)
