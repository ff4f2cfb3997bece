"""Avro binary encoding, compiled once per schema (pure, no I/O).

fastavro's writer resolves every union by validating the datum against each branch, which
costs more than everything else per event.  The envelope's schemas are known in advance and
every union's branches are told apart by the Python class of the datum (None, bool, int,
float, str, bytes, list, dict), so :class:`Compiler` turns each schema, once, into small
functions that return the encoded bytes.  Tests check the bytes against fastavro's writer;
decoding uses fastavro.

Varints: zigzag longs below 2**14 come from a table (:data:`SMALL_VARINTS`, also used by the
Kafka record batches of ``cdc.kafka_records``); larger ones (LSNs, µs timestamps) are
unrolled per 14-bit group.

Concurrency: the compiled encoders keep no state; the tables are built at import.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from core.errors import SchemaError

__all__ = [
    "SMALL_VARINTS",
    "Compiler",
    "Encoder",
    "encode_long",
    "encode_string",
    "encode_string_array",
]

Encoder = Callable[[Any], bytes]

# Final: a compiled build (devtools/compiled.py) keeps these in C statics, no dict lookups
_INT32_MIN: Final = -(1 << 31)
_INT32_MAX: Final = (1 << 31) - 1
_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1
# |n| below this is a "short" int of a compiled build (no boxed big-int arithmetic)
_SHORT: Final = 1 << 61
_SMALL_VARINTS: Final[list[bytes]] = []


def _varint_bytewise(z: int) -> bytes:
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


# Varints of 0..2**14-1, and the two continuation bytes of every 14-bit group.
_SMALL_VARINTS.extend(_varint_bytewise(z) for z in range(1 << 14))
_GROUPS_14: Final = [bytes(((g & 0x7F) | 0x80, ((g >> 7) & 0x7F) | 0x80)) for g in range(1 << 14)]


def _varint_slow(z: int) -> bytes:
    # Unrolled for LSNs (< 2**42) and µs timestamps (< 2**56): no loop, one concatenation.
    if z < 1 << 28:
        return _GROUPS_14[z & 0x3FFF] + _SMALL_VARINTS[z >> 14]
    if z < 1 << 42:
        return _GROUPS_14[z & 0x3FFF] + _GROUPS_14[(z >> 14) & 0x3FFF] + _SMALL_VARINTS[z >> 28]
    if z < 1 << 56:
        return (
            _GROUPS_14[z & 0x3FFF]
            + _GROUPS_14[(z >> 14) & 0x3FFF]
            + _GROUPS_14[(z >> 28) & 0x3FFF]
            + _SMALL_VARINTS[z >> 42]
        )
    out = b""
    while z >= 16384:
        out += _GROUPS_14[z & 0x3FFF]
        z >>= 14
    return out + _SMALL_VARINTS[z]


def _varint(z: int) -> bytes:
    """Unsigned varint of a non-negative int (already zigzag-encoded)."""
    if z < 16384:
        return _SMALL_VARINTS[z]
    return _varint_slow(z)


def encode_long(n: int) -> bytes:
    """Zigzag varint of a 64-bit signed int (an Avro long; also Kafka's record varints)."""
    if -_SHORT < n < _SHORT:
        z = (n << 1) ^ (n >> 63)
        if z < 16384:
            return _SMALL_VARINTS[z]
        return _varint_slow(z)
    return _encode_wide_long(n)


def _encode_wide_long(n: int) -> bytes:
    if not _INT64_MIN <= n <= _INT64_MAX:
        raise ValueError(f"{n} is outside the range of an Avro long")
    z = (n << 1) ^ (n >> 63)
    if z < 16384:
        return _SMALL_VARINTS[z]
    return _varint_slow(z)


SMALL_VARINTS: Sequence[bytes] = _SMALL_VARINTS
"""Varints of 0..2**14-1 (index by the zigzag value: ``SMALL_VARINTS[n << 1]`` for n >= 0)."""


def _encode_int(n: int) -> bytes:
    if not _INT32_MIN <= n <= _INT32_MAX:
        raise ValueError(f"{n} is outside the range of an Avro int")
    z = (n << 1) ^ (n >> 63)
    if z < 16384:
        return _SMALL_VARINTS[z]
    return _varint_slow(z)


def encode_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return _varint(len(b) << 1) + b  # the length is a zigzag long


def _encode_bytes(b: bytes) -> bytes:
    return _varint(len(b) << 1) + b


def _encode_boolean(v: bool) -> bytes:
    return b"\x01" if v else b"\x00"


def _encode_null(_v: None) -> bytes:
    return b""


_PACK_FLOAT: Final = struct.Struct("<f").pack
_PACK_DOUBLE: Final = struct.Struct("<d").pack

_PRIMITIVE_ENCODERS: Final[dict[str, tuple[Encoder, tuple[type, ...]]]] = {
    "null": (_encode_null, (type(None),)),
    "boolean": (_encode_boolean, (bool,)),
    "int": (_encode_int, (int,)),
    "long": (encode_long, (int,)),
    "float": (_PACK_FLOAT, (float,)),
    "double": (_PACK_DOUBLE, (float,)),
    "bytes": (_encode_bytes, (bytes,)),
    "string": (encode_string, (str,)),
}


class _NoBranch:
    """Stands for the first non-null branch's class of a union that has none."""


class Compiler:
    """Compiles (deduplicated, JSON-form) schemas into encoders; knows named types."""

    def __init__(self) -> None:
        self.named: dict[str, tuple[Encoder, tuple[type, ...]]] = {}

    def compile(self, schema: Any) -> tuple[Encoder, tuple[type, ...]]:
        """(encoder, Python classes of the datums it accepts) for an Avro schema."""
        if isinstance(schema, list):
            return self._union(schema)
        if isinstance(schema, str):
            if schema in _PRIMITIVE_ENCODERS:
                return _PRIMITIVE_ENCODERS[schema]
            if schema in self.named:
                return self.named[schema]
            raise SchemaError(f"Avro type {schema!r} used before its definition")
        kind = schema["type"]
        if kind in _PRIMITIVE_ENCODERS:
            return _PRIMITIVE_ENCODERS[kind]
        result: tuple[Encoder, tuple[type, ...]]
        if kind == "fixed":
            result = (_fixed_encoder(schema["name"], int(schema["size"])), (bytes,))
        elif kind == "enum":
            result = (_enum_encoder(schema["name"], schema["symbols"]), (str,))
        elif kind == "array":
            result = (_array_encoder(self.compile(schema["items"])[0]), (list,))
        elif kind == "record":
            fields = [(f["name"], self.compile(f["type"])[0]) for f in schema["fields"]]
            result = (_record_encoder(fields), (dict,))
        else:
            raise SchemaError(f"no binary encoder for Avro type {kind!r}")
        if kind in ("fixed", "enum", "record"):
            self.named[schema["name"]] = result
        return result

    def fields(self, schema: Mapping[str, Any]) -> list[Encoder]:
        """Encoders of a record's fields, in order (for rows given as value lists)."""
        return [self.compile(f["type"])[0] for f in schema["fields"]]

    def _union(self, branches: list[Any]) -> tuple[Encoder, tuple[type, ...]]:
        by_class: dict[type, tuple[bytes, Encoder]] = {}
        for index, branch in enumerate(branches):
            encoder, classes = self.compile(branch)
            for cls in classes:
                if cls in by_class:
                    raise SchemaError(f"union {branches!r}: two branches take {cls.__name__}")
                by_class[cls] = (_varint(index << 1), encoder)
        if float in by_class and int not in by_class:
            by_class[int] = by_class[float]
        null = by_class.pop(type(None), None)
        null_bytes = null[0] if null is not None else None
        # The first non-null branch (a column's own type) is tried first, by class identity.
        first_class: type = next(iter(by_class), _NoBranch)
        first_prefix, first_encoder = by_class.get(first_class, (b"", _encode_null))

        def encode(value: Any) -> bytes:
            if value.__class__ is first_class:
                return first_prefix + first_encoder(value)
            if value is None and null_bytes is not None:
                return null_bytes
            try:
                prefix, encoder = by_class[value.__class__]
            except KeyError:
                raise ValueError(
                    f"{type(value).__name__} value {value!r:.60} matches no branch of {branches!r:.200}"
                ) from None
            return prefix + encoder(value)

        classes = tuple(by_class) + ((type(None),) if null is not None else ())
        return encode, classes


def _fixed_encoder(name: str, size: int) -> Encoder:
    def encode(value: bytes) -> bytes:
        if len(value) != size:
            raise ValueError(f"{name}: fixed value has {len(value)} bytes, expected {size}")
        return value

    return encode


def _enum_encoder(name: str, symbols: Sequence[str]) -> Encoder:
    table = {s: _varint(i << 1) for i, s in enumerate(symbols)}

    def encode(value: str) -> bytes:
        try:
            return table[value]
        except KeyError:
            raise ValueError(f"{value!r} is not a symbol of enum {name}") from None

    return encode


def _array_encoder(items: Encoder) -> Encoder:
    def encode(values: list[Any]) -> bytes:
        if not values:
            return b"\x00"
        return b"".join([encode_long(len(values)), *map(items, values), b"\x00"])

    return encode


def _record_encoder(fields: list[tuple[str, Encoder]]) -> Encoder:
    def encode(value: Mapping[str, Any]) -> bytes:
        return b"".join([enc(value[name]) for name, enc in fields])

    return encode


def encode_string_array(values: list[str]) -> bytes:
    """An Avro ``array<string>`` (one block, then the end marker)."""
    if not values:
        return b"\x00"
    return b"".join([encode_long(len(values)), *map(encode_string, values), b"\x00"])
