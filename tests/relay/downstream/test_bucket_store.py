"""Bucket store: canonical values and checksums, the pure planner (against tests.relay.bucket_oracle and
against a model of the source table, with re-deliveries), and the PostgreSQL store
(migrations, paging, compaction and re-sync, truncate, dedup, TOAST fill, op-id visibility
order with concurrent writers, LISTEN/NOTIFY wake-ups, leadership, offsets)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.row_wire import CHECKSUM_MODULUS, canonical_json, json_value, row_checksum, row_key_text
from relay.downstream.bucket_store import ChangeKind, OpKind, PartitionProgress, RowChange
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.pg_store_schema import MIGRATIONS, SCHEMA, WRAP_SUM
from relay.downstream.planner import RowRef, RowState, lookup_refs, plan_changes
from relay.downstream.rules import TableInfo, parse_bucket_id
from relay.downstream.rules_parser import rules_from_mapping
from relay.errors import StoreError
from tests.relay.bucket_oracle import bucket_ops

T = "public.orders"
SCHEMA_INFO = {T: TableInfo(("id", "tech", "status", "notes", "cost"), ("id",))}
RULES = rules_from_mapping(
    {
        "token_claims": ["tech"],
        "bucket": [
            {
                "name": "tech",
                "parameters": ["t"],
                "claims": {"t": "tech"},
                "table": [
                    {
                        "table": T,
                        "match": {"tech": "t"},
                        "filters": [{"column": "status", "op": "!=", "value": "cancelled"}],
                        "exclude": ["cost"],
                    }
                ],
            },
            {
                "name": "open",
                "table": [
                    {
                        "table": T,
                        "filters": [{"column": "status", "op": "=", "value": "open"}],
                        "columns": ["status"],
                    }
                ],
            },
        ],
    },
    SCHEMA_INFO,
)


def row(i: int, tech: str | None, status: str = "open", notes: str = "n") -> dict[str, Any]:
    return {"id": i, "tech": tech, "status": status, "notes": notes, "cost": Decimal("1.50")}


def up(i: int, pos: tuple[int, int], tech: str | None, **kw: Any) -> RowChange:
    insert = kw.pop("insert", False)
    return RowChange(T, ChangeKind.UPSERT, pos, (i,), row(i, tech, **kw), insert=insert)


def expected(rows: dict[int, dict[str, Any]]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for r in rows.values():
        for b in RULES.buckets_for_row(T, r):
            data = RULES.project(T, parse_bucket_id(b)[0], r)
            out.setdefault(b, {})[row_key_text((r["id"],))] = canonical_json(json_value(data))
    return out


def checksum_of(rows: dict[str, str]) -> int:
    return sum(row_checksum(T, k, json.loads(v)) for k, v in rows.items()) % CHECKSUM_MODULUS


# --------------------------------------------------------------------------- pure


def test_row_checksum_is_the_documented_hash() -> None:
    data = {"b": "é", "a": [1, 2.5, None, True]}
    text = '["public.t","[7]",{"a":[1,2.5,null,true],"b":"é"}]'
    assert canonical_json(["public.t", "[7]", data]) == text
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    assert row_checksum("public.t", "[7]", data) == int.from_bytes(digest[:8], "big")
    assert 0 <= row_checksum("x", "[1]", {}) < CHECKSUM_MODULUS


def test_json_value_and_row_keys() -> None:
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    value = {
        "d": Decimal("12.50"),
        "b": b"\x00\xff",
        "f": float("nan"),
        "i": float("-inf"),
        "u": u,
        "day": dt.date(2024, 2, 29),
        "nested": [Decimal("1"), {"x": b"a"}],
    }
    assert json_value(value) == {
        "d": "12.50",
        "b": "AP8=",
        "f": "NaN",
        "i": "-Infinity",
        "u": str(u),
        "day": "2024-02-29",
        "nested": ["1", {"x": "YQ=="}],
    }
    assert row_key_text((42,)) == "[42]"
    assert row_key_text(("a", 1)) == '["a",1]'
    assert row_key_text((Decimal("1.0"), u)) == f'["1.0","{u}"]'
    with pytest.raises(TypeError, match="cannot represent"):
        json_value(object())


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(JSON)
def test_canonical_json_survives_a_round_trip(value: Any) -> None:
    """A device that parses the row and serializes it again gets the same bytes."""
    text = canonical_json(value)
    assert canonical_json(json.loads(text)) == text
    assert json.loads(text) == value or value != value


TECHS = st.sampled_from(["t1", "t2", "t3", None])
STATUS = st.sampled_from(["open", "done", "cancelled"])


@given(
    st.frozensets(st.sampled_from(['tech["t1"]', 'tech["t2"]', "open[]"])),
    st.none() | st.builds(row, st.just(5), TECHS, STATUS),
)
def test_planner_emits_what_relay_buckets_emits(
    old: frozenset[str], new: dict[str, Any] | None
) -> None:
    from relay.downstream.planner import BucketEntry

    state = RowState(tuple(BucketEntry(b, i + 1, 7) for i, b in enumerate(sorted(old))), (1, 0))
    kind = ChangeKind.UPSERT if new is not None else ChangeKind.DELETE
    change = RowChange(T, kind, (2, 0), (5,), new)
    plan = plan_changes(RULES, [change], {(T, "[5]"): state}, {})
    want = bucket_ops(RULES, T, (5,), old, new)
    got = [(o.kind, o.bucket, o.data_json) for o in plan.ops]
    assert got == [
        (w.kind, w.bucket, canonical_json(json_value(w.row)) if w.row is not None else None)
        for w in want
    ]


class Model:
    """The store's bookkeeping in memory: ops applied to dicts, plans' deltas to checkpoints."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, str]] = {}
        self.checksum: dict[str, int] = {}
        self.count: dict[str, int] = {}
        self.states: dict[RowRef, RowState] = {}
        self.next_id = 1

    def apply(self, changes: list[RowChange]) -> None:
        needed = lookup_refs(RULES, changes)
        states = {r: s for r, s in self.states.items() if r in needed}
        plan = plan_changes(RULES, changes, states, {})
        for op in plan.ops:
            held = self.rows.setdefault(op.bucket, {})
            if op.kind is OpKind.PUT:
                assert op.data_json is not None
                held[op.row_key] = op.data_json
            else:
                assert op.row_key in held, "a REMOVE of a row not in the bucket"
                del held[op.row_key]
        for b, d in plan.deltas.items():
            self.checksum[b] = (self.checksum.get(b, 0) + d.checksum) % CHECKSUM_MODULUS
            self.count[b] = self.count.get(b, 0) + d.count
        self.states.update(plan.resolve(self.next_id))
        self.next_id += len(plan.ops)


ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["insert", "update", "delete", "rekey", "redeliver"]),
        st.integers(0, 5),
        TECHS,
        STATUS,
        st.integers(0, 1000),
    ),
    max_size=40,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(ACTIONS, st.lists(st.integers(1, 6), min_size=1, max_size=10))
def test_planner_matches_the_source_table_despite_redeliveries(
    actions: list[tuple[str, int, str | None, str, int]], cuts: list[int]
) -> None:
    """Random inserts, updates (reassignments, filter changes), deletes, key changes and
    re-delivered old events, applied in random batches: every bucket holds exactly the
    rows the rules place there, with matching counts and checksums."""
    source: dict[int, dict[str, Any]] = {}
    stream: list[RowChange] = []
    lsn = 100
    for action, i, tech, status, salt in actions:
        lsn += 1
        pos = (lsn, 0)
        if action == "redeliver" and stream:
            stream.append(stream[salt % len(stream)])
        elif action == "insert" and i not in source:
            source[i] = row(i, tech, status, f"n{salt}")
            stream.append(RowChange(T, ChangeKind.UPSERT, pos, (i,), dict(source[i]), insert=True))
        elif action == "update" and i in source:
            source[i] = row(i, tech, status, f"n{salt}")
            stream.append(RowChange(T, ChangeKind.UPSERT, pos, (i,), dict(source[i])))
        elif action == "delete" and i in source:
            del source[i]
            stream.append(RowChange(T, ChangeKind.DELETE, pos, (i,)))
        elif action == "rekey" and i in source:
            new = 100 + salt
            if new not in source:
                source[new] = {**source.pop(i), "id": new}
                stream.append(
                    RowChange(T, ChangeKind.UPSERT, pos, (new,), dict(source[new]), old_key=(i,))
                )
    model = Model()
    start = 0
    k = 0
    while start < len(stream):
        size = cuts[k % len(cuts)]
        model.apply(stream[start : start + size])
        start += size
        k += 1
    want = expected(source)
    held = {b: rows for b, rows in model.rows.items() if rows}
    assert held == want
    for b, rows in model.rows.items():
        assert model.count.get(b, 0) == len(rows)
        assert model.checksum.get(b, 0) == checksum_of(rows)


def test_unchanged_toast_columns_are_filled_in() -> None:
    first = up(1, (1, 0), "t1", notes="long text")
    later = RowChange(
        T,
        ChangeKind.UPSERT,
        (2, 0),
        (1,),
        {**row(1, "t1", notes=""), "notes": None},
        unchanged=("notes",),
    )
    plan = plan_changes(RULES, [first, later], {}, {})
    assert json.loads(plan.ops[-1].data_json or "")["notes"] == "long text"
    assert plan.ops[-1].bucket == 'tech["t1"]'
    # from the stored data when the earlier version is in the store, not in the batch
    plan = plan_changes(RULES, [later], {}, {}, {(T, "[1]"): {"notes": "stored"}})
    assert json.loads(plan.ops[-1].data_json or "")["notes"] == "stored"


def test_a_row_is_never_sent_without_an_unchanged_value_it_cannot_fill() -> None:
    # the row left every bucket (a tombstone, no stored data) and comes back with its
    # TOASTed notes unchanged: no copy of them anywhere, and no source to read them from
    left = {(T, "[1]"): RowState((), (1, 0))}
    back = RowChange(
        T,
        ChangeKind.UPSERT,
        (2, 0),
        (1,),
        {**row(1, "t1", status="done"), "notes": None},
        unchanged=("notes",),
    )
    plan = plan_changes(RULES, [back], left, {})
    assert [o for o in plan.ops if o.kind is OpKind.PUT] == []
    assert len(plan.errors) == 1 and "public.orders key [1]" in plan.errors[0]
    assert "notes" in plan.errors[0]
    # a bucket whose rule keeps no notes takes the row all the same
    back = back._replace(row={**row(1, None), "notes": None})
    plan = plan_changes(RULES, [back], left, {})
    assert [(o.bucket, o.kind) for o in plan.ops] == [("open[]", OpKind.PUT)] and not plan.errors


def test_a_row_the_rules_cannot_place_is_skipped_with_a_message() -> None:
    broken = RowChange(T, ChangeKind.UPSERT, (1, 0), (1,), {"id": 1, "status": "open"})
    plan = plan_changes(RULES, [broken, up(2, (1, 1), "t1")], {}, {})
    assert len(plan.errors) == 1 and "public.orders key [1]" in plan.errors[0]
    assert {o.row_key for o in plan.ops} == {"[2]"}


def test_a_key_change_whose_new_row_cannot_be_placed_still_retires_the_old_key() -> None:
    first = up(1, (1, 0), "t1", insert=True)
    # the new row lacks `tech`, a column the rules place by: it cannot be placed
    moved = RowChange(T, ChangeKind.UPSERT, (2, 0), (9,), {"id": 9, "status": "open"}, old_key=(1,))
    plan = plan_changes(RULES, [first, moved], {}, {})
    assert len(plan.errors) == 1 and "public.orders key [9]" in plan.errors[0]
    removes = {(o.bucket, o.row_key) for o in plan.ops if o.kind is OpKind.REMOVE}
    assert removes == {('tech["t1"]', "[1]"), ("open[]", "[1]")}
    assert plan.states[(T, "[1]")] == RowState((), (2, 0))
    # the same when the old key's state is in the store, not in the batch
    stored = plan_changes(RULES, [first], {}, {}).states
    plan = plan_changes(RULES, [moved], stored, {})
    assert {(o.bucket, o.row_key, o.kind) for o in plan.ops} == {
        ('tech["t1"]', "[1]", OpKind.REMOVE),
        ("open[]", "[1]", OpKind.REMOVE),
    }


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def store(pg_dsn: str) -> Iterator[PgBucketStore]:
    s = PgBucketStore(pg_dsn)
    s.migrate()
    try:
        yield s
    finally:
        s.close()


def replay(store: PgBucketStore, buckets: list[str], limit: int = 2) -> dict[str, dict[str, str]]:
    held: dict[str, dict[str, str]] = {b: {} for b in buckets}
    cursors = dict.fromkeys(buckets, 0)
    epochs: dict[str, int] = {}
    last = 0
    while True:
        page = store.read_ops(cursors, limit, epochs)
        assert not page.resync
        epochs = dict(page.epochs)
        assert len(page.ops) <= limit
        for op in page.ops:
            assert op.op_id > last, "ops come in op-id order"
            last = op.op_id
            if op.kind is OpKind.PUT:
                held[op.bucket][op.row_key] = op.data_json or ""
            else:
                held[op.bucket].pop(op.row_key, None)
        cursors = dict(page.cursors)
        if not page.has_more:
            break
    for b, cp in page.checkpoints.items():
        assert cursors[b] == cp.last_op_id
        assert (cp.count, cp.checksum) == (len(held[b]), checksum_of(held[b]))
    return {b: rows for b, rows in held.items() if rows}


def test_migrations_are_idempotent_and_concurrent(pg_dsn: str) -> None:
    stores = [PgBucketStore(pg_dsn) for _ in range(3)]
    versions: list[int] = []
    threads = [threading.Thread(target=lambda s=s: versions.append(s.migrate())) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    latest = MIGRATIONS[-1][0]
    assert versions == [latest] * 3
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            f"select version from {SCHEMA}.schema_migrations order by version"
        ).fetchall()
        assert rows == [(v,) for v, _, _ in MIGRATIONS]
        conn.execute(f"insert into {SCHEMA}.schema_migrations values (99, 'future')")
        conn.commit()
    with pytest.raises(StoreError, match="version 99, newer than this relay knows"):
        stores[0].migrate()
    for s in stores:
        s.close()


def test_apply_read_page_by_page_and_checkpoints(store: PgBucketStore) -> None:
    changes = [up(i, (10, i), f"t{i % 2}", insert=True) for i in range(7)]
    changes.append(up(3, (11, 0), "t0"))  # reassignment t1 -> t0
    changes.append(RowChange(T, ChangeKind.DELETE, (12, 0), (4,)))
    result = store.apply(RULES, changes, {("topic", 0): PartitionProgress(9, (12, 0))})
    assert result.ops == 7 * 2 + 3 + 2 and result.skipped_duplicates == 0
    assert (result.first_op_id, result.last_op_id) == (1, result.ops)
    source = {i: row(i, f"t{i % 2}") for i in range(7)}
    source[3] = row(3, "t0")
    del source[4]
    buckets = ['tech["t0"]', 'tech["t1"]', "open[]", 'tech["nobody"]']
    assert replay(store, buckets) == expected(source)
    assert replay(store, buckets, limit=1000) == expected(source)
    empty = store.bucket_state(['tech["nobody"]'])['tech["nobody"]']
    assert (empty.last_op_id, empty.count, empty.checksum) == (0, 0, 0)
    assert store.load_offsets() == {("topic", 0): PartitionProgress(9, (12, 0))}
    # a cursor beyond the bucket's log (a rebuilt store) must re-sync
    page = store.read_ops({'tech["t0"]': 10_000}, 10)
    assert page.resync == {'tech["t0"]'} and page.cursors['tech["t0"]'] == 0 and not page.ops
    # re-delivery of the whole batch changes nothing
    again = store.apply(RULES, changes)
    assert again.ops == 0 and again.skipped_duplicates == len(changes)
    assert replay(store, buckets) == expected(source)


def test_key_change_truncate_and_late_events(store: PgBucketStore) -> None:
    store.apply(RULES, [up(1, (10, 0), "t1", insert=True), up(2, (10, 1), "t1", insert=True)])
    moved = RowChange(T, ChangeKind.UPSERT, (11, 0), (9,), row(9, "t1"), old_key=(1,))
    store.apply(RULES, [moved])
    # a late event of the old key (from another partition) must not bring it back
    store.apply(RULES, [up(1, (10, 5), "t1")])
    want = expected({2: row(2, "t1"), 9: row(9, "t1")})
    assert replay(store, ['tech["t1"]', "open[]"]) == want
    store.apply(
        RULES, [RowChange(T, ChangeKind.TRUNCATE, (20, 0)), up(5, (21, 0), "t2", insert=True)]
    )
    # events from before the truncate arriving late change nothing
    late = store.apply(
        RULES, [up(3, (15, 0), "t1", insert=True), RowChange(T, ChangeKind.TRUNCATE, (20, 0))]
    )
    assert late.ops == 0 and late.skipped_duplicates == 2
    assert replay(store, ['tech["t1"]', 'tech["t2"]', "open[]"]) == expected({5: row(5, "t2")})
    cp = store.bucket_state(['tech["t1"]'])['tech["t1"]']
    assert (cp.count, cp.checksum) == (0, 0)


def test_unchanged_toast_is_filled_from_the_store(store: PgBucketStore) -> None:
    store.apply(RULES, [up(1, (10, 0), "t1", notes="big value")])
    later = RowChange(
        T, ChangeKind.UPSERT, (11, 0), (1,), {**row(1, "t2"), "notes": None}, unchanged=("notes",)
    )
    store.apply(RULES, [later])
    ops = store.read_ops({'tech["t2"]': 0}, 10).ops
    assert json.loads(ops[0].data_json or "")["notes"] == "big value"


def test_compaction_keeps_checksums_and_flags_resync(store: PgBucketStore) -> None:
    source: dict[int, dict[str, Any]] = {}
    lsn = 10
    for round_ in range(4):
        batch = []
        for i in range(6):
            lsn += 1
            tech = f"t{(i + round_) % 3}"
            source[i] = row(i, tech, notes=f"r{round_}")
            batch.append(up(i, (lsn, 0), tech, notes=f"r{round_}"))
        store.apply(RULES, batch)
    store.apply(RULES, [RowChange(T, ChangeKind.DELETE, (lsn + 1, 0), (0,))])
    del source[0]
    buckets = ['tech["t0"]', 'tech["t1"]', 'tech["t2"]', "open[]"]
    states = store.bucket_state(buckets)
    old_cursor = 3
    before = replay(store, buckets)
    assert before == expected(source)
    result = store.compact()
    assert result.ops_deleted > 0 and result.removes_dropped == 0
    assert store.bucket_state(buckets) == states
    assert replay(store, buckets) == before
    # a device at an old cursor still converges (latest op per row, REMOVEs kept)
    page = store.read_ops(dict.fromkeys(buckets, old_cursor), 1000)
    assert not page.resync
    # dropping old REMOVEs: devices in the middle must re-sync, fresh ones need not
    head = store.stats()["head_op_id"]
    dropped = store.compact(drop_removes_below=head + 1)
    assert dropped.removes_dropped > 0
    page = store.read_ops(dict.fromkeys(buckets, old_cursor), 1000)
    assert page.resync and all(page.cursors[b] == 0 for b in page.resync)
    assert not store.read_ops(dict.fromkeys(buckets, 0), 1000).resync
    assert replay(store, buckets) == before  # paging from 0 after the drop: no re-sync
    # a reader that paged before the drop, with its epochs: re-sync
    page = store.read_ops(dict.fromkeys(buckets, old_cursor), 1000, {b: 0 for b in buckets})
    assert page.resync == {b for b, s in store.bucket_state(buckets).items() if s.epoch}
    assert store.bucket_state(buckets) != states  # compacted_below and epoch moved
    assert all(
        (s.count, s.checksum, s.last_op_id)
        == (states[b].count, states[b].checksum, states[b].last_op_id)
        for b, s in store.bucket_state(buckets).items()
    )


def test_concurrent_writers_make_op_ids_visible_in_order(pg_dsn: str) -> None:
    """Two writers (two relay processes) and a reader: the reader never sees an op id
    appear below one it has already seen, and both writers' ops all arrive."""
    writers = [PgBucketStore(pg_dsn) for _ in range(2)]
    reader = PgBucketStore(pg_dsn)
    writers[0].migrate()
    buckets = [f'tech["w{w}"]' for w in range(2)]
    stop = threading.Event()
    violations: list[str] = []

    def read() -> None:
        seen_max = 0
        seen: set[int] = set()
        while not stop.is_set():
            ids = {op.op_id for op in reader.read_ops(dict.fromkeys(buckets, 0), 100_000).ops}
            late = {i for i in ids - seen if i < seen_max}
            if late:
                violations.append(f"ids {sorted(late)[:5]} appeared below {seen_max}")
            seen |= ids
            seen_max = max(seen, default=0)

    def write(w: int) -> None:
        for k in range(40):
            writers[w].apply(
                RULES, [up(w * 1000 + k * 5 + j, (1000 * w + k, j), f"w{w}") for j in range(5)]
            )

    t_read = threading.Thread(target=read)
    t_read.start()
    ts = [threading.Thread(target=write, args=(w,)) for w in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    stop.set()
    t_read.join(30)
    try:
        assert not violations
        states = reader.bucket_state(buckets)
        assert [s.count for s in states.values()] == [200, 200]
        all_ids = [op.op_id for op in reader.read_ops(dict.fromkeys(buckets, 0), 10_000).ops]
        assert len(all_ids) == len(set(all_ids)) == 400
    finally:
        for s in (*writers, reader):
            s.close()


def test_long_poll_wakes_for_its_buckets_only(pg_dsn: str) -> None:
    writer = PgBucketStore(pg_dsn)
    listener = PgBucketStore(pg_dsn)
    writer.migrate()
    try:
        head = listener.read_ops({'tech["t1"]': 0}, 1).head_op_id
        # an op already committed after `since` wakes at once (waits of 120 s: answering
        # well before their end is a wake-up, however slow the machine is)
        writer.apply(RULES, [up(1, (10, 0), "t1")])
        t0 = time.monotonic()
        assert listener.wait_for_change(['tech["t1"]'], head, 120) >= 1
        assert time.monotonic() - t0 < 60
        head = listener.read_ops({'tech["t1"]': 0}, 10).head_op_id

        woke: list[float] = []

        def wait() -> None:
            t = time.monotonic()
            listener.wait_for_change(['tech["t1"]'], head, 120)
            woke.append(time.monotonic() - t)

        th = threading.Thread(target=wait)
        th.start()
        deadline = time.monotonic() + 60
        while listener.waiting('tech["t1"]') < 1:
            assert time.monotonic() < deadline, "the waiter never registered"
            time.sleep(0.02)
        writer.apply(RULES, [up(2, (11, 0), "t2", status="done")])  # another bucket
        time.sleep(0.7)
        assert not woke
        writer.apply(RULES, [up(3, (12, 0), "t1")])
        th.join(90)
        assert woke and woke[0] < 60

        async def async_wait() -> float:
            head = (await listener.read_ops_async({'tech["t1"]': 0}, 10)).head_op_id
            t = time.monotonic()
            task = asyncio.ensure_future(listener.wait_for_change_async(['tech["t1"]'], head, 120))
            await asyncio.sleep(0.3)
            assert not task.done()
            await asyncio.to_thread(writer.apply, RULES, [up(4, (13, 0), "t1")])
            await task
            return time.monotonic() - t

        assert asyncio.run(async_wait()) < 60
        # a timeout returns without a change
        t0 = time.monotonic()
        listener.wait_for_change(['tech["t9"]'], 10**9, 0.3)
        assert 0.25 < time.monotonic() - t0 < 60  # the upper bound only catches a hang
    finally:
        writer.close()
        listener.close()


def test_one_leader_per_group(pg_dsn: str) -> None:
    a, b, c = (PgBucketStore(pg_dsn, group=g) for g in ("g1", "g1", "g2"))
    a.migrate()
    try:
        assert a.acquire_leadership()
        assert not b.acquire_leadership()
        assert c.acquire_leadership()  # another group
        a.close()
        assert b.acquire_leadership()
    finally:
        for s in (a, b, c):
            s.close()


def test_checkpoint_checksums_wrap_in_sql_as_u64_sums(pg_dsn: str) -> None:
    """The store adds checksum deltas in SQL on the two's-complement bigint form: the
    result must be the u64 sum modulo 2**64 (edges and random values)."""
    m = 1 << 64
    edges = [0, 1, (1 << 63) - 1, 1 << 63, (1 << 63) + 1, m - 1, m - 2]
    rng = random.Random(7)
    pairs = [(a, b) for a in edges for b in edges]
    pairs += [(rng.randrange(m), rng.randrange(m)) for _ in range(200)]

    def i64(u: int) -> int:
        return u - m if u >= 1 << 63 else u

    with psycopg.connect(pg_dsn) as conn:
        got = conn.execute(
            "select " + WRAP_SUM.format("a", "b") + " from unnest("
            "%s::bigint[], %s::bigint[]) as t(a, b)",
            ([i64(a) for a, _ in pairs], [i64(b) for _, b in pairs]),
        ).fetchall()
    assert [int(r[0]) % m for r in got] == [(a + b) % m for a, b in pairs]
    assert all(-(1 << 63) <= int(r[0]) < 1 << 63 for r in got)


def test_listener_wakes_late_waiters_from_its_history() -> None:
    """A waiter that registers after a notification it should have seen is woken at once;
    when the history has overflowed past its position, it is woken too (conservatively)."""
    from relay.downstream.store_wakeups import _HISTORY, OpsListener, Waiter

    listener = OpsListener(lambda: None)  # type: ignore[arg-type,return-value]

    def woken(buckets: set[str], since: int) -> bool:
        waiter = Waiter(frozenset(buckets))
        listener.register(waiter, since)
        listener.unregister(waiter)
        assert waiter.event is not None
        return waiter.event.is_set()

    listener._deliver(10, frozenset({"a"}))
    listener._deliver(11, frozenset({"b"}))
    assert woken({"a"}, 9) and woken({"b"}, 10)
    assert not woken({"a"}, 10)  # its change is at or below what it has read
    assert not woken({"c"}, 9)  # nothing of its buckets since
    for head in range(12, 12 + _HISTORY):
        listener._deliver(head, frozenset({"z"}))
    assert not woken({"c"}, 12)  # the history still reaches back past 12
    assert woken({"c"}, 9)  # entries after 9 were dropped: they may have named "c"
