"""The device API's limits: per-device request rate, concurrent connections, request body
size and time, gzip request bodies.

- :class:`RateLimiter`: per-device token buckets (429 + ``Retry-After`` from the endpoints;
  a WebSocket connection counts as one request, and so does each message a client sends).
- :class:`LimitsMiddleware` (ASGI, outermost): refuses a connection beyond the maximum (503
  ``Retry-After: 5``), a body larger than allowed (413, also after gzip request
  decompression, which it does itself) or slower than allowed (408), each in the one error
  shape of relay/api_errors.py.  (The server also caps and times out connections before
  they become requests: relay/server.py.)

Concurrency model: one asyncio event loop; the limiter's table and the middleware's
connection counter are only touched from it (not thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.api_errors import RequestTooLarge, error_response
from relay.metrics import RATE_LIMITED

log = logging.getLogger("relay.downstream.api")


class RateLimiter:
    """Per-device token buckets: ``rate`` requests/s refill, ``burst`` capacity.

    ``rate == 0`` disables limiting.  Entries of devices idle long enough to be
    full again are dropped when the table grows, so memory stays bounded by the
    number of recently active devices.  A refusal counts in
    ``fieldsync_relay_rate_limited_total``.  Not thread-safe: call from one event loop.
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
        RATE_LIMITED.inc()
        return (1.0 - tokens) / self.rate

    def _sweep(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._state = {d: s for d, s in self._state.items() if now - s[1] < full_after}
        self._sweep_at = max(1024, 2 * len(self._state))


# --------------------------------------------------------------------------- limits middleware


class ConnectionSlots:
    """The open connections counted against ``limit`` (``http.max_connections``): one
    count shared by the app's middleware stack and the stream's direct path
    (:class:`relay.downstream.api.DeviceApi`)."""

    __slots__ = ("active", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0


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
        slots: ConnectionSlots | None = None,
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_connections = max_connections
        self.body_timeout_s = body_timeout_s
        self.slots = slots if slots is not None else ConnectionSlots(max_connections)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        slots = self.slots
        if slots.active >= self.max_connections:
            await self._refuse(scope, receive, send)
            return
        slots.active += 1
        try:
            if scope["type"] == "http":
                await self._http(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            slots.active -= 1

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
