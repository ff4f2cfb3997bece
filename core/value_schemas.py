"""Column types of the captured tables, read from cdc's change-event value schemas.

cdc publishes one Avro value schema per table version (``{prefix}._schemas``, and in
each change event's registry entry; docs/events.md).  Each column of its ``Row`` record
carries the Avro type of its values and ``pg.*`` properties (``pg.type``,
``pg.base_type``, ``pg.element_base_type``, ``pg.json``); from them this module derives
the :class:`core.values.ColumnType` that the value model checks, compares and converts
values with.  The applier derives the types of its tables the same way (from the schema
cdc's own codec builds for them), so the relay's intake, the applier and the replay
audit agree on every column.

Pure: no I/O, no state.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from core.values import ColumnType, Kind, label_base

__all__ = [
    "column_type_of_field",
    "column_types_from_schemas",
    "column_types_from_value_schema",
]

_INT_BITS: Final = {"int2": 16, "int4": 32, "int8": 64, "oid": 32}
_LOGICAL_KINDS: Final = {
    ("int", "date"): Kind.DATE,
    ("long", "time-micros"): Kind.TIME,
    ("long", "local-timestamp-micros"): Kind.TIMESTAMP,
    ("long", "timestamp-micros"): Kind.TIMESTAMPTZ,
    ("string", "uuid"): Kind.UUID,
}


def _classify(branches: Sequence[Any], names: Mapping[str, Any], label: str) -> ColumnType:
    """The :class:`ColumnType` of an Avro union's non-null branches (``label``: pg type)."""
    resolved = [names.get(b, b) if isinstance(b, str) else b for b in branches]
    main = resolved[0] if resolved else "string"
    base = label_base(label)
    if isinstance(main, str):
        if main == "boolean":
            return ColumnType(Kind.BOOL, label)
        if main in ("int", "long"):
            return ColumnType(Kind.INT, label, _INT_BITS.get(base, 32 if main == "int" else 64))
        if main in ("float", "double"):
            return ColumnType(Kind.FLOAT, label, 32 if main == "float" else 64)
        if main == "bytes":
            return ColumnType(Kind.BYTES, label)
        if base == "numeric":
            return ColumnType(Kind.NUMERIC, label)
        return ColumnType(Kind.TEXT, label)
    kind = main.get("type")
    if kind == "fixed" and main.get("logicalType") == "decimal":
        return ColumnType(
            Kind.DECIMAL, label, precision=int(main["precision"]), scale=int(main["scale"])
        )
    if kind == "record":
        return ColumnType(Kind.INTERVAL, label)
    if kind == "array":
        items = main["items"]
        inner = [
            b
            for b in (items if isinstance(items, list) else [items])
            if b != "null" and not (isinstance(b, dict) and b.get("type") == "array")
        ]
        element_label = label[:-2] if label.endswith("[]") else label
        return ColumnType(Kind.ARRAY, label, element=_classify(inner, names, element_label))
    logical = _LOGICAL_KINDS.get((str(kind), str(main.get("logicalType"))))
    if logical is not None:
        return ColumnType(logical, label)
    if kind == "string" and main.get("pg.json"):
        return ColumnType(Kind.JSON, label)
    return _classify([kind], names, label)


def _collect_names(schema: Any, names: dict[str, Any]) -> None:
    if isinstance(schema, list):
        for s in schema:
            _collect_names(s, names)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "enum", "fixed") and "name" in schema:
            names.setdefault(str(schema["name"]), schema)
        for f in schema.get("fields", ()):
            _collect_names(f.get("type"), names)
        if "items" in schema:
            _collect_names(schema["items"], names)


def column_type_of_field(avro_field: Mapping[str, Any], names: Mapping[str, Any]) -> ColumnType:
    """The type of one Row field of a cdc value schema (``names``: named types seen)."""
    union = avro_field.get("type")
    branches = [b for b in (union if isinstance(union, list) else [union]) if b != "null"]
    if avro_field.get("pg.element_base_type"):
        label = f"{avro_field['pg.element_base_type']}[]"
    else:
        label = str(avro_field.get("pg.base_type") or avro_field.get("pg.type") or "")
    return _classify(branches, names, label)


def column_types_from_value_schema(
    schema: Mapping[str, Any],
) -> tuple[str, dict[str, ColumnType]] | None:
    """``("schema.table", {column: ColumnType})`` of a cdc change-event value schema,
    or None for any other schema (columns by their PostgreSQL names, ``pg.name``)."""
    if schema.get("type") != "record" or "pg.table" not in schema:
        return None
    if not str(schema.get("name", "")).endswith("Envelope"):
        return None
    names: dict[str, Any] = {}
    _collect_names(schema, names)
    row = None
    for f in schema.get("fields", ()):
        if f.get("name") in ("before", "after"):
            for branch in f.get("type", ()):
                resolved = names.get(branch, branch) if isinstance(branch, str) else branch
                if isinstance(resolved, dict) and resolved.get("type") == "record":
                    row = resolved
    if row is None:
        return None
    types = {
        str(f.get("pg.name", f["name"])): column_type_of_field(f, names) for f in row["fields"]
    }
    return f"{schema['pg.schema']}.{schema['pg.table']}", types


def column_types_from_schemas(
    schemas: Iterable[str | Mapping[str, Any]],
) -> dict[str, dict[str, ColumnType]]:
    """Column types of every table among cdc's value schemas (JSON texts or parsed, in the
    order of ``{prefix}._schemas``: a later schema of a table wins)."""
    out: dict[str, dict[str, ColumnType]] = {}
    for s in schemas:
        parsed = json.loads(s) if isinstance(s, str) else s
        if isinstance(parsed, Mapping):
            found = column_types_from_value_schema(parsed)
            if found is not None:
                out[found[0]] = found[1]
    return out
