"""Kafka record batch bodies (message format v2), built in bulk; pure, no I/O.

Why: kafka-python's ``KafkaProducer.send`` costs tens of microseconds per record
(serializer hooks, partitioner, size estimate, accumulator locks, one future per
record, the record written by a general-purpose builder).  cdc writes hundreds of
thousands of small records per transaction, all already bytes, so
:mod:`cdc.kafka_sink` appends them here and hands kafka-python one finished
batch per partition instead (its sender still does everything else: producer id,
epoch and sequence, compression, CRC, transactions, retries).

Format (Kafka protocol, "Record" of RecordBatch v2)::

    length          varint   (bytes after this field)
    attributes      int8     (0)
    timestampDelta  varint   (ms since the batch's first timestamp)
    offsetDelta     varint   (index of the record in the batch)
    keyLength       varint   (-1: null key)
    key             bytes
    valueLength     varint   (-1: null value, a tombstone)
    value           bytes
    headerCount     varint
    headers         [headerKeyLength varint, headerKey utf-8, headerValueLength varint, value]

Every varint is a zigzag varint, the same encoding as an Avro long, so the Avro
encoder's tables are reused.  The batch header (61 bytes) is left as zeros at the
front of the buffer: kafka-python's ``DefaultRecordBatchBuilder.write_header``
fills it when the sender closes the batch.

Concurrency: a :class:`RecordBuffer` belongs to the one thread that appends to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from core.avro_binary import SMALL_VARINTS, encode_long

HEADER_SIZE: Final = 61
"""Size of a RecordBatch v2 header (baseOffset … recordCount)."""

_NULL: Final = encode_long(-1)

# Change events carry one header (the position), always under the same name: the count
# and the name's length and bytes are encoded once per name.
_ONE_HEADER_HEADS: Final[dict[str, bytes]] = {}
_MAX_HEADS: Final = 64


def _one_header_head(name: str) -> bytes:
    raw = name.encode("utf-8")
    head = encode_long(1) + encode_long(len(raw)) + raw
    if len(_ONE_HEADER_HEADS) < _MAX_HEADS:
        _ONE_HEADER_HEADS[name] = head
    return head


def _length(n: int) -> bytes:
    """Varint of a length (n >= 0): zigzag is n << 1, the table covers n < 8192."""
    z = n << 1
    return SMALL_VARINTS[z] if z < 16384 else encode_long(n)


def encode_headers(headers: Sequence[tuple[str, bytes]]) -> bytes:
    """The headers part of a record: count, then each key and value."""
    if len(headers) == 1:
        name, value = headers[0]
        head = _ONE_HEADER_HEADS.get(name) or _one_header_head(name)
        return head + _length(len(value)) + value
    parts = [encode_long(len(headers))]
    for name, value in headers:
        raw = name.encode("utf-8")
        parts += [encode_long(len(raw)), raw, encode_long(len(value)), value]
    return b"".join(parts)


class RecordBuffer:
    """The records of one batch for one partition, with a zeroed header in front."""

    __slots__ = ("buf", "count", "first_ts", "max_record", "max_ts")

    def __init__(self) -> None:
        self.buf = bytearray(HEADER_SIZE)
        self.count = 0
        self.first_ts = -1
        self.max_ts = -1
        self.max_record = 0

    def __len__(self) -> int:
        return len(self.buf)

    def append(
        self, timestamp_ms: int, key: bytes | None, value: bytes | None, headers: bytes
    ) -> int:
        """Append one record; ``headers`` as :func:`encode_headers` gives them.  Returns the
        record's size in bytes (length prefix included)."""
        if self.count == 0:
            self.first_ts = self.max_ts = timestamp_ms
        elif timestamp_ms > self.max_ts:
            self.max_ts = timestamp_ms
        body = b"".join(
            (
                b"\x00",
                encode_long(timestamp_ms - self.first_ts),
                _length(self.count),
                _NULL if key is None else _length(len(key)) + key,
                _NULL if value is None else _length(len(value)) + value,
                headers,
            )
        )
        prefix = _length(len(body))
        self.buf += prefix
        self.buf += body
        self.count += 1
        size = len(prefix) + len(body)
        if size > self.max_record:
            self.max_record = size
        return size
