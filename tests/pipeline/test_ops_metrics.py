"""The relay's and the applier's metrics and the relay's readiness, scraped from the real
processes during a real workload.

``fieldsync cdc run``, ``fieldsync relay run`` (with its engine) and ``fieldsync relay
applier`` run as subprocesses (tests/pipeline/pipeline_stack.py) against the test
PostgreSQL and broker; the relay reaches its store through a TCP proxy the test can cut.
Rows committed in PostgreSQL reach a device over ``/v1/changes`` (a long-poll is seen
waiting, a WebSocket stream is seen open), a journal upload is taken in and applied, a
bad token is refused; each step is followed by a scrape of ``/metrics`` until the
counters and gauges show it (a wait for a state, never a sleep).  ``/readyz`` answers 200
once the engine caught up and 503 naming the store while the store cannot be reached."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect as ws_connect

from core.hlc import Hlc
from relay.auth import issue_token
from tests.cdc.cdc_support import wait_for
from tests.fix_proxy import TcpProxy
from tests.pipeline.pipeline_stack import Stack, services

RULES = """
token_claims = ["crew"]

[[bucket]]
name = "crew_jobs"
parameters = ["crew"]
claims = { crew = "crew" }

[[bucket.table]]
table = "public.jobs"
match = { crew = "crew" }
"""
CONFLICTS = '[default]\npolicy = "server_wins"\n'
READY_KEYS = {"ready", "store", "broker", "engine", "engine_lag_s", "max_lag_s", "reasons"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base: str) -> Samples:
    """Every sample of ``base``/metrics: (name, labels) -> value."""
    r = httpx.get(f"{base}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str) -> float:
    """The sum over every label set of ``name`` (0 when it has no samples)."""
    return sum(v for (n, _), v in samples.items() if n == name)


def labelled(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels), _ in samples.items() if n == name]


def ready(stack: Stack) -> tuple[int, dict[str, Any]]:
    r = httpx.get(f"{stack.url}/readyz", timeout=30)
    body: dict[str, Any] = r.json()
    return r.status_code, body


def test_relay_and_applier_metrics_follow_a_workload_and_readiness_follows_the_store(
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    tcp_proxy: Any,
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table jobs (id integer primary key, crew text not null, note text)")
        conn.execute("insert into jobs values (1, 'a', 'one'), (2, 'a', 'two'), (3, 'b', 'x')")
    info = psycopg.conninfo.conninfo_to_dict(store_dsn)
    proxy: TcpProxy = tcp_proxy(str(info["host"]), int(str(info["port"])))
    proxied = psycopg.conninfo.make_conninfo(store_dsn, host="127.0.0.1", port=str(proxy.port))
    with services(
        tmp_path,
        pg_dsn,
        proxied,
        kafka_bootstrap,
        topic_prefix,
        rules=RULES,
        conflicts=CONFLICTS,
        tables=["public.jobs"],
        # the long-poll below must outlast a change's way through cdc, Kafka and the
        # engine on a busy machine (the stack's default cap, 5 s, need not)
        long_poll_s=120,
    ) as stack:
        relay_metrics = stack.metrics_url("relay")
        applier_metrics = stack.metrics_url("applier")
        token = issue_token(stack.keys, None, "tab-1", {"crew": "a"}, 600)
        headers = {"Authorization": f"Bearer {token}"}
        topic = f"{topic_prefix}.public.jobs"

        # ---- rows reach the device; the engine catches up; ready
        rows: dict[int, Any] = {}
        cursor = None
        deadline = time.monotonic() + 120
        while set(rows) != {1, 2}:
            assert time.monotonic() < deadline, rows
            params: dict[str, Any] = {"wait": 5, **({"cursor": cursor} if cursor else {})}
            msg = httpx.get(f"{stack.url}/v1/changes", params=params, headers=headers, timeout=30)
            assert msg.status_code == 200, msg.text
            body = msg.json()
            rows.update({o["key"][0]: o["data"] for o in body["ops"] if o["op"] == "PUT"})
            cursor = body["cursor"]
        _, body = wait_for(
            lambda: (r := ready(stack))[0] == 200 and r, timeout=120, what="/readyz 200"
        )
        assert set(body) == READY_KEYS, body
        assert body["ready"] is True and body["reasons"] == []
        assert (body["store"], body["broker"], body["engine"]) == ("ok", "ok", "caught_up")
        assert body["engine_lag_s"] == 0 and body["max_lag_s"] == 30
        samples = wait_for(
            lambda: (
                (s := scrape(relay_metrics))
                and value(s, "fieldsync_relay_engine_lag_seconds") == 0
                and labelled(s, "fieldsync_relay_engine_lag_records")
                and total(s, "fieldsync_relay_engine_lag_records") == 0
                and s
            ),
            timeout=60,
            what="the engine's lag at 0",
        )
        assert total(samples, "fieldsync_relay_ops_written_total") >= 3  # jobs 1, 2 and 3
        assert total(samples, "fieldsync_relay_ops_served_total") >= 2
        assert {d["topic"] for d in labelled(samples, "fieldsync_relay_engine_lag_records")} == {
            topic
        }
        for op in ("apply", "read_ops", "load_offsets"):
            count = value(samples, "fieldsync_relay_store_seconds_count", operation=op)
            assert count is not None and count >= 1, op
        written_before = total(samples, "fieldsync_relay_ops_written_total")
        served_before = total(samples, "fieldsync_relay_ops_served_total")

        # ---- a long-poll is seen waiting, then a change releases it
        answer: dict[str, Any] = {}

        def long_poll() -> None:
            r = httpx.get(
                f"{stack.url}/v1/changes",
                params={"cursor": cursor, "wait": 60},
                headers=headers,
                timeout=90,
            )
            answer.update(r.json())

        poller = threading.Thread(target=long_poll)
        poller.start()
        wait_for(
            lambda: value(scrape(relay_metrics), "fieldsync_relay_long_polls") == 1,
            timeout=30,
            what="the long-poll counted as waiting",
        )
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("insert into jobs values (4, 'a', 'four')")
        poller.join(90)
        assert not poller.is_alive() and [o["key"] for o in answer["ops"]] == [[4]]
        samples = wait_for(
            lambda: (
                (s := scrape(relay_metrics)) and value(s, "fieldsync_relay_long_polls") == 0 and s
            ),
            timeout=30,
            what="no long-poll waiting",
        )
        assert total(samples, "fieldsync_relay_ops_written_total") >= written_before + 1
        assert total(samples, "fieldsync_relay_ops_served_total") >= served_before + 1

        # ---- a WebSocket stream is counted while open
        ws_url = stack.url.replace("http://", "ws://") + "/v1/stream"
        with ws_connect(ws_url, additional_headers=headers) as ws:
            first = json.loads(ws.recv(timeout=30))
            assert first["checkpoint"]["complete"]
            wait_for(
                lambda: value(scrape(relay_metrics), "fieldsync_relay_streams") == 1,
                timeout=30,
                what="the stream counted",
            )
        wait_for(
            lambda: value(scrape(relay_metrics), "fieldsync_relay_streams") == 0,
            timeout=30,
            what="the stream no longer counted",
        )

        # ---- refused tokens, by reason
        bad = httpx.get(
            f"{stack.url}/v1/changes", headers={"Authorization": "Bearer not-a-jwt"}, timeout=30
        )
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "token_malformed"
        assert httpx.get(f"{stack.url}/v1/changes", timeout=30).status_code == 401
        samples = scrape(relay_metrics)
        failures = "fieldsync_relay_auth_failures_total"
        assert value(samples, failures, reason="token_malformed") == 1
        assert value(samples, failures, reason="token_missing") == 1

        # ---- a journal upload: one entry accepted, one rejected at intake; both settled
        hlc = Hlc(int(time.time() * 1000), 0, "tab-1").encode()
        entries = [
            {
                "seq": 1,
                "table": "public.jobs",
                "op": "update",
                "key": [1],
                "old": {"id": 1, "crew": "a", "note": "one"},
                "new": {"note": "edited on tab-1"},
                "base": None,
                "hlc": hlc,
                "prev_seq": None,
            },
            {
                "seq": 2,
                "table": "public.jobs",
                "op": "update",
                "key": [3],
                "old": {"id": 3, "crew": "b", "note": "x"},
                "new": {"note": "not mine"},
                "base": None,
                "hlc": hlc,
                "prev_seq": None,
            },
        ]
        r = httpx.post(
            f"{stack.url}/v1/journal", json={"entries": entries}, headers=headers, timeout=60
        )
        assert r.status_code == 200, r.text
        assert [x["status"] for x in r.json()["results"]] == ["accepted", "rejected"]
        samples = scrape(relay_metrics)
        intake = "fieldsync_relay_journal_entries_total"
        assert value(samples, intake, status="accepted") == 1
        assert value(samples, intake, status="rejected") == 1

        entries_total = "fieldsync_applier_entries_total"
        samples = wait_for(
            lambda: (
                (s := scrape(applier_metrics))
                and value(s, entries_total, outcome="applied") == 1
                and value(s, entries_total, outcome="rejected") == 1
                and s
            ),
            timeout=120,
            what="the applier's outcomes counted",
        )
        for outcome in ("merged", "conflict", "dead_letter"):
            assert value(samples, entries_total, outcome=outcome) == 0, outcome
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            row = conn.execute("select note from jobs where id = 1").fetchone()
        assert row == ("edited on tab-1",)
        samples = wait_for(
            lambda: (
                (s := scrape(applier_metrics))
                and value(s, "fieldsync_applier_lag_seconds") == 0
                and total(s, "fieldsync_applier_lag_records") == 0
                and s
            ),
            timeout=60,
            what="the applier's lag at 0",
        )
        assert {d["partition"] for d in labelled(samples, "fieldsync_applier_lag_records")} == {
            "0",
            "1",
            "2",
            "3",
        }

        # ---- the store out of reach: not ready, naming the store; back: ready again
        healthy = httpx.get(f"{stack.url}/healthz", timeout=30)
        assert healthy.status_code == 200 and healthy.json() == {"status": "ok", "store": "ok"}
        proxy.refuse()
        _, body = wait_for(
            lambda: (r := ready(stack))[0] == 503 and r, timeout=60, what="/readyz 503"
        )
        assert set(body) == READY_KEYS and body["ready"] is False, body
        assert body["store"] == "unreachable" and body["broker"] == "ok", body
        assert [x.split(":")[0] for x in body["reasons"]] == ["store"], body
        proxy.allow()
        wait_for(lambda: ready(stack)[0] == 200, timeout=120, what="/readyz 200 again")
        assert not stack.stopped_threads()
