"""The change-event envelope's Avro schemas as cdc writes them (pure, no I/O).

:func:`envelope_schemas` builds a table's ``Row`` record, its value schema (record
``{prefix}.{schema}.{table}.Envelope``, fields as in :mod:`core.avro_envelope`) and, when the
table has key columns, its key schema (``….Key``).  The ``Row`` record is defined inline in
``before`` (its first use) and ``after`` names it; every column field carries ``pg.name``
(the PostgreSQL column name), ``pg.type`` (its type label, ``numeric(10,2)``), ``pg.key`` on
key columns, ``pg.base_type`` on domains and ``pg.element_base_type`` on arrays of domains.
Every consumer reads them back with :mod:`core.value_schemas`.

Concurrency: plain functions; the results are immutable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.avro_schema import dedupe_named, table_namespace

__all__ = [
    "EnvelopeSchemas",
    "envelope_schemas",
    "source_schema",
]


# --------------------------------------------------------------------------- writing


def source_schema(prefix: str) -> dict[str, Any]:
    """The envelope's ``source`` record (``{prefix}.Source``)."""
    name = f"{prefix}.Source" if prefix else "Source"
    return {
        "type": "record",
        "name": name,
        "fields": [
            {"name": "db", "type": "string"},
            {"name": "schema", "type": "string"},
            {"name": "table", "type": "string"},
            {"name": "lsn", "type": "long"},
            {"name": "commit_lsn", "type": "long"},
            {"name": "txid", "type": ["null", "long"], "default": None},
            {"name": "seq", "type": "long"},
            {
                "name": "commit_ts_us",
                "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}],
                "default": None,
            },
            {"name": "snapshot", "type": "string"},
            {"name": "origin", "type": ["null", "string"], "default": None},
        ],
    }


@dataclass(frozen=True, slots=True)
class EnvelopeSchemas:
    """A table's schemas as JSON-like objects: the ``Row`` record (whose fields encode a
    row), the value schema, and the key schema (None for a table without key columns)."""

    row: dict[str, Any]
    value: dict[str, Any]
    key: dict[str, Any] | None


def envelope_schemas(
    *,
    db: str,
    schema: str,
    table: str,
    fields: Sequence[dict[str, Any]],
    key_index: Sequence[int],
    namespace_prefix: str,
) -> EnvelopeSchemas:
    """The schemas of a table whose columns are the Avro record ``fields`` (one per column,
    with their ``pg.*`` properties); ``key_index``: the positions of the key columns."""
    ns = table_namespace(namespace_prefix, schema, table)
    row_name = f"{ns}.Row"
    row = dedupe_named({"type": "record", "name": row_name, "fields": list(fields)}, {})
    value = dedupe_named(
        {
            "type": "record",
            "name": f"{ns}.Envelope",
            "pg.db": db,
            "pg.schema": schema,
            "pg.table": table,
            "fields": [
                {"name": "op", "type": "string"},
                {"name": "before", "type": ["null", row], "default": None},
                {"name": "before_kind", "type": ["null", "string"], "default": None},
                {"name": "after", "type": ["null", row_name], "default": None},
                {
                    "name": "unchanged",
                    "type": {"type": "array", "items": "string"},
                    "default": [],
                },
                {"name": "source", "type": source_schema(namespace_prefix)},
                {"name": "ts_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            ],
        },
        {},
    )
    key = None
    if key_index:
        key = dedupe_named(
            {
                "type": "record",
                "name": f"{ns}.Key",
                "pg.db": db,
                "pg.schema": schema,
                "pg.table": table,
                "fields": [fields[i] for i in key_index],
            },
            {},
        )
    return EnvelopeSchemas(row, value, key)
