"""Rows on the device protocol's wire: canonical values, row keys and checksums.

The relay and the device agent must compute these identically, byte for byte:

- :func:`json_value` turns a decoded change-event datum into the JSON-compatible value rows
  are stored, served and journaled in;
- :func:`canonical_json` is the one text form of such a value (sorted keys, no whitespace),
  the bytes a device receives and the bytes a checksum is computed from;
- :func:`row_key_text` identifies a row inside a bucket by its primary-key values;
- :func:`row_checksum` is a row's term in its bucket's checksum, summed modulo
  :data:`CHECKSUM_MODULUS` (:func:`checksum_add`).

Everything here is pure (no I/O) and imports no server library: a device installs it alone.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import math
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Final

import orjson

__all__ = [
    "CHECKSUM_MODULUS",
    "PLAIN_TYPES",
    "canonical_json",
    "checksum_add",
    "json_value",
    "row_checksum",
    "row_key_text",
]

CHECKSUM_MODULUS: Final = 1 << 64


# --------------------------------------------------------------------------- canonical values


def json_value(value: Any) -> Any:
    """A decoded Avro datum as a JSON-compatible value (the form rows are stored and served in).

    ``None``, booleans, integers and strings stay as they are; a finite float stays a float
    (``NaN``/``Infinity``/``-Infinity`` become those strings); :class:`~decimal.Decimal`
    becomes its exact text (``"12.50"``); bytes become base64 text; UUIDs their hyphenated
    text; dates and times ISO 8601 text; lists and mappings are converted element-wise.
    Dates, times and timestamps decoded from the change events are already integers (days
    / microseconds, see docs/events.md) and stay integers.
    """
    kind = type(value)
    if kind in PLAIN_TYPES:
        return value
    if kind is dict:
        if all(type(v) in PLAIN_TYPES for v in value.values()):
            return value
        return {str(k): json_value(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    raise TypeError(f"cannot represent a {type(value).__name__} value as JSON: {value!r:.80}")


PLAIN_TYPES: Final = frozenset({str, int, bool, type(None)})
"""Types whose values :func:`json_value` returns unchanged."""


def canonical_json(value: Any) -> str:
    """Canonical JSON text of a JSON-compatible value: object keys sorted, no whitespace,
    non-ASCII kept as UTF-8, floats in shortest round-trip form (``orjson`` with
    ``OPT_SORT_KEYS``; equal to ``json.dumps(value, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`` except for exponents, e.g. ``1e-7`` where json writes ``1e-07``).
    Re-serializing parsed canonical JSON with this function gives the same text."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode("utf-8")
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise TypeError(f"not canonical-JSON-able: {exc}: {value!r:.80}") from exc


def row_key_text(key: Sequence[Any]) -> str:
    """The canonical text of a row's primary-key values: ``canonical_json([json_value(v)...])``."""
    if len(key) == 1 and type(key[0]) is int:
        return f"[{key[0]}]"
    return canonical_json([json_value(v) for v in key])


def row_checksum(table: str, row_key: str, data: Mapping[str, Any]) -> int:
    """A row's contribution to its bucket's checksum, an unsigned 64-bit integer.

    The first 8 bytes (big-endian) of SHA-256 over the UTF-8 of
    ``canonical_json([table, row_key, data])``; ``row_key`` is :func:`row_key_text` and
    ``data`` the row exactly as served (parsed JSON).  Devices compute the same.
    """
    text = canonical_json([table, row_key, data])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def checksum_add(checksum: int, delta: int) -> int:
    """``(checksum + delta) mod 2**64``; ``delta`` may be negative (a row's removal)."""
    return (checksum + delta) % CHECKSUM_MODULUS
