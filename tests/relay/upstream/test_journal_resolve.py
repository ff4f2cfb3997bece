"""A conflict resolution from a device is judged by the same write rules as a journal
entry from it, against the row as it is now: it cannot move a row to another technician,
write a column it does not see, re-create a row for someone else, write into a row
reassigned meanwhile, or claim a colleague's row (which would show it columns it could not
see).  An operator resolving on the server is trusted.  Real PostgreSQL, broker, applier
and device API (tests/relay/upstream/test_journal_api.py's environment with other rules)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import tests.relay.upstream.test_journal_api as japi
from relay.auth import issue_token
from tests.relay.test_relay_errors import assert_error_shape
from tests.relay.upstream.test_journal_api import (
    BASE,
    Env,
    entry,
    make_env,
    outcomes_until,
    upload,
)

RULES = """
token_claims = ["technician", "sites"]

[[bucket]]
name = "tech"
parameters = ["technician"]
claims = { technician = "technician" }

[[bucket.table]]
table = "public.work_orders"
match = { technician = "technician" }
exclude = ["cost"]

[[bucket]]
name = "site"
parameters = ["site"]
claims = { site = "sites" }

[[bucket.table]]
table = "public.work_orders"
match = { site = "site" }
filters = [{ column = "status", op = "=", value = "open" }]
columns = ["site", "status", "technician"]

[[bucket]]
name = "catalog"

[[bucket.table]]
table = "public.parts"
"""

CONFLICTS = """
[[table]]
table = "public.work_orders"
policy = "ask"
"""


@pytest.fixture
def env(
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Env]:
    monkeypatch.setattr(japi, "RULES", RULES)
    monkeypatch.setattr(japi, "CONFLICTS", CONFLICTS)
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


def headers(env: Env, device: str, **claims: Any) -> dict[str, str]:
    token = issue_token(env.keys, None, device, {"technician": "t42", **claims}, 3600)
    return {"Authorization": f"Bearer {token}"}


def kept_conflict(client: TestClient, h: dict[str, str], seq: int) -> dict[str, Any]:
    latest, _ = outcomes_until(client, h, lambda got: seq in got)
    assert latest[seq]["outcome"] == "conflict", latest[seq]
    conflict: dict[str, Any] = latest[seq]["conflict"]
    return conflict


def resolve(client: TestClient, h: dict[str, str], conflict_id: str, **body: Any) -> Any:
    return client.post(f"/v1/conflicts/{conflict_id}/resolve", json=body, headers=h)


def refused(response: Any, code: str) -> None:
    assert response.status_code == 403, response.text
    assert_error_shape(403, response.json(), code)


def still_open(env: Env, conflict_id: str) -> bool:
    rows = env.sql("select status from fieldsync_applier.conflicts where id = %s", conflict_id)
    return rows == [("open",)]


def test_values_may_not_move_the_row_to_another_technician(env: Env, client: TestClient) -> None:
    env.insert()
    env.sql("update work_orders set notes = 'server' where id = 1")
    h = headers(env, "tab-1")
    upload(client, h, entry("tab-1", 1, op="delete", new=None))  # delete vs update: ask
    conflict = kept_conflict(client, h, 1)
    assert conflict["row"]["device"] is None
    r = resolve(client, h, conflict["id"], choice="values", values={**BASE, "technician": "t7"})
    refused(r, "forbidden_move")
    assert "moves the row out" in r.json()["error"]["message"]
    assert env.sql("select technician, notes from work_orders") == [("t42", "server")]
    assert still_open(env, conflict["id"])
    # what its rules allow still works
    r = resolve(client, h, conflict["id"], choice="values", values={**BASE, "notes": "agreed"})
    assert r.status_code == 200, r.text
    assert env.sql("select technician, notes from work_orders") == [("t42", "agreed")]


def test_a_row_deleted_on_the_server_is_recreated_only_within_the_devices_rights(
    env: Env, client: TestClient
) -> None:
    env.insert()
    env.sql("delete from work_orders where id = 1")
    h = headers(env, "tab-1")
    upload(client, h, entry("tab-1", 1, new={"notes": "device"}))  # update vs delete: ask
    conflict = kept_conflict(client, h, 1)
    assert conflict["row"]["server"] is None
    row = {**BASE, "notes": "device"}
    for values, code in (
        ({**row, "technician": "t7"}, "forbidden_move"),  # re-created for someone else
        ({**row, "cost": "99.00"}, "forbidden_column"),  # a column it does not see
    ):
        refused(resolve(client, h, conflict["id"], choice="values", values=values), code)
        assert env.sql("select count(*) from work_orders") == [(0,)]
        assert still_open(env, conflict["id"])
    r = resolve(client, h, conflict["id"], choice="mine")
    assert r.status_code == 200, r.text
    assert env.sql("select technician, notes, cost from work_orders") == [("t42", "device", None)]


def test_mine_is_judged_against_the_row_as_it_is_now(env: Env, client: TestClient) -> None:
    env.insert()
    env.sql("update work_orders set notes = 'server' where id = 1")
    h = headers(env, "tab-1")
    upload(client, h, entry("tab-1", 1, new={"notes": "device"}))
    conflict = kept_conflict(client, h, 1)
    assert set(conflict["columns"]) == {"notes"}
    env.sql("update work_orders set technician = 't7' where id = 1")  # reassigned meanwhile
    r = resolve(client, h, conflict["id"], choice="mine")
    refused(r, "forbidden_row")
    assert env.sql("select technician, notes from work_orders") == [("t7", "server")]
    assert still_open(env, conflict["id"])
    # keeping the server's values writes nothing and is always allowed
    r = resolve(client, h, conflict["id"], choice="theirs")
    assert r.status_code == 200, r.text
    assert r.json()["outcome"]["row"] is None  # no longer its row: nothing of it is shown
    assert env.sql("select technician, notes from work_orders") == [("t7", "server")]


def test_claiming_a_colleagues_row_by_resolution_is_a_forbidden_move(
    env: Env, client: TestClient
) -> None:
    env.insert(technician="t7", notes="private notes")  # a colleague's open order at s1
    h = headers(env, "tab-1", sites=["s1"])
    colleague = {"id": 1, "site": "s1", "status": "open", "technician": "t7"}
    env.sql("update work_orders set technician = 't8' where id = 1")  # the server reassigns
    upload(client, h, entry("tab-1", 1, old=colleague, new={"technician": "t9"}))
    conflict = kept_conflict(client, h, 1)
    assert set(conflict["columns"]) == {"technician"}
    r = resolve(client, h, conflict["id"], choice="values", values={"technician": "t42"})
    refused(r, "forbidden_move")
    assert "notes" in r.json()["error"]["message"]
    assert env.sql("select technician from work_orders") == [("t8",)]
    # giving it to a third technician shows it nothing new: allowed as for a journal entry
    r = resolve(client, h, conflict["id"], choice="mine")
    assert r.status_code == 200, r.text
    assert env.sql("select technician from work_orders") == [("t9",)]
    assert "notes" not in r.json()["outcome"]["row"]


def test_an_operator_resolving_on_the_server_is_trusted(env: Env, client: TestClient) -> None:
    env.insert()
    env.sql("update work_orders set notes = 'server' where id = 1")
    h = headers(env, "tab-1")
    upload(client, h, entry("tab-1", 1, op="delete", new=None))
    conflict = kept_conflict(client, h, 1)
    db = env.journal.desk.db if env.journal.desk is not None else None
    assert db is not None
    with env.journal.desk._lock:  # type: ignore[union-attr]
        db.connect()
        outcome = db.resolve(
            conflict["id"], "values", {**BASE, "technician": "t7"}, by="dispatcher"
        )
    assert outcome.kind.value == "resolved" and outcome.row is None  # no longer the device's
    assert env.sql("select technician from work_orders") == [("t7",)]


def test_resolution_values_may_not_change_the_key(env: Env, client: TestClient) -> None:
    env.insert()
    env.sql("delete from work_orders where id = 1")
    h = headers(env, "tab-1")
    upload(client, h, entry("tab-1", 1, new={"notes": "device"}))
    conflict = kept_conflict(client, h, 1)
    r = resolve(client, h, conflict["id"], choice="values", values={**BASE, "id": 2})
    assert r.status_code == 422
    assert_error_shape(422, r.json(), "invalid_request")
    assert "key column" in r.json()["error"]["message"]
    assert env.sql("select count(*) from work_orders") == [(0,)]
