"""The bucket store's write path in PostgreSQL: changes in, ops, checkpoints and row
states out, in the caller's transaction.

:func:`apply_changes` is one :meth:`relay.downstream.bucket_store.BucketStore.apply`: it
takes the transaction-level advisory lock :data:`relay.downstream.pg_store_schema.WRITE_LOCK`
before it writes and holds it to the commit, so op ids become visible in order (see
relay/downstream/pg_bucket_store.py, "Concurrency model").  A batch without truncates is
planned before the lock (so the engines of several shares plan at the same time) and its
row states' positions are checked again under it: a state another writer moved meanwhile
makes the batch be planned again under the lock.  Changes between truncates form
segments; for each, the remembered row states (and, for changes lacking unchanged TOAST
values, the rows' last data) are loaded, :func:`relay.downstream.planner.plan_changes`
plans the ops (when the plan wants unchanged TOAST values the store holds no copy of, they
are read from the captured database and the segment is planned again with them:
relay/downstream/unchanged_fill.py), op ids are allocated from the sequence and the plan
is written: ops by
``COPY``, bucket checkpoints and row states each in one statement (the checksum added as a
wrapping 64-bit sum in SQL).  A truncate REMOVEs every row of the table from its buckets
(staged in the writer connection's temp table ``trunc_stage``) and records the table's
truncate position.  The consumer's Kafka progress is saved in the same transaction, then
the head op id, and a NOTIFY wakes the readers at commit.

:func:`compact_bucket` and :func:`purge_tombstones` are the maintenance writes, each in its
own transaction.  Every function here runs on the one writer connection the caller holds
(serialized by the store's writer lock); psycopg errors propagate to the caller, which
converts them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import psycopg

from core.row_wire import CHECKSUM_MODULUS, row_key_text
from relay.downstream.bucket_store import (
    ApplyResult,
    ChangeKind,
    PartitionProgress,
    Position,
    RowChange,
)
from relay.downstream.pg_store_schema import (
    INTS,
    NOTIFY_CHANNEL,
    NULLABLE_INTS,
    SCHEMA,
    TEXTS,
    WRAP_SUM,
    WRITE_LOCK,
    i64,
    ints,
    notify_payload,
    texts,
)
from relay.downstream.planner import (
    BucketDelta,
    BucketEntry,
    Plan,
    RowRef,
    RowState,
    lookup_refs,
    plan_changes,
)
from relay.downstream.rules import Rules
from relay.downstream.unchanged_fill import Fills, SourceRows, fetch_wanted, pending


def prepare_writer(conn: psycopg.Connection[Any]) -> None:
    """Set up a new writer connection: the session's staging table for truncates."""
    conn.execute(
        "create temp table if not exists trunc_stage "
        "(bucket text, row_key text, term numeric) on commit delete rows"
    )


def apply_changes(
    conn: psycopg.Connection[Any],
    group: str,
    rules: Rules,
    changes: Sequence[RowChange],
    offsets: Mapping[tuple[str, int], PartitionProgress] | None = None,
    source: SourceRows | None = None,
) -> tuple[ApplyResult, list[str], float]:
    """:meth:`relay.downstream.bucket_store.BucketStore.apply` inside the caller's write
    transaction on ``conn`` (``group``'s consumer progress is saved with the ops): what it
    did, a message per change that could not be placed (for the caller to log once the
    transaction is committed), and when (``time.perf_counter()``) it got WRITE_LOCK.
    ``source``: where unchanged TOAST values the store holds no copy of are read (None:
    such changes are skipped with a message).

    A batch without truncates is planned before WRITE_LOCK is taken (row states read,
    ops planned); under the lock the positions of those row states and the tables'
    truncate positions are read again, and only if another writer moved one of them (a
    row crossing partitions, applied by another share) is the batch planned again, now
    under the lock.  So the lock covers the writes, not the planning."""
    acc = _Accumulator()
    fills = Fills() if source is not None else None
    if any(c.kind is ChangeKind.TRUNCATE for c in changes):
        locked = _lock(conn)
        truncated = _truncates(conn)
        segment: list[RowChange] = []
        for change in changes:
            if change.kind is ChangeKind.TRUNCATE:
                if segment:
                    planned = _plan_segment(conn, rules, segment, truncated, source, fills)
                    _write_plan(conn, planned, acc)
                    segment = []
                if change.table in rules.tables:
                    _truncate(conn, change.table, change.position, truncated, acc)
            else:
                segment.append(change)
        if segment:
            _write_plan(conn, _plan_segment(conn, rules, segment, truncated, source, fills), acc)
    else:
        truncated = _truncates(conn)
        planned = _plan_segment(conn, rules, changes, truncated, source, fills)
        locked = _lock(conn)
        if _truncates(conn) != truncated or _moved(conn, planned):
            planned = _plan_segment(conn, rules, changes, _truncates(conn), source, fills)
        _write_plan(conn, planned, acc)
    if offsets:
        _save_progress(conn, group, offsets)
    if acc.ops:
        conn.execute(f"update {SCHEMA}.meta set head_op_id = %s", (acc.last_op_id,))
        conn.execute(
            "select pg_notify(%s, %s)",
            (NOTIFY_CHANNEL, notify_payload(acc.last_op_id, sorted(acc.buckets))),
        )
    result = ApplyResult(
        changes=len(changes),
        skipped_duplicates=acc.duplicates,
        skipped_errors=len(acc.errors),
        ops=acc.ops,
        first_op_id=acc.first_op_id,
        last_op_id=acc.last_op_id,
        buckets=frozenset(acc.buckets),
        source_filled=acc.source_filled,
        source_gone=acc.source_gone,
        unfilled=acc.unfilled,
    )
    return result, acc.errors, locked


def _lock(conn: psycopg.Connection[Any]) -> float:
    conn.execute("select pg_advisory_xact_lock(%s, %s)", WRITE_LOCK)
    return time.perf_counter()


def _truncates(conn: psycopg.Connection[Any]) -> dict[str, Position]:
    """Each table's last truncate position."""
    return {
        t: (int(lsn), int(seq))
        for t, lsn, seq in conn.execute(
            f"select tbl, truncated_lsn, truncated_seq from {SCHEMA}.table_state"
        ).fetchall()
    }


@dataclasses.dataclass(frozen=True, slots=True)
class _Planned:
    """A segment's plan and the row states it was made from (``refs``: the rows looked up)."""

    plan: Plan
    refs: set[RowRef]
    states: Mapping[RowRef, RowState]


def _plan_segment(
    conn: psycopg.Connection[Any],
    rules: Rules,
    changes: Sequence[RowChange],
    truncated: Mapping[str, Position],
    source: SourceRows | None = None,
    fills: Fills | None = None,
) -> _Planned:
    """Plan a segment; while the plan wants values of ``source`` not asked yet, read them
    into ``fills`` (kept for the segment's planning again under the lock) and plan again."""
    refs = lookup_refs(rules, changes)
    states = _load_states(conn, refs)
    data = _load_data(conn, rules, changes, states)
    plan = plan_changes(rules, changes, states, truncated, data, fills=fills)
    while source is not None and fills is not None and pending(plan.wanted, fills):
        fetch_wanted(source, plan.wanted, fills)
        plan = plan_changes(rules, changes, states, truncated, data, fills=fills)
    return _Planned(plan, refs, states)


def _moved(conn: psycopg.Connection[Any], planned: _Planned) -> bool:
    """Some row state ``planned`` was made from changed since (written, deleted by a
    truncate or a purge, or made where there was none): a state's position changes with
    every write of it.  Compared in PostgreSQL, which answers one boolean."""
    if not planned.refs:
        return False
    tables, keys, lsns, seqs = [], [], [], []
    states = planned.states
    for ref in planned.refs:
        tables.append(ref[0])
        keys.append(ref[1])
        state = states.get(ref)
        if state is None:  # NULL (a lone "" makes an empty array, which unnest pads: NULL)
            lsns.append("")
            seqs.append("")
        else:
            lsns.append(str(state.position[0]))
            seqs.append(str(state.position[1]))
    row = conn.execute(
        f"select exists (select from unnest({TEXTS}, {TEXTS}, {NULLABLE_INTS}, {NULLABLE_INTS}) "
        "as r(tbl, row_key, lsn, seq) "
        f"left join {SCHEMA}.row_state s on s.tbl = r.tbl and s.row_key = r.row_key "
        "where (s.commit_lsn, s.seq) is distinct from (r.lsn, r.seq))",
        (texts(tables), texts(keys), ",".join(lsns), ",".join(seqs)),
    ).fetchone()
    return bool(row and row[0])


def _allocate(conn: psycopg.Connection[Any], n: int) -> int:
    """Reserve ``n`` consecutive op ids (caller holds WRITE_LOCK); returns the first."""
    row = conn.execute(
        f"select nextval('{SCHEMA}.op_id_seq'), setval('{SCHEMA}.op_id_seq', "
        f"currval('{SCHEMA}.op_id_seq') + %s - 1)",
        (n,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _load_states(conn: psycopg.Connection[Any], refs: set[RowRef]) -> dict[RowRef, RowState]:
    if not refs:
        return {}
    tables, keys = zip(*refs, strict=True)
    rows = conn.execute(
        f"select s.tbl, s.row_key, s.entries, s.commit_lsn, s.seq "
        f"from unnest({TEXTS}, {TEXTS}) as r(tbl, row_key) "
        f"join {SCHEMA}.row_state s on s.tbl = r.tbl and s.row_key = r.row_key",
        (texts(tables), texts(keys)),
    ).fetchall()
    loads = orjson.loads
    new = tuple.__new__
    return {
        (t, k): new(RowState, (tuple([new(BucketEntry, e) for e in loads(entries)]), (lsn, seq)))
        for t, k, entries, lsn, seq in rows
    }


def _load_data(
    conn: psycopg.Connection[Any],
    rules: Rules,
    changes: Sequence[RowChange],
    states: Mapping[RowRef, RowState],
) -> dict[RowRef, dict[str, Any]]:
    """Last stored data of rows whose change lacks unchanged-TOAST values."""
    wanted: list[tuple[str, int, RowRef]] = []
    for c in changes:
        if not c.unchanged or c.before is not None or c.key is None:
            continue
        for key in (c.key, c.old_key):
            if key is None:
                continue
            ref = (c.table, row_key_text(key))
            state = states.get(ref)
            for e in state.entries if state else ():
                wanted.append((e.bucket, e.op_id, ref))
    if not wanted:
        return {}
    rows = conn.execute(
        f"select o.bucket, o.op_id, o.data from unnest({TEXTS}, {INTS}) "
        f"as w(bucket, op_id) join {SCHEMA}.ops o using (bucket, op_id) "
        f"where o.data is not null",
        (texts([w[0] for w in wanted]), ints([w[1] for w in wanted])),
    ).fetchall()
    by_op = {(b, int(i)): d for b, i, d in rows}
    out: dict[RowRef, dict[str, Any]] = {}
    for bucket, op_id, ref in wanted:
        text = by_op.get((bucket, op_id))
        if text is not None:
            out.setdefault(ref, {}).update(json.loads(text))
    return out


def _write_plan(conn: psycopg.Connection[Any], planned: _Planned, acc: _Accumulator) -> None:
    """Write a segment's plan (caller holds WRITE_LOCK)."""
    plan = planned.plan
    acc.duplicates += plan.duplicates
    acc.errors.extend(plan.errors)
    acc.source_filled += plan.source_filled
    acc.source_gone += plan.source_gone
    acc.unfilled += plan.unfilled
    first = _allocate(conn, len(plan.ops)) if plan.ops else 0
    if plan.ops:
        _write_ops(conn, plan, first)
        _write_buckets(conn, plan.deltas, first)
        acc.add(first, first + len(plan.ops) - 1, plan.deltas)
    if plan.states:
        _write_states(conn, plan.states, first)


def _write_ops(conn: psycopg.Connection[Any], plan: Plan, first: int) -> None:
    with conn.cursor().copy(
        f"copy {SCHEMA}.ops (bucket, op_id, tbl, row_key, kind, data, commit_lsn, seq) from stdin"
    ) as copy:
        for i, op in enumerate(plan.ops):
            copy.write_row(
                (
                    op.bucket,
                    first + i,
                    op.table,
                    op.row_key,
                    op.kind.value,
                    op.data_json,
                    op.position[0],
                    op.position[1],
                )
            )


def _write_buckets(
    conn: psycopg.Connection[Any], deltas: Mapping[str, BucketDelta], first: int
) -> None:
    """Add a plan's net effect to its buckets' checkpoints (caller holds WRITE_LOCK).

    One statement: the deltas are added in SQL (the checksum as a wrapping 64-bit sum,
    both terms being u64 values stored as two's-complement bigints)."""
    names = sorted(deltas)
    last, counts, sums, logs = [], [], [], []
    for b in names:
        d = deltas[b]
        last.append(first + d.last_index)
        counts.append(d.count)
        sums.append(i64(d.checksum))
        logs.append(d.ops)
    conn.execute(
        f"insert into {SCHEMA}.buckets as b "
        "(bucket, last_op_id, row_count, checksum, log_count) "
        f"select * from unnest({TEXTS}, {INTS}, {INTS}, {INTS}, {INTS}) "
        "on conflict (bucket) do update set last_op_id = excluded.last_op_id, "
        "row_count = b.row_count + excluded.row_count, "
        f"checksum = {WRAP_SUM.format('b.checksum', 'excluded.checksum')}, "
        "log_count = b.log_count + excluded.log_count",
        (texts(names), ints(last), ints(counts), ints(sums), ints(logs)),
    )


def _write_states(
    conn: psycopg.Connection[Any], states: Mapping[RowRef, RowState], first: int
) -> None:
    """Upsert a plan's row states, the entries of the plan's own ops given their real op
    ids (``first``: the plan's first op id; see :class:`relay.downstream.planner.Plan`)."""
    tables, keys, entries, lsns, seqs = [], [], [], [], []
    dumps = orjson.dumps
    for (t, k), s in states.items():
        tables.append(t)
        keys.append(k)
        entries.append(
            dumps(
                [
                    [e.bucket, first - 1 - e.op_id if e.op_id < 0 else e.op_id, e.checksum]
                    for e in s.entries
                ]
            ).decode()
        )
        lsns.append(s.position[0])
        seqs.append(s.position[1])
    conn.execute(
        f"insert into {SCHEMA}.row_state as s (tbl, row_key, entries, commit_lsn, seq) "
        f"select * from unnest({TEXTS}, {TEXTS}, {TEXTS}, {INTS}, {INTS}) "
        "on conflict (tbl, row_key) do update set entries = excluded.entries, "
        "commit_lsn = excluded.commit_lsn, seq = excluded.seq",
        (texts(tables), texts(keys), texts(entries), ints(lsns), ints(seqs)),
    )


def _truncate(
    conn: psycopg.Connection[Any],
    table: str,
    position: Position,
    truncated: dict[str, Position],
    acc: _Accumulator,
) -> None:
    if position <= truncated.get(table, (-1, -1)):
        acc.duplicates += 1
        return
    lsn, seq = position
    conn.execute("truncate trunc_stage")
    conn.execute(
        f"with gone as (delete from {SCHEMA}.row_state where tbl = %s "
        "and (commit_lsn, seq) < (%s, %s) returning row_key, entries) "
        "insert into trunc_stage select e ->> 0, gone.row_key, (e ->> 2)::numeric "
        "from gone cross join lateral jsonb_array_elements(gone.entries::jsonb) e",
        (table, lsn, seq),
    )
    per_bucket = conn.execute(
        'select bucket, count(*), sum(term) from trunc_stage group by bucket order by bucket collate "C"'
    ).fetchall()
    total = sum(int(n) for _, n, _ in per_bucket)
    if total:
        first = _allocate(conn, total)
        conn.execute(
            f"insert into {SCHEMA}.ops (bucket, op_id, tbl, row_key, kind, data, commit_lsn, seq) "
            f'select bucket, %s + row_number() over (order by bucket collate "C", row_key collate "C") - 1, '
            "%s, row_key, 'REMOVE', null, %s, %s from trunc_stage",
            (first, table, lsn, seq),
        )
        deltas: dict[str, BucketDelta] = {}
        index = -1
        for bucket, n, term_sum in per_bucket:
            index += int(n)
            deltas[str(bucket)] = BucketDelta(
                count=-int(n),
                checksum=(-int(term_sum)) % CHECKSUM_MODULUS,
                last_index=index,
                ops=int(n),
            )
        _write_buckets(conn, deltas, first)
        acc.add(first, first + total - 1, deltas)
    conn.execute(
        f"insert into {SCHEMA}.table_state (tbl, truncated_lsn, truncated_seq) "
        "values (%s, %s, %s) on conflict (tbl) do update set "
        "truncated_lsn = excluded.truncated_lsn, truncated_seq = excluded.truncated_seq",
        (table, lsn, seq),
    )
    truncated[table] = position


def _save_progress(
    conn: psycopg.Connection[Any], group: str, offsets: Mapping[tuple[str, int], PartitionProgress]
) -> None:
    items = sorted(offsets.items())
    conn.execute(
        f"insert into {SCHEMA}.consumer_progress as p "
        "(grp, topic, part, next_offset, commit_lsn, seq) "
        "select %s, * from unnest(%s::text[], %s::int[], %s::bigint[], %s::bigint[], %s::bigint[]) "
        "on conflict (grp, topic, part) do update set next_offset = excluded.next_offset, "
        "commit_lsn = greatest(p.commit_lsn, excluded.commit_lsn), "
        "seq = case when (excluded.commit_lsn, excluded.seq) > (p.commit_lsn, p.seq) "
        "then excluded.seq else p.seq end",
        (
            group,
            [t for (t, _), _ in items],
            [p for (_, p), _ in items],
            [v.next_offset for _, v in items],
            [v.position[0] for _, v in items],
            [v.position[1] for _, v in items],
        ),
    )


def compact_bucket(conn: psycopg.Connection[Any], bucket: str, below: int) -> tuple[int, int]:
    """Compact one bucket's log inside the caller's write transaction: ops deleted (not
    the latest of their row) and old REMOVEs dropped (``below``: those with lower ids)."""
    rows = conn.execute(
        f"with ranked as (select op_id, kind, row_number() over "
        f"(partition by tbl, row_key order by op_id desc) as rn "
        f"from {SCHEMA}.ops where bucket = %s) "
        f"delete from {SCHEMA}.ops o using ranked r "
        "where o.bucket = %s and o.op_id = r.op_id "
        "and (r.rn > 1 or (r.kind = 'REMOVE' and r.op_id < %s)) "
        "returning r.rn = 1 as dropped_remove, o.op_id",
        (bucket, bucket, below),
    ).fetchall()
    if not rows:
        return 0, 0
    dropped = [int(i) for is_remove, i in rows if is_remove]
    conn.execute(
        f"update {SCHEMA}.buckets set log_count = log_count - %s, "
        "compacted_below = greatest(compacted_below, %s), "
        "epoch = epoch + (case when %s then 1 else 0 end) where bucket = %s",
        (len(rows), max(dropped, default=0), bool(dropped), bucket),
    )
    return len(rows) - len(dropped), len(dropped)


def purge_tombstones(conn: psycopg.Connection[Any], below: Position) -> int:
    """Forget tombstone row states older than ``below`` (the engine passes a position
    no event still to come can precede); returns how many were dropped."""
    cur = conn.execute(
        f"delete from {SCHEMA}.row_state where entries = '[]' and (commit_lsn, seq) < (%s, %s)",
        below,
    )
    return cur.rowcount


@dataclasses.dataclass
class _Accumulator:
    """Totals of one apply over its segments."""

    ops: int = 0
    first_op_id: int = 0
    last_op_id: int = 0
    duplicates: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    buckets: set[str] = dataclasses.field(default_factory=set)
    source_filled: int = 0
    source_gone: int = 0
    unfilled: int = 0

    def add(self, first: int, last: int, deltas: Mapping[str, BucketDelta]) -> None:
        self.ops += last - first + 1
        self.first_op_id = self.first_op_id or first
        self.last_op_id = last
        self.buckets.update(deltas)
