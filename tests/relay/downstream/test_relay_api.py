"""Device API against the real PostgreSQL bucket store: HTTP long-poll, WebSocket push, gzip,
cursors, checkpoints, isolation between devices, 401/403."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.websockets import WebSocketDisconnect

from core.row_wire import checksum_add, row_checksum
from devtools import demo_schema
from relay.auth import Authenticator, Revocation, RevocationList, issue_token
from relay.auth_keys import Key, KeyStore
from relay.downstream.api import create_app
from relay.downstream.api_cursor import decode_cursor
from relay.downstream.api_stream import WS_RECHECK_S
from relay.downstream.api_sync import ApiConfig
from relay.downstream.bucket_store import ChangeKind, RowChange
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.rules import Rules
from relay.downstream.rules_parser import load_rules
from tests.schemas import DEMO_CATALOG, EXAMPLE_RULES, write_keys

SECRET = b"k" * 40
WO = "public.work_orders"


class Env:
    """A migrated store in a fresh database, the example rules, a key, and an app on top."""

    def __init__(self, dsn: str, config: ApiConfig | None = None) -> None:
        self.store = PgBucketStore(dsn)
        self.store.migrate()
        self.rules: Rules = load_rules(EXAMPLE_RULES, DEMO_CATALOG)
        self.keys = KeyStore([Key.hmac("k1", SECRET)], current="k1")
        self.auth = Authenticator(self.keys)
        self.config = config or ApiConfig(rate_per_s=0)
        self.app = create_app(self.store, self.rules, self.auth, self.config)
        self._lsn = itertools.count(1000)

    def token(self, device: str, ttl: float = 3600, **claims: Any) -> str:
        return issue_token(self.keys, None, device, claims, ttl)

    def headers(self, device: str, **claims: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(device, **claims)}"}

    def order(self, oid: int, technician: str | None, site: str = "plant-1", **extra: Any) -> None:
        row = {
            "id": oid,
            "site": site,
            "technician": technician,
            "status": "open",
            "due": None,
            "cost": "12.50",
            "notes": f"order {oid}",
            "updated_at": 0,
        }
        row.update(extra)
        self.apply(RowChange(WO, ChangeKind.UPSERT, (next(self._lsn), 0), (oid,), row))

    def delete(self, oid: int) -> None:
        self.apply(RowChange(WO, ChangeKind.DELETE, (next(self._lsn), 0), (oid,)))

    def part(self, pid: str, name: str) -> None:
        row = {"id": pid, "name": name, "unit": "pc", "discontinued": False}
        self.apply(RowChange("public.parts", ChangeKind.UPSERT, (next(self._lsn), 0), (pid,), row))

    def apply(self, *changes: RowChange) -> None:
        self.store.apply(self.rules, list(changes))


@pytest.fixture
def env(pg_dsn: str) -> Iterator[Env]:
    e = Env(pg_dsn)
    try:
        yield e
    finally:
        e.store.close()


@pytest.fixture
def client(env: Env) -> Iterator[TestClient]:
    with TestClient(env.app) as c:
        yield c


def sync_all(
    client: TestClient, headers: dict[str, str], cursor: str | None = None, limit: int | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Follow the cursor until a complete checkpoint: (ops, last message)."""
    ops: list[dict[str, Any]] = []
    for _ in range(1000):
        params: dict[str, Any] = {}
        if cursor is not None:
            params["cursor"] = cursor
        if limit is not None:
            params["limit"] = limit
        r = client.get("/v1/changes", params=params, headers=headers)
        assert r.status_code == 200, r.text
        msg = r.json()
        ops.extend(msg["ops"])
        cursor = msg["cursor"]
        if msg["checkpoint"]["complete"]:
            return ops, msg
        assert msg["has_more"]
    raise AssertionError("never reached a complete checkpoint")


def holdings(ops: list[dict[str, Any]]) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    """Apply ops: bucket -> (table, row_key text) -> data."""
    held: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for op in ops:
        rows = held.setdefault(op["bucket"], {})
        ref = (op["table"], json.dumps(op["key"], separators=(",", ":")))
        if op["op"] == "PUT":
            rows[ref] = op["data"]
        else:
            rows.pop(ref, None)
    return held


def verify(
    held: dict[str, dict[tuple[str, str], dict[str, Any]]], checkpoint: dict[str, Any]
) -> None:
    """What a device does: each bucket's count and checksum match what it holds."""
    for bucket, cp in checkpoint["buckets"].items():
        rows = held.get(bucket, {})
        total = 0
        for (table, key), data in rows.items():
            total = checksum_add(total, row_checksum(table, key, data))
        assert (len(rows), str(total)) == (cp["count"], cp["checksum"]), bucket


# --------------------------------------------------------------------------- HTTP


def test_healthz_and_openapi(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "store": "ok"}
    spec = client.get("/openapi.json").json()
    for path in ("/v1/schema", "/v1/changes", "/v1/checkpoint", "/v1/stream", "/healthz"):
        assert path in spec["paths"], path
    params = {p["name"] for p in spec["paths"]["/v1/changes"]["get"]["parameters"]}
    assert {"cursor", "limit", "wait"} <= params
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_schema_follows_claims_and_projections(env: Env, client: TestClient) -> None:
    body = client.get("/v1/schema", headers=env.headers("tab-1", technician="t1")).json()
    tables = {t["name"]: t for t in body["tables"]}
    assert set(tables) == {WO, "public.parts"}
    assert tables[WO]["columns"] == [
        "id",
        "site",
        "technician",
        "status",
        "due",
        "notes",
        "updated_at",
    ]
    assert tables["public.parts"]["columns"] == ["id", "name", "unit"]
    assert tables[WO]["key"] == ["id"]
    assert body["buckets"] == ["catalog[]", 'tech_orders["t1"]']

    body = client.get(
        "/v1/schema", headers=env.headers("tab-2", sites=["plant-1", "plant-2"])
    ).json()
    tables = {t["name"]: t for t in body["tables"]}
    assert set(tables) == {WO, "public.parts", "public.site_stock"}
    assert tables[WO]["columns"] == ["id", "site", "technician", "status", "due"]
    assert tables[WO]["rules"] == ["site"]
    assert tables["public.site_stock"]["key"] == ["site", "part_id"]


def test_changes_from_scratch_complete_and_verifiable(env: Env, client: TestClient) -> None:
    env.part("p1", "bolt")
    env.order(1, "t1")
    env.order(2, "t2")
    env.order(3, "t1", status="closed")  # filtered out of tech_orders
    ops, msg = sync_all(client, env.headers("tab-1", technician="t1"))
    assert sorted((o["bucket"], o["key"][0]) for o in ops) == [
        ("catalog[]", "p1"),
        ('tech_orders["t1"]', 1),
    ]
    order = next(o for o in ops if o["table"] == WO)
    assert "cost" not in order["data"] and order["data"]["notes"] == "order 1"
    # each op names the change event behind it (the device's journal base)
    part = next(o for o in ops if o["table"] == "public.parts")
    assert part["position"][1] == 0 and order["position"][1] == 0
    assert order["position"][0] > part["position"][0] > 0  # order 1 was written after p1
    assert msg["checkpoint"]["complete"] and not msg["has_more"]
    assert set(msg["checkpoint"]["buckets"]) == {"catalog[]", 'tech_orders["t1"]'}
    verify(holdings(ops), msg["checkpoint"])
    assert msg["resync"] == [] and msg["dropped"] == []


def test_cursor_resume_in_small_pages_and_incremental(env: Env, client: TestClient) -> None:
    for i in range(1, 8):
        env.order(i, "t1")
    headers = env.headers("tab-1", technician="t1")
    r = client.get("/v1/changes", params={"limit": 3}, headers=headers).json()
    assert len(r["ops"]) == 3 and r["has_more"] and not r["checkpoint"]["complete"]
    assert len(env.app.state.api.prefetch) == 1  # the next page is read ahead
    assert not r["checkpoint"]["buckets"]['tech_orders["t1"]']["complete"]
    ops, msg = sync_all(client, headers, cursor=r["cursor"], limit=3)
    all_ops = r["ops"] + ops
    assert [o["key"][0] for o in all_ops] == list(range(1, 8))
    verify(holdings(all_ops), msg["checkpoint"])
    # Nothing new: the same cursor gives no ops (no wait asked).
    again = client.get("/v1/changes", params={"cursor": msg["cursor"]}, headers=headers).json()
    assert again["ops"] == [] and again["checkpoint"]["complete"]
    # An update and a new order arrive; resuming gets exactly those.
    env.order(3, "t1", notes="changed")
    env.order(9, "t1")
    more, last = sync_all(client, headers, cursor=msg["cursor"])
    assert [(o["key"][0], o["op"]) for o in more] == [(3, "PUT"), (9, "PUT")]
    verify(holdings(all_ops + more), last["checkpoint"])


def test_reassignment_moves_row_between_devices(env: Env, client: TestClient) -> None:
    a, b = env.headers("tab-a", technician="ta"), env.headers("tab-b", technician="tb")
    env.order(5, "ta")
    ops_a, msg_a = sync_all(client, a)
    ops_b, msg_b = sync_all(client, b)
    assert [o["key"] for o in ops_a if o["table"] == WO] == [[5]]
    assert [o for o in ops_b if o["table"] == WO] == []
    env.order(5, "tb")  # reassigned
    new_a, last_a = sync_all(client, a, cursor=msg_a["cursor"])
    new_b, last_b = sync_all(client, b, cursor=msg_b["cursor"])
    assert [(o["op"], o["key"]) for o in new_a] == [("REMOVE", [5])]
    assert [(o["op"], o["key"]) for o in new_b] == [("PUT", [5])]
    verify(holdings(ops_a + new_a), last_a["checkpoint"])
    verify(holdings(ops_b + new_b), last_b["checkpoint"])
    assert last_a["checkpoint"]["buckets"]['tech_orders["ta"]']["count"] == 0


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 6),
            st.sampled_from(["t1", "t2", "t3", None]),
            st.sampled_from(["plant-1", "plant-2"]),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_device_never_sees_another_devices_bucket(
    env: Env, client: TestClient, edits: list[tuple[int, str | None, str, bool]]
) -> None:
    """Whatever the edits, a device holds exactly the rows its claims grant, nothing else."""
    tag = uuid.uuid4().hex[:8]  # fresh technicians per example: the store is shared
    techs = {t: f"{t}-{tag}" if t else None for t in ("t1", "t2", "t3", None)}
    base = int(uuid.uuid4().int % 10**9) * 10
    for oid, tech, site, delete in edits:
        if delete:
            env.delete(base + oid)
        else:
            env.order(base + oid, techs[tech], site=site)
    expected: dict[str, set[int]] = {techs[t] or "": set() for t in ("t1", "t2", "t3")}
    latest: dict[int, tuple[str | None, bool]] = {}
    for oid, tech, _site, delete in edits:
        latest[oid] = (techs[tech], delete)
    for oid, (tech, deleted) in latest.items():
        if tech is not None and not deleted:
            expected[tech].add(base + oid)
    for t in ("t1", "t2", "t3"):
        tech = techs[t]
        assert tech is not None
        ops, msg = sync_all(client, env.headers(f"dev-{tech}", technician=tech))
        held = holdings(ops)
        assert (
            set(held)
            <= set(msg["checkpoint"]["buckets"])
            == {"catalog[]", f'tech_orders["{tech}"]'}
        )
        got = {json.loads(k)[0] for (table, k) in held.get(f'tech_orders["{tech}"]', {})}
        assert got == expected[tech]
        verify(held, msg["checkpoint"])


def wait_for_waiters(store: PgBucketStore, bucket: str, count: int = 1) -> None:
    """Until ``count`` long-polls or streams of this process wait on ``bucket``."""
    deadline = time.monotonic() + 60
    while store.waiting(bucket) < count:
        assert time.monotonic() < deadline, f"nothing came to wait on {bucket}"
        time.sleep(0.02)


@contextlib.contextmanager
def served(pg_dsn: str, config: ApiConfig) -> Iterator[tuple[Env, TestClient]]:
    """An :class:`Env` with ``config`` and a client of its app; the store closed after."""
    e = Env(pg_dsn, config)
    try:
        with TestClient(e.app) as client:
            yield e, client
    finally:
        e.store.close()


def test_long_poll_wakes_on_store_change(pg_dsn: str) -> None:
    # the long-poll may wait 120 s: answering well before that is the wake-up, whatever
    # the machine's speed (a missed notification would answer at the end of the wait)
    with served(pg_dsn, ApiConfig(rate_per_s=0, long_poll_s=120)) as (e, client):
        headers = e.headers("tab-1", technician="t1")
        _, msg = sync_all(client, headers)
        result: dict[str, Any] = {}

        def poll() -> None:
            r = client.get(
                "/v1/changes", params={"cursor": msg["cursor"], "wait": 120}, headers=headers
            )
            result["body"] = r.json()

        t = threading.Thread(target=poll)
        t.start()
        wait_for_waiters(e.store, 'tech_orders["t1"]')
        assert t.is_alive(), "the long-poll answered before anything changed"
        e.order(2, "t2")  # another device's bucket: must not wake this one with data
        time.sleep(0.3)
        assert t.is_alive()
        e.order(1, "t1")
        t.join(90)
        assert not t.is_alive(), "the change did not wake the long-poll"
        assert [o["key"] for o in result["body"]["ops"]] == [[1]]
        assert result["body"]["checkpoint"]["complete"]


def test_long_poll_times_out_empty(env: Env, client: TestClient) -> None:
    headers = env.headers("tab-1", technician="t1")
    _, msg = sync_all(client, headers)
    t0 = time.monotonic()
    r = client.get("/v1/changes", params={"cursor": msg["cursor"], "wait": 0.7}, headers=headers)
    assert r.status_code == 200 and r.json()["ops"] == []
    assert 0.6 <= time.monotonic() - t0 < 60  # the upper bound only catches a hang
    assert decode_cursor(r.json()["cursor"]) == decode_cursor(msg["cursor"])


def test_wait_is_capped_by_config(pg_dsn: str) -> None:
    with served(pg_dsn, ApiConfig(rate_per_s=0, long_poll_s=0.3)) as (e, c):
        headers = e.headers("tab-1", technician="t1")
        _, msg = sync_all(c, headers)
        t0 = time.monotonic()
        r = c.get("/v1/changes", params={"cursor": msg["cursor"], "wait": 60}, headers=headers)
        # capped at 0.3 s, not the 60 s asked for (the bound leaves the machine 30 s)
        assert r.status_code == 200 and time.monotonic() - t0 < 30


def test_checkpoint_endpoint_matches_changes(env: Env, client: TestClient) -> None:
    env.order(1, "t1")
    env.part("p1", "nut")
    headers = env.headers("tab-1", technician="t1")
    ops, msg = sync_all(client, headers)
    cp = client.get("/v1/checkpoint", headers=headers).json()
    assert cp["complete"]
    assert set(cp["buckets"]) == set(msg["checkpoint"]["buckets"])
    for b, v in cp["buckets"].items():
        want = msg["checkpoint"]["buckets"][b]
        assert (v["last_op_id"], v["count"], v["checksum"]) == (
            want["last_op_id"],
            want["count"],
            want["checksum"],
        )
    verify(holdings(ops), cp)


def test_gzip_when_asked(env: Env, client: TestClient) -> None:
    for i in range(1, 60):
        env.order(i, "t1")
    headers = env.headers("tab-1", technician="t1")
    with client.stream("GET", "/v1/changes", headers={**headers, "Accept-Encoding": "gzip"}) as r:
        assert r.headers["content-encoding"] == "gzip"
        raw = b"".join(r.iter_raw())
    body = json.loads(gzip.decompress(raw))
    assert len(body["ops"]) == 59
    assert len(raw) < len(json.dumps(body)) / 3
    with client.stream(
        "GET", "/v1/changes", headers={**headers, "Accept-Encoding": "identity"}
    ) as r:
        assert "content-encoding" not in r.headers
        assert json.loads(b"".join(r.iter_raw()))["ops"] == body["ops"]


def test_cursor_of_bucket_no_longer_granted_is_dropped(env: Env, client: TestClient) -> None:
    env.order(1, "t1")
    _, msg = sync_all(client, env.headers("tab-1", technician="t1"))
    # Same device, new token: now technician t9; its old bucket is listed as dropped.
    r = client.get(
        "/v1/changes",
        params={"cursor": msg["cursor"]},
        headers=env.headers("tab-1", technician="t9"),
    ).json()
    assert r["dropped"] == ['tech_orders["t1"]']
    assert 'tech_orders["t1"]' not in decode_cursor(r["cursor"]).ops
    assert all(o["bucket"] != 'tech_orders["t1"]' for o in r["ops"])


def test_resync_after_compaction_dropped_removes(env: Env, client: TestClient) -> None:
    headers = env.headers("tab-1", technician="t1")
    env.order(1, "t1")
    env.order(2, "t1")
    _, msg = sync_all(client, headers)
    env.delete(1)
    env.order(3, "t1")
    env.store.compact(drop_removes_below=10**12)
    r = client.get("/v1/changes", params={"cursor": msg["cursor"]}, headers=headers).json()
    assert r["resync"] == ['tech_orders["t1"]']
    assert not r["checkpoint"]["complete"]
    ops, last = sync_all(client, headers, cursor=r["cursor"])
    held = holdings(ops)
    assert {json.loads(k)[0] for _, k in held['tech_orders["t1"]']} == {2, 3}
    verify(held, last["checkpoint"])
    # A device paging from scratch after the drop is not sent back to 0: its cursors carry
    # the compaction epoch they were read under (sync_all fails on an unexpected resync).
    env.order(4, "t1")
    env.delete(2)
    env.store.compact(drop_removes_below=10**12)
    ops, last = sync_all(client, env.headers("tab-2", technician="t1"), limit=1)
    assert {json.loads(k)[0] for _, k in holdings(ops)['tech_orders["t1"]']} == {3, 4}


# --------------------------------------------------------------------------- auth


def test_401_and_403(env: Env, client: TestClient) -> None:
    r = client.get("/v1/changes")
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_missing"
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = client.get("/v1/schema", headers={"Authorization": "Bearer not.a.jwt"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_malformed"
    expired = issue_token(env.keys, None, "tab-1", {}, 10, now=time.time() - 3600)
    r = client.get("/v1/checkpoint", headers={"Authorization": f"Bearer {expired}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_expired"
    other = KeyStore([Key.hmac("k1", b"x" * 40)], current="k1")
    forged = issue_token(other, None, "tab-1", {"technician": "t1"}, 60)
    r = client.get("/v1/changes", headers={"Authorization": f"Bearer {forged}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_bad_signature"
    wrong_aud = issue_token(env.keys, None, "tab-1", {}, 60, audience="elsewhere")
    r = client.get("/v1/changes", headers={"Authorization": f"Bearer {wrong_aud}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_wrong_audience"
    env.auth.revoked = RevocationList([Revocation("stolen-tab", None, "lost on site")])
    r = client.get("/v1/changes", headers=env.headers("stolen-tab", technician="t1"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "token_revoked"
    assert "lost on site" in r.json()["error"]["message"]
    assert "www-authenticate" not in r.headers


def test_healthz_reports_unreachable_store(pg_dsn: str) -> None:
    e = Env(pg_dsn)
    bad = PgBucketStore(psycopg.conninfo.make_conninfo(pg_dsn, port=1), connect_timeout=1)
    try:
        app = create_app(bad, e.rules, e.auth, e.config)
        with TestClient(app) as c:
            r = c.get("/healthz")
            assert r.status_code == 503 and r.json()["store"] == "unreachable"
            r = c.get("/v1/changes", headers=e.headers("tab-1", technician="t1"))
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
            assert r.headers["retry-after"] == "1"
    finally:
        bad.close()
        e.store.close()


# --------------------------------------------------------------------------- WebSocket


def ws_next(ws: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ws.receive_text())
    return data


def test_ws_stream_pushes_changes(env: Env, client: TestClient) -> None:
    env.order(1, "t1")
    with client.websocket_connect(
        "/v1/stream", headers=env.headers("tab-1", technician="t1")
    ) as ws:
        first = ws_next(ws)
        assert first["type"] == "changes" and [
            o["key"] for o in first["ops"] if o["table"] == WO
        ] == [[1]]
        assert first["checkpoint"]["complete"]
        t0 = time.monotonic()
        env.order(2, "t2")  # not ours
        env.order(3, "t1")
        pushed = ws_next(ws)
        # pushed on the change, not at the stream's next re-check (WS_RECHECK_S, 30 s)
        assert time.monotonic() - t0 < WS_RECHECK_S - 5
        assert [(o["op"], o["key"]) for o in pushed["ops"]] == [("PUT", [3])]
        assert pushed["checkpoint"]["complete"]
        verify(holdings(first["ops"] + pushed["ops"]), pushed["checkpoint"])


@pytest.mark.parametrize("how", ["query", "message"])
def test_ws_token_in_query_or_first_message_and_resume(
    env: Env, client: TestClient, how: str
) -> None:
    env.order(1, "t1")
    headers = env.headers("tab-1", technician="t1")
    _, msg = sync_all(client, headers)
    env.order(2, "t1")
    token = env.token("tab-1", technician="t1")
    if how == "query":
        ctx = client.websocket_connect(f"/v1/stream?token={token}&cursor={msg['cursor']}")
    else:
        ctx = client.websocket_connect("/v1/stream")
    with ctx as ws:
        if how == "message":
            ws.send_text(json.dumps({"token": token, "cursor": msg["cursor"]}))
        first = ws_next(ws)
        assert [o["key"] for o in first["ops"]] == [[2]]  # resumed: only what is new


def test_ws_bad_token_gets_error_shape_and_close_code(env: Env, client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?token=nope") as ws:
        err = ws_next(ws)
        assert set(err) == {"error"} and err["error"]["status"] == 401
        with pytest.raises(WebSocketDisconnect) as info:
            ws.receive_text()
        assert info.value.code == 4401
    env.auth.revoked = RevocationList([Revocation("tab-x")])
    with client.websocket_connect("/v1/stream", headers=env.headers("tab-x")) as ws:
        assert ws_next(ws)["error"]["code"] == "token_revoked"
        with pytest.raises(WebSocketDisconnect) as info:
            ws.receive_text()
        assert info.value.code == 4403


def test_ws_closes_when_token_expires(env: Env, client: TestClient) -> None:
    env.auth = env.auth  # leeway is part of the authenticator: use one without
    auth = Authenticator(env.keys, leeway_s=0)
    app = create_app(env.store, env.rules, auth, env.config)
    with TestClient(app) as c:
        token = issue_token(env.keys, None, "tab-1", {"technician": "t1"}, 2)
        with c.websocket_connect("/v1/stream", headers={"Authorization": f"Bearer {token}"}) as ws:
            assert ws_next(ws)["type"] == "changes"
            err = ws_next(ws)
            assert err["error"]["code"] == "token_expired"
            with pytest.raises(WebSocketDisconnect) as info:
                ws.receive_text()
            assert info.value.code == 4401


# --------------------------------------------------------------------------- fieldsync relay run


def test_relay_run_serves_and_stops_cleanly(pg_dsn: str, tmp_path: Path) -> None:
    """`fieldsync relay run --no-engine`: serves the API, masks tokens in logs, exits 0 on
    SIGTERM; /v1/schema follows a column added and a key redefined while it runs."""

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(demo_schema.DDL)  # the tables the example rules are written for
    keys = write_keys(tmp_path / "keys.toml", "s" * 40)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\nstore_dsn = "{pg_dsn}"\nsource_dsn = "{pg_dsn}"\nrules = "{EXAMPLE_RULES}"\n'
        "schema_check_interval_s = 0.2\n"
        f'[http]\nport = 0\n[auth]\nkeys_file = "{keys}"\n'
    )
    proc, base, lines, reader = start_relay_run(config, "--no-engine")
    try:
        token = issue_token(KeyStore.from_file(keys), None, "tab-1", {"technician": "t1"}, 600)
        assert httpx.get(f"{base}/healthz").json()["status"] == "ok"
        r = httpx.get(f"{base}/v1/changes", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["checkpoint"]["complete"]
        r = httpx.get(f"{base}/v1/changes", params={"token": token})
        assert r.status_code == 401

        def work_orders() -> dict[str, Any]:
            schema = httpx.get(f"{base}/v1/schema", headers={"Authorization": f"Bearer {token}"})
            found = [t for t in schema.json()["tables"] if t["name"] == "public.work_orders"]
            assert len(found) == 1, schema.text
            return dict(found[0])

        before = work_orders()
        assert before["key"] == ["id"] and "priority" not in before["columns"]
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                "alter table work_orders add column priority int, drop constraint "
                "work_orders_pkey, add primary key (id, site)"
            )
        deadline = time.monotonic() + 60
        while (after := work_orders())["key"] != ["id", "site"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert after["key"] == ["id", "site"] and "priority" in after["columns"], after
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        reader.join(30)
    log_text = "".join(lines)
    assert proc.returncode == 0, log_text
    assert token not in log_text and "token=***" in log_text
    assert (
        "the captured tables changed; /v1/schema and the journal follow: public.work_orders: "
        "key (id) → (id, site), columns +priority" in log_text
    ), log_text


def test_relay_run_config_error_exit_code(tmp_path: Path) -> None:

    config = tmp_path / "relay.toml"
    config.write_text('[http]\nport = "x"\n')
    r = subprocess.run(
        [sys.executable, "-m", "fieldsync.cli", "relay", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "http.port" in r.stderr


def test_ws_initial_sync_in_pages(pg_dsn: str) -> None:
    """A stream from scratch sends pages back to back (read ahead) up to a complete checkpoint."""
    e = Env(pg_dsn, ApiConfig(rate_per_s=0, max_page_ops=3))
    try:
        for i in range(1, 9):
            e.order(i, "t1")
        with (
            TestClient(e.app) as c,
            c.websocket_connect("/v1/stream", headers=e.headers("tab-1", technician="t1")) as ws,
        ):
            ops: list[dict[str, Any]] = []
            messages = 0
            while True:
                msg = ws_next(ws)
                messages += 1
                ops += msg["ops"]
                if msg["checkpoint"]["complete"]:
                    break
                assert msg["has_more"]
            assert messages == 3 and [o["key"][0] for o in ops] == list(range(1, 9))
            verify(holdings(ops), msg["checkpoint"])
            e.order(9, "t1")
            assert [o["key"] for o in ws_next(ws)["ops"]] == [[9]]
    finally:
        e.store.close()


def test_relay_run_full_path_cdc_kafka_engine_api(
    pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """`fieldsync relay run` with its engine: a row committed in PostgreSQL reaches a device
    through cdc, Kafka, the bucket engine, the store and a long-poll."""
    from tests.cdc.cdc_support import make_settings, running_daemon

    rules = tmp_path / "rules.toml"
    rules.write_text(
        'token_claims = ["technician"]\n[[bucket]]\nname = "tech"\nparameters = ["t"]\n'
        'claims = { t = "technician" }\n[[bucket.table]]\ntable = "public.work_orders"\n'
        'match = { technician = "t" }\nexclude = ["cost"]\n'
    )
    keys = write_keys(tmp_path / "keys.toml", "s" * 40)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\nstore_dsn = "{store_dsn}"\nsource_dsn = "{pg_dsn}"\nrules = "{rules}"\n'
        f'topic_prefix = "{topic_prefix}"\nkafka_bootstrap_servers = "{kafka_bootstrap}"\n'
        f'batch_max_ms = 10\n[http]\nport = 0\n[auth]\nkeys_file = "{keys}"\n'
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "create table work_orders (id int primary key, technician text, notes text, cost int)"
        )
        conn.execute("insert into work_orders values (1, 't1', 'first', 5), (2, 't2', 'x', 6)")
    token = issue_token(KeyStore.from_file(keys), None, "tab-1", {"technician": "t1"}, 600)
    headers = {"Authorization": f"Bearer {token}"}
    proc = None
    try:
        with running_daemon(make_settings(pg_dsn, kafka_bootstrap, topic_prefix)):
            proc, base, _, _ = start_relay_run(config)
            cursor = None
            rows: dict[int, dict[str, Any]] = {}
            deadline = time.monotonic() + 60
            while 1 not in rows and time.monotonic() < deadline:  # the snapshot row
                params = {"wait": 5, **({"cursor": cursor} if cursor else {})}
                msg = httpx.get(
                    f"{base}/v1/changes", params=params, headers=headers, timeout=30
                ).json()
                rows.update({o["key"][0]: o["data"] for o in msg["ops"] if o["op"] == "PUT"})
                cursor = msg["cursor"]
            assert rows == {1: {"id": 1, "technician": "t1", "notes": "first"}}
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute("update work_orders set notes = 'edited' where id = 1")
                conn.execute("update work_orders set technician = 't1' where id = 2")
            got: dict[int, Any] = {}
            deadline = time.monotonic() + 60
            while len(got) < 2 and time.monotonic() < deadline:
                msg = httpx.get(
                    f"{base}/v1/changes",
                    params={"cursor": cursor, "wait": 10},
                    headers=headers,
                    timeout=30,
                ).json()
                got.update({o["key"][0]: o["data"] for o in msg["ops"]})
                cursor = msg["cursor"]
            assert got[1]["notes"] == "edited" and got[2]["technician"] == "t1"
            assert msg["checkpoint"]["buckets"]['tech["t1"]']["count"] == 2
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert proc.returncode == 0


def start_relay_run(
    config: Path, *options: str
) -> tuple[subprocess.Popen[str], str, list[str], threading.Thread]:
    """``fieldsync relay run --config config [options]``: the process, its base URL, its
    output lines and the thread that collects them until the process exits."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fieldsync.cli", "relay", "run", "--config", str(config), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    port = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not port:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"device API listening on http://[^:]+:(\d+)", line)
        port = int(m.group(1)) if m else 0
    assert port, "relay did not start: " + "".join(lines)
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    return proc, f"http://127.0.0.1:{port}", lines, reader


def test_relay_run_without_source_dsn_follows_a_column_added_from_the_schema_log(
    pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """`fieldsync relay run` taking the tables' definitions from ``{prefix}._schemas``: a
    column added while it runs reaches /v1/schema once cdc published the table's new
    schema (with its first event), and the rows carry it; no restart."""
    from tests.cdc.cdc_support import make_settings, running_daemon

    rules = tmp_path / "rules.toml"
    rules.write_text('[[bucket]]\nname = "all"\n[[bucket.table]]\ntable = "public.gauges"\n')
    keys = write_keys(tmp_path / "keys.toml", "s" * 40)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\nstore_dsn = "{store_dsn}"\nrules = "{rules}"\n'
        f'topic_prefix = "{topic_prefix}"\nkafka_bootstrap_servers = "{kafka_bootstrap}"\n'
        "batch_max_ms = 10\nschema_check_interval_s = 0.2\n"
        f'[http]\nport = 0\n[auth]\nkeys_file = "{keys}"\n'
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table gauges (id int primary key, qty int not null)")
        conn.execute("insert into gauges values (1, 10)")
    headers = {
        "Authorization": "Bearer " + issue_token(KeyStore.from_file(keys), None, "tab-1", {}, 600)
    }
    proc = None
    try:
        with running_daemon(make_settings(pg_dsn, kafka_bootstrap, topic_prefix)):
            proc, base, lines, reader = start_relay_run(config)

            def gauges() -> dict[str, Any]:
                tables = httpx.get(f"{base}/v1/schema", headers=headers).json()["tables"]
                return next((t for t in tables if t["name"] == "public.gauges"), {})

            def columns() -> list[str]:
                return list(gauges().get("columns", []))

            assert columns() == ["id", "qty"]
            assert gauges()["kinds"] == {"id": "int", "qty": "int"}, "kinds from the schema log"
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute("alter table gauges add column note text")
                conn.execute("update gauges set note = 'new' where id = 1")
            deadline = time.monotonic() + 60
            while columns() != ["id", "qty", "note"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert columns() == ["id", "qty", "note"], "".join(lines)
            data: dict[str, Any] = {}
            cursor = None
            deadline = time.monotonic() + 60
            while data.get("note") != "new" and time.monotonic() < deadline:
                params = {"wait": 5, **({"cursor": cursor} if cursor else {})}
                msg = httpx.get(
                    f"{base}/v1/changes", params=params, headers=headers, timeout=30
                ).json()
                for op in msg["ops"]:
                    data = op["data"] if op["op"] == "PUT" else {}
                cursor = msg["cursor"]
            assert data == {"id": 1, "qty": 10, "note": "new"}
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            reader.join(30)
    assert proc.returncode == 0
    assert any("public.gauges: columns +note" in line for line in lines), "".join(lines)


def test_revocation_file_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    from relay.server import revocation_watcher

    path = tmp_path / "revoked.toml"
    path.write_text('[[revoked]]\ndevice = "tab-1"\n')
    auth = Authenticator(KeyStore([Key.hmac("k1", SECRET)], current="k1"))
    with revocation_watcher(auth, str(path), poll_s=0.05):
        path.write_text('[[revoked]]\ndevice = "tab-2"\nreason = "stolen"\n')
        os.utime(path, (time.time() + 5, time.time() + 5))  # a new mtime even on coarse clocks
        deadline = time.monotonic() + 60
        while auth.revoked.revocation_for("tab-2", time.time()) is None:
            assert time.monotonic() < deadline, "revocation list not reloaded"
            time.sleep(0.05)
        path.write_text("not toml [")  # a broken file keeps the last good list
        os.utime(path, (time.time() + 10, time.time() + 10))
        time.sleep(0.3)
        assert auth.revoked.revocation_for("tab-2", time.time()) is not None
