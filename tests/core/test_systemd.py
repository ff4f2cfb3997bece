"""Tests of core.systemd_notify (against real AF_UNIX datagram sockets) and the systemd unit."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.systemd_notify import Notifier, notify_address, watchdog_interval
from tests.schemas import CONFIG

UNIT = CONFIG / "systemd" / "fieldsync-cdc.service"
UNIT_EXEC = "/opt/fieldsync/.venv/bin/fieldsync"

# ---------------------------------------------------------------------------
# sd_notify client
# ---------------------------------------------------------------------------


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket and the NOTIFY_SOCKET value that names it."""
    if request.param == "path":
        path = tmp_path / "notify.sock"
        sock = _receiver(str(path))
        value = str(path)
    else:
        name = f"fieldsync-test-{uuid.uuid4().hex}"
        sock = _receiver(b"\0" + name.encode())
        value = "@" + name
    try:
        yield value, sock
    finally:
        sock.close()


def _recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_messages_reach_the_socket(listener: tuple[str, socket.socket]) -> None:
    value, sock = listener
    with Notifier.from_env({"NOTIFY_SOCKET": value}) as notifier:
        assert notifier.enabled
        assert notifier.ready("streaming slot fieldsync")
        assert _recv(sock) == ["READY=1", "STATUS=streaming slot fieldsync"]
        assert notifier.status("lag 0 bytes")
        assert _recv(sock) == ["STATUS=lag 0 bytes"]
        assert notifier.watchdog()
        assert _recv(sock) == ["WATCHDOG=1"]
        assert notifier.stopping()
        assert _recv(sock) == ["STOPPING=1"]
        assert notifier.extend_timeout(1.5)
        assert _recv(sock) == ["EXTEND_TIMEOUT_USEC=1500000"]
        assert notifier.reloading()
        reloading = _recv(sock)
        assert reloading[0] == "RELOADING=1"
        assert re.fullmatch(r"MONOTONIC_USEC=\d+", reloading[1])


def test_ready_without_status(listener: tuple[str, socket.socket]) -> None:
    value, sock = listener
    with Notifier.from_env({"NOTIFY_SOCKET": value}) as notifier:
        notifier.ready()
        assert _recv(sock) == ["READY=1"]


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=200))
def test_status_is_always_one_line(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    """Whatever the text (newlines, NUL, lone surrogates), STATUS= is one valid line."""
    path = tmp_path_factory.mktemp("sd") / "n.sock"
    with _receiver(str(path)) as sock, Notifier(notify_address(str(path))) as notifier:
        assert notifier.ready(text)
        data = sock.recv(4096)
        assert b"\0" not in data
        lines = data.decode("utf-8").split("\n")  # valid UTF-8, or this raises
        assert len(lines) == 2
        assert lines[0] == "READY=1"
        expected = " ".join(text.replace("\0", " ").splitlines())
        assert lines[1] == "STATUS=" + expected.encode("utf-8", "replace").decode()


def test_not_under_systemd_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None
    assert notifier._sock is None  # no socket was even created


def test_send_failure_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="core.systemd_notify")
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert notifier.enabled
    assert notifier.watchdog() is False
    assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # repeated failures are not logged at warning level again
    assert "WATCHDOG=1" in warnings[0].getMessage()
    # once the socket exists again, sending works and says so
    with _receiver(str(tmp_path / "nobody-listens.sock")) as sock:
        assert notifier.watchdog()
        assert _recv(sock) == ["WATCHDOG=1"]
    assert any("works again" in r.getMessage() for r in caplog.records)
    notifier.close()


def test_invalid_assignments_are_programming_errors(tmp_path: Path) -> None:
    notifier = Notifier(notify_address(str(tmp_path / "n.sock")))
    with pytest.raises(ValueError):
        notifier.notify("READY")
    with pytest.raises(ValueError):
        notifier.notify("STATUS=a\nREADY=1")


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("/run/systemd/notify", b"/run/systemd/notify"),
        ("@name", b"\0name"),
        ("", None),
        (None, None),
        ("@", None),
        ("relative/path", None),
        ("vsock:2:1234", None),
    ],
)
def test_notify_address(value: str | None, address: bytes | None) -> None:
    assert notify_address(value) == address


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "abc"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def test_watchdog_interval_needs_the_socket_too(tmp_path: Path) -> None:
    env = {"WATCHDOG_USEC": "2000000", "NOTIFY_SOCKET": str(tmp_path / "n.sock")}
    assert Notifier.from_env(env).watchdog_interval() == 1.0
    assert Notifier.from_env({"WATCHDOG_USEC": "2000000"}).watchdog_interval() is None


def test_unset_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_env(unset_environment=True)
    assert notifier.enabled and notifier.watchdog_interval() == 2.0
    assert "NOTIFY_SOCKET" not in os.environ
    assert "WATCHDOG_USEC" not in os.environ and "WATCHDOG_PID" not in os.environ


# ---------------------------------------------------------------------------
# The unit file
# ---------------------------------------------------------------------------


def _directives(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_has_the_required_directives() -> None:
    unit = _directives(UNIT.read_text())
    service = {k: v[-1] for k, v in unit["Service"].items()}
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "90",
        "Restart": "on-failure",
        "RestartSec": "5",
        "ExecStart": f"{UNIT_EXEC} cdc run --config /etc/fieldsync/cdc.toml",
        "User": "fieldsync",
        "EnvironmentFile": "-/etc/fieldsync/cdc.env",
        "TimeoutStopSec": "60",
        "KillSignal": "SIGTERM",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "StateDirectory": "fieldsync",
        "RestartPreventExitStatus": "2 3",  # configuration error, lost slot
    }
    assert {k: service.get(k) for k in expected} == expected
    assert unit["Unit"]["After"] == ["network-online.target postgresql.service"]
    assert unit["Unit"]["Wants"] == ["network-online.target"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)
# A line about another unit: "other.service: ..." or a path outside our copy.
_OTHER_UNIT = re.compile(
    r"^(?:/\S*/)?(?P<unit>[\w@.\\-]+\.(?:service|socket|target|mount|automount|swap|path|timer|slice|scope|device))[:\s]"
)


def _verify(unit_text: str, directory: Path, name: str = UNIT.name) -> tuple[list[str], list[str]]:
    """Run systemd-analyze verify on a copy named ``name``; return (lines about our unit,
    lines about others)."""
    assert SYSTEMD_ANALYZE is not None
    assert unit_text.count(f"ExecStart={UNIT_EXEC} ") == 1
    # verify rejects a missing binary; point ExecStart at one that exists, keep the rest.
    text = unit_text.replace(f"ExecStart={UNIT_EXEC} ", f"ExecStart={sys.executable} ")
    path = directory / name
    path.write_text(text)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "cat"},
        check=False,
    )
    ours, others = _classify((proc.stdout + proc.stderr).splitlines(), directory, name)
    if proc.returncode != 0 and not ours:
        ours.append(f"systemd-analyze exited with {proc.returncode}")
    return ours, others


def _classify(
    lines: list[str], directory: Path, name: str = UNIT.name
) -> tuple[list[str], list[str]]:
    """Split output lines into those about our unit (or unclear) and those about other units."""
    ours: list[str] = []
    others: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        match = _OTHER_UNIT.match(line)
        about_other = (
            match is not None
            and match.group("unit") != name
            and str(directory) not in line
            and name.rsplit(".", 1)[0] not in line
        )
        (others if about_other else ours).append(line)
    return ours, others


def test_classify_keeps_unclear_lines_as_ours(tmp_path: Path) -> None:
    lines = [
        f"{tmp_path}/fieldsync-cdc.service:7: Failed to parse service type, ignoring: notifyy",
        "fieldsync-cdc.service: Command /x is not executable: No such file or directory",
        "/lib/systemd/system/postgresql.service:5: Unknown key 'Foo' in section [Service]",
        "network-online.target: some complaint",
        "Failed to do something general",
        "",
    ]
    ours, others = _classify(lines, tmp_path)
    assert ours == [lines[0], lines[1], lines[4]]
    assert others == [lines[2], lines[3]]


@needs_systemd_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    ours, others = _verify(UNIT.read_text(), tmp_path)
    assert ours == [], (
        f"systemd-analyze verify complains: {ours}\n(lines about other units: {others})"
    )


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("original", "broken", "reported"),
    [
        ("Type=notify", "Type=notifyy", "notifyy"),
        ("ProtectSystem=strict", "ProtectSytem=strict", "ProtectSytem"),
        ("WatchdogSec=90", "WatchdogSec=thirty", "thirty"),
    ],
)
def test_systemd_analyze_check_catches_broken_units(
    tmp_path: Path, original: str, broken: str, reported: str
) -> None:
    text = UNIT.read_text()
    assert f"\n{original}\n" in text
    ours, _ = _verify(text.replace(f"\n{original}\n", f"\n{broken}\n"), tmp_path)
    assert any(reported in line for line in ours), ours


# The relay and the applier (a template: one instance per shard), checked the same way.
OTHER_UNITS = {
    "fieldsync-relay.service": (
        "fieldsync-relay.service",
        f"{UNIT_EXEC} relay run --config /etc/fieldsync/relay.toml",
        "notify",
    ),
    "fieldsync-applier@.service": (
        "fieldsync-applier@0.service",
        f"{UNIT_EXEC} relay applier --config /etc/fieldsync/relay.toml --shard %i",
        "simple",
    ),
}


@pytest.mark.parametrize("file", sorted(OTHER_UNITS))
def test_relay_and_applier_units_have_the_required_directives(file: str) -> None:
    _, exec_start, kind = OTHER_UNITS[file]
    unit = _directives((UNIT.parent / file).read_text())
    service = {k: v[0] for k, v in unit["Service"].items()}
    assert service["ExecStart"] == exec_start
    assert service["Type"] == kind
    assert service["RestartPreventExitStatus"] == "2"  # configuration errors are not retried
    assert service["User"] == "fieldsync" and service["KillSignal"] == "SIGTERM"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@needs_systemd_analyze
@pytest.mark.parametrize("file", sorted(OTHER_UNITS))
def test_relay_and_applier_units_verify_clean(tmp_path: Path, file: str) -> None:
    name = OTHER_UNITS[file][0]
    ours, others = _verify((UNIT.parent / file).read_text(), tmp_path, name)
    assert ours == [], f"systemd-analyze verify complains: {ours}\n(other units: {others})"
    broken = (UNIT.parent / file).read_text().replace("Restart=on-failure", "Restart=sometimes")
    ours, _ = _verify(broken, tmp_path, name)
    assert any("sometimes" in line for line in ours), ours
