"""Avro change-event envelope: single-object encoding of events, decoding, position header.

Pure code: no I/O.  One :class:`TableCodec` exists per relation version (pgoutput Relation
message); it builds the table's key and value schemas once (:mod:`core.envelope_schema`),
precomputes a converter per column (:mod:`core.pg_type_mapping`) and an encoder per field
(:mod:`core.avro_binary`), and then turns raw pgoutput column values into Kafka key and
value bytes.  Readers decode them with a :class:`SchemaRegistry` of the schemas published in
``{prefix}._schemas`` and :func:`decode`; :func:`core.envelope_schema.read_value_schema`
tells what a value schema says about its table.

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

Fingerprints (:mod:`core.avro_schema`) cover only what the Parsing Canonical Form keeps
(names, types, sizes, enum symbols), not logical types or ``pg.*`` properties.  The type
mapping therefore puts everything that changes how a value is read into names: decimal
precision/scale is in the ``fixed`` type's name, and date, timestamp, timestamptz and
interval each carry their own special-value enum, so e.g. altering a column from timestamp
to timestamptz or from numeric(10,2) to numeric(12,4) yields a new fingerprint.

Encoding does not use fastavro's writer (its per-datum union resolution cost twice as much
as everything else): each schema is compiled once into small encoder functions, and tests
check the bytes against fastavro's.  Decoding uses fastavro.

Concurrency: encoding and decoding change no shared state except a small cache of encoded
source names (a dict insert, safe under the GIL), so a TableCodec and a SchemaRegistry may be
shared between threads; SchemaRegistry.add is not synchronized.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import fastavro

from core.avro_binary import Compiler, encode_long, encode_string, encode_string_array
from core.avro_schema import (
    avro_field_names,
    fingerprint,
    load_schema,
    parse_schema,
    schema_to_json,
    strip_logical,
)
from core.envelope_schema import envelope_schemas
from core.errors import DecodeError, SchemaError
from core.pg_type_mapping import ColumnCodec, column_codec
from core.pg_types import ColumnSpec, TypeCatalog
from core.pg_values import returns_text_unchanged

__all__ = [
    "HEADER_LEN",
    "MAGIC",
    "ORIGIN_MESSAGE_PREFIX",
    "POSITION_HEADER",
    "SchemaRegistry",
    "Source",
    "TableCodec",
    "decode",
    "parse_position_header",
    "position_header",
]

#: Marker of Avro single-object encoding.
MAGIC: Final = b"\xc3\x01"
#: Kafka header carrying the event's position, see :func:`position_header`.
POSITION_HEADER: Final = "fieldsync.pos"
#: Prefix of a transactional logical decoding message (``pg_logical_emit_message(true,
#: 'fieldsync.origin', 'device:d42')``) whose content becomes ``source.origin`` of every event
#: of its transaction: who made the change (the upstream applier names the device).
ORIGIN_MESSAGE_PREFIX = "fieldsync.origin"

#: Length of the single-object header: :data:`MAGIC` and the schema's 8-byte fingerprint.
HEADER_LEN: Final = len(MAGIC) + 8
_SNAPSHOT_VALUES: dict[object, str] = {
    False: "false",
    True: "true",
    "false": "false",
    "true": "true",
    "last": "last",
    "incremental": "incremental",
}


# --------------------------------------------------------------------------------------
# Position header
# --------------------------------------------------------------------------------------

_POSITION: Final = struct.Struct(">QQ")


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
# Encoding
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, init=False)
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

    def __init__(
        self,
        db: str,
        schema: str,
        table: str,
        lsn: int,
        commit_lsn: int,
        txid: int | None,
        seq: int,
        commit_ts_us: int | None,
        snapshot: str | bool = "false",
        origin: str | None = None,
    ) -> None:
        # written out: compiled, each object.__setattr__ is a plain store (the generated
        # __init__ runs as interpreted code)
        object.__setattr__(self, "db", db)
        object.__setattr__(self, "schema", schema)
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "lsn", lsn)
        object.__setattr__(self, "commit_lsn", commit_lsn)
        object.__setattr__(self, "txid", txid)
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "commit_ts_us", commit_ts_us)
        object.__setattr__(self, "snapshot", snapshot)
        object.__setattr__(self, "origin", origin)


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

        fields = [
            codec.avro_field(name)
            for codec, name in zip(self.column_codecs, self.field_names, strict=True)
        ]
        schemas = envelope_schemas(
            db=db,
            schema=schema,
            table=table,
            fields=fields,
            key_index=self._key_index,
            namespace_prefix=namespace_prefix,
        )
        self.value_schema_json: str = schema_to_json(schemas.value)
        self.value_schema: Any = parse_schema(schemas.value)
        self.value_fingerprint: bytes = fingerprint(schemas.value)
        self._value_header = MAGIC + self.value_fingerprint
        self._row_encoders = Compiler().fields(schemas.row)

        self.key_schema: Any | None = None
        self.key_schema_json: str | None = None
        self.key_fingerprint: bytes | None = None
        self._key_header = b""
        if schemas.key is not None:
            self.key_schema_json = schema_to_json(schemas.key)
            self.key_schema = parse_schema(schemas.key)
            self.key_fingerprint = fingerprint(schemas.key)
            self._key_header = MAGIC + self.key_fingerprint
        self._source_prefixes: dict[tuple[str, str, str], bytes] = {}
        # The source fields that stay the same for a whole transaction, encoded once: the
        # fields (db, schema, table), (commit_lsn, txid) and (commit_ts_us, snapshot,
        # origin), for the last Source seen and its field values; see _source_bytes.
        self._last_source: Source | None = None
        self._txn_fields: tuple[object, ...] = ()
        self._txn_parts: tuple[bytes, bytes, bytes] = (b"", b"", b"")

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

    def _source_bytes(self, source: Source, lsn: int, seq: int) -> bytes:
        """The encoded source record of an event at ``lsn`` and ``seq`` (those of ``source``
        itself are not used): only lsn and seq change from one event of a transaction to
        the next, the rest is encoded once per Source (and per change of its fields)."""
        if source is not self._last_source:
            fields = (
                source.db,
                source.schema,
                source.table,
                source.commit_lsn,
                source.txid,
                source.commit_ts_us,
                source.snapshot,
                source.origin,
            )
            if fields != self._txn_fields:
                self._txn_parts = self._txn_source_parts(source)
                self._txn_fields = fields
            self._last_source = source
        prefix, after_lsn, after_seq = self._txn_parts
        return b"".join([prefix, encode_long(lsn), after_lsn, encode_long(seq), after_seq])

    def _names_prefix(self, source: Source) -> bytes:
        names = (source.db, source.schema, source.table)
        prefix = self._source_prefixes.get(names)
        if prefix is None:
            prefix = b"".join(encode_string(n) for n in names)
            if len(self._source_prefixes) < 16:
                self._source_prefixes[names] = prefix
        return prefix

    def _txn_source_parts(self, source: Source) -> tuple[bytes, bytes, bytes]:
        """The encoded source fields before lsn, between lsn and seq, and after seq."""
        snapshot = _SNAPSHOT_BYTES.get(source.snapshot)
        if snapshot is None:
            raise ValueError(
                f"Source.snapshot must be 'true', 'last', 'false', 'incremental' or a bool, "
                f"got {source.snapshot!r}"
            )
        txid, ts, origin = source.txid, source.commit_ts_us, source.origin
        after_lsn = encode_long(source.commit_lsn) + (
            b"\x00" if txid is None else b"\x02" + encode_long(txid)
        )
        after_seq = b"".join(
            [
                b"\x00" if ts is None else b"\x02" + encode_long(ts),
                snapshot,
                b"\x00" if origin is None else b"\x02" + encode_string(origin),
            ]
        )
        return self._names_prefix(source), after_lsn, after_seq

    def encode_change(
        self,
        op: str,
        before: Sequence[object] | None,
        after: Sequence[object] | None,
        source: Source,
        ts_us: int,
        *,
        before_kind: str = "key",
        lsn: int | None = None,
        seq: int | None = None,
    ) -> tuple[bytes | None, bytes]:
        """Encode one row change; returns (Kafka key bytes or None, value bytes).

        ``before``/``after`` hold one raw pgoutput value per column (text, None for SQL NULL,
        or the unchanged sentinel).  ``before_kind`` says what ``before`` carries: ``"key"``
        for pgoutput's 'K' old tuple (REPLICA IDENTITY DEFAULT/INDEX: only the identity
        columns are set), ``"full"`` for its 'O' tuple (REPLICA IDENTITY FULL); the markers
        ``"K"``/``"O"`` themselves (e.g. the decoder's OldTupleKind) are accepted as well.
        ``lsn``/``seq``, when given, are the event's instead of those of ``source``: one
        Source then serves every event of a transaction in this table.
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
                encode_string_array(unchanged) if unchanged else b"\x00",
                self._source_bytes(
                    source, source.lsn if lsn is None else lsn, source.seq if seq is None else seq
                ),
                encode_long(ts_us),
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
                self._source_bytes(source, source.lsn, source.seq),
                encode_long(ts_us),
            ]
        )


_OP_BYTES: Final = {op: encode_string(op) for op in ("c", "u", "d", "r", "t")}
# The envelope's before_kind union is ["null", "string"]; pgoutput's 'K'/'O' are accepted.
_BEFORE_KIND_BYTES: Final = {
    "key": b"\x02" + encode_string("key"),
    "full": b"\x02" + encode_string("full"),
    "K": b"\x02" + encode_string("key"),
    "O": b"\x02" + encode_string("full"),
}
_SNAPSHOT_BYTES: Final[dict[object, bytes]] = {
    k: encode_string(v) for k, v in _SNAPSHOT_VALUES.items()
}


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
        loaded = load_schema(schema_json)
        fp = fingerprint(loaded)
        self._schemas[fp] = parse_schema(loaded)
        self._readers[fp] = parse_schema(strip_logical(loaded, frozenset({"decimal"})))
        self._json[fp] = schema_json if isinstance(schema_json, str) else schema_to_json(loaded)
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

    def schema_texts(self) -> list[str]:
        """The JSON text of every schema, in the order they were first added."""
        return list(self._json.values())

    def __contains__(self, fp: object) -> bool:
        return fp in self._schemas

    def __len__(self) -> int:
        return len(self._schemas)


def decode(data: bytes, registry: SchemaRegistry) -> dict[str, Any]:
    """Decode one single-object encoded Avro datum (a key or a value).

    Raises DecodeError on a bad marker, a truncated or over-long datum, or an unknown
    fingerprint (named in hex).
    """
    if len(data) < HEADER_LEN:
        raise DecodeError(f"Avro single-object datum too short ({len(data)} bytes)")
    if data[:2] != MAGIC:
        raise DecodeError(
            f"not Avro single-object encoding: starts with {bytes(data[:2]).hex()}, "
            f"expected {MAGIC.hex()}"
        )
    fp = bytes(data[2:HEADER_LEN])
    if fp not in registry:
        raise DecodeError(f"unknown Avro schema fingerprint {fp.hex()}")
    schema = registry.reader_schema(fp)
    buf = io.BytesIO(data)
    buf.seek(HEADER_LEN)
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
