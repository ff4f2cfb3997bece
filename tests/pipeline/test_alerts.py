"""config/prometheus/alerts.yml: every example alert is complete and uses only metrics the
code defines.

The names come from the processes' registries (cdc/metrics.py, relay/metrics.py,
relay/upstream/applier_metrics.py).  Where ``promtool`` is installed, it checks the rules
and the compose Prometheus configuration as well."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from cdc.metrics import REGISTRY as CDC_REGISTRY
from relay.metrics import REGISTRY as RELAY_REGISTRY
from relay.upstream.applier_metrics import REGISTRY as APPLIER_REGISTRY

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
PROMETHEUS = ROOT / "compose" / "prometheus" / "prometheus.yml"
SEVERITIES = {"info", "warning", "critical"}


def series_names(kind: str, name: str) -> set[str]:
    """The series names a metric of ``kind`` is exposed as."""
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    if kind == "counter":
        return {name if name.endswith("_total") else f"{name}_total"}
    return {name}


def registry_series(registry: CollectorRegistry) -> set[str]:
    return {n for family in registry.collect() for n in series_names(family.type, family.name)}


def defined_series() -> set[str]:
    registries = (CDC_REGISTRY, RELAY_REGISTRY, APPLIER_REGISTRY)
    return {name for registry in registries for name in registry_series(registry)}


def alert_rules() -> list[dict[str, Any]]:
    spec = yaml.safe_load(ALERTS.read_text())
    rules = [rule for group in spec["groups"] for rule in group["rules"]]
    assert rules, "no alerts"
    return rules


def test_every_alert_is_complete() -> None:
    seen: set[str] = set()
    for rule in alert_rules():
        name = rule.get("alert")
        assert isinstance(name, str) and name not in seen, rule
        seen.add(name)
        assert isinstance(rule.get("expr"), str) and rule["expr"].strip(), name
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: for"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
        assert rule.get("annotations", {}).get("summary"), f"{name}: summary"
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), name


def test_every_metric_an_alert_uses_is_defined() -> None:
    defined = defined_series()
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for metric in re.findall(r"\bfieldsync_[a-z0-9_]+", rule["expr"]):
            used.setdefault(metric, set()).add(rule["alert"])
    unknown = {m: sorted(a) for m, a in used.items() if m not in defined}
    assert not unknown, f"alerts use metrics nobody defines: {unknown}"
    # the alerts the operations issue asks for are there
    assert {
        "fieldsync_cdc_replication_lag_seconds",
        "fieldsync_cdc_slot_retained_wal_bytes",
        "fieldsync_cdc_slot_safe_wal_size_bytes",
        "fieldsync_cdc_slot_wal_status",
        "fieldsync_cdc_kafka_errors_total",
        "fieldsync_relay_engine_lag_seconds",
        "fieldsync_relay_auth_failures_total",
        "fieldsync_applier_lag_records",
        "fieldsync_applier_entries_total",
        "fieldsync_applier_entries_waiting",
    } <= set(used)
    lost = [r for r in alert_rules() if 'fieldsync_cdc_slot_wal_status{status="lost"}' in r["expr"]]
    assert lost and lost[0]["labels"]["severity"] == "critical"


def test_the_check_finds_an_unknown_metric() -> None:
    assert "fieldsync_relay_ops_written_total" in defined_series()
    assert "fieldsync_relay_store_seconds_bucket" in defined_series()
    assert "fieldsync_applier_lag_seconds" in defined_series()
    assert "fieldsync_cdc_commit_to_ack_seconds_bucket" in defined_series()
    assert "fieldsync_cdc_slot_wal_status" in defined_series()
    assert "fieldsync_relay_ops_writen_total" not in defined_series()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules_and_the_compose_configuration(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None
    rules = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = yaml.safe_load(PROMETHEUS.read_text())
    config["rule_files"] = [str(ALERTS)]  # where compose mounts it, here
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    checked = subprocess.run(
        [promtool, "check", "config", str(local)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
