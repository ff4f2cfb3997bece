"""Reading Avro binary data by a program compiled from its writer schema.

:func:`compile_reader` turns a schema (JSON-like, as in ``{prefix}._schemas``) into a
:class:`Program`, a tree of read steps, one per schema node; :func:`read` runs it over the
bytes of one datum and returns the value fastavro's ``schemaless_reader`` returns for the
same bytes and schema with every logical type but ``decimal`` removed (what
:func:`core.avro_envelope.decode` uses, see docs/events.md): records as dicts in field
order, unions as the branch's value, enums as their symbol, arrays as lists, maps as
dicts, ``bytes``/``fixed`` as bytes, ``decimal`` as :class:`~decimal.Decimal` (the
unscaled two's-complement integer at the schema's precision, then scaled, as fastavro
does), dates, times and timestamps as their plain integers.  Schemas with a type outside
that list (or recursive named types) get no program, and their data is read by fastavro.

Why: the bucket engine decodes every change event; fastavro's generic reader costs
~10 µs for a small event, this module compiled with mypyc (``HOT_MODULES`` in
devtools/compiled.py) a fraction of it.  tests/core/test_avro_reader.py checks both
give the same values, types and decimal exponents included.

Malformed data (truncated, an unknown union branch or enum symbol, invalid UTF-8, an
over-long varint, a negative length) raises :class:`core.errors.DecodeError`.

Pure: no I/O; a program keeps no state while reading, so it may be shared by threads.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from decimal import Context, Decimal
from typing import Any, Final

from core.errors import DecodeError

_NULL: Final = 0
_BOOLEAN: Final = 1
_LONG: Final = 2
_FLOAT: Final = 3
_DOUBLE: Final = 4
_STRING: Final = 5
_BYTES: Final = 6
_FIXED: Final = 7
_ENUM: Final = 8
_UNION: Final = 9
_RECORD: Final = 10
_ARRAY: Final = 11
_MAP: Final = 12
_DECIMAL_BYTES: Final = 13
_DECIMAL_FIXED: Final = 14

_PRIMITIVE: Final = {
    "null": _NULL,
    "boolean": _BOOLEAN,
    "int": _LONG,
    "long": _LONG,
    "float": _FLOAT,
    "double": _DOUBLE,
    "string": _STRING,
    "bytes": _BYTES,
}
_FLOAT_FORMAT: Final = struct.Struct("<f")
_DOUBLE_FORMAT: Final = struct.Struct("<d")


def compiled() -> bool:
    """Whether this module runs as its mypyc build (where reading by program is several
    times cheaper than fastavro; as Python it costs about as much)."""
    return not __file__.endswith(".py")


class Program:
    """One read step: its kind, and what it needs (children, field names, enum symbols,
    a fixed size, a decimal's scale and context)."""

    def __init__(
        self,
        kind: int,
        children: list[Program] | None = None,
        names: list[str] | None = None,
        size: int = 0,
        scale: int = 0,
        context: Context | None = None,
    ) -> None:
        self.kind = kind
        self.children: list[Program] = children if children is not None else []
        self.names: list[str] = names if names is not None else []
        self.size = size
        self.scale = scale
        self.context = context


class Unsupported(Exception):
    """The schema has a node :func:`compile_reader` has no step for."""


def compile_reader(schema: Any) -> Program | None:
    """The program reading data written with ``schema`` (JSON-like: dicts, lists, names);
    None when the schema has a node this module cannot read (see the module docstring)."""
    try:
        return _compile(schema, {}, frozenset())
    except (Unsupported, KeyError, TypeError, ValueError):
        return None


def _compile(
    schema: Any, named: dict[str, Program], path: frozenset[str], namespace: str = ""
) -> Program:
    if isinstance(schema, list):
        return Program(_UNION, [_compile(s, named, path, namespace) for s in schema])
    if isinstance(schema, str):
        if schema in _PRIMITIVE:
            return Program(_PRIMITIVE[schema])
        full = schema if "." in schema or not namespace else f"{namespace}.{schema}"
        found = named.get(full, named.get(schema))
        if found is None or full in path or schema in path:
            raise Unsupported(f"unknown or recursive named type {schema!r}")
        return found
    if not isinstance(schema, Mapping):
        raise Unsupported(repr(schema))
    kind = schema["type"]
    if isinstance(kind, (list, Mapping)):
        return _compile(kind, named, path, namespace)
    if not isinstance(kind, str):
        raise Unsupported(repr(kind))
    logical = schema.get("logicalType")
    if logical is not None and logical != "decimal":
        raise Unsupported(f"logical type {logical!r}")
    if kind in ("record", "error", "enum", "fixed"):
        name = str(schema["name"])
        space = str(schema.get("namespace", namespace)) if "." not in name else ""
        full = name if "." in name or not space else f"{space}.{name}"
        program = _named(kind, schema, named, path | {full}, space or namespace, logical)
        named[full] = program
        return program
    if logical == "decimal":
        if kind != "bytes":
            raise Unsupported(f"decimal on {kind}")
        return _decimal(_DECIMAL_BYTES, schema, 0)
    if kind in _PRIMITIVE:
        return Program(_PRIMITIVE[kind])
    if kind == "array":
        return Program(_ARRAY, [_compile(schema["items"], named, path, namespace)])
    if kind == "map":
        return Program(_MAP, [_compile(schema["values"], named, path, namespace)])
    raise Unsupported(kind)


def _named(
    kind: str,
    schema: Mapping[str, Any],
    named: dict[str, Program],
    path: frozenset[str],
    namespace: str,
    logical: Any,
) -> Program:
    if kind == "enum":
        return Program(_ENUM, names=[str(s) for s in schema["symbols"]])
    if kind == "fixed":
        size = int(schema["size"])
        if logical == "decimal":
            return _decimal(_DECIMAL_FIXED, schema, size)
        return Program(_FIXED, size=size)
    if logical is not None:
        raise Unsupported(f"decimal on {kind}")
    fields = schema["fields"]
    return Program(
        _RECORD,
        [_compile(f["type"], named, path, namespace) for f in fields],
        [str(f["name"]) for f in fields],
    )


def _decimal(kind: int, schema: Mapping[str, Any], size: int) -> Program:
    precision = int(schema["precision"])
    scale = int(schema.get("scale", 0))
    return Program(kind, size=size, scale=scale, context=Context(prec=precision))


def read(program: Program, data: bytes, start: int) -> Any:
    """The value of the datum in ``data`` from ``start`` to its end; DecodeError when it is
    malformed or followed by other bytes."""
    try:
        value, end = _read(program, data, start)
    except (IndexError, UnicodeDecodeError, struct.error, ValueError, OverflowError) as exc:
        raise DecodeError(f"malformed Avro datum at byte {start}: {exc}") from exc
    if end != len(data):
        raise DecodeError(f"{len(data) - end} trailing bytes after the Avro datum")
    return value


def read_long(data: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint (Avro int/long) at ``pos``: (value, next position)."""
    b = data[pos]
    pos += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), pos


def _length(data: bytes, pos: int) -> tuple[int, int]:
    size, pos = read_long(data, pos)
    if size < 0 or pos + size > len(data):
        raise ValueError(f"length {size} past the end of the datum")
    return size, pos


def _read(p: Program, data: bytes, pos: int) -> tuple[Any, int]:
    kind = p.kind
    if kind == _RECORD:
        out: dict[str, Any] = {}
        names = p.names
        i = 0
        for child in p.children:
            value, pos = _read(child, data, pos)
            out[names[i]] = value
            i += 1
        return out, pos
    if kind == _UNION:
        index, pos = read_long(data, pos)
        if not 0 <= index < len(p.children):
            raise ValueError(f"union branch {index} of {len(p.children)}")
        return _read(p.children[index], data, pos)
    if kind == _LONG:
        return read_long(data, pos)
    if kind == _STRING:
        size, pos = _length(data, pos)
        return data[pos : pos + size].decode("utf-8"), pos + size
    if kind == _NULL:
        return None, pos
    if kind == _BOOLEAN:
        return data[pos] == 1, pos + 1
    if kind == _DOUBLE:
        return _DOUBLE_FORMAT.unpack_from(data, pos)[0], pos + 8
    if kind == _FLOAT:
        return _FLOAT_FORMAT.unpack_from(data, pos)[0], pos + 4
    if kind == _DECIMAL_BYTES:
        size, pos = _length(data, pos)
        return _to_decimal(p, data[pos : pos + size]), pos + size
    if kind == _BYTES:
        size, pos = _length(data, pos)
        return data[pos : pos + size], pos + size
    if kind == _ENUM:
        index, pos = read_long(data, pos)
        if not 0 <= index < len(p.names):
            raise ValueError(f"enum symbol {index} of {len(p.names)}")
        return p.names[index], pos
    if kind == _FIXED or kind == _DECIMAL_FIXED:
        end = pos + p.size
        if end > len(data):
            raise ValueError("fixed value past the end of the datum")
        raw = data[pos:end]
        return (_to_decimal(p, raw) if kind == _DECIMAL_FIXED else raw), end
    if kind == _ARRAY:
        return _read_blocks(p, data, pos, None)
    if kind == _MAP:
        return _read_blocks(p, data, pos, {})
    raise ValueError(f"no read step of kind {kind}")


def _read_blocks(p: Program, data: bytes, pos: int, into: dict[str, Any] | None) -> tuple[Any, int]:
    """An array's items (``into`` None: a list) or a map's entries (into ``into``)."""
    items: list[Any] = []
    child = p.children[0]
    while True:
        count, pos = read_long(data, pos)
        if count == 0:
            break
        if count < 0:
            count = -count
            _, pos = read_long(data, pos)  # the block's size in bytes
        for _ in range(count):
            if into is not None:
                size, pos = _length(data, pos)
                key = data[pos : pos + size].decode("utf-8")
                value, pos = _read(child, data, pos + size)
                into[key] = value
            else:
                value, pos = _read(child, data, pos)
                items.append(value)
    return (into if into is not None else items), pos


def _to_decimal(p: Program, raw: bytes) -> Decimal:
    context = p.context
    assert context is not None
    unscaled = int.from_bytes(raw, "big", signed=True)
    return context.create_decimal(unscaled).scaleb(-p.scale, context)
