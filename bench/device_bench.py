#!/usr/bin/env python3
"""Benchmarks of the device agent; figures go to docs/performance.md.

    .venv/bin/python bench/device_bench.py                 # all three, full sizes
    .venv/bin/python bench/device_bench.py --quick         # smoke run (seconds)
    .venv/bin/python bench/device_bench.py --only apply,triggers --rows 200000
    .venv/bin/python bench/device_bench.py --only instructions   # needs valgrind

1. ``apply``: applying downloaded ops (PUTs of new rows, as parsed from the relay's
   changes messages) into SQLite with :func:`device_agent.apply.apply_messages` — checksum
   terms, bucket holds, the checkpoint check, the trigger guard, the cursor — against a
   raw ``executemany`` of the same rows (tuples already built) into the same table in one
   transaction, the limit.  Target: ≥ 0.5 of the limit.  Both sides on a fresh database
   file (WAL, synchronous=NORMAL); best of ``--repeat`` runs, by wall time and by the
   process's CPU time (the CPU ratio is the steadier one on a shared machine).
2. ``initial``: initial sync of a bucket of ``--initial-rows`` rows (1,000,000) from relay
   to device, end to end: the relay's device API (uvicorn, loopback) over the PostgreSQL
   bucket store, ``Agent.sync_once`` from an empty database (HTTP pages of 5,000 ops,
   gzip, staging, one apply).  The store is filled beforehand with ``store.apply`` (not
   timed).  Target: ≤ 30 s.
3. ``instructions`` (not in the default set; needs valgrind): the ``apply`` case's two
   sides counted in CPU instructions with callgrind, which does not depend on the
   machine's load (``--instr-rows`` rows, 20,000): the script runs itself three times
   under ``valgrind --tool=callgrind`` (messages built and nothing applied, then the raw
   ``executemany``, then the apply) and the differences to the first run are the
   instructions of each side.  The ratio compares builds (compiled against pure) and
   changes on a noisy machine; callgrind's CPU model may take another SHA-256 code path
   than the real CPU.
4. ``triggers``: an app's writes (inserts, then updates, then deletes of ``--rows`` rows,
   each kind in one transaction with ``executemany``) with the journal triggers against
   the same writes without triggers.  Target: ≤ 2x.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from operator import itemgetter
from pathlib import Path
from typing import Any

import bench_support
from bench_support import MarkdownTable, Services

from core.row_wire import CHECKSUM_MODULUS, row_checksum, row_key_text
from device_agent import local_db, local_tables, relay_schema, schema_sync, triggers
from device_agent.apply import apply_messages

TABLE = "public.work_orders"
COLUMNS = ["id", "site", "technician", "status", "due", "notes", "updated_at"]
BUCKET = 'tech["t1"]'
SCHEMA = {
    "tables": [{"name": TABLE, "columns": COLUMNS, "key": ["id"], "rules": ["tech"]}],
    "buckets": [BUCKET],
}


def make_row(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "site": f"plant-{i % 7}",
        "technician": "t1",
        "status": "open",
        "due": 19000 + i % 365,
        "notes": f"order {i}: replace the filter and check the pressure",
        "updated_at": 1_700_000_000_000_000 + i,
    }


def fresh_db(directory: Path) -> tuple[str, sqlite3.Connection]:
    path = str(directory / f"bench-{uuid.uuid4().hex[:8]}.db")
    conn = local_db.connect(path)
    local_db.ensure_metadata(conn)
    local_db.set_meta(conn, "relay_url", "http://bench.invalid")
    schema_sync.apply_schema(conn, relay_schema.parse_schema(SCHEMA))
    return path, conn


def drop(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


# --------------------------------------------------------------------------- 1. apply


def apply_case(rows: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows and the changes messages that PUT them into an empty bucket."""
    data = [make_row(i) for i in range(1, rows + 1)]
    total = sum(row_checksum(TABLE, row_key_text([r["id"]]), r) for r in data) % CHECKSUM_MODULUS
    page = 5000
    messages = []
    for start in range(0, rows, page):
        chunk = data[start : start + page]
        last = start + page >= rows
        messages.append(
            {
                "ops": [
                    {
                        "op_id": r["id"],
                        "bucket": BUCKET,
                        "op": "PUT",
                        "table": TABLE,
                        "key": [r["id"]],
                        "data": r,
                        "position": [1_000_000 + r["id"], 0],
                    }
                    for r in chunk
                ],
                "cursor": "c",
                "checkpoint": {
                    "complete": last,
                    "buckets": {
                        BUCKET: {
                            "last_op_id": rows,
                            "count": rows,
                            "checksum": str(total),
                            "complete": last,
                        }
                    }
                    if last
                    else {},
                },
                "resync": [],
                "dropped": [],
                "has_more": not last,
            }
        )
    return data, messages


def raw_write(conn: sqlite3.Connection, tuples: list[tuple[Any, ...]]) -> None:
    """The limit: the rows into the same table, triggers dropped, one transaction."""
    for t in local_tables.load_tables(conn).values():
        triggers.drop(conn, t)
    cols = ", ".join(f'"{c}"' for c in COLUMNS)
    conn.execute("begin immediate")
    conn.executemany(
        f"insert or replace into work_orders ({cols}) values ({', '.join('?' * len(COLUMNS))})",
        tuples,
    )
    conn.execute("commit")


def bench_apply(rows: int, repeat: int, directory: Path) -> dict[str, Any]:
    data, messages = apply_case(rows)
    raw_best = apply_best = raw_cpu = apply_cpu = float("inf")
    getter = itemgetter(*COLUMNS)
    tuples = [getter(r) for r in data]
    for _ in range(repeat):
        path, conn = fresh_db(directory)
        started, cpu = time.perf_counter(), time.process_time()
        raw_write(conn, tuples)
        raw_best = min(raw_best, time.perf_counter() - started)
        raw_cpu = min(raw_cpu, time.process_time() - cpu)
        conn.close()
        drop(path)
        path, conn = fresh_db(directory)
        started, cpu = time.perf_counter(), time.process_time()
        result = apply_messages(conn, messages, "c", total_ops=rows)
        apply_best = min(apply_best, time.perf_counter() - started)
        apply_cpu = min(apply_cpu, time.process_time() - cpu)
        assert result.verified == [BUCKET], result
        assert conn.execute("select count(*) from work_orders").fetchone() == (rows,)
        conn.close()
        drop(path)
    return {
        "rows": rows,
        "raw_s": raw_best,
        "apply_s": apply_best,
        "raw_cpu_s": raw_cpu,
        "apply_cpu_s": apply_cpu,
        "raw_rows_s": rows / raw_best,
        "apply_rows_s": rows / apply_best,
    }


# --------------------------------------------------------------------------- 3. instructions


def callgrind_side(mode: str, rows: int, directory: Path) -> None:
    """One side of the instructions case, run under callgrind: ``none``, ``raw``, ``apply``."""
    data, messages = apply_case(rows)
    getter = itemgetter(*COLUMNS)
    tuples = [getter(r) for r in data]
    path, conn = fresh_db(directory)
    if mode == "raw":
        raw_write(conn, tuples)
    elif mode == "apply":
        result = apply_messages(conn, messages, "c", total_ops=rows)
        assert result.verified == [BUCKET], result
    conn.close()
    drop(path)


def bench_instructions(rows: int, directory: Path) -> dict[str, Any] | None:
    """Instructions per row of the raw write and of the apply (None: no valgrind)."""
    if shutil.which("valgrind") is None:
        return None
    counts = {}
    for mode in ("none", "raw", "apply"):
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={directory}/cg.{mode}",
             sys.executable, __file__, "--callgrind-side", mode, "--instr-rows", str(rows)],
            capture_output=True, text=True, check=True, timeout=3600,
        )  # fmt: skip
        found = re.search(r"Collected : (\d+)", proc.stderr)
        assert found, proc.stderr[-2000:]
        counts[mode] = int(found.group(1))
    return {
        "rows": rows,
        "raw": (counts["raw"] - counts["none"]) / rows,
        "apply": (counts["apply"] - counts["none"]) / rows,
    }


# --------------------------------------------------------------------------- 4. triggers


def bench_triggers(rows: int, repeat: int, directory: Path) -> dict[str, Any]:
    cols = ", ".join(f'"{c}"' for c in COLUMNS)
    marks = ", ".join("?" * len(COLUMNS))
    getter = itemgetter(*COLUMNS)
    inserts = [getter(make_row(i)) for i in range(1, rows + 1)]
    updates = [("done", i) for i in range(1, rows + 1)]
    deletes = [(i,) for i in range(1, rows + 1)]
    small = min(rows, 5000)

    def run(with_triggers: bool, per_statement: bool = False) -> float:
        path, conn = fresh_db(directory)
        if not with_triggers:
            for t in local_tables.load_tables(conn).values():
                triggers.drop(conn, t)
        conn.close()
        app = sqlite3.connect(path, isolation_level=None)
        app.execute("pragma journal_mode = wal")
        app.execute("pragma synchronous = normal")
        started = time.perf_counter()
        for sql, args in (
            (f"insert into work_orders ({cols}) values ({marks})", inserts),
            ("update work_orders set status = ? where id = ?", updates),
            ("delete from work_orders where id = ?", deletes),
        ):
            if per_statement:  # an app's usual way: one statement per transaction
                for a in args[:small]:
                    app.execute(sql, a)
                continue
            app.execute("begin")
            app.executemany(sql, args)
            app.execute("commit")
        elapsed = time.perf_counter() - started
        journaled = app.execute(f"select count(*) from {local_tables.PREFIX}journal").fetchone()[0]
        n = small if per_statement else rows
        assert journaled == (3 * n if with_triggers else 0), journaled
        app.close()
        drop(path)
        return elapsed

    plain = min(run(False) for _ in range(repeat))
    with_t = min(run(True) for _ in range(repeat))
    plain_1 = min(run(False, True) for _ in range(repeat))
    with_1 = min(run(True, True) for _ in range(repeat))
    return {
        "rows": rows,
        "writes": 3 * rows,
        "plain_s": plain,
        "triggers_s": with_t,
        "overhead": with_t / plain,
        "single_writes": 3 * small,
        "single_plain_s": plain_1,
        "single_triggers_s": with_1,
        "single_overhead": with_1 / plain_1,
    }


# --------------------------------------------------------------------------- 2. initial sync


@contextlib.contextmanager
def relay_with_rows(rows: int, svc: Services) -> Iterator[tuple[str, str]]:
    """A relay (uvicorn thread) whose store holds one bucket of ``rows`` rows; yields
    (url, token)."""
    import uvicorn

    from relay.auth import Authenticator, issue_token
    from relay.auth_keys import Key, KeyStore
    from relay.downstream.api import create_app
    from relay.downstream.api_sync import ApiConfig
    from relay.downstream.bucket_store import ChangeKind, RowChange
    from relay.downstream.pg_bucket_store import PgBucketStore
    from relay.downstream.rules import TableInfo
    from relay.downstream.rules_parser import rules_from_mapping

    store_dsn = svc.new_database("devbench")
    rules = rules_from_mapping(
        {
            "token_claims": ["technician"],
            "bucket": [
                {
                    "name": "tech",
                    "parameters": ["t"],
                    "claims": {"t": "technician"},
                    "table": [{"table": TABLE, "match": {"technician": "t"}}],
                }
            ],
        },
        {TABLE: TableInfo(tuple(COLUMNS), ("id",))},
    )
    store = PgBucketStore(store_dsn)
    store.migrate()
    try:
        started = time.perf_counter()
        batch = 20_000
        for start in range(1, rows + 1, batch):
            changes = [
                RowChange(TABLE, ChangeKind.UPSERT, (10_000 + i, 0), (i,), make_row(i), insert=True)
                for i in range(start, min(rows, start + batch - 1) + 1)
            ]
            store.apply(rules, changes)
        print(
            f"[bench] store filled with {rows} rows in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        keys = KeyStore([Key.hmac("k1", b"b" * 40)], current="k1")
        app = create_app(store, rules, Authenticator(keys), ApiConfig(rate_per_s=0))
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        srv = uvicorn.Server(config)
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        while not srv.started:
            time.sleep(0.05)
        port = srv.servers[0].sockets[0].getsockname()[1]
        token = issue_token(keys, None, "bench-1", {"technician": "t1"}, 3600)
        try:
            yield f"http://127.0.0.1:{port}", token
        finally:
            srv.should_exit = True
            thread.join(10)
    finally:
        store.close()


def bench_initial(rows: int, base: Path, svc: Services) -> dict[str, Any]:
    from device_agent.sync import Agent, init_database

    with relay_with_rows(rows, svc) as (url, token):
        path = str(base / "initial.db")
        init_database(path, url, token)
        agent = Agent(path)
        started = time.perf_counter()
        report = agent.sync_once()
        elapsed = time.perf_counter() - started
        held = agent.conn.execute("select count(*) from work_orders").fetchone()[0]
        agent.close()
    assert held == rows, held
    assert report.to_json()["verified"] == [BUCKET], report.to_json()
    apply_s = sum(a.seconds for a in report.applied)
    return {
        "rows": rows,
        "seconds": elapsed,
        "rows_s": rows / elapsed,
        "apply_s": apply_s,
        "bytes": report.bytes,
        "messages": report.messages,
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows for apply/triggers")
    parser.add_argument("--initial-rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="apply,triggers,initial", help="also: instructions")
    parser.add_argument("--instr-rows", type=int, default=20_000, help="rows for instructions")
    parser.add_argument("--callgrind-side", help=argparse.SUPPRESS)
    bench_support.add_service_flags(parser, kafka=False)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.initial_rows, args.repeat, args.instr_rows = 5_000, 5_000, 1, 1_000
    if args.callgrind_side:
        with tempfile.TemporaryDirectory() as where:
            callgrind_side(args.callgrind_side, args.instr_rows, Path(where))
        return
    wanted = set(args.only.split(","))
    print(
        f"# device agent benchmark ({platform.node()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version})"
    )
    with bench_support.services(args.pg_dsn, pg="initial" in wanted, kafka=False) as svc:
        base = svc.work
        if "apply" in wanted:
            r = bench_apply(args.rows, args.repeat, base)
            table = MarkdownTable(
                ["apply", "rows", "raw executemany s", "apply s", "raw rows/s", "apply rows/s",
                 "raw CPU s", "apply CPU s", "CPU ratio", "ratio (target ≥ 0.5)"]
            )  # fmt: skip
            table.add(
                "PUT new rows",
                r["rows"],
                f"{r['raw_s']:.2f}",
                f"{r['apply_s']:.2f}",
                f"{r['raw_rows_s']:,.0f}",
                f"{r['apply_rows_s']:,.0f}",
                f"{r['raw_cpu_s']:.2f}",
                f"{r['apply_cpu_s']:.2f}",
                bench_support.ratio(r["raw_cpu_s"], r["apply_cpu_s"]),
                bench_support.ratio(r["raw_s"], r["apply_s"]),
            )
            print("\n" + table.render())
        if "instructions" in wanted:
            found = bench_instructions(args.instr_rows, base)
            if found is None:
                print("\ninstructions: valgrind not found (apt install valgrind)")
            else:
                table = MarkdownTable(
                    ["apply, in instructions (callgrind)", "rows", "raw executemany a row",
                     "apply a row", "ratio (target ≥ 0.5)"]
                )  # fmt: skip
                table.add(
                    "PUT new rows",
                    found["rows"],
                    f"{found['raw']:,.0f}",
                    f"{found['apply']:,.0f}",
                    bench_support.ratio(found["raw"], found["apply"]),
                )
                print("\n" + table.render())
        if "triggers" in wanted:
            r = bench_triggers(args.rows, args.repeat, base)
            table = MarkdownTable(
                ["app writes (insert, update, delete of each row)", "writes",
                 "without triggers s", "with triggers s", "overhead (target ≤ 2x)"]
            )  # fmt: skip
            table.add(
                "one statement per transaction (autocommit)",
                r["single_writes"],
                f"{r['single_plain_s']:.2f}",
                f"{r['single_triggers_s']:.2f}",
                f"{r['single_overhead']:.2f}x",
            )
            table.add(
                "bulk: executemany, one transaction per kind",
                r["writes"],
                f"{r['plain_s']:.2f}",
                f"{r['triggers_s']:.2f}",
                f"{r['overhead']:.2f}x",
            )
            print("\n" + table.render())
        if "initial" in wanted:
            r = bench_initial(args.initial_rows, base, svc)
            table = MarkdownTable(
                ["initial sync", "rows", "seconds (target ≤ 30)", "rows/s", "of which apply s",
                 "JSON bytes (inflated)", "messages"]
            )  # fmt: skip
            table.add(
                "relay → device",
                r["rows"],
                f"{r['seconds']:.1f}",
                f"{r['rows_s']:,.0f}",
                f"{r['apply_s']:.1f}",
                r["bytes"],
                r["messages"],
            )
            print("\n" + table.render())


if __name__ == "__main__":
    main()
