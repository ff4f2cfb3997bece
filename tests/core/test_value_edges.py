"""Values at the edges of their PostgreSQL types, as value literals: a ``real`` read from
its text is the float4 the change events carry; the intake's checks take ``numeric(p,s)``
wider than Python's default 28 digits and every date PostgreSQL has; the device's journal
triggers keep a ``double precision`` to 17 significant digits."""

from __future__ import annotations

import json
import sqlite3
import struct
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.pg_type_mapping import column_codec
from core.pg_types import ColumnSpec, MappingCatalog
from core.pg_values import parse_float4
from core.values import ColumnType, Kind, coerce_value
from device_agent.local_db import k_key, key_k, kind_of, to_sql
from device_agent.local_tables import LocalTable, key_expr
from device_agent.triggers import _row_json


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0.1", 0.10000000149011612),
        ("16777217", 16777216.0),
        ("3.4028235e+38", 3.4028234663852886e38),
        ("1e-45", 1.401298464324817e-45),
        ("-0", -0.0),
        ("Infinity", float("inf")),
    ],
)
def test_a_real_is_read_as_the_float4_it_is(text: str, value: float) -> None:
    got = parse_float4(text)
    assert got == value and struct.pack("<d", got) == struct.pack("<d", value)
    # what the change event's Avro float carries, read back
    assert struct.unpack("<f", struct.pack("<f", got))[0] == got


def test_cdc_and_the_applier_read_real_columns_as_float4() -> None:
    def convert(oid: int, text: str) -> object:
        return column_codec(
            ColumnSpec("c", oid, -1, False), MappingCatalog(), lambda _m: None
        ).convert(text)

    assert convert(700, "0.1") == 0.10000000149011612
    assert convert(701, "0.1") == 0.1
    assert convert(1021, "{0.1,NULL}") == [0.10000000149011612, None]  # real[]


def test_numeric_wider_than_28_digits_is_in_range() -> None:
    n38 = ColumnType(Kind.DECIMAL, "numeric(38,0)", precision=38, scale=0)
    assert coerce_value(n38, "12345678901234567890123456789") == "12345678901234567890123456789"
    assert coerce_value(n38, "9" * 38) == "9" * 38
    with pytest.raises(ValueError, match=r"out of range for numeric\(38,0\)"):
        coerce_value(n38, "1" + "0" * 38)
    n40_5 = ColumnType(Kind.DECIMAL, "numeric(40,5)", precision=40, scale=5)
    assert coerce_value(n40_5, "1234567890123456789012345678901234.123456") == (
        "1234567890123456789012345678901234.12346"
    )


def test_every_date_postgresql_has_is_in_range() -> None:
    date = ColumnType(Kind.DATE, "date")
    assert coerce_value(date, 2_145_042_905) == 2_145_042_905  # 5874897-12-31
    assert coerce_value(date, -2_440_588) == -2_440_588  # 4714-11-24 BC
    for beyond in (2_145_042_906, -2_440_589):
        with pytest.raises(ValueError):
            coerce_value(date, beyond)


@pytest.mark.parametrize(
    "value",
    [0.30000000000000004, 1 / 3, 123456789.12345678, 0.1, 3.0, 1e16, 5e-324, 1.5e-300, -2.5],
)
def test_journal_triggers_keep_a_double_exactly(value: float) -> None:
    table = LocalTable(1, "public.t", "t", ("id", "f", "s"), ("id",), ("all",), {})
    conn = sqlite3.connect(":memory:")
    conn.execute("create table t (id, f, s)")
    conn.execute("insert into t values (1, ?, 'x')", (value,))
    text = conn.execute(f"select {_row_json(table, 't')} from t").fetchone()[0]
    row = orjson.loads(text)
    assert row == {"id": 1, "f": value, "s": "x"} and isinstance(row["f"], float)
    assert json.loads(text)["f"] == value


def test_journal_triggers_write_the_largest_double_as_a_finite_number() -> None:
    table = LocalTable(1, "public.t", "t", ("f",), ("f",), ("all",), {})
    conn = sqlite3.connect(":memory:")
    conn.execute("create table t (f)")
    conn.execute("insert into t values (?)", (1.7976931348623157e308,))
    row = orjson.loads(conn.execute(f"select {_row_json(table, 't')} from t").fetchone()[0])
    # SQLite formats doubles above ~1e220 within one unit in the last place
    assert row["f"] == pytest.approx(1.7976931348623157e308, rel=1e-15)


finite = st.floats(allow_nan=False, allow_infinity=False, width=64).filter(lambda f: abs(f) < 1e200)
key_parts = st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=6), st.booleans(), finite)


@settings(max_examples=300, deadline=None)
@given(st.lists(key_parts, min_size=2, max_size=4))
def test_a_composite_key_is_named_alike_by_the_triggers_and_the_agent(key: list[Any]) -> None:
    """The triggers compute ``k`` in SQL from the stored row, the agent from the wire key:
    they must agree, and ``k`` must give the wire key back, with floats and booleans too."""
    columns = tuple(f"c{i}" for i in range(len(key)))
    table = LocalTable(1, "public.t", "t", columns, columns, ("all",), {})
    conn = sqlite3.connect(":memory:")
    conn.execute(f"create table t ({', '.join(columns)})")
    conn.execute(f"insert into t values ({', '.join('?' * len(key))})", [to_sql(v) for v in key])
    in_sql = conn.execute(f"select {key_expr(table, 't')} from t").fetchone()[0]
    assert in_sql == key_k(key)
    kinds = [kind_of(v) for v in key]
    back = k_key(key_k(key), kinds)
    assert back == key and [type(v) for v in back] == [type(v) for v in key]


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("[0:1]={7,8}", None),  # an array literal with bounds decides nothing
        ("[1:1][0:1]={{1,2}}", None),
        ("[0:1]", "text"),
        ("[not an array", "text"),
        ([1, 2], "json"),
        ({"a": 1}, "json"),
        (True, "bool"),
        (1, "int"),
        (1.5, "float"),
        ("x", "text"),
    ],
)
def test_kind_of(value: Any, kind: str | None) -> None:
    assert kind_of(value) == kind
