"""The README's first command: ``fieldsync demo`` runs the whole pipeline and checks each
step (devtools/demo.py); ``--cdc-only`` prints cdc's events."""

from __future__ import annotations

import json
import subprocess
import sys


def test_full_demo_checks_every_step() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "fieldsync.cli", "demo", "--check"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("✓") == 5, res.stdout
    assert "All steps checked." in res.stdout
    assert "device tablet-7" in res.stdout  # the audit trail names the device


def test_cdc_only_demo_prints_events() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fieldsync.cli",
            "demo",
            "--cdc-only",
            "--seconds",
            "4",
            "--rate",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert events and events[0]["op"] == "r"  # the snapshot row first
    assert {"c", "u"} & {e["op"] for e in events}
