"""Three-way merge and conflict policies: config validation, every policy, the defined
row-level results, and properties (non-conflicting columns applied, identity, counters
commute)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.hlc import Hlc
from core.journal_format import Op
from core.journal_outcomes import OutcomeKind
from core.values import ColumnType, Kind
from relay.errors import ConflictsError
from relay.upstream.conflict_policies import (
    ColumnPolicy,
    Policy,
    TablePolicy,
    conflicts_from_mapping,
    load_conflicts,
)
from relay.upstream.merge import Action, EditTimes, counter_value, merge
from tests.schemas import EXAMPLE_CONFLICTS

TEXT = ColumnType(Kind.TEXT, "text")
INT = ColumnType(Kind.INT, "int4", 32)
TYPES: dict[str, dict[str, ColumnType]] = {
    "public.work_orders": {
        "id": ColumnType(Kind.INT, "int8"),
        "site": TEXT,
        "technician": TEXT,
        "status": TEXT,
        "due": ColumnType(Kind.DATE, "date"),
        "cost": ColumnType(Kind.DECIMAL, "numeric(10,2)", precision=10, scale=2),
        "notes": TEXT,
        "updated_at": ColumnType(Kind.TIMESTAMPTZ, "timestamptz"),
    },
    "public.site_stock": {"site": TEXT, "part_id": TEXT, "qty": INT},
    "public.parts": {"id": TEXT, "name": TEXT},
}
WO = TYPES["public.work_orders"]


# --------------------------------------------------------------------------- config


def test_example_file_loads_and_matches_the_example_schema() -> None:
    policies = load_conflicts(EXAMPLE_CONFLICTS, TYPES)
    wo = policies.table("public.work_orders")
    assert wo.policy is Policy.LWW and wo.time_column == "updated_at" and wo.timed
    status = wo.column("status")
    assert status.policy is Policy.PRECEDENCE and status.order[0] == "cancelled"
    assert status.fallback is Policy.LWW
    assert wo.column("notes").policy is Policy.ASK
    assert wo.column("site").policy is Policy.LWW  # the table's policy
    assert policies.table("public.site_stock").column("qty").policy is Policy.COUNTER
    assert policies.table("public.parts").policy is Policy.SERVER_WINS  # [default]
    assert not policies.table("public.parts").timed


@pytest.mark.parametrize(
    ("data", "where", "message"),
    [
        ({"tables": []}, "", "tables is not a known key (did you mean 'table'?)"),
        ({"default": {"policy": "newest"}}, "[default]", "'newest' is not a policy"),
        ({"default": {"policy": "counter"}}, "[default]", "'counter' is not a policy here"),
        ({"table": [{"table": "work_orders"}]}, "table #1", '"schema.table"'),
        (
            {"table": [{"table": "public.t", "policy": "precedence"}]},
            "table 'public.t'",
            "precedence",
        ),
        (
            {"table": [{"table": "public.t", "columns": {"qty": "countr"}}]},
            "table 'public.t'",
            "columns.qty.policy 'countr' is not a policy here (did you mean 'counter'?)",
        ),
        (
            {"table": [{"table": "public.t", "columns": {"s": {"policy": "precedence"}}}]},
            "table 'public.t'",
            "columns.s.order must be a non-empty array",
        ),
        (
            {"table": [{"table": "public.t", "columns": {"s": {"policy": "lww", "order": ["a"]}}}]},
            "table 'public.t'",
            "only for policy 'precedence'",
        ),
        (
            {
                "table": [
                    {
                        "table": "public.t",
                        "columns": {"s": {"policy": "precedence", "order": ["a", "a"]}},
                    }
                ]
            },
            "table 'public.t'",
            "twice",
        ),
        (
            {"table": [{"table": "public.t"}, {"table": "public.t"}]},
            "table 'public.t'",
            "listed twice",
        ),
        (
            {"table": [{"table": "public.t", "colour": 1}]},
            "table 'public.t'",
            "colour is not a known key",
        ),
    ],
)
def test_structural_problems_name_file_table_and_key(
    data: dict[str, Any], where: str, message: str
) -> None:
    with pytest.raises(ConflictsError) as info:
        conflicts_from_mapping(data, "conf.toml")
    text = str(info.value)
    assert text.startswith("conf.toml: ")
    assert where in text and message in text, text


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"table": "public.work_order"},
            "'public.work_order' is not a known table (did you mean 'public.work_orders'?)",
        ),
        (
            {"table": "public.work_orders", "columns": {"stauts": "ask"}},
            "columns.stauts 'stauts' is not a column of public.work_orders (did you mean 'status'?)",
        ),
        (
            {"table": "public.work_orders", "columns": {"notes": "counter"}},
            "counter' needs a numeric column; notes is text",
        ),
        (
            {"table": "public.work_orders", "time_column": "due"},
            "time_column 'due' is a date column",
        ),
    ],
)
def test_schema_problems_name_table_and_column(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConflictsError) as info:
        conflicts_from_mapping({"table": [table]}, "conf.toml", TYPES)
    assert str(info.value).startswith("conf.toml: ") and message in str(info.value)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConflictsError, match="does not exist"):
        load_conflicts(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[table]\n")
    with pytest.raises(ConflictsError, match="not valid TOML"):
        load_conflicts(bad)


# --------------------------------------------------------------------------- merging

NOW = 1_700_000_000_000
DEVICE_T = Hlc(NOW - 1_000, 0, "dev-a")


def times(
    server: Hlc | int | None = NOW - 60_000, device: Hlc = DEVICE_T, skew: int = 5_000
) -> EditTimes:
    return EditTimes(device, server, NOW, skew)


def table(policy: Policy = Policy.SERVER_WINS, **columns: ColumnPolicy) -> TablePolicy:
    return TablePolicy("public.work_orders", policy, columns)


BASE = {"id": 7, "site": "s1", "technician": "t42", "status": "open", "cost": "1.00", "notes": "a"}


def upd(
    policy: TablePolicy,
    new: dict[str, Any],
    server: dict[str, Any] | None = None,
    t: EditTimes | None = None,
    old: dict[str, Any] | None = None,
) -> Any:
    srv = dict(BASE) if server is None else server
    return merge(Op.UPDATE, policy, WO, ("id",), old or BASE, srv, {**new}, t or times())


def test_unchanged_server_takes_the_device_values() -> None:
    r = upd(table(), {"notes": "b", "status": "done"})
    assert r.outcome is OutcomeKind.APPLIED and r.action is Action.UPDATE
    assert r.values == {"notes": "b", "status": "done"}
    assert r.columns == {"notes": "device", "status": "device"}
    assert r.row == {**BASE, "notes": "b", "status": "done"}


def test_disjoint_changes_merge_without_conflict() -> None:
    r = upd(table(), {"notes": "b"}, {**BASE, "status": "done"})
    assert r.outcome is OutcomeKind.APPLIED and r.row == {**BASE, "notes": "b", "status": "done"}


def test_same_change_on_both_sides_is_equal() -> None:
    r = upd(table(Policy.ASK), {"notes": "b"}, {**BASE, "notes": "b"})
    assert (
        r.outcome is OutcomeKind.APPLIED
        and r.action is Action.NONE
        and r.columns == {"notes": "equal"}
    )


@pytest.mark.parametrize(
    ("policy", "server_time", "winner"),
    [
        (Policy.SERVER_WINS, NOW - 60_000, "server"),
        (Policy.CLIENT_WINS, NOW - 60_000, "device"),
        (Policy.LWW, NOW - 60_000, "device"),  # device edited after the server
        (Policy.LWW, NOW - 10, "server"),
        (Policy.LWW, DEVICE_T.physical_ms, "server"),  # a tie goes to the server
        (Policy.LWW, None, "device"),  # unknown server time counts as oldest
        (Policy.FWW, NOW - 60_000, "server"),
        (Policy.FWW, NOW - 10, "device"),
        (Policy.LWW, Hlc(DEVICE_T.physical_ms, 0, "dev-b"), "server"),  # "dev-a" < "dev-b"
        (Policy.LWW, Hlc(DEVICE_T.physical_ms - 1, 9, "dev-b"), "device"),
    ],
)
def test_conflict_policies(policy: Policy, server_time: Hlc | int | None, winner: str) -> None:
    r = upd(table(policy), {"notes": "device"}, {**BASE, "notes": "server"}, times(server_time))
    assert r.columns == {"notes": winner}
    assert r.row["notes"] == winner
    # the device's edit in full: applied; the server kept a column: merged
    assert r.outcome is (OutcomeKind.APPLIED if winner == "device" else OutcomeKind.MERGED)


def test_device_clock_in_the_future_is_clamped() -> None:
    future = Hlc(NOW + 3_600_000, 0, "dev-a")
    # the server wrote 1 s from now (its clock is ahead too): the clamped device time (now + 5 s) still wins
    assert upd(
        table(Policy.LWW), {"notes": "d"}, {**BASE, "notes": "s"}, times(NOW + 1_000, future)
    ).columns == {"notes": "device"}
    # but a server version written 10 s from now beats the clamped device time
    assert upd(
        table(Policy.LWW), {"notes": "d"}, {**BASE, "notes": "s"}, times(NOW + 10_000, future)
    ).columns == {"notes": "server"}


def test_ask_holds_the_column_and_applies_the_rest() -> None:
    r = upd(table(Policy.ASK), {"notes": "device", "status": "done"}, {**BASE, "notes": "server"})
    assert r.outcome is OutcomeKind.CONFLICT
    assert r.values == {"status": "done"}
    assert r.held == {"notes": {"base": "a", "server": "server", "device": "device"}}
    assert r.columns == {"notes": "held", "status": "device"}


@pytest.mark.parametrize(
    ("device", "server", "winner"),
    [
        ("cancelled", "completed", "device"),
        ("completed", "cancelled", "server"),
        ("in_progress", "completed", "server"),
        ("weird", "completed", "server"),  # unlisted values rank lowest
        ("completed", "weird", "device"),
    ],
)
def test_precedence(device: str, server: str, winner: str) -> None:
    cp = ColumnPolicy(
        Policy.PRECEDENCE, ("cancelled", "completed", "in_progress"), Policy.SERVER_WINS
    )
    r = upd(table(status=cp), {"status": device}, {**BASE, "status": server})
    assert r.columns == {"status": winner}


def test_precedence_tie_uses_the_fallback() -> None:
    cp = ColumnPolicy(Policy.PRECEDENCE, ("cancelled",), Policy.CLIENT_WINS)
    r = upd(table(status=cp), {"status": "x"}, {**BASE, "status": "y"})
    assert r.columns == {"status": "device"} and r.row["status"] == "x"


def test_counter_adds_deltas() -> None:
    cp = ColumnPolicy(Policy.COUNTER)
    # base 1.00, server moved to 3.00 (+2), device to 1.50 (+0.5) → 3.50
    r = upd(table(cost=cp), {"cost": "1.50"}, {**BASE, "cost": "3.00"})
    assert (
        r.values == {"cost": "3.50"}
        and r.columns == {"cost": "combined"}
        and r.outcome is OutcomeKind.MERGED
    )
    # server unchanged: the device value
    r = upd(table(cost=cp), {"cost": "0.25"})
    assert r.values == {"cost": "0.25"} and r.columns == {"cost": "device"}


def test_counter_value_kinds_and_nulls() -> None:
    assert counter_value(INT, 5, 7, 4) == 6
    assert counter_value(INT, None, 7, 4) == 11
    assert counter_value(ColumnType(Kind.FLOAT, "float8"), 1.0, 2.5, 2.0) == 3.5
    assert counter_value(ColumnType(Kind.NUMERIC, "numeric"), "1", "2.5", "1.25") == "2.75"
    assert counter_value(INT, 1, "NaN", 2) is None


# ---- row-level results


def test_insert_of_a_new_key() -> None:
    new = {"id": 8, "site": "s", "status": "open"}
    r = merge(Op.INSERT, table(), WO, ("id",), None, None, new, times())
    assert r.outcome is OutcomeKind.APPLIED and r.action is Action.INSERT and r.values == new


def test_insert_of_an_existing_key_merges_column_by_column() -> None:
    same = merge(
        Op.INSERT, table(), WO, ("id",), None, dict(BASE), {"id": 7, "notes": "a"}, times()
    )
    assert same.outcome is OutcomeKind.APPLIED and same.action is Action.NONE
    r = merge(
        Op.INSERT,
        table(Policy.CLIENT_WINS),
        WO,
        ("id",),
        None,
        dict(BASE),
        {"id": 7, "notes": "x"},
        times(),
    )
    assert (
        r.outcome is OutcomeKind.MERGED
        and r.values == {"notes": "x"}
        and "already existed" in r.message
    )
    kept = merge(
        Op.INSERT, table(), WO, ("id",), None, dict(BASE), {"id": 7, "notes": "x"}, times()
    )
    assert (
        kept.outcome is OutcomeKind.MERGED
        and kept.action is Action.NONE
        and kept.columns == {"notes": "server"}
    )


@pytest.mark.parametrize(
    ("policy", "server_time", "action", "outcome"),
    [
        (Policy.SERVER_WINS, None, Action.NONE, OutcomeKind.MERGED),
        (Policy.CLIENT_WINS, None, Action.INSERT, OutcomeKind.MERGED),
        (Policy.LWW, NOW, Action.NONE, OutcomeKind.MERGED),  # deletion time unknown: now
        (Policy.LWW, Hlc(NOW - 9_000, 0, "dev-b"), Action.INSERT, OutcomeKind.MERGED),
        (Policy.ASK, None, Action.NONE, OutcomeKind.CONFLICT),
    ],
)
def test_update_of_a_deleted_row(
    policy: Policy, server_time: Any, action: Action, outcome: OutcomeKind
) -> None:
    r = merge(Op.UPDATE, table(policy), WO, ("id",), BASE, None, {"notes": "b"}, times(server_time))
    assert (r.action, r.outcome) == (action, outcome)
    if action is Action.INSERT:
        assert r.values == {**BASE, "notes": "b"}
    if outcome is OutcomeKind.CONFLICT:
        assert r.held_row == {"server": None, "device": {**BASE, "notes": "b"}}


def test_delete_of_a_missing_row_is_done() -> None:
    r = merge(Op.DELETE, table(Policy.ASK), WO, ("id",), BASE, None, None, times())
    assert r.outcome is OutcomeKind.APPLIED and r.action is Action.NONE and r.row is None


def test_delete_of_an_unchanged_row() -> None:
    r = merge(
        Op.DELETE, table(Policy.ASK), WO, ("id",), BASE, {**BASE, "updated_at": 5}, None, times()
    )
    assert r.outcome is OutcomeKind.APPLIED and r.action is Action.DELETE


@pytest.mark.parametrize(
    ("policy", "action", "outcome"),
    [
        (Policy.SERVER_WINS, Action.NONE, OutcomeKind.MERGED),
        (Policy.CLIENT_WINS, Action.DELETE, OutcomeKind.MERGED),
        (Policy.LWW, Action.DELETE, OutcomeKind.MERGED),  # the delete is later than the server edit
        (Policy.ASK, Action.NONE, OutcomeKind.CONFLICT),
    ],
)
def test_delete_vs_update(policy: Policy, action: Action, outcome: OutcomeKind) -> None:
    server = {**BASE, "status": "done"}
    r = merge(Op.DELETE, table(policy), WO, ("id",), BASE, server, None, times())
    assert (r.action, r.outcome) == (action, outcome)
    assert "status" in r.message
    if outcome is OutcomeKind.CONFLICT:
        assert r.held_row == {"server": server, "device": None}


# --------------------------------------------------------------------------- properties

COLUMNS = ("a", "b", "c", "d")
PROP_TYPES = {c: INT for c in COLUMNS}
values = st.integers(-3, 3)
rows = st.fixed_dictionaries({c: values for c in COLUMNS})
policies = st.sampled_from(
    [Policy.LWW, Policy.FWW, Policy.SERVER_WINS, Policy.CLIENT_WINS, Policy.ASK, Policy.COUNTER]
)
column_policies = st.fixed_dictionaries({c: policies for c in COLUMNS})
server_times = st.one_of(st.none(), st.integers(NOW - 5_000, NOW + 5_000))


def prop_table(cps: dict[str, Policy]) -> TablePolicy:
    return TablePolicy("public.t", Policy.LWW, {c: ColumnPolicy(p) for c, p in cps.items()})


def prop_merge(
    cps: dict[str, Policy],
    base: dict[str, Any],
    server: dict[str, Any],
    new: dict[str, Any],
    st_: Any,
) -> Any:
    row_base = {"k": 1, **base}
    return merge(
        Op.UPDATE,
        prop_table(cps),
        PROP_TYPES,
        ("k",),
        row_base,
        {"k": 1, **server},
        new,
        times(st_),
    )


@given(column_policies, rows, rows, rows, server_times)
def test_columns_the_server_did_not_change_take_the_device_value(
    cps: dict[str, Policy],
    base: dict[str, Any],
    server: dict[str, Any],
    device: dict[str, Any],
    st_: Any,
) -> None:
    r = prop_merge(cps, base, server, device, st_)
    assert r.row is not None
    for c in COLUMNS:
        if server[c] == base[c]:
            assert r.row[c] == device[c]
        if device[c] == base[c]:
            assert r.row[c] == server[c]  # the device did not write it


@given(column_policies, rows, rows, server_times)
def test_merge_onto_an_unchanged_server_row_is_the_device_row(
    cps: dict[str, Policy], base: dict[str, Any], device: dict[str, Any], st_: Any
) -> None:
    r = prop_merge(cps, base, base, device, st_)
    assert r.row == {"k": 1, **device}
    assert r.outcome is OutcomeKind.APPLIED


@given(column_policies, rows, rows, rows, server_times)
def test_server_wins_and_client_wins_are_what_they_say(
    cps: dict[str, Policy],
    base: dict[str, Any],
    server: dict[str, Any],
    device: dict[str, Any],
    st_: Any,
) -> None:
    r = prop_merge(cps, base, server, device, st_)
    for c in COLUMNS:
        both = server[c] != base[c] and device[c] != base[c]
        if both and cps[c] in (Policy.SERVER_WINS, Policy.ASK):
            assert r.row[c] == server[c]
        if both and cps[c] is Policy.CLIENT_WINS:
            assert r.row[c] == device[c]
    assert (r.outcome is OutcomeKind.CONFLICT) == bool(r.held)


@given(
    st.integers(-100, 100), st.integers(-100, 100), st.integers(-100, 100), st.integers(-100, 100)
)
def test_counter_merges_commute(base: int, server: int, a: int, b: int) -> None:
    """Two devices' counter edits of the same base give the same total in either order."""
    tp = TablePolicy("public.t", Policy.LWW, {"n": ColumnPolicy(Policy.COUNTER)})
    types = {"n": INT}

    def apply(current: int, new: int) -> int:
        r = merge(
            Op.UPDATE,
            tp,
            types,
            ("k",),
            {"k": 1, "n": base},
            {"k": 1, "n": current},
            {"n": new},
            times(),
        )
        assert r.row is not None
        return int(r.row["n"])

    assert (
        apply(apply(server, a), b) == apply(apply(server, b), a) == server + (a - base) + (b - base)
    )


@given(
    st.sampled_from([Policy.LWW, Policy.FWW]),
    st.integers(NOW - 10_000, NOW + 10_000),
    st.integers(NOW - 10_000, NOW + 10_000),
)
def test_lww_and_fww_pick_opposite_sides(policy: Policy, device_ms: int, server_ms: int) -> None:
    t = EditTimes(Hlc(device_ms, 0, "d"), server_ms, NOW, 60_000)
    r = upd(table(policy), {"notes": "device"}, {**BASE, "notes": "server"}, t)
    later = device_ms > server_ms
    expected = (
        ("device" if later else "server")
        if policy is Policy.LWW
        else ("server" if later else "device")
    )
    assert r.columns == {"notes": expected}
