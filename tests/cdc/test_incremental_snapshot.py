"""The pure parts of incremental re-snapshots (cdc/incremental_snapshot.py): snapshot
visibility, the watermark window, DDL detection from Relation messages and catalog
signatures, the restricted WHERE form, and the progress record."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc import pgoutput_messages as m
from cdc.ddl_detection import (
    ColumnFacts,
    EnumFacts,
    TableSignature,
    resnapshot_reasons,
    signatures_from_bytes,
    signatures_to_bytes,
)
from cdc.errors import SnapshotRequestError
from cdc.incremental_snapshot import (
    ChunkWindow,
    Job,
    Progress,
    SignalRequest,
    Visibility,
    Watermark,
    WindowState,
    message_keys,
)
from cdc.relation_diff import compare_relations
from cdc.resnapshot_chunks import chunk_query
from cdc.resnapshot_requests import where_sql
from cdc.where_clause import Condition, WhereClause, parse_where

# --------------------------------------------------------------------------- visibility


def test_visibility_follows_pg_current_snapshot() -> None:
    v = Visibility.parse("100:105:101,103")
    assert (v.xmin, v.xmax, v.xip) == (100, 105, frozenset({101, 103}))
    assert [x for x in range(98, 108) if v.visible(x)] == [98, 99, 100, 102, 104]
    assert Visibility.parse("7:7:") == Visibility(7, 7, frozenset())
    with pytest.raises(ValueError, match="not a pg_snapshot"):
        Visibility.parse("7-7")


def test_visibility_maps_32_bit_xids_into_the_epoch_of_xmax() -> None:
    epoch1 = 1 << 32
    v = Visibility(epoch1 - 10, epoch1 + 5, frozenset({epoch1 + 2}))
    assert v.full_xid(3) == epoch1 + 3  # just after the wrap
    assert v.full_xid(0xFFFFFFF8) == epoch1 - 8  # just before it
    assert v.visible(0xFFFFFFF8) and v.visible(3)
    assert not v.visible(2)  # in progress
    assert not v.visible(5)  # at xmax
    assert v.visible(0xFFFFFFF0)  # before xmin


# --------------------------------------------------------------------------- the window


def keyed(*ids: int) -> list[tuple[tuple[str, ...], tuple[str | None, ...]]]:
    return [((str(i),), (str(i), f"v{i}")) for i in ids]


def test_window_rules_with_literal_values() -> None:
    # xid 10 visible to the chunk's snapshot, 11 not (committed before the low watermark
    # but still running when the chunk was read), 12 later than the snapshot
    w = ChunkWindow("c1", keyed(1, 2, 3, 4, 5, 6), Visibility(10, 12, frozenset({11})))
    assert w.state is WindowState.WAITING_LOW
    w.change(10, [("1",)])  # visible before the low watermark: the chunk has it, kept
    w.change(11, [("2",)])  # invisible before the low watermark: dropped
    w.watermark("low")
    assert w.state is WindowState.OPEN
    w.change(10, [("3",)])  # between the watermarks: dropped, whatever its visibility
    w.change(12, [("4",), ("99",)])  # an update from key 4 to 99: 4 dropped, 99 not in the chunk
    w.watermark("high")
    assert w.state is WindowState.CLOSED
    w.change(13, [("5",)])  # after the high watermark: the rows are emitted before it
    assert [k for k, _ in w.remaining()] == [("1",), ("5",), ("6",)]
    assert w.dropped == 3 and w.read == 6


def test_window_truncate_and_unknown_keys() -> None:
    w = ChunkWindow("c", keyed(1, 2), Visibility(5, 6))
    w.truncate(5)  # visible: the chunk was read after it
    w.watermark("low")
    w.change(7, None)  # a change whose key was not sent: cannot tell which row
    assert w.state is WindowState.INVALID and "primary key" in w.invalid_reason
    w.watermark("high")
    assert w.state is WindowState.INVALID
    with pytest.raises(ValueError, match="not closed"):
        w.remaining()
    t = ChunkWindow("t", keyed(1, 2), Visibility(5, 6))
    t.watermark("low")
    t.truncate(8)
    t.watermark("high")
    assert t.remaining() == [] and t.dropped == 2


def test_window_checks_transactions_read_before_it_existed() -> None:
    w = ChunkWindow("c", keyed(1), Visibility(100, 110, frozenset({104})))
    assert w.registered_after([99, 100, 103, 105]) is None
    assert w.registered_after([99, 104, 105]) == 104
    assert w.registered_after([112]) == 112


def test_message_keys_of_each_change() -> None:
    ins = m.Insert(None, 1, ("7", "a", "x"))
    upd = m.Update(None, 1, None, None, ("7", "b", "y"))
    moved = m.Update(None, 1, ("6", "a", None), m.OldTupleKind.KEY, ("7", "b", "y"))
    dele = m.Delete(None, 1, ("7", "a", None), m.OldTupleKind.KEY)
    toast = m.Update(None, 1, None, None, ("7", m.UNCHANGED_TOAST, "y"))
    assert message_keys(ins, [0]) == [("7",)]
    assert message_keys(upd, [0, 2]) == [("7", "y")]
    assert message_keys(moved, [0]) == [("7",), ("6",)]
    assert message_keys(dele, [0]) == [("7",)]
    assert message_keys(toast, [1]) is None  # the key column's value was not sent
    assert message_keys(dele, [2]) is None  # a delete without the primary key


Txn = tuple[str, list[tuple[int, int | None]]]  # ("ops", [(key, value or None)]) | ("truncate", [])


@st.composite
def scenarios(draw: Any) -> dict[str, Any]:
    universe = draw(st.integers(1, 12))
    keys = st.integers(0, universe - 1)
    table = draw(st.dictionaries(keys, st.integers(0, 99), max_size=universe))
    op = st.tuples(keys, st.one_of(st.none(), st.integers(100, 999)))
    txn = st.one_of(
        st.tuples(st.just("ops"), st.lists(op, min_size=1, max_size=4)),
        st.tuples(st.just("truncate"), st.just([])),
    )
    txns = draw(st.lists(txn, max_size=14).map(lambda ts: [t for t in ts]))
    n = len(txns)
    # stream order = commit order.  registered <= low <= snapshot <= high: the chunk is
    # registered after the daemon read ``registered`` transactions; ``low`` of them commit
    # before the low watermark, ``snap`` before the chunk's snapshot, ``high`` before the high
    # watermark.  Any of the transactions before the snapshot may still count as running in it.
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=4, max_size=4)))
    running = draw(st.sets(st.integers(0, max(cuts[2] - 1, 0)), max_size=3)) if cuts[2] else set()
    return {
        "table": table,
        "txns": txns,
        "registered": cuts[0],
        "low": cuts[1],
        "snap": cuts[2],
        "high": cuts[3],
        "running": {i for i in running if i < cuts[2]},
        "after": draw(st.one_of(st.none(), keys)),
        "limit": draw(st.integers(1, universe + 1)),
    }


def apply(rows: dict[int, int], txn: Txn) -> None:
    kind, ops = txn
    if kind == "truncate":
        rows.clear()
    for k, v in ops:
        if v is None:
            rows.pop(k, None)
        else:
            rows[k] = v


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_chunk_never_overwrites_a_newer_change(sc: dict[str, Any]) -> None:
    """For any interleaving of streamed transactions and a chunk, a consumer that applies the
    event sequence (streamed changes, and the chunk's rows at the high watermark) ends with
    the table's state for every key the chunk covers; the chunk is discarded exactly when a
    transaction read before the window existed is invisible to it."""
    txns: list[Txn] = sc["txns"]
    xid = [1000 + i for i in range(len(txns))]
    vis = Visibility(1000, 1000 + sc["snap"], frozenset(1000 + i for i in sc["running"]))
    # what the chunk reads: the table as its snapshot sees it, keys after ``after``, limited
    seen = dict(sc["table"])
    for i, t in enumerate(txns):
        if vis.visible(xid[i]):
            apply(seen, t)
    after = sc["after"]
    chosen = sorted(k for k in seen if after is None or k > after)[: sc["limit"]]
    full = len(chosen) == sc["limit"]
    window = ChunkWindow("c", [((f"{k:03d}",), (f"{k:03d}", str(seen[k]))) for k in chosen], vis)
    # the consumer holds every row with a stale value (e.g. a column added with a default)
    consumer = {k: -1 for k in sc["table"]}
    truth = dict(sc["table"])
    discarded = window.registered_after(xid[: sc["registered"]]) is not None
    assert discarded == any(i in sc["running"] for i in range(sc["registered"]))
    for i in range(len(txns) + 1):
        if i == sc["low"]:
            window.watermark("low")
        if i == sc["high"]:
            window.watermark("high")
            if not discarded:
                for (key,), (_k, value) in window.remaining():
                    consumer[int(key)] = int(value)  # op r: an upsert
        if i == len(txns):
            break
        apply(truth, txns[i])
        apply(consumer, txns[i])  # the streamed events carry the full new rows
        if i >= sc["registered"]:
            kind, ops = txns[i]
            if kind == "truncate":
                window.truncate(xid[i])
            else:
                window.change(xid[i], [(f"{k:03d}",) for k, _ in ops])
    if discarded:
        return
    covered = [
        k for k in range(-1, 13) if (after is None or k > after) and (not full or k <= chosen[-1])
    ]
    assert {k: consumer.get(k) for k in covered} == {k: truth.get(k) for k in covered}


# --------------------------------------------------------------------------- DDL detection


def relation(*columns: tuple[str, int, int], name: str = "t") -> m.Relation:
    return m.Relation(
        None,
        42,
        "public",
        name,
        m.ReplicaIdentity.DEFAULT,
        tuple(m.RelationColumn(n, t, mod, n == "id") for n, t, mod in columns),
    )


def test_compare_relations_with_literal_messages() -> None:
    old = relation(("id", 23, -1), ("qty", 23, -1), ("note", 1043, 24))
    assert not compare_relations(old, old).changed
    new = relation(("id", 23, -1), ("qty", 20, -1), ("note", 1043, 44), ("c", 25, -1))
    diff = compare_relations(old, new)
    assert diff.added == ("c",) and diff.retyped == ("qty", "note") and diff.dropped == ()
    assert diff.describe() == "added c; retyped qty, note"
    gone = compare_relations(old, relation(("id", 23, -1), name="u"))
    assert gone.dropped == ("qty", "note") and gone.renamed_table == ("public.t", "public.u")


def col(
    attnum: int,
    name: str,
    type_oid: int = 23,
    typmod: int = -1,
    missing: bool = False,
    version: str = "700",
) -> ColumnFacts:
    type_name = {23: "integer", 20: "bigint", 25: "text", 1043: f"character varying({typmod - 4})"}
    return ColumnFacts(
        attnum, name, type_oid, typmod, type_name.get(type_oid, "?"), missing, version
    )


BASE = TableSignature(
    1,
    "public",
    "items",
    5000,
    (col(1, "id"), col(2, "qty"), col(3, "note", 1043, 24)),
    (EnumFacts(90, "mood", ("sad", "ok", "happy")),),
)


def changed(filenode: int = 5000, **kw: Any) -> TableSignature:
    return dataclasses.replace(BASE, filenode=filenode, **kw)


@pytest.mark.parametrize(
    ("what", "new", "reasons"),
    [
        ("nothing", BASE, []),
        (
            "ADD COLUMN … DEFAULT 'x' (a missing value, no rewrite)",
            changed(columns=(*BASE.columns, col(4, "c", 25, missing=True, version="801"))),
            ["column c added with a default"],
        ),
        (
            "ADD COLUMN … DEFAULT random() (rewrite)",
            changed(5001, columns=(*BASE.columns, col(4, "r", 25, version="801"))),
            ["column r added, table rewritten (volatile default)"],
        ),
        (
            "ADD COLUMN without a default: old rows hold NULL",
            changed(columns=(*BASE.columns, col(4, "c", 25, version="801"))),
            [],
        ),
        (
            "ALTER COLUMN qty TYPE bigint USING …",
            changed(
                5001, columns=(BASE.columns[0], col(2, "qty", 20, version="802"), BASE.columns[2])
            ),
            ["column qty changed type from integer to bigint"],
        ),
        (
            "ALTER COLUMN qty TYPE integer USING qty + 1 (same type, rewrite)",
            changed(5001, columns=(BASE.columns[0], col(2, "qty", version="802"), BASE.columns[2])),
            ["column qty altered with a table rewrite"],
        ),
        (
            "varchar(20) → varchar(40): no rewrite, values kept",
            changed(columns=(*BASE.columns[:2], col(3, "note", 1043, 44, version="803"))),
            [],
        ),
        (
            "VACUUM FULL / CLUSTER / TRUNCATE: rewrite, no column touched",
            changed(5001),
            [],
        ),
        (
            "RENAME COLUMN note TO remark",
            changed(columns=(*BASE.columns[:2], col(3, "remark", 1043, 24, version="804"))),
            ["column note renamed to remark"],
        ),
        (
            "ALTER TYPE mood RENAME VALUE 'ok' TO 'fine'",
            changed(enums=(EnumFacts(90, "mood", ("sad", "fine", "happy")),)),
            ["enum mood: label(s) 'ok' renamed"],
        ),
        (
            "ALTER TYPE mood ADD VALUE 'meh': no row changes",
            changed(enums=(EnumFacts(90, "mood", ("sad", "ok", "meh", "happy")),)),
            [],
        ),
        (
            "ALTER TABLE items RENAME TO goods",
            changed(table="goods"),
            ["table renamed from public.items (its rows go to a new topic)"],
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_resnapshot_reasons_per_ddl(what: str, new: TableSignature, reasons: list[str]) -> None:
    assert resnapshot_reasons(BASE, new) == reasons, what


def test_signatures_round_trip() -> None:
    other = changed(columns=(col(1, "id"),), enums=())
    sigs = {1: BASE, 7: dataclasses.replace(other, oid=7)}
    assert signatures_from_bytes(signatures_to_bytes(sigs)) == sigs
    with pytest.raises(ValueError, match="version"):
        signatures_from_bytes(b'{"version": 9}')


# --------------------------------------------------------------------------- WHERE


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("id <= 10", "\"id\" <= '10'"),
        ("Site = 'plant-1' and qty > -2.5e3", "\"site\" = 'plant-1' AND \"qty\" > '-2.5e3'"),
        ("\"Mixed Case\" != 'it''s'", "\"Mixed Case\" <> 'it''s'"),
        ("note IS NOT NULL AND m is null", '"note" IS NOT NULL AND "m" IS NULL'),
        ("id in (1, 2,3) AND flag = TRUE", "\"id\" IN ('1', '2', '3') AND \"flag\" = 'true'"),
        ("id NOT IN ('a')", "\"id\" NOT IN ('a')"),
        ("id between 5 and 9 and qty < 3", "\"id\" BETWEEN '5' AND '9' AND \"qty\" < '3'"),
    ],
)
def test_where_accepts_the_restricted_form(text: str, canonical: str) -> None:
    clause = parse_where(text)
    assert clause.text() == canonical
    assert parse_where(clause.text()) == clause


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("id = 1 or id = 2", "OR is not supported"),
        ("id = 1; drop table t", "unexpected '; drop table' at character 7"),
        ("lower(name) = 'a'", "expected an operator"),
        ("id = (select 1)", "expected a value"),
        ("id = 1 and", "ends too early"),
        ("id not = 3", "expected IN after NOT"),
        ("id in (1 2)", "expected ',' or ')'"),
        ("id = 1 -- comment", "unexpected '--"),
        ("and = 1", "expected a column name"),
        ("x" * 5000, "longer than 4000"),
    ],
)
def test_where_rejects_everything_else(text: str, message: str) -> None:
    with pytest.raises(SnapshotRequestError, match="WHERE clause") as info:
        parse_where(text)
    assert message in str(info.value)


identifiers = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=8
)
values = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
conditions = st.one_of(
    st.builds(
        Condition,
        identifiers,
        st.sampled_from(["=", "<>", "<", "<=", ">", ">="]),
        st.tuples(values),
    ),
    st.builds(Condition, identifiers, st.sampled_from(["is null", "is not null"])),
    st.builds(
        Condition,
        identifiers,
        st.sampled_from(["in", "not in"]),
        st.lists(values, min_size=1, max_size=3).map(tuple),
    ),
    st.builds(Condition, identifiers, st.just("between"), st.tuples(values, values)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(conditions, min_size=1, max_size=4))
def test_where_text_round_trips(conds: list[Condition]) -> None:
    clause = WhereClause(tuple(conds))
    assert parse_where(clause.text()) == clause


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_where_never_passes_text_through(text: str) -> None:
    """Whatever is typed, the SQL made from it holds only quoted identifiers, fixed keywords
    and placeholders: every value is a parameter."""
    try:
        clause = parse_where(text)
    except SnapshotRequestError:
        return
    composed, params = where_sql(clause)
    rendered = composed.as_string(None)
    assert sum(len(c.values) for c in clause.conditions) == len(params) == rendered.count("%s")
    stripped = rendered
    for c in clause.conditions:
        stripped = stripped.replace('"' + c.column.replace('"', '""') + '"', "")
    assert set(stripped.replace("%s", "").split()) <= {
        "=",
        "<>",
        "<",
        "<=",
        ">",
        ">=",
        "is",
        "not",
        "null",
        "in",
        "(",
        ",",
        ")",
        "between",
        "and",
        "(,",
        "(%s,",
    } | {"", "()"}, rendered


def test_chunk_query_binds_the_last_key_and_the_where_values() -> None:
    query, params = chunk_query(
        "public",
        "items",
        ["id", "site", "qty"],
        ["site", "id"],
        ("p-1", "7"),
        parse_where("qty > 3"),
        100,
    )
    assert query.as_string(None) == (
        'select "id", "site", "qty" from "public"."items" where ("site", "id") > (%s, %s) '
        'and ("qty" > %s) order by "site", "id" limit 100'
    )
    assert params == ["p-1", "7", "3"]
    first, none = chunk_query("s", "t", ["id"], ["id"], None, None, 5)
    assert first.as_string(None) == 'select "id" from "s"."t" order by "id" limit 5'
    assert none == []


# --------------------------------------------------------------------------- records


def test_watermark_content() -> None:
    mark = Watermark("ab12-3", "high", "public.items")
    assert Watermark.parse(mark.to_json().encode()) == mark
    assert Watermark.parse(b"not json") is None
    assert Watermark.parse(b'{"chunk": "x", "mark": "middle"}') is None


def test_progress_round_trip_and_merging() -> None:
    p = Progress(signal_lsn=99, signal_id=4)
    p.requests.append(SignalRequest(5, "public.items", "id < 3"))
    first = p.add(Job(1, "public.items", "column c added with a default"))
    first.after, first.chunks, first.rows = ("40",), 3, 21
    p.add(Job(1, "public.items", "signal 5", "\"id\" < '3'", signal_id=5))
    again = p.add(Job(1, "public.items", "enum mood: label(s) 'ok' renamed"))
    assert again is first and first.after is None, "a newer reason starts the job over"
    assert first.reason == "column c added with a default; enum mood: label(s) 'ok' renamed"
    assert len(p.jobs) == 2
    assert Progress.from_bytes(p.to_bytes()) == p
    with pytest.raises(ValueError, match="version"):
        Progress.from_bytes(b'{"version": 2}')
