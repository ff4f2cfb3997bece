"""Device agent client and journal upload, without a relay: cursor reset against the relay's
codec, retries with backoff (httpx MockTransport), error mapping, upload answers, and
journal entries as relay/upstream/validation.py parses them."""

from __future__ import annotations

import gzip
import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.journal_format import JournalEntry
from device_agent import local_db, relay_schema, schema_sync
from device_agent.client import (
    JournalUnsupported,
    RelayClient,
    RetryPolicy,
    parse_upload_answer,
    reset_cursor,
)
from device_agent.errors import AuthFailed, RelayUnreachable, TokenExpired, TokenRevoked
from device_agent.local_tables import PREFIX
from device_agent.sync import wire_entries
from relay.downstream.api_cursor import decode_cursor, encode_cursor
from relay.upstream.validation import parse_upload
from tests.device_agent.test_device_apply import SCHEMA, T1, WO, FakeServer, order, sync


@settings(deadline=None)
@given(
    st.dictionaries(st.text(min_size=1, max_size=12), st.integers(0, 10**12), max_size=6),
    st.data(),
)
def test_reset_cursor_sets_buckets_back_to_zero_in_the_relays_format(
    cursors: dict[str, int], data: st.DataObject
) -> None:
    chosen = data.draw(st.lists(st.sampled_from(sorted(cursors) or ["x"]), max_size=3))
    epochs = {b: n % 3 for b, n in cursors.items()}
    out = reset_cursor(encode_cursor(cursors, epochs), chosen)
    assert out is not None
    got = decode_cursor(out)
    expected = {b: n for b, n in cursors.items() if b not in chosen and n > 0}
    assert dict(got.ops) == expected
    assert {b: e for b, e in got.epochs.items() if e} == {
        b: epochs[b] for b in expected if epochs[b]
    }


def test_reset_cursor_unknown_format_means_full_download() -> None:
    assert reset_cursor("v9.something", ["b"]) is None
    assert reset_cursor(None, ["b"]) is None


def client_with(handler: Any, attempts: int = 4) -> tuple[RelayClient, list[float]]:
    sleeps: list[float] = []
    c = RelayClient(
        "http://relay.test",
        "tok",
        retry=RetryPolicy(attempts=attempts, initial_s=0.1, max_s=1.0),
        transport=httpx.MockTransport(handler),
        sleep=sleeps.append,
    )
    return c, sleeps


def test_retries_with_backoff_and_jitter_then_succeeds() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        assert request.headers["authorization"] == "Bearer tok"
        if calls == 1:
            raise httpx.ReadError("connection cut mid-body")
        if calls == 2:
            return httpx.Response(503, json={"error": {"code": "unavailable", "message": "x"}})
        if calls == 3:
            return httpx.Response(429, headers={"Retry-After": "0.25"}, json={})
        return httpx.Response(200, json={"tables": [], "buckets": []})

    c, sleeps = client_with(handler)
    assert c.schema() == {"tables": [], "buckets": []}
    assert calls == 4 and c.retries == 3
    assert 0 <= sleeps[0] <= 0.1 and 0 <= sleeps[1] <= 0.2 and sleeps[2] == 0.25


def test_unreachable_after_retries_says_offline() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    c, sleeps = client_with(handler, attempts=3)
    with pytest.raises(RelayUnreachable, match="working offline"):
        c.changes(None)
    assert len(sleeps) == 2


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (401, "token_expired", TokenExpired),
        (403, "token_revoked", TokenRevoked),
        (401, "token_bad_signature", AuthFailed),
    ],
)
def test_token_errors_map_and_say_to_get_a_new_token(
    status: int, code: str, error: type[Exception]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status, json={"error": {"code": code, "message": "m", "status": status}}
        )

    c, _ = client_with(handler)
    with pytest.raises(error, match="new device token"):
        c.checkpoint()


def test_upload_without_endpoint_and_answer_shapes() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})

    c, _ = client_with(handler)
    with pytest.raises(JournalUnsupported):
        c.upload_journal([{"seq": 1}])
    got = parse_upload_answer(
        {
            "results": [
                {"seq": 1, "status": "accepted"},
                {"seq": 2, "status": "rejected", "reason": "wrong_type", "message": "m"},
            ]
        },
        [1, 2],
    )
    assert got.accepted == [1] and got.rejected == {2: ("wrong_type", "m")}
    assert parse_upload_answer({}, [3, 4]).accepted == [3, 4]


def test_journal_entries_are_what_the_relay_accepts(tmp_path: Path) -> None:
    conn = local_db.connect(str(tmp_path / "d.db"))
    local_db.ensure_metadata(conn)
    local_db.set_meta(conn, "relay_url", "http://x")
    schema_sync.apply_schema(conn, relay_schema.parse_schema(SCHEMA))
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    sync(conn, server)
    app = sqlite3.connect(str(tmp_path / "d.db"), isolation_level=None)
    app.execute("update work_orders set status = 'done', done = 1 where id = 1")
    app.execute("insert into work_orders (id, status, done) values (2, 'new', 0)")
    app.execute("update work_orders set notes = 'n' where id = 2")
    app.execute("delete from work_orders where id = 1")
    entries = wire_entries(conn, "tab-7")
    parsed = parse_upload(orjson.loads(orjson.dumps({"entries": entries})), "tab-7")
    assert all(isinstance(e, JournalEntry) for e in parsed), parsed
    first = parsed[0]
    assert isinstance(first, JournalEntry)
    assert first.op.value == "update" and first.key == (1,)
    assert dict(first.new or {}) == {"status": "done", "done": True}  # bool in wire form
    assert (first.old or {})["done"] is False
    hlcs = [e.hlc for e in parsed if isinstance(e, JournalEntry)]
    assert hlcs == sorted(hlcs) and all(h.node == "tab-7" for h in hlcs)
    third = parsed[2]
    assert isinstance(third, JournalEntry) and third.prev_seq == parsed[1].seq
    insert = parsed[1]
    assert isinstance(insert, JournalEntry) and "notes" not in (insert.new or {})


# --------------------------------------------------------------------------- the agent, mocked relay


class MockRelay:
    """A relay answering from a FakeServer, with journal and outcomes endpoints."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.uploads: list[list[dict[str, Any]]] = []
        self.reject: set[int] = set()
        self.outcomes: list[dict[str, Any]] = []
        self.outcome_requests = 0
        self.schema: dict[str, Any] = SCHEMA

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/schema":
            return httpx.Response(200, json=self.schema)
        if path == "/v1/changes":
            cursor = request.url.params.get("cursor")
            since = int(cursor[1:]) if cursor else 0
            msgs = self.server.messages(since)
            return httpx.Response(
                200, content=orjson.dumps(msgs[-1] if len(msgs) == 1 else msgs[0])
            )
        if path == "/v1/journal":
            import gzip

            body = request.content
            if request.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            entries = orjson.loads(body)["entries"]
            parse_upload({"entries": entries}, "tab-7")  # the relay's own validation
            self.uploads.append(entries)
            return httpx.Response(
                200,
                json={
                    "results": [
                        {
                            "seq": e["seq"],
                            "status": "rejected",
                            "reason": "wrong_type",
                            "message": "no",
                        }
                        if e["seq"] in self.reject
                        else {"seq": e["seq"], "status": "accepted"}
                        for e in entries
                    ]
                },
            )
        if path == "/v1/outcomes":
            self.outcome_requests += 1
            return httpx.Response(
                200, json={"outcomes": self.outcomes, "cursor": 1, "has_more": False}
            )
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})


def mocked_agent(tmp_path: Path, relay: MockRelay) -> Any:
    from device_agent.sync import Agent, init_database

    token = (
        "x."
        + __import__("base64").urlsafe_b64encode(b'{"sub":"tab-7"}').decode().rstrip("=")
        + ".y"
    )

    def factory(url: str, tok: str) -> RelayClient:
        return RelayClient(
            url,
            tok,
            transport=httpx.MockTransport(relay.handler),
            retry=RetryPolicy(attempts=2, initial_s=0.0),
        )

    db = str(tmp_path / "m.db")
    init_database(db, "http://relay.test", token, client=factory("http://relay.test", token))
    return Agent(db, client_factory=factory)


def test_agent_uploads_rejections_release_and_outcomes_settle(tmp_path: Path) -> None:
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    server.put(T1, WO, [2], order(2))
    relay = MockRelay(server)
    agent = mocked_agent(tmp_path, relay)
    agent.sync_once()
    app = sqlite3.connect(str(tmp_path / "m.db"), isolation_level=None)
    app.execute("update work_orders set status = 'done' where id = 1")
    app.execute("update work_orders set status = 'bad' where id = 2")
    relay.reject = {2}
    report = agent.sync_once()
    assert (report.uploaded, report.rejected) == (1, 1)
    statuses = agent.conn.execute(f"select seq, status, reason from {PREFIX}journal order by seq")
    assert [r[1:] for r in statuses] == [("sent", None), ("failed", "wrong_type")]
    # the rejected edit is undone at once (the server's version comes back); the sent one holds
    assert app.execute("select id, status from work_orders order by id").fetchall() == [
        (1, "done"),
        (2, "open"),
    ]
    # an outcome (merged) and, in the same download, the server version it led to: the row
    # is re-derived from that version at once
    relay.outcomes = [
        {"device_id": "tab-7", "seq": 1, "outcome": "merged", "row": order(1, status="closed")}
    ]
    server.put(T1, WO, [1], order(1, status="closed"))
    agent.sync_once()
    assert app.execute("select status from work_orders where id = 1").fetchone() == ("closed",)
    assert agent.conn.execute(f"select status from {PREFIX}journal where seq = 1").fetchone() == (
        "synced",
    )
    # nothing awaited any more: the outcomes endpoint is not asked again
    asked = relay.outcome_requests
    agent.sync_once()
    assert relay.outcome_requests == asked
    agent.close()


def test_conflicts_listed_and_resolved_with_a_new_edit(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from device_agent import cli

    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    relay = MockRelay(server)
    agent = mocked_agent(tmp_path, relay)
    agent.sync_once()
    app = sqlite3.connect(str(tmp_path / "m.db"), isolation_level=None)
    app.execute("update work_orders set status = 'done' where id = 1")
    agent.sync_once()
    relay.outcomes = [
        {
            "device_id": "tab-7",
            "seq": 1,
            "outcome": "conflict",
            "conflict": {
                "id": 7,
                "columns": {"status": {"base": "open", "server": "cancelled", "device": "done"}},
            },
        }
    ]
    agent.sync_once()
    agent.close()
    db = str(tmp_path / "m.db")
    runner = CliRunner()
    listed = json.loads(runner.invoke(cli.app, ["conflicts", "list", "--db", db, "--json"]).stdout)
    assert [(c["id"], c["table"], c["key"], c["status"]) for c in listed] == [(1, WO, [1], "open")]
    shown = runner.invoke(cli.app, ["conflicts", "show", "1", "--db", db, "--json"])
    assert json.loads(shown.stdout)["detail"]["columns"]["status"]["server"] == "cancelled"
    # the conflict is kept on the server (id 7) and the relay cannot be reached: resolving
    # only here would leave the server's conflict, and the entry's outcome, open for good
    r = runner.invoke(cli.app, ["conflicts", "resolve", "1", "--mine", "--db", db, "--json"])
    assert r.exit_code == 3, r.output
    assert "nothing was changed" in r.output
    conn = sqlite3.connect(db)
    assert conn.execute(f"select status from {PREFIX}conflicts").fetchall() == [("open",)]
    assert conn.execute(f"select op, status from {PREFIX}journal").fetchall() == [
        ("update", "conflict")
    ]
    # a conflict the relay keeps no id for (a relay without the journal API) is resolved
    # here, with a new edit the next sync uploads
    conn.execute(f"update {PREFIX}conflicts set detail = json_remove(detail, '$.id')")
    conn.commit()
    conn.close()
    r = runner.invoke(cli.app, ["conflicts", "resolve", "1", "--mine", "--db", db, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["pending_entries"] == 1
    conn = sqlite3.connect(db)
    assert conn.execute(f"select status, resolution from {PREFIX}conflicts").fetchone() == (
        "resolved",
        "mine",
    )
    assert conn.execute(f"select op, status from {PREFIX}journal order by seq").fetchall() == [
        ("update", "conflict"),
        ("update", "pending"),
    ]
    r = runner.invoke(cli.app, ["conflicts", "resolve", "1", "--db", db])
    assert r.exit_code == 2


def test_a_resolved_entry_is_not_reopened_by_an_older_outcome_sent_again(tmp_path: Path) -> None:
    """A relay may send an entry's outcomes again (a rebuilt outcome store): a ``conflict``
    received after the entry's ``resolved`` changes nothing."""
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    server.put(T1, WO, [2], order(2))
    relay = MockRelay(server)
    agent = mocked_agent(tmp_path, relay)
    agent.sync_once()
    app = sqlite3.connect(str(tmp_path / "m.db"), isolation_level=None)
    app.execute("update work_orders set status = 'done' where id = 1")
    agent.sync_once()
    conflict = {
        "device_id": "tab-7",
        "seq": 1,
        "outcome": "conflict",
        "conflict": {"columns": {"status": {"base": "open", "server": "x", "device": "done"}}},
    }
    relay.outcomes = [conflict]
    agent.sync_once()
    relay.outcomes = [{"device_id": "tab-7", "seq": 1, "outcome": "resolved"}]
    agent.sync_once()
    journal = f"select seq, status, json_extract(outcome, '$.outcome') from {PREFIX}journal"
    assert agent.conn.execute(journal).fetchall() == [(1, "synced", "resolved")]
    app.execute("update work_orders set status = 'done' where id = 2")  # keeps outcomes asked
    agent.sync_once()
    relay.outcomes = [conflict]
    agent.sync_once()
    assert agent.conn.execute(journal + " where seq = 1").fetchall() == [(1, "synced", "resolved")]
    assert agent.conn.execute(f"select status from {PREFIX}conflicts").fetchall() == [("resolved",)]
    agent.close()


def test_reset_discards_edits_only_when_asked(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from device_agent import cli

    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    agent = mocked_agent(tmp_path, MockRelay(server))
    agent.sync_once()
    sqlite3.connect(str(tmp_path / "m.db"), isolation_level=None).execute(
        "delete from work_orders where id = 1"
    )
    db = str(tmp_path / "m.db")
    assert CliRunner().invoke(cli.app, ["reset", "--db", db]).exit_code == 2
    assert CliRunner().invoke(cli.app, ["reset", "--discard-edits", "--db", db]).exit_code == 0
    assert agent.conn.execute(f"select status, reason from {PREFIX}journal").fetchall() == [
        ("failed", "discarded")
    ]
    agent.sync_once()  # everything downloaded again
    assert agent.conn.execute("select id from work_orders").fetchall() == [(1,)]
    agent.close()


def test_encryption_key_sources_in_order_and_key_file_permissions(tmp_path: Path) -> None:
    from device_agent import crypto
    from device_agent.errors import EncryptionError

    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    key_file.chmod(0o644)
    with pytest.raises(EncryptionError, match="readable by other users"):
        crypto.find_key(tmp_path / "d.db", key_file, env={})
    key_file.chmod(0o600)
    assert crypto.find_key(tmp_path / "d.db", key_file, env={}) == "from-file"
    assert crypto.find_key(tmp_path / "d.db", None, env={crypto.KEY_FILE_ENV: str(key_file)}) == (
        "from-file"
    )
    env = {crypto.KEY_ENV: "from-env", crypto.KEY_FILE_ENV: str(key_file)}
    assert crypto.find_key(tmp_path / "d.db", key_file, env=env) == "from-env"
    with pytest.raises(EncryptionError, match="cannot read the key file"):
        crypto.find_key(tmp_path / "d.db", tmp_path / "missing", env={})
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).execute("create table t (x)")
    assert not crypto.is_encrypted(plain) and not crypto.is_encrypted(tmp_path / "none.db")
    if crypto.available():
        enc = str(tmp_path / "enc.db")
        conn = crypto.connect_encrypted(enc, "k1")
        conn.execute("create table t (x)")
        conn.close()
        assert crypto.is_encrypted(enc)
        with pytest.raises(EncryptionError, match="key is wrong"):
            crypto.connect_encrypted(enc, "k2")


class SmallBatchRelay(MockRelay):
    """Answers 413 (in the relay's error shape) to uploads of more than ``max_entries``."""

    max_entries = 3

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/journal":
            body = request.content
            if request.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            if len(orjson.loads(body)["entries"]) > self.max_entries:
                error = {"code": "batch_too_large", "message": "too many entries", "status": 413}
                return httpx.Response(413, json={"error": error})
        return super().handler(request)


def test_upload_halves_its_batch_on_413_and_loses_nothing(tmp_path: Path) -> None:
    server = FakeServer()
    for i in range(1, 11):
        server.put(T1, WO, [i], order(i))
    relay = SmallBatchRelay(server)
    agent = mocked_agent(tmp_path, relay)
    agent.sync_once()
    app = sqlite3.connect(str(tmp_path / "m.db"), isolation_level=None)
    for i in range(1, 11):
        app.execute("update work_orders set status = 'done' where id = ?", (i,))
    report = agent.sync_once()
    assert report.uploaded == 10
    assert all(len(batch) <= SmallBatchRelay.max_entries for batch in relay.uploads)
    assert sorted(e["seq"] for batch in relay.uploads for e in batch) == list(range(1, 11))
    agent.close()


class PagedRelay(MockRelay):
    """A MockRelay whose changes come in pages of ``page`` ops, each with its own cursor;
    it records the cursor of every changes request (None: from the beginning)."""

    def __init__(self, server: FakeServer, page: int) -> None:
        super().__init__(server)
        self.page = page
        self.requests: list[str | None] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/changes":
            return super().handler(request)
        cursor = request.url.params.get("cursor")
        self.requests.append(cursor)
        since = int(cursor[1:]) if cursor else 0
        ops = [o for o in self.server.log if o["op_id"] > since]
        chunk, last = ops[: self.page], len(ops) <= self.page
        msg = {
            "type": "changes",
            "ops": chunk,
            "cursor": f"c{chunk[-1]['op_id'] if chunk else since}",
            "checkpoint": self.server.checkpoint() if last else {"complete": False},
            "resync": [],
            "dropped": [],
            "has_more": not last,
        }
        return httpx.Response(200, content=orjson.dumps(msg))


def test_a_download_reads_ahead_while_staging_and_a_failed_stage_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from device_agent import staging

    server = FakeServer()
    for i in range(1, 8):
        server.put(T1, WO, [i], order(i))
    relay = PagedRelay(server, page=2)
    agent = mocked_agent(tmp_path, relay)
    real_stage = staging.stage
    staged: list[str] = []

    def failing_stage(conn: sqlite3.Connection, msg: dict[str, Any]) -> None:
        staged.append(msg["cursor"])
        if len(staged) == 2:
            raise sqlite3.OperationalError("disk I/O error")
        real_stage(conn, msg)

    monkeypatch.setattr(staging, "stage", failing_stage)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        agent.sync_once()
    # the page after the one that failed to stage was read ahead, and that read is over
    # (the client is free again) before the error reached the caller
    assert relay.requests == [None, "c2", "c4"]
    assert staging.download_cursor(agent.conn) == "c2"
    assert agent.conn.execute("select count(*) from work_orders").fetchone() == (0,)
    monkeypatch.setattr(staging, "stage", real_stage)
    report = agent.sync_once()
    assert relay.requests[3:] == ["c2", "c4", "c6"]
    assert report.to_json()["verified"] == [T1]
    assert agent.conn.execute("select count(*) from work_orders").fetchone() == (7,)
    assert staging.staged_count(agent.conn) == 0
    agent.close()
