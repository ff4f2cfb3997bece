"""A column's *kind*: how its values look on the device wire, as JSON.

A device stores values in SQLite columns without declared types and turns them back into
wire values by the column's kind (device_agent/local_db.py ``from_sql``); the relay's
``/v1/schema`` gives each column's kind (docs/relay.md).  The kinds are a closed set,
:data:`COLUMN_KINDS`:

=========  ===========================================================================
``bool``   JSON ``true``/``false`` (``boolean``)
``int``    JSON integers: ``int2``, ``int4``, ``int8``, ``oid``; dates (days), times and
           timestamps (µs), whose infinities come as the texts ``"INFINITY"``,
           ``"NEG_INFINITY"``
``float``  JSON numbers with a fraction: ``float4``, ``float8`` (NaN and the infinities
           as the texts ``"NaN"``, ``"Infinity"``, ``"-Infinity"``)
``text``   JSON strings: text types, ``numeric`` (exact text), ``uuid``, ``bytea``
           (base64), ``json``/``jsonb`` (the JSON text), enums, ``timetz``, and every type
           cdc carries as its text form
``json``   JSON arrays and objects: arrays (an array whose lower bound is not 1 comes as
           its literal text, ``[0:1]={7,8}``), intervals (``{"months", "days", "micros"}``;
           their infinities as texts)
=========  ===========================================================================

:func:`column_kind` maps a :class:`core.values.Kind` (what cdc's value schema says of the
column, core/value_schemas.py) to its kind, following docs/events.md "Type mapping" and
:func:`core.row_wire.json_value`.

Pure: no I/O; the device agent imports it too.
"""

from __future__ import annotations

from typing import Final

from core.values import Kind

__all__ = ["COLUMN_KINDS", "column_kind"]

COLUMN_KINDS: Final = ("bool", "int", "float", "text", "json")

_KINDS: Final[dict[Kind, str]] = {
    Kind.BOOL: "bool",
    Kind.INT: "int",
    Kind.FLOAT: "float",
    Kind.DECIMAL: "text",
    Kind.NUMERIC: "text",
    Kind.TEXT: "text",
    Kind.JSON: "text",
    Kind.UUID: "text",
    Kind.BYTES: "text",
    Kind.DATE: "int",
    Kind.TIME: "int",
    Kind.TIMESTAMP: "int",
    Kind.TIMESTAMPTZ: "int",
    Kind.INTERVAL: "json",
    Kind.ARRAY: "json",
}


def column_kind(kind: Kind) -> str:
    """The kind (one of :data:`COLUMN_KINDS`) of a column whose values are of ``kind``."""
    return _KINDS[kind]
