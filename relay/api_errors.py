"""The device API's one JSON error shape, and the handlers that make every error use it.

Every error the relay's HTTP and WebSocket API sends has this body, whatever
raised it (routing, validation, authentication, limits, a bug)::

    {"error": {"code": "<stable machine code>", "message": "<for people>", "status": <HTTP status>}}

It is the shape of :meth:`relay.errors.AuthError.to_dict`; authentication
errors are rendered with that method (and its ``WWW-Authenticate`` headers), and
counted in ``fieldsync_relay_auth_failures_total{reason}`` by their code.

Codes by status (see :data:`DEFAULT_CODES`): 400 ``bad_request`` /
``invalid_cursor``, 401 ``token_*`` (relay/errors.py), 403 ``forbidden`` /
``token_revoked``, 404 ``not_found``, 405 ``method_not_allowed``, 408
``request_timeout`` (a request head or body too slow to arrive), 413
``request_too_large``, 422 ``invalid_request``, 429 ``rate_limited`` (with
``Retry-After``), 500 ``internal_error`` (the message never carries internals;
the traceback goes to the log), 503 ``unavailable``.

:func:`install_error_handlers` registers the handlers on a FastAPI app;
:func:`error_response` builds a response for code outside the app's exception
handling (ASGI middleware).  Nothing here does I/O except logging a 500.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from relay.errors import AuthError, RelayError
from relay.metrics import AUTH_FAILURES

log = logging.getLogger("relay.downstream.api")

ErrorBody = dict[str, dict[str, str | int]]

DEFAULT_CODES: Final[Mapping[int, str]] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}

WS_CLOSE_CODES: Final[Mapping[int, int]] = {
    400: 4400,
    401: 4401,
    403: 4403,
    413: 1009,
    422: 4422,
    429: 4429,
    500: 1011,
    503: 1013,
}
"""WebSocket close code for an error of an HTTP status: 4000 + status where no standard code fits."""


def error_body(status: int, code: str, message: str) -> ErrorBody:
    """The one error shape."""
    return {"error": {"code": code, "message": message, "status": status}}


def ws_close_code(status: int) -> int:
    """The WebSocket close code that goes with an error of HTTP ``status``."""
    return WS_CLOSE_CODES.get(status, 4000 + status if 400 <= status < 600 else 1008)


class ApiError(RelayError):
    """An error the API reports to the client with ``status`` and a stable ``code``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra_headers = dict(headers or {})

    def to_dict(self) -> ErrorBody:
        return error_body(self.status, self.code, self.message)

    def headers(self) -> dict[str, str]:
        return dict(self.extra_headers)


class InvalidCursor(ApiError):
    """The ``cursor`` a client sent was not made by this relay (or is corrupt)."""

    def __init__(self, message: str) -> None:
        super().__init__(400, "invalid_cursor", message)


class RequestTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, "request_too_large", f"request body is larger than the limit of {limit} bytes"
        )


class RateLimited(ApiError):
    """Too many requests from one device; ``retry_after_s`` goes to ``Retry-After``."""

    def __init__(self, device_id: str, retry_after_s: float) -> None:
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(
            429,
            "rate_limited",
            f"device {device_id!r} sends requests faster than allowed; retry in {seconds} s",
            {"Retry-After": str(seconds)},
        )
        self.retry_after_s = seconds


class Unavailable(ApiError):
    """A dependency (the bucket store) cannot answer now."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(503, "unavailable", message, {"Retry-After": str(retry_after_s)})


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, code, message), status_code=status, headers=headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def http_exception_message(request: Request, status: int, detail: object) -> str:
    """A useful message for routing errors, which Starlette raises with its bare phrase."""
    if status == 404:
        return f"no endpoint {request.url.path}"
    if status == 405:
        return f"{request.method} is not allowed on {request.url.path}"
    if isinstance(detail, str) and detail:
        return detail
    return _phrase(status)


def validation_message(errors: Sequence[Any]) -> str:
    """One line naming every invalid parameter: ``query.limit: Input should be ... ; ...``."""
    parts: list[str] = []
    for err in errors:
        if not isinstance(err, Mapping):
            parts.append(str(err))
            continue
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "request is invalid"


async def _on_relay_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, AuthError):
        AUTH_FAILURES.labels(exc.code).inc()
    if isinstance(exc, AuthError | ApiError):
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers())
    return await _on_unexpected(request, exc)


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = DEFAULT_CODES.get(status, "error")
    return error_response(
        status, code, http_exception_message(request, status, exc.detail), exc.headers
    )


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | WebSocketRequestValidationError)
    return error_response(422, "invalid_request", validation_message(exc.errors()))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal error; the relay's log has details")


def install_error_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` use the one shape (500s included)."""
    app.add_exception_handler(AuthError, _on_relay_error)
    app.add_exception_handler(ApiError, _on_relay_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)


# ---- OpenAPI models of the one error shape (documentation; responses are built by hand)


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. token_expired")
    message: str = Field(description="for people; never contains the token")
    status: int = Field(description="the HTTP status")


class ErrorMessage(BaseModel):
    error: ErrorDetail
