"""Journal endpoints of the device API against the real PostgreSQL, broker and applier:
upload → Kafka → applier → PostgreSQL → outcome back through GET /v1/outcomes; idempotent
re-uploads; rejections with reasons and the ordering rule; 413/400/401/403 in the error
shape; Kafka down → 503 with nothing acknowledged; kept conflicts listed and resolved
(twice, harmlessly); devices see only their own outcomes and conflicts."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from core.hlc import Hlc
from core.journal_format import JournalRecord
from core.journal_outcomes import Outcome, OutcomeKind
from relay.auth import Authenticator, Revocation, RevocationList, issue_token
from relay.auth_keys import Key, KeyStore
from relay.downstream.api import create_app
from relay.downstream.api_sync import ApiConfig
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.rules_parser import load_rules
from relay.downstream.table_infos import table_infos_from_catalog
from relay.settings import load_relay_settings
from relay.upstream.applier import Applier
from relay.upstream.applier_db import ApplierDb
from relay.upstream.conflict_desk import ConflictDesk
from relay.upstream.intake import IntakeDecision, JournalApiConfig, latest_per_entry
from relay.upstream.journal_api import JournalApi
from relay.upstream.journal_kafka import JournalProducer
from relay.upstream.journal_store import JournalStore
from relay.upstream.outcome_feed import OutcomeFeed
from tests.cdc.test_cdc_faults import ProxiedBroker
from tests.fix_kafka import read_topic
from tests.relay.test_relay_errors import assert_error_shape

TABLES = """
create table work_orders (
    id bigint primary key,
    site text not null,
    technician text,
    status text not null default 'open',
    cost numeric(10,2),
    notes text,
    qty int not null default 0
);
create table parts (id text primary key, name text not null);
"""

RULES = """
token_claims = ["technician"]

[[bucket]]
name = "tech"
parameters = ["technician"]
claims = { technician = "technician" }

[[bucket.table]]
table = "public.work_orders"
match = { technician = "technician" }
exclude = ["cost"]

[[bucket]]
name = "catalog"

[[bucket.table]]
table = "public.parts"
"""

CONFLICTS = """
[[table]]
table = "public.work_orders"
policy = "server_wins"

[table.columns]
notes = "ask"
qty = "counter"
"""

SECRET = b"j" * 40
BASE = {"id": 1, "site": "s1", "technician": "t42", "status": "open", "notes": "n0", "qty": 5}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def entry(
    device: str,
    seq: int,
    op: str = "update",
    key: Any = 1,
    old: dict[str, Any] | None = None,
    new: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An upload entry of ``device`` (a work order update by default)."""
    body: dict[str, Any] = {
        "seq": seq,
        "table": "public.work_orders",
        "op": op,
        "key": [key],
        "old": old if old is not None or op == "insert" else {**BASE, "id": key},
        "new": new,
        "base": {"commit_lsn": 1, "seq": 0},
        "hlc": Hlc(now_ms(), 0, device).encode(),
        "prev_seq": None,
    }
    body.update(extra)
    return body


class Env:
    """Captured database + store database, rules, an applier and the outcome feed running
    in threads, and the device API app with the journal endpoints."""

    def __init__(
        self, dsn: str, store_dsn: str, bootstrap: str, prefix: str, tmp: Path, timeout_s: float
    ) -> None:
        self.dsn, self.bootstrap, self.prefix = dsn, bootstrap, prefix
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute(TABLES)
        self.rules_path = tmp / "rules.toml"
        self.rules_path.write_text(RULES)
        self.conflicts_path = tmp / "conflicts.toml"
        self.conflicts_path.write_text(CONFLICTS)
        rules = load_rules(self.rules_path, table_infos_from_catalog(dsn))
        self.keys = KeyStore([Key.hmac("k1", SECRET)], current="k1")
        self.auth = Authenticator(self.keys)
        self.bucket_store = PgBucketStore(store_dsn)
        self.bucket_store.migrate()
        self.store = JournalStore(store_dsn)
        self.store.migrate()
        kafka = {"bootstrap_servers": bootstrap}
        self.config = JournalApiConfig(
            prefix=prefix, long_poll_s=120, kafka_timeout_s=timeout_s, max_page_outcomes=50
        )
        self.feed = OutcomeFeed(self.store, kafka, prefix, refresh_s=0.5)
        self.journal = JournalApi(
            rules,
            self.store,
            JournalProducer(kafka, self.config),
            self.config,
            desk=ConflictDesk(ApplierDb(dsn, self.rules_path, self.conflicts_path)),
            feed=self.feed,
        )
        self.app = create_app(
            self.bucket_store,
            rules,
            self.auth,
            ApiConfig(rate_per_s=0, long_poll_s=15, max_body_bytes=200_000),
            self.journal,
        )
        self.applier = Applier(
            ApplierDb(dsn, self.rules_path, self.conflicts_path),
            kafka=kafka,
            prefix=prefix,
            batch_max_ms=20,
            topic_refresh_s=0.5,
        )
        self._stack = contextlib.ExitStack()

    def start(self) -> None:
        """Run the applier and the outcome feed in threads until :meth:`close`."""
        thread = threading.Thread(target=self.applier.run, name="test-applier", daemon=True)
        thread.start()

        def stop_applier() -> None:
            self.applier.request_stop()
            thread.join(30)

        self._stack.callback(stop_applier)
        self._stack.enter_context(self.feed.running())

    def headers(self, device: str, technician: str = "t42") -> dict[str, str]:
        token = issue_token(self.keys, None, device, {"technician": technician}, 3600)
        return {"Authorization": f"Bearer {token}"}

    def insert(self, **changes: Any) -> None:
        row = {**BASE, **changes}
        marks = ", ".join(["%s"] * len(row))
        self.conn.execute(
            f"insert into work_orders ({', '.join(row)}) values ({marks})", list(row.values())
        )

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []

    def journal_records(self, expect: int | None = None) -> list[JournalRecord]:
        return [
            JournalRecord.from_bytes(r.value)
            for r in read_topic(
                self.bootstrap, f"{self.prefix}._journal", timeout=30, expect=expect
            )
        ]

    def close(self) -> None:
        self._stack.close()
        self.journal.close()
        self.applier.close()
        self.bucket_store.close()
        self.conn.close()


def make_env(
    pg_dsn: str, store_dsn: str, bootstrap: str, tmp: Path, timeout_s: float = 10.0
) -> Env:
    return Env(pg_dsn, store_dsn, bootstrap, "fs" + uuid.uuid4().hex[:10], tmp, timeout_s)


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


def upload(client: TestClient, headers: dict[str, str], *entries: dict[str, Any]) -> Any:
    r = client.post("/v1/journal", json={"entries": list(entries)}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def outcomes_until(
    client: TestClient,
    headers: dict[str, str],
    done: Callable[[dict[int, dict[str, Any]]], bool],
    timeout: float = 90.0,
) -> tuple[dict[int, dict[str, Any]], int]:
    """Follow GET /v1/outcomes (long-poll) until ``done(latest outcome per seq)``."""
    latest: dict[int, dict[str, Any]] = {}
    cursor = 0
    deadline = time.monotonic() + timeout
    while not done(latest):
        assert time.monotonic() < deadline, f"outcomes so far: {latest}"
        r = client.get("/v1/outcomes", params={"after": cursor, "wait": 5}, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["cursor"] >= cursor
        cursor = body["cursor"]
        for o in body["outcomes"]:
            latest[o["seq"]] = o
    return latest, cursor


# --------------------------------------------------------------------------- the path


def test_upload_is_applied_and_its_outcome_comes_back(env: Env, client: TestClient) -> None:
    env.insert()
    h = env.headers("tab-1")
    results = upload(client, h, entry("tab-1", 1, new={"notes": "fixed pump", "qty": 6}))
    assert results == [
        {"seq": 1, "status": "accepted", "reason": None, "message": "", "duplicate": False}
    ]
    # acknowledged: Kafka holds it, keyed by the device
    (record,) = env.journal_records(expect=1)
    assert (record.device_id, record.seq, record.rejection) == ("tab-1", 1, None)
    assert record.claims["technician"] == "t42"
    latest, cursor = outcomes_until(client, h, lambda got: 1 in got)
    out = latest[1]
    assert out["outcome"] == "applied" and out["device_id"] == "tab-1"
    assert out["row"]["notes"] == "fixed pump" and "cost" not in out["row"]
    assert env.sql("select notes, qty from work_orders") == [("fixed pump", 6)]
    # nothing new: a long-poll waits, then answers empty with the same cursor
    started = time.monotonic()
    r = client.get("/v1/outcomes", params={"after": cursor, "wait": 1}, headers=h)
    assert r.json() == {"outcomes": [], "cursor": cursor, "has_more": False}
    assert time.monotonic() - started >= 0.9


def test_an_entry_named_by_other_key_columns_waits_until_the_relay_follows_the_key(
    env: Env, client: TestClient
) -> None:
    """Entries name their key columns.  One named by a key this relay's schema does not
    give refuses the upload for now (503, nothing recorded: the relay or the device has
    not read the table's new definition yet); once the relay's rules follow the new key
    (the table follower's swap) the same entry is accepted and the applier, which
    re-reads the table itself, writes the right row."""
    env.insert()
    h = env.headers("tab-1")
    named_by_site = entry("tab-1", 1, new={"notes": "by id and site"})
    named_by_site.update(key=[1, "s1"], key_columns=["id", "site"])
    r = client.post("/v1/journal", json={"entries": [named_by_site]}, headers=h)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "5"
    error = r.json()["error"]
    assert error["code"] == "unavailable"
    assert "names its row by (id, site); this relay's schema has the key (id)" in error["message"]
    env.sql("alter table work_orders drop constraint work_orders_pkey, add primary key (id, site)")
    env.journal.use_rules(load_rules(env.rules_path, table_infos_from_catalog(env.dsn)))
    assert upload(client, h, named_by_site) == [
        {"seq": 1, "status": "accepted", "reason": None, "message": "", "duplicate": False}
    ]
    latest, _ = outcomes_until(client, h, lambda got: 1 in got)
    assert latest[1]["outcome"] == "applied", str(latest[1])
    assert env.sql("select id, site, notes from work_orders") == [(1, "s1", "by id and site")]


def test_long_poll_wakes_when_the_outcome_arrives(env: Env, client: TestClient) -> None:
    env.insert()
    h = env.headers("tab-1")
    got: list[Any] = []

    def poll() -> None:
        started = time.monotonic()
        r = client.get("/v1/outcomes", params={"after": 0, "wait": 120}, headers=h)
        got.append((time.monotonic() - started, r.json()))

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    upload(client, h, entry("tab-1", 1, new={"notes": "x"}))
    t.join(150)
    waited, body = got[0]
    assert [o["seq"] for o in body["outcomes"]] == [1]
    # answered when the outcome came (the applier goes through Kafka: seconds on a busy
    # machine), not at the end of the 120 s wait
    assert waited < 90


def test_reupload_is_idempotent(env: Env, client: TestClient) -> None:
    env.insert()
    h = env.headers("tab-1")
    entries = [
        entry("tab-1", 1, new={"qty": 6}),  # counter: applied twice would give 7
        entry("tab-1", 2, new={"nope": 1}),  # rejected at intake
    ]
    first = upload(client, h, *entries)
    assert [r["status"] for r in first] == ["accepted", "rejected"]
    outcomes_until(client, h, lambda got: {1, 2} <= set(got))
    again = upload(client, h, *entries)
    assert again == [{**r, "duplicate": True} for r in first]
    # a re-upload with other content for a known seq is answered from the intake record too
    changed = upload(
        client, h, entry("tab-1", 1, new={"qty": 9}), entry("tab-1", 3, new={"site": "s2"})
    )
    assert changed[0] == {**first[0], "duplicate": True}
    assert changed[1]["status"] == "accepted" and not changed[1]["duplicate"]
    outcomes_until(client, h, lambda got: 3 in got)
    assert env.sql("select qty, site from work_orders") == [(6, "s2")]
    assert len(env.journal_records(expect=3)) == 3  # re-uploads were not sent again
    assert env.sql("select count(*) from fieldsync_applier.applied") == [(3,)]


def test_rejected_entries_have_reasons_and_block_only_what_depends_on_them(
    env: Env, client: TestClient
) -> None:
    env.insert()
    env.insert(id=2)
    h = env.headers("tab-1")
    results = upload(
        client,
        h,
        entry("tab-1", 1, new={"qty": "many"}),  # wrong type
        entry("tab-1", 2, key=2, new={"notes": "other row"}),  # fine
        entry("tab-1", 3, new={"notes": "on top of 1"}, prev_seq=1),  # blocked by 1
        entry("tab-1", 4, new={"technician": "t7"}),  # moves the row out of its buckets
        entry("tab-1", 5, key=9, new={"x": 1}, table="public.nothing"),  # unknown table
        {"seq": 6, "op": "upsert"},  # malformed
    )
    by_seq = {r["seq"]: r for r in results}
    assert by_seq[2]["status"] == "accepted"
    assert {s: by_seq[s]["reason"] for s in (1, 3, 4, 5, 6)} == {
        1: "wrong_type",
        3: "blocked",
        4: "forbidden_move",
        5: "unknown_table",
        6: "malformed",
    }
    assert "qty" in by_seq[1]["message"] and "entry 1" in by_seq[3]["message"]
    # rejected entries are not lost: they go to Kafka and get their outcome too
    records = {r.seq: r for r in env.journal_records(expect=6)}
    assert set(records) == {1, 2, 3, 4, 5, 6}
    assert records[1].rejection is not None and records[2].rejection is None
    latest, _ = outcomes_until(client, h, lambda got: set(range(1, 7)) <= set(got))
    assert latest[2]["outcome"] == "applied"
    assert {s: latest[s]["reason"] for s in (1, 3, 4, 5, 6)} == {
        s: by_seq[s]["reason"] for s in (1, 3, 4, 5, 6)
    }
    assert all(latest[s]["outcome"] == "rejected" for s in (1, 3, 4, 5, 6))
    assert env.sql("select id, notes, technician from work_orders order by id") == [
        (1, "n0", "t42"),
        (2, "other row", "t42"),
    ]


def test_upload_errors_have_the_one_shape(env: Env, client: TestClient) -> None:
    h = env.headers("tab-1")
    too_many = {"entries": [entry("tab-1", i, new={"notes": "x"}) for i in range(1, 502)]}
    cases = [
        (413, "batch_too_large", client.post("/v1/journal", json=too_many, headers=h)),
        (
            413,
            "request_too_large",
            client.post("/v1/journal", content=b"x" * 300_000, headers=h),
        ),
        (400, "bad_upload", client.post("/v1/journal", content=b"{not json", headers=h)),
        (400, "bad_upload", client.post("/v1/journal", json={"entry": []}, headers=h)),
        (
            400,
            "bad_upload",
            client.post(
                "/v1/journal",
                json={"entries": [entry("tab-1", 2), entry("tab-1", 1)]},
                headers=h,
            ),
        ),
        (401, "token_missing", client.post("/v1/journal", json={"entries": []})),
        (401, "token_missing", client.get("/v1/outcomes")),
        (401, "token_missing", client.get("/v1/conflicts")),
        (401, "token_missing", client.post("/v1/conflicts/x/resolve", json={"choice": "mine"})),
        (
            401,
            "token_malformed",
            client.get("/v1/outcomes", headers={"Authorization": "Bearer x"}),
        ),
        (422, "invalid_request", client.get("/v1/outcomes?after=-1", headers=h)),
        (422, "invalid_request", client.get("/v1/outcomes?wait=x", headers=h)),
        (
            422,
            "invalid_request",
            client.post("/v1/conflicts/x/resolve", json={"choice": "both"}, headers=h),
        ),
        (
            404,
            "conflict_not_found",
            client.post("/v1/conflicts/nope/resolve", json={"choice": "mine"}, headers=h),
        ),
        (405, "method_not_allowed", client.delete("/v1/journal", headers=h)),
    ]
    env.auth.revoked = RevocationList([Revocation("tab-r")])
    revoked = env.headers("tab-r")
    cases += [
        (403, "token_revoked", client.post("/v1/journal", json={"entries": []}, headers=revoked)),
        (403, "token_revoked", client.get("/v1/outcomes", headers=revoked)),
    ]
    for status, code, response in cases:
        assert response.status_code == status, (status, code, response.text)
        assert_error_shape(status, response.json(), code)
    assert env.journal_records() == []  # nothing of it reached Kafka
    assert upload(client, h) == []  # an empty upload is fine


# --------------------------------------------------------------------------- conflicts


def test_ask_conflict_is_listed_resolved_and_resolving_twice_is_harmless(
    env: Env, client: TestClient
) -> None:
    env.insert()
    env.sql("update work_orders set notes = 'server notes' where id = 1")
    h, other = env.headers("tab-1"), env.headers("tab-2")
    upload(client, h, entry("tab-1", 1, new={"notes": "device notes", "site": "s2"}))
    latest, cursor = outcomes_until(client, h, lambda got: 1 in got)
    assert latest[1]["outcome"] == "conflict"
    listed = client.get("/v1/conflicts", headers=h).json()
    assert listed["has_more"] is False
    (kept,) = listed["conflicts"]
    conflict_id = kept["conflict"]["id"]
    assert kept["seq"] == 1 and kept["conflict"]["columns"] == {
        "notes": {"base": "n0", "server": "server notes", "device": "device notes"}
    }
    assert env.sql("select notes, site from work_orders") == [("server notes", "s2")]
    # another device neither sees nor resolves it
    assert client.get("/v1/conflicts", headers=other).json()["conflicts"] == []
    r = client.post(f"/v1/conflicts/{conflict_id}/resolve", json={"choice": "mine"}, headers=other)
    assert r.status_code == 403
    assert_error_shape(403, r.json(), "forbidden_device")
    # values for a column not in conflict: 422, nothing written
    r = client.post(
        f"/v1/conflicts/{conflict_id}/resolve",
        json={"choice": "values", "values": {"site": "x"}},
        headers=h,
    )
    assert_error_shape(422, r.json(), "invalid_request")
    r = client.post(f"/v1/conflicts/{conflict_id}/resolve", json={"choice": "mine"}, headers=h)
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["already_resolved"] is False
    assert first["outcome"]["outcome"] == "resolved" and first["outcome"]["seq"] == 1
    assert first["outcome"]["conflict"] == {
        "id": conflict_id,
        "choice": "device",
        "by": "device:tab-1",
    }
    assert env.sql("select notes from work_orders") == [("device notes",)]
    assert client.get("/v1/conflicts", headers=h).json()["conflicts"] == []
    # at once in the device's outcomes, under a new position
    body = client.get("/v1/outcomes", params={"after": cursor}, headers=h).json()
    assert [(o["seq"], o["outcome"]) for o in body["outcomes"]] == [(1, "resolved")]
    # resolving again (even differently) returns the first resolution and writes nothing
    env.sql("update work_orders set notes = 'later' where id = 1")
    r = client.post(f"/v1/conflicts/{conflict_id}/resolve", json={"choice": "theirs"}, headers=h)
    assert r.json() == {"outcome": first["outcome"], "already_resolved": True}
    assert env.sql("select notes from work_orders") == [("later",)]
    # once the applier has published it, the outcome store still says resolved
    wait_until(
        lambda: any(o.kind is OutcomeKind.RESOLVED for o in outcomes_in_kafka(env)),
        "the resolved outcome in _outcomes",
    )
    time.sleep(1.0)
    final, _ = outcomes_until(client, h, lambda got: 1 in got)
    assert final[1]["outcome"] == "resolved"
    assert client.get("/v1/conflicts", headers=h).json()["conflicts"] == []


def outcomes_in_kafka(env: Env) -> list[Outcome]:
    from core.journal_outcomes import decode_outcomes

    records = read_topic(env.bootstrap, f"{env.prefix}._outcomes", timeout=30)
    return [o for r in records for o in decode_outcomes(r.value)]


def wait_until(check: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_devices_see_only_their_own_outcomes(env: Env, client: TestClient) -> None:
    env.insert()
    env.insert(id=2, technician="t7")
    a, b = env.headers("tab-a"), env.headers("tab-b", technician="t7")
    upload(client, a, entry("tab-a", 1, new={"notes": "from a"}))
    upload(
        client,
        b,
        entry("tab-b", 1, key=2, old={**BASE, "id": 2, "technician": "t7"}, new={"notes": "b"}),
    )
    got_a, _ = outcomes_until(client, a, lambda got: 1 in got)
    got_b, _ = outcomes_until(client, b, lambda got: 1 in got)
    assert {o["device_id"] for o in got_a.values()} == {"tab-a"}
    assert got_b[1]["device_id"] == "tab-b" and got_b[1]["row"]["notes"] == "b"
    # a device with no edits sees nothing at all, whatever it asks for
    c = env.headers("tab-c")
    for params in ({}, {"after": 0}, {"after": 0, "limit": 50}):
        body = client.get("/v1/outcomes", params=params, headers=c).json()
        assert body == {"outcomes": [], "cursor": 0, "has_more": False}
    # device b cannot write a's rows as a: its entries are its own (hlc node = token sub)
    r = upload(client, b, entry("tab-a", 2, new={"notes": "forged"}))
    assert r[0]["reason"] == "bad_hlc"


def test_paging_outcomes(env: Env, client: TestClient) -> None:
    for i in range(1, 8):
        env.insert(id=i)
    h = env.headers("tab-1")
    upload(client, h, *[entry("tab-1", i, key=i, new={"notes": f"e{i}"}) for i in range(1, 8)])
    outcomes_until(client, h, lambda got: len(got) == 7)
    seen: list[int] = []
    cursor, more = 0, True
    while more:
        body = client.get("/v1/outcomes", params={"after": cursor, "limit": 3}, headers=h).json()
        assert len(body["outcomes"]) <= 3
        seen += [o["seq"] for o in body["outcomes"]]
        cursor, more = body["cursor"], body["has_more"]
    assert sorted(seen) == list(range(1, 8)) and len(seen) == 7


def test_outcome_feed_has_one_leader_and_resumes_from_its_offsets(
    store_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    from kafka import KafkaProducer

    from core.journal_outcomes import encode_outcomes

    store = JournalStore(store_dsn)
    store.migrate()
    kafka = {"bootstrap_servers": kafka_bootstrap}
    producer = KafkaProducer(**kafka, acks="all")
    topic = f"{topic_prefix}._outcomes"

    def publish(*outcomes: Outcome) -> None:
        producer.send(topic, key=b"d", value=encode_outcomes(list(outcomes)))
        producer.flush()

    def feed_until(feed: OutcomeFeed, stored: int) -> None:
        deadline = time.monotonic() + 90
        while feed.stored < stored:
            assert time.monotonic() < deadline, f"feed stored {feed.stored}, wanted {stored}"
            feed.step()

    first = OutcomeFeed(store, kafka, topic_prefix, refresh_s=0.2)
    second = OutcomeFeed(store, kafka, topic_prefix, refresh_s=0.2)
    try:
        publish(_outcome(1, "applied", 0), _outcome(2, "conflict", 1))
        publish(_outcome(2, "resolved", 2))
        first._conn = store.lead(first.topic)
        assert first._conn is not None
        assert store.lead(first.topic) is None  # the second process stands by
        feed_until(first, 2)
        page = store.read_outcomes("d", 0, 10)
        kinds = [(o["seq"], o["outcome"]) for o in map(orjson_loads, page.payloads)]
        assert kinds == [(1, "applied"), (2, "resolved")]
        first.close()  # releases the lock
        publish(_outcome(2, "conflict", 1))  # a late re-publication: resolved stays
        publish(_outcome(3, "rejected", 3))
        second._conn = store.lead(second.topic)
        assert second._conn is not None
        read = 0
        deadline = time.monotonic() + 90
        while read < 2:
            assert time.monotonic() < deadline
            read += second.step()
        for _ in range(5):
            read += second.step()
        assert read == 2  # from the stored offsets: the first feed's records not read again
        assert second.stored == 1
        later = store.read_outcomes("d", page.cursor, 10)
        assert [orjson_loads(p)["seq"] for p in later.payloads] == [3]
        assert store.open_conflicts("d", 10) == ([], False)
    finally:
        first.close()
        second.close()
        producer.close()
        store.close()


def test_a_rebuilt_outcome_store_misses_no_outcome_behind_an_old_cursor(
    store_dsn: str, pg_server: Any
) -> None:
    """A device's outcome cursor from a store that was then rebuilt (a new, empty store
    database fed from ``_outcomes`` again) still sees every outcome of the new store."""
    from tests.fix_pg import fresh_database

    old = JournalStore(store_dsn)
    old.migrate()
    try:
        old.put_outcomes([_outcome(seq, "applied", seq) for seq in range(1, 51)])
        cursor = old.read_outcomes("d", 0, 100).cursor
    finally:
        old.close()
    with fresh_database(pg_server, "store_") as rebuilt_dsn:
        new = JournalStore(rebuilt_dsn)
        new.migrate()
        try:
            # the feed copies the same records again, then a new outcome arrives
            new.put_outcomes([_outcome(seq, "applied", seq) for seq in range(1, 51)])
            new.put_outcomes([_outcome(51, "rejected", 51)])
            page = new.read_outcomes("d", cursor, 100)
            assert sorted(orjson_loads(p)["seq"] for p in page.payloads) == list(range(1, 52))
            assert page.cursor > cursor
        finally:
            new.close()


def orjson_loads(text: str) -> Any:
    import orjson

    return orjson.loads(text)


# --------------------------------------------------------------------------- Kafka down


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[ProxiedBroker]:
    broker = ProxiedBroker(tmp_path / "kafka")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_kafka_down_is_503_and_nothing_is_acknowledged(
    pg_dsn: str, store_dsn: str, proxied: ProxiedBroker, tmp_path: Path
) -> None:
    e = make_env(pg_dsn, store_dsn, proxied.bootstrap, tmp_path, timeout_s=3.0)
    e.insert()
    h = e.headers("tab-1")
    try:
        with TestClient(e.app, raise_server_exceptions=False) as c:
            # unreachable from the start (no producer could be made yet)
            proxied.proxy.refuse()
            first = [entry("tab-1", 1, new={"qty": 6})]
            r = c.post("/v1/journal", json={"entries": first}, headers=h)
            assert r.status_code == 503, r.text
            assert_error_shape(503, r.json(), "unavailable")
            assert e.store.intake_lookup("tab-1", [1]) == {}
            proxied.proxy.allow()
            assert upload(c, h, *first)[0]["status"] == "accepted"
            # unreachable while the producer is up: the records expire unacknowledged
            proxied.proxy.refuse()
            started = time.monotonic()
            r = c.post(
                "/v1/journal",
                json={
                    "entries": [
                        entry("tab-1", 2, old={**BASE, "qty": 6}, new={"qty": 7}, prev_seq=1)
                    ]
                },
                headers=h,
            )
            assert time.monotonic() - started < 60  # kafka_timeout_s 3 s: only catches a hang
            assert r.status_code == 503, r.text
            assert_error_shape(503, r.json(), "unavailable")
            assert r.headers["retry-after"]
            assert e.store.intake_lookup("tab-1", [1, 2]).keys() == {1}  # 2 not acknowledged
            proxied.proxy.allow()
            # the device uploads again: accepted now (not a duplicate), then applied once
            results = upload(
                c, h, entry("tab-1", 2, old={**BASE, "qty": 6}, new={"qty": 7}, prev_seq=1)
            )
            assert results[0]["status"] == "accepted" and not results[0]["duplicate"]
            e.start()
            outcomes_until(c, h, lambda got: {1, 2} <= set(got))
            assert e.sql("select qty from work_orders") == [(7,)]
    finally:
        e.close()


def test_retention_prunes_old_intake_records_and_settled_outcomes(
    store_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    store = JournalStore(store_dsn)
    store.migrate()
    try:
        store.record_intake("d", [(s, IntakeDecision("accepted")) for s in (1, 2, 3, 4)])
        store.put_outcomes(
            [
                _outcome(1, "applied", 0),
                _outcome(2, "conflict", 1),
                _outcome(3, "rejected", 2),
                _outcome(4, "applied", 3),
            ]
        )
        with psycopg.connect(store_dsn, autocommit=True) as conn:
            for table, column in (("intake", "received_at"), ("outcomes", "updated_at")):
                conn.execute(
                    f"update fieldsync_relay_journal.{table} "
                    f"set {column} = now() - interval '100 days' where seq < 4"
                )
        # retention 0 keeps everything, whatever the age
        keeper = OutcomeFeed(store, {"bootstrap_servers": kafka_bootstrap}, topic_prefix)
        keeper._maybe_prune()
        assert sorted(store.intake_lookup("d", [1, 2, 3, 4])) == [1, 2, 3, 4]
        # 90 days, one row per transaction: the old ones go, the open conflict stays
        assert store.prune(90, batch=1) == (3, 2)
        assert sorted(store.intake_lookup("d", [1, 2, 3, 4])) == [4]
        left = [orjson_loads(p) for p in store.read_outcomes("d", 0, 10).payloads]
        assert [(o["seq"], o["outcome"]) for o in left] == [(2, "conflict"), (4, "applied")]
        assert store.prune(90) == (0, 0)
        # a pruned seq sent again is a new intake record (the applier's own record skips it)
        assert store.record_intake("d", [(1, IntakeDecision("accepted"))])[1][1] is True
    finally:
        store.close()


# --------------------------------------------------------------------------- pure parts


def _outcome(seq: int, kind: str, n: int) -> Outcome:
    return Outcome("d", seq, OutcomeKind(kind), message=str(n))


@given(
    st.lists(
        st.tuples(st.integers(1, 4), st.sampled_from([k.value for k in OutcomeKind])),
        max_size=30,
    )
)
def test_latest_per_entry_keeps_the_latest_and_resolved_is_final(
    items: list[tuple[int, str]],
) -> None:
    outcomes = [_outcome(seq, kind, n) for n, (seq, kind) in enumerate(items)]
    result = latest_per_entry(outcomes)
    assert len({o.seq for o in result}) == len(result) == len({s for s, _ in items})
    for o in result:
        mine = [x for x in outcomes if x.seq == o.seq]
        resolved = [x for x in mine if x.kind is OutcomeKind.RESOLVED]
        assert o is (resolved[-1] if resolved else mine[-1])


def test_relay_file_accepts_the_journal_section(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[relay]\nstore_dsn = "postgresql://x@127.0.0.1/s"\n'
        '[journal]\nmax_upload_entries = 7\ndsn = "postgresql://a@127.0.0.1/app"\n'
    )
    loaded = load_relay_settings(path, environ={})
    assert loaded.journal.max_upload_entries == 7
    assert loaded.captured_dsn() == ("postgresql://a@127.0.0.1/app", None)
    assert loaded.relay.store_dsn == "postgresql://x@127.0.0.1/s"
