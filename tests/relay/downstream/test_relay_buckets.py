"""Bucket operations: PUT/REMOVE per change, move-in/move-out, key changes, and the property that
a device ends up holding exactly what the rules grant it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.downstream.rules import Rules, TableInfo, canonical_text, parse_bucket_id
from relay.downstream.rules_parser import rules_from_mapping
from tests.relay.bucket_oracle import (
    BucketOp,
    OpKind,
    bucket_ops,
    bucket_ops_for_change,
    buckets_after,
)

SCHEMA = {
    "public.orders": TableInfo(("id", "tech", "site", "status", "cost"), ("id",)),
    "public.stock": TableInfo(("site", "part", "qty", "tech"), ("site", "part")),
}

RULES = rules_from_mapping(
    {
        "token_claims": ["tech", "sites"],
        "bucket": [
            {
                "name": "tech_orders",
                "parameters": ["t"],
                "claims": {"t": "tech"},
                "table": [
                    {
                        "table": "public.orders",
                        "match": {"tech": "t"},
                        "filters": [{"column": "status", "op": "!=", "value": "cancelled"}],
                        "exclude": ["cost"],
                    }
                ],
            },
            {
                "name": "site",
                "parameters": ["s"],
                "claims": {"s": "sites"},
                "table": [{"table": "public.stock", "match": {"site": "s"}}],
            },
        ],
    },
    SCHEMA,
)


def wo(tech: str | None, status: str = "open", id_: int = 1) -> dict[str, Any]:
    return {"id": id_, "tech": tech, "site": "s1", "status": status, "cost": 5}


def test_insert_puts_the_projected_row() -> None:
    ops = bucket_ops(RULES, "public.orders", (1,), frozenset(), wo("t1"))
    assert ops == [
        BucketOp(
            OpKind.PUT,
            'tech_orders["t1"]',
            "public.orders",
            (1,),
            {"id": 1, "tech": "t1", "site": "s1", "status": "open"},
        )
    ]
    assert buckets_after(ops) == {'tech_orders["t1"]'}


def test_reassignment_moves_the_row_between_buckets() -> None:
    ops = bucket_ops(RULES, "public.orders", (1,), frozenset({'tech_orders["t1"]'}), wo("t2"))
    assert [(op.kind, op.bucket, op.key) for op in ops] == [
        (OpKind.REMOVE, 'tech_orders["t1"]', (1,)),
        (OpKind.PUT, 'tech_orders["t2"]', (1,)),
    ]
    assert ops[0].row is None
    assert buckets_after(ops) == {'tech_orders["t2"]'}


def test_update_inside_a_bucket_is_a_put_only() -> None:
    ops = bucket_ops(
        RULES, "public.orders", (1,), frozenset({'tech_orders["t1"]'}), wo("t1", "started")
    )
    assert [(op.kind, op.bucket) for op in ops] == [(OpKind.PUT, 'tech_orders["t1"]')]


def test_filter_move_out_and_unassignment_remove() -> None:
    old = frozenset({'tech_orders["t1"]'})
    for row in (wo("t1", "cancelled"), wo(None)):
        ops = bucket_ops(RULES, "public.orders", (1,), old, row)
        assert [(op.kind, op.bucket) for op in ops] == [(OpKind.REMOVE, 'tech_orders["t1"]')]
        assert buckets_after(ops) == frozenset()


def test_delete_removes_from_every_remembered_bucket() -> None:
    old = frozenset({'site["a"]', 'other["x"]'})
    ops = bucket_ops(RULES, "public.stock", ("a", "p"), old, None)
    assert [(op.kind, op.bucket, op.key) for op in ops] == [
        (OpKind.REMOVE, 'other["x"]', ("a", "p")),
        (OpKind.REMOVE, 'site["a"]', ("a", "p")),
    ]
    assert bucket_ops(RULES, "public.stock", ("a", "p"), frozenset(), None) == []


def test_key_change_removes_the_old_key_and_puts_the_new_one() -> None:
    row = {"site": "a", "part": "p2", "qty": 3, "tech": None}
    ops = bucket_ops_for_change(
        RULES, "public.stock", ("a", "p1"), ("a", "p2"), frozenset({'site["a"]'}), row
    )
    assert [(op.kind, op.bucket, op.key) for op in ops] == [
        (OpKind.REMOVE, 'site["a"]', ("a", "p1")),
        (OpKind.PUT, 'site["a"]', ("a", "p2")),
    ]
    assert ops[1].row == row
    moved = bucket_ops_for_change(
        RULES,
        "public.stock",
        ("a", "p1"),
        ("b", "p1"),
        frozenset({'site["a"]'}),
        {**row, "site": "b"},
    )
    assert [(op.kind, op.bucket, op.key) for op in moved] == [
        (OpKind.REMOVE, 'site["a"]', ("a", "p1")),
        (OpKind.PUT, 'site["b"]', ("b", "p1")),
    ]


def test_unruled_tables_produce_no_ops() -> None:
    assert bucket_ops(RULES, "public.other", (1,), frozenset(), {"id": 1}) == []


# --------------------------------------------------------------------------- property

# Small domains so that matches, filters and collisions happen often.  1 and "1", True and
# "true" compare equal (canonical text); None never matches.
VALUES: list[Any] = ["a", "b", None, 1, "1", True, "true"]
FILTER_VALUES: list[Any] = ["a", "b", 1, "1", True]
OPS = ["=", "!=", "in", "not in", "is null", "is not null"]
CLAIM_NAMES = ["sub", "c1", "c2"]
PSCHEMA = {
    "public.a": TableInfo(("id", "x", "y", "z"), ("id",)),
    "public.b": TableInfo(("k1", "k2", "x", "y"), ("k1", "k2")),
}


@st.composite
def table_entries(draw: st.DrawFn, table: str, parameters: list[str]) -> dict[str, Any]:
    info = PSCHEMA[table]
    entry: dict[str, Any] = {"table": table}
    # every parameter matched by one or two columns (key columns included: a key change then moves)
    match: dict[str, str] = {}
    free = list(info.columns)
    for p in parameters:
        for column in draw(st.lists(st.sampled_from(free), min_size=1, max_size=2, unique=True)):
            match[column] = p
            free.remove(column)
        if not free:
            break
    if parameters and len(set(match.values())) < len(parameters):
        match = {}
    entry["match"] = match
    filters = []
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(OPS))
        f: dict[str, Any] = {"column": draw(st.sampled_from(info.columns)), "op": op}
        if op in ("in", "not in"):
            f["value"] = draw(st.lists(st.sampled_from(FILTER_VALUES), min_size=1, max_size=3))
        elif op in ("=", "!="):
            f["value"] = draw(st.sampled_from(FILTER_VALUES))
        filters.append(f)
    entry["filters"] = filters
    non_key = [c for c in info.columns if c not in info.key]
    projection = draw(st.sampled_from(["all", "columns", "exclude"]))
    if projection == "columns":
        entry["columns"] = draw(st.lists(st.sampled_from(info.columns), unique=True))
    elif projection == "exclude":
        entry["exclude"] = draw(st.lists(st.sampled_from(non_key), unique=True))
    return entry


@st.composite
def rule_sets(draw: st.DrawFn) -> dict[str, Any]:
    buckets = []
    for i in range(draw(st.integers(1, 3))):
        parameters = [f"p{j}" for j in range(draw(st.integers(0, 2)))]
        tables = draw(
            st.lists(st.sampled_from(sorted(PSCHEMA)), min_size=1, max_size=2, unique=True)
        )
        entries = [draw(table_entries(t, parameters)) for t in tables]
        if any(parameters and not e["match"] for e in entries):
            parameters = []
            for e in entries:
                e["match"] = {}
        buckets.append(
            {
                "name": f"r{i}",
                "parameters": parameters,
                "claims": {p: draw(st.sampled_from(CLAIM_NAMES)) for p in parameters},
                "table": entries,
            }
        )
    return {"token_claims": ["c1", "c2"], "bucket": buckets}


def rows(table: str) -> st.SearchStrategy[dict[str, Any]]:
    info = PSCHEMA[table]
    keys = {c: st.sampled_from(["k0", "k1", "k2", 3]) for c in info.key}
    others = {c: st.sampled_from(VALUES) for c in info.columns if c not in info.key}
    return st.fixed_dictionaries({**keys, **others})


edits = st.one_of(
    st.tuples(st.just("upsert"), st.sampled_from(sorted(PSCHEMA))).flatmap(
        lambda t: st.tuples(st.just(t[0]), st.just(t[1]), rows(t[1]))
    ),
    st.tuples(st.just("delete"), st.sampled_from(sorted(PSCHEMA))).flatmap(
        lambda t: st.tuples(st.just(t[0]), st.just(t[1]), rows(t[1]))
    ),
    st.tuples(st.just("rekey"), st.sampled_from(sorted(PSCHEMA))).flatmap(
        lambda t: st.tuples(st.just(t[0]), st.just(t[1]), rows(t[1]))
    ),
)

claim_value = st.one_of(
    st.none(), st.sampled_from(VALUES), st.lists(st.sampled_from(VALUES), max_size=3)
)
tokens = st.dictionaries(st.sampled_from(CLAIM_NAMES), claim_value)

Held = set[tuple[str, str, tuple[Any, ...], frozenset[tuple[str, Any]]]]


def oracle(
    rules_data: Mapping[str, Any],
    state: Mapping[tuple[str, Any], dict[str, Any]],
    claims: Mapping[str, Any],
) -> Held:
    """What the rules grant a token, evaluated directly from the rules' data over the final rows."""
    granted: Held = set()

    def claim_set(value: Any) -> set[str]:
        items = value if isinstance(value, list) else [value]
        return {t for t in (canonical_text(v) for v in items) if t is not None}

    def holds(f: Mapping[str, Any], value: Any) -> bool:
        text = canonical_text(value)
        wanted = {
            canonical_text(v)
            for v in (f["value"] if isinstance(f.get("value"), list) else [f.get("value")])
        }
        return {
            "is null": value is None,
            "is not null": value is not None,
            "=": text is not None and text in wanted,
            "in": text is not None and text in wanted,
            "!=": text is not None and text not in wanted,
            "not in": text is not None and text not in wanted,
        }[f["op"]]

    for bucket in rules_data["bucket"]:
        for entry in bucket["table"]:
            table = entry["table"]
            info = PSCHEMA[table]
            for (t, key), row in state.items():
                if t != table or not all(holds(f, row[f["column"]]) for f in entry["filters"]):
                    continue
                ok = True
                for p in bucket["parameters"]:
                    texts = {canonical_text(row[c]) for c, q in entry["match"].items() if q == p}
                    allowed = claim_set(claims.get(bucket["claims"][p]))
                    ok = ok and len(texts) == 1 and None not in texts and texts <= allowed
                if not ok:
                    continue
                if "columns" in entry:
                    shown = {
                        c: row[c] for c in info.columns if c in entry["columns"] or c in info.key
                    }
                else:
                    shown = {c: v for c, v in row.items() if c not in entry.get("exclude", [])}
                granted.add((bucket["name"], table, key, frozenset(shown.items())))
    return granted


@settings(max_examples=300, deadline=None)
@given(rule_sets(), st.lists(edits, max_size=25), st.lists(tokens, min_size=1, max_size=4))
def test_devices_hold_exactly_what_the_rules_grant(
    rules_data: dict[str, Any],
    script: list[tuple[str, str, dict[str, Any]]],
    devices: list[dict[str, Any]],
) -> None:
    rules = rules_from_mapping(rules_data, PSCHEMA)
    state: dict[tuple[str, Any], dict[str, Any]] = {}
    remembered: dict[tuple[str, Any], frozenset[str]] = {}
    logs: dict[str, dict[tuple[str, Any], Mapping[str, Any]]] = {}

    def apply(ops: list[BucketOp]) -> None:
        for op in ops:
            log = logs.setdefault(op.bucket, {})
            if op.kind is OpKind.PUT:
                assert op.row is not None
                log[op.table, op.key] = op.row
            else:
                assert (op.table, op.key) in log, "REMOVE of a row the bucket does not hold"
                del log[op.table, op.key]

    for action, table, row in script:
        key = rules.key_of(table, row)
        if action == "upsert":
            ops = bucket_ops(rules, table, key, remembered.get((table, key), frozenset()), row)
            state[table, key] = row
        elif action == "delete":
            if (table, key) not in state:
                continue
            ops = bucket_ops(rules, table, key, remembered.get((table, key), frozenset()), None)
            del state[table, key]
        else:  # rekey: move the table's first live row to this row's key, with this row's values
            live = [k for (t, k) in state if t == table]
            if not live or (table, key) in state:
                continue
            old_key = live[0]
            ops = bucket_ops_for_change(
                rules, table, old_key, key, remembered.pop((table, old_key), frozenset()), row
            )
            del state[table, old_key]
            state[table, key] = row
        apply(ops)
        after = buckets_after(ops)
        remembered.pop((table, key), None)
        if after:
            remembered[table, key] = after

    # what is remembered is what the rules say now, and no bucket holds a dead row
    for (table, key), row in state.items():
        assert remembered.get((table, key), frozenset()) == rules.buckets_for_row(table, row)
    assert set(remembered) <= set(state)
    for log in logs.values():
        assert set(log) <= set(state)

    for claims in devices:
        held: Held = set()
        for bucket in rules.buckets_for_claims(claims):
            rule, _ = parse_bucket_id(bucket)
            for (table, key), shown in logs.get(bucket, {}).items():
                held.add((rule, table, key, frozenset(shown.items())))
        assert held == oracle(rules_data, state, claims)


def test_the_oracle_and_the_rules_agree_on_a_hand_made_case() -> None:
    data = {
        "token_claims": ["c1"],
        "bucket": [
            {
                "name": "r",
                "parameters": ["p"],
                "claims": {"p": "c1"},
                "table": [
                    {"table": "public.a", "match": {"x": "p"}, "filters": [], "columns": ["y"]}
                ],
            }
        ],
    }
    rules: Rules = rules_from_mapping(data, PSCHEMA)
    row = {"id": "k1", "x": 1, "y": "a", "z": None}
    state = {("public.a", ("k1",)): row}
    expected = {("r", "public.a", ("k1",), frozenset({("id", "k1"), ("y", "a")}))}
    assert oracle(data, state, {"c1": ["1"]}) == expected
    assert rules.buckets_for_row("public.a", row) == {'r["1"]'}
    assert rules.buckets_for_claims({"c1": ["1"]}) == {'r["1"]'}
    assert oracle(data, state, {"c1": "2"}) == set()
