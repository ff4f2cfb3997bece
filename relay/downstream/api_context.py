"""The device API's log context: a request id for every HTTP request and WebSocket.

:class:`RequestIdMiddleware` (ASGI, outermost) gives each request and each WebSocket
connection an id: the client's ``X-Request-ID`` when it sends a sane one (1 to 128 of
``A-Z a-z 0-9 . _ : -``, starting with a letter or digit), else a new random one (32 hex
digits).  The id is

- in the log context (:func:`core.log_context.log_context`) of everything logged while
  the request is handled, uvicorn's access line included (``request_id`` in JSON logs);
- sent back in the ``X-Request-ID`` header of the response (HTTP responses, the WebSocket
  handshake's acceptance or refusal), so a client can quote it in a report.

Once a request is authenticated, the endpoint binds the device id to the same context
(:func:`core.log_context.bind_log_context`, in relay/downstream/api.py and
api_stream.py), so the request's later lines name the device.

Concurrency model: one asyncio event loop; uvicorn runs each request (and each
WebSocket) in its own task, and the context variable is per task, so requests never see
each other's ids.  Store reads in worker threads inherit the task's context.
"""

from __future__ import annotations

import re
import uuid
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.log_context import log_context

__all__ = ["REQUEST_ID_HEADER", "RequestIdMiddleware", "request_id_of"]

REQUEST_ID_HEADER: Final = "X-Request-ID"
_HEADER_KEY: Final = REQUEST_ID_HEADER.lower().encode("latin-1")
_SANE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_STARTS: Final = frozenset(
    {"http.response.start", "websocket.accept", "websocket.http.response.start"}
)


def request_id_of(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when sane, else a new id."""
    for key, value in scope.get("headers", ()):
        if key.lower() == _HEADER_KEY:
            given = bytes(value).decode("latin-1").strip()
            if _SANE.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Puts a request id in the log context and the ``X-Request-ID`` response header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        header = (_HEADER_KEY, request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] in _STARTS:
                kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _HEADER_KEY]
                message = {**message, "headers": [*kept, header]}
            await send(message)

        with log_context(request_id=request_id):
            await self.app(scope, receive, send_with_id)
