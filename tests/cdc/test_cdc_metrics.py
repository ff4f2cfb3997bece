"""``fieldsync cdc run``'s metrics, scraped from the real daemon process during a real
workload (the test PostgreSQL and broker): events per table and op and transactions move by
exactly what was committed, the commit-to-ack histogram by one per transaction, the lag and
slot gauges are there; a port that cannot be bound is an error naming the setting and the
daemon streams on without metrics."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from tests.cdc.cdc_support import table_events, wait_for
from tests.cdc.test_cdc_cli import daemon_config, daemon_process

__all__ = ["daemon_process"]  # the fixture, imported to be used here

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def events(samples: Samples) -> dict[tuple[str, str], float]:
    """(table, op) -> fieldsync_cdc_events_total."""
    out = {}
    for (name, labels), v in samples.items():
        if name == "fieldsync_cdc_events_total":
            d = dict(labels)
            out[(d["table"], d["op"])] = v
    return out


def test_metrics_move_with_the_workload(
    tmp_path: Path, pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, daemon_process: Any
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table a (id int primary key, v text)")
        conn.execute("create table b (id int primary key, v text)")
        conn.execute("insert into a values (100, 'before the start')")  # initial snapshot
        config = daemon_config(
            tmp_path / "cdc.toml",
            dsn=pg_dsn,
            bootstrap=kafka_bootstrap,
            prefix=topic_prefix,
            slot="s_metrics_" + topic_prefix[-8:],
            postgres={"tables": ["public.a", "public.b"]},
            kafka={"batch_max_ms": 10},
            cdc={"slot_check_interval_s": 0.3},
        )
        d = daemon_process(config).start()
        d.wait_streaming()
        match = re.search(r"metrics on (http://[\d.]+:\d+)/metrics", d.log())
        assert match, d.log()[-3000:]
        url = match.group(1)
        first = wait_for(
            lambda: (
                (s := scrape(url))
                and value(s, "fieldsync_cdc_slot_wal_status", status="reserved") == 1
                and s
            ),
            what="a slot reading in the metrics",
        )
        assert events(first) == {("public.a", "r"): 1.0}
        assert value(first, "fieldsync_cdc_snapshot_rows_total", table="public.a") == 1
        assert value(first, "fieldsync_cdc_snapshot_tables_pending") == 0
        assert value(first, "fieldsync_cdc_slot_wal_warning") == 0
        assert value(first, "fieldsync_cdc_slot_retained_wal_bytes") > 0
        # max_slot_wal_keep_size is unlimited here: PostgreSQL reports no safe_wal_size
        assert ("fieldsync_cdc_slot_safe_wal_size_bytes", frozenset()) not in first
        for status in ("extended", "unreserved", "lost"):
            assert value(first, "fieldsync_cdc_slot_wal_status", status=status) == 0
        transactions = value(first, "fieldsync_cdc_transactions_total")
        acks = value(first, "fieldsync_cdc_commit_to_ack_seconds_count")
        sent = value(first, "fieldsync_cdc_bytes_total")

        with conn.transaction():
            conn.execute("insert into a values (1, 'x'), (2, 'y'), (3, 'z')")
        with conn.transaction():
            conn.execute("update a set v = 'w' where id in (1, 2)")
            conn.execute("insert into b values (1, 'b')")
        with conn.transaction():
            conn.execute("delete from a where id = 3")
        assert len(table_events(kafka_bootstrap, topic_prefix, "a", expect=7)) == 7
        want = {
            ("public.a", "r"): 1.0,
            ("public.a", "c"): 3.0,
            ("public.a", "u"): 2.0,
            ("public.a", "d"): 1.0,
            ("public.b", "c"): 1.0,
        }
        # a transaction is counted with the batch it ends in, which may be committed after
        # the batch of its last event: wait for both counters, then check them exactly
        after = wait_for(
            lambda: (
                (s := scrape(url))
                and events(s) == want
                and value(s, "fieldsync_cdc_transactions_total") - transactions >= 3
                and value(s, "fieldsync_cdc_commit_to_ack_seconds_count") - acks >= 3
                and s
            ),
            what=f"events_total = {want} and three transactions",
        )
        assert value(after, "fieldsync_cdc_transactions_total") - transactions == 3
        assert value(after, "fieldsync_cdc_commit_to_ack_seconds_count") - acks == 3
        assert value(after, "fieldsync_cdc_bytes_total") > sent
        assert value(after, "fieldsync_cdc_snapshot_rows_total", table="public.a") == 1
        assert value(after, "fieldsync_cdc_kafka_errors_total") == 0
        assert value(after, "fieldsync_cdc_session_restarts_total", reason="postgres") == 0
        assert value(after, "fieldsync_cdc_spill_bytes") == 0
        assert ("fieldsync_cdc_replication_lag_bytes", frozenset()) in after
        # caught up: nothing waits for Kafka
        wait_for(
            lambda: scrape(url).get(("fieldsync_cdc_replication_lag_seconds", frozenset())) == 0,
            what="replication lag 0 s once idle",
        )
        assert value(scrape(url), "fieldsync_cdc_replication_lag_bytes") >= 0

        # a port that cannot be bound: an ERROR naming the setting, and the daemon streams on
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            other = daemon_config(
                tmp_path / "cdc2.toml",
                dsn=pg_dsn,
                bootstrap=kafka_bootstrap,
                prefix=topic_prefix + "x",
                slot="s_metrics2_" + topic_prefix[-8:],
                postgres={"tables": ["public.b"]},
                cdc={"metrics_listen": f"127.0.0.1:{port}"},
            )
            d2 = daemon_process(other).start()
            d2.wait_streaming()
            assert "cdc.metrics_listen: cannot listen on" in d2.log(), d2.log()[-3000:]
            assert "going on without metrics" in d2.log()
            conn.execute("insert into b values (2, 'still streaming')")
            got = table_events(kafka_bootstrap, topic_prefix + "x", "b", expect=2)
            assert [e["op"] for e in got] == ["r", "c"], got


def test_docs_list_every_cdc_metric_with_its_type() -> None:
    """docs/operations.md's cdc table names exactly the metrics cdc/metrics.py defines."""
    from cdc.metrics import REGISTRY

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    section = doc.split("### cdc\n", 1)[1].split("\n### ", 1)[0]
    documented = dict(re.findall(r"^\| `(fieldsync_cdc_\w+)` \| (\w+) \|", section, re.M))
    defined = {
        (f"{f.name}_total" if f.type == "counter" else f.name): f.type
        for f in REGISTRY.collect()
        if f.name.startswith("fieldsync_cdc_")
    }
    assert documented == defined
