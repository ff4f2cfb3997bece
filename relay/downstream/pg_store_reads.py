"""The bucket store's read path in PostgreSQL: pages of ops with their checkpoints, the
consumer's progress, totals.

Every function runs on a connection the caller holds in one ``REPEATABLE READ, READ ONLY``
transaction (relay/downstream/pg_bucket_store.py), so a page's ops, checkpoints (checksum,
count, last op id) and head op id come from one snapshot; readers never block writers.
:func:`read_pages` answers many page requests from one snapshot: it reads each
``(bucket, cursor)`` slice once however many requests need it (the plan and each page's
composition are relay/downstream/page_plan.py), flags buckets that must re-sync (a cursor
from before a drop of REMOVEs, or from another store:
:meth:`BucketCheckpoint.needs_resync`), and moves each cursor as far as its page reaches.  psycopg errors propagate to the caller, which
converts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import psycopg

from relay.downstream.bucket_store import (
    BucketCheckpoint,
    Op,
    OpKind,
    OpsPage,
    PageRequest,
    PartitionProgress,
    WireOps,
)
from relay.downstream.page_plan import SliceKey, compose, plan_reads
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


def read_pages(conn: psycopg.Connection[Any], requests: Sequence[PageRequest]) -> list[OpsPage]:
    """:meth:`relay.downstream.bucket_store.BucketStore.read_pages` in the caller's
    snapshot: one checkpoint read for every requested bucket, one lateral read of every
    single-bucket slice (relay/downstream/page_plan.py), one read per merged slice.
    Wire requests get their ops rendered as JSON by PostgreSQL from the stored texts."""
    cps = checkpoints(conn, [b for req in requests for b in req.cursors])
    row = conn.execute(f"select head_op_id from {SCHEMA}.meta").fetchone()
    head = int(row[0]) if row else 0
    plan = plan_reads(requests, cps)
    slices: dict[SliceKey, list[tuple[int, Any]]] = {}
    single = plan.single
    if single:
        _read_single(conn, single, slices)
    for (wire, pairs), limit in plan.merged.items():
        rows = conn.execute(
            f"select o.op_id, {_WIRE if wire else _OP_COLUMNS} "
            "from unnest(%s::text[], %s::bigint[], %s::text[]) as c(bucket, cursor, bj) "
            f"cross join lateral (select * from {SCHEMA}.ops o where o.bucket = c.bucket "
            "and o.op_id > c.cursor order by o.op_id limit %s) o "
            "order by o.op_id limit %s",
            (*_pair_arrays(pairs), limit, limit),
        ).fetchall()
        slices[(wire, pairs)] = _items(rows, wire)
    pages = []
    for req, req_plan in zip(requests, plan.requests, strict=True):
        frame = compose(req, req_plan, cps, slices)
        page_cps = {b: cps[b] for b in req.cursors}
        items = frame.items
        wire_ops = None
        if req.wire:
            wire_ops = WireOps("[" + ",".join(items) + "]", len(items))
            items = ()
        pages.append(
            OpsPage(
                items,
                page_cps,
                frame.cursors,
                frame.resync,
                frame.has_more,
                head,
                frame.epochs,
                wire_ops,
            )
        )
    return pages


def _read_single(
    conn: psycopg.Connection[Any],
    single: dict[tuple[bool, str, int], int],
    slices: dict[SliceKey, list[tuple[int, Any]]],
) -> None:
    """Every one-pair slice, in one lateral query per form (wire or not)."""
    for wire in (False, True):
        keys = [k for k in single if k[0] is wire]
        if not keys:
            continue
        pairs = tuple((b, c) for _, b, c in keys)
        rows = conn.execute(
            f"select c.i, o.op_id, {_WIRE if wire else _OP_COLUMNS} "
            "from unnest(%s::text[], %s::bigint[], %s::text[], %s::int[]) with ordinality "
            "as c(bucket, cursor, bj, lim, i) "
            f"cross join lateral (select * from {SCHEMA}.ops o where o.bucket = c.bucket "
            "and o.op_id > c.cursor order by o.op_id limit c.lim) o "
            "order by c.i, o.op_id",
            (*_pair_arrays(pairs), [single[k] for k in keys]),
        ).fetchall()
        grouped: dict[int, list[Any]] = {}
        for r in rows:
            grouped.setdefault(r[0], []).append(r[1:])
        for i, group in grouped.items():
            slices[(wire, (pairs[i - 1],))] = _items(group, wire)


def _pair_arrays(pairs: Sequence[tuple[str, int]]) -> tuple[list[str], list[int], list[str]]:
    """Buckets, cursors and the buckets' JSON texts (for the wire rendering)."""
    buckets = [b for b, _ in pairs]
    return buckets, [c for _, c in pairs], [orjson.dumps(b).decode() for b in buckets]


def _items(rows: Sequence[Sequence[Any]], wire: bool) -> list[tuple[int, Any]]:
    if wire:
        return [(int(r[0]), r[1]) for r in rows]
    return [(int(r[0]), _op(r[1:])) for r in rows]


_OP_COLUMNS = "o.bucket, o.op_id, o.tbl, o.row_key, o.kind, o.data, o.commit_lsn, o.seq"

_WIRE = (
    """'{"op_id":' || o.op_id || ',"bucket":' || c.bj || ',"op":"' || o.kind """
    """|| '","table":' || to_json(o.tbl)::text || ',"key":' || o.row_key """
    """|| ',"data":' || coalesce(o.data, 'null') """
    """|| ',"position":[' || o.commit_lsn || ',' || o.seq || ']}'"""
)
"""One op as the device API's JSON (relay/downstream/api_messages.py ``ops_json``): the
stored key and data texts verbatim; ``to_json`` of a text escapes exactly as orjson does."""


def _op(row: Sequence[Any]) -> Op:
    b, i, t, k, kind, d, lsn, seq = row
    return Op(int(i), str(b), str(t), str(k), OpKind(kind), d, (int(lsn), int(seq)))


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
