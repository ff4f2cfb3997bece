"""The compiled Avro reader (core/avro_reader.py) gives what fastavro gives.

Every datum is read three ways: by :func:`core.avro_envelope.decode` (fastavro), by
``core.avro_reader`` as the checkout runs it (the mypyc build where ``python3 dev.py``
compiled it) and by the same module loaded from its ``.py`` source; the values must be
equal down to their types and reprs (a ``Decimal('1.50')`` is not a ``Decimal('1.5')``:
the canonical JSON, and so the bucket checksums, would differ).
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import avro_reader
from core.avro_envelope import HEADER_LEN, decode
from core.avro_schema import strip_logical
from core.errors import DecodeError
from tests.core.test_avro_envelope import (
    ALL_COLUMNS_SPEC,
    ALL_TEXTS,
    PROPERTY_CODEC,
    PROPERTY_REGISTRY,
    SRC,
    TS,
    UNCHANGED,
    UNSCALED,
    amount_text,
    make_codec,
    maybe,
    registry_for,
)
from tests.core.test_pg_types import pg_array_literal

ROOT = Path(__file__).resolve().parents[2]


def _pure_module() -> ModuleType:
    """core/avro_reader.py loaded from its source, whichever build the checkout runs."""
    spec = importlib.util.spec_from_file_location("avro_reader_pure", ROOT / "core/avro_reader.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


PURE = _pure_module()
BUILDS = (avro_reader, PURE)
KEEP = frozenset({"decimal"})


def reads_like_fastavro(value: bytes, registry: Any) -> Any:
    """Read ``value`` (a single-object datum) all three ways; they must agree."""
    expected = decode(value, registry)
    schema = strip_logical(json.loads(registry.schema_json(value[2:HEADER_LEN])), KEEP)
    for build in BUILDS:
        program = build.compile_reader(schema)
        assert program is not None, f"{build.__name__}: no program for the schema"
        got = build.read(program, value, HEADER_LEN)
        assert repr(got) == repr(expected), build.__name__
    return expected


def test_every_mapped_type_in_every_kind_of_event() -> None:
    codec = make_codec(ALL_COLUMNS_SPEC, [])
    reg = registry_for(codec)
    old = list(ALL_TEXTS)
    old[2] = "f"
    events = [
        codec.encode_change("c", None, ALL_TEXTS, SRC, TS),
        codec.encode_change("u", old, ALL_TEXTS, SRC, TS),
        codec.encode_change("d", old, None, SRC, TS),
        codec.encode_change("r", None, ALL_TEXTS, SRC, TS),
    ]
    for key, value in events:
        reads_like_fastavro(value, reg)
        assert key is not None
        reads_like_fastavro(key, reg)
    assert reads_like_fastavro(events[0][1], reg)["after"]["prices"] == [Decimal("1.50"), "NAN"]


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["c", "u", "r"]),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    maybe(st.text(max_size=20)),
    maybe(UNSCALED),
    maybe(st.booleans()),
    maybe(st.lists(st.one_of(st.none(), st.text(max_size=5)), max_size=4)),
    st.booleans(),
)
def test_random_rows_read_like_fastavro(
    op: str, ident: int, title: Any, unscaled: Any, ok: Any, tags: Any, with_before: bool
) -> None:
    def text(value: Any, fmt: Any) -> Any:
        return value if value is None or value is UNCHANGED else fmt(value)

    row = [
        str(ident),
        title,
        text(unscaled, amount_text),
        None,
        text(ok, lambda b: "t" if b else "f"),
        text(tags, pg_array_literal),
    ]
    before = [str(ident ^ 1), None, None, None, None, None] if with_before and op == "u" else None
    _, value = PROPERTY_CODEC.encode_change(op, before, row, SRC, TS)
    reads_like_fastavro(value, PROPERTY_REGISTRY)


GENERIC = {
    "type": "record",
    "name": "Everything",
    "namespace": "test.ns",
    "fields": [
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "b", "type": "bytes"},
        {"name": "mood", "type": {"type": "enum", "name": "Mood", "symbols": ["SAD", "HAPPY"]}},
        {"name": "fx", "type": {"type": "fixed", "name": "Four", "size": 4}},
        {
            "name": "money",
            "type": {
                "type": "fixed",
                "name": "Money",
                "size": 8,
                "logicalType": "decimal",
                "precision": 18,
                "scale": 4,
            },
        },
        {"name": "m", "type": {"type": "map", "values": ["null", "long", "string"]}},
        {"name": "nested", "type": {"type": "array", "items": {"type": "array", "items": "int"}}},
        {"name": "again", "type": ["null", "Mood", "test.ns.Four"]},
        {"name": "last", "type": "long"},
    ],
}
GENERIC_PARSED = fastavro.parse_schema(GENERIC)
LONGS = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


@settings(max_examples=150, deadline=None)
@given(
    st.floats(width=32, allow_nan=False),
    st.floats(allow_nan=False),
    st.binary(max_size=12),
    st.sampled_from(["SAD", "HAPPY"]),
    st.binary(min_size=4, max_size=4),
    st.integers(min_value=-(10**17) + 1, max_value=10**17 - 1),
    st.dictionaries(st.text(max_size=6), st.none() | LONGS | st.text(max_size=6), max_size=4),
    st.lists(st.lists(st.integers(-(1 << 31), (1 << 31) - 1), max_size=3), max_size=3),
    st.none() | st.sampled_from(["SAD", "HAPPY"]) | st.binary(min_size=4, max_size=4),
    LONGS,
)
def test_every_avro_type_reads_like_fastavro(
    f: float,
    d: float,
    b: bytes,
    mood: str,
    fx: bytes,
    unscaled: int,
    m: dict[str, Any],
    nested: list[list[int]],
    again: Any,
    last: int,
) -> None:
    datum = {
        "f": f,
        "d": d,
        "b": b,
        "mood": mood,
        "fx": fx,
        "money": Decimal(unscaled).scaleb(-4),
        "m": m,
        "nested": nested,
        "again": again,
        "last": last,
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, GENERIC_PARSED, datum)
    data = buf.getvalue()
    expected = fastavro.schemaless_reader(io.BytesIO(data), GENERIC_PARSED, None)
    for build in BUILDS:
        program = build.compile_reader(GENERIC)
        assert program is not None
        assert repr(build.read(program, data, 0)) == repr(expected), build.__name__


def test_schemas_it_cannot_read_get_no_program() -> None:
    recursive = {
        "name": "PigValue",
        "type": "record",
        "fields": [{"name": "value", "type": ["null", "int", "long", "PigValue"]}],
    }
    uuid = {"type": "string", "logicalType": "uuid"}
    for build in BUILDS:
        assert build.compile_reader(recursive) is None
        assert build.compile_reader(uuid) is None
        assert build.compile_reader({"type": "no such type"}) is None


def test_malformed_data_is_a_decode_error() -> None:
    _, value = PROPERTY_CODEC.encode_change("c", None, ["7", "x", None, None, "t", None], SRC, TS)
    schema = strip_logical(json.loads(PROPERTY_REGISTRY.schema_json(value[2:HEADER_LEN])), KEEP)
    for build in BUILDS:
        program = build.compile_reader(schema)
        for end in range(HEADER_LEN, len(value)):  # every truncation
            with pytest.raises(DecodeError):
                build.read(program, value[:end], HEADER_LEN)
        with pytest.raises(DecodeError, match="1 trailing bytes"):
            build.read(program, value + b"\x00", HEADER_LEN)
        bad_union = bytearray(value)
        bad_union[HEADER_LEN + 2] = 0x7E  # the union index of "before": 63 of 2 branches
        with pytest.raises(DecodeError, match="union branch 63"):
            build.read(program, bytes(bad_union), HEADER_LEN)
    with pytest.raises(DecodeError, match="varint longer"):
        avro_reader.read(avro_reader.compile_reader("long"), b"\xff" * 11, 0)  # type: ignore[arg-type]
