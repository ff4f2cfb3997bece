"""The device API's cursor: what a device has applied, handed back and forth opaquely.

A cursor names, per bucket, the last op id the device applied and the compaction epoch it
was read under (relay.downstream.bucket_store.BucketCheckpoint); buckets at op 0 are left
out.  :func:`encode_cursor` writes it as a zlib stream of the JSON ``[[bucket, op_id,
epoch], ...]``, base64url, prefixed ``c1.``.  A short JSON text (up to
:data:`STORED_MAX_BYTES`, a device's few buckets) goes in a stored (level 0) block with a
512-byte window: a stream every zlib reads, written in ~2 µs, where setting up a full
compressor cost ~10 µs a cursor, paid once per device for every message a fan-out
sends; a longer one is compressed at level 6.  :func:`decode_cursor` reads either back
and refuses
anything it did not issue (400 ``invalid_cursor``), with bounds on every size.  Tampering
with a cursor can only make the device re-read or skip its own buckets' ops (then its
checksums fail and it re-syncs); it never widens what it may read: the buckets come from
the token, the cursor only positions them.

Buckets a cursor names that the token no longer grants are reported as ``dropped``, at most
:data:`MAX_DROPPED` of them (and :data:`MAX_DROPPED_CHARS` characters) per message; the
rest stay in the cursor for the next one (:func:`split_dropped`, :func:`dropped_message`).

Pure: values in, values out; safe from any thread or coroutine.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson

from relay.api_errors import InvalidCursor
from relay.downstream.rules import parse_bucket_id

CURSOR_PREFIX: Final = "c1."
MAX_CURSOR_CHARS: Final = 65536
MAX_CURSOR_JSON_BYTES: Final = 1 << 20
MAX_BUCKET_ID_CHARS: Final = 16384
"""Longest bucket id a cursor may name (ids are built from token claims, at most 16 KiB)."""
MAX_OP_ID: Final = (1 << 63) - 1
STORED_MAX_BYTES: Final = 512
"""A cursor's JSON text up to this size is stored in its zlib stream, not compressed."""
MAX_DROPPED: Final = 1000
MAX_DROPPED_CHARS: Final = 65536
"""One changes message lists at most this many ``dropped`` buckets, of at most this many
characters in all; the rest stay in its cursor for the next message (``has_more``)."""


@dataclasses.dataclass(frozen=True)
class Cursor:
    """What a device has applied: per bucket the last op id and the compaction epoch it was
    read under (relay.downstream.bucket_store.BucketCheckpoint); buckets at op 0 are left out."""

    ops: Mapping[str, int] = dataclasses.field(default_factory=dict)
    epochs: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def for_buckets(self, buckets: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
        """The op ids of ``buckets`` (0 when absent) and the epochs known for them."""
        ops = {b: self.ops.get(b, 0) for b in buckets}
        return ops, {b: self.epochs[b] for b in buckets if b in self.epochs and ops[b] > 0}


def encode_cursor(cursors: Mapping[str, int], epochs: Mapping[str, int] | None = None) -> str:
    """The opaque cursor: ``[bucket, op_id, epoch]`` entries (op 0 left out), zlib, base64url."""
    known = epochs or {}
    items = sorted((b, int(n), int(known.get(b, 0))) for b, n in cursors.items() if n > 0)
    raw = orjson.dumps(items)
    if len(raw) <= STORED_MAX_BYTES:
        packer = zlib.compressobj(0, zlib.DEFLATED, 9, 1)
        packed = packer.compress(raw) + packer.flush()
    else:
        packed = zlib.compress(raw, 6)
    return CURSOR_PREFIX + base64.urlsafe_b64encode(packed).rstrip(b"=").decode("ascii")


def decode_cursor(text: str | None) -> Cursor:
    """The :class:`Cursor` in ``text``; empty for none.  Raises :class:`InvalidCursor`."""
    if text is None or text == "":
        return Cursor()
    if len(text) > MAX_CURSOR_CHARS:
        raise InvalidCursor(f"cursor is longer than {MAX_CURSOR_CHARS} characters")
    if not text.startswith(CURSOR_PREFIX):
        raise InvalidCursor("cursor was not issued by this relay (unknown format)")
    body = text[len(CURSOR_PREFIX) :]
    try:
        packed = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, MAX_CURSOR_JSON_BYTES)
        if inflater.unconsumed_tail or not inflater.eof:
            raise InvalidCursor("cursor is truncated or too large")
        items = json.loads(raw)
    except (binascii.Error, ValueError, zlib.error) as exc:
        raise InvalidCursor(f"cursor is corrupt ({type(exc).__name__})") from exc
    if not isinstance(items, list):
        raise InvalidCursor("cursor is corrupt (not a list)")
    ops: dict[str, int] = {}
    epochs: dict[str, int] = {}
    for item in items:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], str)
            or not all(type(v) is int and 0 <= v <= MAX_OP_ID for v in item[1:])
        ):
            raise InvalidCursor("cursor is corrupt (bad entry)")
        if len(item[0]) > MAX_BUCKET_ID_CHARS:
            raise InvalidCursor(f"cursor is corrupt (a bucket name of {len(item[0])} characters)")
        ops[item[0]], epochs[item[0]] = item[1], item[2]
    return Cursor(ops, epochs)


def _is_bucket_id(text: str) -> bool:
    try:
        parse_bucket_id(text)
    except ValueError:
        return False
    return True


def split_dropped(have: Cursor, granted: Sequence[str]) -> tuple[list[str], Cursor | None]:
    """The buckets ``have`` names that are not ``granted`` (to report as ``dropped``), at
    most :data:`MAX_DROPPED` of them and :data:`MAX_DROPPED_CHARS` characters; when more
    remain, also the cursor without the ones returned (the next message reports the rest).
    Names that are no bucket id at all were never sent by the relay: not reported."""
    kept = set(granted)
    gone = sorted(b for b in have.ops if b not in kept and _is_bucket_id(b))
    now: list[str] = []
    size = 0
    for b in gone:
        if len(now) >= MAX_DROPPED or (now and size + len(b) > MAX_DROPPED_CHARS):
            break
        now.append(b)
        size += len(b)
    if len(now) == len(gone):
        return now, None
    told = set(now)
    rest = Cursor(
        {b: n for b, n in have.ops.items() if b not in told},
        {b: e for b, e in have.epochs.items() if b not in told},
    )
    return now, rest


def dropped_message(dropped: Sequence[str], rest: Cursor) -> dict[str, Any]:
    """A changes message that only reports ``dropped`` buckets (more follow: ``has_more``;
    ``rest`` is what the cursor still names)."""
    return {
        "type": "changes",
        "ops": [],
        "cursor": encode_cursor(rest.ops, rest.epochs),
        "checkpoint": {"complete": False, "buckets": {}},
        "resync": [],
        "dropped": list(dropped),
        "has_more": True,
    }
