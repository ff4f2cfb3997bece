"""`fieldsync up`: embedded services reachable while it runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from kafka import KafkaAdminClient


def test_up_prints_reachable_services() -> None:
    exe = shutil.which("fieldsync") or str(Path(sys.executable).parent / "fieldsync")
    proc = subprocess.Popen([exe, "up", "--seconds", "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while len(lines) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            name, _, value = line.partition(" ")
            lines[name] = value.strip()
        lines.pop("env", None)
        assert set(lines) >= {"postgres", "kafka"}, lines
        with psycopg.connect(lines["postgres"]) as conn:
            assert conn.execute("show wal_level").fetchone() == ("logical",)
        admin = KafkaAdminClient(bootstrap_servers=lines["kafka"])
        assert isinstance(admin.list_topics(), list)
        admin.close()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
