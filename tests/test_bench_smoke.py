"""Smoke tests of the benchmarks in bench/: each ``*_bench.py`` runs end to end with
``--quick`` and prints its result table.

Tiny sizes, against the session's PostgreSQL and broker (``--pg-dsn``,
``--kafka-bootstrap``), so the benchmark code cannot rot unnoticed.  Speed is never
asserted here; only that every case ran and reported a number where a number belongs.
The shared part, bench/bench_support.py, is also tested as a unit.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.schemas import BENCH, REPO

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


def _load_support() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_support", BENCH / "bench_support.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_support"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_bench(name: str, *args: str, timeout: float = 300) -> str:
    """Run ``bench/{name}_bench.py --quick *args``; its stdout (exit 0 asserted)."""
    cmd = [sys.executable, str(BENCH / f"{name}_bench.py"), "--quick", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def table_rows(stdout: str, *headers: str) -> list[list[str]]:
    """The cells of every Markdown table row, without header rows (starting with one of
    ``headers``) and alignment rows."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in stdout.splitlines()
        if line.startswith("| ") and not line.startswith(("| ---", *headers))
    ]


# --------------------------------------------------------------------------- bench_support


def test_percentile_is_nearest_rank() -> None:
    bench = _load_support()
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile(values, 100) == 100.0
    assert bench.percentile([7.0], 99) == 7.0
    assert bench.percentile([3.0, 1.0, 2.0], 0) == 1.0


def test_markdown_table_aligns_numbers_right_and_formats_figures() -> None:
    bench = _load_support()
    table = bench.MarkdownTable(["phase", "rows", "rate", "ratio"], right=["rows", "rate"])
    table.add("a", 1234567, 12.345, bench.ratio(1.0, 4.0))
    table.add("b", "n/a", None, "")
    assert table.render().splitlines() == [
        "| phase | rows | rate | ratio |",
        "| --- | ---: | ---: | --- |",
        "| a | 1,234,567 | 12.3 | 0.25 |",
        "| b | n/a |  |  |",
    ]
    with pytest.raises(ValueError, match="2 cells for 4 columns"):
        table.add("c", 1)
    with pytest.raises(ValueError, match="not columns"):
        bench.MarkdownTable(["a"], right=["b"])
    assert [bench.fmt_number(v) for v in (None, 3, 3.14159, 31.4159, 31415.9)] == [
        "n/a", "3", "3.14", "31.4", "31,416",
    ]  # fmt: skip


# --------------------------------------------------------------------------- each benchmark


def test_cdc_quick_run_prints_numeric_result_table(
    pg_server: Any, kafka_bootstrap: str, tmp_path: Path
) -> None:
    result_json = tmp_path / "results.json"
    stdout = run_bench(
        "cdc",
        "--rows", "300", "--txns", "100", "--rss-rows", "500", "--rate", "100", "--seconds", "1",
        "--pg-dsn", pg_server.dsn, "--kafka-bootstrap", kafka_bootstrap, "--json", str(result_json),
        timeout=240,
    )  # fmt: skip
    assert "## cdc benchmark results" in stdout
    rows = table_rows(stdout, "| case ")
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


def test_applier_quick_run_prints_its_table(pg_server: Any, kafka_bootstrap: str) -> None:
    stdout = run_bench(
        "applier",
        "--entries", "200", "--devices", "4",
        "--pg-dsn", pg_server.dsn, "--kafka-bootstrap", kafka_bootstrap,
    )  # fmt: skip
    rows = [
        line
        for line in stdout.splitlines()
        if line.startswith("| applier") or line.startswith("| executemany")
    ]
    assert len(rows) == 5, stdout
    for line in rows:
        rate = line.split("|")[4].strip().replace(",", "")
        assert float(rate) > 0, line


def test_relay_engine_quick_run_prints_its_table(pg_server: Any, kafka_bootstrap: str) -> None:
    stdout = run_bench(
        "relay_engine",
        "--rows", "500", "--pg-dsn", pg_server.dsn, "--kafka-bootstrap", kafka_bootstrap,
        timeout=240,
    )  # fmt: skip
    rows = table_rows(stdout, "| phase")
    assert len(rows) == 5, stdout
    for name, changes, _seconds, rate, *_ in rows:
        assert re.fullmatch(r"[\d,]+", rate) and int(changes.replace(",", "")) > 0, name


def test_replay_quick_run_prints_its_table(kafka_bootstrap: str) -> None:
    stdout = run_bench(
        "replay", "--events", "3000", "--rows", "300", "--kafka-bootstrap", kafka_bootstrap
    )
    assert "## replay benchmark results" in stdout
    rows = table_rows(stdout, "| case")
    cases = [r[0].split(" (")[0] for r in rows]
    assert cases == [
        "raw read", "replay decode", "replay decode, 1 worker process", "as-of, end of log", "as-of, middle position",
        "as-of state → sqlite file", "history of one row",
    ]  # fmt: skip
    for r in rows:
        assert float(r[2]) >= 0, r  # seconds
    assert float(rows[1][4]) > 0  # the ratio to the raw read
    assert "target: replay decode >= 0.3" in stdout


def test_relay_api_quick_run_prints_its_table(pg_server: Any, kafka_bootstrap: str) -> None:
    # --quick sets this benchmark's sizes (20,000 rows, 50 devices, 3 s, 200 idle streams)
    stdout = run_bench(
        "relay_api", "pull", "latency", "fanout", "idle",
        "--pg-dsn", pg_server.dsn, "--kafka-bootstrap", kafka_bootstrap,
        timeout=600,
    )  # fmt: skip
    rows = table_rows(stdout, "| case ")
    assert {r[0] for r in rows} == {"pull", "latency", "fanout", "idle"}, stdout
    measures = {r[1]: r[2] for r in rows}
    assert any(m.startswith("COPY 20,000 rows") for m in measures), measures
    for measure in ("ratio to COPY, gzip", "ratio to COPY, WebSocket"):
        assert float(measures[measure]) > 0, measure
    p99 = [v for m, v in measures.items() if m.endswith(": p99")]
    assert len(p99) == 1 and NUMBER.match(p99[0]), measures
    fanout = {m.split(": ", 1)[1]: v for m, v in measures.items() if "global bucket" in m}
    assert fanout["commits"] != "0" and NUMBER.match(fanout["p99 of deliveries"]), fanout
    assert NUMBER.match(fanout["last device, median over commits"]), fanout
    assert measures["idle WebSocket streams held by one relay process"] == "200", measures
    assert float(measures["memory per idle connection (relay)"]) > 0, measures
    assert measures["streams alive after idling (push to 200 of them)"] == "200", measures


def test_device_quick_run_prints_its_tables(pg_server: Any) -> None:
    stdout = run_bench("device", "--pg-dsn", pg_server.dsn)  # --quick: 5,000 rows each
    rows = table_rows(stdout, "| apply |", "| app writes", "| initial sync |")
    assert [r[0] for r in rows] == [
        "PUT new rows",
        "one statement per transaction (autocommit)",
        "bulk: executemany, one transaction per kind",
        "relay → device",
    ], stdout
    assert float(rows[0][-1]) > 0  # the ratio to the raw executemany
    assert all(r[-1].endswith("x") and float(r[-1][:-1]) > 0 for r in rows[1:3])
    assert rows[3][1] == "5,000" and float(rows[3][2]) > 0


def test_device_instructions_case_counts_both_sides() -> None:
    stdout = run_bench("device", "--only", "instructions")  # --quick: 1,000 rows
    if shutil.which("valgrind") is None:
        assert "instructions: valgrind not found" in stdout, stdout
        return
    rows = table_rows(stdout, "| apply, in instructions")
    assert [r[:2] for r in rows] == [["PUT new rows", "1,000"]], stdout
    raw, apply = (int(cell.replace(",", "")) for cell in rows[0][2:4])
    assert 0 < raw < apply  # the apply writes the holds besides the rows
    assert float(rows[0][4]) == pytest.approx(raw / apply, abs=0.01)
