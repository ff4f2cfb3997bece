"""The bucket store's read path in PostgreSQL: pages of ops with their checkpoints, the
consumer's progress, totals.

Every function runs on a connection the caller holds in one ``REPEATABLE READ, READ ONLY``
transaction (relay/downstream/pg_bucket_store.py), so a page's ops, checkpoints (checksum,
count, last op id) and head op id come from one snapshot; readers never block writers.
:func:`read_ops` reads, per requested bucket, at most ``limit`` ops above its cursor (one
lateral query over all buckets), flags buckets that must re-sync (a cursor from before a
drop of REMOVEs, or from another store: :meth:`BucketCheckpoint.needs_resync`), and moves
each cursor as far as the page reaches.  psycopg errors propagate to the caller, which
converts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from relay.downstream.bucket_store import BucketCheckpoint, Op, OpKind, OpsPage, PartitionProgress
from relay.downstream.pg_store_schema import SCHEMA, u64


def checkpoints(
    conn: psycopg.Connection[Any], buckets: Sequence[str]
) -> dict[str, BucketCheckpoint]:
    """The checkpoint of each of ``buckets`` (a bucket never written: zeros)."""
    names = list(dict.fromkeys(buckets))
    rows = conn.execute(
        f"select bucket, last_op_id, row_count, checksum, compacted_below, epoch "
        f"from {SCHEMA}.buckets "
        "where bucket = any(%s)",
        (names,),
    ).fetchall()
    found = {
        str(b): BucketCheckpoint(str(b), int(last), int(n), u64(int(c)), int(cb), int(e))
        for b, last, n, c, cb, e in rows
    }
    return {b: found.get(b) or BucketCheckpoint(b, 0, 0, 0, 0) for b in names}


def read_ops(
    conn: psycopg.Connection[Any],
    bucket_cursors: Mapping[str, int],
    limit: int,
    epochs: Mapping[str, int] | None,
) -> OpsPage:
    """:meth:`relay.downstream.bucket_store.BucketStore.read_ops` in the caller's snapshot."""
    cps = checkpoints(conn, list(bucket_cursors))
    row = conn.execute(f"select head_op_id from {SCHEMA}.meta").fetchone()
    head = int(row[0]) if row else 0
    resync = frozenset(
        b for b, cp in cps.items() if cp.needs_resync(bucket_cursors[b], (epochs or {}).get(b))
    )
    todo = [
        (b, bucket_cursors[b])
        for b, cp in cps.items()
        if b not in resync and bucket_cursors[b] < cp.last_op_id
    ]
    rows = []
    if todo:
        rows = conn.execute(
            "select o.bucket, o.op_id, o.tbl, o.row_key, o.kind, o.data, o.commit_lsn, o.seq "
            "from unnest(%s::text[], %s::bigint[]) as c(bucket, cursor) "
            f"cross join lateral (select * from {SCHEMA}.ops o where o.bucket = c.bucket "
            "and o.op_id > c.cursor order by o.op_id limit %s) o "
            "order by o.op_id limit %s",
            ([b for b, _ in todo], [c for _, c in todo], limit, limit),
        ).fetchall()
    ops = tuple(
        Op(int(i), str(b), str(t), str(k), OpKind(kind), d, (int(lsn), int(seq)))
        for b, i, t, k, kind, d, lsn, seq in rows
    )
    return _page(ops, cps, bucket_cursors, limit, resync, head)


def _page(
    ops: tuple[Op, ...],
    cps: Mapping[str, BucketCheckpoint],
    bucket_cursors: Mapping[str, int],
    limit: int,
    resync: frozenset[str],
    head: int,
) -> OpsPage:
    """The page ``ops`` make: each cursor moved as far as the page reaches (to the bucket's
    last op when the page is not full; 0 for a bucket to re-sync)."""
    full = len(ops) < limit
    upto = ops[-1].op_id if ops else 0
    cursors: dict[str, int] = {}
    for b, cp in cps.items():
        if b in resync:
            cursors[b] = 0
        elif full:
            cursors[b] = max(bucket_cursors[b], cp.last_op_id)
        else:
            cursors[b] = max(bucket_cursors[b], min(upto, cp.last_op_id))
    has_more = any(cursors[b] < cp.last_op_id for b, cp in cps.items() if b not in resync)
    page_epochs = {b: cp.epoch for b, cp in cps.items()}
    return OpsPage(ops, cps, cursors, resync, has_more, head, page_epochs)


def load_offsets(
    conn: psycopg.Connection[Any], group: str
) -> dict[tuple[str, int], PartitionProgress]:
    """The consumer progress ``group`` committed with its ops: (topic, partition) → progress."""
    rows = conn.execute(
        f"select topic, part, next_offset, commit_lsn, seq from {SCHEMA}.consumer_progress "
        "where grp = %s",
        (group,),
    ).fetchall()
    return {
        (str(t), int(p)): PartitionProgress(int(o), (int(lsn), int(seq)))
        for t, p, o, lsn, seq in rows
    }


def buckets_to_compact(conn: psycopg.Connection[Any]) -> list[str]:
    """The buckets whose log holds more ops than rows, in name order."""
    return [
        str(r[0])
        for r in conn.execute(
            f"select bucket from {SCHEMA}.buckets where log_count > row_count order by bucket"
        ).fetchall()
    ]


def stats(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Totals for monitoring: buckets, rows, ops in the logs, row states, head op id."""
    row = conn.execute(
        f"select (select count(*) from {SCHEMA}.buckets), "
        f"(select coalesce(sum(row_count), 0) from {SCHEMA}.buckets), "
        f"(select coalesce(sum(log_count), 0) from {SCHEMA}.buckets), "
        f"(select count(*) from {SCHEMA}.row_state), "
        f"(select head_op_id from {SCHEMA}.meta)"
    ).fetchone()
    assert row is not None
    keys = ("buckets", "rows", "ops", "row_states", "head_op_id")
    return {k: int(v) for k, v in zip(keys, row, strict=True)}
