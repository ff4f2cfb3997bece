"""core.metrics: the exposition endpoint every server process runs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from core.errors import ConfigError
from core.metrics import parse_listen, serve_metrics


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_metrics_and_readiness_are_served() -> None:
    registry = CollectorRegistry()
    counter = Counter("fieldsync_test_things_total", "things", registry=registry)
    state = {"ok": False}
    server = serve_metrics(
        "127.0.0.1:0", registry=registry, ready=lambda: (state["ok"], {"store": "down"})
    )
    assert server is not None
    try:
        counter.inc(3)
        status, body = _get(server.url + "/metrics")
        assert status == 200 and b"fieldsync_test_things_total 3.0" in body
        status, body = _get(server.url + "/readyz")
        assert status == 503 and json.loads(body) == {"ready": False, "store": "down"}
        state["ok"] = True
        status, body = _get(server.url + "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        assert _get(server.url + "/other")[0] == 404
    finally:
        server.close()


def test_a_failing_readiness_check_is_not_ready_with_its_reason() -> None:
    def broken() -> tuple[bool, dict[str, str]]:
        raise RuntimeError("store unreachable")

    server = serve_metrics("127.0.0.1:0", registry=CollectorRegistry(), ready=broken)
    assert server is not None
    try:
        status, body = _get(server.url + "/readyz")
        assert status == 503 and "store unreachable" in json.loads(body)["error"]
    finally:
        server.close()


def test_off_when_empty_and_errors_name_the_setting() -> None:
    assert serve_metrics("") is None
    assert parse_listen("") is None
    assert parse_listen("0.0.0.0:9187") == ("0.0.0.0", 9187)
    with pytest.raises(ConfigError, match=r"cdc\.metrics_listen: 'nonsense' is not host:port"):
        serve_metrics("nonsense", setting="cdc.metrics_listen")
    first = serve_metrics("127.0.0.1:0", registry=CollectorRegistry())
    assert first is not None
    try:
        taken = f"127.0.0.1:{first.address[1]}"
        with pytest.raises(ConfigError, match=r"relay\.metrics_listen: cannot listen on"):
            serve_metrics(taken, registry=CollectorRegistry(), setting="relay.metrics_listen")
    finally:
        first.close()
