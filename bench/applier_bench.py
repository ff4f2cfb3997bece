#!/usr/bin/env python3
"""Benchmark of the upstream applier: applied journal entries/s vs a plain executemany.

    .venv/bin/python bench/applier_bench.py                  # full sizes
    .venv/bin/python bench/applier_bench.py --quick          # smoke run (seconds)

Issue 4 §4: applied entries/s for non-conflicting updates, against a plain psycopg
``executemany`` of the same updates as the limit; target >= 0.3 of the limit.

Setup: a captured database with ``work_orders`` (``--entries`` rows, one technician per
device, ``--devices`` devices).  The journal entries (one update of ``notes`` per row,
devices interleaved as they would upload) are produced into ``{prefix}._journal``
*before* the applier starts, so only the applier is measured: Kafka fetch, record
parsing, validation against the rules, idempotency check, ``SELECT … FOR UPDATE`` of the
rows, merge, pipelined updates, applied/outbox/offsets bookkeeping, commit, and
publishing every outcome to ``{prefix}._outcomes``.  Timed from the first poll until
the last outcome is acknowledged by Kafka.

Phases (the same rows each time; each phase's old values are the previous phase's new
values, so nothing conflicts):

1. ``applier, server_wins`` (no row clock),
2. ``applier, lww + time_column`` (the row clock is kept: one more upsert per entry),
3. ``executemany, 1 transaction``: ``update work_orders set notes = %s where id = %s``,
4. ``executemany, per 500`` (one transaction per 500 updates, like the applier's runs).

The ratio is applied entries/s over phase 3 (the limit).  Also printed, per entry: the
CPU time of this process (the applier's threads) and of its PostgreSQL backend (read from
``/proc`` when the server runs on this machine), against the same for ``executemany``: on
a shared machine these say more than the wall times.  PostgreSQL and the broker are
started by the script (embedded, like the tests) unless ``--pg-dsn`` /
``--kafka-bootstrap`` are given.  The result table is Markdown, for docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bench_support
import psycopg
from bench_support import ROOT, MarkdownTable, Services, machine, ratio

from core.hlc import Hlc
from core.journal_format import JournalRecord, entry_from_json
from relay.upstream.applier import Applier
from relay.upstream.applier_db import ApplierDb

TABLE = """
create table work_orders (
    id bigint primary key,
    technician text not null,
    status text not null default 'open',
    notes text,
    qty int not null default 0,
    updated_at timestamptz not null default now()
)
"""
RULES = """
token_claims = ["technician"]

[[bucket]]
name = "tech"
parameters = ["technician"]
claims = { technician = "technician" }

[[bucket.table]]
table = "public.work_orders"
match = { technician = "technician" }
"""
CONFLICTS = {
    "server_wins": "[default]\npolicy = 'server_wins'\n",
    "lww": "[[table]]\ntable = 'public.work_orders'\npolicy = 'lww'\ntime_column = 'updated_at'\n",
}


def produce(bootstrap: str, topic: str, records: list[JournalRecord]) -> float:
    from kafka import KafkaProducer

    t0 = time.perf_counter()
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20
    )
    for r in records:
        producer.send(topic, key=r.kafka_key, value=r.to_bytes())
    producer.flush()
    producer.close()
    return time.perf_counter() - t0


def journal(n: int, devices: int, tag: str, old: str, new: str) -> list[JournalRecord]:
    """One update of ``notes`` per row ``old`` → ``new``; row i belongs to device i % devices."""
    now = time.time_ns() // 1_000_000
    out = []
    seqs: dict[str, int] = {}
    for i in range(1, n + 1):
        k = i % devices
        device = f"{tag}{k}"
        seq = seqs[device] = seqs.get(device, 0) + 1
        row = {"id": i, "technician": f"t{k}", "status": "open", "notes": f"{old}{i}", "qty": 0}
        raw = {
            "seq": seq,
            "table": "public.work_orders",
            "op": "update",
            "key": [i],
            "old": row,
            "new": {"notes": f"{new}{i}"},
            "base": {"commit_lsn": 1, "seq": 0},
            "hlc": Hlc(now, seq % 60000, device).encode(),
            "prev_seq": None,
        }
        claims = {"sub": device, "technician": f"t{k}"}
        out.append(
            JournalRecord(device, seq, entry_from_json(raw, device), claims, None, now * 1000)
        )
    return out


def backend_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of a local PostgreSQL backend; None when the server
    is not on this machine (``--pg-dsn`` elsewhere) or /proc cannot say."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cpu_split(cpu_s: float, pg_s: float | None, n: int) -> str:
    """``"py 123 µs, PostgreSQL 17 µs"`` per entry."""
    pg = f"{pg_s / n * 1e6:,.0f} µs" if pg_s is not None else "?"
    return f"{cpu_s / n * 1e6:,.0f} µs here, {pg} in PostgreSQL"


def run_applier(
    svc: Services, dsn: str, policy: str, records: list[JournalRecord], batch: int
) -> dict[str, Any]:
    bootstrap, workdir = svc.kafka, svc.work
    prefix = svc.new_topic_prefix("bench")
    rules = workdir / "rules.toml"
    rules.write_text(RULES)
    conflicts = workdir / f"conflicts-{policy}.toml"
    conflicts.write_text(CONFLICTS[policy])
    db = ApplierDb(dsn, rules, conflicts, consumer=prefix)
    applier = Applier(
        db, kafka={"bootstrap_servers": bootstrap}, prefix=prefix, batch_max_entries=batch
    )
    db.connect()
    db.migrate()
    applier.ensure_topics()
    produced_s = produce(bootstrap, applier.journal_topic, records)
    assert db.acquire_leadership()
    applier._open()
    n = len(records)
    backend = db.connection().info.backend_pid
    pg0 = backend_cpu_s(backend)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    deadline = time.monotonic() + 600
    while db.stats.records < n and time.monotonic() < deadline:
        applier.step()
    applier.publish_outbox()
    seconds = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0
    pg1 = backend_cpu_s(backend)
    pg_s = pg1 - pg0 if pg0 is not None and pg1 is not None else None
    stats = db.stats
    applier.close()
    done = stats.applied + stats.merged
    assert done == n, f"{policy}: {done} of {n} applied ({stats})"
    return {
        "seconds": seconds,
        "apply_s": stats.apply_s,
        "runs": stats.runs,
        "published": stats.published,
        "produced_s": produced_s,
        "cpu": cpu_split(cpu_s, pg_s, n),
    }


def run_sharded(
    svc: Services, dsn: str, records: list[JournalRecord], batch: int, shards: int
) -> dict[str, Any]:
    """``shards`` applier processes (``fieldsync relay applier --shard N``); the time is the
    span of the audit rows' ``applied_at`` (clock time of each decision), so process
    start-up is not counted."""
    bootstrap, workdir = svc.kafka, svc.work
    prefix = svc.new_topic_prefix("bench")
    config = workdir / f"relay-{prefix}.toml"
    config.write_text(
        f"""
[relay]
rules = "{workdir / "rules.toml"}"
topic_prefix = "{prefix}"
kafka_bootstrap_servers = "{bootstrap}"
log_level = "WARNING"

[journal]
dsn = "{dsn}"
conflicts = "{workdir / "conflicts-server_wins.toml"}"
consumer = "{prefix}"
shards = {shards}
batch_max_entries = {batch}
"""
    )
    db = ApplierDb(dsn, workdir / "rules.toml", consumer=prefix)
    applier = Applier(db, kafka={"bootstrap_servers": bootstrap}, prefix=prefix)
    db.connect()
    db.migrate()
    applier.ensure_topics()
    applier.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        produced_s = produce(bootstrap, f"{prefix}._journal", records)
        started = time.monotonic()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "relay.upstream.applier_cli",
                    "--config",
                    str(config),
                    "--shard",
                    str(i),
                ],
                cwd=ROOT,
            )
            for i in range(shards)
        ]
        n, count, span = len(records), 0, 0.0
        try:
            while time.monotonic() - started < 600:
                row = conn.execute(
                    "select count(*), extract(epoch from max(applied_at) - min(applied_at)) "
                    "from fieldsync_applier.applied where device_id like %s",
                    (records[0].device_id[0] + "%",),
                ).fetchone()
                assert row is not None
                count, span = int(row[0]), float(row[1] or 0.0)
                if count >= n:
                    break
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError("an applier process exited")
                time.sleep(0.05)
            else:
                raise RuntimeError(f"sharded appliers applied only {count} of {n}")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
    return {"seconds": span, "produced_s": produced_s}


def run_executemany(dsn: str, n: int, old: str, new: str, per_txn: int | None) -> tuple[float, str]:
    params = [(f"{new}{i}", i) for i in range(1, n + 1)]
    with psycopg.connect(dsn) as conn:
        backend = conn.info.backend_pid
        pg0 = backend_cpu_s(backend)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        step = per_txn or n
        for start in range(0, n, step):
            with conn.cursor() as cur:
                cur.executemany(
                    "update work_orders set notes = %s where id = %s", params[start : start + step]
                )
            conn.commit()
        seconds = time.perf_counter() - t0
        cpu_s = time.process_time() - cpu0
        pg1 = backend_cpu_s(backend)
        wrong = conn.execute(
            "select count(*) from work_orders where notes <> %s || id", (new,)
        ).fetchone()
    assert wrong == (0,), f"executemany left {wrong} rows unchanged"
    pg_s = pg1 - pg0 if pg0 is not None and pg1 is not None else None
    return seconds, cpu_split(cpu_s, pg_s, n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--entries", type=int, default=20_000, help="journal entries (= rows) per phase"
    )
    ap.add_argument("--devices", type=int, default=20, help="devices the entries come from")
    ap.add_argument("--batch", type=int, default=500, help="applier batch_max_entries")
    ap.add_argument("--shards", type=int, default=2, help="applier processes of the sharded phase")
    bench_support.add_service_flags(ap)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = ap.parse_args(argv)
    n = min(args.entries, 1000) if args.quick else args.entries

    results: list[tuple[str, float, str]] = []
    with bench_support.services(args.pg_dsn, args.kafka_bootstrap) as svc:
        version = svc.server_version()
        with svc.database("applier_bench") as dsn:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(TABLE)
                conn.execute(
                    "insert into work_orders (id, technician, notes) "
                    "select g, 't' || (g %% %s), 'a' || g from generate_series(1, %s) g",
                    (args.devices, n),
                )
                conn.execute("vacuum analyze work_orders")
            details = {}
            for policy, old, new, tag in (("server_wins", "a", "b", "d"), ("lww", "b", "c", "e")):
                records = journal(n, args.devices, tag, old, new)
                got = run_applier(svc, dsn, policy, records, args.batch)
                details[policy] = got
                label = (
                    "applier, server_wins"
                    if policy == "server_wins"
                    else "applier, lww + time_column (row clock)"
                )
                results.append((label, got["seconds"], f"{got['runs']} transactions"))
                print(f"{label}: {n / got['seconds']:,.0f} entries/s", file=sys.stderr)
            records = journal(n, args.devices, "f", "c", "d")
            sharded = run_sharded(svc, dsn, records, args.batch, args.shards)
            results.append(
                (
                    f"applier, server_wins, {args.shards} processes (shards)",
                    sharded["seconds"],
                    "span of applied_at",
                )
            )
            print(f"sharded: {n / sharded['seconds']:,.0f} entries/s", file=sys.stderr)
            one, one_cpu = run_executemany(dsn, n, "d", "e", None)
            results.append(("executemany, 1 transaction (the limit)", one, "1 transaction"))
            per, _ = run_executemany(dsn, n, "e", "f", args.batch)
            results.append(
                (
                    f"executemany, {args.batch} per transaction",
                    per,
                    f"{-(-n // args.batch)} transactions",
                )
            )

    print(
        f"\nupstream applier, {n:,} non-conflicting updates from {args.devices} devices, "
        f"batch {args.batch}; PostgreSQL {version}, {machine()}\n"
    )
    table = MarkdownTable(
        ["phase", "entries", "seconds", "entries/s", "ratio to the limit", "note"],
        right=["entries", "seconds", "entries/s", "ratio to the limit"],
    )
    for label, seconds, note in results:
        table.add(label, n, f"{seconds:.2f}", f"{n / seconds:,.0f}", ratio(one, seconds), note)
    print(table.render())
    for policy, got in details.items():
        print(
            f"\n{policy}: applier transactions {got['apply_s']:.2f} s of {got['seconds']:.2f} s "
            f"(rest: Kafka fetch, parsing, publishing {got['published']:,} outcomes); "
            f"producing the journal took {got['produced_s']:.2f} s (not timed); "
            f"CPU per entry: {got['cpu']}"
        )
    print(f"\nexecutemany, 1 transaction: CPU per update: {one_cpu}")
    print(f"load average after the run: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
