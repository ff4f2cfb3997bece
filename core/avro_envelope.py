"""Avro change-event envelope: schemas, single-object encoding, decoding, position header.

Pure code: no I/O.  One :class:`TableCodec` exists per relation version (pgoutput Relation
message); it builds the table's key and value schemas once, precomputes a converter per
column (:mod:`core.pg_type_mapping`) and then turns raw pgoutput column values into Kafka key and
value bytes.

Wire format (Avro *single-object encoding*, see the Avro specification)::

    C3 01 | 8-byte little-endian CRC-64-AVRO fingerprint of the schema's Parsing
          | Canonical Form | Avro binary datum

Value schema (record ``{prefix}.{schema}.{table}.Envelope``)::

    op           string              c insert, u update, d delete, r snapshot read, t truncate
    before       null | Row          old row (update/delete), if PostgreSQL sent one
    before_kind  null | string       "full" (every column) or "key" (only key columns are real;
                                     the others are null because PostgreSQL did not send them)
    after        null | Row          new row (insert/update/read)
    unchanged    array<string>       Row field names whose value PostgreSQL did not send
                                     (unchanged TOAST); they are null in ``after``
    source       {prefix}.Source     db, schema, table, lsn, commit_lsn, txid, seq,
                                     commit_ts_us, snapshot ("true"|"last"|"false"|"incremental"), origin
    ts_us        long                time the event was encoded, µs since the Unix epoch

Key schema: record ``{prefix}.{schema}.{table}.Key`` with the key columns (``is_key``);
a table without key columns has no key schema and its events have a null Kafka key.

Fingerprints cover only what the Parsing Canonical Form keeps (names, types, sizes, enum
symbols), not logical types or ``pg.*`` properties.  The type mapping therefore puts
everything that changes how a value is read into names: decimal precision/scale is in the
``fixed`` type's name, and date, timestamp, timestamptz and interval each carry their own
special-value enum, so e.g. altering a column from timestamp to timestamptz or from
numeric(10,2) to numeric(12,4) yields a new fingerprint.

Encoding does not use fastavro's writer (its per-datum union resolution cost twice as much
as everything else): each schema is compiled once into small encoder functions, and tests
check the bytes against fastavro's.  Decoding uses fastavro.

Concurrency: encoding and decoding change no shared state except a small cache of encoded
source names (a dict insert, safe under the GIL), so a TableCodec and a SchemaRegistry may be
shared between threads; SchemaRegistry.add is not synchronized.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fastavro

from core.errors import DecodeError, SchemaError
from core.pg_type_mapping import ColumnCodec, column_codec, dedupe_named
from core.pg_types import ColumnSpec, TypeCatalog
from core.pg_values import returns_text_unchanged

__all__ = [
    "MAGIC",
    "ORIGIN_MESSAGE_PREFIX",
    "POSITION_HEADER",
    "SMALL_VARINTS",
    "SchemaRegistry",
    "Source",
    "TableCodec",
    "avro_field_names",
    "avro_name",
    "decode",
    "encode_long",
    "fingerprint",
    "parse_position_header",
    "parsing_canonical_form",
    "position_header",
    "table_namespace",
]

#: Marker of Avro single-object encoding.
MAGIC = b"\xc3\x01"
#: Kafka header carrying the event's position, see :func:`position_header`.
POSITION_HEADER = "fieldsync.pos"
#: Prefix of a transactional logical decoding message (``pg_logical_emit_message(true,
#: 'fieldsync.origin', 'device:d42')``) whose content becomes ``source.origin`` of every event
#: of its transaction: who made the change (the upstream applier names the device).
ORIGIN_MESSAGE_PREFIX = "fieldsync.origin"

_HEADER_LEN = len(MAGIC) + 8
_SNAPSHOT_VALUES: dict[object, str] = {
    False: "false",
    True: "true",
    "false": "false",
    "true": "true",
    "last": "last",
    "incremental": "incremental",
}

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


def _load_schema(schema: Any) -> Any:
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
        _pcf(_load_schema(schema), "", out)
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
# Position header
# --------------------------------------------------------------------------------------

_POSITION = struct.Struct(">QQ")


def position_header(commit_lsn: int, seq: int) -> bytes:
    """16 bytes, big-endian (commit_lsn u64, seq u64): byte order equals position order."""
    try:
        return _POSITION.pack(commit_lsn, seq)
    except struct.error as exc:
        raise ValueError(f"position ({commit_lsn}, {seq}) does not fit two u64: {exc}") from exc


def parse_position_header(value: bytes) -> tuple[int, int]:
    """Inverse of :func:`position_header`: ``(commit_lsn, seq)``."""
    if len(value) != _POSITION.size:
        raise DecodeError(
            f"{POSITION_HEADER} header must be {_POSITION.size} bytes, got {len(value)}"
        )
    commit_lsn, seq = _POSITION.unpack(value)
    return int(commit_lsn), int(seq)


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


def _strip_logical(schema: Any, keep: frozenset[str]) -> Any:
    """Copy of a schema without logicalType annotations (except those in ``keep``)."""
    if isinstance(schema, list):
        return [_strip_logical(s, keep) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k != "logicalType" or v in keep}
    if "fields" in schema:
        out["fields"] = [{**f, "type": _strip_logical(f["type"], keep)} for f in schema["fields"]]
    for key in ("items", "values"):
        if key in schema:
            out[key] = _strip_logical(schema[key], keep)
    return out


def _parse(schema: Any) -> Any:
    try:
        return fastavro.parse_schema(schema)
    except Exception as exc:
        raise SchemaError(f"invalid Avro schema: {exc}") from exc


def _to_json(schema: Any) -> str:
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def _source_schema(prefix: str) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------
# Avro binary encoding, compiled per schema
#
# fastavro's writer resolves every union by validating the datum against each branch,
# which costs more than everything else per event.  Our schemas are known in advance and
# every union's branches are told apart by the Python class of the datum (None, bool, int,
# float, str, bytes, list, dict), so each schema is compiled once into small functions that
# return the encoded bytes.  Tests check the bytes against fastavro's writer; decoding uses
# fastavro.
# --------------------------------------------------------------------------------------

_Encoder = Callable[[Any], bytes]

_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_SMALL_VARINTS: list[bytes] = []


def _varint_bytewise(z: int) -> bytes:
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


# Varints of 0..2**14-1, and the two continuation bytes of every 14-bit group.
_SMALL_VARINTS.extend(_varint_bytewise(z) for z in range(1 << 14))
_GROUPS_14 = [bytes(((g & 0x7F) | 0x80, ((g >> 7) & 0x7F) | 0x80)) for g in range(1 << 14)]


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


def _encode_long(n: int) -> bytes:
    if not _INT64_MIN <= n <= _INT64_MAX:
        raise ValueError(f"{n} is outside the range of an Avro long")
    z = (n << 1) ^ (n >> 63)
    if z < 16384:
        return _SMALL_VARINTS[z]
    return _varint_slow(z)


encode_long = _encode_long
SMALL_VARINTS: Sequence[bytes] = _SMALL_VARINTS
"""Varints of 0..2**14-1 (index by the zigzag value: ``SMALL_VARINTS[n << 1]`` for n >= 0)."""
"""Zigzag varint of a 64-bit signed int (an Avro long; also Kafka's record varints)."""


def _encode_int(n: int) -> bytes:
    if not _INT32_MIN <= n <= _INT32_MAX:
        raise ValueError(f"{n} is outside the range of an Avro int")
    z = (n << 1) ^ (n >> 63)
    if z < 16384:
        return _SMALL_VARINTS[z]
    return _varint_slow(z)


def _encode_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return _varint(len(b) << 1) + b  # the length is a zigzag long


def _encode_bytes(b: bytes) -> bytes:
    return _varint(len(b) << 1) + b


def _encode_boolean(v: bool) -> bytes:
    return b"\x01" if v else b"\x00"


def _encode_null(_v: None) -> bytes:
    return b""


_PACK_FLOAT = struct.Struct("<f").pack
_PACK_DOUBLE = struct.Struct("<d").pack

_PRIMITIVE_ENCODERS: dict[str, tuple[_Encoder, tuple[type, ...]]] = {
    "null": (_encode_null, (type(None),)),
    "boolean": (_encode_boolean, (bool,)),
    "int": (_encode_int, (int,)),
    "long": (_encode_long, (int,)),
    "float": (_PACK_FLOAT, (float,)),
    "double": (_PACK_DOUBLE, (float,)),
    "bytes": (_encode_bytes, (bytes,)),
    "string": (_encode_string, (str,)),
}


class _NoBranch:
    """Stands for the first non-null branch's class of a union that has none."""


class _Compiler:
    """Compiles (deduplicated, JSON-form) schemas into encoders; knows named types."""

    def __init__(self) -> None:
        self.named: dict[str, tuple[_Encoder, tuple[type, ...]]] = {}

    def compile(self, schema: Any) -> tuple[_Encoder, tuple[type, ...]]:
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
        result: tuple[_Encoder, tuple[type, ...]]
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

    def fields(self, schema: Mapping[str, Any]) -> list[_Encoder]:
        """Encoders of a record's fields, in order (for rows given as value lists)."""
        return [self.compile(f["type"])[0] for f in schema["fields"]]

    def _union(self, branches: list[Any]) -> tuple[_Encoder, tuple[type, ...]]:
        by_class: dict[type, tuple[bytes, _Encoder]] = {}
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


def _fixed_encoder(name: str, size: int) -> _Encoder:
    def encode(value: bytes) -> bytes:
        if len(value) != size:
            raise ValueError(f"{name}: fixed value has {len(value)} bytes, expected {size}")
        return value

    return encode


def _enum_encoder(name: str, symbols: Sequence[str]) -> _Encoder:
    table = {s: _varint(i << 1) for i, s in enumerate(symbols)}

    def encode(value: str) -> bytes:
        try:
            return table[value]
        except KeyError:
            raise ValueError(f"{value!r} is not a symbol of enum {name}") from None

    return encode


def _array_encoder(items: _Encoder) -> _Encoder:
    def encode(values: list[Any]) -> bytes:
        if not values:
            return b"\x00"
        return b"".join([_encode_long(len(values)), *map(items, values), b"\x00"])

    return encode


def _record_encoder(fields: list[tuple[str, _Encoder]]) -> _Encoder:
    def encode(value: Mapping[str, Any]) -> bytes:
        return b"".join([enc(value[name]) for name, enc in fields])

    return encode


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """Where an event comes from; becomes the envelope's ``source`` record.

    ``lsn`` is the change's own LSN, ``commit_lsn`` its transaction's commit LSN, ``seq`` the
    event's index in the transaction; ``(commit_lsn, seq)`` is the event's position.
    ``snapshot``: ``"false"`` (streamed change), ``"true"`` (snapshot read), ``"last"`` (last
    event of a snapshot), ``"incremental"`` (a re-snapshot row read while streaming goes on,
    docs/cdc.md "Re-snapshots"); ``True``/``False`` are accepted for ``"true"``/``"false"``.
    ``origin``: the replication origin or the applying device id, if any.
    """

    db: str
    schema: str
    table: str
    lsn: int
    commit_lsn: int
    txid: int | None
    seq: int
    commit_ts_us: int | None
    snapshot: str | bool = "false"
    origin: str | None = None


class TableCodec:
    """Key and value schemas of one relation version, and the encoder of its events.

    ``unchanged_sentinel`` is the decoder's marker for an unchanged TOASTed value (compared by
    identity).  ``warn`` receives one message per column whose type is carried as text.
    """

    def __init__(
        self,
        *,
        db: str,
        schema: str,
        table: str,
        columns: Sequence[ColumnSpec],
        catalog: TypeCatalog,
        unchanged_sentinel: object,
        warn: Callable[[str], None],
        namespace_prefix: str = "fieldsync",
    ) -> None:
        self.db = db
        self.schema = schema
        self.table = table
        self.columns: tuple[ColumnSpec, ...] = tuple(columns)
        self.column_codecs: tuple[ColumnCodec, ...] = tuple(
            column_codec(c, catalog, warn) for c in self.columns
        )
        self.field_names: tuple[str, ...] = tuple(avro_field_names([c.name for c in self.columns]))
        self._unchanged = unchanged_sentinel
        # None for columns whose text is their datum (text, varchar, json...): no call
        self._convs: tuple[Callable[[str], Any] | None, ...] = tuple(
            None if returns_text_unchanged(c.convert) else c.convert for c in self.column_codecs
        )
        self._where = f"{schema}.{table}"
        self._key_index = tuple(i for i, c in enumerate(self.columns) if c.is_key)
        self.key_field_names: tuple[str, ...] = tuple(self.field_names[i] for i in self._key_index)

        ns = table_namespace(namespace_prefix, schema, table)
        fields = [
            codec.avro_field(name)
            for codec, name in zip(self.column_codecs, self.field_names, strict=True)
        ]
        row_name = f"{ns}.Row"
        row = dedupe_named({"type": "record", "name": row_name, "fields": fields}, {})
        value_json_schema = dedupe_named(
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
                    {"name": "source", "type": _source_schema(namespace_prefix)},
                    {"name": "ts_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
                ],
            },
            {},
        )
        self.value_schema_json: str = _to_json(value_json_schema)
        self.value_schema: Any = _parse(value_json_schema)
        self.value_fingerprint: bytes = fingerprint(value_json_schema)
        self._value_header = MAGIC + self.value_fingerprint
        self._row_encoders = _Compiler().fields(row)

        self.key_schema: Any | None = None
        self.key_schema_json: str | None = None
        self.key_fingerprint: bytes | None = None
        self._key_header = b""
        if self._key_index:
            key_json_schema = dedupe_named(
                {
                    "type": "record",
                    "name": f"{ns}.Key",
                    "pg.db": db,
                    "pg.schema": schema,
                    "pg.table": table,
                    "fields": [fields[i] for i in self._key_index],
                },
                {},
            )
            self.key_schema_json = _to_json(key_json_schema)
            self.key_schema = _parse(key_json_schema)
            self.key_fingerprint = fingerprint(key_json_schema)
            self._key_header = MAGIC + self.key_fingerprint
        self._source_prefixes: dict[tuple[str, str, str], bytes] = {}
        # The source fields that stay the same for a whole transaction, encoded once: the
        # fields (commit_lsn, txid) and (commit_ts_us, snapshot, origin); see _source_bytes.
        self._txn_fields: tuple[object, ...] = ()
        self._txn_parts: tuple[bytes, bytes] = (b"", b"")

    # -- rows -------------------------------------------------------------------------

    def _convert_row(self, values: Sequence[object], which: str) -> tuple[list[Any], list[str]]:
        """Column datums of a raw pgoutput tuple, and the field names sent as unchanged."""
        if len(values) != len(self._convs):
            raise SchemaError(
                f"{self._where}: {which} tuple has {len(values)} values, "
                f"the relation has {len(self._convs)} columns"
            )
        datums: list[Any] = []
        append = datums.append
        unchanged: list[str] = []
        sentinel = self._unchanged
        index = -1
        value: object = None
        try:
            for conv, value in zip(self._convs, values):  # noqa: B905 (length checked)
                index += 1
                if value.__class__ is str:
                    append(value if conv is None else conv(value))
                elif value is None:
                    append(None)
                elif value is sentinel:
                    append(None)
                    unchanged.append(self.field_names[index])
                elif isinstance(value, bytes | bytearray | memoryview):
                    text = bytes(value).decode("utf-8")
                    append(text if conv is None else conv(text))
                else:
                    raise TypeError(f"unexpected value type {type(value).__name__}")
        except Exception as exc:
            raise self._value_error(index, which, value, exc) from exc
        return datums, unchanged

    def _value_error(self, index: int, which: str, value: object, exc: Exception) -> SchemaError:
        col = self.columns[index]
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return SchemaError(
            f"{self._where}.{col.name} ({self.column_codecs[index].pg_type}): "
            f"cannot encode {which} value {shown}: {exc}"
        )

    def _encode_fields(self, datums: Sequence[Any], which: str) -> list[bytes]:
        """The encoding of each field of a row (datums from :meth:`_convert_row`)."""
        encoders = self._row_encoders
        try:
            return [enc(d) for enc, d in zip(encoders, datums)]  # noqa: B905
        except Exception:
            for index, (enc, d) in enumerate(zip(encoders, datums)):  # noqa: B905
                try:
                    enc(d)
                except Exception as exc:
                    raise self._value_error(index, which, d, exc) from exc
            raise

    def _key_bytes(
        self, after: list[bytes] | None, unchanged: list[str], before: list[bytes] | None
    ) -> bytes:
        """The Kafka key from the encoded row fields (``after``, else ``before``): the Key
        record's fields are the key columns' Row fields, same types, so the same bytes."""
        primary = after if after is not None else before
        assert primary is not None
        key = [primary[i] for i in self._key_index]
        if after is not None and unchanged:
            for pos, i in enumerate(self._key_index):
                if self.field_names[i] in unchanged:
                    if before is None:
                        raise SchemaError(
                            f"{self._where}: key column {self.columns[i].name!r} was not sent "
                            "(unchanged TOAST) and the event has no old key"
                        )
                    key[pos] = before[i]
        return self._key_header + b"".join(key)

    # -- events -----------------------------------------------------------------------

    def _source_bytes(self, source: Source) -> bytes:
        names = (source.db, source.schema, source.table)
        prefix = self._source_prefixes.get(names)
        if prefix is None:
            prefix = b"".join(_encode_string(n) for n in names)
            if len(self._source_prefixes) < 16:
                self._source_prefixes[names] = prefix
        # Only lsn and seq change from one event of a transaction to the next.
        fields = (
            source.commit_lsn,
            source.txid,
            source.commit_ts_us,
            source.snapshot,
            source.origin,
        )
        if fields != self._txn_fields:
            self._txn_parts = self._txn_source_parts(source)
            self._txn_fields = fields
        after_lsn, after_seq = self._txn_parts
        return b"".join(
            [prefix, _encode_long(source.lsn), after_lsn, _encode_long(source.seq), after_seq]
        )

    @staticmethod
    def _txn_source_parts(source: Source) -> tuple[bytes, bytes]:
        """The encoded source fields between lsn and seq, and those after seq."""
        snapshot = _SNAPSHOT_BYTES.get(source.snapshot)
        if snapshot is None:
            raise ValueError(
                f"Source.snapshot must be 'true', 'last', 'false', 'incremental' or a bool, "
                f"got {source.snapshot!r}"
            )
        txid, ts, origin = source.txid, source.commit_ts_us, source.origin
        after_lsn = _encode_long(source.commit_lsn) + (
            b"\x00" if txid is None else b"\x02" + _encode_long(txid)
        )
        after_seq = b"".join(
            [
                b"\x00" if ts is None else b"\x02" + _encode_long(ts),
                snapshot,
                b"\x00" if origin is None else b"\x02" + _encode_string(origin),
            ]
        )
        return after_lsn, after_seq

    def encode_change(
        self,
        op: str,
        before: Sequence[object] | None,
        after: Sequence[object] | None,
        source: Source,
        ts_us: int,
        *,
        before_kind: str = "key",
    ) -> tuple[bytes | None, bytes]:
        """Encode one row change; returns (Kafka key bytes or None, value bytes).

        ``before``/``after`` hold one raw pgoutput value per column (text, None for SQL NULL,
        or the unchanged sentinel).  ``before_kind`` says what ``before`` carries: ``"key"``
        for pgoutput's 'K' old tuple (REPLICA IDENTITY DEFAULT/INDEX: only the identity
        columns are set), ``"full"`` for its 'O' tuple (REPLICA IDENTITY FULL); the markers
        ``"K"``/``"O"`` themselves (e.g. the decoder's OldTupleKind) are accepted as well.
        """
        op_bytes = _OP_BYTES.get(op)
        if op_bytes is None:
            raise ValueError(f"{self._where}: unknown op {op!r} (expected c, u, d or r)")
        if op == "d":
            if before is None or after is not None:
                raise ValueError(f"{self._where}: op 'd' needs a before row and no after row")
        elif after is None:
            raise ValueError(f"{self._where}: op {op!r} needs an after row")

        after_fields: list[bytes] | None = None
        unchanged: list[str] = []
        after_part = b"\x00"
        if after is not None:
            after_datums, unchanged = self._convert_row(after, "after")
            after_fields = self._encode_fields(after_datums, "after")
            after_part = b"".join([b"\x02", *after_fields])
        before_fields: list[bytes] | None = None
        before_part = kind_part = b"\x00"
        if before is not None:
            kind_part = _BEFORE_KIND_BYTES.get(before_kind, b"")
            if not kind_part:
                raise ValueError(
                    f"{self._where}: before_kind must be 'full' or 'key', got {before_kind!r}"
                )
            before_datums, before_unchanged = self._convert_row(before, "before")
            if before_unchanged:
                raise DecodeError(
                    f"{self._where}: old tuple marks {before_unchanged} as unchanged TOAST, "
                    "which PostgreSQL never sends for old tuples"
                )
            before_fields = self._encode_fields(before_datums, "before")
            before_part = b"".join([b"\x02", *before_fields])
        value = b"".join(
            [
                self._value_header,
                op_bytes,
                before_part,
                kind_part,
                after_part,
                _encode_string_array(unchanged) if unchanged else b"\x00",
                self._source_bytes(source),
                _encode_long(ts_us),
            ]
        )
        if not self._key_index:
            return None, value
        return self._key_bytes(after_fields, unchanged, before_fields), value

    def encode_truncate(self, source: Source, ts_us: int) -> bytes:
        """Value bytes of a truncate event (op ``t``; the Kafka key is None)."""
        return b"".join(
            [
                self._value_header,
                _OP_BYTES["t"],
                b"\x00\x00\x00",  # before, before_kind, after: null
                b"\x00",  # unchanged: empty array
                self._source_bytes(source),
                _encode_long(ts_us),
            ]
        )


def _encode_string_array(values: list[str]) -> bytes:
    if not values:
        return b"\x00"
    return b"".join([_encode_long(len(values)), *map(_encode_string, values), b"\x00"])


_OP_BYTES = {op: _encode_string(op) for op in ("c", "u", "d", "r", "t")}
# The envelope's before_kind union is ["null", "string"]; pgoutput's 'K'/'O' are accepted.
_BEFORE_KIND_BYTES = {
    "key": b"\x02" + _encode_string("key"),
    "full": b"\x02" + _encode_string("full"),
    "K": b"\x02" + _encode_string("key"),
    "O": b"\x02" + _encode_string("full"),
}
_SNAPSHOT_BYTES: dict[object, bytes] = {k: _encode_string(v) for k, v in _SNAPSHOT_VALUES.items()}


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


class SchemaRegistry:
    """In-memory fingerprint → schema map used by readers (fill it from ``{prefix}._schemas``).

    Decoding returns plain Avro values: decimals as :class:`decimal.Decimal`, but dates,
    times and timestamps as the raw ints of their logical type (days / µs), so that every
    PostgreSQL value (BC dates, year 294276, ``24:00:00``) decodes; uuid as str.
    """

    def __init__(self, schemas: Iterable[Any] = ()) -> None:
        self._schemas: dict[bytes, Any] = {}
        self._readers: dict[bytes, Any] = {}
        self._json: dict[bytes, str] = {}
        for schema in schemas:
            self.add(schema)

    def add(self, schema_json: str | Mapping[str, Any] | list[Any]) -> bytes:
        """Register a schema (JSON text or JSON-like object); returns its fingerprint."""
        loaded = _load_schema(schema_json)
        fp = fingerprint(loaded)
        self._schemas[fp] = _parse(loaded)
        self._readers[fp] = _parse(_strip_logical(loaded, frozenset({"decimal"})))
        self._json[fp] = schema_json if isinstance(schema_json, str) else _to_json(loaded)
        return fp

    def get(self, fp: bytes) -> Any:
        """The parsed schema with this fingerprint; DecodeError naming it if unknown."""
        try:
            return self._schemas[fp]
        except KeyError:
            raise DecodeError(f"unknown Avro schema fingerprint {fp.hex()}") from None

    def schema_json(self, fp: bytes) -> str:
        """The JSON text registered for this fingerprint."""
        self.get(fp)
        return self._json[fp]

    def reader_schema(self, fp: bytes) -> Any:
        """Parsed schema :func:`decode` uses (logical types other than decimal removed)."""
        self.get(fp)
        return self._readers[fp]

    def __contains__(self, fp: object) -> bool:
        return fp in self._schemas

    def __len__(self) -> int:
        return len(self._schemas)


def decode(data: bytes, registry: SchemaRegistry) -> dict[str, Any]:
    """Decode one single-object encoded Avro datum (a key or a value).

    Raises DecodeError on a bad marker, a truncated or over-long datum, or an unknown
    fingerprint (named in hex).
    """
    if len(data) < _HEADER_LEN:
        raise DecodeError(f"Avro single-object datum too short ({len(data)} bytes)")
    if data[:2] != MAGIC:
        raise DecodeError(
            f"not Avro single-object encoding: starts with {bytes(data[:2]).hex()}, "
            f"expected {MAGIC.hex()}"
        )
    fp = bytes(data[2:_HEADER_LEN])
    if fp not in registry:
        raise DecodeError(f"unknown Avro schema fingerprint {fp.hex()}")
    schema = registry.reader_schema(fp)
    buf = io.BytesIO(data)
    buf.seek(_HEADER_LEN)
    try:
        datum = fastavro.schemaless_reader(buf, schema, None)
    except Exception as exc:
        raise DecodeError(f"cannot decode datum with schema {fp.hex()}: {exc}") from exc
    if buf.tell() != len(data):
        raise DecodeError(
            f"{len(data) - buf.tell()} trailing bytes after the datum (schema {fp.hex()})"
        )
    if not isinstance(datum, dict):
        raise DecodeError(f"datum with schema {fp.hex()} is not a record")
    return datum
