"""The one reader of cdc's change-event value schemas (pure, no I/O).

:func:`read_value_schema` turns a value schema (as found in ``{prefix}._schemas``)
into a :class:`ValueSchema`: the table, and per column its Avro field name, PostgreSQL name,
key flag and :class:`core.values.ColumnType` (how its values look on the wire).  The relay's bucket
engine (columns, key, temporal columns), the journal and applier (column types) and replay
(fields, columns, key fields, types) all read schemas through it, with these rules:

- a value schema is a record with ``pg.table`` whose name ends in ``Envelope``; any other
  schema (a key schema, another producer's) reads as None;
- the ``Row`` record is the record type of ``before`` or ``after``, named references
  resolved: cdc defines it inline in ``before``, but a schema that defines it in ``after``
  (or anywhere else) and references it reads the same;
- a column's name is ``pg.name``, else its Avro field name; it is a key column when
  ``pg.key`` is set;
- a column's type is decided by the first non-null branch of its union (the column's own
  Avro type; the branches after it hold special values: ``INFINITY``, ``NAN``, or the
  array literal of an array with explicit bounds), with ``pg.base_type`` (domains) or
  ``pg.element_base_type`` (arrays of domains) before ``pg.type`` as its label; a column is
  temporal (date, time, timestamp, timestamptz) exactly when that branch carries the
  logical type.

Concurrency: plain functions; the results are immutable.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from core.errors import SchemaError
from core.values import TEMPORAL_KINDS, ColumnType, Kind, label_base

__all__ = [
    "EnvelopeColumn",
    "ValueSchema",
    "column_type_of_field",
    "column_type_of_own_field",
    "column_types_from_schemas",
    "column_types_from_value_schema",
    "key_schema_columns",
    "read_value_schema",
    "read_value_schemas",
]


# --------------------------------------------------------------------------- column types


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


def column_type_of_own_field(avro_field: Mapping[str, Any]) -> ColumnType:
    """The type of a Row field that defines the named types it uses itself (one column's
    field as :meth:`core.pg_type_mapping.ColumnCodec.avro_field` makes it)."""
    names: dict[str, Any] = {}
    _collect_names(avro_field.get("type"), names)
    return column_type_of_field(avro_field, names)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class EnvelopeColumn:
    """One column of a value schema's ``Row``."""

    field: str  # the Avro field name
    name: str  # the PostgreSQL column name
    is_key: bool
    type: ColumnType


@dataclass(frozen=True, slots=True)
class ValueSchema:
    """What a change-event value schema says about its table (see the module docstring)."""

    schema: str
    table: str
    columns: tuple[EnvelopeColumn, ...]

    @property
    def qualified(self) -> str:
        """``schema.table``."""
        return f"{self.schema}.{self.table}"

    @property
    def fields(self) -> tuple[str, ...]:
        """Avro field names, in row order."""
        return tuple(c.field for c in self.columns)

    @property
    def names(self) -> tuple[str, ...]:
        """PostgreSQL column names, in row order."""
        return tuple(c.name for c in self.columns)

    @property
    def key(self) -> tuple[str, ...]:
        """PostgreSQL names of the key columns, in row order."""
        return tuple(c.name for c in self.columns if c.is_key)

    @property
    def key_fields(self) -> tuple[str, ...]:
        """Avro field names of the key columns, in row order."""
        return tuple(c.field for c in self.columns if c.is_key)

    @property
    def temporal(self) -> tuple[tuple[str, str], ...]:
        """``(column, "date"|"time"|"timestamp"|"timestamptz")`` of each temporal column."""
        return tuple(
            (c.name, c.type.kind.value) for c in self.columns if c.type.kind in TEMPORAL_KINDS
        )

    def types(self) -> dict[str, ColumnType]:
        """PostgreSQL column name → :class:`ColumnType`."""
        return {c.name: c.type for c in self.columns}

    def renames(self) -> dict[str, str]:
        """Avro field name → PostgreSQL column name."""
        return {c.field: c.name for c in self.columns}


def _is_value_schema(schema: Mapping[str, Any]) -> bool:
    return (
        schema.get("type") == "record"
        and "pg.table" in schema
        and str(schema.get("name", "")).endswith("Envelope")
    )


def _row_record(schema: Mapping[str, Any], names: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The record type of ``before``/``after`` (named references resolved)."""
    row = None
    for f in schema.get("fields", ()):
        if f.get("name") in ("before", "after"):
            union = f.get("type", ())
            for branch in union if isinstance(union, list) else [union]:
                resolved = names.get(branch, branch) if isinstance(branch, str) else branch
                if isinstance(resolved, dict) and resolved.get("type") == "record":
                    row = resolved
    return row


def read_value_schema(schema: Mapping[str, Any]) -> ValueSchema | None:
    """The table and columns of a cdc change-event value schema (JSON-like), or None for any
    other schema; SchemaError naming the schema when its ``Row`` is malformed."""
    if not _is_value_schema(schema):
        return None
    names: dict[str, Any] = {}
    _collect_names(schema, names)
    row = _row_record(schema, names)
    if row is None:
        return None
    try:
        columns = tuple(
            EnvelopeColumn(
                field=str(f["name"]),
                name=str(f.get("pg.name", f["name"])),
                is_key=bool(f.get("pg.key")),
                type=column_type_of_field(f, names),
            )
            for f in row["fields"]
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SchemaError(
            f"value schema {schema.get('name')!r}: its Row record cannot be read ({exc!r})"
        ) from exc
    return ValueSchema(str(schema["pg.schema"]), str(schema["pg.table"]), columns)


def read_value_schemas(schemas: Iterable[str | Mapping[str, Any]]) -> dict[str, ValueSchema]:
    """``schema.table`` → :class:`ValueSchema` of every table with a value schema among
    ``schemas`` (JSON texts or parsed), the later schema of a table winning (pass them in
    the order of ``{prefix}._schemas``)."""
    out: dict[str, ValueSchema] = {}
    for s in schemas:
        parsed = json.loads(s) if isinstance(s, str) else s
        if isinstance(parsed, Mapping):
            found = read_value_schema(parsed)
            if found is not None:
                out[found.qualified] = found
    return out


def key_schema_columns(schema: Mapping[str, Any]) -> dict[str, str] | None:
    """Avro field name → PostgreSQL column name of a cdc key schema (record ``….Key`` with
    ``pg.table``), or None for any other schema."""
    if "pg.table" not in schema or not str(schema.get("name", "")).endswith(".Key"):
        return None
    return {f["name"]: str(f.get("pg.name", f["name"])) for f in schema.get("fields", ())}


def column_types_from_value_schema(
    schema: Mapping[str, Any],
) -> tuple[str, dict[str, ColumnType]] | None:
    """``("schema.table", {column: ColumnType})`` of a cdc change-event value schema,
    or None for any other schema (columns by their PostgreSQL names, ``pg.name``)."""
    found = read_value_schema(schema)
    return None if found is None else (found.qualified, found.types())


def column_types_from_schemas(
    schemas: Iterable[str | Mapping[str, Any]],
) -> dict[str, dict[str, ColumnType]]:
    """Column types of every table among cdc's value schemas (JSON texts or parsed, in the
    order of ``{prefix}._schemas``: a later schema of a table wins)."""
    return {table: found.types() for table, found in read_value_schemas(schemas).items()}
