"""Change-event envelope: fingerprints, single-object encoding, round trips, evolution."""

from __future__ import annotations

import io
import json
import math
from decimal import Decimal
from typing import Any

import fastavro
import fastavro.schema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.errors import DecodeError, SchemaError
from core.avro_binary import encode_long
from core.avro_envelope import (
    MAGIC,
    POSITION_HEADER,
    SchemaRegistry,
    Source,
    TableCodec,
    decode,
    parse_position_header,
    position_header,
)
from core.avro_schema import (
    avro_field_names,
    avro_name,
    fingerprint,
    parsing_canonical_form,
    table_namespace,
)
from core.pg_types import ColumnSpec, MappingCatalog, TypeInfo, TypeKind
from tests.core.test_pg_types import numeric_typmod, pg_array_literal, pg_timestamp

UNCHANGED = object()
CATALOG = MappingCatalog([TypeInfo(16390, "mood", "app", TypeKind.ENUM)])
SRC = Source(
    db="appdb",
    schema="public",
    table="orders",
    lsn=0x16B374D848,
    commit_lsn=0x16B374D900,
    txid=74321,
    seq=3,
    commit_ts_us=1732860000123456,
    snapshot="false",
    origin=None,
)
TS = 1732860000999999


def make_codec(
    columns: list[tuple[str, int, int, bool]],
    warnings: list[str] | None = None,
    table: str = "orders",
    **kw: Any,
) -> TableCodec:
    sink = warnings if warnings is not None else []
    return TableCodec(
        db="appdb",
        schema="public",
        table=table,
        columns=[ColumnSpec(*c) for c in columns],
        catalog=CATALOG,
        unchanged_sentinel=UNCHANGED,
        warn=sink.append,
        **kw,
    )


def registry_for(*codecs: TableCodec) -> SchemaRegistry:
    reg = SchemaRegistry()
    for c in codecs:
        reg.add(c.value_schema_json)
        if c.key_schema_json is not None:
            reg.add(c.key_schema_json)
    return reg


def fastavro_bytes(data: bytes, registry: SchemaRegistry) -> bytes:
    """The same datum written by fastavro: our encoder must produce identical bytes."""
    fp = data[2:10]
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, registry.reader_schema(fp), decode(data, registry))
    return MAGIC + fp + buf.getvalue()


# ---------------------------------------------------------------------------------------
# Fingerprints and header
# ---------------------------------------------------------------------------------------

# From the Avro project's share/test/data/schema-tests.txt (signed 64-bit values).
SPEC_VECTORS = [
    ('"null"', 7195948357588979594),
    ('"boolean"', -6970731678124411036),
    ('{"type":"int"}', 8247732601305521295),
    ('"long"', -3434872931120570953),
    ('"float"', 5583340709985441680),
    ('"double"', -8181574048448539266),
    ('"bytes"', 5746618253357095269),
    ('"string"', -8142146995180207161),
    ("[  ]", -1241056759729112623),
    ('[ "int"  ]', -5232228896498058493),
    ('[ "int" , {"type":"boolean"} ]', 5392556393470105090),
    ('{"fields":[], "type":"record", "name":"foo"}', -4824392279771201922),
    ('{"fields":[], "type":"record", "name":"foo", "namespace":"x.y"}', 5916914534497305771),
    ('{"fields":[], "type":"record", "name":"a.b.foo", "namespace":"x.y"}', -4616218487480524110),
    ('{"fields":[], "type":"record", "name":"foo", "doc":"Useful info"}', -4824392279771201922),
    (
        '{"fields":[{"type":{"type":"boolean"}, "name":"f1"}], "type":"record", "name":"foo"}',
        7843277075252814651,
    ),
    (
        '{ "fields":[{"type":"boolean", "aliases":[], "name":"f1", "default":"true"},'
        '{"order":"descending","name":"f2","doc":"Hello","type":"int"}],'
        '"type":"record", "name":"foo"}',
        -4860222112080293046,
    ),
    ('{"type":"enum", "name":"foo", "symbols":["A1"]}', -6342190197741309591),
    (
        '{"namespace":"x.y.z", "type":"enum", "name":"foo", "doc":"foo bar", "symbols":["A1", "A2"]}',
        -4448647247586288245,
    ),
    ('{"name":"foo","type":"fixed","size":15}', 1756455273707447556),
    (
        '{"namespace":"x.y.z", "type":"fixed", "name":"foo", "doc":"foo bar", "size":32}',
        -3064184465700546786,
    ),
    ('{ "items":{"type":"null"}, "type":"array"}', -589620603366471059),
    ('{ "values":"string", "type":"map"}', -8732877298790414990),
    (
        '{"name":"PigValue","type":"record",'
        '"fields":[{"name":"value", "type":["null", "int", "long", "PigValue"]}]}',
        -1759257747318642341,
    ),
]


@pytest.mark.parametrize(("schema", "expected"), SPEC_VECTORS)
def test_fingerprint_matches_avro_spec_vectors(schema: str, expected: int) -> None:
    assert fingerprint(schema) == (expected & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
    assert fingerprint(json.loads(schema)) == fingerprint(schema)


def test_single_object_header_of_int_schema() -> None:
    # The Avro project's own test of the single-object header.
    assert MAGIC + fingerprint("int") == bytes.fromhex("c3018f5c393f1ad57572")


def test_fingerprint_agrees_with_fastavro_for_envelope_schemas() -> None:
    c = make_codec(ALL_COLUMNS_SPEC)
    for schema_json, fp in [
        (c.value_schema_json, c.value_fingerprint),
        (c.key_schema_json, c.key_fingerprint),
    ]:
        pcf = fastavro.schema.to_parsing_canonical_form(json.loads(schema_json or ""))
        assert fp == bytes.fromhex(fastavro.schema.fingerprint(pcf, "CRC-64-AVRO"))
        assert parsing_canonical_form(schema_json) == pcf


def test_invalid_schema_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="not a valid Avro schema"):
        fingerprint({"type": "record", "name": "x"})


# ---------------------------------------------------------------------------------------
# A table with every mapped type
# ---------------------------------------------------------------------------------------

# (name, oid, typmod, is_key, text, decoded value)
ALL_COLUMNS: list[tuple[str, int, int, bool, str | None, Any]] = [
    ("id", 20, -1, True, "9007199254740993", 9007199254740993),
    ("region", 25, -1, True, "eu-west", "eu-west"),
    ("flag", 16, -1, False, "t", True),
    ("small", 21, -1, False, "-32768", -32768),
    ("count", 23, -1, False, "2147483647", 2147483647),
    ("oid_col", 26, -1, False, "4294967295", 4294967295),
    ("ratio", 700, -1, False, "0.1", pytest.approx(0.1)),
    ("score", 701, -1, False, "-Infinity", -math.inf),
    ("amount", 1700, numeric_typmod(12, 4), False, "-12345678.9012", Decimal("-12345678.9012")),
    ("amount_nan", 1700, numeric_typmod(12, 4), False, "NaN", "NAN"),
    (
        "exact",
        1700,
        -1,
        False,
        "3.14159265358979323846264338327950288",
        "3.14159265358979323846264338327950288",
    ),
    ("label", 1043, 20, False, "h\u00e9llo", "h\u00e9llo"),
    ("code", 1042, 7, False, "ab ", "ab "),
    ("payload", 17, -1, False, "\\x00ff10", b"\x00\xff\x10"),
    ("born", 1082, -1, False, "0044-03-15 BC", -735160),
    ("forever", 1082, -1, False, "infinity", "INFINITY"),
    ("alarm", 1083, -1, False, "24:00:00", 86400000000),
    ("alarm_tz", 1266, -1, False, "12:00:00+05:30", "12:00:00+05:30"),
    ("local_ts", 1114, -1, False, "2000-01-01 00:00:00.5", 946684800500000),
    ("at", 1184, -1, False, "0044-03-15 12:00:00+05:53:28 BC", -63517802008000000),
    ("until", 1184, -1, False, "-infinity", "NEG_INFINITY"),
    ("span", 1186, -1, False, "-1 days +02:00:00", {"months": 0, "days": -1, "micros": 7200000000}),
    (
        "uid",
        2950,
        -1,
        False,
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    ),
    ("doc", 3802, -1, False, '{"a": [1, "x"]}', '{"a": [1, "x"]}'),
    ("raw_json", 114, -1, False, '{"b":1}', '{"b":1}'),
    ("mood", 16390, -1, False, "happy", "happy"),
    ("grid", 1007, -1, False, "{{1,NULL},{3,4}}", [[1, None], [3, 4]]),
    ("names", 1009, -1, False, '{"a b","c\\"d",NULL,"NULL"}', ["a b", 'c"d', None, "NULL"]),
    ("prices", 1231, numeric_typmod(6, 2), False, "{1.50,NaN}", [Decimal("1.50"), "NAN"]),
    ("days", 1182, -1, False, "{infinity,1970-01-02}", ["INFINITY", 1]),
    ("shifted", 1007, -1, False, "[0:1]={7,8}", "[0:1]={7,8}"),
    ("nothing", 25, -1, False, None, None),
    ("rng", 3904, -1, False, "[1,5)", "[1,5)"),
]
ALL_COLUMNS_SPEC = [(n, o, t, k) for n, o, t, k, _v, _d in ALL_COLUMNS]
ALL_TEXTS = [v for *_x, v, _d in ALL_COLUMNS]
ALL_DECODED = {n: d for n, *_x, d in ALL_COLUMNS}


def test_insert_round_trip_of_every_type() -> None:
    warnings: list[str] = []
    c = make_codec(ALL_COLUMNS_SPEC, warnings)
    assert len(warnings) == 1 and "'rng'" in warnings[0]
    reg = registry_for(c)
    key, value = c.encode_change("c", None, ALL_TEXTS, SRC, TS)
    assert value[:10] == MAGIC + c.value_fingerprint
    assert key is not None and c.key_fingerprint is not None
    assert key[:10] == MAGIC + c.key_fingerprint
    event = decode(value, reg)
    assert event["op"] == "c"
    assert event["before"] is None and event["before_kind"] is None
    assert event["after"] == ALL_DECODED
    assert event["unchanged"] == []
    assert event["source"] == {
        "db": "appdb",
        "schema": "public",
        "table": "orders",
        "lsn": SRC.lsn,
        "commit_lsn": SRC.commit_lsn,
        "txid": 74321,
        "seq": 3,
        "commit_ts_us": 1732860000123456,
        "snapshot": "false",
        "origin": None,
    }
    assert event["ts_us"] == TS
    assert decode(key, reg) == {"id": 9007199254740993, "region": "eu-west"}
    assert fastavro_bytes(value, reg) == value
    assert fastavro_bytes(key, reg) == key


def test_value_schema_fields_and_properties() -> None:
    c = make_codec(ALL_COLUMNS_SPEC)
    schema = json.loads(c.value_schema_json)
    assert schema["name"] == "fieldsync.public.orders.Envelope"
    assert [f["name"] for f in schema["fields"]] == [
        "op",
        "before",
        "before_kind",
        "after",
        "unchanged",
        "source",
        "ts_us",
    ]
    row = schema["fields"][1]["type"][1]
    assert row["name"] == "fieldsync.public.orders.Row"
    assert schema["fields"][3]["type"] == ["null", "fieldsync.public.orders.Row"]
    amount = next(f for f in row["fields"] if f["name"] == "amount")
    assert amount["pg.type"] == "numeric(12,4)"
    assert amount["pg.name"] == "amount" and amount["default"] is None
    assert all(f["type"][0] == "null" for f in row["fields"])
    key = json.loads(c.key_schema_json or "")
    assert key["name"] == "fieldsync.public.orders.Key"
    assert [f["name"] for f in key["fields"]] == ["id", "region"]
    assert c.key_field_names == ("id", "region")
    assert SchemaRegistry().add(c.value_schema_json) == c.value_fingerprint


def test_update_with_key_and_full_old_tuples() -> None:
    c = make_codec(ALL_COLUMNS_SPEC)
    reg = registry_for(c)
    old_key = ["1", "eu-west"] + [None] * (len(ALL_TEXTS) - 2)
    for kind, expected in [("key", "key"), ("K", "key"), ("full", "full"), ("O", "full")]:
        before = old_key if expected == "key" else ALL_TEXTS
        key, value = c.encode_change("u", before, ALL_TEXTS, SRC, TS, before_kind=kind)
        event = decode(value, reg)
        assert event["before_kind"] == expected
        assert event["before"]["id"] == (1 if expected == "key" else 9007199254740993)
        assert event["after"] == ALL_DECODED
        assert decode(key or b"", reg)["id"] == 9007199254740993  # the new key
        assert fastavro_bytes(value, reg) == value


def test_delete_takes_key_from_before() -> None:
    c = make_codec(ALL_COLUMNS_SPEC)
    reg = registry_for(c)
    before = ["42", "us"] + [None] * (len(ALL_TEXTS) - 2)
    key, value = c.encode_change("d", before, None, SRC, TS)
    event = decode(value, reg)
    assert event["op"] == "d" and event["after"] is None and event["before_kind"] == "key"
    assert decode(key or b"", reg) == {"id": 42, "region": "us"}


def test_snapshot_read_and_truncate() -> None:
    c = make_codec(ALL_COLUMNS_SPEC)
    reg = registry_for(c)
    cases: list[tuple[str | bool, str]] = [(True, "true"), ("last", "last"), (False, "false")]
    for snapshot, text in cases:
        src = Source("appdb", "public", "orders", 5, 5, None, 0, None, snapshot, "device-7")
        _key, value = c.encode_change("r", None, ALL_TEXTS, src, TS)
        event = decode(value, reg)
        assert event["op"] == "r"
        assert event["source"]["snapshot"] == text
        assert event["source"]["txid"] is None and event["source"]["commit_ts_us"] is None
        assert event["source"]["origin"] == "device-7"
        assert fastavro_bytes(value, reg) == value
    value = c.encode_truncate(SRC, TS)
    event = decode(value, reg)
    assert event["op"] == "t"
    assert event["before"] is None and event["after"] is None and event["unchanged"] == []
    assert fastavro_bytes(value, reg) == value


def test_unchanged_toast_is_null_and_listed() -> None:
    c = make_codec(ALL_COLUMNS_SPEC)
    reg = registry_for(c)
    after: list[object] = list(ALL_TEXTS)
    after[ALL_COLUMNS_SPEC.index(("doc", 3802, -1, False))] = UNCHANGED
    after[ALL_COLUMNS_SPEC.index(("label", 1043, 20, False))] = UNCHANGED
    after[ALL_COLUMNS_SPEC.index(("flag", 16, -1, False))] = None  # a real NULL
    _key, value = c.encode_change("u", None, after, SRC, TS)
    event = decode(value, reg)
    assert event["unchanged"] == ["label", "doc"]
    assert event["after"]["doc"] is None and event["after"]["label"] is None
    assert event["after"]["flag"] is None and "flag" not in event["unchanged"]
    assert fastavro_bytes(value, reg) == value


def test_unchanged_key_column_uses_old_key_or_fails_clearly() -> None:
    c = make_codec([("k", 25, -1, True), ("v", 25, -1, False)])
    reg = registry_for(c)
    key, _value = c.encode_change("u", ["old", None], [UNCHANGED, "x"], SRC, TS)
    assert decode(key or b"", reg) == {"k": "old"}
    with pytest.raises(SchemaError, match="key column 'k' was not sent"):
        c.encode_change("u", None, [UNCHANGED, "x"], SRC, TS)


def test_table_without_key_columns_has_null_kafka_key() -> None:
    c = make_codec([("a", 23, -1, False), ("b", 25, -1, False)])
    assert c.key_schema is None and c.key_schema_json is None and c.key_fingerprint is None
    key, value = c.encode_change("c", None, ["1", "x"], SRC, TS)
    assert key is None
    assert decode(value, registry_for(c))["after"] == {"a": 1, "b": "x"}


def test_bytes_and_memoryview_values_are_decoded_as_utf8() -> None:
    c = make_codec([("k", 20, -1, True), ("t", 25, -1, False)])
    _key, value = c.encode_change("c", None, [b"7", memoryview("\u20ac".encode())], SRC, TS)
    assert decode(value, registry_for(c))["after"] == {"k": 7, "t": "\u20ac"}


def test_float_specials_survive() -> None:
    c = make_codec([("f", 701, -1, False), ("g", 700, -1, False)])
    _key, value = c.encode_change("c", None, ["NaN", "-0"], SRC, TS)
    after = decode(value, registry_for(c))["after"]
    assert math.isnan(after["f"])
    assert after["g"] == 0.0 and math.copysign(1.0, after["g"]) == -1.0


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def test_bad_value_names_table_column_and_type() -> None:
    c = make_codec([("k", 20, -1, True), ("when", 1184, -1, False)])
    with pytest.raises(SchemaError, match=r"public\.orders\.when \(timestamptz\).*'yesterday'"):
        c.encode_change("c", None, ["1", "yesterday"], SRC, TS)
    with pytest.raises(SchemaError, match=r"public\.orders\.k \(int8\)"):
        c.encode_change("c", None, ["99999999999999999999", None], SRC, TS)
    with pytest.raises(SchemaError, match="unexpected value type int"):
        c.encode_change("c", None, [1, None], SRC, TS)


def test_out_of_range_value_is_named() -> None:
    c = make_codec([("n", 23, -1, False)])
    with pytest.raises(SchemaError, match=r"public\.orders\.n \(int4\).*range of an Avro int"):
        c.encode_change("c", None, ["2147483648"], SRC, TS)


def test_shape_errors() -> None:
    c = make_codec([("k", 20, -1, True)])
    with pytest.raises(SchemaError, match="after tuple has 2 values, the relation has 1"):
        c.encode_change("c", None, ["1", "2"], SRC, TS)
    with pytest.raises(ValueError, match="unknown op 'x'"):
        c.encode_change("x", None, ["1"], SRC, TS)
    with pytest.raises(ValueError, match="needs an after row"):
        c.encode_change("u", ["1"], None, SRC, TS)
    with pytest.raises(ValueError, match="needs a before row"):
        c.encode_change("d", None, None, SRC, TS)
    with pytest.raises(ValueError, match="before_kind"):
        c.encode_change("u", ["1"], ["1"], SRC, TS, before_kind="half")
    with pytest.raises(DecodeError, match="unchanged TOAST"):
        c.encode_change("d", [UNCHANGED], None, SRC, TS)
    bad_src = Source("d", "s", "t", 1, 1, None, 0, None, "maybe", None)
    with pytest.raises(ValueError, match="snapshot"):
        c.encode_change("c", None, ["1"], bad_src, TS)


def test_decode_errors_name_the_problem() -> None:
    c = make_codec([("k", 20, -1, True)])
    reg = registry_for(c)
    _key, value = c.encode_change("c", None, ["1"], SRC, TS)
    with pytest.raises(DecodeError, match="too short"):
        decode(value[:9], reg)
    with pytest.raises(DecodeError, match="starts with c302"):
        decode(b"\xc3\x02" + value[2:], reg)
    with pytest.raises(DecodeError, match=f"unknown Avro schema fingerprint {value[2:10].hex()}"):
        decode(value, SchemaRegistry())
    with pytest.raises(DecodeError, match="trailing bytes"):
        decode(value + b"\x00", reg)
    with pytest.raises(DecodeError, match="cannot decode"):
        decode(value[:-3], reg)
    with pytest.raises(DecodeError, match="unknown Avro schema fingerprint 0000000000000000"):
        reg.get(bytes(8))


def test_registry_lookups() -> None:
    c = make_codec([("k", 20, -1, True)])
    reg = SchemaRegistry([c.value_schema_json])
    assert c.value_fingerprint in reg and len(reg) == 1
    assert reg.schema_json(c.value_fingerprint) == c.value_schema_json
    assert reg.get(c.value_fingerprint)["name"] == "fieldsync.public.orders.Envelope"
    assert c.key_fingerprint not in reg


# ---------------------------------------------------------------------------------------
# Schema evolution
# ---------------------------------------------------------------------------------------


def test_altered_table_gets_new_fingerprint_and_old_events_stay_readable() -> None:
    v1 = make_codec([("id", 20, -1, True), ("name", 25, -1, False)])
    v2 = make_codec([("id", 20, -1, True), ("name", 25, -1, False), ("due", 1082, -1, False)])
    assert v1.value_fingerprint != v2.value_fingerprint
    assert v1.key_fingerprint == v2.key_fingerprint  # key bytes stay stable
    reg = registry_for(v1, v2)
    _k1, old = v1.encode_change("c", None, ["1", "a"], SRC, TS)
    _k2, new = v2.encode_change("c", None, ["2", "b", "2024-01-02"], SRC, TS)
    assert decode(old, reg)["after"] == {"id": 1, "name": "a"}
    assert decode(new, reg)["after"] == {"id": 2, "name": "b", "due": 19724}


@pytest.mark.parametrize(
    ("before_type", "after_type"),
    [
        ((1114, -1), (1184, -1)),  # timestamp -> timestamptz
        ((1700, numeric_typmod(10, 2)), (1700, numeric_typmod(12, 4))),
        ((1700, numeric_typmod(10, 2)), (1700, -1)),
        ((23, -1), (1082, -1)),  # int4 -> date
        ((1082, -1), (1114, -1)),
        ((1186, -1), (25, -1)),
    ],
)
def test_type_changes_that_change_meaning_change_the_fingerprint(
    before_type: tuple[int, int], after_type: tuple[int, int]
) -> None:
    a = make_codec([("k", 20, -1, True), ("v", *before_type, False)])
    b = make_codec([("k", 20, -1, True), ("v", *after_type, False)])
    assert a.value_fingerprint != b.value_fingerprint


def test_sanitized_names_keep_originals_and_decode() -> None:
    c = make_codec(
        [("Order ID", 20, -1, True), ("Order_ID", 25, -1, False), ("1st", 25, -1, False)],
        table="Line Items",
    )
    schema = json.loads(c.value_schema_json)
    assert schema["name"] == "fieldsync.public.Line_Items.Envelope"
    assert schema["pg.table"] == "Line Items"
    row = schema["fields"][1]["type"][1]
    names = [f["name"] for f in row["fields"]]
    assert names[1:] == ["Order_ID", "_1st"]
    assert names[0].startswith("Order_ID_") and len(names[0]) == len("Order_ID_") + 8
    assert [f["pg.name"] for f in row["fields"]] == ["Order ID", "Order_ID", "1st"]
    reg = registry_for(c)
    key, value = c.encode_change("c", None, ["1", "x", "y"], SRC, TS)
    assert decode(value, reg)["after"] == {names[0]: 1, "Order_ID": "x", "_1st": "y"}
    assert decode(key or b"", reg) == {names[0]: 1}


def test_avro_names() -> None:
    assert avro_name("ok_Name1") == "ok_Name1"
    assert avro_name("e-mail") == "e_mail"
    assert avro_name("9lives") == "_9lives"
    assert avro_name("") == "_"
    assert avro_name("gr\u00f6\u00dfe") == "gr__e"
    names = ["a-b", "a_b", "c d", "c.d", "x"]
    out = avro_field_names(names)
    assert out[1] == "a_b" and out[4] == "x"
    assert len(set(out)) == 5
    assert out[0].startswith("a_b_") and out[2].startswith("c_d_") and out[3].startswith("c_d_")
    assert avro_field_names(list(reversed(names))) == list(reversed(out))  # order-independent
    assert avro_field_names(["c d"]) == ["c_d"]
    assert table_namespace("fieldsync", "my schema", "t") == "fieldsync.my_schema.t"
    assert table_namespace("acme.cdc", "public", "t") == "acme.cdc.public.t"


def test_namespace_prefix_names_records() -> None:
    c = make_codec([("k", 20, -1, True)], namespace_prefix="acme")
    schema = json.loads(c.value_schema_json)
    assert schema["name"] == "acme.public.orders.Envelope"
    assert schema["fields"][5]["type"]["name"] == "acme.Source"


# ---------------------------------------------------------------------------------------
# Position header
# ---------------------------------------------------------------------------------------


def test_position_header_layout() -> None:
    assert POSITION_HEADER == "fieldsync.pos"
    assert position_header(0x16B374D848, 3) == bytes.fromhex("00000016b374d8480000000000000003")
    assert parse_position_header(position_header(2**64 - 1, 0)) == (2**64 - 1, 0)
    with pytest.raises(ValueError, match="u64"):
        position_header(-1, 0)
    with pytest.raises(DecodeError, match="16 bytes"):
        parse_position_header(b"\x00" * 15)


U64 = st.integers(min_value=0, max_value=2**64 - 1)


@given(st.tuples(U64, U64), st.tuples(U64, U64))
def test_position_header_order_equals_position_order(
    a: tuple[int, int], b: tuple[int, int]
) -> None:
    ha, hb = position_header(*a), position_header(*b)
    assert (ha < hb) == (a < b) and (ha == hb) == (a == b)
    assert parse_position_header(ha) == a


# ---------------------------------------------------------------------------------------
# Property: random rows survive, and our bytes equal fastavro's
# ---------------------------------------------------------------------------------------

PROPERTY_COLUMNS = [
    ("id", 20, -1, True),
    ("title", 25, -1, False),
    ("amount", 1700, numeric_typmod(14, 3), False),
    ("at", 1184, -1, False),
    ("ok", 16, -1, False),
    ("tags", 1009, -1, False),
]
PROPERTY_CODEC = make_codec(PROPERTY_COLUMNS)
PROPERTY_REGISTRY = registry_for(PROPERTY_CODEC)

UNSCALED = st.integers(min_value=-(10**14) + 1, max_value=10**14 - 1)
MICROS = st.integers(min_value=-210866803200000000, max_value=(1 << 63) - 86_400_000_001)


def amount_text(unscaled: int) -> str:
    digits = str(abs(unscaled)).rjust(4, "0")
    return ("-" if unscaled < 0 else "") + digits[:-3] + "." + digits[-3:]


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.just(UNCHANGED), strategy)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    maybe(st.text(max_size=20)),
    maybe(UNSCALED),
    maybe(MICROS),
    maybe(st.booleans()),
    maybe(st.lists(st.one_of(st.none(), st.text(max_size=5)), max_size=4)),
)
def test_random_rows_round_trip(
    ident: int, title: Any, unscaled: Any, micros: Any, ok: Any, tags: Any
) -> None:
    def text(value: Any, fmt: Any) -> Any:
        return value if value is None or value is UNCHANGED else fmt(value)

    row = [
        str(ident),
        title,
        text(unscaled, amount_text),
        text(micros, lambda m: pg_timestamp(m, 0)),
        text(ok, lambda b: "t" if b else "f"),
        text(tags, pg_array_literal),
    ]
    key, value = PROPERTY_CODEC.encode_change("c", None, row, SRC, TS)
    event = decode(value, PROPERTY_REGISTRY)
    after = event["after"]
    expected_unchanged = [
        n for (n, *_x), v in zip(PROPERTY_COLUMNS, row, strict=True) if v is UNCHANGED
    ]
    assert event["unchanged"] == expected_unchanged
    assert after["id"] == ident
    assert after["title"] == (title if isinstance(title, str) else None)
    assert after["amount"] == (Decimal(unscaled).scaleb(-3) if isinstance(unscaled, int) else None)
    assert after["at"] == (micros if isinstance(micros, int) else None)
    assert after["ok"] == (ok if isinstance(ok, bool) else None)
    assert after["tags"] == (tags if isinstance(tags, list) else None)
    assert decode(key or b"", PROPERTY_REGISTRY) == {"id": ident}
    assert fastavro_bytes(value, PROPERTY_REGISTRY) == value


def _fastavro_long(n: int) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema("long"), n)
    return buf.getvalue()


@settings(max_examples=400, deadline=None)
@given(
    st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.integers(min_value=-(2**29), max_value=2**29)
    | st.sampled_from([2**13, 2**27, 2**41, 2**55, -(2**55) - 1, 2**62])
)
def test_encode_long_matches_fastavro_in_every_varint_length(n: int) -> None:
    """The unrolled varint branches (2, 4, 6, 8 bytes and longer) agree with fastavro."""
    assert encode_long(n) == _fastavro_long(n)


def test_encode_long_rejects_values_outside_int64() -> None:
    with pytest.raises(ValueError, match="outside the range of an Avro long"):
        encode_long(2**63)


sources = st.builds(
    Source,
    db=st.just("appdb"),
    schema=st.just("public"),
    table=st.just("orders"),
    lsn=st.integers(0, 2**63 - 1),
    commit_lsn=st.sampled_from([5, 6, 2**40]),
    txid=st.none() | st.sampled_from([0, 7]),
    seq=st.integers(0, 2**20),
    commit_ts_us=st.none() | st.sampled_from([0, 1732860000123456]),
    snapshot=st.sampled_from(["false", "true", "last", True, False]),
    origin=st.none() | st.sampled_from(["device-7", "pg-origin:x"]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(sources, min_size=1, max_size=8))
def test_source_fields_of_consecutive_events_on_one_codec(srcs: list[Source]) -> None:
    """Per-transaction source fields are encoded once and reused: never for another one."""
    c = make_codec([("id", 20, -1, True)])
    reg = registry_for(c)
    for src in srcs:
        _key, value = c.encode_change("c", None, ["1"], src, TS)
        got = decode(value, reg)["source"]
        snapshot = {True: "true", False: "false"}.get(src.snapshot, src.snapshot)  # type: ignore[call-overload]
        assert got == {
            "db": src.db,
            "schema": src.schema,
            "table": src.table,
            "lsn": src.lsn,
            "commit_lsn": src.commit_lsn,
            "txid": src.txid,
            "seq": src.seq,
            "commit_ts_us": src.commit_ts_us,
            "snapshot": snapshot,
            "origin": src.origin,
        }
