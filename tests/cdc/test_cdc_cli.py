"""The ``fieldsync`` command line: every command's --help, and ``cdc status``.

Also holds the helpers other cdc tests use to run the real console script as
a subprocess (config file, environment, a daemon process that is always
killed at the end).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import typer.main
from typer.testing import CliRunner

from cdc.errors import parse_lsn
from fieldsync.cli import app
from tests.cdc.cdc_support import make_settings, running_daemon, table_events

REPO = Path(__file__).resolve().parents[2]
FIELDSYNC = Path(sys.executable).parent / "fieldsync"


# --------------------------------------------------------------------------- helpers for subprocess tests


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_config(path: Path, sections: dict[str, dict[str, object]]) -> Path:
    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def daemon_config(
    path: Path, *, dsn: str, bootstrap: str, prefix: str, slot: str, **overrides: dict[str, object]
) -> Path:
    """A cdc config for tests: quick retries and status updates, the given overrides merged in."""
    sections: dict[str, dict[str, object]] = {
        "postgres": {"dsn": dsn, "slot": slot, "status_interval_s": 1.0},
        "kafka": {"bootstrap_servers": bootstrap, "topic_prefix": prefix, "timeout_s": 10.0},
        "cdc": {
            "retry_backoff_initial_s": 0.2,
            "retry_backoff_max_s": 2.0,
            "log_level": "INFO",
            "metrics_listen": "127.0.0.1:0",
        },
    }
    for name, table in overrides.items():
        sections.setdefault(name, {}).update(table)
    return write_config(path, sections)


def cli_env() -> dict[str, str]:
    """The environment of a ``fieldsync`` subprocess: this source tree, no FIELDSYNC_* overrides."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FIELDSYNC_") and k != "NOTIFY_SOCKET"
    }
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    return env


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FIELDSYNC), *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
        cwd=REPO,
    )


class DaemonProcess:
    """``fieldsync cdc run --config FILE`` as a subprocess; stderr goes to a log file."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self) -> DaemonProcess:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(FIELDSYNC), "cdc", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=cli_env(),
                cwd=REPO,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_since_start(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def wait_log(self, needle: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_since_start():
                return
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"daemon did not log {needle!r} within {timeout}s (exit {self.proc and self.proc.poll()}); log:\n{self.log()[-4000:]}"
        )

    def wait_streaming(self, timeout: float = 90) -> None:
        self.wait_log("streaming slot", timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def daemon_process(tmp_path: Path) -> Iterator[Any]:
    """Factory of :class:`DaemonProcess` objects; every one is killed at teardown."""
    made: list[DaemonProcess] = []

    def make(config: Path) -> DaemonProcess:
        d = DaemonProcess(config, tmp_path / f"daemon-{len(made)}.log")
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.kill()


# --------------------------------------------------------------------------- --help everywhere


def command_paths(command: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path of a click command tree (typer ships its own click: duck-typed)."""
    yield prefix
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from command_paths(sub, (*prefix, name))


ALL_COMMANDS = list(command_paths(typer.main.get_command(app)))


def test_command_tree_is_walked() -> None:
    names = {" ".join(p) for p in ALL_COMMANDS}
    assert {"", "cdc", "cdc run", "cdc status", "demo"} <= names


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "fieldsync")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, (
        f"fieldsync {' '.join(path)} --help exited {result.exit_code}:\n{result.output}"
    )
    assert "Usage" in result.output


def test_console_script_help() -> None:
    """The installed ``fieldsync`` script itself starts and lists the cdc commands."""
    res = run_cli("cdc", "--help", timeout=30)
    assert res.returncode == 0, res.stderr
    assert "run" in res.stdout and "status" in res.stdout


# --------------------------------------------------------------------------- cdc status


def test_status_json_against_running_daemon(
    tmp_path: Path, pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    slot = "s_status_" + topic_prefix[-8:]
    config = daemon_config(
        tmp_path / "cdc.toml", dsn=pg_dsn, bootstrap=kafka_bootstrap, prefix=topic_prefix, slot=slot
    )
    settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix, postgres_slot=slot)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table t (id int primary key, v text)")
        with running_daemon(settings):
            conn.execute("insert into t values (1, 'a'), (2, 'b')")
            written_at = datetime.now(UTC)
            assert len(table_events(kafka_bootstrap, topic_prefix, "t", expect=2)) == 2
            res = run_cli("cdc", "status", "--json", "--config", str(config))
            row = conn.execute(
                "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = %s",
                (slot,),
            ).fetchone()
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["slot"] == slot and out["exists"] is True
    assert out["active"] is True, "status should show the running daemon's slot as active"
    assert row is not None and parse_lsn(out["confirmed_flush_lsn"]) <= parse_lsn(row[0])
    assert isinstance(out["lag_bytes"], int) and out["lag_bytes"] >= 0
    last = datetime.fromisoformat(out["last_event_time"].replace("Z", "+00:00"))
    assert abs((last - written_at).total_seconds()) < 10, (
        f"last event time {last} is not when the rows were written ({written_at})"
    )


def test_status_missing_slot_fails_clearly(
    tmp_path: Path, pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    config = daemon_config(
        tmp_path / "cdc.toml",
        dsn=pg_dsn,
        bootstrap=kafka_bootstrap,
        prefix=topic_prefix,
        slot="no_such_slot",
    )
    res = run_cli("cdc", "status", "--config", str(config))
    assert res.returncode != 0
    assert "no_such_slot" in res.stderr and "does not exist" in res.stderr, res.stderr


def test_run_stops_on_sigint(
    tmp_path: Path, pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, daemon_process: Any
) -> None:
    """Ctrl-C in a terminal stops the daemon like SIGTERM: exit 0, no traceback."""
    config = daemon_config(
        tmp_path / "cdc.toml",
        dsn=pg_dsn,
        bootstrap=kafka_bootstrap,
        prefix=topic_prefix,
        slot="s_sigint_" + topic_prefix[-8:],
    )
    d = daemon_process(config).start()
    d.wait_streaming()
    d.signal(signal.SIGINT)
    assert d.wait(60) == 0, d.log()[-3000:]
    assert "Traceback" not in d.log()
