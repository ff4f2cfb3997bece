"""The prefix reader of change events (relay/downstream/event_prefilter.py): the columns it
reads equal what the full decode gives, in the build the checkout runs and from the
module's source alike; an insert the decoder drops undecoded (``EventDecoder.skim``) is
exactly one the rules place nowhere, and the change it makes of an update or a delete from
the key alone plans exactly what the fully decoded change plans.  The decoder's full read
(by the compiled program of the schema, core/avro_reader.py) gives the same changes as
fastavro's."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.avro_envelope import HEADER_LEN, MAGIC, SchemaRegistry, Source, TableCodec, decode
from core.errors import DecodeError
from core.pg_types import ColumnSpec, MappingCatalog
from relay.downstream import event_prefilter
from relay.downstream.bucket_store import RowChange
from relay.downstream.event_decoder import EventDecoder, Skimmed
from relay.downstream.planner import BucketEntry, RowState, plan_changes
from relay.downstream.rules import TableInfo
from relay.downstream.rules_parser import rules_from_mapping
from tests.schemas import REPO

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
UNCHANGED = object()
CODEC = TableCodec(
    db="app",
    schema="public",
    table="jobs",
    columns=COLUMNS,
    catalog=MappingCatalog(),
    unchanged_sentinel=UNCHANGED,
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


def _pure_prefilter() -> ModuleType:
    """relay/downstream/event_prefilter.py loaded from its source, whichever build runs."""
    path = REPO / "relay/downstream/event_prefilter.py"
    spec = importlib.util.spec_from_file_location("event_prefilter_pure", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


BUILDS = (event_prefilter, _pure_prefilter())
"""The module as the checkout runs it (compiled where built) and from its source."""
SCHEMA = json.loads(CODEC.value_schema_json or "")


def _row_fields() -> list[dict[str, Any]]:
    fields: list[dict[str, Any]] = SCHEMA["fields"][1]["type"][1]["fields"]
    return fields


FIELD = {c["pg.name"]: c["name"] for c in _row_fields()}


@settings(max_examples=200, deadline=None)
@given(ROWS, st.sets(st.sampled_from(NAMES[2:8]), min_size=1), st.sampled_from("curd"))
def test_the_prefix_equals_the_full_decode(
    row: tuple[str | None, ...], wanted: set[str], op: str
) -> None:
    before, after = (list(row), None) if op == "d" else (None, list(row))
    _, value = CODEC.encode_change(op, before, after, SOURCE, 0)
    full = decode(value, _registry())
    decoded = full["before" if op == "d" else "after"]
    placement = sorted(wanted)
    for module in BUILDS:
        reader = module.compile_prefix_reader(SCHEMA, placement, ["id"])
        assert reader is not None
        read = {w: decoded[FIELD[w]] for w in [*placement, "id"]}
        source = full["source"]
        tail = (None, None) if op == "c" else (source["commit_ts_us"], source["origin"])
        assert reader(value) == ("u" if op == "r" else op, read, *tail), module.__name__
        inserts = module.compile_prefix_reader(SCHEMA, placement)
        assert inserts is not None
        read = {w: decoded[FIELD[w]] for w in placement}
        expected = ("c", read, None, None) if op == "c" else None
        assert inserts(value) == expected, "no key: inserts only"


OLD_KEY = ["5", *[None] * (len(COLUMNS) - 1)]
"""pgoutput's old tuple of key 5 (REPLICA IDENTITY DEFAULT): the key columns only."""


def test_the_prefix_of_literal_events() -> None:
    row = ["5", "1.50", "2024-01-02", "t1", "t", "2", "2.5", "crew a", "n"]
    source = Source(
        "app", "public", "jobs", 0x2000, 0x2000, 1, 0, 1_765_000_000_000_000, "false", "dev:7"
    )
    events = {
        op: CODEC.encode_change(op, before, after, source, 0)[1]
        for op, before, after in (("c", None, row), ("u", None, row), ("d", OLD_KEY, None))
    }
    wanted = ["Crew Name", "due", "level", "urgent"]
    after = {"Crew Name": "crew a", "due": 19724, "level": 2, "urgent": True, "id": 5}
    old = {"Crew Name": None, "due": None, "level": None, "urgent": None, "id": 5}
    for module in BUILDS:
        reader = module.compile_prefix_reader(SCHEMA, wanted, ["id"])
        assert reader is not None
        assert reader(events["c"]) == ("c", after, None, None)
        assert reader(events["u"]) == ("u", after, 1_765_000_000_000_000, "dev:7")
        assert reader(events["d"]) == ("d", old, 1_765_000_000_000_000, "dev:7")


def test_events_the_prefix_does_not_tell_are_decoded_in_full() -> None:
    row = ["5", "1.50", "2024-01-02", "t1", "t", "2", "2.5", "crew a", "n"]
    toast = [*row[:-1], UNCHANGED]
    moved = ["6", *row[1:]]
    events = [
        CODEC.encode_change("u", None, toast, SOURCE, 0)[1],  # unchanged TOAST: filled in
        CODEC.encode_change("u", moved, row, SOURCE, 0)[1],  # a key change
        CODEC.encode_change("u", row, row, SOURCE, 0, before_kind="full")[1],  # old row
        CODEC.encode_change("c", row, row, SOURCE, 0, before_kind="full")[1],
        CODEC.encode_truncate(SOURCE, 0),
        b"\x00\x00" + CODEC.encode_change("u", None, row, SOURCE, 0)[1][2:],  # no marker
    ]
    for module in BUILDS:
        reader = module.compile_prefix_reader(SCHEMA, ["tech"], ["id"])
        assert reader is not None
        assert [reader(value) for value in events] == [None] * len(events)


def test_no_reader_for_decimals_or_unknown_columns() -> None:
    for module in BUILDS:
        assert module.compile_prefix_reader(SCHEMA, ["cost"]) is None
        assert module.compile_prefix_reader(SCHEMA, ["nope"]) is None
        assert module.compile_prefix_reader(SCHEMA, []) is None
        assert module.compile_prefix_reader(SCHEMA, [], ["id"]) is None
        empty = {"type": "record", "name": "x", "fields": []}
        assert module.compile_prefix_reader(empty, ["id"]) is None


def test_inserts_only_where_the_key_or_the_rest_of_the_row_cannot_be_read() -> None:
    """A decimal key cannot be read; a column after the wanted ones that the reader cannot
    skip (an array) leaves updates and deletes to the full decode."""
    row = ["5", "1.50", "2024-01-02", "t1", "t", "2", "2.5", "crew a", "n"]
    insert, update, delete = (
        CODEC.encode_change(op, before, after, SOURCE, 0)[1]
        for op, before, after in (("c", None, row), ("u", None, row), ("d", OLD_KEY, None))
    )
    with_array = json.loads(CODEC.value_schema_json or "")
    with_array["fields"][1]["type"][1]["fields"].append(
        {"name": "tags", "type": ["null", {"type": "array", "items": "long"}]}
    )
    for module in BUILDS:
        decimal_key = module.compile_prefix_reader(SCHEMA, ["tech"], ["cost"])
        assert decimal_key is not None
        assert decimal_key(insert) == ("c", {"tech": "t1"}, None, None)
        assert decimal_key(update) is None and decimal_key(delete) is None
        arrays = module.compile_prefix_reader(with_array, ["tech"], ["id"])
        assert arrays is not None
        assert arrays(insert) == ("c", {"tech": "t1", "id": 5}, None, None)
        assert arrays(update) is None and arrays(delete) is None


STATES = (
    None,
    RowState((), (3, 0)),  # a tombstone, older
    RowState((), (9, 0)),  # a tombstone, newer: the change is a duplicate
    RowState((BucketEntry('tech["t1"]', 11, 1234),), (3, 0)),  # in a bucket
    RowState((BucketEntry('crew["crew a"]', 12, 5), BucketEntry('tech["t1"]', 13, 6)), (3, 0)),
    RowState((BucketEntry('tech["t1"]', 11, 1234),), (9, 0)),
)


@settings(max_examples=300, deadline=None)
@given(
    ROWS,
    st.sampled_from("curd"),
    st.sampled_from(["none", "same key", "other key", "full"]),
    st.booleans(),
)
def test_skim_changes_plan_what_the_decoded_changes_plan(
    row: tuple[str | None, ...], op: str, old: str, toast: bool
) -> None:
    """``skim`` drops exactly the inserts placed nowhere, and makes a change only of
    updates placed nowhere (no old row, no unchanged column) and of deletes: for every
    remembered state of the row, that change plans what the decoded change plans."""
    after = None if op == "d" else list(row)
    if op in "ur" and toast:  # PostgreSQL sends every column of an insert
        assert after is not None
        after[-1] = UNCHANGED
    other = [str(int(row[0] or 0) + 1), *row[1:]]
    before = {"none": None, "same key": list(row), "other key": other, "full": list(row)}[old]
    if op == "d" and before is None:
        before = list(row)
    kind = "full" if old == "full" else "key"
    kafka_key, value = CODEC.encode_change(op, before, after, SOURCE, 0, before_kind=kind)
    registry = _registry()
    assert CODEC.key_schema_json is not None
    registry.add(CODEC.key_schema_json)
    decoder = EventDecoder(registry, RULES)
    for named_by in (None, kafka_key):  # the rules' key columns, the event's key schema's
        full = decoder.change(value, (7, 1), named_by)
        got = decoder.skim(value, TABLE, (7, 1), named_by)
        _check_skim(row, op, old, toast, full, got)
    unknown = (kafka_key or b"")[:2] + b"\x00" * 8 + (kafka_key or b"")[10:]
    assert decoder.skim(value, TABLE, (7, 1), unknown) is Skimmed.DECODE, "key schema not read"


def _check_skim(
    row: tuple[str | None, ...], op: str, old: str, toast: bool, full: RowChange, got: Any
) -> None:
    simple = old == "none" and not (toast and op in "ur")
    nowhere = full.row is None or not RULES.buckets_for_row(TABLE, full.row)
    if op == "c":
        assert got is (Skimmed.NOWHERE if simple and nowhere else Skimmed.DECODE)
        return
    if op == "d" or (simple and nowhere):
        assert got == full._replace(row=None), "the decoded change without its row"
        assert isinstance(got, RowChange)
        for state in STATES:
            states = {} if state is None else {(TABLE, f"[{row[0]}]"): state}
            assert plan_changes(RULES, [got], states, {}) == plan_changes(RULES, [full], states, {})
    else:
        assert got is Skimmed.DECODE


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
