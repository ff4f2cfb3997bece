"""Change events too large for Kafka: the error naming them (pure, no I/O).

A record larger than ``kafka.max_message_bytes`` (the producer's ``max_request_size``) is
never sent and never skipped: the Kafka transaction is aborted and the daemon stops with
:class:`cdc.errors.RecordTooLarge`, whose message (:func:`too_large_message`) names the
table, the row's key, the commit LSN and the largest columns of the event, and the ways on
(raise the limit with the broker's, or leave the column out of the publication).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from cdc.errors import RecordTooLarge
from core.avro_envelope import HEADER_LEN, MAGIC, POSITION_HEADER, SchemaRegistry, decode
from core.errors import DecodeError
from core.positions import format_lsn
from core.row_wire import row_key_text

__all__ = ["LARGEST_SHOWN", "too_large", "too_large_message", "value_size"]

LARGEST_SHOWN: Final = 3
"""How many of the event's largest columns the message names."""

REMEDY: Final = (
    "raise kafka.max_message_bytes (with the broker's message.max.bytes or the topic's "
    "max.message.bytes, and the consumers' fetch sizes) or leave the column out of the "
    "publication; the event is not skipped"
)


def value_size(value: Any) -> int:
    """About the bytes of one decoded column value (its text form for non-strings)."""
    if value is None:
        return 0
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(value_size(v) for v in value)
    return len(str(value))


def too_large_message(
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    size: int,
    limit: int,
    schemas: Mapping[bytes, str],
) -> str:
    """The error of a record of ``size`` bytes over ``limit``: the table, key, position and
    largest columns as far as ``schemas`` (fingerprint → Avro schema JSON, those the sink
    published) decode them; the topic and the raw key otherwise."""
    where = _position(headers)
    about = f"the change event for {topic}"
    event = _decoded(value, schemas)
    if event is not None:
        source = event.get("source") or {}
        about = (
            f"the {_OPS.get(str(event.get('op')), 'change')} of "
            f"{source.get('schema')}.{source.get('table')}"
        )
        if where is None and source.get("commit_lsn") is not None:
            where = f"commit LSN {format_lsn(int(source['commit_lsn']))}"
    about += f" (key {_key_text(key, schemas)})"
    if where is not None:
        about += f" at {where}"
    largest = _largest_columns(event) if event is not None else ""
    return (
        f"{about} is a Kafka record of {size} bytes, more than kafka.max_message_bytes "
        f"({limit}){largest}: {REMEDY}"
    )


def too_large(
    limit: int,
    schemas: Mapping[bytes, str],
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    size: int,
) -> RecordTooLarge:
    """The :class:`RecordTooLarge` of a record of ``size`` bytes (:func:`too_large_message`)."""
    message = too_large_message(topic, key, value, headers, size, limit, schemas)
    return RecordTooLarge(message, topic, size, limit)


_OPS: Final = {"c": "insert", "u": "update", "d": "delete", "r": "snapshot row"}


def _position(headers: Sequence[tuple[str, bytes]]) -> str | None:
    for name, raw in headers:
        if name == POSITION_HEADER and len(raw) == 16:
            lsn, seq = int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:], "big")
            return f"commit LSN {format_lsn(lsn)} (event {seq} of its transaction)"
    return None


def _registry(datum: bytes | None, schemas: Mapping[bytes, str]) -> SchemaRegistry | None:
    if datum is None or len(datum) < HEADER_LEN or datum[:2] != MAGIC:
        return None
    schema = schemas.get(bytes(datum[2:HEADER_LEN]))
    return None if schema is None else SchemaRegistry([schema])


def _decoded(value: bytes | None, schemas: Mapping[bytes, str]) -> dict[str, Any] | None:
    registry = _registry(value, schemas)
    if registry is None or value is None:
        return None
    try:
        return decode(value, registry)
    except (DecodeError, ValueError, TypeError, EOFError):
        return None


def _key_text(key: bytes | None, schemas: Mapping[bytes, str]) -> str:
    if key is None:
        return "none: the table has no primary key"
    registry = _registry(key, schemas)
    if registry is not None:
        try:
            return row_key_text(list(decode(key, registry).values()))[:200]
        except (DecodeError, ValueError, TypeError, EOFError):
            pass
    return f"{bytes(key[:80])!r}"


def _largest_columns(event: Mapping[str, Any]) -> str:
    row = event.get("after") or event.get("before")
    if not isinstance(row, Mapping) or not row:
        return ""
    sizes = sorted(((value_size(v), str(c)) for c, v in row.items()), reverse=True)
    shown = ", ".join(f"{c} {n} bytes" for n, c in sizes[:LARGEST_SHOWN] if n)
    return f"; largest columns: {shown}" if shown else ""
