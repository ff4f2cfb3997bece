"""Smoke runs of the relay benchmarks (bench/relay_api_bench.py fanout and idle,
bench/relay_engine_bench.py) at their ``--quick`` sizes: each runs end to end and prints a
number for every measure.  Speed is never asserted here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$")


def _rows(stdout: str, header: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in stdout.splitlines()
        if line.startswith("| ") and not line.startswith(header) and not line.startswith("| ---")
    ]


def _run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def test_relay_api_bench_fanout_and_idle_quick() -> None:
    stdout = _run("bench/relay_api_bench.py", "fanout", "idle", "--quick")
    rows = _rows(stdout, "| case ")
    measures = {(case, measure): value for case, measure, value, *_ in rows}
    assert {case for case, _ in measures} == {"fanout", "idle"}, rows
    for (case, measure), value in measures.items():
        assert NUMBER.match(value), f"{case} / {measure}: {value!r} is not a number"
    fanout = [m for c, m in measures if c == "fanout"]
    assert any("last device" in m for m in fanout) and any("relay CPU" in m for m in fanout)
    alive = [v for (c, m), v in measures.items() if c == "idle" and m.startswith("streams alive")]
    assert alive and int(alive[0].replace(",", "").split(".")[0]) > 0


def test_relay_engine_bench_quick(pg_server: Any, kafka_bootstrap: str) -> None:
    stdout = _run(
        "bench/relay_engine_bench.py",
        "--quick",
        "--pg-dsn",
        pg_server.dsn,
        "--kafka-bootstrap",
        kafka_bootstrap,
    )
    rows = _rows(stdout, "| phase ")
    assert len(rows) == 5, rows
    for phase, changes, seconds, rate, *_ in rows:
        assert all(NUMBER.match(v) for v in (changes, seconds, rate)), phase


def test_relay_engine_bench_two_shares_quick(pg_server: Any, kafka_bootstrap: str) -> None:
    """Two engine processes, each leading one of the topic's two partitions."""
    stdout = _run(
        "bench/relay_engine_bench.py",
        "--quick",
        "--shares",
        "2",
        "--pg-dsn",
        pg_server.dsn,
        "--kafka-bootstrap",
        kafka_bootstrap,
    )
    assert "2 engine process(es)" in stdout
    rows = _rows(stdout, "| phase ")
    assert len(rows) == 5, rows
    for phase, changes, seconds, rate, ops, *_rest, cpu, _load in rows:
        assert all(NUMBER.match(v) for v in (changes, seconds, rate, ops, cpu)), phase
