"""compose/: what can be checked without Docker (which does not run here).

Every fieldsync service's command exists with the options it passes; every settings file
loads with the environment compose gives it; the tables initdb creates on a real
PostgreSQL satisfy the mounted rules and conflict policies (checked the way the applier
checks them at start-up); the mounts point at files that exist; Prometheus scrapes each
fieldsync service where its settings make it listen, and loads the example alerts
(their contents: tests/pipeline/test_alerts.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from cdc.settings import load_cdc_settings
from core.metrics import parse_listen
from relay.auth_keys import KeyStore
from relay.settings import load_applier_settings, load_relay_settings
from relay.upstream.applier_db import ApplierDb
from relay.upstream.applier_metrics import shard_listen
from tests.schemas import COMPOSE

SPEC: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
FIELDSYNC = ("cdc", "relay", "applier")


def environment(service: str) -> dict[str, str]:
    """The service's environment with compose's ${VAR:-default} / ${VAR:?msg} resolved."""
    out = {}
    for key, value in SPEC["services"][service].get("environment", {}).items():
        value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))
        out[key] = re.sub(r"\$\{\w+:\?[^}]*\}", "s" * 40, value)
    return out


def mounts(service: str) -> dict[str, Path]:
    """Container path -> local path of the service's bind mounts."""
    out = {}
    for volume in SPEC["services"][service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (COMPOSE / source).resolve()
    return out


def local(service: str, container_path: str) -> Path:
    """The local file a container path of ``service`` is, through its mounts."""
    best = max(
        (t for t in mounts(service) if container_path == t or container_path.startswith(t + "/")),
        key=len,
    )
    path = mounts(service)[best] / container_path[len(best) :].lstrip("/")
    assert path.exists(), f"{service}: {container_path} -> {path} does not exist"
    return path


def config_arg(service: str) -> Path:
    command = SPEC["services"][service]["command"]
    return local(service, command[command.index("--config") + 1])


def test_services_and_postgres_is_logical() -> None:
    assert set(SPEC["services"]) == {"postgres", "kafka", "prometheus", *FIELDSYNC}
    assert "wal_level=logical" in SPEC["services"]["postgres"]["command"]
    for name in FIELDSYNC:
        assert SPEC["services"][name]["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", FIELDSYNC)
def test_commands_exist_with_their_options(service: str) -> None:
    command = SPEC["services"][service]["command"]
    assert command[0] == "fieldsync"
    words = [w for w in command[1:3] if not w.startswith("-") and "/" not in w]
    res = subprocess.run(
        [sys.executable, "-m", "fieldsync.cli", *words, "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    for option in (w for w in command if w.startswith("--")):
        assert option in res.stdout, f"{' '.join(words)} has no option {option}"


def test_settings_files_load_with_the_compose_environment() -> None:
    cdc = load_cdc_settings(config_arg("cdc"), environment("cdc"))
    assert cdc.postgres.dsn.startswith("postgresql://fieldsync@postgres:")
    assert cdc.kafka.bootstrap_servers == "kafka:9092"
    assert cdc.cdc.state_dir in mounts("cdc") or cdc.cdc.state_dir == "/var/lib/fieldsync"
    relay = load_relay_settings(config_arg("relay"), environment("relay"))
    applier = load_applier_settings(config_arg("applier"), environment("applier"))
    assert relay.relay.topic_prefix == cdc.kafka.topic_prefix == applier.relay.topic_prefix
    assert relay.http.host == "0.0.0.0" and relay.http.port == 8470
    assert SPEC["services"]["relay"]["ports"] == [f"127.0.0.1:{relay.http.port}:8470"]
    keys = KeyStore.from_file(local("relay", relay.auth.keys_file), environment("relay"))
    assert keys.current is not None


def test_initdb_schema_satisfies_the_mounted_rules_and_policies(pg_dsn: str) -> None:
    sql = (COMPOSE / "initdb" / "01-fieldsync.sql").read_text()
    statements = [s for s in sql.split(";") if s.strip() and "create database" not in s]
    assert "create database fieldsync_relay" in sql  # the store's own database
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]
    settings = load_applier_settings(config_arg("applier"), environment("applier"))
    db = ApplierDb(
        pg_dsn,
        local("applier", settings.relay.rules),
        local("applier", settings.journal.conflicts or ""),
    )
    db.connect()  # loads the rules and policies against the catalog, as the applier does
    try:
        assert db.rules is not None and "public.work_orders" in db.rules.tables
    finally:
        db.close()


def metrics_address(service: str) -> tuple[str, int]:
    """Where ``service`` serves its metrics, by its settings and compose's environment."""
    if service == "cdc":
        listen = load_cdc_settings(config_arg("cdc"), environment("cdc")).cdc.metrics_listen
    elif service == "relay":
        listen = load_relay_settings(config_arg("relay"), environment("relay")).relay.metrics_listen
    else:
        command = SPEC["services"]["applier"]["command"]
        shard = int(command[command.index("--shard") + 1])
        settings = load_applier_settings(config_arg("applier"), environment("applier"))
        listen = shard_listen(settings.journal.applier_metrics_listen, shard)
    address = parse_listen(listen)
    assert address is not None, f"{service}: metrics are off"
    return address


def test_prometheus_scrapes_every_service_where_it_listens_and_loads_the_alerts() -> None:
    prometheus = SPEC["services"]["prometheus"]
    config_path = local("prometheus", "/etc/prometheus/prometheus.yml")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load(config_path.read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    for service in FIELDSYNC:
        host, port = metrics_address(service)
        assert host == "0.0.0.0", f"{service}: metrics must listen beyond the container"
        assert targets[f"fieldsync-{service}"] == [f"{service}:{port}"], targets
    for rules in config["rule_files"]:
        alerts = local("prometheus", rules)
        assert alerts.resolve() == (COMPOSE.parent / "config" / "prometheus" / "alerts.yml")
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"]


def test_the_image_holds_every_package_the_distribution_installs() -> None:
    import tomllib

    pyproject = tomllib.loads((COMPOSE.parent / "pyproject.toml").read_text())
    packages = [
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    missing = [p for p in packages if f"COPY {p} ./{p}\n" not in dockerfile]
    assert packages and not missing, f"compose/Dockerfile copies none of {missing}"
