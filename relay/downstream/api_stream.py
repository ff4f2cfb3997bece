"""The device API's WebSocket stream: ``WS /v1/stream?cursor=``, changes messages pushed.

Protocol: the client authenticates with the ``Authorization`` header, a ``token`` query
parameter, or a first message ``{"token": "...", "cursor": "..."}`` within
:data:`WS_AUTH_TIMEOUT_S`.  The server then sends the first page at once and a changes
message (the ``/v1/changes`` body) whenever the device's buckets change; while catching up
(``has_more``) the next page is read while the current one is sent.  Errors are sent in
the one error shape and the socket is closed with 4000+status (4401, 4403, 4429, ...).
The token's expiry and the revocation list are re-checked at least every
:data:`WS_RECHECK_S` seconds; each client message counts against the device's rate.
Open streams are the gauge ``fieldsync_relay_streams``; ops sent count in
``fieldsync_relay_ops_served_total`` (relay/metrics.py).

The app calls :class:`StreamEndpoint` for ``/v1/stream`` directly, inside only the
request id and connection limit layers (:class:`relay.downstream.api.DeviceApi`), so the
frames an idle stream keeps alive are few.

Concurrency model: one asyncio event loop.  Per connection, the pump (this module's
:func:`serve_stream`) and a reader task that drains client messages; while up to date the
pump only waits on the store's change listener, so an idle connection costs no database
work and holds no thread.  A slow device only slows its own pump: a send waits while
the socket's buffer is above uvicorn's high-water mark, so at most one message is
queued per stream beyond it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Final, TypeVar

from fastapi import WebSocket, WebSocketDisconnect
from starlette.types import Receive, Scope, Send

from core.log_context import bind_log_context
from relay.api_errors import ApiError, InvalidCursor, RateLimited, ws_close_code
from relay.auth import DeviceIdentity
from relay.downstream.api_cursor import Cursor, decode_cursor, dropped_message, split_dropped
from relay.downstream.api_messages import changes_message, dumps
from relay.downstream.api_sync import ApiState, granted, read_page
from relay.downstream.bucket_store import OpsPage
from relay.errors import AuthError, DeviceRevoked, RelayError, TokenExpired
from relay.metrics import AUTH_FAILURES, OPS_SERVED, STREAMS

log = logging.getLogger("relay.downstream.api")
_T = TypeVar("_T")

WS_AUTH_TIMEOUT_S: Final = 10.0
WS_RECHECK_S: Final = 30.0
"""A WebSocket stream re-checks revocation at least this often while idle."""


async def _ws_error(websocket: WebSocket, exc: AuthError | ApiError) -> None:
    if isinstance(exc, AuthError):
        AUTH_FAILURES.labels(exc.code).inc()
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


class StreamEndpoint:
    """The stream as a bare ASGI app (what :class:`relay.downstream.api.DeviceApi` calls
    for ``/v1/stream``, inside the request id and connection limit layers)."""

    __slots__ = ("state",)

    def __init__(self, state: ApiState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve_stream(self.state, WebSocket(scope, receive, send))


async def serve_stream(state: ApiState, websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        who, cursor_text = await _ws_hello(state, websocket)
        bind_log_context(device=who.device_id)
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
    STREAMS.inc()
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
        STREAMS.dec()
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
    buckets = granted(state, who)
    limit = state.config.max_page_ops
    dropped, rest = split_dropped(have, buckets)
    while rest is not None:  # many buckets no longer granted: reported in parts first
        await websocket.send_text(dumps(dropped_message(dropped, rest)).decode())
        have = rest
        dropped, rest = split_dropped(have, buckets)
    cursors, epochs = have.for_buckets(buckets)
    page = await read_page(state, cursors, limit, epochs)
    ahead: asyncio.Task[OpsPage] | None = None
    first = True
    try:
        while True:
            if page.has_more:  # catching up: read the next page while this one is sent
                ahead = asyncio.ensure_future(
                    read_page(state, dict(page.cursors), limit, dict(page.epochs))
                )
            if first or page.op_count or page.resync or dict(page.cursors) != cursors:
                await websocket.send_text(dumps(changes_message(page, dropped)).decode())
                OPS_SERVED.inc(page.op_count)
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
        woke = await _woken(state, buckets, last.head_op_id, min(left, WS_RECHECK_S), reader)
        if reader.done():
            return None
        if woke:
            return await read_page(
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


async def _woken(
    state: ApiState,
    buckets: Sequence[str],
    since: int,
    timeout: float,
    reader: asyncio.Task[None],
) -> bool:
    """Wait for a change of ``buckets`` after op ``since`` (or the end of ``reader``: a
    disconnect, a rate limit); False when ``timeout`` passed."""
    start = time.monotonic()
    try:
        await state.store.wait_for_change_async(buckets, since, timeout, until=reader)
    except RelayError as exc:
        log.warning("bucket store change wait failed: %s", exc)
        await asyncio.sleep(min(timeout, 1.0))
        return True
    return time.monotonic() - start < timeout
