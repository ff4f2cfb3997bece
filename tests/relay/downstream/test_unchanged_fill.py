"""Unchanged TOAST values the relay holds no copy of (relay/downstream/unchanged_fill.py):
the planner's wants and fills (pure), the reads of a source (a fake one), the store asking
the source only when a value is missing, and PgSourceRows against a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from relay.downstream.bucket_store import ChangeKind, OpKind, RowChange
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.planner import Plan, RowState, plan_changes
from relay.downstream.rules import TableInfo
from relay.downstream.rules_parser import rules_from_mapping
from relay.downstream.source_rows import PgSourceRows
from relay.downstream.unchanged_fill import Fills, Wanted, fetch_wanted, pending
from relay.errors import EngineError, SourceUnreadable

T = "public.big"
U = "public.other"
INFOS = {
    T: TableInfo(("id", "state", "doc", "note"), ("id",)),
    U: TableInfo(("id", "doc"), ("id",)),
}
RULES = rules_from_mapping(
    {
        "bucket": [
            {
                "name": "open",
                "table": [
                    {"table": T, "filters": [{"column": "state", "op": "=", "value": "open"}]},
                    {"table": U},
                ],
            },
            {
                "name": "slim",  # keeps no doc
                "table": [
                    {
                        "table": T,
                        "filters": [{"column": "state", "op": "=", "value": "slim"}],
                        "exclude": ["doc"],
                    }
                ],
            },
        ]
    },
    INFOS,
)
RULES_SLIM = rules_from_mapping(
    {
        "bucket": [
            {
                "name": "slim",
                "table": [
                    {
                        "table": T,
                        "filters": [{"column": "state", "op": "!=", "value": "done"}],
                        "exclude": ["doc"],
                    }
                ],
            }
        ]
    },
    INFOS,
)
REF = (T, "[1]")
LEFT = {REF: RowState((), (5, 0))}  # the row left every bucket at (5, 0): a tombstone


def update(
    pos: tuple[int, int], state: str = "open", note: str = "n", key: int = 1, **kw: Any
) -> RowChange:
    """An update that leaves ``doc`` unchanged (not sent)."""
    row = {"id": key, "state": state, "doc": None, "note": note}
    return RowChange(T, ChangeKind.UPSERT, pos, (key,), row, unchanged=("doc",), **kw)


def puts(plan: Plan) -> dict[str, dict[str, Any]]:
    return {o.bucket: json.loads(o.data_json or "") for o in plan.ops if o.kind is OpKind.PUT}


# --------------------------------------------------------------------------- the planner


def test_a_row_back_in_a_bucket_is_never_sent_without_its_unchanged_value() -> None:
    back = update((6, 0))
    # no source: skipped, with an error naming table, key and column
    plan = plan_changes(RULES, [back], LEFT, {})
    assert plan.ops == [] and plan.states == {} and plan.unfilled == 1
    assert len(plan.errors) == 1
    assert "public.big key [1] at position (6, 0)" in plan.errors[0]
    assert "column(s) doc" in plan.errors[0] and "relay.source_dsn is not set" in plan.errors[0]
    assert plan.wanted == []
    # a source not asked yet: the row is wanted, by its key and the missing column
    plan = plan_changes(RULES, [back], LEFT, {}, fills=Fills())
    assert plan.ops == [] and plan.wanted == [Wanted(REF, (("id", 1),), ("doc",))]
    # what the source gave fills it
    plan = plan_changes(RULES, [back], LEFT, {}, fills=Fills(rows={REF: {"doc": "D" * 9000}}))
    assert puts(plan) == {"open[]": {"id": 1, "state": "open", "doc": "D" * 9000, "note": "n"}}
    assert (plan.errors, plan.wanted, plan.source_filled, plan.unfilled) == ([], [], 1, 0)


def test_an_insert_outside_every_bucket_moved_in_is_filled_alike() -> None:
    inserted = RowChange(
        T, ChangeKind.UPSERT, (1, 0), (1,), {"id": 1, "state": "done", "doc": "X", "note": "n"}
    )
    moved = update((2, 0))
    plan = plan_changes(RULES, [inserted, moved], {}, {}, fills=Fills())
    assert plan.wanted == [Wanted(REF, (("id", 1),), ("doc",))] and plan.ops == []
    plan = plan_changes(RULES, [inserted, moved], {}, {}, fills=Fills(rows={REF: {"doc": "X"}}))
    assert puts(plan)["open[]"]["doc"] == "X"


def test_later_changes_of_the_batch_fill_from_the_filled_row() -> None:
    changes = [update((6, 0)), update((6, 1), note="n2"), update((7, 0), note="n3")]
    plan = plan_changes(RULES, changes, LEFT, {}, fills=Fills())
    assert {w.ref for w in plan.wanted} == {REF}  # one row to read, however many changes
    plan = plan_changes(RULES, changes, LEFT, {}, fills=Fills(rows={REF: {"doc": "D"}}))
    assert [json.loads(o.data_json or "")["doc"] for o in plan.ops] == ["D", "D", "D"]
    assert plan.source_filled == 1 and plan.errors == []
    # an update of the TOASTed column itself carries its value: the new one wins
    changed = RowChange(
        T, ChangeKind.UPSERT, (8, 0), (1,), {"id": 1, "state": "open", "doc": "E", "note": "n"}
    )
    plan = plan_changes(
        RULES, [*changes, changed, update((9, 0))], LEFT, {}, fills=Fills({REF: {"doc": "D"}})
    )
    assert [json.loads(o.data_json or "")["doc"] for o in plan.ops] == ["D", "D", "D", "E", "E"]


def test_a_value_the_rules_do_not_keep_is_not_wanted() -> None:
    # a bucket whose rule excludes doc: placed without it, nothing asked
    plan = plan_changes(RULES_SLIM, [update((6, 0))], LEFT, {}, fills=Fills())
    assert plan.wanted == [] and plan.errors == []
    assert puts(plan) == {"slim[]": {"id": 1, "state": "open", "note": "n"}}
    # a row that lands in no bucket needs none either
    plan = plan_changes(RULES, [update((6, 0), state="done")], LEFT, {}, fills=Fills())
    assert plan.wanted == [] and plan.errors == [] and plan.ops == []
    # a rule keeping no doc places it: still nothing wanted
    plan = plan_changes(RULES_SLIM, [update((6, 0), state="slim")], LEFT, {}, fills=Fills())
    assert plan.wanted == [] and puts(plan) == {"slim[]": {"id": 1, "state": "slim", "note": "n"}}


def test_a_value_kept_by_the_new_bucket_but_not_stored_by_the_old_one_is_wanted() -> None:
    # in `slim` (stored without doc), then moved to `open`, which keeps doc
    first = RowChange(
        T, ChangeKind.UPSERT, (1, 0), (1,), {"id": 1, "state": "slim", "doc": "S", "note": "n"}
    )
    plan = plan_changes(
        RULES, [first, update((2, 0))], {}, {}, fills=Fills(rows={REF: {"doc": "S"}})
    )
    assert puts(plan)["open[]"]["doc"] == "S"
    stored = plan_changes(RULES, [first], {}, {})
    data = {REF: {"id": 1, "state": "slim"}}  # what the store holds: slim's projection
    plan = plan_changes(RULES, [update((2, 0))], stored.resolve(1).copy(), {}, data, fills=Fills())
    assert plan.wanted == [Wanted(REF, (("id", 1),), ("doc",))]


def test_a_row_the_source_no_longer_has_is_placed_nowhere() -> None:
    gone = Fills(rows={REF: None})
    plan = plan_changes(RULES, [update((6, 0))], LEFT, {}, fills=gone)
    assert plan.ops == [] and plan.errors == [] and plan.source_gone == 1
    # a row in a bucket whose rule kept no doc, moving to one that keeps it, deleted since:
    # removed from the bucket it was in (its delete is still to come)
    first = RowChange(
        T, ChangeKind.UPSERT, (1, 0), (1,), {"id": 1, "state": "slim", "doc": "S", "note": "n"}
    )
    states = plan_changes(RULES, [first], {}, {}).resolve(1)
    plan = plan_changes(RULES, [update((2, 0))], states, {}, {REF: {"id": 1}}, fills=gone)
    assert [(o.bucket, o.kind) for o in plan.ops] == [("slim[]", OpKind.REMOVE)]
    assert plan.states[REF] == RowState((), (2, 0))


def test_a_failed_read_skips_the_change_and_says_why() -> None:
    failed = Fills(failed={REF: "public.big has no column doc now"})
    plan = plan_changes(RULES, [update((6, 0))], LEFT, {}, fills=failed)
    assert plan.ops == [] and plan.wanted == [] and plan.unfilled == 1
    assert "public.big has no column doc now" in plan.errors[0]
    # a key change whose new row cannot be filled still retires the old key
    first = RowChange(
        T, ChangeKind.UPSERT, (1, 0), (1,), {"id": 1, "state": "open", "doc": "X", "note": "n"}
    )
    moved = update((2, 0), key=2, old_key=(1,))
    states = plan_changes(RULES, [first], {}, {}).resolve(1)
    old_data = {REF: {"id": 1, "state": "open", "doc": "X", "note": "n"}}
    plan = plan_changes(RULES, [moved], states, {}, old_data)
    assert puts(plan)["open[]"]["doc"] == "X"  # no source: the old key's data
    plan = plan_changes(RULES, [moved], states, {}, old_data, fills=Fills())
    assert plan.wanted == [Wanted((T, "[2]"), (("id", 2),), ("doc",))]  # else the new key's
    plan = plan_changes(RULES, [moved], states, {}, {}, fills=Fills(failed={(T, "[2]"): "gone"}))
    assert [(o.bucket, o.row_key, o.kind) for o in plan.ops] == [("open[]", "[1]", OpKind.REMOVE)]
    assert plan.unfilled == 1 and "public.big key [2]" in plan.errors[0]


def plan_reading(changes: Sequence[RowChange], now: Mapping[int, dict[str, Any]]) -> Plan:
    """Plan ``changes`` of a row that left every bucket as the store does: read what the
    plan wants from a source holding the rows ``now`` (by id), plan again, until nothing
    more is wanted."""
    fills = Fills()
    source = FakeSource({T: now})
    plan = plan_changes(RULES, changes, LEFT, {}, fills=fills)
    while pending(plan.wanted, fills):
        fetch_wanted(source, plan.wanted, fills)
        plan = plan_changes(RULES, changes, LEFT, {}, fills=fills)
    return plan


def bucket_rows(plan: Plan) -> dict[tuple[str, str], dict[str, Any]]:
    """The buckets' rows once the plan's ops are applied in order."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for op in plan.ops:
        if op.kind is OpKind.PUT:
            out[op.bucket, op.row_key] = json.loads(op.data_json or "")
        else:
            out.pop((op.bucket, op.row_key), None)
    return out


def test_a_key_change_never_carries_a_value_read_for_the_key_it_leaves() -> None:
    # Row A (id 1, doc "A") enters a bucket with doc unchanged, then moves to id 2, doc
    # still unchanged; another row is inserted as id 1 (doc "B") before the engine reads
    # the missing doc: the read of id 1 gives B's doc, which is not A's.
    enters = update((6, 0))
    moves = update((7, 0), key=2, old_key=(1,))
    other = RowChange(
        T, ChangeKind.UPSERT, (8, 0), (1,), {"id": 1, "state": "done", "doc": "B", "note": "b"}
    )
    now = {1: {"doc": "B"}, 2: {"doc": "A"}}  # PostgreSQL after the three changes
    plan = plan_reading([enters, moves, other], now)
    assert bucket_rows(plan) == {
        ("open[]", "[2]"): {"id": 2, "state": "open", "doc": "A", "note": "n"}
    }
    # the same with the move in the next batch (the old key's data then comes from the store)
    first = plan_reading([enters], now)
    assert bucket_rows(first) == {
        ("open[]", "[1]"): {"id": 1, "state": "open", "doc": "B", "note": "n"}
    }
    stored = {REF: {"id": 1, "state": "open", "doc": "B", "note": "n"}}
    fills = Fills()
    plan = plan_changes(RULES, [moves], first.resolve(1), {}, stored, fills=fills)
    fetch_wanted(FakeSource({T: now}), plan.wanted, fills)
    plan = plan_changes(RULES, [moves], first.resolve(1), {}, stored, fills=fills)
    assert puts(plan) == {"open[]": {"id": 2, "state": "open", "doc": "A", "note": "n"}}


def test_a_full_old_row_fills_without_the_source() -> None:
    full = update((6, 0), before={"id": 1, "state": "done", "doc": "B", "note": "n"})
    plan = plan_changes(RULES, [full], LEFT, {}, fills=Fills())
    assert plan.wanted == [] and puts(plan)["open[]"]["doc"] == "B"


# --------------------------------------------------------------------------- reads


class FakeSource:
    """Rows by table and key id; records each read; a table in ``broken`` cannot be read."""

    def __init__(self, rows: Mapping[str, Mapping[int, dict[str, Any]]], broken: str = "") -> None:
        self.rows = rows
        self.broken = broken
        self.reads: list[tuple[str, tuple[str, ...], list[int]]] = []

    def read(
        self, table: str, columns: Sequence[str], keys: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any] | None]:
        self.reads.append((table, tuple(columns), [k["id"] for k in keys]))
        if table == self.broken:
            raise SourceUnreadable(f"{table}: no such table in the captured database now")
        found = [self.rows.get(table, {}).get(k["id"]) for k in keys]
        return [None if r is None else {c: r[c] for c in columns} for r in found]


def test_one_read_per_table_for_every_row_wanted() -> None:
    source = FakeSource({T: {1: {"doc": "a", "note": "x"}, 3: {"doc": "c", "note": "z"}}})
    wanted = [
        Wanted((T, "[1]"), (("id", 1),), ("doc",)),
        Wanted((T, "[2]"), (("id", 2),), ("doc",)),
        Wanted((T, "[1]"), (("id", 1),), ("note",)),
        Wanted((T, "[3]"), (("id", 3),), ("doc",)),
    ]
    fills = Fills()
    assert fetch_wanted(source, wanted, fills) == 3
    assert source.reads == [(T, ("doc", "note"), [1, 2, 3])]
    assert fills.rows == {
        (T, "[1]"): {"doc": "a", "note": "x"},
        (T, "[2]"): None,
        (T, "[3]"): {"doc": "c", "note": "z"},
    }
    # asked once: nothing pending, no second read
    assert pending(wanted, fills) == []
    assert fetch_wanted(source, wanted, fills) == 0 and len(source.reads) == 1


def test_a_table_the_source_cannot_read_fails_its_rows_only() -> None:
    source = FakeSource({T: {1: {"doc": "a"}}}, broken=U)
    wanted = [
        Wanted((U, "[7]"), (("id", 7),), ("doc",)),
        Wanted((T, "[1]"), (("id", 1),), ("doc",)),
    ]
    fills = Fills()
    fetch_wanted(source, wanted, fills)
    assert fills.rows == {(T, "[1]"): {"doc": "a"}}
    assert fills.failed == {(U, "[7]"): f"{U}: no such table in the captured database now"}
    assert [r[0] for r in source.reads] == [T, U]


# --------------------------------------------------------------------------- the store


@pytest.fixture
def store(pg_dsn: str) -> Iterator[PgBucketStore]:
    s = PgBucketStore(pg_dsn)
    s.migrate()
    try:
        yield s
    finally:
        s.close()


def test_the_store_reads_the_source_only_for_missing_values(store: PgBucketStore) -> None:
    source = FakeSource({T: {1: {"doc": "D" * 7000}}})
    inserted = RowChange(
        T,
        ChangeKind.UPSERT,
        (1, 0),
        (1,),
        {"id": 1, "state": "open", "doc": "D" * 7000, "note": "n"},
    )
    store.apply(RULES, [inserted], source=source)
    store.apply(RULES, [update((2, 0), note="n2")], source=source)  # filled from the store
    assert source.reads == []
    store.apply(RULES, [update((3, 0), state="done")], source=source)  # leaves: no doc needed
    assert source.reads == []
    result = store.apply(RULES, [update((4, 0)), update((4, 1), note="n4")], source=source)
    assert source.reads == [(T, ("doc",), [1])]
    assert (result.source_filled, result.unfilled, result.skipped_errors) == (1, 0, 0)
    ops = store.read_ops({"open[]": 0}, 10).ops
    assert [json.loads(o.data_json or "")["doc"] for o in ops if o.data_json][-2:] == [
        "D" * 7000
    ] * 2
    # without a source the change is skipped and counted
    store.apply(RULES, [update((5, 0), state="done")])
    result = store.apply(RULES, [update((6, 0))])
    assert (result.ops, result.unfilled, result.skipped_errors) == (0, 1, 1)


# --------------------------------------------------------------------------- PostgreSQL


def test_pg_source_rows_reads_values_as_events_carry_them(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute(
            "create table src (site text, at timestamp, n numeric(10,2), b bytea, j jsonb, "
            "a int[], t text, flag bool, primary key (site, at))"
        )
        pg.execute(
            "insert into src values ('s1', '2024-05-01 08:30:00', 1.5, '\\x00ff', '{\"k\": 1}', "
            "'{1,2}', repeat('x', 9000), true), ('s 2', '2024-05-02 00:00:00', null, null, "
            "null, null, null, false)"
        )
    source = PgSourceRows(pg_dsn)
    try:
        at = int(dt.datetime(2024, 5, 1, 8, 30, tzinfo=dt.UTC).timestamp() * 1_000_000)
        at2 = int(dt.datetime(2024, 5, 2, tzinfo=dt.UTC).timestamp() * 1_000_000)
        keys = [{"site": "s1", "at": at}, {"site": "nope", "at": at}, {"site": "s 2", "at": at2}]
        columns = ["n", "b", "j", "a", "t", "flag"]
        rows = source.read("public.src", columns, keys)
        assert rows == [
            {
                "n": Decimal("1.50"),
                "b": b"\x00\xff",
                "j": '{"k": 1}',
                "a": [1, 2],
                "t": "x" * 9000,
                "flag": True,
            },
            None,
            {"n": None, "b": None, "j": None, "a": None, "t": None, "flag": False},
        ]
        assert source.reads == 1
        with pytest.raises(SourceUnreadable, match=r"public\.src has no column gone now"):
            source.read("public.src", ["gone"], keys)
        with pytest.raises(SourceUnreadable, match=r"public\.nosuch: no such table"):
            source.read("public.nosuch", ["t"], [{"id": 1}])
    finally:
        source.close()
    unreachable = PgSourceRows("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(EngineError, match=r"cannot read public\.src from the captured database"):
        unreachable.read("public.src", ["t"], [{"site": "s1", "at": 0}])


def test_pg_source_rows_keeps_the_dsns_own_session_options() -> None:
    from relay.downstream.source_rows import _session_options

    options = _session_options("postgresql://x@h/db?options=-c%20search_path%3Dapp")
    assert options.startswith("-c search_path=app -c DateStyle=ISO,MDY")
    assert "-c bytea_output=hex" in options
