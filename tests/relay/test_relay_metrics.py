"""The relay's metrics pieces on their own: consumer lag bookkeeping and its collector, the
applier's per-shard address, serving that goes on when the port is taken, the rate-limit
and auth-failure counters, ``/readyz``'s answers (real store and broker), and reading a
relay's endpoint from outside (``fieldsync status``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from typer.testing import CliRunner

from core.errors import ConfigError
from core.kafka_options import client_config
from core.metrics import serve_or_log
from relay.downstream.api_limits import RateLimiter
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.errors import MetricsUnavailable
from relay.metrics import (
    REGISTRY,
    ConsumerLag,
    LagCollector,
    local_metrics_url,
    read_connections,
)
from relay.readiness import BrokerProbe, EngineStatus, Readiness
from relay.upstream.applier_metrics import shard_listen

READY_KEYS = {"ready", "store", "broker", "engine", "engine_lag_s", "max_lag_s", "reasons"}


# --------------------------------------------------------------------------- consumer lag


def test_lag_follows_what_the_consumer_takes_applies_and_finds_at_the_end() -> None:
    lag = ConsumerLag()
    p0, p1 = ("t", 0), ("t", 1)
    lag.start({p0: 10})
    assert lag.active and lag.records() == {} and lag.seconds() == 0.0
    lag.saw_ends({p0: 15, p1: 4})
    assert lag.records() == {p0: 5, p1: 4}
    lag.received(1000.0)  # the oldest waiting record's event time
    assert lag.seconds(now=1030.0) == 30.0
    lag.applied({p0: 13}, 1010.0)  # the newest applied record's event time
    assert lag.records() == {p0: 2, p1: 4} and lag.seconds(now=1030.0) == 20.0
    lag.received(1020.0)  # not at the end meanwhile: still counted from the applied one
    assert lag.seconds(now=1030.0) == 20.0
    lag.applied({p0: 14}, None)  # no event time: keeps the previous
    assert lag.seconds(now=1030.0) == 20.0
    lag.at_end({p0: 16, p1: 4})
    assert lag.records() == {p0: 0, p1: 0} and lag.seconds(now=5000.0) == 0.0
    lag.received(4990.0)  # after the end, counted from the first waiting record
    assert lag.seconds(now=5000.0) == 10.0
    lag.stop()
    assert not lag.active


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["ends", "applied", "at_end"]),
            st.integers(0, 2),
            st.integers(0, 1000),
        ),
        max_size=30,
    )
)
def test_lag_records_are_never_negative_and_zero_at_the_end(
    steps: list[tuple[str, int, int]],
) -> None:
    lag = ConsumerLag()
    lag.start({})
    for what, partition, offset in steps:
        tp = ("t", partition)
        if what == "ends":
            lag.saw_ends({tp: offset})
        elif what == "applied":
            lag.applied({tp: offset}, float(offset))
        else:
            lag.at_end({tp: offset})
            assert lag.records()[tp] == 0 and lag.seconds() == 0.0
        assert all(n >= 0 for n in lag.records().values())


def test_the_collector_reads_the_leading_consumer_only() -> None:
    registry = CollectorRegistry()
    collector = LagCollector("fieldsync_test", "the test consumer", with_topic=True)
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert "# TYPE fieldsync_test_lag_records gauge" in text
    assert "\nfieldsync_test_lag_seconds " not in text  # no source: no samples
    lag = ConsumerLag()
    collector.source = lag
    lag.start({("fs.public.jobs", 0): 3})
    lag.saw_ends({("fs.public.jobs", 0): 5})
    text = generate_latest(registry).decode()
    assert 'fieldsync_test_lag_records{partition="0",topic="fs.public.jobs"} 2.0' in text
    assert "\nfieldsync_test_lag_seconds 0.0\n" in text
    lag.stop()  # standing by: no samples
    assert "fieldsync_test_lag_records{" not in generate_latest(registry).decode()


def test_the_relay_registry_defines_every_relay_metric() -> None:
    text = generate_latest(REGISTRY).decode()
    for name in (
        "fieldsync_relay_streams",
        "fieldsync_relay_long_polls",
        "fieldsync_relay_ops_written_total",
        "fieldsync_relay_ops_served_total",
        "fieldsync_relay_engine_lag_records",
        "fieldsync_relay_engine_lag_seconds",
        "fieldsync_relay_store_seconds",
        "fieldsync_relay_auth_failures_total",
        "fieldsync_relay_rate_limited_total",
        "fieldsync_relay_journal_entries_total",
    ):
        assert f"# HELP {name.removesuffix('_total')}" in text, name
    assert 'fieldsync_relay_journal_entries_total{status="rejected"}' in text
    assert "process_cpu_seconds_total" in text


# --------------------------------------------------------------------------- serving


def test_each_applier_shard_listens_on_its_own_port() -> None:
    assert shard_listen("127.0.0.1:9189", 0) == "127.0.0.1:9189"
    assert shard_listen("0.0.0.0:9189", 3) == "0.0.0.0:9192"
    assert shard_listen("127.0.0.1:0", 5) == "127.0.0.1:0"
    assert shard_listen("", 2) == ""
    with pytest.raises(ConfigError, match=r"journal\.applier_metrics_listen: .*past 65535"):
        shard_listen("127.0.0.1:65535", 1)


def test_a_taken_port_is_an_error_naming_the_setting_and_the_process_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = serve_or_log(
        "127.0.0.1:0", registry=CollectorRegistry(), setting="relay.metrics_listen"
    )
    assert first is not None
    try:
        taken = f"127.0.0.1:{first.address[1]}"
        with caplog.at_level(logging.ERROR, logger="fieldsync.metrics"):
            again = serve_or_log(
                taken, registry=CollectorRegistry(), setting="relay.metrics_listen"
            )
        assert again is None
        (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert "relay.metrics_listen: cannot listen on" in record.getMessage()
        assert "going on without metrics" in record.getMessage()
    finally:
        first.close()
    assert serve_or_log("", registry=CollectorRegistry(), setting="relay.metrics_listen") is None


def test_a_refused_request_counts_as_rate_limited() -> None:
    clock = [0.0]
    limiter = RateLimiter(1.0, 2, clock=lambda: clock[0])

    def refused() -> float | None:
        return REGISTRY.get_sample_value("fieldsync_relay_rate_limited_total")

    before = refused()
    assert before is not None
    assert limiter.check("tab-1") == 0.0 and limiter.check("tab-1") == 0.0
    assert refused() == before
    assert limiter.check("tab-1") > 0
    assert limiter.check("tab-2") == 0.0
    assert refused() == before + 1


# --------------------------------------------------------------------------- readiness


@pytest.fixture
def store(pg_dsn: str) -> Iterator[PgBucketStore]:
    s = PgBucketStore(pg_dsn)
    s.migrate()
    try:
        yield s
    finally:
        s.close()


def ready_app(store: Any, broker: BrokerProbe, engine: EngineStatus) -> FastAPI:
    app = FastAPI()
    app.include_router(Readiness(store, broker, lambda: engine, 30.0).router())
    return app


def test_readyz_when_everything_answers_and_the_engine_is_caught_up(
    store: PgBucketStore, kafka_bootstrap: str
) -> None:
    probe = BrokerProbe(client_config(kafka_bootstrap, timeout_s=10))
    try:
        for engine, shown in (
            (("leading", 1.5), "caught_up"),
            (("standby", None), "standby"),
            (("off", None), "off"),
        ):
            with TestClient(ready_app(store, probe, engine)) as client:
                r = client.get("/readyz")
            assert r.status_code == 200, r.text
            assert r.json() == {
                "ready": True,
                "store": "ok",
                "broker": "ok",
                "engine": shown,
                "engine_lag_s": engine[1],
                "max_lag_s": 30.0,
                "reasons": [],
            }
    finally:
        probe.close()


def test_readyz_names_each_reason_to_refuse_traffic(
    pg_dsn: str, store: PgBucketStore, kafka_bootstrap: str
) -> None:
    probe = BrokerProbe(client_config(kafka_bootstrap, timeout_s=10))
    nobody = BrokerProbe(client_config("127.0.0.1:1", timeout_s=2))
    bad = PgBucketStore(psycopg.conninfo.make_conninfo(pg_dsn, port=1), connect_timeout=1)
    try:
        with TestClient(ready_app(store, probe, ("leading", 42.0))) as client:
            r = client.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert set(body) == READY_KEYS and body["engine"] == "behind"
        assert body["reasons"] == [
            "engine: 42.0 s behind the change topics (relay.ready_max_lag_s = 30)"
        ]
        with TestClient(ready_app(bad, nobody, ("standby", None))) as client:
            r = client.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert (body["ready"], body["store"], body["broker"]) == (
            False,
            "unreachable",
            "unreachable",
        )
        assert [x.split(":")[0] for x in body["reasons"]] == ["store", "broker"]
        assert "cannot connect to the bucket store" in body["reasons"][0]
    finally:
        bad.close()
        nobody.close()
        probe.close()


def test_an_applier_shard_past_the_last_port_is_a_configuration_error(tmp_path: Path) -> None:
    from relay.upstream.applier_cli import app

    config = tmp_path / "relay.toml"
    config.write_text(
        '[relay]\nsource_dsn = "postgresql://fieldsync@127.0.0.1:1/app"\n'
        '[journal]\nshards = 2\napplier_metrics_listen = "127.0.0.1:65535"\n'
    )
    result = CliRunner().invoke(app, ["--config", str(config), "--shard", "1"])
    assert result.exit_code == 2, result.output
    assert "journal.applier_metrics_listen: '127.0.0.1:65535' gives shard 1 port 65536" in (
        result.output
    )


# --------------------------------------------------------------------------- reading a relay's endpoint


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("127.0.0.1:9188", "http://127.0.0.1:9188"),
        ("0.0.0.0:9188", "http://127.0.0.1:9188"),
        (":9188", "http://127.0.0.1:9188"),
        ("[::]:9188", "http://[::1]:9188"),
        ("relay-1.internal:9300", "http://relay-1.internal:9300"),
        ("", None),
        ("127.0.0.1:0", None),
    ],
)
def test_the_url_to_scrape_follows_metrics_listen(listen: str, url: str | None) -> None:
    assert local_metrics_url(listen) == url


def test_connections_are_read_from_a_relay_endpoint_and_a_wrong_one_is_named() -> None:
    registry = CollectorRegistry()
    streams = Gauge("fieldsync_relay_streams", "s", registry=registry)
    polls = Gauge("fieldsync_relay_long_polls", "p", registry=registry)
    streams.set(3)
    polls.set(2)
    server = serve_or_log("127.0.0.1:0", registry=registry, setting="relay.metrics_listen")
    assert server is not None
    try:
        found = read_connections(server.url)
        assert (found.streams, found.long_polls) == (3, 2)
        assert found.url == f"{server.url}/metrics"
        assert read_connections(f"{server.url}/metrics/").streams == 3
    finally:
        server.close()
    other = serve_or_log("127.0.0.1:0", registry=CollectorRegistry(), setting="x")
    assert other is not None
    try:
        with pytest.raises(MetricsUnavailable, match="is it a relay's metrics endpoint"):
            read_connections(other.url)
    finally:
        other.close()
    with pytest.raises(MetricsUnavailable, match=f"{other.url}/metrics"):
        read_connections(other.url, timeout_s=2)
