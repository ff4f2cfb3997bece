"""The device API: an ASGI app (FastAPI) serving each device its own buckets.

Endpoints (all under ``/v1`` except the last two; every ``/v1`` call needs
``Authorization: Bearer <JWT>``, checked by :class:`relay.auth.Authenticator`)::

    GET /v1/schema                           tables and columns this token may see
    GET /v1/changes?cursor=&limit=&wait=     ops after the cursor (long-poll up to ``wait`` s)
    GET /v1/checkpoint                       current checkpoint (checksums) of the device's buckets
    POST /v1/journal, GET /v1/outcomes, GET /v1/conflicts, POST /v1/conflicts/{id}/resolve
                                             device edits, when mounted (:class:`DeviceRoutes`)
    WS  /v1/stream?cursor=                   the same change messages, pushed
    GET /openapi.json                        OpenAPI description (also /docs)
    GET /healthz                             liveness and store reachability (no auth)

Protocol (docs/relay.md, "Device API", is the reference for clients):

- A device syncs the buckets its token's claims grant
  (:meth:`relay.downstream.rules.Rules.buckets_for_claims`); no parameter of any request
  can name another bucket.
- A *changes message* (relay/downstream/api_messages.py) carries the ops after the
  device's cursor, the next cursor and the checkpoint (per bucket count and checksum) they
  lead to.  A device buffers ops until a message whose ``checkpoint.complete`` is true,
  then applies them in one transaction and checks every bucket's checksum
  (relay.downstream.bucket_store).
- The cursor is opaque to clients (relay/downstream/api_cursor.py); tampering with it can
  only make the device re-read or skip its own buckets' ops, never widen what it may read.
- More endpoints are mounted through :class:`DeviceRoutes` (the journal endpoints of
  relay/upstream/journal_api.py, wired in by relay/server.py): they get the same bearer
  authentication and per-device rate limit; this path knows nothing of what they do.

Modules: this one builds the app; relay/downstream/api_sync.py is the read path (pages,
long-poll, read-ahead), api_bodies.py the changes responses prepared whole (rendered and
gzip-compressed ahead of the request), api_stream.py the WebSocket, api_cursor.py the cursor,
api_messages.py the bodies and their OpenAPI models, api_limits.py rate, size, time and
connection limits (413 also after gzip request decompression, 408, 503, 429 with
``Retry-After``).  Errors all have the shape of :mod:`relay.api_errors`.  A client that
disconnects mid-request is logged as such.  Every request and WebSocket has an id
(``X-Request-ID``, relay/downstream/api_context.py) and, once authenticated, its device in
the log context.

The app is a :class:`DeviceApi`: a WebSocket to ``/v1/stream`` skips the routing and
middleware stack (nothing in it acts on a WebSocket but the request id and the connection
limit, which the stream's direct path applies itself), so each open stream keeps few
frames alive.

Concurrency model: one asyncio event loop (uvicorn).  Store reads run in worker threads;
long-polls and WebSocket streams wait on the store's shared change listener, so an idle
connection holds no thread and no database connection.  The limiter, the read-ahead pages
and the connection counter are only touched from the event loop.  (No ``from __future__
import annotations`` here: FastAPI reads the endpoint annotations at runtime, and some
close over configuration values.)
"""

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any, Final, Protocol

from fastapi import APIRouter, FastAPI, Query, Request, Security, WebSocket
from fastapi.responses import Response
from fastapi.security import HTTPBearer
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from core.log_context import bind_log_context
from relay.api_errors import RateLimited, Unavailable, error_response, install_error_handlers
from relay.auth import Authenticator, DeviceIdentity
from relay.downstream.api_bodies import accepts_gzip
from relay.downstream.api_context import RequestIdMiddleware
from relay.downstream.api_cursor import (
    MAX_CURSOR_CHARS,
    decode_cursor,
    dropped_message,
    split_dropped,
)
from relay.downstream.api_limits import ConnectionSlots, LimitsMiddleware, RateLimiter
from relay.downstream.api_messages import (
    ERRORS,
    ChangesMessage,
    CheckpointModel,
    HealthMessage,
    OrjsonResponse,
    SchemaMessage,
    checkpoint_json,
    dumps,
    visible_schema,
)
from relay.downstream.api_stream import StreamEndpoint, serve_stream
from relay.downstream.api_sync import (
    ApiConfig,
    ApiState,
    granted,
    next_changes,
    prepare,
    read_ahead,
)
from relay.downstream.bucket_store import BucketStore
from relay.downstream.rules import Rules
from relay.errors import RelayError
from relay.metrics import OPS_SERVED

log = logging.getLogger("relay.downstream.api")

API_VERSION: Final = "v1"
STREAM_PATH: Final = f"/{API_VERSION}/stream"


class DeviceApi(FastAPI):
    """The device API app: FastAPI, except that a WebSocket to :data:`STREAM_PATH` goes
    straight to :attr:`stream_app` (the request id, the connection limit and the stream:
    the same handling as through the app's stack, whose other layers do nothing for a
    WebSocket), so the many long-lived streams keep a short chain of frames alive, not
    the whole middleware and routing stack."""

    stream_app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.stream_app is not None
            and scope["type"] == "websocket"
            and _route_path(scope) == STREAM_PATH
        ):
            scope["app"] = self
            await self.stream_app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path a route matches against (``root_path`` stripped, as starlette does)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class DeviceRoutes(Protocol):
    """More device endpoints served by the app (e.g. the journal endpoints of
    relay/upstream/journal_api.py, which relay/server.py mounts)."""

    def router(self, identity: Callable[..., Any]) -> APIRouter:
        """The endpoints, authenticated and rate-limited by the app's ``identity``
        dependency (it yields the request's :class:`relay.auth.DeviceIdentity`)."""
        ...


def create_app(
    store: BucketStore,
    rules: Rules,
    authenticator: Authenticator,
    config: ApiConfig | None = None,
    *mounted: DeviceRoutes,
) -> DeviceApi:
    """The device API app.  ``store`` is read-only here; the caller owns and closes it (and
    each of ``mounted``, whose routers are served beside the sync endpoints)."""
    cfg = config or ApiConfig()
    state = ApiState(store, rules, authenticator, cfg, RateLimiter(cfg.rate_per_s, cfg.rate_burst))
    app = DeviceApi(
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
        bind_log_context(device=who.device_id)
        wait = state.limiter.check(who.device_id)
        if wait > 0:
            raise RateLimited(who.device_id, wait)
        return who

    Device = Annotated[DeviceIdentity, Security(identity)]

    _add_sync_routes(app, state, Device)
    for routes in mounted:
        app.include_router(routes.router(identity))

    @app.websocket(STREAM_PATH)
    async def stream(websocket: WebSocket) -> None:
        await serve_stream(state, websocket)

    _document_stream(app)
    slots = _add_limits(app, cfg)
    app.stream_app = RequestIdMiddleware(
        LimitsMiddleware(
            StreamEndpoint(state),
            max_body_bytes=cfg.max_body_bytes,
            max_connections=cfg.max_connections,
            body_timeout_s=cfg.body_timeout_s,
            slots=slots,
        )
    )
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
        spec.setdefault("paths", {})[STREAM_PATH] = {
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


def _add_sync_routes(app: FastAPI, state: ApiState, Device: Any) -> None:
    """``/healthz`` and the sync endpoints; ``Device`` is the authenticating parameter type."""
    cfg = state.config

    @app.get("/healthz", response_model=HealthMessage, tags=["ops"])
    async def healthz() -> Response:
        """Liveness; ``store`` tells whether the bucket store answered a trivial read."""
        try:
            await asyncio.wait_for(state.store.bucket_state_async([]), 5.0)
            return OrjsonResponse({"status": "ok", "store": "ok"})
        except (RelayError, TimeoutError):
            return OrjsonResponse({"status": "degraded", "store": "unreachable"}, 503)

    @app.get(
        f"/{API_VERSION}/schema", response_model=SchemaMessage, responses=ERRORS, tags=["device"]
    )
    async def schema(device: Device) -> Response:
        """Tables and columns this token may see, with primary keys, and the granted buckets."""
        return OrjsonResponse(visible_schema(state.rules, granted(state, device), cfg.counters))

    @app.get(
        f"/{API_VERSION}/changes", response_model=ChangesMessage, responses=ERRORS, tags=["device"]
    )
    async def changes(
        request: Request,
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
        buckets = granted(state, device)
        dropped, rest = split_dropped(have, buckets)
        if rest is not None:  # a cursor naming many buckets no longer granted: in parts
            return Response(dumps(dropped_message(dropped, rest)), media_type="application/json")
        size = min(limit or cfg.page_default, cfg.max_page_ops)
        gzip = accepts_gzip(request.headers.get("accept-encoding", ""))
        key = (device.device_id, tuple(buckets), cursor or "", size, gzip)
        ahead = state.prefetch.take(key) if not dropped else None
        if ahead is not None:
            prepared = await ahead
        else:
            page = await next_changes(
                state,
                buckets,
                have,
                size,
                min(wait, cfg.long_poll_s),
                wait_always=cursor is not None,
            )
            prepared = await prepare(state, page, dropped, gzip)
        OPS_SERVED.inc(prepared.op_count)
        if prepared.has_more:
            state.prefetch.start(
                (device.device_id, tuple(buckets), prepared.cursor, size, gzip),
                read_ahead(state, prepared, size, gzip),
            )
        return prepared.response()

    @app.get(
        f"/{API_VERSION}/checkpoint",
        response_model=CheckpointModel,
        responses=ERRORS,
        tags=["device"],
    )
    async def checkpoint(device: Device) -> Response:
        """The current checkpoint of every bucket the token grants (to verify what a device holds)."""
        buckets = granted(state, device)
        try:
            cps = await state.store.bucket_state_async(buckets)
        except RelayError as exc:
            raise Unavailable("the bucket store cannot be read right now; retry shortly") from exc
        body = checkpoint_json(cps)
        body["complete"] = True
        return OrjsonResponse(body)


def _add_limits(app: FastAPI, cfg: ApiConfig) -> ConnectionSlots:
    """Response compression, then the connection, body size and time limits, then
    (outermost) the request id (relay/downstream/api_context.py); the connection count,
    to share with the stream's direct path (:class:`DeviceApi`)."""
    slots = ConnectionSlots(cfg.max_connections)
    app.add_middleware(
        GZipMiddleware, minimum_size=cfg.gzip_min_bytes, compresslevel=cfg.gzip_level
    )
    app.add_middleware(
        LimitsMiddleware,
        max_body_bytes=cfg.max_body_bytes,
        max_connections=cfg.max_connections,
        body_timeout_s=cfg.body_timeout_s,
        slots=slots,
    )
    app.add_exception_handler(ClientDisconnect, _on_client_disconnect)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer carries the id
    return slots
