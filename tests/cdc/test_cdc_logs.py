"""`fieldsync cdc run` logs in both formats at DEBUG: JSON lines with component, slot,
position and table; no planted secret (DSN password, the postgres.password setting) in
any line, on the failing path (a database that cannot be reached) or the working one.
Real PostgreSQL and broker; the daemon runs as a process."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.cdc.test_cdc_cli import DaemonProcess, daemon_config, daemon_process
from tests.core.log_support import assert_no_secrets, json_lines

__all__ = ["daemon_process"]  # the fixture, imported to be used here


def uri_with_password(dsn: str, password: str, **override: Any) -> str:
    """*dsn* as a ``postgresql://user:password@/db?host=..&port=..`` URI."""
    p = {**conninfo_to_dict(dsn), **override}
    return (
        f"postgresql://{quote(str(p.get('user', 'postgres')))}:{password}@/"
        f"{quote(str(p['dbname']))}?host={quote(str(p.get('host', '127.0.0.1')))}"
        f"&port={p.get('port', 5432)}"
    )


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_cdc_run_logs_in_the_chosen_format_without_secrets(
    fmt: str,
    tmp_path: Path,
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    daemon_process: Any,
) -> None:
    dsn_secret = f"PlantedDsnPw{uuid.uuid4().hex[:10]}"
    setting_secret = f"PlantedPgPw{uuid.uuid4().hex[:10]}"
    slot = "s_logs_" + topic_prefix[-8:]
    # the URI form on one run, key=value on the other
    dsn = (
        uri_with_password(pg_dsn, dsn_secret)
        if fmt == "text"
        else make_conninfo(pg_dsn, password=dsn_secret)
    )
    logs = {"log_level": "DEBUG", "log_format": fmt}

    # the failing path: nothing listens there, the daemon keeps retrying and says why
    unreachable = make_conninfo(pg_dsn, port=1, password=dsn_secret, connect_timeout=2)
    failing: DaemonProcess = daemon_process(
        daemon_config(
            tmp_path / "cdc-down.toml",
            dsn=unreachable,
            bootstrap=kafka_bootstrap,
            prefix=topic_prefix,
            slot=slot,
            cdc=logs,
            postgres={"password": setting_secret},
        )
    ).start()
    failing.wait_log("retrying in", timeout=60)
    failing.signal(signal.SIGTERM)
    assert failing.wait(30) == 0, failing.log()[-3000:]

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table t (id int primary key, v text)")
        conn.execute("insert into t values (1, 'before')")
    daemon: DaemonProcess = daemon_process(
        daemon_config(
            tmp_path / "cdc.toml",
            dsn=dsn,
            bootstrap=kafka_bootstrap,
            prefix=topic_prefix,
            slot=slot,
            cdc=logs,
            postgres={"password": setting_secret, "tables": ["public.t"]},
        )
    ).start()
    daemon.wait_streaming()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("insert into t values (2, 'after')")
    daemon.wait_log("kafka commit", timeout=60)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.log()[-3000:]

    text = failing.log() + daemon.log()
    assert_no_secrets(text, [dsn_secret, setting_secret])
    assert "postgres" in text and "***" in text  # the settings line, masked
    if fmt == "text":
        assert not any(line.startswith("{") for line in text.splitlines())
        assert "INFO fieldsync.cdc: settings: {" in text
        return
    lines = json_lines(text, "cdc")
    assert all(line["slot"] == slot for line in lines)
    assert any("retrying in" in line["message"] for line in lines)
    by_start = {line["message"].split(":")[0]: line for line in lines}
    assert by_start["kafka commit"]["position"].count("/") == 1
    created = next(line for line in lines if line["message"].startswith("created slot"))
    assert created["position"] in created["message"]
    snap = next(line for line in lines if line["message"].startswith("snapshot of public.t"))
    assert snap["table"] == "public.t"
    stopped = next(line for line in lines if line["message"].startswith("stopped; slot"))
    assert stopped["position"] in stopped["message"]
    # a line about no transaction or table carries neither field
    settings_line = next(line for line in lines if line["message"].startswith("settings:"))
    assert "position" not in settings_line and "table" not in settings_line
    # masking keeps the rest of a message intact: the settings are still JSON
    shown = json.loads(settings_line["message"].removeprefix("settings: "))
    assert "password=***" in shown["postgres"]["dsn"] and shown["postgres"]["password"] == "***"
    assert shown["postgres"]["slot"] == slot and shown["cdc"]["log_format"] == "json"
