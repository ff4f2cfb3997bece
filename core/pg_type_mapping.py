"""PostgreSQL column types → Avro field types and value converters (pure, no I/O).

For each column, once per relation, :func:`column_codec` decides an Avro field type and a
converter ``text -> Avro datum`` (a parser of :mod:`core.pg_values`); the envelope codec
(:mod:`core.avro_envelope`) then only calls the converter on the hot path.

Mapping (every field is ``["null", ...]``; see docs/events.md for the full table):

* bool→boolean; int2/int4→int; int8/oid→long; float4→float; float8→double;
* numeric(p,s) with 0 <= s <= p → ``fixed`` decimal (named ``fieldsync.pg.Numeric_p<P>_s<S>``,
  so precision/scale are part of the schema fingerprint) or the enum
  ``fieldsync.pg.NumericSpecial`` {NAN, INFINITY, NEG_INFINITY}; unconstrained numeric (and
  the scales Avro cannot express) → string holding PostgreSQL's exact text;
* text/varchar/bpchar/name/"char"/xml/inet/cidr/macaddr/bit/pg_lsn → string; bytea → bytes;
* date → int (date) | ``DateSpecial``; time → long (time-micros); timetz → string;
  timestamp → long (local-timestamp-micros) | ``TimestampSpecial``;
  timestamptz → long (timestamp-micros) | ``TimestamptzSpecial``;
* interval → record ``fieldsync.pg.Interval`` {months:int, days:int, micros:long} | ``IntervalSpecial``;
* uuid → string (uuid); json/jsonb → string with ``"pg.json": true``; enum → string with
  ``"pg.enum": "<schema.type>"``; domain → its base type; arrays → nested Avro arrays
  (elements nullable, up to PostgreSQL's 6 dimensions), or, for arrays with lower bounds other
  than 1, the PostgreSQL array literal as a string;
* anything else → string of its text form, and ``warn()`` is called once for the column.

Types are looked up in :data:`core.pg_types.BUILTIN_TYPES`, then in the caller's
:class:`core.pg_types.TypeCatalog` (user-defined enums, domains, arrays).

Concurrency: everything here is immutable after construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from core.avro_schema import dedupe_named
from core.errors import SchemaError
from core.pg_types import BUILTIN_TYPES, ColumnSpec, TypeCatalog, TypeKind
from core.pg_values import (
    array_converter,
    as_text,
    decimal_size,
    numeric_parser,
    parse_bool,
    parse_bytea,
    parse_date,
    parse_float,
    parse_float4,
    parse_interval,
    parse_time,
    timestamp_parser,
)

__all__ = ["PG_NAMESPACE", "ColumnCodec", "column_codec"]

#: Avro namespace of the shared helper types (special-value enums, decimals, interval).
PG_NAMESPACE = "fieldsync.pg"

_MAX_ARRAY_DIMS = 6  # PostgreSQL's MAXDIM


@dataclass(frozen=True, slots=True, eq=False)
class ColumnCodec:
    """How one column is represented in Avro.

    ``avro_schema`` is the field type (JSON-able, always a union with ``"null"`` first; a
    named type is defined at its first use and referenced by full name after that, see
    :func:`dedupe_named` for combining several columns).  ``convert(text)`` turns PostgreSQL's text form into the Avro datum
    (raising ValueError on text it cannot read); it is never called with None.
    """

    spec: ColumnSpec
    pg_type: str
    avro_schema: list[Any]
    convert: Callable[[str], Any]
    props: Mapping[str, Any] = field(default_factory=dict)

    def avro_field(self, field_name: str) -> dict[str, Any]:
        """The Avro record field for this column, with the ``pg.*`` properties."""
        out: dict[str, Any] = {
            "name": field_name,
            "type": self.avro_schema,
            "default": None,
            "pg.name": self.spec.name,
            "pg.type": self.pg_type,
            "pg.oid": self.spec.type_oid,
            "pg.typmod": self.spec.type_modifier,
        }
        if self.spec.is_key:
            out["pg.key"] = True
        out.update(self.props)
        return out


# --------------------------------------------------------------------------------------
# Type -> mapping.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Mapped:
    branches: list[Any]  # the non-null union branches
    convert: Callable[[str], Any]
    label: str  # value of "pg.type"
    props: dict[str, Any] = field(default_factory=dict)
    exact: bool = True  # False: fell back to the text form of an unmapped type


def _special_enum(name: str, symbols: list[str]) -> dict[str, Any]:
    return {"type": "enum", "name": f"{PG_NAMESPACE}.{name}", "symbols": symbols}


_INFINITIES = ["INFINITY", "NEG_INFINITY"]

_INTERVAL_RECORD: dict[str, Any] = {
    "type": "record",
    "name": f"{PG_NAMESPACE}.Interval",
    "fields": [
        {"name": "months", "type": "int"},
        {"name": "days", "type": "int"},
        {"name": "micros", "type": "long"},
    ],
}


def _precision_suffix(typmod: int) -> str:
    return f"({typmod})" if typmod >= 0 else ""


def _numeric_typmod(typmod: int) -> tuple[int, int] | None:
    if typmod < 4:
        return None
    t = typmod - 4
    precision = (t >> 16) & 0xFFFF
    scale = ((t & 0x7FF) ^ 1024) - 1024  # 11-bit signed since PostgreSQL 15
    return precision, scale


def _map_numeric(typmod: int) -> _Mapped:
    ps = _numeric_typmod(typmod)
    if ps is None:
        return _Mapped(["string"], as_text, "numeric")
    precision, scale = ps
    label = f"numeric({precision},{scale})"
    if not (0 <= scale <= precision) or precision < 1:
        return _Mapped(["string"], as_text, label)  # not expressible as an Avro decimal
    size = decimal_size(precision)
    fixed = {
        "type": "fixed",
        "name": f"{PG_NAMESPACE}.Numeric_p{precision}_s{scale}",
        "size": size,
        "logicalType": "decimal",
        "precision": precision,
        "scale": scale,
    }
    special = _special_enum("NumericSpecial", ["NAN", *_INFINITIES])
    return _Mapped([fixed, special], numeric_parser(precision, scale, size), label)


def _map_builtin_base(oid: int, typmod: int) -> _Mapped | None:
    simple = _SIMPLE.get(oid)
    if simple is not None:
        branch, convert, label = simple
        return _Mapped([branch], convert, label)
    if oid in (1042, 1043, 1560, 1562):  # bpchar(n), varchar(n), bit(n), varbit(n)
        name = BUILTIN_TYPES[oid].name
        n = typmod - 4 if oid in (1042, 1043) else typmod
        return _Mapped(["string"], as_text, name + (f"({n})" if n >= 0 else ""))
    if oid == 1700:
        return _map_numeric(typmod)
    if oid == 1082:
        return _Mapped(
            [{"type": "int", "logicalType": "date"}, _special_enum("DateSpecial", _INFINITIES)],
            parse_date,
            "date",
        )
    if oid == 1083:
        return _Mapped(
            [{"type": "long", "logicalType": "time-micros"}],
            parse_time,
            "time" + _precision_suffix(typmod),
        )
    if oid == 1266:
        return _Mapped(["string"], as_text, "timetz" + _precision_suffix(typmod))
    if oid == 1114:
        return _Mapped(
            [
                {"type": "long", "logicalType": "local-timestamp-micros"},
                _special_enum("TimestampSpecial", _INFINITIES),
            ],
            timestamp_parser(with_tz=False),
            "timestamp" + _precision_suffix(typmod),
        )
    if oid == 1184:
        return _Mapped(
            [
                {"type": "long", "logicalType": "timestamp-micros"},
                _special_enum("TimestamptzSpecial", _INFINITIES),
            ],
            timestamp_parser(with_tz=True),
            "timestamptz" + _precision_suffix(typmod),
        )
    if oid == 1186:
        return _Mapped(
            [_INTERVAL_RECORD, _special_enum("IntervalSpecial", _INFINITIES)],
            parse_interval,
            "interval",
        )
    return None


_SIMPLE: dict[int, tuple[Any, Callable[[str], Any], str]] = {
    16: ("boolean", parse_bool, "bool"),
    17: ("bytes", parse_bytea, "bytea"),
    18: ("string", as_text, "char"),
    19: ("string", as_text, "name"),
    20: ("long", int, "int8"),
    21: ("int", int, "int2"),
    23: ("int", int, "int4"),
    25: ("string", as_text, "text"),
    26: ("long", int, "oid"),
    114: ({"type": "string", "pg.json": True}, as_text, "json"),
    142: ("string", as_text, "xml"),
    650: ("string", as_text, "cidr"),
    700: ("float", parse_float4, "float4"),
    701: ("double", parse_float, "float8"),
    774: ("string", as_text, "macaddr8"),
    829: ("string", as_text, "macaddr"),
    869: ("string", as_text, "inet"),
    2950: ({"type": "string", "logicalType": "uuid"}, as_text, "uuid"),
    3220: ("string", as_text, "pg_lsn"),
    3802: ({"type": "string", "pg.json": True}, as_text, "jsonb"),
}


def _unmapped(label: str) -> _Mapped:
    return _Mapped(["string"], as_text, label, exact=False)


def _map_type(oid: int, typmod: int, catalog: TypeCatalog, depth: int = 0) -> _Mapped:
    if depth > 32:
        raise SchemaError(f"type oid {oid}: domain/array nesting deeper than 32 levels")
    info = BUILTIN_TYPES.get(oid)
    if info is None:
        info = catalog.lookup(oid)
    if info is None:
        return _unmapped(f"unknown(oid {oid})")
    kind = info.kind
    if kind is TypeKind.BASE:
        mapped = _map_builtin_base(oid, typmod) if oid in BUILTIN_TYPES else None
        return mapped if mapped is not None else _unmapped(info.qualified_name)
    if kind is TypeKind.ENUM:
        return _Mapped(
            [{"type": "string", "pg.enum": info.qualified_name}], as_text, info.qualified_name
        )
    if kind is TypeKind.DOMAIN and info.base_oid is not None:
        base = _map_type(
            info.base_oid, typmod if typmod >= 0 else info.base_typmod, catalog, depth + 1
        )
        props = {"pg.base_type": base.label, **base.props}
        return _Mapped(base.branches, base.convert, info.qualified_name, props, base.exact)
    if kind is TypeKind.ARRAY and info.elem_oid is not None:
        elem = _map_type(info.elem_oid, typmod, catalog, depth + 1)
        label = elem.label + "[]"
        if not elem.exact:
            return _unmapped(label)
        array = {"type": "array", "items": _nested_items(elem.branches, _MAX_ARRAY_DIMS - 1)}
        props = (
            {"pg.element_base_type": elem.props["pg.base_type"]}
            if "pg.base_type" in elem.props
            else {}
        )
        return _Mapped([array, "string"], array_converter(elem.convert), label, props)
    return _unmapped(info.qualified_name)


def _nested_items(elem_branches: list[Any], levels_below: int) -> list[Any]:
    """Items union of an array level: the element, or (if dimensions remain) a nested array."""
    items: list[Any] = ["null", *elem_branches]
    if levels_below > 0:
        items.append({"type": "array", "items": _nested_items(elem_branches, levels_below - 1)})
    return items


def column_codec(
    spec: ColumnSpec, catalog: TypeCatalog, warn: Callable[[str], None]
) -> ColumnCodec:
    """Decide the Avro type and value converter of one column.

    Calls ``warn`` once if the type has no mapping and is carried as its text form.
    """
    mapped = _map_type(spec.type_oid, spec.type_modifier, catalog)
    if not mapped.exact:
        warn(
            f"column {spec.name!r}: type {mapped.label} (oid {spec.type_oid}) has no Avro "
            "mapping; its values are sent as their PostgreSQL text form (Avro string)"
        )
    return ColumnCodec(
        spec=spec,
        pg_type=mapped.label,
        avro_schema=dedupe_named(["null", *mapped.branches]),
        convert=mapped.convert,
        props=dict(mapped.props),
    )
