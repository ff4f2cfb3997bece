#!/usr/bin/env python3
"""Run every benchmark in bench/ (each ``*_bench.py``), one after the other.

    python3 dev.py bench                      # full sizes (tens of minutes)
    python3 dev.py bench --quick              # smoke sizes
    python3 dev.py bench --only cdc           # just bench/cdc_bench.py

``--quick``, ``--pg-dsn`` and ``--kafka-bootstrap`` are passed on to each
script whose ``--help`` lists the flag (see bench/README.md); the scripts' own
size flags are not (run a script directly for those).  The
benchmarks run sequentially, never in parallel, so they do not compete for the
machine.  Each prints its own Markdown result table; a summary of exit codes
and durations follows.  The exit code is non-zero when any benchmark failed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def discover() -> list[Path]:
    return sorted(BENCH_DIR.glob("*_bench.py"))


def flags_for(script: Path, common: list[tuple[str, str | None]]) -> list[str]:
    """The common flags *script* takes, as its ``--help`` lists them (a benchmark without a
    broker has no --kafka-bootstrap)."""
    usage = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCH_DIR.parent,
    ).stdout
    out: list[str] = []
    for flag, value in common:
        if re.search(rf"^\s+{re.escape(flag)}\b", usage, re.MULTILINE):
            out += [flag] if value is None else [flag, value]
    return out


def main(argv: list[str] | None = None) -> int:
    names = [p.name.removesuffix("_bench.py") for p in discover()]
    ap = argparse.ArgumentParser(description="Run every benchmark in bench/.")
    ap.add_argument("--quick", action="store_true", help="smoke sizes")
    ap.add_argument("--pg-dsn", help="superuser DSN of an external PostgreSQL (else embedded)")
    ap.add_argument("--kafka-bootstrap", help="host:port of an external broker (else embedded)")
    ap.add_argument(
        "--only", action="append", choices=names, help="run only this benchmark (repeatable)"
    )
    args = ap.parse_args(argv)
    common: list[tuple[str, str | None]] = []
    if args.quick:
        common.append(("--quick", None))
    if args.pg_dsn:
        common.append(("--pg-dsn", args.pg_dsn))
    if args.kafka_bootstrap:
        common.append(("--kafka-bootstrap", args.kafka_bootstrap))
    summary: list[tuple[str, int, float]] = []
    for script in discover():
        name = script.name.removesuffix("_bench.py")
        if args.only and name not in args.only:
            continue
        passed = flags_for(script, common)
        print(f"\n=== {script.name} {' '.join(passed)}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, str(script), *passed], cwd=BENCH_DIR.parent)
        summary.append((script.name, code, time.perf_counter() - t0))
    print("\n=== summary")
    for name, code, seconds in summary:
        print(f"{name:30} {'ok' if code == 0 else f'FAILED (exit {code})':18} {seconds:8.0f} s")
    return 0 if all(code == 0 for _, code, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
