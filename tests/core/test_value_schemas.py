"""The one reader of change-event value schemas (core.value_schemas): what cdc writes reads
back as its columns, key and types; the rules where the relay engine, the journal and replay
used to read differently."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.avro_envelope import TableCodec
from core.errors import SchemaError
from core.pg_types import ColumnSpec, MappingCatalog, TypeInfo, TypeKind
from core.value_schemas import (
    column_types_from_schemas,
    key_schema_columns,
    read_value_schema,
    read_value_schemas,
)
from core.values import ColumnType, Kind

DOMAIN_DATE = 16500
CATALOG = MappingCatalog([TypeInfo(DOMAIN_DATE, "due_date", "app", TypeKind.DOMAIN, 1082)])

# oid → (kind, temporal kind or None)
TYPES: dict[int, tuple[Kind, str | None]] = {
    16: (Kind.BOOL, None),
    20: (Kind.INT, None),
    23: (Kind.INT, None),
    25: (Kind.TEXT, None),
    701: (Kind.FLOAT, None),
    1082: (Kind.DATE, "date"),
    1083: (Kind.TIME, "time"),
    1114: (Kind.TIMESTAMP, "timestamp"),
    1184: (Kind.TIMESTAMPTZ, "timestamptz"),
    1186: (Kind.INTERVAL, None),
    1700: (Kind.NUMERIC, None),
    2950: (Kind.UUID, None),
    3802: (Kind.JSON, None),
    1182: (Kind.ARRAY, None),  # date[]: an array, not a temporal column
    DOMAIN_DATE: (Kind.DATE, "date"),
}


def codec(columns: list[ColumnSpec], table: str = "things") -> TableCodec:
    return TableCodec(
        db="appdb",
        schema="public",
        table=table,
        columns=columns,
        catalog=CATALOG,
        unchanged_sentinel=object(),
        warn=lambda _m: None,
        namespace_prefix="fs",
    )


def value_schema(c: TableCodec) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(c.value_schema_json)
    return parsed


NAMES = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(NAMES, st.sampled_from(sorted(TYPES)), st.booleans()),
        min_size=1,
        max_size=8,
        unique_by=lambda t: t[0],
    )
)
def test_what_cdc_writes_reads_back_as_its_columns_key_and_types(
    cols: list[tuple[str, int, bool]],
) -> None:
    specs = [ColumnSpec(name, oid, -1, key) for name, oid, key in cols]
    c = codec(specs)
    found = read_value_schema(value_schema(c))
    assert found is not None
    assert found.qualified == "public.things"
    assert found.names == tuple(name for name, _, _ in cols)
    assert found.fields == c.field_names
    assert found.key == tuple(name for name, _, key in cols if key)
    assert found.key_fields == c.key_field_names
    assert found.renames() == dict(zip(c.field_names, found.names, strict=True))
    assert {n: t.kind for n, t in found.types().items()} == {
        name: TYPES[oid][0] for name, oid, _ in cols
    }
    assert found.temporal == tuple(
        (name, TYPES[oid][1]) for name, oid, _ in cols if TYPES[oid][1] is not None
    )


def test_types_carry_labels_bits_and_elements() -> None:
    c = codec(
        [
            ColumnSpec("id", 20, -1, True),
            ColumnSpec("small", 21, -1, False),
            ColumnSpec("due", DOMAIN_DATE, -1, False),
            ColumnSpec("days", 1182, -1, False),
            ColumnSpec("cost", 1700, ((10 << 16) | 2) + 4, False),
        ]
    )
    types = column_types_from_schemas([c.value_schema_json])["public.things"]
    assert types["id"] == ColumnType(Kind.INT, "int8", 64)
    assert types["small"] == ColumnType(Kind.INT, "int2", 16)
    assert types["due"] == ColumnType(Kind.DATE, "date")  # a domain reads as its base type
    assert types["days"] == ColumnType(Kind.ARRAY, "date[]", element=ColumnType(Kind.DATE, "date"))
    assert types["cost"] == ColumnType(Kind.DECIMAL, "numeric(10,2)", precision=10, scale=2)


def test_the_row_record_may_be_defined_in_after_and_referenced_from_before() -> None:
    """Rule: the Row is the record type of before/after with named references resolved (the
    journal's rule).  The engine and replay used to look only for a record written inline in
    ``before``, and read such a schema as no table at all."""
    c = codec([ColumnSpec("id", 23, -1, True), ColumnSpec("when", 1184, -1, False)])
    written = value_schema(c)
    fields = {f["name"]: f for f in written["fields"]}
    row = next(b for b in fields["before"]["type"] if isinstance(b, dict))
    fields["before"]["type"] = ["null", row["name"]]
    fields["after"]["type"] = ["null", row]
    swapped = {**written, "fields": [fields[f["name"]] for f in written["fields"]]}
    assert read_value_schema(swapped) == read_value_schema(written)
    assert read_value_schema(swapped) is not None


def test_a_column_is_temporal_only_when_its_own_type_is() -> None:
    """Rule: a column's type is its union's first non-null branch (later branches hold
    special values).  The engine used to call a column temporal when *any* branch carried a
    date/time logical type."""
    c = codec([ColumnSpec("id", 23, -1, True), ColumnSpec("note", 25, -1, False)])
    written = value_schema(c)
    row = next(b for b in written["fields"][1]["type"] if isinstance(b, dict))
    note = row["fields"][1]
    note["type"] = ["null", "string", {"type": "int", "logicalType": "date"}]
    found = read_value_schema(written)
    assert found is not None
    assert found.types()["note"].kind is Kind.TEXT
    assert found.temporal == ()


def test_other_schemas_are_no_value_schema_and_key_schemas_name_their_columns() -> None:
    c = codec([ColumnSpec("Order ID", 23, -1, True), ColumnSpec("v", 25, -1, False)])
    assert c.key_schema_json is not None
    key = json.loads(c.key_schema_json)
    assert read_value_schema(key) is None
    assert key_schema_columns(key) == {c.key_field_names[0]: "Order ID"}
    assert key_schema_columns(value_schema(c)) is None
    assert read_value_schema({"type": "record", "name": "x.Envelope", "fields": []}) is None
    assert read_value_schema({"type": "record", "name": "Other", "pg.table": "t"}) is None


def test_a_later_schema_of_a_table_wins() -> None:
    old = codec([ColumnSpec("id", 23, -1, True)])
    new = codec([ColumnSpec("id", 23, -1, True), ColumnSpec("extra", 25, -1, False)])
    other = codec([ColumnSpec("k", 25, -1, True)], table="other")
    found = read_value_schemas(
        [old.value_schema_json, json.loads(other.value_schema_json), new.value_schema_json]
    )
    assert sorted(found) == ["public.other", "public.things"]
    assert found["public.things"].names == ("id", "extra")


def test_a_row_field_without_a_name_is_a_schema_error_naming_the_schema() -> None:
    written = value_schema(codec([ColumnSpec("id", 23, -1, True)]))
    row = next(b for b in written["fields"][1]["type"] if isinstance(b, dict))
    del row["fields"][0]["name"]
    with pytest.raises(SchemaError, match=r"fs\.public\.things\.Envelope"):
        read_value_schema(written)
