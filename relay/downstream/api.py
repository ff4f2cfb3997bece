"""The device API: an ASGI app (FastAPI) serving each device its own buckets.

Endpoints (all under ``/v1`` except the last two; every ``/v1`` call needs
``Authorization: Bearer <JWT>``, checked by :class:`relay.auth.Authenticator`)::

    GET /v1/schema                           tables and columns this token may see
    GET /v1/changes?cursor=&limit=&wait=     ops after the cursor (long-poll up to ``wait`` s)
    GET /v1/checkpoint                       current checkpoint (checksums) of the device's buckets
    POST /v1/journal, GET /v1/outcomes, GET /v1/conflicts, POST /v1/conflicts/{id}/resolve
                                             device edits (relay/upstream/journal_api.py), when mounted
    WS  /v1/stream?cursor=                   the same change messages, pushed
    GET /openapi.json                        OpenAPI description (also /docs)
    GET /healthz                             liveness and store reachability (no auth)

Protocol (docs/relay.md, "Device API", is the reference for clients):

- A device syncs the buckets its token's claims grant
  (:meth:`relay.downstream.rules.Rules.buckets_for_claims`); no parameter of any request
  can name another bucket.
- A *changes message* carries ``ops`` (each ``op_id``, ``bucket``, ``op``
  ``PUT``/``REMOVE``, ``table``, ``key``, ``data``, ``position`` ``[commit_lsn, seq]``
  of the change event behind the op), the next ``cursor``, a
  ``checkpoint`` (per bucket ``last_op_id``, ``count``, ``checksum`` as a
  decimal string, ``complete``; and ``complete`` overall), ``resync`` (buckets
  the device must empty and read again), ``dropped`` (buckets in the cursor the
  token no longer grants) and ``has_more``.  A device buffers ops until a
  message whose ``checkpoint.complete`` is true, then applies them in one
  transaction and checks every bucket's checksum (relay.downstream.bucket_store).
- The cursor is opaque to clients: :func:`encode_cursor` of the per-bucket
  op ids and compaction epochs (zlib-compressed JSON, base64url, prefixed
  ``c1.``).  Tampering with
  it can only make the device re-read or skip its own buckets' ops (then its
  checksums fail and it re-syncs); it never widens what it may read.

Errors all have the shape of :mod:`relay.api_errors`.  Limits: request body size
(413, also after gzip request decompression) and time (408), concurrent connections
(503; the server also caps and times out connections before they become requests,
relay/server.py), per-device request rate (429 + ``Retry-After``; a WebSocket connection
counts as one request, and so does each message a client sends on it), and the size of
``dropped`` in one message (the rest follows).  A client that disconnects mid-request is
logged as such.

Concurrency model: one asyncio event loop (uvicorn).  Store reads run in worker
threads (``read_ops_async``); long-polls and WebSocket streams wait on the
store's shared change listener (``wait_for_change_async``), so an idle
connection holds no thread and no database connection.  A device catching up
(``has_more``) gets its next page read ahead while it processes the current one
(:class:`Prefetcher` for HTTP, a read-ahead task in the stream).
:class:`RateLimiter`, :class:`Prefetcher` and the connection counter are only
touched from the event loop.  (No ``from __future__ import annotations`` here:
FastAPI reads the endpoint annotations at runtime, and some close over
configuration values.)
"""

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, TypeVar

import orjson
from fastapi import FastAPI, Query, Request, Security, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.api_errors import (
    ApiError,
    ErrorMessage,
    InvalidCursor,
    RateLimited,
    RequestTooLarge,
    Unavailable,
    error_response,
    install_error_handlers,
    ws_close_code,
)
from relay.auth import Authenticator, DeviceIdentity
from relay.downstream.bucket_store import BucketCheckpoint, BucketStore, Op, OpsPage
from relay.downstream.rules import Rules, parse_bucket_id
from relay.errors import AuthError, DeviceRevoked, RelayError, TokenExpired

if TYPE_CHECKING:
    from relay.upstream.journal_api import JournalApi

log = logging.getLogger("relay.downstream.api")
_T = TypeVar("_T")

API_VERSION: Final = "v1"
CURSOR_PREFIX: Final = "c1."
MAX_CURSOR_CHARS: Final = 65536
MAX_CURSOR_JSON_BYTES: Final = 1 << 20
MAX_BUCKET_ID_CHARS: Final = 16384
"""Longest bucket id a cursor may name (ids are built from token claims, at most 16 KiB)."""
MAX_OP_ID: Final = (1 << 63) - 1
MAX_DROPPED: Final = 1000
MAX_DROPPED_CHARS: Final = 65536
"""One changes message lists at most this many ``dropped`` buckets, of at most this many
characters in all; the rest stay in its cursor for the next message (``has_more``)."""
WS_AUTH_TIMEOUT_S: Final = 10.0
WS_RECHECK_S: Final = 30.0
"""A WebSocket stream re-checks revocation at least this often while idle."""


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    """Limits and tuning of the device API (from ``[http]``, see relay/settings.py)."""

    max_body_bytes: int = 1_048_576
    max_page_ops: int = 5000
    default_page_ops: int = 1000
    long_poll_s: float = 30.0
    rate_per_s: float = 20.0
    rate_burst: int = 40
    max_connections: int = 10000
    gzip_min_bytes: int = 1024
    gzip_level: int = 1
    counters: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    """Per table, the columns the applier merges as counters (policy ``counter`` in the
    conflicts file): ``/v1/schema`` names them, so devices show an open edit of such a
    column as a delta on top of the server's value."""
    body_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_page_ops", "default_page_ops", "rate_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"ApiConfig.{name} must be >= 1")
        if not self.body_timeout_s > 0:
            raise ValueError("ApiConfig.body_timeout_s must be > 0")
        if self.long_poll_s < 0 or self.rate_per_s < 0:
            raise ValueError("ApiConfig.long_poll_s and rate_per_s must be >= 0")
        if not 1 <= self.gzip_level <= 9:
            raise ValueError("ApiConfig.gzip_level must be 1..9")

    @property
    def page_default(self) -> int:
        return min(self.default_page_ops, self.max_page_ops)


# --------------------------------------------------------------------------- cursor


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
    raw = json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode()
    packed = base64.urlsafe_b64encode(zlib.compress(raw, 6)).rstrip(b"=")
    return CURSOR_PREFIX + packed.decode("ascii")


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


# --------------------------------------------------------------------------- rate limiting


class RateLimiter:
    """Per-device token buckets: ``rate`` requests/s refill, ``burst`` capacity.

    ``rate == 0`` disables limiting.  Entries of devices idle long enough to be
    full again are dropped when the table grows, so memory stays bounded by the
    number of recently active devices.  Not thread-safe: call from one event loop.
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._state: dict[str, tuple[float, float]] = {}
        self._sweep_at = 1024

    def __len__(self) -> int:
        return len(self._state)

    def check(self, device_id: str) -> float:
        """Take one token; returns 0.0 if allowed, else the seconds until one is available."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, last = self._state.get(device_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._state[device_id] = (tokens - 1.0, now)
            if len(self._state) > self._sweep_at:
                self._sweep(now)
            return 0.0
        self._state[device_id] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _sweep(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._state = {d: s for d, s in self._state.items() if now - s[1] < full_after}
        self._sweep_at = max(1024, 2 * len(self._state))


# --------------------------------------------------------------------------- schema


def visible_schema(
    rules: Rules, buckets: Sequence[str], counters: Mapping[str, Sequence[str]] | None = None
) -> dict[str, Any]:
    """The tables and columns a device syncing ``buckets`` receives (schema endpoint body).

    Per table: its columns in table order (the union over the device's bucket
    rules of each rule's projection; key columns always), its primary key, the
    rules through which the device gets rows of it, and which of its columns are
    ``counters`` (merged by adding deltas).
    """
    rule_names = sorted({rules.rule_of_bucket(b).name for b in buckets})
    columns: dict[str, set[str]] = {}
    via: dict[str, list[str]] = {}
    for name in rule_names:
        for table in rules.buckets[name].tables:
            info = rules.table_info(table)
            probe = dict.fromkeys(info.columns)
            columns.setdefault(table, set()).update(rules.project(table, name, probe))
            via.setdefault(table, []).append(name)
    tables = []
    for table in sorted(columns):
        info = rules.table_info(table)
        shown = [c for c in info.columns if c in columns[table]]
        tables.append(
            {
                "name": table,
                "columns": shown,
                "key": list(info.key),
                "rules": via[table],
                "counters": [c for c in shown if c in (counters or {}).get(table, ())],
            }
        )
    return {"tables": tables, "buckets": sorted(buckets)}


# --------------------------------------------------------------------------- messages


def checkpoint_json(checkpoints: Mapping[str, BucketCheckpoint]) -> dict[str, Any]:
    return {
        "buckets": {
            b: {"last_op_id": cp.last_op_id, "count": cp.count, "checksum": str(cp.checksum)}
            for b, cp in sorted(checkpoints.items())
        }
    }


def ops_json(ops: Sequence[Op]) -> str:
    """The ``ops`` array as JSON text; the store's canonical ``row_key`` and ``data_json``
    texts are embedded verbatim (no parse and re-serialize per row)."""
    names: dict[str, str] = {}
    parts = []
    for op in ops:
        bucket = names.get(op.bucket)
        if bucket is None:
            bucket = names[op.bucket] = orjson.dumps(op.bucket).decode()
        table = names.get(op.table)
        if table is None:
            table = names[op.table] = orjson.dumps(op.table).decode()
        data = op.data_json if op.data_json is not None else "null"
        parts.append(
            f'{{"op_id":{op.op_id:d},"bucket":{bucket},"op":"{op.kind.value}",'
            f'"table":{table},"key":{op.row_key},"data":{data},'
            f'"position":[{op.position[0]:d},{op.position[1]:d}]}}'
        )
    return "[" + ",".join(parts) + "]"


def changes_message(page: OpsPage, dropped: Sequence[str]) -> dict[str, Any]:
    """The changes message for a page read from the store (serialize with :func:`dumps`)."""
    ops = orjson.Fragment(ops_json(page.ops))
    buckets: dict[str, Any] = {}
    complete = True
    for b, cp in sorted(page.checkpoints.items()):
        done = b not in page.resync and page.cursors.get(b, 0) >= cp.last_op_id
        complete = complete and done
        buckets[b] = {
            "last_op_id": cp.last_op_id,
            "count": cp.count,
            "checksum": str(cp.checksum),
            "complete": done,
        }
    return {
        "type": "changes",
        "ops": ops,
        "cursor": encode_cursor(page.cursors, page.epochs),
        "checkpoint": {"complete": complete and not page.has_more, "buckets": buckets},
        "resync": sorted(page.resync),
        "dropped": list(dropped),
        "has_more": page.has_more,
    }


def dumps(message: Mapping[str, Any]) -> bytes:
    return orjson.dumps(message)


class OrjsonResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


# ---- OpenAPI models (documentation of the shapes above; responses are built by hand)


class OpModel(BaseModel):
    op_id: int = Field(description="store-wide op id; ordered within a bucket")
    bucket: str
    op: Literal["PUT", "REMOVE"]
    table: str = Field(description="schema.table")
    key: list[Any] = Field(description="primary-key values in key-column order")
    data: dict[str, Any] | None = Field(
        description="PUT: the row as the bucket's rule projects it (canonical JSON); REMOVE: null"
    )
    position: list[int] = Field(
        description="[commit_lsn, seq] of the change event behind the op; a device edit "
        "of this row version sends it as the journal entry's base"
    )


class BucketCheckpointModel(BaseModel):
    last_op_id: int
    count: int = Field(description="rows in the bucket")
    checksum: str = Field(
        description="sum mod 2**64 of row_checksum over the bucket's rows, decimal text"
    )
    complete: bool = Field(
        default=True, description="the message's ops bring the bucket up to last_op_id"
    )


class CheckpointModel(BaseModel):
    complete: bool = Field(
        default=True, description="every bucket is complete: apply the buffered ops now"
    )
    buckets: dict[str, BucketCheckpointModel]


class ChangesMessage(BaseModel):
    type: Literal["changes"] = "changes"
    ops: list[OpModel]
    cursor: str = Field(description="opaque; send it back as ?cursor= to continue")
    checkpoint: CheckpointModel
    resync: list[str] = Field(description="buckets to empty and read again from scratch")
    dropped: list[str] = Field(description="buckets the token no longer grants: delete their rows")
    has_more: bool = Field(description="more ops are waiting: ask again at once")


class TableModel(BaseModel):
    name: str
    columns: list[str]
    key: list[str]
    rules: list[str]
    counters: list[str] = Field(
        default_factory=list,
        description="columns merged by adding deltas (conflict policy counter): a device "
        "shows an open edit of one as its delta on top of the server's value",
    )


class SchemaMessage(BaseModel):
    tables: list[TableModel]
    buckets: list[str]


class HealthMessage(BaseModel):
    status: Literal["ok", "degraded"]
    store: Literal["ok", "unreachable"]


_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorMessage} for s in (400, 401, 403, 413, 422, 429, 500, 503)
}


# --------------------------------------------------------------------------- limits middleware


class LimitsMiddleware:
    """Connection count (503), request body size (413) and body time (408) limits; gzip
    request bodies.

    A request with ``Content-Encoding: gzip`` is decompressed here, and the
    limit applies to the decompressed size.  The body must arrive within
    ``body_timeout_s`` of the request reaching the app (its headers complete).  Errors use
    the one error shape.  (The server counts and times out connections before they become
    requests: relay/server.py.)
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        max_connections: int,
        body_timeout_s: float = 60.0,
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_connections = max_connections
        self.body_timeout_s = body_timeout_s
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_connections:
            await self._refuse(scope, receive, send)
            return
        self.active += 1
        try:
            if scope["type"] == "http":
                await self._http(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            self.active -= 1

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            503,
            "unavailable",
            f"the relay holds its maximum of {self.max_connections} connections; retry later",
            {"Retry-After": "5"},
        )
        if scope["type"] == "http":
            await response(scope, receive, send)
        elif "websocket.http.response" in scope.get("extensions", {}):
            await receive()  # websocket.connect
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 503,
                    "headers": response.raw_headers,
                }
            )
            await send({"type": "websocket.http.response.body", "body": response.body})
        else:
            await receive()
            await send({"type": "websocket.close", "code": 1013})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        length = headers.get(b"content-length")
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await error_response(400, "bad_request", "Content-Length is not a number")(
                    scope, receive, send
                )
                return
            if encoding == b"identity" and declared > self.max_body:
                await self._too_large(scope, receive, send)
                return
        if encoding not in (b"identity", b"gzip"):
            await error_response(
                400,
                "bad_request",
                f"Content-Encoding {encoding.decode('latin-1')!r} is not supported (use gzip)",
            )(scope, receive, send)
            return
        body_reader = _BodyReader(
            receive, self.max_body, gzip=encoding == b"gzip", timeout_s=self.body_timeout_s
        )
        if encoding == b"gzip":
            scope = dict(scope)
            scope["headers"] = [
                (k, v)
                for k, v in scope["headers"]
                if k.lower() not in (b"content-encoding", b"content-length")
            ]
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, body_reader.receive, send_wrapper)
        except _BodyLimitExceeded as exc:
            if started:
                raise
            if exc.status == 413:
                await self._too_large(scope, receive, send)
            elif exc.status == 408:
                log.info("request %s %s: %s", scope.get("method"), scope.get("path"), exc.message)
                await error_response(408, "request_timeout", exc.message, {"Connection": "close"})(
                    scope, receive, send
                )
            else:
                await error_response(400, "bad_request", exc.message)(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = RequestTooLarge(self.max_body)
        await JSONResponse(err.to_dict(), status_code=413, headers={"Connection": "close"})(
            scope, receive, send
        )


class _BodyLimitExceeded(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _BodyReader:
    """Wraps ``receive``: counts (decompressed) body bytes, stops past the limit, and
    past the deadline for the whole body (``timeout_s`` from its creation)."""

    def __init__(self, receive: Receive, limit: int, gzip: bool, timeout_s: float = 60.0) -> None:
        self._receive = receive
        self._limit = limit
        self._seen = 0
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._complete = False

    async def receive(self) -> Message:
        if self._complete:  # the body is in; later calls wait for a disconnect: no deadline
            return await self._receive()
        try:
            message = await asyncio.wait_for(
                self._receive(), max(0.0, self._deadline - time.monotonic())
            )
        except TimeoutError:
            raise _BodyLimitExceeded(
                408,
                f"the request body did not arrive within {self._timeout_s:g} s "
                f"({self._seen} bytes came)",
            ) from None
        if message["type"] != "http.request":
            return message
        self._complete = not message.get("more_body", False)
        body: bytes = message.get("body", b"")
        if self._inflate is not None:
            try:
                body = self._inflate.decompress(body, self._limit - self._seen + 1)
                if self._inflate.unconsumed_tail:
                    raise _BodyLimitExceeded(413, "too large")
                if not message.get("more_body", False) and not self._inflate.eof:
                    raise _BodyLimitExceeded(400, "gzip request body is truncated")
            except zlib.error as exc:
                raise _BodyLimitExceeded(400, f"gzip request body is corrupt: {exc}") from exc
        self._seen += len(body)
        if self._seen > self._limit:
            raise _BodyLimitExceeded(413, "too large")
        return {**message, "body": body}


# --------------------------------------------------------------------------- the app


PrefetchKey = tuple[str, tuple[str, ...], str, int]
"""(device id, its buckets, cursor text, limit) of a page read ahead."""


class Prefetcher:
    """Pages read ahead for devices that are catching up (``has_more``).

    While a device parses page N, the relay already reads page N+1 from the
    store; the device's next request (same device, buckets, cursor and limit)
    takes it.  At most ``size`` pages are held, each for at most ``ttl_s``
    seconds; older ones are dropped.  A page read ahead comes from a slightly
    earlier store snapshot, which is exactly what the device would have got by
    asking a moment sooner.  Event-loop only.
    """

    def __init__(self, size: int = 16, ttl_s: float = 30.0) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._pages: dict[PrefetchKey, tuple[float, asyncio.Task[OpsPage]]] = {}

    def __len__(self) -> int:
        return len(self._pages)

    def start(self, key: PrefetchKey, read: Awaitable[OpsPage]) -> None:
        now = time.monotonic()
        for k, (at, task) in list(self._pages.items()):
            if now - at > self.ttl_s or len(self._pages) >= self.size:
                del self._pages[k]
                task.cancel()
        task = asyncio.ensure_future(read)
        task.add_done_callback(_retrieve)
        self._pages[key] = (now, task)

    def take(self, key: PrefetchKey) -> asyncio.Task[OpsPage] | None:
        entry = self._pages.pop(key, None)
        if entry is None or time.monotonic() - entry[0] > self.ttl_s:
            return None
        return entry[1]


def _retrieve(task: asyncio.Task[OpsPage]) -> None:
    """Mark a read-ahead's exception as seen (it resurfaces when the page is taken)."""
    if not task.cancelled():
        task.exception()


@dataclasses.dataclass
class ApiState:
    """What the endpoints share: set once in :func:`create_app`."""

    store: BucketStore
    rules: Rules
    authenticator: Authenticator
    config: ApiConfig
    limiter: RateLimiter
    prefetch: Prefetcher = dataclasses.field(default_factory=Prefetcher)


def _granted(state: ApiState, identity: DeviceIdentity) -> list[str]:
    return sorted(state.rules.buckets_for_claims(identity.claims))


async def _read_page(
    state: ApiState, cursors: Mapping[str, int], limit: int, epochs: Mapping[str, int]
) -> OpsPage:
    try:
        return await state.store.read_ops_async(cursors, limit, epochs)
    except RelayError as exc:
        log.warning("bucket store read failed: %s", exc)
        raise Unavailable("the bucket store cannot be read right now; retry shortly") from exc


async def next_changes(
    state: ApiState,
    buckets: Sequence[str],
    have: Cursor,
    limit: int,
    wait_s: float,
    wait_always: bool,
) -> OpsPage:
    """Read the next page for ``buckets``; if there is nothing new, wait up to ``wait_s``.

    "Nothing new": no ops, no resync and no cursor moved.  Unless ``wait_always``,
    a first read (empty cursor) returns at once so the device gets a checkpoint.
    """
    wanted, epochs = have.for_buckets(buckets)
    deadline = time.monotonic() + wait_s
    while True:
        page = await _read_page(state, wanted, limit, epochs)
        nothing_new = not page.ops and not page.resync and dict(page.cursors) == wanted
        if not nothing_new or (not have.ops and not wait_always):
            return page
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not buckets:
            return page
        try:
            await state.store.wait_for_change_async(list(buckets), page.head_op_id, remaining)
        except RelayError as exc:
            log.warning("bucket store change wait failed: %s", exc)
            return page


def create_app(
    store: BucketStore,
    rules: Rules,
    authenticator: Authenticator,
    config: ApiConfig | None = None,
    journal: "JournalApi | None" = None,
) -> FastAPI:
    """The device API app.  ``store`` is read-only here; the caller owns and closes it (and
    ``journal``: with it, the journal endpoints of :mod:`relay.upstream.journal_api` are mounted)."""
    cfg = config or ApiConfig()
    state = ApiState(store, rules, authenticator, cfg, RateLimiter(cfg.rate_per_s, cfg.rate_burst))
    app = FastAPI(
        title="fieldsync relay: device API",
        version=API_VERSION,
        description=(
            "Each device reads the buckets its bearer token grants. "
            'Every error has the shape {"error": {"code", "message", "status"}}. '
            "See docs/relay.md, section Device API."
        ),
        default_response_class=OrjsonResponse,
    )
    app.state.api = state
    install_error_handlers(app)
    bearer = HTTPBearer(auto_error=False, description="a device token (JWT)")

    async def identity(
        request: Request, _: Annotated[Any, Security(bearer)] = None
    ) -> DeviceIdentity:
        who = authenticator.authenticate(request.headers.get("authorization"))
        wait = state.limiter.check(who.device_id)
        if wait > 0:
            raise RateLimited(who.device_id, wait)
        return who

    Device = Annotated[DeviceIdentity, Security(identity)]

    @app.get("/healthz", response_model=HealthMessage, tags=["ops"])
    async def healthz() -> Response:
        """Liveness; ``store`` tells whether the bucket store answered a trivial read."""
        try:
            await asyncio.wait_for(store.bucket_state_async([]), 5.0)
            return OrjsonResponse({"status": "ok", "store": "ok"})
        except (RelayError, TimeoutError):
            return OrjsonResponse({"status": "degraded", "store": "unreachable"}, 503)

    @app.get(
        f"/{API_VERSION}/schema", response_model=SchemaMessage, responses=_ERRORS, tags=["device"]
    )
    async def schema(device: Device) -> Response:
        """Tables and columns this token may see, with primary keys, and the granted buckets."""
        return OrjsonResponse(visible_schema(rules, _granted(state, device), cfg.counters))

    @app.get(
        f"/{API_VERSION}/changes", response_model=ChangesMessage, responses=_ERRORS, tags=["device"]
    )
    async def changes(
        device: Device,
        cursor: Annotated[
            str | None,
            Query(
                max_length=MAX_CURSOR_CHARS, description="from the previous message; omit to start"
            ),
        ] = None,
        limit: Annotated[
            int | None, Query(ge=1, description=f"most ops (at most {cfg.max_page_ops})")
        ] = None,
        wait: Annotated[
            float,
            Query(
                ge=0, description=f"seconds to wait when nothing is new (at most {cfg.long_poll_s})"
            ),
        ] = 0.0,
    ) -> Response:
        """Ops of the device's buckets after ``cursor``, with the checkpoint they lead to."""
        have = decode_cursor(cursor)
        buckets = _granted(state, device)
        dropped, rest = split_dropped(have, buckets)
        if rest is not None:  # a cursor naming many buckets no longer granted: in parts
            return Response(dumps(dropped_message(dropped, rest)), media_type="application/json")
        size = min(limit or cfg.page_default, cfg.max_page_ops)
        ahead = state.prefetch.take((device.device_id, tuple(buckets), cursor or "", size))
        if ahead is not None:
            page = await ahead
        else:
            page = await next_changes(
                state,
                buckets,
                have,
                size,
                min(wait, cfg.long_poll_s),
                wait_always=cursor is not None,
            )
        message = changes_message(page, dropped)
        if page.has_more:
            state.prefetch.start(
                (device.device_id, tuple(buckets), message["cursor"], size),
                _read_page(state, dict(page.cursors), size, dict(page.epochs)),
            )
        return Response(dumps(message), media_type="application/json")

    @app.get(
        f"/{API_VERSION}/checkpoint",
        response_model=CheckpointModel,
        responses=_ERRORS,
        tags=["device"],
    )
    async def checkpoint(device: Device) -> Response:
        """The current checkpoint of every bucket the token grants (to verify what a device holds)."""
        buckets = _granted(state, device)
        try:
            cps = await store.bucket_state_async(buckets)
        except RelayError as exc:
            raise Unavailable("the bucket store cannot be read right now; retry shortly") from exc
        body = checkpoint_json(cps)
        body["complete"] = True
        return OrjsonResponse(body)

    if journal is not None:
        app.include_router(journal.router(identity))

    @app.websocket(f"/{API_VERSION}/stream")
    async def stream(websocket: WebSocket) -> None:
        await _stream(state, websocket)

    _document_stream(app)
    app.add_middleware(
        GZipMiddleware, minimum_size=cfg.gzip_min_bytes, compresslevel=cfg.gzip_level
    )
    app.add_middleware(
        LimitsMiddleware,
        max_body_bytes=cfg.max_body_bytes,
        max_connections=cfg.max_connections,
        body_timeout_s=cfg.body_timeout_s,
    )
    app.add_exception_handler(ClientDisconnect, _on_client_disconnect)
    return app


async def _on_client_disconnect(request: Request, exc: Exception) -> Response:
    """A client that went away while sending its request is not a relay error: logged as
    what it is (no traceback); the answer goes nowhere."""
    client = request.client
    log.info(
        "client %s disconnected before its request %s %s was complete",
        f"{client.host}:{client.port}" if client else "?",
        request.method,
        request.url.path,
    )
    return error_response(400, "bad_request", "the client disconnected during the request")


def _document_stream(app: FastAPI) -> None:
    """OpenAPI has no WebSocket operations: describe ``/v1/stream`` as a GET upgrade."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = original()
        spec.setdefault("paths", {})[f"/{API_VERSION}/stream"] = {
            "get": {
                "tags": ["device"],
                "summary": "WebSocket push of changes messages",
                "description": (
                    "Upgrade to a WebSocket. Authenticate with the Authorization header, a "
                    '`token` query parameter, or a first message {"token": "...", '
                    '"cursor": "..."} within 10 s. The server then sends changes messages '
                    "(the /v1/changes body) whenever the device's buckets change; errors are "
                    "sent as the error shape and the socket is closed with 4000+status "
                    "(4401, 4403, 4429, ...)."
                ),
                "parameters": [
                    {
                        "name": "cursor",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "token",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {"101": {"description": "switching to the WebSocket protocol"}},
            }
        }
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


# --------------------------------------------------------------------------- WebSocket


async def _ws_error(websocket: WebSocket, exc: AuthError | ApiError) -> None:
    with contextlib.suppress(Exception):
        await websocket.send_text(dumps(exc.to_dict()).decode())
    with contextlib.suppress(Exception):
        await websocket.close(ws_close_code(exc.status), exc.code[:120])


async def _ws_hello(state: ApiState, websocket: WebSocket) -> tuple[DeviceIdentity, str | None]:
    """Authenticate: header, ``token`` query parameter, or a first message ``{token, cursor}``."""
    cursor = websocket.query_params.get("cursor")
    header = websocket.headers.get("authorization")
    if header is not None:
        return state.authenticator.authenticate(header), cursor
    token = websocket.query_params.get("token")
    if token:
        return state.authenticator.verify(token), cursor
    try:
        first = await asyncio.wait_for(websocket.receive(), WS_AUTH_TIMEOUT_S)
    except TimeoutError:
        raise ApiError(401, "token_missing", "no token within 10 s of connecting") from None
    if first["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(first.get("code", 1000))
    text = first.get("text") or (first.get("bytes") or b"").decode("utf-8", "replace")
    try:
        hello = json.loads(text)
    except ValueError:
        hello = None
    if not isinstance(hello, dict) or not isinstance(hello.get("token"), str):
        raise ApiError(
            401, "token_missing", 'first message must be {"token": "<jwt>", "cursor": "..."}'
        )
    given = hello.get("cursor", cursor)
    if given is not None and not isinstance(given, str):
        raise InvalidCursor("cursor must be a string")
    return state.authenticator.verify(hello["token"]), given


async def _stream(state: ApiState, websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        who, cursor_text = await _ws_hello(state, websocket)
        wait = state.limiter.check(who.device_id)
        if wait > 0:
            raise RateLimited(who.device_id, wait)
        have = decode_cursor(cursor_text)
    except (AuthError, ApiError) as exc:
        await _ws_error(websocket, exc)
        return
    except WebSocketDisconnect:
        return
    reader = asyncio.create_task(_ws_reader(state, websocket, who))
    try:
        await _ws_pump(state, websocket, who, have, reader)
    except (AuthError, ApiError) as exc:
        await _ws_error(websocket, exc)
    except WebSocketDisconnect:
        pass
    except Exception:
        log.exception("WebSocket stream of device %r failed", who.device_id)
        await _ws_error(websocket, ApiError(500, "internal_error", "internal error"))
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


async def _ws_reader(state: ApiState, websocket: WebSocket, who: DeviceIdentity) -> None:
    """Drain client messages (rate-limited); returns when the client disconnects."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        wait = state.limiter.check(who.device_id)
        if wait > 0:
            raise RateLimited(who.device_id, wait)


async def _ws_pump(
    state: ApiState,
    websocket: WebSocket,
    who: DeviceIdentity,
    have: Cursor,
    reader: asyncio.Task[None],
) -> None:
    """Send the first page at once, then a message whenever the device's buckets change.

    While up to date the stream only waits on the store's change listener: no
    read happens until a wake-up, so idle connections cost no database work.
    The token's expiry and the revocation list are re-checked at least every
    :data:`WS_RECHECK_S` seconds.
    """
    buckets = _granted(state, who)
    limit = state.config.max_page_ops
    dropped, rest = split_dropped(have, buckets)
    while rest is not None:  # many buckets no longer granted: reported in parts first
        await websocket.send_text(dumps(dropped_message(dropped, rest)).decode())
        have = rest
        dropped, rest = split_dropped(have, buckets)
    cursors, epochs = have.for_buckets(buckets)
    page = await _read_page(state, cursors, limit, epochs)
    ahead: asyncio.Task[OpsPage] | None = None
    first = True
    try:
        while True:
            if page.has_more:  # catching up: read the next page while this one is sent
                ahead = asyncio.ensure_future(
                    _read_page(state, dict(page.cursors), limit, dict(page.epochs))
                )
            if first or page.ops or page.resync or dict(page.cursors) != cursors:
                await websocket.send_text(dumps(changes_message(page, dropped)).decode())
                dropped = []
            first = False
            cursors = dict(page.cursors)
            if ahead is not None:
                if reader.done():
                    reader.result()  # re-raises RateLimited; returns on disconnect
                    return
                page, ahead = await ahead, None
                continue
            woken = await _page_after_change(state, who, buckets, page, reader)
            if woken is None:
                reader.result()
                return
            page = woken
    finally:
        if ahead is not None:
            ahead.cancel()


async def _page_after_change(
    state: ApiState,
    who: DeviceIdentity,
    buckets: Sequence[str],
    last: OpsPage,
    reader: asyncio.Task[None],
) -> OpsPage | None:
    """Wait for a change of ``buckets`` after page ``last`` and read it; ``None`` if the
    reader task ended first."""
    while True:
        left = _check_token(state, who)
        woke = await _await_or_reader(
            _woken(state, buckets, last.head_op_id, min(left, WS_RECHECK_S)), reader
        )
        if woke is None:
            return None
        if woke:
            return await _read_page(
                state, dict(last.cursors), state.config.max_page_ops, dict(last.epochs)
            )


def _check_token(state: ApiState, who: DeviceIdentity) -> float:
    """Seconds the token stays valid; raises if it expired or the device was revoked."""
    left = who.expires_at.timestamp() + state.authenticator.leeway_s - time.time()
    if left <= 0:
        raise TokenExpired("token has expired; reconnect with a fresh token")
    revocation = state.authenticator.revoked.revocation_for(
        who.device_id, float(who.claims.get("iat", 0))
    )
    if revocation is not None:
        reason = f": {revocation.reason}" if revocation.reason else ""
        raise DeviceRevoked(f"device {who.device_id!r} is revoked{reason}")
    return left


async def _woken(state: ApiState, buckets: Sequence[str], since: int, timeout: float) -> bool:
    """Wait for a change of ``buckets`` after op ``since``; False when ``timeout`` passed."""
    start = time.monotonic()
    try:
        await state.store.wait_for_change_async(list(buckets), since, timeout)
    except RelayError as exc:
        log.warning("bucket store change wait failed: %s", exc)
        await asyncio.sleep(min(timeout, 1.0))
        return True
    return time.monotonic() - start < timeout


async def _await_or_reader(work: Awaitable[_T], reader: asyncio.Task[None]) -> _T | None:
    """``work``'s result, or ``None`` if the reader task ended first (disconnect, rate limit)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task, reader}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None
