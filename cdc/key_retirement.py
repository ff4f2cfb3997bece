"""Retiring the keys of an old key schema after a table's key changed (pure, no I/O).

Why
---
A table's Kafka key is its key columns (the replica identity index, else the primary key:
:mod:`cdc.ddl_detection`) in the key schema of now.  When that schema changes (``ALTER
COLUMN id TYPE text``: ``5`` becomes ``'5'``; the primary key redefined: ``(id)`` becomes
``(a, b)``; the identity index replaced, the identity switched to or from USING INDEX),
the re-snapshot (:mod:`cdc.incremental_snapshot`)
sends every row again under its new key, but the rows last written under the old keys would
stay in the compacted topic, and a consumer that identifies rows by their key values (the
relay: ``row_key_text``, ``[5]`` and ``["5"]``) would hold both.  So a job whose table's
key schema changed (:func:`cdc.ddl_detection.key_changed`) first deletes the old keys,
then sends every row.

Which keys
----------
A *candidate* is a key the topic leaves present (:class:`cdc.recovery_deletes.LiveKeys`)
whose last event precedes a marker written when the job starts (after the DDL): every key
of the old key schema (no event after the DDL uses it, so none is written again), and every
key whose value the DDL changed without a row event (``ALTER COLUMN id TYPE int USING
id * 10`` keeps the key schema).  A candidate is deleted unless a row PostgreSQL has now
has the same key text (:func:`key_text`, the relay's row identity) in the same key columns
(a key of other columns, ``{id: 5}`` where the key is ``(code)`` now, is always deleted:
the row it names is sent again under its new key): ``int`` → ``bigint``
keeps every key's text (``[5]``), so nothing is deleted (the compacted topic then holds a
row's records under both key fingerprints, with the same datum, in the same partition);
``int`` → ``text`` deletes every old key.  A table left without key columns (``REPLICA
IDENTITY FULL``, ``DEFAULT`` or ``NOTHING`` without a primary key: its events have no Kafka
key from then on) has no row with a key text: every candidate is deleted, and no row is
sent again (a keyless table cannot be read in chunks, and consumers that fold the topic by
key hold none of its rows).

When and where
--------------
The deletes are placed like a re-snapshot chunk (:class:`RetireSet` rides on an
:class:`~cdc.resnapshot_stream.InFlightChunk`): the keys of PostgreSQL's rows are read in a
snapshot *S* between a low and a high watermark, the key texts streamed changes touch
between the watermarks (or before, invisible to *S*) drop their candidates, and the rest
are written as delete events (:func:`cdc.recovery_deletes.delete_value`, ``source.origin``
:data:`RETIRE_ORIGIN`, the old key columns in ``before``, the old value schema) at
``(H, seq)``, ``H`` the commit LSN of the high watermark's transaction.  So a delete never
follows a change of a row with the same key text (a row inserted after *S* under the new
key with an old key's text keeps it: its insert comes after the delete).  Every row of now
is then sent again, chunk by chunk, after the deletes: a consumer that names rows by other
columns than the new key (one still using the old key columns: ``[5]`` under both) may
see a row removed and then put back, never removed for good.  Every consumer, whether it
identifies rows by Kafka key bytes (compaction), by key text (the relay) or by the key
fields of each event's schema (replay), ends with PostgreSQL's rows.

The candidates are read from the topic only after the daemon's Kafka-acknowledged position
passed the marker (every event under the old key schema is then in the topic).  The deletes
go out before the job's progress (retirement over), in its Kafka transaction or earlier
ones; a daemon killed before it commits reads the topic again and deletes what is still
there (a key already deleted is not live any more: no key is deleted twice that way).

Concurrency: plain data and functions, used from the daemon's one thread.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Final

from core.avro_envelope import HEADER_LEN, SchemaRegistry, Source, TableCodec, decode
from core.errors import DecodeError, SchemaError
from core.row_wire import row_key_text

__all__ = [
    "KEYLESS_DONE",
    "OTHER_COLUMNS",
    "RETIRE_ORIGIN",
    "KeyTexts",
    "RetireSet",
    "key_columns",
    "key_text",
    "old_schema",
]

RETIRE_ORIGIN: Final = "fieldsync.retire"
"""``source.origin`` of the delete events of old keys."""

KEYLESS_DONE: Final = (
    "done: {} old key(s) deleted; the table has no key columns now (its events have no Kafka "
    "key): its rows are not sent again"
)
"""The status of a job whose table lost its key columns, once its old keys are deleted."""


OTHER_COLUMNS: Final = "\x00other columns:"
"""Prefix of the window text of an old key made of other columns than the key of now (key
texts are JSON arrays: none starts with it)."""


def key_columns(key_schema_json: str) -> tuple[str, ...]:
    """The PostgreSQL columns of a key schema, in key order (``pg.name`` of its fields)."""
    fields = json.loads(key_schema_json).get("fields", ())
    return tuple(str(f.get("pg.name", f["name"])) for f in fields)


def key_text(key: bytes, registry: SchemaRegistry) -> str:
    """The key values of a Kafka key as the relay names a row (``row_key_text``)."""
    return row_key_text(list(decode(key, registry).values()))


def old_schema(keys: Mapping[bytes, bytes], key_fingerprint: bytes | None) -> int:
    """How many of ``keys`` (Kafka key → value fingerprint) are under another key schema
    than ``key_fingerprint``."""
    return sum(1 for k in keys if bytes(k[2:HEADER_LEN]) != key_fingerprint)


class KeyTexts:
    """The key text of a row of the table of now, from its key columns' output text."""

    def __init__(self, codec: TableCodec) -> None:
        if codec.key_schema_json is None:
            raise ValueError(f"{codec.schema}.{codec.table} has no key columns")
        self.codec = codec
        self.registry = SchemaRegistry([codec.key_schema_json])
        self._positions = [i for i, c in enumerate(codec.columns) if c.is_key]
        self._width = len(codec.columns)
        self._source = Source(
            codec.db, codec.schema, codec.table, 0, 0, None, 0, None, "false", None
        )

    def of(self, values: Sequence[str | None]) -> str:
        """``values``: the key columns' text in the codec's key order."""
        before: list[object] = [None] * self._width
        for i, v in zip(self._positions, values, strict=True):
            before[i] = v
        key, _ = self.codec.encode_change("d", before, None, self._source, 0)
        assert key is not None
        return key_text(key, self.registry)


@dataclasses.dataclass
class RetireSet:
    """The candidates of one retirement, by key text: each text's Kafka keys with the value
    fingerprint of their last event, the schemas to write their deletes in, and the key
    texts of the rows of now (in the key order the stream's changes are seen in); ``texts``
    None when the table has no key columns now (its events have no Kafka key: no row of now
    has a key text, every candidate goes)."""

    by_text: dict[str, list[tuple[bytes, bytes]]]
    registry: SchemaRegistry
    texts: KeyTexts | None
    key_names: tuple[str, ...]

    @classmethod
    def build(
        cls,
        old: Mapping[bytes, bytes],
        registry: SchemaRegistry,
        texts: KeyTexts | None,
        key_names: tuple[str, ...],
    ) -> RetireSet:
        """``key_names``: the key columns of now.  A key of other columns (the identity
        index replaced: ``{id: 5}`` where the key is ``(code)`` now) names no row of now,
        whatever its text: it goes under a text of its own (:data:`OTHER_COLUMNS` and the
        key's bytes), which no row and no streamed change has."""
        by_text: dict[str, list[tuple[bytes, bytes]]] = {}
        columns: dict[bytes, tuple[str, ...]] = {}
        for key, fp in sorted(old.items()):
            key_fp = bytes(key[2:HEADER_LEN])
            if key_fp not in columns:
                columns[key_fp] = key_columns(registry.schema_json(key_fp))
            if texts is not None and columns[key_fp] != key_names:
                text = OTHER_COLUMNS + key.hex()
            else:
                text = key_text(key, registry)
            by_text.setdefault(text, []).append((key, fp))
        return cls(by_text, registry, texts, key_names)

    def gone(self, present: set[str]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """Window rows (key text, no row) of the candidates whose text no row has now."""
        return [((t,), ()) for t in sorted(self.by_text) if t not in present]

    def window_keys(self, keys: Sequence[tuple[str, ...]] | None) -> list[tuple[str, ...]] | None:
        """A streamed change's keys (key columns' text) as window keys (key texts); None
        when one cannot be told.  Without key columns now a change has no key, so it writes
        no key text again: nothing to drop."""
        if self.texts is None:
            return []
        if keys is None:
            return None
        try:
            return [(self.texts.of(k),) for k in keys]
        except (SchemaError, DecodeError):  # a key the codec cannot encode: cannot tell
            return None
