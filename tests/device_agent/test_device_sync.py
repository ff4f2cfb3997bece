"""Device agent against a running relay: PostgreSQL → cdc daemon → broker → bucket engine →
bucket store (PostgreSQL) → device API (uvicorn on loopback, behind a TCP proxy that can cut
connections) → device agent → SQLite.

Covers: init, sync, app writes journaled, server changes arriving, REMOVE on reassignment,
checksum mismatch → re-download, connection cuts at random moments of downloads (nothing
lost, nothing applied twice), offline operation then catch-up, WebSocket watch, token
errors, the CLI's --json output and exit codes, encryption at rest.
"""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import uvicorn
from typer.testing import CliRunner

from device_agent import cli, crypto, local_tables
from device_agent.client import RelayClient, RetryPolicy
from device_agent.errors import RelayUnreachable, TokenExpired, TokenRevoked
from device_agent.local_tables import PREFIX
from device_agent.sync import Agent, init_database, wire_entries
from devtools import demo_schema
from relay.auth import Authenticator, Revocation, RevocationList, issue_token
from relay.auth_keys import Key, KeyStore
from relay.downstream.api import create_app
from relay.downstream.api_sync import ApiConfig
from relay.downstream.bucket_engine import BucketEngine
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.rules_parser import load_rules
from relay.downstream.table_infos import table_infos_from_catalog
from tests.cdc.cdc_support import make_settings, running_daemon, wait_for
from tests.fix_proxy import DOWNSTREAM, UPSTREAM
from tests.schemas import EXAMPLE_RULES

SECRET = b"d" * 40
FAST = RetryPolicy(attempts=8, initial_s=0.05, max_s=0.5)


class WsSwitch:
    """ASGI wrapper: while ``refuse`` is set, WebSocket upgrades are answered HTTP 403 with
    no body, as by a proxy in front of the relay that does not pass WebSockets."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.refuse = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and self.refuse:
            await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            return
        await self.app(scope, receive, send)


class Stack:
    """The server side, running; ``proxy`` sits between the device and the relay."""

    def __init__(
        self,
        pg: psycopg.Connection[Any],
        url: str,
        proxy: Any,
        auth: Authenticator,
        keys: KeyStore,
        store_dsn: str = "",
        ws: WsSwitch | None = None,
    ) -> None:
        self.pg = pg
        self.store_dsn = store_dsn
        self.ws = ws
        self.url = url
        self.proxy = proxy
        self.auth = auth
        self.keys = keys

    def token(
        self, device: str = "tab-1", ttl: float = 3600, now: float | None = None, **claims: Any
    ) -> str:
        claims = claims or {"technician": "t1"}
        return issue_token(self.keys, None, device, claims, ttl, now=now)

    def order(self, oid: int, technician: str | None = "t1", **extra: Any) -> None:
        cols = {
            "id": oid,
            "site": "plant-1",
            "technician": technician,
            "status": "open",
            "notes": f"order {oid}",
        }
        cols.update(extra)
        names = ", ".join(cols)
        marks = ", ".join(["%s"] * len(cols))
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "id")
        self.pg.execute(
            f"insert into work_orders ({names}) values ({marks}) "
            f"on conflict (id) do update set {updates}",
            list(cols.values()),
        )


@contextlib.contextmanager
def serve(app: Any) -> Iterator[int]:
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        ws_ping_interval=None,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=60, what="uvicorn started")
    port = int(server.servers[0].sockets[0].getsockname()[1])
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def stack(
    pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str, tcp_proxy: Any
) -> Iterator[Stack]:
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute(demo_schema.DDL)
        rules = load_rules(EXAMPLE_RULES, table_infos_from_catalog(pg_dsn))
        store = PgBucketStore(store_dsn)
        store.migrate()
        engine = BucketEngine(
            store,
            rules,
            kafka={"bootstrap_servers": kafka_bootstrap},
            prefix=topic_prefix,
            batch_max_ms=20,
            topic_refresh_s=1.0,
        )
        keys = KeyStore([Key.hmac("k1", SECRET)], current="k1")
        auth = Authenticator(keys)
        app = WsSwitch(
            create_app(
                store, rules, auth, ApiConfig(rate_per_s=0, long_poll_s=5, max_page_ops=5000)
            )
        )
        with running_daemon(make_settings(pg_dsn, kafka_bootstrap, topic_prefix)):
            # inserted after the snapshot: cdc's snapshot path rejects PostgreSQL's 'false'
            # text form of booleans (noticed, left to cdc)
            pg.execute(
                "insert into parts values ('p1', 'bolt', 'pc', false), ('p2', 'nut', 'pc', true)"
            )
            runner = threading.Thread(target=engine.run, daemon=True)
            runner.start()
            try:
                with serve(app) as port:
                    proxy = tcp_proxy("127.0.0.1", port)
                    yield Stack(pg, f"http://{proxy.address}", proxy, auth, keys, ws=app)
            finally:
                engine.request_stop()
                runner.join(30)
                engine.close()
                store.close()


def new_agent(stack: Stack, path: Path, token: str | None = None, **kw: Any) -> Agent:
    init_database(
        str(path),
        stack.url,
        token or stack.token(),
        client=RelayClient(stack.url, token or stack.token(), retry=FAST),
    )
    kw.setdefault("retry", FAST)
    return Agent(str(path), **kw)


def rows(
    agent: Agent, table: str = "work_orders", cols: str = "id, technician, status, notes"
) -> list[tuple[Any, ...]]:
    return agent.conn.execute(f"select {cols} from {table} order by 1").fetchall()


def sync_until(agent: Agent, predicate: Any, what: str, timeout: float = 90.0) -> None:
    def done() -> bool:
        agent.sync_once()
        return bool(predicate())

    wait_for(done, timeout=timeout, interval=0.2, what=what)


def expected_orders(stack: Stack, technician: str = "t1") -> list[tuple[Any, ...]]:
    return stack.pg.execute(
        "select id, technician, status, notes from work_orders where technician = %s and "
        "status not in ('cancelled', 'closed') order by id",
        (technician,),
    ).fetchall()


def journal_rows(agent: Agent) -> list[tuple[Any, ...]]:
    return agent.conn.execute(
        f"select seq, op, status from {PREFIX}journal order by seq"
    ).fetchall()


# --------------------------------------------------------------------------- tests


def test_init_sync_app_writes_server_changes_and_reassignment(stack: Stack, tmp_path: Path) -> None:
    for i in range(1, 6):
        stack.order(i)
    stack.order(6, technician="t2")
    agent = new_agent(stack, tmp_path / "d.db")
    tables = {r[0] for r in agent.conn.execute("select name from sqlite_master where type='table'")}
    assert {"work_orders", "parts"} <= tables
    sync_until(
        agent,
        lambda: len(rows(agent)) == 5 and len(rows(agent, "parts", "id")) == 1,
        "the five orders of t1 and the catalog",
    )
    assert rows(agent) == [(i, "t1", "open", f"order {i}") for i in range(1, 6)]
    assert agent.conn.execute("select id, name, unit from parts").fetchall() == [
        ("p1", "bolt", "pc")
    ]
    assert journal_rows(agent) == []  # the agent's writes are not journaled
    states = dict(agent.conn.execute(f"select name, state from {PREFIX}buckets"))
    assert states == {"catalog[]": "ok", 'tech_orders["t1"]': "ok"}

    # an app writes with plain sqlite3: journaled, kept on top of server changes
    app = sqlite3.connect(str(tmp_path / "d.db"), isolation_level=None)
    app.execute("update work_orders set status = 'in_progress' where id = 1")
    app.execute(
        "insert into work_orders (id, site, technician, status) values (100, 'plant-1', 't1', 'open')"
    )
    app.execute("delete from work_orders where id = 2")
    assert [r[1:] for r in journal_rows(agent)] == [
        ("update", "pending"),
        ("insert", "pending"),
        ("delete", "pending"),
    ]
    bases = [(e["op"], e["base"]) for e in wire_entries(agent.conn, "tab-1")]
    assert bases[1] == ("insert", None)  # a new row has no server version
    for op, base in (bases[0], bases[2]):  # edits of received rows name the version they saw
        assert base is not None and base["commit_lsn"] > 0, (op, base)
    report = agent.sync_once()
    assert "journal endpoint" in report.journal_note or report.uploaded == 3

    # server changes arrive; reassignment removes the row from this device
    stack.order(3, notes="server edit")
    stack.order(4, technician="t2")
    stack.pg.execute("update work_orders set notes = 'server note' where id = 1")

    def server_edits_arrived() -> bool:
        # three transactions; the device may get checkpoints between them, so wait for all
        got = {r[0]: r for r in rows(agent)}
        return (
            got.get(3, (None,) * 4)[3] == "server edit"
            and got.get(1, (None,) * 4)[3] == "server note"
            and 4 not in got
        )

    sync_until(agent, server_edits_arrived, "server edits and the reassignment")
    got = {r[0]: r for r in rows(agent)}
    assert 4 not in got  # REMOVE on reassignment
    assert got[1] == (1, "t1", "in_progress", "server note")  # local edit on top, no flicker
    assert 2 not in got and 100 in got  # local delete and insert held
    # this relay has no journal endpoints: the edits stay pending, on top of whatever
    # version of the row the server sends (only an outcome settles an edit)
    stack.pg.execute("update work_orders set status = 'open', notes = 'again' where id = 1")
    sync_until(agent, lambda: rows(agent)[0][3] == "again", "the server's new notes")
    assert rows(agent)[0] == (1, "t1", "in_progress", "again")
    assert [r[2] for r in journal_rows(agent)] == ["pending"] * 3
    assert agent.conn.execute(f"select sum(mismatches) from {PREFIX}buckets").fetchone() == (0,)
    agent.close()


def test_checksum_mismatch_downloads_the_bucket_again(stack: Stack, tmp_path: Path) -> None:
    for i in range(1, 8):
        stack.order(i)
    agent = new_agent(stack, tmp_path / "d.db")
    sync_until(agent, lambda: len(rows(agent)) == 7, "seven orders")
    bucket = 'tech_orders["t1"]'
    # lose a row behind the agent's back, as if an op had been lost in transit
    from device_agent import triggers

    tables = local_tables.load_tables(agent.conn)
    with local_tables.transaction(agent.conn), triggers.suspended(agent.conn, tables.values()):
        agent.conn.execute("delete from work_orders where id = 4")
        agent.conn.execute(f"delete from {PREFIX}rows where k = 4")
        agent.conn.execute(
            f"update {PREFIX}buckets set count = count - 1 where name = ?", (bucket,)
        )
    stack.order(8)  # something new arrives with a checkpoint the device checks against
    sync_until(agent, lambda: len(rows(agent)) == 8, "the repaired bucket")
    assert rows(agent) == expected_orders(stack)
    mism = agent.conn.execute(
        f"select mismatches, state from {PREFIX}buckets where name = ?", (bucket,)
    ).fetchone()
    assert mism == (1, "ok")
    assert journal_rows(agent) == []
    agent.close()


def test_connection_cuts_during_downloads_lose_nothing_and_apply_nothing_twice(
    stack: Stack, tmp_path: Path
) -> None:
    stack.pg.execute(
        "insert into work_orders (id, site, technician, status, notes) "
        "select g, 'plant-1', 't1', 'open', repeat('x', 200) || g from generate_series(1, 3000) g"
    )
    stack.pg.execute("update work_orders set notes = 'changed ' || id where id % 7 = 0")
    expected = expected_orders(stack)
    agent = new_agent(stack, tmp_path / "d.db", page_ops=150)
    stop = threading.Event()
    cuts = 0

    def cutter() -> None:
        nonlocal cuts
        rng = random.Random(7)
        while not stop.wait(rng.uniform(0.01, 0.15)):
            stack.proxy.cut()
            cuts += 1

    # one cut certainly inside a download (the timed cuts may all land between requests)
    mid = stack.proxy.cut_mid(DOWNSTREAM, b"GET /v1/changes", min_chunk=512)
    thread = threading.Thread(target=cutter, daemon=True)
    thread.start()
    given_up = 0  # syncs that ended unreachable (the client's retries ran out)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                agent.sync_once()
            except RelayUnreachable:
                given_up += 1
                continue
            if rows(agent) == expected:
                break
    finally:
        stop.set()
        thread.join()
    assert cuts > 3 and mid.fired.is_set(), (cuts, mid.describe())
    assert rows(agent) == expected
    # the cuts interrupted downloads: requests retried, or syncs given up and started again
    # (which of the two depends on where the cuts landed)
    assert agent.client.retries + given_up > 0, (agent.client.retries, given_up, cuts)
    assert journal_rows(agent) == []  # nothing applied was journaled (nor applied twice)
    assert agent.conn.execute(f"select count(*) from {PREFIX}staging").fetchone() == (0,)
    counts = dict(agent.conn.execute(f"select name, count from {PREFIX}buckets"))
    assert counts['tech_orders["t1"]'] == 3000
    assert agent.conn.execute(f"select sum(mismatches) from {PREFIX}buckets").fetchone() == (0,)
    agent.close()


def test_offline_for_a_while_then_catch_up(stack: Stack, tmp_path: Path) -> None:
    stack.order(1)
    agent = new_agent(stack, tmp_path / "d.db")
    sync_until(agent, lambda: len(rows(agent)) == 1, "first order")
    stack.proxy.refuse()
    app = sqlite3.connect(str(tmp_path / "d.db"), isolation_level=None)
    app.execute("update work_orders set notes = 'offline edit' where id = 1")
    app.execute(
        "insert into work_orders (id, site, technician, status) values (50, 'plant-1', 't1', 'open')"
    )
    with pytest.raises(RelayUnreachable, match="working offline"):
        agent.sync_once()
    assert app.execute("select notes from work_orders where id = 1").fetchone() == ("offline edit",)
    stack.order(2)
    stack.order(3)
    stack.proxy.allow()
    sync_until(agent, lambda: {2, 3} <= {r[0] for r in rows(agent)}, "catch-up")
    got = {r[0]: r for r in rows(agent)}
    assert got[1][3] == "offline edit" and 50 in got
    assert [r[2] for r in journal_rows(agent)] == ["pending", "pending"] or all(
        r[2] == "sent" for r in journal_rows(agent)
    )
    agent.close()


@contextlib.contextmanager
def watching(
    stack: Stack, agent: Agent, path: Path, **watch: Any
) -> Iterator[tuple[Any, list[str]]]:
    """``agent.watch`` in a thread; yields a function giving the ids of the local work
    orders and the agent's event messages.  Leaving stops the watch (cutting its
    connections) and checks it raised nothing."""
    events: list[str] = []
    agent.on_event = events.append
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            agent.watch(stop, max_backoff_s=0.5, **watch)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    reader = sqlite3.connect(str(path), isolation_level=None)
    try:
        yield (lambda: {r[0] for r in reader.execute("select id from work_orders")}), events
    finally:
        stop.set()
        stack.proxy.cut()
        thread.join(30)
        reader.close()
    assert not errors, errors


def test_watch_over_websocket_follows_changes_and_survives_cuts(
    stack: Stack, tmp_path: Path
) -> None:
    stack.order(1)
    agent = new_agent(stack, tmp_path / "d.db")
    with watching(stack, agent, tmp_path / "d.db") as (ids, _):
        wait_for(lambda: ids() == {1}, timeout=90, what="initial sync by watch")
        stack.order(2)
        wait_for(lambda: ids() == {1, 2}, timeout=90, what="pushed change")
        stack.proxy.cut()
        stack.order(3)
        wait_for(lambda: ids() == {1, 2, 3}, timeout=90, what="change after a cut")
        stack.order(2, technician="t9")
        wait_for(lambda: ids() == {1, 3}, timeout=90, what="REMOVE pushed")
    agent.close()


def test_watch_long_polls_when_websockets_are_refused(stack: Stack, tmp_path: Path) -> None:
    """A proxy that does not pass WebSocket upgrades (403): --watch follows the relay by
    long-polling /v1/changes instead, with the same results."""
    assert stack.ws is not None
    stack.ws.refuse = True
    stack.order(1)
    agent = new_agent(stack, tmp_path / "d.db")
    with watching(stack, agent, tmp_path / "d.db", poll_s=2.0) as (ids, events):
        wait_for(lambda: ids() == {1}, timeout=90, what="initial sync")
        wait_for(lambda: any("long-polling" in e for e in events), timeout=90, what="fallback")
        stack.order(2)
        wait_for(lambda: ids() == {1, 2}, timeout=90, what="a change by long-poll")
        stack.order(1, technician="t9")
        wait_for(lambda: ids() == {2}, timeout=90, what="REMOVE by long-poll")
    assert any("answered 403" in e for e in events), events
    agent.close()


def test_token_errors_say_to_get_a_new_token(stack: Stack, tmp_path: Path) -> None:
    expired = stack.token(now=time.time() - 7200, ttl=60)
    with pytest.raises(TokenExpired, match="get a new device token"):
        init_database(str(tmp_path / "a.db"), stack.url, expired)
    agent = new_agent(stack, tmp_path / "b.db", token=stack.token("tab-9"))
    stack.auth.revoked = RevocationList([Revocation("tab-9", None, "lost")])
    with pytest.raises(TokenRevoked, match="revoked"):
        agent.sync_once()
    agent.close()
    result = CliRunner().invoke(cli.app, ["sync", "--once", "--db", str(tmp_path / "b.db")])
    assert result.exit_code == 4, result.output
    assert "new device token" in result.output


def test_cli_json_and_exit_codes(stack: Stack, tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    stack.order(1)
    runner = CliRunner()
    r = runner.invoke(
        cli.app, ["init", "--relay", stack.url, "--token", stack.token(), "--db", db, "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["device_id"] == "tab-1"

    def synced() -> bool:
        r = runner.invoke(cli.app, ["sync", "--once", "--db", db, "--json"])
        assert r.exit_code == 0, r.output
        with sqlite3.connect(db) as conn:
            return conn.execute("select count(*) from work_orders").fetchone() == (1,)

    wait_for(synced, timeout=90, what="cli sync")
    r = runner.invoke(cli.app, ["status", "--db", db, "--json"])
    status = json.loads(r.stdout)
    assert status["device_id"] == "tab-1" and status["pending_edits"] == 0
    assert {b["bucket"] for b in status["buckets"]} == {"catalog[]", 'tech_orders["t1"]'}
    r = runner.invoke(cli.app, ["verify", "--db", db, "--json"])
    assert r.exit_code == 0, r.output
    assert all(b["state"] == "ok" for b in json.loads(r.stdout)["buckets"])
    # a row changed behind the agent's back: verify names it (exit 6)
    with sqlite3.connect(db) as raw:
        raw.execute(f"insert into {PREFIX}applying values (1)")
        raw.execute("update work_orders set notes = 'tampered' where id = 1")
        raw.execute(f"delete from {PREFIX}applying")
    r = runner.invoke(cli.app, ["verify", "--no-sync", "--db", db, "--json"])
    assert r.exit_code == 6
    found = json.loads(r.stdout.splitlines()[0])["rows"]
    assert [(p["table"], p["key"], p["problem"]) for p in found] == [
        ("public.work_orders", [1], "differs")
    ]
    sqlite3.connect(db, isolation_level=None).execute(
        "update work_orders set notes = 'x' where id = 1"
    )
    r = runner.invoke(cli.app, ["journal", "--db", db, "--json"])
    assert [e["op"] for e in json.loads(r.stdout)] == ["update"]
    r = runner.invoke(cli.app, ["reset", "--db", db])
    assert r.exit_code == 2 and "--discard-edits" in r.output
    stack.proxy.refuse()
    r = runner.invoke(cli.app, ["sync", "--once", "--db", db])
    assert r.exit_code == 3 and "working offline" in r.output
    r = runner.invoke(cli.app, ["status", "--db", str(tmp_path / "nope.db")])
    assert r.exit_code == 2


def test_encrypted_database_keeps_no_plaintext_on_disk(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = "PLAINTEXT-" + uuid.uuid4().hex
    stack.order(1, notes=marker)
    db = str(tmp_path / "enc.db")
    monkeypatch.setenv(crypto.KEY_ENV, "correct horse battery staple")
    runner = CliRunner()
    r = runner.invoke(
        cli.app, ["init", "--relay", stack.url, "--token", stack.token(), "--db", db, "--encrypt"]
    )
    assert r.exit_code == 0, r.output

    seen = 0

    def synced() -> bool:  # the part and the order
        nonlocal seen
        r = runner.invoke(cli.app, ["sync", "--once", "--db", db, "--json"])
        assert r.exit_code == 0, r.output
        seen += json.loads(r.stdout)["ops"]
        return seen >= 2

    wait_for(synced, timeout=90, what="encrypted sync")
    # an app opens it with SQLCipher and the key: reads and journaled writes work
    import sqlcipher3  # type: ignore[import-untyped]

    app = sqlcipher3.connect(db, isolation_level=None)
    app.execute(crypto.key_pragma("correct horse battery staple"))
    assert app.execute("select notes from work_orders").fetchone() == (marker,)
    app.execute("update work_orders set notes = ? where id = 1", (marker + "-edited",))
    app.close()
    assert crypto.is_encrypted(db)
    for path in tmp_path.iterdir():
        data = path.read_bytes()
        assert marker.encode() not in data, path.name
        assert b"plant-1" not in data, path.name
    monkeypatch.setenv(crypto.KEY_ENV, "wrong key")
    r = runner.invoke(cli.app, ["status", "--db", db])
    assert r.exit_code == 7 and "key is wrong" in r.output
    monkeypatch.delenv(crypto.KEY_ENV)
    r = runner.invoke(cli.app, ["journal", "--db", db])
    assert r.exit_code in (0, 7)  # 0 only if an OS keyring happens to hold the key


# --------------------------------------------------------------------------- with the journal


CONFLICTS = """
[[table]]
table = "public.work_orders"
policy = "server_wins"

[table.columns]
notes = "ask"
"""


@pytest.fixture
def journal_stack(
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tcp_proxy: Any,
    tmp_path: Path,
) -> Iterator[Stack]:
    """The stack plus journal intake, the upstream applier and the outcome feed."""
    from relay.upstream.applier import Applier
    from relay.upstream.applier_db import ApplierDb
    from relay.upstream.conflict_desk import ConflictDesk
    from relay.upstream.intake import JournalApiConfig
    from relay.upstream.journal_api import JournalApi
    from relay.upstream.journal_kafka import JournalProducer
    from relay.upstream.journal_store import JournalStore
    from relay.upstream.outcome_feed import OutcomeFeed

    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute(demo_schema.DDL)
        rules_path = tmp_path / "rules.toml"
        rules_path.write_text(EXAMPLE_RULES.read_text())
        conflicts_path = tmp_path / "conflicts.toml"
        conflicts_path.write_text(CONFLICTS)
        rules = load_rules(rules_path, table_infos_from_catalog(pg_dsn))
        store = PgBucketStore(store_dsn)
        store.migrate()
        jstore = JournalStore(store_dsn)
        jstore.migrate()
        kafka = {"bootstrap_servers": kafka_bootstrap}
        config = JournalApiConfig(prefix=topic_prefix, long_poll_s=5, kafka_timeout_s=10)
        feed = OutcomeFeed(jstore, kafka, topic_prefix, refresh_s=0.5)
        journal = JournalApi(
            rules,
            jstore,
            JournalProducer(kafka, config),
            config,
            desk=ConflictDesk(ApplierDb(pg_dsn, rules_path, conflicts_path)),
            feed=feed,
        )
        applier = Applier(
            ApplierDb(pg_dsn, rules_path, conflicts_path),
            kafka=kafka,
            prefix=topic_prefix,
            batch_max_ms=20,
            topic_refresh_s=0.5,
        )
        engine = BucketEngine(
            store, rules, kafka=kafka, prefix=topic_prefix, batch_max_ms=20, topic_refresh_s=1.0
        )
        keys = KeyStore([Key.hmac("k1", SECRET)], current="k1")
        auth = Authenticator(keys)
        app = create_app(store, rules, auth, ApiConfig(rate_per_s=0, long_poll_s=5), journal)
        with running_daemon(make_settings(pg_dsn, kafka_bootstrap, topic_prefix)):
            threads = [threading.Thread(target=t, daemon=True) for t in (engine.run, applier.run)]
            for t in threads:
                t.start()
            try:
                with feed.running(), serve(app) as port:
                    proxy = tcp_proxy("127.0.0.1", port)
                    yield Stack(pg, f"http://{proxy.address}", proxy, auth, keys, store_dsn)
            finally:
                engine.request_stop()
                applier.request_stop()
                for t in threads:
                    t.join(30)
                engine.close()
                applier.close()
                journal.close()
                store.close()


def test_edits_go_upstream_and_come_back_with_outcomes(
    journal_stack: Stack, tmp_path: Path
) -> None:
    stack = journal_stack
    stack.order(1)
    stack.order(2)
    agent = new_agent(stack, tmp_path / "d.db")
    sync_until(agent, lambda: len(rows(agent)) == 2, "two orders")
    app = sqlite3.connect(str(tmp_path / "d.db"), isolation_level=None)
    app.execute("update work_orders set status = 'in_progress' where id = 1")
    # the entry's base is the position of the row version the device held: the position of
    # the relay op that brought order 1 (the change event's (commit_lsn, seq))
    with psycopg.connect(stack.store_dsn) as store_conn:
        held = store_conn.execute(
            "select commit_lsn, seq from fieldsync_relay.ops where row_key = '[1]' "
            "and kind = 'PUT' order by op_id desc limit 1"
        ).fetchone()
    assert held is not None and held[0] > 0
    entries = wire_entries(agent.conn, "tab-1")
    assert [(e["op"], e["base"]) for e in entries] == [
        ("update", {"commit_lsn": held[0], "seq": held[1]})
    ]
    report = agent.sync_once()
    assert report.uploaded == 1 and not report.journal_note
    assert journal_rows(agent)[0][2] in ("sent", "synced")
    # the applier writes it to PostgreSQL; it comes back through cdc, the engine and the relay
    wait_for(
        lambda: (
            stack.pg.execute("select status from work_orders where id = 1").fetchone()
            == ("in_progress",)
        ),
        timeout=90,
        what="the edit applied upstream",
    )
    # synced by its outcome; the row shows the edit until the server's version that
    # includes it arrives, then that version
    sync_until(
        agent,
        lambda: journal_rows(agent)[0][2] == "synced" and rows(agent)[0][2] == "in_progress",
        "the edit synced and back",
    )
    # the applier's audit record keeps the base the device sent
    assert stack.pg.execute(
        "select base_lsn, base_seq from fieldsync_applier.applied where seq = 1"
    ).fetchone() == tuple(held)

    # both sides change the notes of order 2 (policy ask): a kept conflict
    app.execute("update work_orders set notes = 'device notes' where id = 2")
    stack.pg.execute("update work_orders set notes = 'office notes' where id = 2")
    agent.sync_once()
    sync_until(
        agent,
        lambda: agent.conn.execute(f"select count(*) from {PREFIX}conflicts").fetchone() == (1,),
        "the conflict outcome",
    )
    assert journal_rows(agent)[1][2] == "conflict"
    sync_until(agent, lambda: rows(agent)[1][3] == "office notes", "the server's value shown")
    agent.close()
    db = str(tmp_path / "d.db")
    runner = CliRunner()
    r = runner.invoke(cli.app, ["conflicts", "resolve", "1", "--mine", "--db", db, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["on_server"] is True
    agent = Agent(db, retry=FAST)
    wait_for(
        lambda: (
            stack.pg.execute("select notes from work_orders where id = 2").fetchone()
            == ("device notes",)
        ),
        timeout=90,
        what="the resolution applied upstream",
    )
    sync_until(agent, lambda: rows(agent)[1][3] == "device notes", "the resolution back")
    agent.close()


def test_an_outcome_before_its_server_version_keeps_the_edit_on_top(
    journal_stack: Stack, tmp_path: Path
) -> None:
    """The outcomes are read before the server versions that include the edits are
    downloaded: the rows keep the edits (no flicker back to the version before) and each
    is replaced by the first server version at or above its outcome's ``visible_after``,
    also when the office changed the row again after the applier (the exact version the
    applier wrote then never arrives)."""
    from device_agent.consistency import check_tables
    from device_agent.sync import SyncReport

    stack = journal_stack
    stack.order(1)
    stack.order(2)
    agent = new_agent(stack, tmp_path / "d.db")
    sync_until(agent, lambda: len(rows(agent)) == 2, "two orders")
    app = sqlite3.connect(str(tmp_path / "d.db"), isolation_level=None)
    app.execute("update work_orders set status = 'in_progress', notes = 'mine' where id = 1")
    app.execute("update work_orders set notes = 'mine too' where id = 2")
    agent.upload(SyncReport())
    wait_for(
        lambda: (
            stack.pg.execute("select notes from work_orders order by id").fetchall()
            == [("mine",), ("mine too",)]
        ),
        timeout=90,
        what="both edits applied upstream",
    )
    stack.pg.execute("update work_orders set status = 'completed' where id = 2")  # the office
    wait_for(lambda: len(agent.client.outcomes(None)[0]) == 2, timeout=90, what="two outcomes")
    # the outcomes alone, before any download: settled, the edits stay on top
    assert agent.fetch_outcomes() == 2
    assert journal_rows(agent) == [(1, "update", "synced"), (2, "update", "synced")]
    shown = [(1, "t1", "in_progress", "mine"), (2, "t1", "open", "mine too")]
    assert rows(agent) == shown
    assert check_tables(agent.conn) == []
    bounds = agent.conn.execute(
        f"select j.await_lsn, json_extract(r.pos, '$[0]') from {PREFIX}journal j "
        f"join {PREFIX}rows r on r.k = j.k order by j.seq"
    ).fetchall()
    assert all(held < bound for bound, held in bounds), bounds  # the versions before
    # downloads: every state seen shows the edits, until the newer versions replace them
    seen = []

    def replaced() -> bool:
        agent.sync_once()
        seen.append(rows(agent))
        return not agent.conn.execute(
            f"select count(*) from {PREFIX}journal where await_lsn is not null"
        ).fetchone()[0]

    wait_for(replaced, timeout=90, interval=0.2, what="the server versions replacing the edits")

    def converged() -> bool:
        # the version the applier wrote may arrive before the office's (the engine may
        # apply them in different batches): it releases the edit too; the office's follows
        agent.sync_once()
        seen.append(rows(agent))
        return seen[-1] == expected_orders(stack)

    wait_for(converged, timeout=90, interval=0.2, what="the office's version of order 2")
    assert all(r[0] == shown[0] and r[1][3] == "mine too" for r in seen), seen
    assert rows(agent) == [(1, "t1", "in_progress", "mine"), (2, "t1", "completed", "mine too")]
    assert rows(agent) == expected_orders(stack)
    assert check_tables(agent.conn) == []
    positions = agent.conn.execute(
        f"select json_extract(r.pos, '$[0]') from {PREFIX}rows r order by r.k"
    ).fetchall()
    assert all(p >= b for (p,), (b, _) in zip(positions, bounds, strict=True))
    app.close()
    agent.close()


def test_connection_cuts_during_uploads_lose_nothing_and_apply_nothing_twice(
    journal_stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 edits go up in batches of 10 while the proxy cuts every connection at random
    moments (requests, Kafka acknowledgements and answers are all cut somewhere): every
    edit reaches PostgreSQL exactly once, counted by a row trigger on the server."""
    from device_agent import sync as sync_module

    stack = journal_stack
    stack.pg.execute("create table upload_audit (id bigint, notes text)")
    stack.pg.execute(
        """create function upload_audit_fn() returns trigger language plpgsql as $$
           begin insert into upload_audit values (new.id, new.notes); return new; end $$"""
    )
    for i in range(1, 21):
        stack.order(i)
    stack.pg.execute(
        "create trigger upload_audit_t after update of notes on work_orders "
        "for each row when (old.notes is distinct from new.notes) "
        "execute function upload_audit_fn()"
    )
    monkeypatch.setattr(sync_module, "UPLOAD_BATCH", 10)
    agent = new_agent(stack, tmp_path / "d.db")
    sync_until(agent, lambda: len(rows(agent)) == 20, "twenty orders")
    app = sqlite3.connect(str(tmp_path / "d.db"), isolation_level=None)
    for j in range(1, 11):
        for i in range(1, 21):
            app.execute("update work_orders set notes = ? where id = ?", (f"n{i}-{j}", i))
    assert len(journal_rows(agent)) == 200
    stop = threading.Event()
    cuts = 0

    def cutter() -> None:
        nonlocal cuts
        rng = random.Random(11)
        while not stop.wait(rng.uniform(0.01, 0.08)):
            stack.proxy.cut()
            cuts += 1

    def settled() -> bool:
        return all(r[2] == "synced" for r in journal_rows(agent))

    # one cut certainly inside an upload (the timed cuts may all land between requests)
    mid = stack.proxy.cut_mid(UPSTREAM, b"POST /v1/journal", min_chunk=64)
    thread = threading.Thread(target=cutter, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not settled():
            with contextlib.suppress(RelayUnreachable):
                agent.sync_once()
    finally:
        stop.set()
        thread.join()
    sync_until(agent, settled, "every edit synced", timeout=60)  # without cuts, if needed
    assert cuts > 3 and mid.fired.is_set() and agent.client.retries > 0, (cuts, mid.describe())
    assert stack.pg.execute("select id, notes from work_orders order by id").fetchall() == [
        (i, f"n{i}-10") for i in range(1, 21)
    ]
    # each edit changed the server's row exactly once: 200 updates, in each row's edit order
    audit = stack.pg.execute("select id, notes from upload_audit order by id, notes").fetchall()
    assert len(audit) == 200
    assert sorted(audit) == sorted((i, f"n{i}-{j}") for i in range(1, 21) for j in range(1, 11))
    assert stack.pg.execute(
        "select count(*), count(distinct seq) from fieldsync_applier.applied "
        "where device_id = 'tab-1' and outcome = 'applied'"
    ).fetchone() == (200, 200)
    assert rows(agent, cols="id, notes") == [(i, f"n{i}-10") for i in range(1, 21)]
    app.close()
    agent.close()
