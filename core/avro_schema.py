"""Avro schemas as JSON: Parsing Canonical Form and fingerprints, valid names, and the
helpers the envelope's schemas are built and read with (pure, no I/O).

A schema is identified by the CRC-64-AVRO fingerprint of its Parsing Canonical Form (Avro
specification): the 8 bytes after the single-object marker of every event
(:mod:`core.avro_envelope`), and the key of ``{prefix}._schemas``.  The Form keeps names,
types, sizes and enum symbols only, not logical types or ``pg.*`` properties.

PostgreSQL names are not always valid Avro names: :func:`avro_field_names` maps a table's
columns to valid, distinct field names (the original name stays in ``pg.name``).

Named types (records, enums, fixed) are defined once, at their first use, and referenced by
full name after that (:func:`dedupe_named`); every name here is a full name.

Concurrency: plain functions over immutable input.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import fastavro

from core.errors import SchemaError

__all__ = [
    "avro_field_names",
    "avro_name",
    "dedupe_named",
    "fingerprint",
    "load_schema",
    "parse_schema",
    "parsing_canonical_form",
    "schema_to_json",
    "strip_logical",
    "table_namespace",
]

# --------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------


_CRC64_EMPTY = 0xC15D213AA4D7A795


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return table


_CRC64_TABLE = _crc64_table()


def load_schema(schema: Any) -> Any:
    """JSON text → object; a bare name such as ``int`` (not JSON) is returned as is."""
    if isinstance(schema, str) and schema.lstrip()[:1] in ("{", "[", '"'):
        try:
            return json.loads(schema)
        except json.JSONDecodeError as exc:
            raise SchemaError(f"schema is not valid JSON: {exc}") from exc
    return schema


_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})


def parsing_canonical_form(schema: Any) -> str:
    """The Parsing Canonical Form (Avro specification) of a schema given as JSON text, a
    JSON-like object, or a parsed fastavro schema."""
    out: list[str] = []
    try:
        _pcf(load_schema(schema), "", out)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SchemaError(f"not a valid Avro schema: {exc!r}") from exc
    return "".join(out)


def _fullname(name: str, namespace: str) -> str:
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


def _pcf(schema: Any, namespace: str, out: list[str]) -> None:
    dump = functools.partial(json.dumps, ensure_ascii=False)
    if isinstance(schema, str):
        out.append(dump(schema if schema in _PRIMITIVES else _fullname(schema, namespace)))
        return
    if isinstance(schema, list):
        out.append("[")
        for i, branch in enumerate(schema):
            if i:
                out.append(",")
            _pcf(branch, namespace, out)
        out.append("]")
        return
    if not isinstance(schema, Mapping):
        raise TypeError(f"schema must be a string, list or object, not {type(schema).__name__}")
    kind = schema["type"]
    if not isinstance(kind, str):
        _pcf(kind, namespace, out)
    elif kind in _PRIMITIVES:
        out.append(dump(kind))
    elif kind == "array":
        out.append('{"type":"array","items":')
        _pcf(schema["items"], namespace, out)
        out.append("}")
    elif kind == "map":
        out.append('{"type":"map","values":')
        _pcf(schema["values"], namespace, out)
        out.append("}")
    elif kind in ("record", "error", "enum", "fixed"):
        name = _fullname(schema["name"], schema.get("namespace") or namespace)
        out.append(f'{{"name":{dump(name)},"type":')
        if kind == "enum":
            out.append('"enum","symbols":[' + ",".join(dump(s) for s in schema["symbols"]) + "]}")
        elif kind == "fixed":
            out.append(f'"fixed","size":{int(schema["size"])}}}')
        else:
            inner = name.rpartition(".")[0]
            out.append('"record","fields":[')
            for i, field in enumerate(schema["fields"]):
                out.append(("," if i else "") + f'{{"name":{dump(field["name"])},"type":')
                _pcf(field["type"], inner, out)
                out.append("}")
            out.append("]}")
    else:  # {"type": "some.Named"}: a reference
        out.append(dump(_fullname(kind, namespace)))


def fingerprint(schema: Any) -> bytes:
    """8-byte little-endian CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form."""
    fp = _CRC64_EMPTY
    table = _CRC64_TABLE
    for byte in parsing_canonical_form(schema).encode("utf-8"):
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp.to_bytes(8, "little")


# --------------------------------------------------------------------------------------
# Avro names
# --------------------------------------------------------------------------------------

_AVRO_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INVALID_CHARS_RE = re.compile(r"[^A-Za-z0-9_]")


def avro_name(name: str) -> str:
    """A valid Avro name for ``name``: unchanged if valid, else invalid characters → ``_``
    and a leading ``_`` if it would start with a digit (or be empty)."""
    if _AVRO_NAME_RE.fullmatch(name):
        return name
    out = _INVALID_CHARS_RE.sub("_", name)
    if not out or out[0].isdigit():
        out = "_" + out
    return out


def avro_field_names(names: Sequence[str]) -> list[str]:
    """Avro field names for a table's columns, deterministic and unique.

    Valid names are kept.  An invalid name becomes :func:`avro_name` of it, unless that
    equals a valid column name or another sanitized name; then ``_`` and the first 8 hex
    digits of the SHA-1 of the original name are appended.
    """
    valid = {n for n in names if _AVRO_NAME_RE.fullmatch(n)}
    sanitized = {n: avro_name(n) for n in names if n not in valid}
    counts = Counter(sanitized.values())
    out: list[str] = []
    for n in names:
        if n in valid:
            out.append(n)
            continue
        base = sanitized[n]
        if base in valid or counts[base] > 1:
            base = f"{base}_{hashlib.sha1(n.encode('utf-8')).hexdigest()[:8]}"
        out.append(base)
    if len(set(out)) != len(out):
        raise SchemaError(f"columns {list(names)!r} do not map to distinct Avro field names")
    return out


def table_namespace(prefix: str, schema: str, table: str) -> str:
    """Avro namespace of a table's record types: ``{prefix}.{schema}.{table}``, sanitized."""
    parts = [avro_name(p) for p in prefix.split(".")] if prefix else []
    return ".".join([*parts, avro_name(schema), avro_name(table)])


# --------------------------------------------------------------------------------------
# Schema helpers
# --------------------------------------------------------------------------------------


def strip_logical(schema: Any, keep: frozenset[str]) -> Any:
    """Copy of a schema without logicalType annotations (except those in ``keep``)."""
    if isinstance(schema, list):
        return [strip_logical(s, keep) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k != "logicalType" or v in keep}
    if "fields" in schema:
        out["fields"] = [{**f, "type": strip_logical(f["type"], keep)} for f in schema["fields"]]
    for key in ("items", "values"):
        if key in schema:
            out[key] = strip_logical(schema[key], keep)
    return out


def parse_schema(schema: Any) -> Any:
    try:
        return fastavro.parse_schema(schema)
    except Exception as exc:
        raise SchemaError(f"invalid Avro schema: {exc}") from exc


def schema_to_json(schema: Any) -> str:
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


_NAMED_TYPES = frozenset({"record", "enum", "fixed", "error"})


def dedupe_named(schema: Any, seen: dict[str, Any] | None = None) -> Any:
    """Copy of a JSON-form schema where each named type is defined once (at its first use)
    and referenced by its full name afterwards.  ``seen`` carries definitions across calls.

    Names must be full names (this module never uses ``namespace``).  Two different
    definitions under one name raise SchemaError.
    """
    if seen is None:
        seen = {}
    if isinstance(schema, list):
        return [dedupe_named(s, seen) for s in schema]
    if not isinstance(schema, dict):
        return schema
    kind = schema.get("type")
    if kind in _NAMED_TYPES:
        name = schema["name"]
        if name in seen:
            if seen[name] != schema:
                raise SchemaError(f"two different Avro types are both named {name!r}")
            return name
        seen[name] = schema
        out = dict(schema)
        if "fields" in schema:
            out["fields"] = [{**f, "type": dedupe_named(f["type"], seen)} for f in schema["fields"]]
        return out
    if kind == "array":
        return {**schema, "items": dedupe_named(schema["items"], seen)}
    if kind == "map":
        return {**schema, "values": dedupe_named(schema["values"], seen)}
    return schema
