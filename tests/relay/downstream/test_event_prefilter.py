"""The prefix reader of change events (relay/downstream/event_prefilter.py): the columns it
reads equal what the full decode gives, and an insert the decoder drops undecoded
(``EventDecoder.places_nowhere``) is exactly one the rules place nowhere.  The decoder's
full read (by the compiled program of the schema, core/avro_reader.py) gives the same
changes as fastavro's."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.avro_envelope import HEADER_LEN, MAGIC, SchemaRegistry, Source, TableCodec, decode
from core.errors import DecodeError
from core.pg_types import ColumnSpec, MappingCatalog
from relay.downstream.event_decoder import EventDecoder
from relay.downstream.event_prefilter import compile_prefix_reader
from relay.downstream.rules import TableInfo
from relay.downstream.rules_parser import rules_from_mapping

TABLE = "public.jobs"
COLUMNS = [
    ColumnSpec("id", 20, -1, True),  # int8
    ColumnSpec("cost", 1700, (10 << 16 | 2) + 4, False),  # numeric(10,2), before the filters
    ColumnSpec("due", 1082, -1, False),  # date
    ColumnSpec("tech", 25, -1, False),  # text
    ColumnSpec("urgent", 16, -1, False),  # bool
    ColumnSpec("level", 23, -1, False),  # int4
    ColumnSpec("score", 701, -1, False),  # float8
    ColumnSpec("Crew Name", 25, -1, False),  # renamed in Avro
    ColumnSpec("notes", 25, -1, False),
]
NAMES = [c.name for c in COLUMNS]
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
                        "table": TABLE,
                        "match": {"tech": "t"},
                        "filters": [
                            {"column": "urgent", "op": "=", "value": True},
                            {"column": "level", "op": "in", "value": [1, 2]},
                        ],
                    }
                ],
            },
            {
                "name": "crew",
                "parameters": ["c"],
                "claims": {"c": "tech"},
                "table": [{"table": TABLE, "match": {"Crew Name": "c"}}],
            },
        ],
    },
    {TABLE: TableInfo(tuple(NAMES), ("id",))},
)
CODEC = TableCodec(
    db="app",
    schema="public",
    table="jobs",
    columns=COLUMNS,
    catalog=MappingCatalog(),
    unchanged_sentinel=object(),
    warn=lambda _m: None,
    namespace_prefix="p",
)
SOURCE = Source("app", "public", "jobs", 0x2000, 0x2000, 1, 0, 0)

ROWS = st.tuples(
    st.integers(1, 2**40).map(str),
    st.none() | st.decimals(-9999, 9999, places=2, allow_nan=False).map(str),
    st.none() | st.dates().map(lambda d: d.isoformat()),
    st.sampled_from(["t1", "t2", "é ü", "", None]),
    st.none() | st.sampled_from(["t", "f"]),
    st.none() | st.integers(0, 3).map(str),
    st.none() | st.floats(-1e6, 1e6, allow_nan=False).map(repr),
    st.sampled_from([None, None, None, "crew a"]),
    st.none() | st.text(max_size=30),
)


def _registry() -> SchemaRegistry:
    registry = SchemaRegistry()
    assert CODEC.value_schema_json is not None
    registry.add(CODEC.value_schema_json)
    return registry


@settings(max_examples=200, deadline=None)
@given(ROWS, st.sets(st.sampled_from(NAMES[2:8]), min_size=1))
def test_the_prefix_equals_the_full_decode(row: tuple[str | None, ...], wanted: set[str]) -> None:
    registry = _registry()
    _, value = CODEC.encode_change("c", None, list(row), SOURCE, 0)
    reader = compile_prefix_reader(json.loads(CODEC.value_schema_json or ""), sorted(wanted))
    assert reader is not None
    decoded = decode(value, registry)["after"]
    field = {c["pg.name"]: c["name"] for c in _row_fields()}
    assert reader(value) == {w: decoded[field[w]] for w in wanted}
    _, update = CODEC.encode_change("u", None, list(row), SOURCE, 0)
    assert reader(update) is None, "only inserts are read"
    _, with_old = CODEC.encode_change("c", list(row), list(row), SOURCE, 0, before_kind="full")
    assert reader(with_old) is None, "an event with an old row is decoded in full"


def _row_fields() -> list[dict[str, Any]]:
    schema = json.loads(CODEC.value_schema_json or "")
    fields: list[dict[str, Any]] = schema["fields"][1]["type"][1]["fields"]
    return fields


def test_no_reader_for_decimals_or_unknown_columns() -> None:
    schema = json.loads(CODEC.value_schema_json or "")
    assert compile_prefix_reader(schema, ["cost"]) is None
    assert compile_prefix_reader(schema, ["nope"]) is None
    assert compile_prefix_reader(schema, []) is None
    assert compile_prefix_reader({"type": "record", "name": "x", "fields": []}, ["id"]) is None


@settings(max_examples=200, deadline=None)
@given(ROWS, st.sampled_from(["c", "u", "r"]))
def test_dropped_inserts_are_exactly_those_placed_nowhere(
    row: tuple[str | None, ...], op: str
) -> None:
    decoder = EventDecoder(_registry(), RULES)
    _, value = CODEC.encode_change(op, None, list(row), SOURCE, 0)
    change = decoder.change(value)
    assert change.row is not None
    nowhere = not RULES.buckets_for_row(TABLE, change.row)
    assert decoder.places_nowhere(value, TABLE) == (nowhere and op == "c")


@settings(max_examples=100, deadline=None)
@given(ROWS, st.sampled_from(["c", "u", "r"]), st.booleans())
def test_the_decoder_reads_by_program_as_fastavro_does(
    row: tuple[str | None, ...], op: str, full_before: bool
) -> None:
    """EventDecoder reads an event by its schema's program (core/avro_reader.py) or by
    fastavro: the same RowChange either way (renamed columns, decimals, old keys)."""
    registry = _registry()
    before = [str(int(row[0] or 1) + 1), *row[1:]] if full_before else None
    kind = "full" if full_before else "key"
    _, value = CODEC.encode_change(op, before, list(row), SOURCE, 0, before_kind=kind)
    by_program = EventDecoder(registry, RULES, by_program=True)
    by_fastavro = EventDecoder(registry, RULES, by_program=False)
    got = by_program.change(value, (7, 1))
    assert repr(got) == repr(by_fastavro.change(value, (7, 1)))
    assert by_program._programs[bytes(value[2:HEADER_LEN])] is not None
    assert got.row is not None and "Crew Name" in got.row


def test_decoder_errors_name_the_schema_or_the_fingerprint() -> None:
    registry = _registry()
    row = ["5", "1.50", None, "t1", "t", "1", None, None, "n"]
    _, value = CODEC.encode_change("c", None, row, SOURCE, 0)
    decoder = EventDecoder(registry, RULES, by_program=True)
    with pytest.raises(DecodeError, match=f"schema {CODEC.value_fingerprint.hex()}"):
        decoder.change(value[:-3], (5, 2))
    with pytest.raises(DecodeError, match="unknown Avro schema fingerprint"):
        decoder.change(MAGIC + b"\x00" * 8 + value[HEADER_LEN:], (5, 3))
    with pytest.raises(DecodeError, match="not Avro single-object"):
        decoder.change(b"\x00\x00" + value[2:], (5, 4))


def test_the_decoder_reads_by_program_where_the_reader_is_compiled() -> None:
    """By default the programs are used only where core/avro_reader.py is compiled (as
    Python they cost about what fastavro does)."""
    from core import avro_reader
    from devtools import compiled

    built = compiled.status().state == "compiled"
    assert avro_reader.compiled() is built
    assert EventDecoder(_registry(), RULES).by_program is built
