"""Smoke test of bench/cdc_bench.py: it runs end to end and prints its result table.

Tiny sizes, against the session's PostgreSQL and broker, so the benchmark code
cannot rot unnoticed.  Speed is never asserted here; only that every case ran
and reported a number where a number belongs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "cdc_bench.py"

EXPECTED_MEASURES = {
    "pg_recvlogical (pgoutput v1, /dev/null)",
    "fieldsync cdc to Kafka acks",
    "ratio cdc / pg_recvlogical",
    "cdc peak RSS (VmHWM), streaming on",
    "achieved write rate",
    "commit to Kafka ack p50",
    "commit to Kafka ack p99",
    "ratio pure / as built",
}
NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$")


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cdc_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cdc_bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _table_rows(stdout: str) -> list[list[str]]:
    rows = []
    for line in stdout.splitlines():
        if (
            line.startswith("| ")
            and not line.startswith("| case ")
            and not line.startswith("| ---")
        ):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_quick_run_prints_numeric_result_table(
    pg_server: Any, kafka_bootstrap: str, tmp_path: Path
) -> None:
    result_json = tmp_path / "results.json"
    cmd = [
        sys.executable, str(BENCH), "--quick",
        "--rows", "300", "--txns", "100", "--rss-rows", "500", "--rate", "100", "--seconds", "1",
        "--pg-dsn", pg_server.dsn, "--kafka-bootstrap", kafka_bootstrap, "--json", str(result_json),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert "## cdc benchmark results" in out.stdout
    rows = _table_rows(out.stdout)
    cases = {r[0].split()[0] for r in rows}
    assert cases == {"bulk", "txns", "rss", "latency", "hotpath"}, rows
    by_measure: dict[str, list[str]] = {}
    for case, measure, value, *_rest in rows:
        by_measure.setdefault(measure, []).append(value)
        if measure != "streamed by PostgreSQL before commit":
            assert NUMBER.match(value), f"{case} / {measure}: {value!r} is not a number"
    assert EXPECTED_MEASURES <= set(by_measure), sorted(by_measure)
    assert len(by_measure["ratio cdc / pg_recvlogical"]) == 2  # bulk and txns
    data = json.loads(result_json.read_text())
    assert "cores" in data["machine"]
    assert all(row["value"] is None or row["value"] >= 0 for row in data["rows"])


def test_percentile_is_nearest_rank() -> None:
    bench = _load_bench()
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile(values, 100) == 100.0
    assert bench.percentile([7.0], 99) == 7.0
    assert bench.percentile([3.0, 1.0, 2.0], 0) == 1.0
