"""Reading the placement columns of an insert event without decoding the whole event.

An insert that no rule places (its row lands in no bucket) changes nothing in the bucket
store: the planner neither looks its key up nor writes a state for it
(relay/downstream/planner.py, ``lookup_refs``).  The engine's reader therefore only needs the
columns the rules place rows by (match and filter columns) to drop it, and those sit near
the front of the event: the value (core/avro_envelope.py) is ``op``, ``before``,
``before_kind``, ``after``, ... and ``after`` is the row's fields in column order.

:func:`compile_prefix_reader` turns a writer schema into a reader of that prefix: for an
insert (``op`` ``c``) without an old row, the wanted columns of ``after`` as fastavro would
decode them (``long``/``int`` → int, ``string`` → str, ``boolean``, ``float``/``double``,
``enum`` → its symbol, ``null``; dates and times are plain ints as the engine decodes
them), reading and skipping only up to the last wanted column; ``None`` for any other
event (the caller decodes it in full).  A schema whose wanted columns have another type
(decimals, bytes, arrays...) or whose envelope is laid out otherwise gets no reader.

Pure: no I/O; a reader keeps no state, so it may be shared between threads.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import fastavro

from core.avro_envelope import HEADER_LEN
from core.avro_reader import read_long

PrefixReader = Callable[[bytes], dict[str, Any] | None]
"""Event value bytes → the wanted columns of an insert's row (PostgreSQL names), or None."""

_READABLE: Final = frozenset({"null", "boolean", "int", "long", "float", "double", "string"})
_ENVELOPE_PREFIX: Final = ("op", "before", "before_kind", "after")

# A field program step: (kind, argument); kinds below.
_NULL, _BOOL, _LONG, _FLOAT, _DOUBLE, _STRING, _BYTES, _FIXED, _ENUM, _UNION = range(10)
Step = tuple[int, Any]
_SIMPLE: Final = {
    "null": _NULL,
    "boolean": _BOOL,
    "int": _LONG,
    "long": _LONG,
    "float": _FLOAT,
    "double": _DOUBLE,
    "string": _STRING,
    "bytes": _BYTES,
}


class _Unsupported(Exception):
    """A type the prefix reader does not handle (the caller decodes in full)."""


def _step(schema: Any, readable: bool) -> Step:
    """The step reading (``readable``: into a value equal to fastavro's) or skipping one
    value of ``schema`` (an expanded schema: named types inline)."""
    if isinstance(schema, list):
        return (_UNION, tuple(_step(branch, readable) for branch in schema))
    if isinstance(schema, str):
        schema = {"type": schema}
    if not isinstance(schema, dict):
        raise _Unsupported(repr(schema))
    kind = schema["type"]
    if isinstance(kind, (dict, list)):
        return _step(kind, readable)
    if readable and (
        (kind not in _READABLE and kind != "enum") or schema.get("logicalType") == "decimal"
    ):
        raise _Unsupported(f"{kind} ({schema.get('logicalType')})")
    if kind in _SIMPLE:
        return (_SIMPLE[kind], None)
    if kind == "fixed":
        return (_FIXED, int(schema["size"]))
    if kind == "enum":
        return (_ENUM, tuple(schema["symbols"]))
    raise _Unsupported(kind)  # records, arrays and maps are never skipped here


def _read(step: Step, data: bytes, pos: int) -> tuple[Any, int]:
    kind, arg = step
    if kind == _UNION:
        index, pos = read_long(data, pos)
        return _read(arg[index], data, pos)
    if kind == _LONG:
        return read_long(data, pos)
    if kind == _STRING or kind == _BYTES:
        size, pos = read_long(data, pos)
        raw = data[pos : pos + size]
        return (raw.decode("utf-8") if kind == _STRING else bytes(raw)), pos + size
    if kind == _NULL:
        return None, pos
    if kind == _BOOL:
        return data[pos] == 1, pos + 1
    if kind == _ENUM:
        index, pos = read_long(data, pos)
        return arg[index], pos
    if kind == _FLOAT:
        return struct.unpack_from("<f", data, pos)[0], pos + 4
    if kind == _DOUBLE:
        return struct.unpack_from("<d", data, pos)[0], pos + 8
    return None, pos + int(arg)  # _FIXED, skipped


def compile_prefix_reader(schema: Mapping[str, Any], wanted: Sequence[str]) -> PrefixReader | None:
    """The prefix reader of change events written with ``schema`` (the value schema's
    JSON, parsed) for the PostgreSQL columns ``wanted``; None when the schema does not allow
    one (see the module docstring)."""
    try:
        expanded: Any = fastavro.parse_schema(dict(schema), expand=True)
        fields = expanded["fields"]
        if tuple(f["name"] for f in fields[:4]) != _ENVELOPE_PREFIX:
            return None
        before, after = fields[1]["type"], fields[3]["type"]
        if not (isinstance(before, list) and before[0] == "null"):
            return None
        if not (isinstance(after, list) and len(after) == 2 and after[0] == "null"):
            return None
        columns = after[1]["fields"]
        by_name = {str(c.get("pg.name", c["name"])): i for i, c in enumerate(columns)}
        if not wanted or any(w not in by_name for w in wanted):
            return None
        names = {by_name[w]: w for w in wanted}
        steps = [
            (names.get(i), _step(c["type"], readable=i in names))
            for i, c in enumerate(columns[: max(names) + 1])
        ]
        before_kind = _step(fields[2]["type"], readable=False)
    except (_Unsupported, KeyError, TypeError, ValueError, IndexError):
        return None
    return _make_reader(before_kind, steps)


def _make_reader(before_kind: Step, steps: list[tuple[str | None, Step]]) -> PrefixReader:
    def read(value: bytes) -> dict[str, Any] | None:
        size, pos = read_long(value, HEADER_LEN)
        if size != 1 or value[pos] != 0x63:  # op is not "c"
            return None
        pos += 1
        if value[pos] != 0:  # an old row: not a plain insert
            return None
        _, pos = _read(before_kind, value, pos + 1)
        if value[pos] != 2:  # after: union branch 1 (zigzag 2), the row
            return None
        pos += 1
        out: dict[str, Any] = {}
        for name, step in steps:
            found, pos = _read(step, value, pos)
            if name is not None:
                out[name] = found
        return out

    return read
