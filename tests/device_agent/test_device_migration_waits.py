"""A column removed on the server while edits of its table are open (``pending`` or
``sent``): the migration waits for them (:class:`~device_agent.errors.MigrationWaits`),
and meanwhile every sync uploads them and records the outcomes of the sent ones, then
tries the migration again; it goes on in the sync that receives the last outcome, or a
later one, and ``sync --watch`` keeps trying instead of exiting.  What blocks until
someone acts (an app's index on the column) stays a plain ``SchemaBlocked``.  No network:
:class:`tests.device_agent.test_device_client.MockRelay` answers."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from device_agent.errors import MigrationWaits
from device_agent.local_tables import PREFIX
from device_agent.relay_schema import parse_schema
from device_agent.schema_sync import plan_migration
from device_agent.sync import Agent
from tests.cdc.cdc_support import wait_for
from tests.device_agent.test_device_apply import SCHEMA, T1, WO, FakeServer, app_conn, order
from tests.device_agent.test_device_apply import db as db  # the fixture
from tests.device_agent.test_device_client import MockRelay, mocked_agent


def without_done() -> dict[str, Any]:
    """The relay's schema after ``alter table work_orders drop column done``."""
    schema: dict[str, Any] = orjson.loads(orjson.dumps(SCHEMA))
    schema["tables"][0]["columns"].remove("done")
    return schema


def applied(seq: int, oid: int, **values: Any) -> dict[str, Any]:
    row = {k: v for k, v in order(oid, **values).items() if k != "done"}
    return {"device_id": "tab-7", "seq": seq, "outcome": "applied", "row": row}


def columns(conn: sqlite3.Connection) -> list[str]:
    return [r[1] for r in conn.execute('pragma table_info("work_orders")')]


def statuses(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    return conn.execute(f"select seq, status from {PREFIX}journal order by seq").fetchall()


def synced(tmp_path: Path) -> tuple[FakeServer, MockRelay, Agent, sqlite3.Connection]:
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    server.put(T1, WO, [2], order(2))
    relay = MockRelay(server)
    agent = mocked_agent(tmp_path, relay)
    agent.sync_once()
    return server, relay, agent, sqlite3.connect(agent.db_path, isolation_level=None)


def drop_done(server: FakeServer, relay: MockRelay, **changed: dict[str, Any]) -> None:
    """The server drops the column; the relay's rows come again without it."""
    relay.schema = without_done()
    for oid in (1, 2):
        row = {k: v for k, v in order(oid, **changed.get(str(oid), {})).items() if k != "done"}
        server.put(T1, WO, [oid], row)


def test_an_outcome_received_while_the_migration_waits_lets_it_go_on_in_the_same_sync(
    tmp_path: Path,
) -> None:
    server, relay, agent, app = synced(tmp_path)
    app.execute("update work_orders set notes = 'dev' where id = 1")
    agent.sync_once()
    assert statuses(agent.conn) == [(1, "sent")]  # no outcome yet
    drop_done(server, relay, **{"1": {"notes": "dev"}})
    relay.outcomes = [applied(1, 1, notes="dev")]
    report = agent.sync_once()
    assert statuses(agent.conn) == [(1, "synced")]
    assert "done" not in columns(agent.conn)
    assert f"{WO}: column done dropped (removed on the server)" in report.schema_notes
    assert app.execute("select id, notes from work_orders order by id").fetchall() == [
        (1, "dev"),
        (2, "order 2"),
    ]
    agent.close()


def test_the_migration_waits_for_outcomes_over_syncs_then_goes_on(tmp_path: Path) -> None:
    server, relay, agent, app = synced(tmp_path)
    app.execute("update work_orders set notes = 'dev' where id = 1")
    agent.sync_once()
    drop_done(server, relay)
    app.execute("update work_orders set status = 'done' where id = 2")  # offline, pending
    with pytest.raises(MigrationWaits) as waits:
        agent.sync_once()
    assert str(waits.value) == (
        "the server's schema changed and the local tables follow once local edits are "
        f"synced:\n  - {WO}: column done was removed on the server and 2 local edit(s) of "
        "the table are not synced yet (2 awaiting their outcome); the migration goes on "
        "once each has its outcome (every sync uploads them and reads their outcomes)"
    )
    assert waits.value.exit_code == 5
    # the pending edit went up while the migration waited; both outcomes are asked for
    assert [e["seq"] for e in relay.uploads[-1]] == [2]
    assert statuses(agent.conn) == [(1, "sent"), (2, "sent")]
    asked = relay.outcome_requests
    with pytest.raises(MigrationWaits):
        agent.sync_once()
    assert relay.outcome_requests > asked
    assert "done" in columns(agent.conn)
    relay.outcomes = [applied(1, 1, notes="dev"), applied(2, 2, status="done")]
    server.put(T1, WO, [1], {k: v for k, v in order(1, notes="dev").items() if k != "done"})
    server.put(T1, WO, [2], {k: v for k, v in order(2, status="done").items() if k != "done"})
    agent.sync_once()
    assert statuses(agent.conn) == [(1, "synced"), (2, "synced")]
    assert "done" not in columns(agent.conn)
    assert app.execute("select id, status, notes from work_orders order by id").fetchall() == [
        (1, "open", "dev"),
        (2, "done", "order 2"),
    ]
    agent.close()


def test_watch_keeps_waiting_for_the_outcomes_instead_of_exiting(tmp_path: Path) -> None:
    server, relay, agent, app = synced(tmp_path)
    app.execute("update work_orders set notes = 'dev' where id = 1")
    agent.sync_once()
    drop_done(server, relay, **{"1": {"notes": "dev"}})
    events: list[str] = []
    agent.on_event = events.append
    stop = threading.Event()
    failed: list[BaseException] = []

    def watch() -> None:
        try:
            agent.watch(stop, use_ws=False, poll_s=0.05, max_backoff_s=0.05)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        wait_for(lambda: len(events) >= 2 or failed, timeout=30, what="two tries")
        assert not failed, failed
        assert events[0].startswith(
            "waiting for local edits to be synced (the server's schema changed"
        )
        relay.outcomes = [applied(1, 1, notes="dev")]
        probe = sqlite3.connect(agent.db_path)
        wait_for(
            lambda: (
                failed
                or "done" not in [r[1] for r in probe.execute('pragma table_info("work_orders")')]
            ),
            timeout=30,
            what="the column dropped",
        )
        probe.close()
    finally:
        stop.set()
        thread.join(30)
    assert not failed, failed
    assert statuses(agent.conn) == [(1, "synced")]
    agent.close()


def test_a_removed_column_an_app_index_uses_still_blocks_until_someone_acts(
    db: sqlite3.Connection,
) -> None:
    app = app_conn(db)
    app.execute("create index app_done_idx on work_orders (done)")
    app.execute("insert into work_orders (id, status) values (77, 'open')")
    plan = plan_migration(db, parse_schema(without_done()))
    assert plan.blockers == [
        f"{WO}: column done was removed on the server but the app's index app_done_idx use "
        "it; drop them, then sync again"
    ]
    assert plan.waits_for == []  # the index blocks: the edits' count is not the matter
    app.execute("drop index app_done_idx")
    plan = plan_migration(db, parse_schema(without_done()))
    assert (plan.blockers, plan.waits_for) == (
        [],
        [
            f"{WO}: column done was removed on the server and 1 local edit(s) of the table "
            "are not synced yet (1 to upload); the migration goes on once each has its "
            "outcome (every sync uploads them and reads their outcomes)"
        ],
    )
