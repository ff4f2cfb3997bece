"""HTTP and WebSocket client of the relay's device API (docs/relay.md, "Device API").

- Every call carries ``Authorization: Bearer <token>`` and accepts gzip (httpx inflates
  it); request bodies above 1 KiB are sent gzip-compressed.
- Retries: connection errors, timeouts, a body cut short (a truncated read or gzip
  stream), 5xx and 429 are retried with exponential backoff and full jitter
  (``sleep = uniform(0, min(max_s, initial_s * 2**attempt))``; a ``Retry-After`` is
  honoured).  ``GET /v1/changes`` with the same cursor is idempotent, so a download cut at
  any byte is simply asked again: nothing is applied twice and nothing is skipped.
- Errors map to :mod:`device_agent.errors`: 401 ``token_expired`` → :class:`TokenExpired`,
  403 ``token_revoked`` → :class:`TokenRevoked` (both say to get a new token), other
  401/403 → :class:`AuthFailed`, exhausted retries → :class:`RelayUnreachable` (the agent
  keeps working offline), other error answers → :class:`RelayRefused` with the relay's
  ``code``.
- The cursor is opaque; :func:`reset_cursor` sets buckets back to 0 (to download them
  again after a checksum mismatch) for cursors of the relay's ``c1.`` format and returns
  None for any other format (the caller then downloads everything again).

Journal upload (``POST /v1/journal``, body ``{"entries": [...]}``, answer ``{"results":
[{"seq", "status": "accepted"|"rejected", "reason", "message"}]}``, core/journal_format.py and
relay/upstream/journal_api.py), outcomes (``GET /v1/outcomes?after=``) and conflict resolution
(``POST /v1/conflicts/{id}/resolve``); a relay without those endpoints answers 404, which
is reported as :class:`JournalUnsupported`, so the entries simply stay pending.

One :class:`RelayClient` per thread (httpx.Client is not shared across threads here).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gc
import gzip
import json
import random
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlencode

import httpx
import orjson

from device_agent.errors import (
    AuthFailed,
    DeviceAgentError,
    RelayRefused,
    RelayUnreachable,
    TokenExpired,
    TokenRevoked,
    WebSocketUnavailable,
)

CURSOR_PREFIX: Final = "c1."
NEW_TOKEN_HINT: Final = (
    "get a new device token from your administrator (fieldsync token issue) and run "
    "device-agent init --relay URL --token NEW_TOKEN --db PATH again (local data is kept)"
)
RETRY_STATUS: Final = frozenset({429, 500, 502, 503, 504})


class JournalUnsupported(RelayRefused):
    """The relay has no journal endpoint (yet)."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    initial_s: float = 0.2
    max_s: float = 10.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.max_s, self.initial_s * (2**attempt)))


@dataclasses.dataclass
class UploadResult:
    accepted: list[int] = dataclasses.field(default_factory=list)
    rejected: dict[int, tuple[str, str]] = dataclasses.field(default_factory=dict)


def reset_cursor(cursor: str | None, buckets: Sequence[str]) -> str | None:
    """``cursor`` with ``buckets`` set back to 0 (their entries left out, others kept as
    they are); None if the cursor's format is unknown."""
    if not cursor:
        return cursor
    if not cursor.startswith(CURSOR_PREFIX):
        return None
    body = cursor[len(CURSOR_PREFIX) :]
    try:
        items = json.loads(zlib.decompress(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))
    except (ValueError, zlib.error):
        return None
    if not isinstance(items, list) or not all(
        isinstance(i, list) and i and isinstance(i[0], str) for i in items
    ):
        return None
    drop = set(buckets)
    # entries are [bucket, op_id, ...] (the relay may add fields, e.g. the epoch): a
    # bucket left out is at op 0
    kept = [item for item in items if item[0] not in drop]
    raw = json.dumps(kept, separators=(",", ":"), ensure_ascii=False).encode()
    return CURSOR_PREFIX + base64.urlsafe_b64encode(zlib.compress(raw, 6)).rstrip(b"=").decode()


def token_subject(token: str) -> str:
    """The ``sub`` claim of a JWT (read without verifying: only the relay verifies)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        sub = claims["sub"]
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise AuthFailed(
            f"the token is not a device token (JWT with a sub): {NEW_TOKEN_HINT}"
        ) from exc
    if not isinstance(sub, str) or not sub:
        raise AuthFailed("the token's sub (device id) is empty")
    return sub


def token_expiry(token: str) -> float | None:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


LARGE_ANSWER: Final = 1 << 16
"""Answers from this size are parsed with the cyclic GC paused."""


def parse_answer(body: bytes) -> Any:
    """The JSON of an answer.  A large one (a page of ops) creates tens of thousands of
    containers at once, each of which would count towards a cyclic collection pass over
    the whole heap; they form no cycles, so the GC is paused while it is parsed."""
    if len(body) < LARGE_ANSWER or not gc.isenabled():
        return orjson.loads(body)
    gc.disable()
    try:
        return orjson.loads(body)
    finally:
        gc.enable()


def error_from_body(status: int, body: bytes, relay: str) -> DeviceAgentError:
    code, message = "", ""
    try:
        err = orjson.loads(body)["error"]
        code, message = str(err.get("code", "")), str(err.get("message", ""))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        message = body[:200].decode("utf-8", "replace")
    if code == "token_expired":
        return TokenExpired(f"the relay refused the token: it has expired; {NEW_TOKEN_HINT}")
    if code == "token_revoked":
        return TokenRevoked(
            f"the relay refused the token: this device was revoked ({message}); {NEW_TOKEN_HINT}"
        )
    if status in (401, 403) and (code.startswith("token") or status == 401):
        return AuthFailed(f"the relay refused the token ({code}: {message}); {NEW_TOKEN_HINT}")
    return RelayRefused(f"the relay at {relay} answered {status} {code}: {message}", code, status)


class RelayClient:
    """The device API over HTTP(S), with retries (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        retry: RetryPolicy | None = None,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        on_retry: Callable[[str, float], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.on_retry = on_retry
        self.retries = 0
        self.bytes_received = 0
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}", "Accept-Encoding": "gzip"},
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RelayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- core

    def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        read_timeout_s: float | None = None,
    ) -> Any:
        """One API call with retries; the parsed JSON answer."""
        content: bytes | None = None
        headers: dict[str, str] = {}
        if body is not None:
            content = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
            if len(content) > 1024:
                content = gzip.compress(content, 5)
                headers["Content-Encoding"] = "gzip"
        timeout = None
        if read_timeout_s is not None:
            timeout = httpx.Timeout(read_timeout_s, connect=min(10.0, self.timeout_s))
        last = ""
        for attempt in range(self.retry.attempts):
            try:
                response = self._http.request(
                    method,
                    path,
                    params=params,
                    content=content,
                    headers=headers,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
                self.bytes_received += len(response.content)
                if response.status_code < 400:
                    return parse_answer(response.content)
                if response.status_code not in RETRY_STATUS:
                    raise error_from_body(response.status_code, response.content, self.base_url)
                last = f"HTTP {response.status_code}"
                wait = self._retry_after(response)
            except httpx.TransportError as exc:  # connect, read, protocol, gzip decoding
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                wait = None
            except orjson.JSONDecodeError as exc:
                last = f"a malformed answer ({exc})"
                wait = None
            if attempt + 1 >= self.retry.attempts:
                break
            delay = wait if wait is not None else self.retry.delay(attempt, self._rng)
            self.retries += 1
            if self.on_retry is not None:
                self.on_retry(last, delay)
            self._sleep(delay)
        raise RelayUnreachable(
            f"the relay at {self.base_url} is unreachable ({last}); working offline: local "
            "reads and writes go on and edits wait in the journal"
        )

    def _retry_after(self, response: httpx.Response) -> float | None:
        value = response.headers.get("retry-after")
        if value is None:
            return None
        try:
            return min(self.retry.max_s * 6, max(0.0, float(value)))
        except ValueError:
            return None

    # ---- endpoints

    def schema(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/schema")
        return result

    def changes(
        self, cursor: str | None, limit: int | None = None, wait_s: float = 0.0
    ) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if cursor is not None:
            params["cursor"] = cursor
        if limit is not None:
            params["limit"] = limit
        if wait_s > 0:
            params["wait"] = wait_s
        result: dict[str, Any] = self.request(
            "GET", "/v1/changes", params, read_timeout_s=self.timeout_s + wait_s
        )
        return result

    def checkpoint(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/checkpoint")
        return result

    def upload_journal(self, entries: Sequence[Mapping[str, Any]]) -> UploadResult:
        """POST the entries; :class:`JournalUnsupported` if the relay has no journal endpoint."""
        try:
            answer = self.request("POST", "/v1/journal", body={"entries": list(entries)})
        except RelayRefused as exc:
            if exc.status in (404, 405):
                raise JournalUnsupported(
                    "the relay has no journal endpoint (POST /v1/journal) yet; edits stay pending",
                    exc.code,
                    exc.status,
                ) from exc
            raise
        return parse_upload_answer(answer, [int(e["seq"]) for e in entries])

    def outcomes(self, after: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """Outcomes after the cursor ``after`` (``GET /v1/outcomes?after=``), every page;
        :class:`JournalUnsupported` if the relay has no such endpoint."""
        items: list[dict[str, Any]] = []
        cursor = after
        for _ in range(1000):
            try:
                answer = self.request("GET", "/v1/outcomes", {"after": cursor or 0})
            except RelayRefused as exc:
                if exc.status in (404, 405):
                    raise JournalUnsupported(
                        "the relay has no outcomes endpoint yet", exc.code, exc.status
                    ) from exc
                raise
            if not isinstance(answer, dict):
                break
            items += [o for o in answer.get("outcomes") or () if isinstance(o, dict)]
            if answer.get("cursor") is not None:
                cursor = str(answer["cursor"])
            if not answer.get("has_more"):
                break
        return items, cursor

    def resolve_conflict(
        self, conflict_id: str, choice: str, values: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Settle a kept conflict on the server (``POST /v1/conflicts/{id}/resolve``)."""
        body: dict[str, Any] = {"choice": choice}
        if values is not None:
            body["values"] = dict(values)
        try:
            answer: dict[str, Any] = self.request(
                "POST", f"/v1/conflicts/{conflict_id}/resolve", body=body
            )
        except RelayRefused as exc:
            if exc.status in (404, 405) and exc.code in ("not_found", "method_not_allowed", ""):
                raise JournalUnsupported(
                    "the relay cannot resolve conflicts (no endpoint)", exc.code, exc.status
                ) from exc
            raise
        return answer

    # ---- WebSocket

    def stream_url(self, cursor: str | None) -> str:
        base = self.base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        return f"{base}/v1/stream" + (f"?{urlencode({'cursor': cursor})}" if cursor else "")

    @contextlib.contextmanager
    def stream(
        self, cursor: str | None, open_timeout_s: float = 10.0, tick_s: float = 1.0
    ) -> Iterator[Iterator[dict[str, Any] | None]]:
        """A WebSocket of changes messages from ``cursor`` (yields parsed messages, and
        None every ``tick_s`` seconds without one, so the caller can do other work).

        Errors the relay sends on the socket raise the mapped :mod:`device_agent.errors`;
        a dropped connection raises :class:`RelayUnreachable`."""
        from websockets.exceptions import InvalidHandshake, InvalidStatus, WebSocketException
        from websockets.sync.client import connect

        exits = contextlib.ExitStack()
        try:
            ws = exits.enter_context(
                connect(
                    self.stream_url(cursor),
                    additional_headers={"Authorization": f"Bearer {self.token}"},
                    open_timeout=open_timeout_s,
                    max_size=64 * 1024 * 1024,
                    compression="deflate",
                )
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            error = error_from_body(status, bytes(exc.response.body or b""), self.base_url)
            if isinstance(error, AuthFailed):
                raise error from exc  # 401, or the relay's 403 about the token
            # anything else (a proxy refusing the upgrade, a relay without /v1/stream):
            # the stream is unavailable, not the relay; the caller long-polls instead
            raise WebSocketUnavailable(
                f"the WebSocket upgrade to {self.base_url} was answered {status}: {error}"
            ) from exc
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise RelayUnreachable(f"no WebSocket to {self.base_url}: {exc}") from exc

        def messages() -> Iterator[dict[str, Any] | None]:
            while True:
                try:
                    raw = ws.recv(timeout=tick_s)
                except TimeoutError:
                    yield None
                    continue
                except WebSocketException as exc:
                    raise RelayUnreachable(
                        f"the WebSocket to {self.base_url} closed: {exc}"
                    ) from exc
                except OSError as exc:
                    raise RelayUnreachable(
                        f"the WebSocket to {self.base_url} failed: {exc}"
                    ) from exc
                self.bytes_received += len(raw)
                msg = orjson.loads(raw)
                if isinstance(msg, dict) and "error" in msg:
                    err = msg["error"]
                    raise error_from_body(
                        int(err.get("status", 400)), orjson.dumps(msg), self.base_url
                    )
                yield msg

        with exits:
            yield messages()


def parse_upload_answer(answer: Any, sent: Sequence[int]) -> UploadResult:
    """Read the relay's answer to a journal upload.

    Accepted shapes: ``{"results": [{"seq", "status": "accepted"|"rejected", "reason",
    "message"}]}`` or ``{"accepted": [seq...], "rejected": [{"seq", "reason", "message"}]}``;
    a bare 200 without either acknowledges every entry sent."""
    out = UploadResult()
    if isinstance(answer, dict) and isinstance(answer.get("results"), list):
        for r in answer["results"]:
            seq = int(r["seq"])
            if r.get("status") in ("rejected", "failed"):
                out.rejected[seq] = (str(r.get("reason", "")), str(r.get("message", "")))
            else:
                out.accepted.append(seq)
        return out
    if isinstance(answer, dict) and ("accepted" in answer or "rejected" in answer):
        out.accepted = [int(s) for s in answer.get("accepted") or ()]
        for r in answer.get("rejected") or ():
            out.rejected[int(r["seq"])] = (str(r.get("reason", "")), str(r.get("message", "")))
        return out
    out.accepted = list(sent)
    return out
