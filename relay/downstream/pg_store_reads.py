"""The bucket store's read path in PostgreSQL: pages of ops with their checkpoints, the
consumer's progress, totals.

Every function runs on a connection the caller holds in one ``REPEATABLE READ, READ ONLY``
transaction (relay/downstream/pg_bucket_store.py), so a page's ops, checkpoints (checksum,
count, last op id) and head op id come from one snapshot; readers never block writers.
:func:`read_pages` answers many page requests from one snapshot: it reads each
``(bucket, cursor)`` slice once however many requests need it (the plan and each page's
composition are relay/downstream/page_plan.py), flags buckets that must re-sync (a cursor
from before a drop of REMOVEs, or from another store:
:meth:`BucketCheckpoint.needs_resync`), and moves each cursor as far as its page reaches.
A page for the wire (:attr:`PageRequest.wire`) is rendered by PostgreSQL: each op as the
device API's JSON from the stored texts, a slice's ops joined into one text in op-id
order, so the relay gets one string per slice, not one row per op; it ends with the op
whose row data and key reach the request's byte bound (:attr:`PageRequest.max_bytes`,
counted from the stored texts' sizes, the ops above left unread).  psycopg errors
propagate to the caller, which converts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
from relay.downstream.page_plan import (
    OpRows,
    PageFrame,
    Slice,
    SliceKey,
    WireRun,
    compose,
    plan_reads,
)
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
    single-bucket slice per form (relay/downstream/page_plan.py), one read per merged
    slice.  Wire requests get each slice's ops rendered as the device API's JSON and
    joined into one text by PostgreSQL from the stored texts (:data:`_WIRE`)."""
    cps = checkpoints(conn, [b for req in requests for b in req.cursors])
    row = conn.execute(f"select head_op_id from {SCHEMA}.meta").fetchone()
    head = int(row[0]) if row else 0
    plan = plan_reads(requests, cps)
    slices: dict[SliceKey, Slice[Any]] = {}
    _read_single(conn, plan.single, slices)
    for key, limit in plan.merged.items():
        slices[key] = _read_merged(conn, key, limit)
    pages = []
    for req, req_plan in zip(requests, plan.requests, strict=True):
        page_cps = {b: cps[b] for b in req.cursors}
        if req.wire:
            wire = compose(req, req_plan, cps, slices, "")
            ops: tuple[Op, ...] = ()
            wire_ops = WireOps("[" + wire.items + "]", wire.count)
            frame: PageFrame[Any] = wire
        else:
            frame = compose(req, req_plan, cps, slices, ())
            ops, wire_ops = frame.items, None
        pages.append(
            OpsPage(
                ops,
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


_LATERAL = (
    f"cross join lateral (select * from {SCHEMA}.ops o where o.bucket = c.bucket "
    "and o.op_id > c.cursor order by o.op_id limit {limit}) o"
)
"""Each pair's ops above its cursor, by the primary key's index scan (``c``: the pairs)."""

_BEFORE = (
    "coalesce(sum(octet_length(coalesce({o}.data, '')) + octet_length({o}.row_key)) "
    "over (order by {o}.op_id rows between unbounded preceding and 1 preceding), 0)"
)
"""The bytes of the row data and keys of the ops before each (stored texts' sizes: the
values are not read for it)."""

_BOUNDED = (
    f"cross join lateral (select o.*, c.mb, {_BEFORE.format(o='o')} as before "
    f"from {SCHEMA}.ops o where o.bucket = c.bucket "
    "and o.op_id > c.cursor order by o.op_id limit {limit}) o"
)
""":data:`_LATERAL` with each op's ``before`` bytes and the pair's byte bound ``mb``."""

_IN = "o.mb = 0 or o.before < o.mb"
"""An op within its page's byte bound (the first op always is)."""


def _read_single(
    conn: psycopg.Connection[Any],
    single: Mapping[SliceKey, int],
    slices: dict[SliceKey, Slice[Any]],
) -> None:
    """Every one-pair slice, in one lateral query per form (wire or not); a wire slice
    comes aggregated, one row per pair."""
    for wire in (False, True):
        keys = [k for k in single if k[0] is wire]
        if not keys:
            continue
        pairs = [k[1][0] for k in keys]
        params = (*_pair_arrays(pairs), [single[k] for k in keys])
        unnest = "from unnest(%s::text[], %s::bigint[], %s::text[], %s::int[]"
        if wire:
            source = (
                f"{unnest}, %s::bigint[]) with ordinality as c(bucket, cursor, bj, lim, mb, i) "
                + _BOUNDED.format(limit="c.lim")
            )
            for i, n, last, text, cut in conn.execute(
                f"select c.i, count(*) filter (where {_IN}), max(o.op_id) filter (where {_IN}), "
                f"string_agg({_WIRE}, ',' order by o.op_id) filter (where {_IN}), "
                f"coalesce(bool_or(not ({_IN})), false) {source} group by c.i",
                (*params, [k[3] for k in keys]),
            ).fetchall():
                slices[keys[i - 1]] = WireRun(int(n), int(last), str(text), bool(cut))
            continue
        source = f"{unnest}) with ordinality as c(bucket, cursor, bj, lim, i) " + _LATERAL.format(
            limit="c.lim"
        )
        grouped: dict[int, list[tuple[int, Op]]] = {}
        for r in conn.execute(
            f"select c.i, {_OP_COLUMNS} {source} order by c.i, o.op_id", params
        ).fetchall():
            grouped.setdefault(r[0], []).append((int(r[2]), _op(r[1:])))
        for i, group in grouped.items():
            slices[keys[i - 1]] = OpRows(group)


def _read_merged(conn: psycopg.Connection[Any], key: SliceKey, limit: int) -> Slice[Any]:
    """A slice over several buckets: their ops merged in op-id order, ``limit`` at most."""
    wire, pairs, _, max_bytes = key
    source = (
        "from unnest(%s::text[], %s::bigint[], %s::text[]) as c(bucket, cursor, bj) "
        + _LATERAL.format(limit="%s")
    )
    if wire:
        # the merged first ``limit`` ops (their texts not rendered yet), each with the
        # bytes of the ops before it; rendered and joined up to the byte bound
        row = conn.execute(
            f"select count(*) filter (where {_IN}), max(o.op_id) filter (where {_IN}), "
            f"string_agg({_WIRE.replace('c.bj', 'o.bj')}, ',' order by o.op_id) "
            f"filter (where {_IN}), coalesce(bool_or(not ({_IN})), false) from "
            f"(select w.*, %s::bigint as mb, {_BEFORE.format(o='w')} as before from "
            f"(select o.*, c.bj {source} order by o.op_id limit %s) w) o",
            (max_bytes, *_pair_arrays(pairs), limit, limit),
        ).fetchone()
        assert row is not None  # an aggregate without grouping gives one row
        n, last, text, cut = row
        return WireRun(int(n), int(last or 0), str(text or ""), bool(cut))
    rows = conn.execute(
        f"select {_OP_COLUMNS} {source} order by o.op_id limit %s",
        (*_pair_arrays(pairs), limit, limit),
    ).fetchall()
    return OpRows([(int(r[1]), _op(r)) for r in rows])


def _pair_arrays(pairs: Sequence[tuple[str, int]]) -> tuple[list[str], list[int], list[str]]:
    """Buckets, cursors and the buckets' JSON texts (for the wire rendering)."""
    buckets = [b for b, _ in pairs]
    return buckets, [c for _, c in pairs], [orjson.dumps(b).decode() for b in buckets]


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
