"""Deletes that happened while a slot was lost: rows Kafka still holds that PostgreSQL no
longer has.

``fieldsync cdc recover`` (:mod:`cdc.slot_recovery`) has every published table sent again
as op ``r`` events (re-snapshots), which brings back every row PostgreSQL has, with its
values of now.  A row deleted while the slot was lost is not among them, and its delete
event was never written: Kafka would hold it forever.  So for each published table with a
primary key, recovery

1. reads the table's topic to its end (:func:`live_keys`, read_committed): the keys whose
   last event leaves the row present (``c``, ``u``, ``r``, after the table's last
   truncate), each with the fingerprint of that event's value schema (:class:`LiveKeys`,
   pure);
2. reads the primary keys of PostgreSQL's rows, after the new slot exists, and encodes them
   as Kafka keys with the table's codec of now (:func:`pg_keys`);
3. writes a delete event for every key of (1) not in (2) (:func:`delete_value`): op ``d``,
   ``before`` with the key columns (``before_kind = "key"``, as PostgreSQL sends deletes
   under REPLICA IDENTITY DEFAULT), ``source.origin = "fieldsync.recover"``, in the value
   schema of the row's last event, the Kafka key unchanged, at positions ``(S - 1, seq)``
   where ``S`` is the new slot's consistent point.

Why that is right: every change the new slot streams commits after ``S``, so it follows
the deletes.  A key absent at (2) whose row came back after ``S`` gets its insert from the
stream; a key present at (2) is sent again by its re-snapshot (or by a later change).  A
key whose Kafka key bytes differ from today's encoding (its key column changed type) is
deleted and sent again under the new key: consumers converge.  A row whose key changed in
an update is deleted again under its old key (its ``u`` event removed it already:
harmless).

Memory: per table, the Kafka keys live in the topic and those PostgreSQL has (bytes).

Concurrency: functions called by the recovery, on its one thread.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import fastavro
import psycopg
from psycopg import sql

from cdc.errors import CdcError
from cdc.kafka_sink import KafkaOptions, schemas_topic
from cdc.kafka_state import read_compacted, scan_topic
from cdc.metrics import OP_OFFSET
from core.avro_envelope import (
    MAGIC,
    POSITION_HEADER,
    SchemaRegistry,
    Source,
    TableCodec,
    decode,
    parse_position_header,
)
from core.errors import DecodeError
from core.pg_types import output_function_text
from core.value_schemas import read_value_schema

__all__ = [
    "RECOVER_ORIGIN",
    "LiveKeys",
    "delete_value",
    "live_keys",
    "pg_keys",
    "scan_live_keys",
    "schema_registry",
]

RECOVER_ORIGIN: Final = "fieldsync.recover"
"""``source.origin`` of the delete events recovery writes."""

_LIVE_OPS: Final = frozenset(b"cur")
_DELETE, _TRUNCATE = ord("d"), ord("t")
_FP: Final = slice(2, 10)  # the schema fingerprint of a single-object encoded datum

Position = tuple[int, int]


@dataclass
class LiveKeys:
    """The keys a table's topic leaves present, folded from its records (pure)."""

    keys: dict[bytes, tuple[Position, bytes]] = field(default_factory=dict)
    truncated_at: Position | None = None

    def add(self, key: bytes | None, value: bytes | None, position: Position) -> None:
        """One record of the topic (records of one key come in position order)."""
        if value is not None and len(value) > OP_OFFSET and value[OP_OFFSET] == _TRUNCATE:
            if self.truncated_at is None or position > self.truncated_at:
                self.truncated_at = position
            return
        if key is None:
            return  # a table without key columns: not swept
        if not value or len(value) <= OP_OFFSET:
            self.keys.pop(key, None)  # a tombstone (null value): the key is gone
            return
        op = value[OP_OFFSET]
        if op in _LIVE_OPS:
            self.keys[key] = (position, bytes(value[_FP]))
        elif op == _DELETE:
            self.keys.pop(key, None)

    def live(self, before: Position | None = None) -> dict[bytes, bytes]:
        """Kafka key → value-schema fingerprint of every key present (after a truncate);
        with ``before``, only those whose last event is at a lower position."""
        cut = self.truncated_at
        return {
            k: fp
            for k, (pos, fp) in self.keys.items()
            if (cut is None or pos > cut) and (before is None or pos < before)
        }


def live_keys(opts: KafkaOptions, topic: str, timeout_s: float) -> dict[bytes, bytes]:
    """:meth:`LiveKeys.live` of ``topic`` read to its end ({} when it does not exist)."""
    return scan_live_keys(opts, topic, timeout_s).live()


def scan_live_keys(opts: KafkaOptions, topic: str, timeout_s: float) -> LiveKeys:
    """``topic`` read to its end, folded into :class:`LiveKeys` (empty when it does not
    exist)."""
    folded = LiveKeys()

    def visit(record: Any) -> None:
        headers = dict(record.headers or ())
        raw = headers.get(POSITION_HEADER)
        if raw is None:
            raise DecodeError(
                f"{topic}[{record.partition}]@{record.offset}: no {POSITION_HEADER} header"
            )
        key = bytes(record.key) if record.key is not None else None
        value = bytes(record.value) if record.value is not None else None
        folded.add(key, value, parse_position_header(raw))

    scan_topic(opts, topic, visit, timeout_s, must_exist=False)
    return folded


def pg_keys(conn: psycopg.Connection[Any], codec: TableCodec, chunk: int = 10_000) -> set[bytes]:
    """The Kafka key of every row of the codec's table now (its key columns read as their
    output text, as pgoutput sends them, and encoded as a delete's key would be)."""
    columns = codec.columns
    keys = [i for i, c in enumerate(columns) if c.is_key]
    width = len(columns)
    source = Source(codec.db, codec.schema, codec.table, 0, 0, None, 0, None, "false", None)
    query = sql.SQL("select {} from {}").format(
        sql.SQL(", ").join(sql.Identifier(columns[i].name) for i in keys),
        sql.Identifier(codec.schema, codec.table),
    )
    out: set[bytes] = set()
    with conn.transaction(), conn.cursor(name="fieldsync_recover_keys") as cur:
        output_function_text(cur)
        cur.itersize = chunk
        cur.execute(query)
        for row in cur:
            before: list[object] = [None] * width
            for i, v in zip(keys, row, strict=True):
                before[i] = v
            key, _ = codec.encode_change("d", before, None, source, 0)
            assert key is not None
            out.add(key)
    return out


@dataclass(frozen=True, slots=True)
class DeleteAt:
    """Where and when a recovery delete is written."""

    db: str
    lsn: int  # recovery: the new slot's consistent point minus one
    seq: int
    ts_us: int
    origin: str = RECOVER_ORIGIN


def delete_value(key: bytes, fp: bytes, registry: SchemaRegistry, at: DeleteAt) -> bytes:
    """The value of a delete event for ``key`` in the value schema ``fp`` (both schemas in
    ``registry``): key columns from the Kafka key, every other column null."""
    value_schema = read_value_schema(json.loads(registry.schema_json(fp)))
    if value_schema is None:
        raise DecodeError(f"schema {fp.hex()} is not a change-event value schema")
    key_datum = decode(key, registry)
    before = {f: key_datum.get(f) for f in value_schema.fields}
    datum: Mapping[str, Any] = {
        "op": "d",
        "before": before,
        "before_kind": "key",
        "after": None,
        "unchanged": [],
        "source": {
            "db": at.db,
            "schema": value_schema.schema,
            "table": value_schema.table,
            "lsn": at.lsn,
            "commit_lsn": at.lsn,
            "txid": None,
            "seq": at.seq,
            "commit_ts_us": at.ts_us,
            "snapshot": "false",
            "origin": at.origin,
        },
        "ts_us": at.ts_us,
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, registry.reader_schema(fp), datum)
    return MAGIC + fp + buf.getvalue()


def fingerprints(keys: Mapping[bytes, bytes]) -> Iterator[bytes]:
    """The schema fingerprints a delete of each of ``keys`` needs: its value schema and
    its key's schema."""
    for key, fp in keys.items():
        yield fp
        yield bytes(key[_FP])


def schema_registry(
    opts: KafkaOptions, keys: Mapping[bytes, bytes], timeout_s: float
) -> SchemaRegistry:
    """The value and key schemas the deletes of ``keys`` (Kafka key → value fingerprint)
    are written in, read from ``{prefix}._schemas``; CdcError naming the missing ones."""
    topic = schemas_topic(opts.topic_prefix)
    wanted = {fp.hex().encode() for fp in fingerprints(keys)}
    found = read_compacted(opts, topic, wanted, timeout_s)
    missing = wanted - set(found)
    if missing:
        raise CdcError(
            f"schemas {sorted(fp.decode() for fp in missing)} are not in {topic}: "
            "the deletes cannot be encoded"
        )
    return SchemaRegistry(v.decode() for v in found.values())
