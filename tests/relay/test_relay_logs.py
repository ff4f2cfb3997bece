"""`fieldsync relay run` and `fieldsync relay applier` log in both formats at DEBUG: JSON
lines with component, request id and device (relay), device and table (applier); no
planted secret in any line: DSN passwords, the password settings, the keys file's HS256
secret, bearer tokens of failing requests (header and query), a WebSocket's token.  Real
PostgreSQL (and broker for the applier); the processes run as processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from core.hlc import Hlc
from core.values import dump_json
from relay.auth import issue_token
from relay.auth_keys import KeyStore
from relay.downstream.api_context import request_id_of
from tests.cdc.test_cdc_logs import uri_with_password
from tests.core.log_support import assert_no_secrets, json_lines

ROOT = Path(__file__).resolve().parents[2]
RULES = """
token_claims = ["technician"]

[[bucket]]
name = "tech"
parameters = ["t"]
claims = { t = "technician" }

[[bucket.table]]
table = "public.work_orders"
match = { technician = "t" }

[[bucket]]
name = "net"

[[bucket.table]]
table = "public.hosts"
"""
TABLES = (
    "create table work_orders (id int primary key, technician text, notes text);"
    "create table hosts (addr inet primary key, label text);"
)


def secret(name: str) -> str:
    return f"Planted{name}{uuid.uuid4().hex[:12]}"


class Proc:
    """A ``fieldsync`` sub-command as a process, its output (both streams) in a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log_path = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fieldsync.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={k: v for k, v in os.environ.items() if not k.startswith("FIELDSYNC_")},
            )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 90) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.text()}"
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.text()[-4000:]}")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(60) == 0, self.text()[-4000:]
        return self.text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in started:
            p.kill()


def planted_dsn(dsn: str, password: str, fmt: str) -> str:
    """The URI form for the text run, key=value for the JSON run."""
    if fmt == "text":
        return uri_with_password(dsn, password)
    return make_conninfo(dsn, password=password)


# ----------------------------------------------------------------------------- relay run


def _requests(base: str, ws_base: str, token: str, forged: str) -> dict[str, str]:
    """The requests of the test; returns the request id each response carried."""
    ids: dict[str, str] = {}
    r = httpx.get(f"{base}/healthz", headers={"X-Request-ID": "client-req-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-req-1"
    ids["healthz"] = r.headers["x-request-id"]
    r = httpx.get(
        f"{base}/v1/changes",
        headers={"Authorization": f"Bearer {token}", "X-Request-ID": "not sane {id}"},
    )
    assert r.status_code == 200, r.text
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), r.headers
    ids["changes"] = r.headers["x-request-id"]
    for bad in (forged, "PlantedOpaque" + "x" * 20):  # failing requests carrying a token
        r = httpx.get(f"{base}/v1/changes", headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401 and r.headers["x-request-id"]
    r = httpx.get(f"{base}/v1/changes", params={"token": token})  # HTTP takes no query token
    assert r.status_code == 401
    with ws_connect(
        f"{ws_base}/v1/stream", additional_headers={"Authorization": f"Bearer {forged}"}
    ) as ws:
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=30)
    with ws_connect(f"{ws_base}/v1/stream?token={token}") as ws:
        assert ws.response is not None
        ids["stream"] = ws.response.headers["x-request-id"]
        assert json.loads(ws.recv(timeout=30))["checkpoint"]["complete"]
    return ids


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("client-req-1", True),
        ("0f8fa5c2-7a1b-4c55-9e3d-2b6f1d7c9a10", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("-starts-with-a-dash", False),
        ("has space", False),
        ("new\nline", False),
        ("", False),
    ],
)
def test_a_request_id_is_the_clients_only_when_sane(given: str, kept: bool) -> None:
    scope = {"type": "http", "headers": [(b"x-request-id", given.encode())]}
    made = request_id_of(scope)
    assert (made == given) is kept
    if not kept:
        assert re.fullmatch(r"[0-9a-f]{32}", made) and made != request_id_of(scope)
    assert re.fullmatch(r"[0-9a-f]{32}", request_id_of({"type": "http", "headers": []}))


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_relay_run_logs_without_secrets(
    fmt: str, tmp_path: Path, pg_dsn: str, procs: list[Proc]
) -> None:
    planted = {n: secret(n) for n in ("StoreDsn", "StorePw", "SourcePw", "HmacKey")}
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(TABLES)
        conn.execute("insert into work_orders values (1, 't1', 'first')")
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'current = "k1"\n[[key]]\nkid = "k1"\nalg = "HS256"\n'
        f'secret = "{planted["HmacKey"]}-padding-to-32-bytes"\n'
    )
    keys.chmod(0o600)
    (tmp_path / "rules.toml").write_text(RULES)
    config = tmp_path / "relay.toml"
    config.write_text(
        f"[relay]\nstore_dsn = {json.dumps(planted_dsn(pg_dsn, planted['StoreDsn'], fmt))}\n"
        f'store_password = "{planted["StorePw"]}"\n'
        f"source_dsn = {json.dumps(pg_dsn)}\n"
        f'source_password = "{planted["SourcePw"]}"\n'
        f'rules = "{tmp_path / "rules.toml"}"\nlog_level = "DEBUG"\nlog_format = "{fmt}"\n'
        f'[http]\nport = 0\n[auth]\nkeys_file = "{keys}"\n'
    )
    config.chmod(0o600)
    relay = Proc(["relay", "run", "--config", str(config), "--no-engine"], tmp_path / "relay.log")
    procs.append(relay)
    port = int(relay.wait_for(r"device API listening on http://[^:]+:(\d+)").group(1))
    token = issue_token(KeyStore.from_file(keys), None, "tab-1", {"technician": "t1"}, 600)
    forged = jwt.encode(
        {"sub": "tab-9", "technician": "t1"},
        "another-key-that-is-not-the-relays-0123456789",
        algorithm="HS256",
        headers={"kid": "k1"},
    )
    ids = _requests(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", token, forged)
    text = relay.stop()

    assert_no_secrets(text, [*planted.values(), token, forged, "PlantedOpaque"])
    assert "token=***" in text and "Bearer ***" in text  # the lines are there, masked
    if fmt == "text":
        assert not any(line.startswith("{") for line in text.splitlines())
        assert re.search(r"\d \w+ uvicorn\.access: \S+ - \"GET /healthz HTTP/1\.1\" 200", text)
        return
    lines = json_lines(text, "relay")

    def access(path: str, status: int) -> list[dict[str, Any]]:
        return [
            line
            for line in lines
            if line["logger"] == "uvicorn.access"
            and f'{path} HTTP/1.1" {status}' in line["message"]
        ]

    (health,) = access("/healthz", 200)
    assert health["request_id"] == ids["healthz"] and "device" not in health
    (changes,) = access("/v1/changes", 200)
    assert changes["request_id"] == ids["changes"] and changes["device"] == "tab-1"
    refused = access("/v1/changes", 401) + access("/v1/changes?token=***", 401)
    assert len(refused) == 3 and all("device" not in line for line in refused)
    assert len({line["request_id"] for line in refused}) == 3
    accepted = [line for line in lines if "[accepted]" in line["message"]]
    assert {line["request_id"] for line in accepted} >= {ids["stream"]}
    listening = next(line for line in lines if "listening on" in line["message"])
    assert "request_id" not in listening and "device" not in listening


# ----------------------------------------------------------------------------- applier


def _poison(device: str) -> bytes:
    """A journal record PostgreSQL refuses (text for an inet key): a dead letter."""
    entry = {
        "seq": 1,
        "table": "public.hosts",
        "op": "update",
        "key": ["not-an-address"],
        "old": {"addr": "not-an-address", "label": "x"},
        "new": {"label": "y"},
        "base": None,
        "hlc": Hlc(int(time.time() * 1000), 0, device).encode(),
        "prev_seq": None,
    }
    return dump_json(
        {
            "v": 1,
            "device_id": device,
            "seq": 1,
            "received_at_us": int(time.time() * 1_000_000),
            "claims": {"sub": device, "technician": "t1"},
            "entry": entry,
            "rejection": None,
        }
    )


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_applier_logs_without_secrets_with_device_and_table(
    fmt: str,
    tmp_path: Path,
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    procs: list[Proc],
) -> None:
    from kafka import KafkaProducer

    planted = {n: secret(n) for n in ("JournalDsn", "JournalPw", "StorePw")}
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(TABLES)
        conn.execute("insert into hosts values ('10.0.0.1', 'gateway')")
    (tmp_path / "rules.toml").write_text(RULES)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\nrules = "{tmp_path / "rules.toml"}"\ntopic_prefix = "{topic_prefix}"\n'
        f'kafka_bootstrap_servers = "{kafka_bootstrap}"\nstore_password = "{planted["StorePw"]}"\n'
        f'log_level = "DEBUG"\nlog_format = "{fmt}"\n'
        f"[journal]\ndsn = {json.dumps(planted_dsn(pg_dsn, planted['JournalDsn'], fmt))}\n"
        f'password = "{planted["JournalPw"]}"\nbatch_max_ms = 5\n'
    )
    applier = Proc(["relay", "applier", "--config", str(config)], tmp_path / "applier.log")
    procs.append(applier)
    applier.wait_for(r"applier: leading")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    producer.send(f"{topic_prefix}._journal", key=b"dev-q", value=_poison("dev-q"))
    producer.flush()
    producer.close()
    applier.wait_for(r"rejected \(db_error\), kept as a dead letter")
    text = applier.stop()

    assert_no_secrets(text, planted.values())
    if fmt == "text":
        assert not any(line.startswith("{") for line in text.splitlines())
        assert re.search(r"\d ERROR relay\.upstream\.applier: applier: entry 1 of device", text)
        return
    lines = json_lines(text, "applier")
    (dead,) = [line for line in lines if "dead letter" in line["message"]]
    assert dead["level"] == "ERROR"
    assert dead["device"] == "dev-q" and dead["table"] == "public.hosts"
    leading = next(line for line in lines if "leading" in line["message"])
    assert "device" not in leading and "table" not in leading
