"""Hostile inputs, table-driven, against the device API with the real store, broker and
applier: every field of a journal upload and entry, a conflict resolution, a cursor and a
token, at its boundaries and beyond (types, ranges, sizes, encodings).

- A request refused as a whole gets its 4xx and documented code in the one error shape,
  and nothing is written: the ``_journal`` topic and the intake records gain nothing, the
  data and the kept conflicts are unchanged.
- An entry refused on its own is answered ``rejected`` with its documented reason (the
  upload's other entries are not held up, docs/journal.md), travels to the applier with
  that rejection, gets a ``rejected`` outcome with the same reason, and writes nothing."""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient

from core.hlc import Hlc
from core.journal_format import MAX_BIGINT
from relay.downstream.api_cursor import encode_cursor
from tests.relay.test_relay_errors import assert_error_shape
from tests.relay.upstream.test_journal_api import (
    BASE,
    SECRET,
    Env,
    entry,
    make_env,
    outcomes_until,
)

DEVICE = "tab-1"
U64 = (1 << 64) - 1


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def env(pg_dsn: str, store_dsn: str, kafka_bootstrap: str, tmp_path: Path) -> Iterator[Env]:
    e = make_env(pg_dsn, store_dsn, kafka_bootstrap, tmp_path)
    e.start()
    try:
        yield e
    finally:
        e.close()


@pytest.fixture
def client(env: Env) -> Iterator[TestClient]:
    with TestClient(env.app, raise_server_exceptions=False) as c:
        yield c


def snapshot(env: Env) -> tuple[Any, ...]:
    """Everything a refused request must leave as it was."""
    with env.store.connect() as conn:
        intake = conn.execute("select count(*) from fieldsync_relay_journal.intake").fetchall()
    return (
        len(env.journal_records()),
        intake,
        env.sql("select * from work_orders order by id"),
        env.sql("select id, status from fieldsync_applier.conflicts order by id"),
    )


def token(env: Env, payload: dict[str, Any] | None = None, **headers: Any) -> str:
    """A token signed with the relay's key, with ``payload`` over sensible claims."""
    now = int(time.time())
    claims = {
        "sub": DEVICE,
        "iss": "fieldsync",
        "aud": "fieldsync-relay",
        "iat": now,
        "exp": now + 600,
        "technician": "t42",
    }
    claims.update(payload or {})
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "k1", **headers})


LATIN1: Any = {"Authorization": b"Bearer \xff\xfe"}  # header bytes that are not ASCII


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


# --------------------------------------------------------------------------- uploads as a whole


def upload_cases(h: dict[str, str]) -> list[tuple[str, dict[str, Any], int, str]]:
    """(what, request keyword arguments, status, code) of uploads refused as a whole."""

    def body(*entries: Any) -> dict[str, Any]:
        return {"json": {"entries": list(entries)}}

    def with_seq(seq: Any) -> dict[str, Any]:
        return body({**entry(DEVICE, 1, new={"notes": "x"}), "seq": seq})

    deep = b'{"entries": [' + b"[" * 5_000 + b"]" * 5_000 + b"]}"
    return [
        ("not JSON", {"content": b"{not json"}, 400, "bad_upload"),
        ("invalid UTF-8", {"content": b'{"entries": ["\xff\xfe"]}'}, 400, "bad_upload"),
        ("a lone surrogate", {"content": b'{"entries": ["\\ud800"]}'}, 400, "bad_upload"),
        ("a number beyond double", {"content": b'{"entries": [1e400]}'}, 400, "bad_upload"),
        ("nesting 5000 deep", {"content": deep}, 400, "bad_upload"),
        ("a top-level array", {"json": [entry(DEVICE, 1)]}, 400, "bad_upload"),
        ("entries an object", {"json": {"entries": {}}}, 400, "bad_upload"),
        ("entries null", {"json": {"entries": None}}, 400, "bad_upload"),
        ("no entries key", {"json": {"entry": []}}, 400, "bad_upload"),
        ("an entry not an object", body("x"), 400, "bad_upload"),
        (
            "seq missing",
            body({k: v for k, v in entry(DEVICE, 1).items() if k != "seq"}),
            400,
            "bad_upload",
        ),
        ("seq 0", with_seq(0), 400, "bad_upload"),
        ("seq -1", with_seq(-1), 400, "bad_upload"),
        ("seq 2^63", with_seq(MAX_BIGINT + 1), 400, "bad_upload"),
        ("seq 2^64-1", with_seq(U64), 400, "bad_upload"),
        (
            "seq 2^64 (a float to JSON)",
            {"content": b'{"entries": [{"seq": 18446744073709551616}]}'},
            400,
            "bad_upload",
        ),
        ("seq a string", with_seq("1"), 400, "bad_upload"),
        ("seq a float", with_seq(1.5), 400, "bad_upload"),
        ("seq true", with_seq(True), 400, "bad_upload"),
        ("seq null", with_seq(None), 400, "bad_upload"),
        (
            "seqs not increasing",
            body(entry(DEVICE, 2, new={"notes": "x"}), entry(DEVICE, 2, new={"notes": "y"})),
            400,
            "bad_upload",
        ),
        (
            "501 entries",
            body(*[entry(DEVICE, i, new={"notes": "x"}) for i in range(1, 502)]),
            413,
            "batch_too_large",
        ),
        ("a body over max_body_bytes", {"content": b" " * 200_001}, 413, "request_too_large"),
        (
            "a gzip bomb",
            {"content": gzip.compress(b" " * 2_000_000), "headers": {"Content-Encoding": "gzip"}},
            413,
            "request_too_large",
        ),
        (
            "corrupt gzip",
            {"content": b"not gzip", "headers": {"Content-Encoding": "gzip"}},
            400,
            "bad_request",
        ),
        (
            "an unknown encoding",
            {"content": b"{}", "headers": {"Content-Encoding": "br"}},
            400,
            "bad_request",
        ),
        (
            "a Content-Length that is no number",
            {"content": b"{}", "headers": {"Content-Length": "x"}},
            400,
            "bad_request",
        ),
    ]


def test_uploads_refused_as_a_whole_write_nothing(env: Env, client: TestClient) -> None:
    env.insert()
    h = env.headers(DEVICE)
    before = snapshot(env)
    wrong = []
    for what, kw, status, code in upload_cases(h):
        headers = {**h, **kw.pop("headers", {})}
        r = client.post("/v1/journal", headers=headers, **kw)
        try:
            assert r.status_code == status, r.text[:300]
            assert_error_shape(status, r.json(), code)
        except AssertionError as exc:
            wrong.append(f"{what}: {exc}")
    assert not wrong, "\n".join(wrong)
    assert snapshot(env) == before


# --------------------------------------------------------------------------- single entries


def entry_cases() -> list[tuple[str, dict[str, Any], str]]:
    """(what, fields over a valid update of row 1 by tab-1, documented reason)."""
    row = {**BASE}
    hlc = Hlc(now_ms(), 0, DEVICE).encode()
    return [
        ("table a number", {"table": 7}, "malformed"),
        ("table empty", {"table": ""}, "malformed"),
        ("table of 301 characters", {"table": "p." + "t" * 299}, "malformed"),
        ("table with NUL", {"table": "public.work\x00orders"}, "malformed"),
        ("table with a newline", {"table": "public.work\norders"}, "malformed"),
        ("a table it does not sync", {"table": "public.nothing"}, "unknown_table"),
        ("op unknown", {"op": "upsert"}, "malformed"),
        ("op a number", {"op": 1}, "malformed"),
        ("op an array", {"op": ["update"]}, "malformed"),
        ("key empty", {"key": []}, "malformed"),
        ("key an object", {"key": {"id": 1}}, "malformed"),
        ("key of 33 values", {"key": [1] * 33}, "malformed"),
        ("key of 2 values", {"key": [1, 2]}, "bad_key"),
        ("key a string for bigint", {"key": ["1"]}, "wrong_type"),
        ("key 2^63 for bigint", {"key": [MAX_BIGINT + 1]}, "wrong_type"),
        ("key 2^64-1 for bigint", {"key": [U64]}, "wrong_type"),
        ("key a float", {"key": [1.5]}, "wrong_type"),
        ("update without old", {"old": None}, "malformed"),
        ("old a string", {"old": "row"}, "malformed"),
        # old may name a column the table lacks (dropped since the edit); new may not change it
        (
            "new changes a column old has, the table not",
            {"old": {**row, "nope": 1}, "new": {"nope": 2}},
            "unknown_column",
        ),
        ("new names no column", {"new": {"nope": 1}}, "unknown_column"),
        ("int4 2^31", {"new": {"qty": 1 << 31}}, "wrong_type"),
        ("int4 -2^31-1", {"new": {"qty": -(1 << 31) - 1}}, "wrong_type"),
        ("int4 2^63", {"new": {"qty": MAX_BIGINT + 1}}, "wrong_type"),
        ("int4 a float", {"new": {"qty": 1.5}}, "wrong_type"),
        ("int4 a boolean", {"new": {"qty": True}}, "wrong_type"),
        ("text a number", {"new": {"notes": 7}}, "wrong_type"),
        ("text with NUL", {"new": {"notes": "a\x00b"}}, "wrong_type"),
        ("text an object", {"new": {"notes": {"$ne": 1}}}, "wrong_type"),
        ("numeric(10,2) 1e8", {"old": {**row, "cost": None}, "new": {"cost": "1e8"}}, "wrong_type"),
        (
            "numeric(10,2) 1e-20000",
            {"old": {**row, "cost": None}, "new": {"cost": "1e-20000"}},
            "wrong_type",
        ),
        (
            "numeric(10,2) text",
            {"old": {**row, "cost": None}, "new": {"cost": "12,50"}},
            "wrong_type",
        ),
        (
            "a hidden column",
            {"old": {**row, "cost": None}, "new": {"cost": "1.00"}},
            "forbidden_column",
        ),
        ("a key change", {"new": {"id": 2}}, "key_change"),
        ("new without its old", {"old": {"id": 1}, "new": {"notes": "x"}}, "missing_old"),
        ("a move to another technician", {"new": {"technician": "t7"}}, "forbidden_move"),
        ("a row of another technician", {"old": {**row, "technician": "t7"}}, "forbidden_row"),
        ("base.commit_lsn 2^63", {"base": {"commit_lsn": MAX_BIGINT + 1, "seq": 0}}, "malformed"),
        ("base.commit_lsn 2^64-1", {"base": {"commit_lsn": U64, "seq": 0}}, "malformed"),
        ("base.commit_lsn -1", {"base": {"commit_lsn": -1, "seq": 0}}, "malformed"),
        ("base.seq 2^63", {"base": {"commit_lsn": 1, "seq": MAX_BIGINT + 1}}, "malformed"),
        ("base.seq a string", {"base": {"commit_lsn": 1, "seq": "0"}}, "malformed"),
        ("base without seq", {"base": {"commit_lsn": 1}}, "malformed"),
        ("base an array", {"base": [1, 0]}, "malformed"),
        ("hlc not one", {"hlc": "yesterday"}, "bad_hlc"),
        ("hlc a number", {"hlc": 1}, "bad_hlc"),
        ("hlc of another device", {"hlc": hlc.replace(DEVICE, "tab-2")}, "bad_hlc"),
        ("prev_seq 0", {"prev_seq": 0}, "malformed"),
        ("prev_seq not earlier", {"prev_seq": 10**6}, "malformed"),
        ("prev_seq 2^63", {"prev_seq": MAX_BIGINT + 1}, "malformed"),
        ("prev_seq a string", {"prev_seq": "1"}, "malformed"),
        ("an unknown field", {"device_id": "tab-2"}, "malformed"),
    ]


def test_entries_refused_on_their_own_have_their_reason_and_write_nothing(
    env: Env, client: TestClient
) -> None:
    env.insert()
    h = env.headers(DEVICE)
    cases = entry_cases()
    good = entry(DEVICE, 0, new={"notes": "fine"})
    entries = [{**good, "seq": n, **fields} for n, (_, fields, _) in enumerate(cases, 1)]
    r = client.post("/v1/journal", json={"entries": entries}, headers=h)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    wrong = [
        f"{what}: {res}"
        for (what, _, reason), res in zip(cases, results, strict=True)
        if (res["status"], res["reason"]) != ("rejected", reason)
    ]
    assert not wrong, "\n".join(wrong)
    # every one travelled with its rejection, and the applier gives each its outcome
    records = {rec.seq: rec for rec in env.journal_records(expect=len(cases))}
    assert all(records[n].rejection is not None for n in range(1, len(cases) + 1))
    latest, _ = outcomes_until(client, h, lambda got: len(got) >= len(cases), timeout=60)
    wrong = [
        f"{what}: {latest[n]}"
        for n, (what, _, reason) in enumerate(cases, 1)
        if (latest[n]["outcome"], latest[n]["reason"]) != ("rejected", reason)
    ]
    assert not wrong, "\n".join(wrong)
    assert env.sql("select id, technician, notes, cost, qty from work_orders") == [
        (1, "t42", "n0", None, 5)
    ]
    assert env.sql("select count(*) from fieldsync_applier.dead_letters") == [(0,)]


# --------------------------------------------------------------------------- resolutions


def test_resolutions_refused_write_nothing(env: Env, client: TestClient) -> None:
    env.insert()
    env.sql("update work_orders set notes = 'server' where id = 1")
    h = env.headers(DEVICE)
    r = client.post(
        "/v1/journal", json={"entries": [entry(DEVICE, 1, new={"notes": "mine"})]}, headers=h
    )
    assert r.status_code == 200, r.text
    latest, _ = outcomes_until(client, h, lambda got: 1 in got)
    conflict_id = latest[1]["conflict"]["id"]
    path = f"/v1/conflicts/{conflict_id}/resolve"
    no_conflict = conflict_id[:-1] + ("1" if conflict_id.endswith("0") else "0")
    other = env.headers("tab-2")
    cases: list[tuple[str, str, dict[str, Any], dict[str, str], int, str]] = [
        ("an unknown id", "/v1/conflicts/nope/resolve", {"json": {"choice": "mine"}}, h, 404, "conflict_not_found"),
        ("an id of no conflict", f"/v1/conflicts/{no_conflict}/resolve", {"json": {"choice": "mine"}}, h, 404, "conflict_not_found"),
        ("an id with NUL", "/v1/conflicts/a%00b/resolve", {"json": {"choice": "mine"}}, h, 404, "conflict_not_found"),
        ("an id of 201 characters", f"/v1/conflicts/{'a' * 201}/resolve", {"json": {"choice": "mine"}}, h, 422, "invalid_request"),
        ("another device's conflict", path, {"json": {"choice": "mine"}}, other, 403, "forbidden_device"),
        ("not JSON", path, {"content": b"{", "headers": {"Content-Type": "application/json"}}, h, 422, "invalid_request"),
        ("no choice", path, {"json": {}}, h, 422, "invalid_request"),
        ("an unknown choice", path, {"json": {"choice": "both"}}, h, 422, "invalid_request"),
        ("choice a number", path, {"json": {"choice": 1}}, h, 422, "invalid_request"),
        ("values without choice values", path, {"json": {"choice": "mine", "values": {"notes": "x"}}}, h, 422, "invalid_request"),
        ("choice values without values", path, {"json": {"choice": "values"}}, h, 422, "invalid_request"),
        ("values a list", path, {"json": {"choice": "values", "values": ["x"]}}, h, 422, "invalid_request"),
        ("a value of the wrong type", path, {"json": {"choice": "values", "values": {"notes": 7}}}, h, 422, "invalid_request"),
        ("a value with NUL", path, {"json": {"choice": "values", "values": {"notes": "a\x00"}}}, h, 422, "invalid_request"),
        ("a column not in conflict", path, {"json": {"choice": "values", "values": {"site": "x"}}}, h, 422, "invalid_request"),
        ("a column of no table", path, {"json": {"choice": "values", "values": {"nope": "x"}}}, h, 422, "invalid_request"),
        ("a body over max_body_bytes", path, {"json": {"choice": "values", "values": {"notes": "x" * 300_000}}}, h, 413, "request_too_large"),
        ("no token", path, {"json": {"choice": "mine"}}, {}, 401, "token_missing"),
    ]  # fmt: skip
    before = snapshot(env)
    wrong = []
    for what, url, kw, headers, status, code in cases:
        r = client.post(url, headers={**headers, **kw.pop("headers", {})}, **kw)
        try:
            assert r.status_code == status, r.text[:300]
            assert_error_shape(status, r.json(), code)
        except AssertionError as exc:
            wrong.append(f"{what}: {exc}")
    assert not wrong, "\n".join(wrong)
    assert snapshot(env) == before
    assert env.sql("select status from fieldsync_applier.conflicts") == [("open",)]


# --------------------------------------------------------------------------- cursors, parameters, tokens


def test_cursors_parameters_and_tokens_refused_write_nothing(env: Env, client: TestClient) -> None:
    env.insert()
    h = env.headers(DEVICE)
    now = int(time.time())
    cases: list[tuple[str, str, dict[str, Any], dict[str, str], int, str]] = [
        ("a cursor of another format", "/v1/changes", {"cursor": "v9.x"}, h, 400, "invalid_cursor"),
        ("a cursor that is no base64", "/v1/changes", {"cursor": "c1.!!!"}, h, 400, "invalid_cursor"),
        ("a cursor op id 2^63", "/v1/changes", {"cursor": encode_cursor({'tech["t42"]': MAX_BIGINT + 1})}, h, 400, "invalid_cursor"),
        ("a cursor epoch 2^64-1", "/v1/changes", {"cursor": encode_cursor({'tech["t42"]': 5}, {'tech["t42"]': U64})}, h, 400, "invalid_cursor"),
        ("a cursor bucket of 20000 characters", "/v1/changes", {"cursor": encode_cursor({"b" * 20_000: 1})}, h, 400, "invalid_cursor"),
        ("a cursor of 60000 characters of noise", "/v1/changes", {"cursor": "c1." + "A" * 60_000}, h, 400, "invalid_cursor"),
        ("limit 0", "/v1/changes", {"limit": 0}, h, 422, "invalid_request"),
        ("limit a word", "/v1/changes", {"limit": "all"}, h, 422, "invalid_request"),
        ("wait -1", "/v1/changes", {"wait": -1}, h, 422, "invalid_request"),
        ("wait NaN", "/v1/changes", {"wait": "nan"}, h, 422, "invalid_request"),
        ("after -1", "/v1/outcomes", {"after": -1}, h, 422, "invalid_request"),
        ("after 2^63", "/v1/outcomes", {"after": MAX_BIGINT + 1}, h, 422, "invalid_request"),
        ("after a word", "/v1/outcomes", {"after": "x"}, h, 422, "invalid_request"),
        ("outcomes limit 0", "/v1/outcomes", {"limit": 0}, h, 422, "invalid_request"),
        ("conflicts limit -1", "/v1/conflicts", {"limit": -1}, h, 422, "invalid_request"),
        ("no token", "/v1/changes", {}, {}, 401, "token_missing"),
        ("not Bearer", "/v1/changes", {}, {"Authorization": "Basic eDp5"}, 401, "token_malformed"),
        ("Bearer and nothing", "/v1/changes", {}, {"Authorization": "Bearer"}, 401, "token_malformed"),
        ("a token of 17 KiB", "/v1/changes", {}, bearer("a" * 17_000), 401, "token_malformed"),
        ("a token of latin-1 bytes", "/v1/changes", {}, LATIN1, 401, "token_malformed"),
        ("alg none", "/v1/changes", {}, bearer(jwt.encode({"sub": DEVICE}, None, algorithm="none")), 401, "token_alg_refused"),
        ("an unknown kid", "/v1/changes", {}, bearer(token(env, kid="k9")), 401, "token_unknown_key"),
        ("a bad signature", "/v1/changes", {}, bearer(token(env)[:-4] + "AAAA"), 401, "token_bad_signature"),
        ("expired", "/v1/changes", {}, bearer(token(env, {"exp": now - 3600})), 401, "token_expired"),
        ("issued in the future", "/v1/changes", {}, bearer(token(env, {"iat": now + 3600})), 401, "token_not_yet_valid"),
        ("exp 2^64", "/v1/changes", {}, bearer(token(env, {"exp": 1 << 64})), 401, "token_malformed"),
        ("another audience", "/v1/changes", {}, bearer(token(env, {"aud": "x"})), 401, "token_wrong_audience"),
        ("another issuer", "/v1/changes", {}, bearer(token(env, {"iss": "x"})), 401, "token_wrong_issuer"),
        ("no sub", "/v1/changes", {}, bearer(token(env, {"sub": None})), 401, "token_malformed"),
        ("sub with a space", "/v1/changes", {}, bearer(token(env, {"sub": "tab 1"})), 401, "token_malformed"),
        ("sub with NUL", "/v1/changes", {}, bearer(token(env, {"sub": "tab\x001"})), 401, "token_malformed"),
        ("sub of 129 characters", "/v1/changes", {}, bearer(token(env, {"sub": "t" * 129})), 401, "token_malformed"),
        ("sub a number", "/v1/changes", {}, bearer(token(env, {"sub": 7})), 401, "token_malformed"),
        ("upload with a forged token", "/v1/journal", {}, bearer(token(env)[:-4] + "AAAA"), 401, "token_bad_signature"),
    ]  # fmt: skip
    before = snapshot(env)
    wrong = []
    for what, url, params, headers, status, code in cases:
        if url == "/v1/journal":
            body = {"entries": [entry(DEVICE, 1, new={"notes": "forged"})]}
            r = client.post(url, json=body, headers=headers)
        else:
            r = client.get(url, params=params, headers=headers)
        try:
            assert r.status_code == status, r.text[:300]
            assert_error_shape(status, r.json(), code)
        except AssertionError as exc:
            wrong.append(f"{what}: {exc}")
    assert not wrong, "\n".join(wrong)
    assert snapshot(env) == before
