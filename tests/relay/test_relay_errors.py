"""The device API's one error shape on every error path; cursor codec; rate limiter; limits."""

from __future__ import annotations

import base64
import gzip
import threading
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from starlette.websockets import WebSocketDisconnect

from relay.api_errors import (
    DEFAULT_CODES,
    ApiError,
    InvalidCursor,
    error_body,
    install_error_handlers,
    ws_close_code,
)
from relay.auth import Revocation, RevocationList
from relay.downstream.api import create_app
from relay.downstream.api_cursor import Cursor, decode_cursor, encode_cursor
from relay.downstream.api_limits import LimitsMiddleware, RateLimiter
from relay.downstream.api_sync import ApiConfig
from relay.downstream.bucket_store import OpsPage, PageRequest
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.errors import TokenMissing
from tests.relay.downstream.test_relay_api import Env, wait_for_waiters

ERROR_KEYS = {"code", "message", "status"}


def assert_error_shape(status: int, body: Any, code: str | None = None) -> None:
    """Exactly {"error": {"code": str, "message": str, "status": int}}, status matching."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == ERROR_KEYS, body
    assert isinstance(err["code"], str) and err["code"], body
    assert isinstance(err["message"], str) and err["message"], body
    assert type(err["status"]) is int and err["status"] == status, body
    if code is not None:
        assert err["code"] == code, body


class BrokenStore(PgBucketStore):
    """The real store, except that reading ops fails with a bug (for the 500 path)."""

    async def read_pages_async(self, requests: Sequence[PageRequest]) -> list[OpsPage]:
        raise RuntimeError("secret internals: boom")


@pytest.fixture
def env(pg_dsn: str) -> Iterator[Env]:
    e = Env(pg_dsn, ApiConfig(rate_per_s=0.01, rate_burst=2, max_body_bytes=1000))
    try:
        yield e
    finally:
        e.store.close()


def test_every_error_path_has_the_one_shape(env: Env, pg_dsn: str) -> None:
    ok = env.headers("tab-1", technician="t1")
    with TestClient(env.app, raise_server_exceptions=False) as c:
        cases: list[tuple[int, str, Any]] = [
            (404, "not_found", c.get("/nope")),
            (404, "not_found", c.get("/v2/changes", headers=ok)),
            (405, "method_not_allowed", c.post("/v1/changes", headers=ok)),
            (405, "method_not_allowed", c.delete("/healthz")),
            (401, "token_missing", c.get("/v1/changes")),
            (401, "token_malformed", c.get("/v1/schema", headers={"Authorization": "Basic x"})),
            (
                401,
                "token_malformed",
                c.get("/v1/checkpoint", headers={"Authorization": "Bearer x"}),
            ),
            (413, "request_too_large", c.post("/v1/changes", content=b"x" * 2000, headers=ok)),
            (413, "request_too_large", c.post("/nope", content=b"x" * 2000)),
        ]
        env.auth.revoked = RevocationList([Revocation("tab-r")])
        cases.append((403, "token_revoked", c.get("/v1/changes", headers=env.headers("tab-r"))))
        # Each remaining case uses its own device, since the rate limit allows 2 per device.
        cases += [
            (422, "invalid_request", c.get("/v1/changes?limit=0", headers=env.headers("d1"))),
            (422, "invalid_request", c.get("/v1/changes?limit=abc", headers=env.headers("d2"))),
            (422, "invalid_request", c.get("/v1/changes?wait=-1", headers=env.headers("d3"))),
            (400, "invalid_cursor", c.get("/v1/changes?cursor=zzz", headers=env.headers("d4"))),
            (400, "invalid_cursor", c.get("/v1/changes?cursor=c1.!!", headers=env.headers("d5"))),
        ]
        limited = env.headers("d6")
        c.get("/v1/schema", headers=limited)
        c.get("/v1/schema", headers=limited)
        rate = c.get("/v1/schema", headers=limited)
        cases.append((429, "rate_limited", rate))
        assert int(rate.headers["retry-after"]) >= 1
    broken = BrokenStore(pg_dsn)
    try:
        app = create_app(broken, env.rules, env.auth, ApiConfig(rate_per_s=0))
        with TestClient(app, raise_server_exceptions=False) as c:
            r500 = c.get("/v1/changes", headers=ok)
            cases.append((500, "internal_error", r500))
            assert "secret internals" not in r500.text
    finally:
        broken.close()
    seen = set()
    for status, code, response in cases:
        assert response.status_code == status, (status, response.text)
        assert response.headers["content-type"].startswith("application/json")
        assert_error_shape(status, response.json(), code)
        seen.add(status)
    assert seen == {400, 401, 403, 404, 405, 413, 422, 429, 500}
    # The shape is relay.errors.AuthError.to_dict()'s.
    missing = next(r for s, _, r in cases if s == 401)
    assert set(missing.json()["error"]) == set(TokenMissing("m").to_dict()["error"])


def test_connection_limit_is_503_in_shape(pg_dsn: str) -> None:
    e = Env(pg_dsn, ApiConfig(rate_per_s=0, max_connections=1))
    try:
        with TestClient(e.app) as c:
            headers = e.headers("tab-1", technician="t1")
            cursor = c.get("/v1/changes", headers=headers).json()["cursor"]
            t = threading.Thread(
                target=lambda: c.get(
                    "/v1/changes", params={"cursor": cursor, "wait": 30}, headers=headers
                )
            )
            t.start()
            # the long-poll holds the one connection once it waits on its bucket
            wait_for_waiters(e.store, 'tech_orders["t1"]')
            r = c.get("/healthz")
            e.order(1, "t1")  # wakes the long-poll, which frees the connection
            t.join(90)
            assert not t.is_alive()
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            assert_error_shape(503, r.json(), "unavailable")
            assert c.get("/healthz").status_code == 200  # freed again
    finally:
        e.store.close()


def test_ws_errors_have_the_shape(env: Env) -> None:
    with TestClient(env.app) as c:
        for url, status in (
            ("/v1/stream?token=x.y.z", 401),
            (f"/v1/stream?token={env.token('w1')}&cursor=bogus", 400),
        ):
            with c.websocket_connect(url) as ws:
                assert_error_shape(status, ws.receive_json())
                with pytest.raises(WebSocketDisconnect) as info:
                    ws.receive_text()
                assert info.value.code == ws_close_code(status)
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text("not json")
            assert_error_shape(401, ws.receive_json(), "token_missing")


# --------------------------------------------------------------------------- limits middleware


def echo_app(max_body: int) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    app.add_middleware(LimitsMiddleware, max_body_bytes=max_body, max_connections=10)
    return TestClient(app)


def test_body_limit_counts_streamed_and_decompressed_bytes() -> None:
    with echo_app(1000) as c:
        assert c.post("/echo", content=b"x" * 1000).json() == {"bytes": 1000}

        def chunks() -> Iterator[bytes]:
            for _ in range(5):
                yield b"y" * 300

        r = c.post("/echo", content=chunks())  # no Content-Length: counted while read
        assert_error_shape(413, r.json(), "request_too_large")
        small = gzip.compress(b"z" * 900)
        r = c.post("/echo", content=small, headers={"Content-Encoding": "gzip"})
        assert r.json() == {"bytes": 900}
        bomb = gzip.compress(b"z" * 500_000)
        assert len(bomb) < 1000
        r = c.post("/echo", content=bomb, headers={"Content-Encoding": "gzip"})
        assert_error_shape(413, r.json(), "request_too_large")
        r = c.post("/echo", content=b"not gzip", headers={"Content-Encoding": "gzip"})
        assert_error_shape(400, r.json(), "bad_request")
        r = c.post("/echo", content=b"abc", headers={"Content-Encoding": "br"})
        assert_error_shape(400, r.json(), "bad_request")


# --------------------------------------------------------------------------- pure parts


def test_error_body_and_codes() -> None:
    assert error_body(404, "not_found", "m") == {
        "error": {"code": "not_found", "message": "m", "status": 404}
    }
    err = ApiError(429, "rate_limited", "slow down", {"Retry-After": "3"})
    assert err.to_dict() == error_body(429, "rate_limited", "slow down")
    assert err.headers() == {"Retry-After": "3"}
    assert {400, 401, 403, 404, 405, 413, 422, 429, 500, 503} <= set(DEFAULT_CODES)
    assert ws_close_code(401) == 4401 and ws_close_code(500) == 1011 and ws_close_code(418) == 4418


bucket_ids = st.text(min_size=1, max_size=40)


@given(
    st.dictionaries(
        bucket_ids, st.tuples(st.integers(0, 2**63 - 1), st.integers(0, 1000)), max_size=30
    )
)
def test_cursor_round_trip(entries: dict[str, tuple[int, int]]) -> None:
    ops = {b: n for b, (n, _) in entries.items()}
    epochs = {b: e for b, (_, e) in entries.items()}
    text = encode_cursor(ops, epochs)
    assert text.startswith("c1.") and text.isascii()
    cursor = decode_cursor(text)
    assert cursor.ops == {b: n for b, n in ops.items() if n > 0}
    assert cursor.epochs == {b: epochs[b] for b in cursor.ops}
    assert decode_cursor(encode_cursor(ops)).epochs == dict.fromkeys(cursor.ops, 0)


@given(st.text(max_size=200))
def test_cursor_decode_never_fails_otherwise(text: str) -> None:
    try:
        result = decode_cursor(text)
    except InvalidCursor as exc:
        assert exc.status == 400 and exc.code == "invalid_cursor"
    else:
        assert isinstance(result, Cursor)


def test_cursor_rejects_bombs_and_bad_entries() -> None:
    def pack(raw: bytes) -> str:
        return "c1." + base64.urlsafe_b64encode(zlib.compress(raw)).decode().rstrip("=")

    assert decode_cursor(None) == Cursor() and decode_cursor("") == Cursor()
    for raw in (
        b"[" + b" " * (2 << 20) + b"]",
        b'{"a":1}',
        b'[["a",-1,0]]',
        b'[["a",1,-1]]',
        b'[["a",true,0]]',
        b'[["a",1]]',
        b"[[1,2,0]]",
    ):
        with pytest.raises(InvalidCursor):
            decode_cursor(pack(raw))


def test_rate_limiter_token_bucket() -> None:
    now = [0.0]
    rl = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [rl.check("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.check("a") == pytest.approx(0.5)
    assert rl.check("b") == 0.0  # per device
    now[0] += 0.5
    assert rl.check("a") == 0.0
    assert rl.check("a") > 0
    assert RateLimiter(0, 1).check("x") == 0.0  # disabled


def test_rate_limiter_memory_is_bounded() -> None:
    now = [0.0]
    rl = RateLimiter(rate=10.0, burst=5, clock=lambda: now[0])
    for i in range(5000):
        now[0] += 0.01
        rl.check(f"dev-{i}")
    assert len(rl) < 2100  # idle devices (full buckets again) were swept
