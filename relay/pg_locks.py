"""Which of the relay's session advisory locks a process holds, read from ``pg_locks``.

The bucket engine (per consumer group, in the store database), the outcome feed (store
database) and every applier shard (captured database) lead while they hold a session
advisory lock on two 32-bit keys (``pg_try_advisory_lock(k1, k2)``).  ``pg_locks`` shows
such a lock as ``locktype = 'advisory'``, ``objsubid = 2``, with the keys as unsigned
``classid`` and ``objid``.  :func:`held_advisory_locks` says which of the given keys are
held in the connection's database: whether a leader runs, without taking the lock.

Thin I/O: one query on the caller's connection; psycopg errors propagate to the caller,
which converts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

__all__ = ["held_advisory_locks"]

_U32 = 0xFFFFFFFF


def held_advisory_locks(
    conn: psycopg.Connection[Any], keys: Sequence[tuple[int, int]]
) -> set[tuple[int, int]]:
    """The ``keys`` (signed 32-bit pairs, as passed to ``pg_try_advisory_lock``) some
    session of this database holds now."""
    if not keys:
        return set()
    wanted = {(k1 & _U32, k2 & _U32): (k1, k2) for k1, k2 in keys}
    rows = conn.execute(
        "select classid::bigint, objid::bigint from pg_locks "
        "where locktype = 'advisory' and objsubid = 2 and granted "
        "and database = (select oid from pg_database where datname = current_database())"
    ).fetchall()
    return {wanted[(int(c), int(o))] for c, o in rows if (int(c), int(o)) in wanted}
