"""PostgreSQL type mapping: schemas, text-form parsers, arrays, catalog rows.

Expected values of the edge cases were taken from PostgreSQL 15 itself
(``extract(epoch from ...)``, ``date - date '1970-01-01'``, ``float8send``).
"""

from __future__ import annotations

import io
import re
import struct
from decimal import Decimal
from typing import Any

import fastavro
import psycopg
import psycopg.postgres
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.errors import SchemaError
from core.pg_type_mapping import ColumnCodec, column_codec
from core.pg_types import (
    BUILTIN_TYPES,
    CATALOG_QUERY,
    SESSION_SETTINGS,
    ColumnSpec,
    MappingCatalog,
    TypeInfo,
    TypeKind,
    output_function_text,
)
from core.pg_values import parse_array, returns_text_unchanged

EMPTY = MappingCatalog()
INT64_MAX = (1 << 63) - 1


def numeric_typmod(precision: int, scale: int) -> int:
    return ((precision << 16) | (scale & 0x7FF)) + 4


def codec(
    oid: int,
    typmod: int = -1,
    catalog: MappingCatalog = EMPTY,
    warnings: list[str] | None = None,
) -> ColumnCodec:
    sink = warnings if warnings is not None else []
    return column_codec(ColumnSpec("col", oid, typmod, False), catalog, sink.append)


def convert(oid: int, text: str, typmod: int = -1) -> Any:
    return codec(oid, typmod).convert(text)


# ---------------------------------------------------------------------------------------
# PostgreSQL text formatting, for property tests (mirrors PostgreSQL's output functions)
# ---------------------------------------------------------------------------------------


def civil_from_days(z: int) -> tuple[int, int, int]:
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def pg_date(days: int) -> str:
    y, m, d = civil_from_days(days)
    if y <= 0:
        return f"{1 - y:04d}-{m:02d}-{d:02d} BC"
    return f"{y:04d}-{m:02d}-{d:02d}"


def pg_offset(seconds: int) -> str:
    sign = "-" if seconds < 0 else "+"
    h, rest = divmod(abs(seconds), 3600)
    m, s = divmod(rest, 60)
    out = f"{sign}{h:02d}"
    if m or s:
        out += f":{m:02d}"
    if s:
        out += f":{s:02d}"
    return out


def pg_timestamp(micros: int, offset: int | None = None) -> str:
    local = micros + (offset or 0) * 1_000_000
    days, rest = divmod(local, 86_400_000_000)
    secs, frac = divmod(rest, 1_000_000)
    h, rest2 = divmod(secs, 3600)
    m, s = divmod(rest2, 60)
    y, mo, d = civil_from_days(days)
    text = f"{max(y, 1 - y):04d}-{mo:02d}-{d:02d} {h:02d}:{m:02d}:{s:02d}"
    if frac:
        text += f".{frac:06d}".rstrip("0")
    if offset is not None:
        text += pg_offset(offset)
    return text + (" BC" if y <= 0 else "")


def pg_interval(months: int, days: int, micros: int) -> str:
    """PostgreSQL's EncodeInterval, IntervalStyle=postgres."""
    parts: list[str] = []
    state = {"zero": True, "before": False}

    def add(value: int, unit: str) -> None:
        if value == 0:
            return
        plus = "+" if state["before"] and value > 0 else ""
        parts.append(f"{plus}{value} {unit}{'' if value == 1 else 's'}")
        state["before"] = value < 0
        state["zero"] = False

    years = months // 12 if months >= 0 else -(-months // 12)  # C division truncates
    add(years, "year")
    add(months - years * 12, "mon")
    add(days, "day")
    if state["zero"] or micros:
        sign = "-" if micros < 0 else ("+" if state["before"] else "")
        secs, frac = divmod(abs(micros), 1_000_000)
        h, rest = divmod(secs, 3600)
        m, s = divmod(rest, 60)
        text = f"{sign}{h:02d}:{m:02d}:{s:02d}"
        if frac:
            text += f".{frac:06d}".rstrip("0")
        parts.append(text)
    return " ".join(parts)


def pg_bytea_escape(data: bytes) -> str:
    out = []
    for b in data:
        if b == 0x5C:
            out.append("\\\\")
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03o}")
    return "".join(out)


def test_formatters_match_postgresql_samples() -> None:
    # Outputs copied from PostgreSQL 15 (TimeZone=UTC unless an offset is shown).
    assert pg_date(-2440550) == "4713-01-01 BC"
    assert pg_timestamp(-63517802008000000, 5 * 3600 + 53 * 60 + 28) == (
        "0044-03-15 12:00:00+05:53:28 BC"
    )
    assert pg_interval(14, 3, 14706789000) == "1 year 2 mons 3 days 04:05:06.789"
    assert pg_interval(0, -1, 7200000000) == "-1 days +02:00:00"
    assert pg_interval(-14, 3, 0) == "-1 years -2 mons +3 days"
    assert pg_interval(-11, 0, 0) == "-11 mons"
    assert pg_interval(0, 0, 0) == "00:00:00"


# ---------------------------------------------------------------------------------------
# Builtin types and the catalog
# ---------------------------------------------------------------------------------------

REQUIRED_OIDS = [16, 17, 20, 21, 23, 25, 26, 114, 700, 701, 1042, 1043, 1082, 1083]
REQUIRED_OIDS += [1114, 1184, 1186, 1266, 1700, 2950, 3802, 19, 18]


def test_builtin_types_cover_required_types_and_their_arrays() -> None:
    for oid in REQUIRED_OIDS:
        info = BUILTIN_TYPES[oid]
        assert info.kind is TypeKind.BASE and info.namespace == "pg_catalog"
        arrays = [a for a in BUILTIN_TYPES.values() if a.elem_oid == oid]
        assert len(arrays) == 1 and arrays[0].kind is TypeKind.ARRAY
        assert arrays[0].name == "_" + info.name


def test_builtin_oids_agree_with_psycopg_registry() -> None:
    registry = psycopg.postgres.types
    checked = 0
    for oid, info in BUILTIN_TYPES.items():
        if info.kind is not TypeKind.BASE:
            continue
        known = registry.get(oid)
        if known is None:
            continue
        assert known.name.strip('"') == info.name
        assert known.array_oid in BUILTIN_TYPES
        assert BUILTIN_TYPES[known.array_oid].elem_oid == oid
        checked += 1
    assert checked >= 25


def test_every_builtin_type_has_an_exact_mapping() -> None:
    for oid, info in BUILTIN_TYPES.items():
        warnings: list[str] = []
        c = codec(oid, warnings=warnings)
        assert warnings == [], info
        assert c.avro_schema[0] == "null"


def test_type_info_from_catalog_tuple_and_dict_rows() -> None:
    tup = (16396, "money2", "app", "d", 1700, None, numeric_typmod(10, 2))
    info = TypeInfo.from_catalog_row(tup)
    assert info == TypeInfo(16396, "money2", "app", TypeKind.DOMAIN, 1700, None, 655366)
    assert info.qualified_name == "app.money2"
    as_dict = dict(
        zip(
            ["oid", "name", "namespace", "kind", "base_oid", "elem_oid", "base_typmod"],
            tup,
            strict=True,
        )
    )
    assert TypeInfo.from_catalog_row(as_dict) == info
    six = TypeInfo.from_catalog_row((1007, "_int4", "pg_catalog", "a", None, 23))
    assert six.kind is TypeKind.ARRAY and six.elem_oid == 23 and six.base_typmod == -1
    assert six.qualified_name == "_int4"
    assert TypeInfo.from_catalog_row((5, "x", "s", "m", None, None, None)).kind is TypeKind.OTHER
    with pytest.raises(SchemaError, match="without oid"):
        TypeInfo.from_catalog_row((None, None, "s", "b", None, None, None))


def test_catalog_query_has_one_parameter_and_the_documented_columns() -> None:
    assert re.findall(r"%\((\w+)\)s", CATALOG_QUERY) == ["oids"]
    assert "%" not in CATALOG_QUERY.replace("%(oids)s", "")
    for column in ("oid", "name", "namespace", "kind", "base_oid", "elem_oid", "base_typmod"):
        assert f"AS {column}" in CATALOG_QUERY


def test_session_settings_name_the_formats_the_parsers_need() -> None:
    assert SESSION_SETTINGS["DateStyle"].startswith("ISO")
    assert SESSION_SETTINGS["IntervalStyle"] == "postgres"


# ---------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------

SCALAR_CASES: list[tuple[int, int, str, Any]] = [
    (16, -1, "t", True),
    (16, -1, "f", False),
    (21, -1, "-32768", -32768),
    (23, -1, "2147483647", 2147483647),
    (20, -1, "-9223372036854775808", -(1 << 63)),
    (26, -1, "4294967295", 4294967295),
    (25, -1, "h\u00e9llo \u20ac", "h\u00e9llo \u20ac"),
    (1043, 24, "x y", "x y"),
    (1042, 9, "ab   ", "ab   "),
    (19, -1, "pg_class", "pg_class"),
    (18, -1, "\\200", "\\200"),
    (114, -1, '{"b":1, "a":[1,2]}', '{"b":1, "a":[1,2]}'),
    (3802, -1, '{"a": [1, 2], "b": 1}', '{"a": [1, 2], "b": 1}'),
    (2950, -1, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    (1266, -1, "12:00:00+05:30:15", "12:00:00+05:30:15"),
    (17, -1, "\\x0001ff", b"\x00\x01\xff"),
    (17, -1, "\\x", b""),
    (17, -1, "\\000\\001\\\\\\177\\200\\377A", b"\x00\x01\\\x7f\x80\xffA"),  # escape format
    (1082, -1, "2024-02-29", 19782),
    (1082, -1, "1969-12-31", -1),
    (1082, -1, "0001-01-01", -719162),
    (1082, -1, "0001-12-31 BC", -719163),
    (1082, -1, "4713-01-01 BC", -2440550),
    (1082, -1, "10000-03-01", 2932957),
    (1082, -1, "5874897-12-31", 2145042905),
    (1082, -1, "infinity", "INFINITY"),
    (1082, -1, "-infinity", "NEG_INFINITY"),
    (1083, -1, "00:00:00", 0),
    (1083, -1, "12:34:56.5", 45296500000),
    (1083, -1, "24:00:00", 86400000000),
    (1114, -1, "1970-01-01 00:00:00", 0),
    (1114, -1, "2000-01-01 00:00:00.5", 946684800500000),
    (1114, -1, "0001-01-01 00:00:00 BC", -62167219200000000),
    (1114, -1, "4713-01-01 00:00:00 BC", -210863520000000000),
    (1114, -1, "10000-01-01 00:00:00", 253402300800000000),
    (1114, -1, "infinity", "INFINITY"),
    (1184, -1, "2024-01-02 03:04:05.123456+05:30", 1704144845123456),
    (1184, -1, "2000-01-01 00:00:00.5-08", 946713600500000),
    (1184, -1, "1969-12-31 23:59:59.999999+00", -1),
    (1184, -1, "1900-01-01 00:00:00+00:19:32", -2208989972000000),
    (1184, -1, "0044-03-15 12:00:00+05:53:28 BC", -63517802008000000),
    (1184, -1, "4713-11-24 00:19:32+00:19:32 BC", -210835180800000000),
    (1184, -1, "294247-01-10 04:00:54.775807+00", INT64_MAX),
    (1184, -1, "-infinity", "NEG_INFINITY"),
    (
        1186,
        -1,
        "1 year 2 mons 3 days 04:05:06.789",
        {"months": 14, "days": 3, "micros": 14706789000},
    ),
    (1186, -1, "-00:00:01", {"months": 0, "days": 0, "micros": -1000000}),
    (1186, -1, "-1 days +02:00:00", {"months": 0, "days": -1, "micros": 7200000000}),
    (1186, -1, "1 day -02:00:00", {"months": 0, "days": 1, "micros": -7200000000}),
    (1186, -1, "-1 years -2 mons +3 days", {"months": -14, "days": 3, "micros": 0}),
    (1186, -1, "-11 mons", {"months": -11, "days": 0, "micros": 0}),
    (1186, -1, "1 mon -00:00:01", {"months": 1, "days": 0, "micros": -1000000}),
    (1186, -1, "-00:00:00.5", {"months": 0, "days": 0, "micros": -500000}),
    (1186, -1, "178000000 years", {"months": 2136000000, "days": 0, "micros": 0}),
    (1186, -1, "-2562047788:00:54.775807", {"months": 0, "days": 0, "micros": -INT64_MAX}),
    (1186, -1, "00:00:00", {"months": 0, "days": 0, "micros": 0}),
    (1186, -1, "infinity", "INFINITY"),
    (1700, -1, "0.00000000000000000001", "0.00000000000000000001"),
    (1700, -1, "NaN", "NaN"),
    (1700, -1, "-Infinity", "-Infinity"),
    (1700, numeric_typmod(10, 2), "1.50", (150).to_bytes(5, "big", signed=True)),
    (1700, numeric_typmod(10, 2), "-0.50", (-50).to_bytes(5, "big", signed=True)),
    (1700, numeric_typmod(10, 2), "-99999999.99", (-9999999999).to_bytes(5, "big", signed=True)),
    (1700, numeric_typmod(5, 0), "12345", (12345).to_bytes(3, "big", signed=True)),
    (1700, numeric_typmod(10, 2), "NaN", "NAN"),
    (1700, numeric_typmod(3, 5), "0.00123", "0.00123"),
    (1700, numeric_typmod(3, -3), "123000", "123000"),
]


@pytest.mark.parametrize(("oid", "typmod", "text", "expected"), SCALAR_CASES)
def test_text_form_converts_to_expected_datum(
    oid: int, typmod: int, text: str, expected: Any
) -> None:
    assert convert(oid, text, typmod) == expected


@pytest.mark.parametrize(
    ("text", "expected_bits"),
    [
        ("NaN", None),
        ("Infinity", struct.pack(">d", float("inf"))),
        ("-Infinity", struct.pack(">d", float("-inf"))),
        ("1e-310", bytes.fromhex("000012688b70e62b")),
        ("-0", bytes.fromhex("8000000000000000")),
        ("1e+100", bytes.fromhex("54b249ad2594c37d")),
        ("0.1", bytes.fromhex("3fb999999999999a")),
    ],
)
def test_float8_text_forms(text: str, expected_bits: bytes | None) -> None:
    value = convert(701, text)
    if expected_bits is None:
        assert value != value  # NaN
    else:
        assert struct.pack(">d", value) == expected_bits


def test_float4_shortest_text_is_exact_in_avro_float() -> None:
    value = convert(700, "3.4028235e+38")
    assert struct.pack(">f", value) == bytes.fromhex("7f7fffff")
    assert struct.pack(">f", convert(700, "1.4e-45")) == bytes.fromhex("00000001")


@pytest.mark.parametrize(
    ("oid", "typmod", "text", "message"),
    [
        (16, -1, "true", "not a boolean"),
        (1082, -1, "01/02/2024", "DateStyle=ISO"),
        (1114, -1, "2024-01-02 03:04:05+00", "unexpected time zone offset"),
        (1184, -1, "2024-01-02 03:04:05", "without a time zone offset"),
        (1184, -1, "294276-12-31 23:59:59.999999+00", "outside the range of an Avro long"),
        (1083, -1, "12:00:00+01", "unexpected time zone offset"),
        (1186, -1, "@ 1 year", "IntervalStyle=postgres"),
        (1186, -1, "P1Y2M", "IntervalStyle=postgres"),
        (1700, numeric_typmod(10, 2), "1.505", "more than 2 decimal places"),
        (1700, numeric_typmod(3, 0), "12345", "does not fit"),
        (17, -1, "\\9", "bad escape"),
        (1007, -1, "{1,2", "not an array literal"),
        (1007, -1, '{"1,2}', "unterminated quoted element"),
    ],
)
def test_malformed_text_raises_value_error_naming_the_problem(
    oid: int, typmod: int, text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        convert(oid, text, typmod)


def test_numeric_accepts_trailing_zero_digits_beyond_scale() -> None:
    assert convert(1700, "1.5000", numeric_typmod(10, 2)) == (150).to_bytes(5, "big", signed=True)
    assert convert(1700, "7", numeric_typmod(10, 2)) == (700).to_bytes(5, "big", signed=True)


# ---------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------


def test_numeric_schema_is_a_named_fixed_decimal_plus_special_enum() -> None:
    c = codec(1700, numeric_typmod(10, 2))
    assert c.pg_type == "numeric(10,2)"
    null, fixed, special = c.avro_schema
    assert null == "null"
    assert fixed == {
        "type": "fixed",
        "name": "fieldsync.pg.Numeric_p10_s2",
        "size": 5,
        "logicalType": "decimal",
        "precision": 10,
        "scale": 2,
    }
    assert special["type"] == "enum" and special["symbols"] == ["NAN", "INFINITY", "NEG_INFINITY"]


@pytest.mark.parametrize(
    ("precision", "size"),
    [(1, 1), (2, 1), (3, 2), (9, 4), (10, 5), (18, 8), (19, 9), (38, 16), (1000, 416)],
)
def test_decimal_fixed_size_is_minimal(precision: int, size: int) -> None:
    c = codec(1700, numeric_typmod(precision, 0))
    assert c.avro_schema[1]["size"] == size
    biggest = int("9" * precision)
    assert len(biggest.to_bytes(size, "big", signed=True)) == size
    with pytest.raises(OverflowError):
        biggest.to_bytes(size - 1, "big", signed=True)


def test_unconstrained_and_non_avro_numeric_scales_are_strings() -> None:
    assert codec(1700).avro_schema == ["null", "string"]
    assert codec(1700).pg_type == "numeric"
    assert codec(1700, numeric_typmod(3, 5)).avro_schema == ["null", "string"]
    assert codec(1700, numeric_typmod(3, -3)).pg_type == "numeric(3,-3)"


@pytest.mark.parametrize(
    ("oid", "typmod", "label", "branches"),
    [
        (16, -1, "bool", ["boolean"]),
        (21, -1, "int2", ["int"]),
        (20, -1, "int8", ["long"]),
        (700, -1, "float4", ["float"]),
        (1043, 24, "varchar(20)", ["string"]),
        (1042, 5, "bpchar(1)", ["string"]),
        (1083, 3, "time(3)", [{"type": "long", "logicalType": "time-micros"}]),
        (2950, -1, "uuid", [{"type": "string", "logicalType": "uuid"}]),
        (3802, -1, "jsonb", [{"type": "string", "pg.json": True}]),
        (114, -1, "json", [{"type": "string", "pg.json": True}]),
        (1266, 6, "timetz(6)", ["string"]),
    ],
)
def test_simple_schemas(oid: int, typmod: int, label: str, branches: list[Any]) -> None:
    c = codec(oid, typmod)
    assert c.pg_type == label
    assert c.avro_schema == ["null", *branches]


def test_temporal_types_carry_distinct_special_enums() -> None:
    names = {}
    for oid, logical in [
        (1082, "date"),
        (1114, "local-timestamp-micros"),
        (1184, "timestamp-micros"),
    ]:
        schema = codec(oid).avro_schema
        assert schema[1]["logicalType"] == logical
        assert schema[2]["symbols"] == ["INFINITY", "NEG_INFINITY"]
        names[oid] = schema[2]["name"]
    assert len(set(names.values())) == 3
    interval = codec(1186).avro_schema
    assert [f["name"] for f in interval[1]["fields"]] == ["months", "days", "micros"]


def test_avro_field_has_pg_properties() -> None:
    c = column_codec(ColumnSpec("Amount", 1700, numeric_typmod(12, 4), True), EMPTY, lambda m: None)
    field = c.avro_field("Amount")
    assert field["default"] is None and field["type"][0] == "null"
    assert field["pg.name"] == "Amount"
    assert field["pg.type"] == "numeric(12,4)"
    assert field["pg.oid"] == 1700 and field["pg.typmod"] == numeric_typmod(12, 4)
    assert field["pg.key"] is True


def field_roundtrip(c: ColumnCodec, datum: Any) -> Any:
    schema = fastavro.parse_schema({"type": "record", "name": "T", "fields": [c.avro_field("v")]})
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, {"v": datum})
    buf.seek(0)
    record: Any = fastavro.schemaless_reader(buf, schema, None)
    return record["v"]


def test_every_mapped_schema_is_valid_avro_and_accepts_its_datums() -> None:
    for oid, typmod, text, _expected in SCALAR_CASES:
        if oid in (1082, 1083, 1114, 1184):
            continue  # fastavro's own logical readers cannot show every PostgreSQL value
        c = codec(oid, typmod)
        back = field_roundtrip(c, c.convert(text))
        if isinstance(back, Decimal):
            assert back == Decimal(text)
        elif isinstance(back, float):
            assert back == float(text)
        elif oid == 2950:
            assert str(back) == text
        else:
            assert back == c.convert(text)


# ---------------------------------------------------------------------------------------
# Enums, domains, arrays, unknown types
# ---------------------------------------------------------------------------------------

USER_TYPES = MappingCatalog(
    [
        TypeInfo(16390, "mood", "app", TypeKind.ENUM),
        TypeInfo(16389, "_mood", "app", TypeKind.ARRAY, elem_oid=16390),
        TypeInfo(
            16396,
            "money2",
            "app",
            TypeKind.DOMAIN,
            base_oid=1700,
            base_typmod=numeric_typmod(10, 2),
        ),
        TypeInfo(16395, "_money2", "app", TypeKind.ARRAY, elem_oid=16396),
        TypeInfo(16398, "money3", "app", TypeKind.DOMAIN, base_oid=16396),
        TypeInfo(16401, "tags", "app", TypeKind.DOMAIN, base_oid=1009),
        TypeInfo(16404, "pair", "app", TypeKind.COMPOSITE),
        TypeInfo(16405, "_pair", "app", TypeKind.ARRAY, elem_oid=16404),
        TypeInfo(3904, "int4range", "pg_catalog", TypeKind.RANGE),
        TypeInfo(22, "int2vector", "pg_catalog", TypeKind.BASE),
        TypeInfo(16410, "loop", "app", TypeKind.DOMAIN, base_oid=16410),
    ]
)


def test_enum_is_a_string_marked_as_enum() -> None:
    c = codec(16390, catalog=USER_TYPES)
    assert c.pg_type == "app.mood"
    assert c.avro_schema == ["null", {"type": "string", "pg.enum": "app.mood"}]
    assert c.convert("happy") == "happy"
    arr = codec(16389, catalog=USER_TYPES)
    assert arr.pg_type == "app.mood[]"
    assert arr.convert('{sad,"very happy",NULL}') == ["sad", "very happy", None]


def test_domain_maps_like_its_base_with_the_domain_modifier() -> None:
    c = codec(16396, catalog=USER_TYPES)
    assert c.pg_type == "app.money2"
    assert c.props == {"pg.base_type": "numeric(10,2)"}
    assert c.avro_schema[1]["name"] == "fieldsync.pg.Numeric_p10_s2"
    assert c.convert("12.30") == (1230).to_bytes(5, "big", signed=True)
    chained = codec(16398, catalog=USER_TYPES)  # domain over domain
    assert chained.props["pg.base_type"] == "numeric(10,2)"  # the underlying base type
    assert chained.convert("1.00") == (100).to_bytes(5, "big", signed=True)
    over_array = codec(16401, catalog=USER_TYPES)
    assert over_array.convert('{a,"b c"}') == ["a", "b c"]
    elements = codec(16395, catalog=USER_TYPES)
    assert elements.pg_type == "app.money2[]"
    assert elements.convert("{1.50,NaN,NULL}") == [
        (150).to_bytes(5, "big", signed=True),
        "NAN",
        None,
    ]


def test_unknown_types_are_text_and_warn_once_naming_column_and_type() -> None:
    for oid, label in [
        (16404, "app.pair"),
        (16405, "app.pair[]"),
        (3904, "int4range"),
        (22, "int2vector"),
        (99999, "unknown(oid 99999)"),
    ]:
        warnings: list[str] = []
        c = column_codec(ColumnSpec("thing", oid, -1, False), USER_TYPES, warnings.append)
        assert c.avro_schema == ["null", "string"]
        assert c.pg_type == label
        assert c.convert("(1,x)") == "(1,x)"
        assert len(warnings) == 1
        assert "'thing'" in warnings[0] and label in warnings[0]


def test_self_referencing_domain_is_rejected() -> None:
    with pytest.raises(SchemaError, match="nesting"):
        codec(16410, catalog=USER_TYPES)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{}", []),
        ("{1,NULL,3}", ["1", None, "3"]),
        (
            '{"a b","c\\"d","e\\\\f","NULL","",NULL,"{x}"," s "}',
            ["a b", 'c"d', "e\\f", "NULL", "", None, "{x}", " s "],
        ),
        ("{{1,2},{3,4}}", [["1", "2"], ["3", "4"]]),
        ("{{{1}}}", [[["1"]]]),
        ('{"a\nb","tab\there"}', ["a\nb", "tab\there"]),
        ('{"a,b",c;d}', ["a,b", "c;d"]),
        ("{null,Null}", [None, None]),
        ('{"\\\\x01"}', ["\\x01"]),
        ('{{"a",NULL},{NULL,"}"}}', [["a", None], [None, "}"]]),
    ],
)
def test_parse_array_literals(text: str, expected: list[Any]) -> None:
    assert parse_array(text) == expected


@pytest.mark.parametrize("text", ["", "1,2", "{1,2", "{1,2}}", "{1}{2}", '{"abc}', "{1}x", '{"a\\'])
def test_parse_array_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_array(text)


def test_array_schema_nests_up_to_six_dimensions_with_nullable_elements() -> None:
    c = codec(1007)
    assert c.pg_type == "int4[]"
    _null, array, fallback = c.avro_schema
    assert fallback == "string"
    depth = 0
    items: Any = array
    while isinstance(items, dict) and items.get("type") == "array":
        depth += 1
        union = items["items"]
        assert union[:2] == ["null", "int"]
        items = union[2] if len(union) == 3 else None
    assert depth == 6


def test_arrays_convert_elements_and_keep_explicit_bounds_as_text() -> None:
    assert convert(1007, "{{1,2},{3,NULL}}") == [[1, 2], [3, None]]
    assert convert(1007, "[0:1]={7,8}") == "[0:1]={7,8}"
    assert convert(1182, "{infinity,2020-01-01}") == ["INFINITY", 18262]
    assert convert(1001, '{"\\\\x01",NULL}') == [b"\x01", None]
    assert convert(1187, '{"1 day",NULL}') == [{"months": 0, "days": 1, "micros": 0}, None]
    assert convert(3807, '{"{\\"a\\": [1, \\"x\\"]}"}') == ['{"a": [1, "x"]}']
    assert convert(1000, "{t,f}") == [True, False]
    assert convert(1231, "{1.5,NaN}") == ["1.5", "NaN"]


def test_nested_array_datum_fits_its_schema() -> None:
    c = codec(1231, numeric_typmod(4, 1))
    datum = c.convert("{{1.5,NULL},{NaN,-2.0}}")
    back = field_roundtrip(c, datum)
    assert back == [[Decimal("1.5"), None], ["NAN", Decimal("-2.0")]]
    assert field_roundtrip(c, c.convert("[2:2]={1.0}")) == "[2:2]={1.0}"


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------

PG_MIN_DAYS = -2440588  # 4714-11-24 BC, Julian day 0
PG_MAX_DATE_DAYS = 2145042905  # 5874897-12-31
PG_MAX_TS_MICROS = INT64_MAX  # timestamps beyond this (year 294247+) do not fit an Avro long


@given(st.integers(min_value=-(1 << 63), max_value=INT64_MAX))
def test_int8_text_roundtrip(n: int) -> None:
    assert convert(20, str(n)) == n


@given(st.integers(min_value=PG_MIN_DAYS, max_value=PG_MAX_DATE_DAYS))
def test_date_text_roundtrip(days: int) -> None:
    assert convert(1082, pg_date(days)) == days


@given(
    st.integers(
        min_value=PG_MIN_DAYS * 86_400_000_000, max_value=PG_MAX_TS_MICROS - 86_400_000_000
    ),
    st.integers(min_value=-15 * 3600 - 59 * 60 - 59, max_value=15 * 3600 + 59 * 60 + 59),
)
def test_timestamp_text_roundtrip(micros: int, offset: int) -> None:
    assert convert(1114, pg_timestamp(micros)) == micros
    assert convert(1184, pg_timestamp(micros, offset)) == micros


@given(
    st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1),
    st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1),
    st.integers(min_value=-INT64_MAX, max_value=INT64_MAX),
)
def test_interval_text_roundtrip(months: int, days: int, micros: int) -> None:
    expected = {"months": months, "days": days, "micros": micros}
    assert convert(1186, pg_interval(months, days, micros)) == expected


@given(
    st.integers(min_value=1, max_value=60).flatmap(
        lambda p: st.tuples(st.just(p), st.integers(0, p))
    ),
    st.data(),
)
def test_numeric_text_roundtrip(ps: tuple[int, int], data: st.DataObject) -> None:
    precision, scale = ps
    unscaled = data.draw(st.integers(min_value=-(10**precision) + 1, max_value=10**precision - 1))
    digits = str(abs(unscaled)).rjust(scale + 1, "0")
    text = (
        ("-" if unscaled < 0 else "")
        + digits[: len(digits) - scale]
        + ("." + digits[-scale:] if scale else "")
    )
    c = codec(1700, numeric_typmod(precision, scale))
    raw = c.convert(text)
    assert int.from_bytes(raw, "big", signed=True) == unscaled
    assert field_roundtrip(c, raw) == Decimal(text)


@given(st.binary(max_size=64))
def test_bytea_hex_and_escape_roundtrip(data: bytes) -> None:
    assert convert(17, "\\x" + data.hex()) == data
    assert convert(17, pg_bytea_escape(data)) == data


def pg_array_literal(items: list[Any]) -> str:
    """array_out for text[] (quotes what PostgreSQL quotes)."""

    def element(x: Any) -> str:
        if x is None:
            return "NULL"
        if isinstance(x, list):
            return pg_array_literal(x)
        text = str(x)
        if text == "" or text.upper() == "NULL" or any(ch in text for ch in '{},"\\ \t\n\r\v\f'):
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return text

    return "{" + ",".join(element(x) for x in items) + "}"


TEXT_ELEMENTS = st.one_of(
    st.none(), st.text(alphabet=st.sampled_from(list('ab {},"\\\nNUL\u00e9\u20ac')), max_size=6)
)


@given(st.lists(TEXT_ELEMENTS, max_size=8))
def test_one_dimensional_text_array_roundtrip(items: list[str | None]) -> None:
    assert parse_array(pg_array_literal(items)) == items


@given(st.integers(1, 3), st.integers(1, 3), st.data())
def test_two_dimensional_text_array_roundtrip(rows: int, cols: int, data: st.DataObject) -> None:
    items = [data.draw(st.lists(TEXT_ELEMENTS, min_size=cols, max_size=cols)) for _ in range(rows)]
    assert convert(1009, pg_array_literal(items)) == items


def test_returns_text_unchanged_only_for_text_like_types() -> None:
    """TableCodec skips the conversion call for these columns: only text-as-is may say yes."""
    for oid, unchanged in [(25, True), (1043, True), (20, False), (1184, False), (16, False)]:
        codec = column_codec(ColumnSpec("c", oid, -1, False), EMPTY, lambda _m: None)
        assert returns_text_unchanged(codec.convert) is unchanged, oid
        if unchanged:
            assert codec.convert("x y") == "x y"


def test_output_function_text_reads_what_pgoutput_sends(
    pg_conn: psycopg.Connection[Any],
) -> None:
    """Every column comes back as its type's output-function text (``t``, not ``true``;
    an inet without its /32), arrays and domains included, NULL as None; a cursor without
    it parses the values."""
    query = (
        "select true, '10.0.0.1/32'::inet, 1.50::numeric(5,2), array[1, null, 3]::int4[], "
        "'2024-01-02 03:04:05+02'::timestamptz, '\\x01ff'::bytea, null::int8"
    )
    pg_conn.execute("set timezone = 'UTC'")
    with pg_conn.cursor() as cur:
        output_function_text(cur)
        row = cur.execute(query).fetchone()
    assert row == ("t", "10.0.0.1", "1.50", "{1,NULL,3}", "2024-01-02 01:04:05+00", "\\x01ff", None)
    with pg_conn.cursor() as plain:
        parsed = plain.execute(query).fetchone()
    assert parsed is not None and parsed[0] is True
