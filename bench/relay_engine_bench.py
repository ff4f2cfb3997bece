#!/usr/bin/env python3
"""Benchmark of the relay's bucket engine: change events/s from Kafka into the bucket store.

    .venv/bin/python bench/relay_engine_bench.py            # full sizes
    .venv/bin/python bench/relay_engine_bench.py --quick    # smoke run (seconds)
    .venv/bin/python bench/relay_engine_bench.py --rows 30000 --shares 2   # 2 engine processes

Issue 3 §6, first bullet: engine changes/s when each change lands in 1 of 10,000 buckets
(target ≥ 20,000/s) and when it lands in none (target ≥ 100,000/s).

The events are produced into Kafka *before* the engine starts, encoded exactly as the cdc
daemon encodes them (``core.avro_envelope.TableCodec``, schemas in ``{prefix}._schemas``,
position header), so only the engine is measured: Kafka fetch, header dedup check, Avro
decode, rules, planning, and the PostgreSQL transaction per batch (ops, row states,
checkpoints, consumer progress, NOTIFY).  The store is in its own database on the same
PostgreSQL server.  Phases, each timed from the engine's first poll until it has applied
the phase's last event:

1. ``insert -> 1 bucket``: ``--rows`` inserts; row i goes to bucket ``tech["t{i % 10000}"]``.
2. ``update -> 1 bucket``: every row updated once (a PUT replacing the row in its bucket).
3. ``reassign -> 2 buckets``: every row moved to another technician (REMOVE + PUT).
4. ``insert -> none``: ``--rows`` inserts of rows no rule places (status 'archived').
5. ``update -> none``: every one of those updated (still in no bucket; needs a lookup).

The change topic has ``--partitions`` partitions (default 2, keys spread by Kafka's default
partitioner) and the engine runs as ``--shares`` processes (default 1), each leading its share
of the partitions (partition p to share p mod shares), as several relay processes with
``relay.engine_shares`` do; a phase lasts until the slowest share has applied its records.
Each figure comes with the engine processes' CPU time per change, the time the store's
write lock was held per change (it serializes every engine's writes: what bounds the shares'
scaling) and the load average.

PostgreSQL and the broker are started by the script (embedded, like the tests) unless
``--pg-dsn`` / ``--kafka-bootstrap`` are given.  The result table is Markdown, ready for
docs/performance.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import bench_support
from bench_support import MarkdownTable, machine

from core.avro_envelope import POSITION_HEADER, Source, TableCodec, position_header
from core.pg_types import ColumnSpec, MappingCatalog
from relay.downstream.bucket_engine import BucketEngine
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.rules import TableInfo
from relay.downstream.rules_parser import rules_from_mapping

BUCKETS = 10_000
TABLE = "public.work_orders"
COLUMNS = [
    ColumnSpec("id", 20, -1, True),  # int8
    ColumnSpec("technician", 25, -1, False),  # text
    ColumnSpec("status", 25, -1, False),
    ColumnSpec("site", 25, -1, False),
    ColumnSpec("notes", 25, -1, False),
    ColumnSpec("cost", 1700, (10 << 16 | 2) + 4, False),  # numeric(10,2)
]
RULES = {
    "token_claims": ["technician"],
    "bucket": [
        {
            "name": "tech",
            "parameters": ["t"],
            "claims": {"t": "technician"},
            "table": [
                {
                    "table": TABLE,
                    "match": {"technician": "t"},
                    "filters": [{"column": "status", "op": "!=", "value": "archived"}],
                    "exclude": ["cost"],
                }
            ],
        }
    ],
}


class Producer:
    """Encodes change events like the cdc daemon and produces them (positions ascending)."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        from kafka import KafkaProducer

        self.codec = TableCodec(
            db="app",
            schema="public",
            table="work_orders",
            columns=COLUMNS,
            catalog=MappingCatalog(),
            unchanged_sentinel=object(),
            warn=lambda _m: None,
            namespace_prefix=prefix,
        )
        self.topic = f"{prefix}.{TABLE}"
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            linger_ms=20,
            batch_size=1 << 20,
            max_request_size=16 << 20,
            acks="all",
        )
        for schema in (self.codec.value_schema_json, self.codec.key_schema_json):
            assert schema is not None
            from core.avro_schema import fingerprint

            self.producer.send(
                f"{prefix}._schemas", key=fingerprint(schema).hex().encode(), value=schema.encode()
            )
        self.lsn = 0x1000000

    def send(self, op: str, rows: Iterator[list[str | None]], per_txn: int = 100) -> dict[int, int]:
        """Produce the changes; how many went to each partition."""
        n = 0
        sent = []
        for row in rows:
            if n % per_txn == 0:
                self.lsn += 0x1000
            seq = n % per_txn
            source = Source("app", "public", "work_orders", self.lsn + seq, self.lsn, 1, seq, 0)
            key, value = self.codec.encode_change(op, None, row, source, 0)
            sent.append(
                self.producer.send(
                    self.topic,
                    key=key,
                    value=value,
                    headers=[(POSITION_HEADER, position_header(self.lsn, seq))],
                )
            )
            n += 1
        self.producer.flush()
        per_partition: dict[int, int] = {}
        for future in sent:
            part = future.get(timeout=60).partition
            per_partition[part] = per_partition.get(part, 0) + 1
        return per_partition

    def close(self) -> None:
        self.producer.close()


def rows(
    n: int, start: int, status: str, tech_shift: int = 0, note: str = "n"
) -> Iterator[list[str | None]]:
    for i in range(start, start + n):
        tech = f"t{(i + tech_shift) % BUCKETS}"
        yield [str(i), tech, status, f"site-{i % 50}", f"{note} {i}", f"{i % 1000}.50"]


def run_phase(engine: BucketEngine, records: int) -> tuple[float, int]:
    """Step the engine until it has applied ``records`` more records; seconds, ops."""
    ops0 = engine.stats.ops
    t0 = time.perf_counter()
    deadline = time.monotonic() + 3600
    applied = 0
    while applied < records and time.monotonic() < deadline:
        applied += engine.step()
    return time.perf_counter() - t0, engine.stats.ops - ops0


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        admin.close()


def share_worker(
    pipe: Connection, store_dsn: str, kafka: str, prefix: str, batch: int, shares: int, share: int
) -> None:
    """One engine process leading ``share``: for each phase it is sent the number of records
    of its partitions, applies them and answers (seconds, ops, CPU s, decode s, store s,
    write-lock s)."""
    schema = {TABLE: TableInfo(tuple(c.name for c in COLUMNS), ("id",))}
    store = PgBucketStore(store_dsn, group="bench")
    store.migrate()
    engine = BucketEngine(
        store,
        rules_from_mapping(RULES, schema),
        kafka={"bootstrap_servers": kafka},
        prefix=prefix,
        batch_max_events=batch,
        topic_refresh_s=0.5,
        shares=shares,
        share=share,
    )
    assert engine.acquire(), f"share {share} is led elsewhere"
    pipe.send("ready")
    try:
        while (records := pipe.recv()) is not None:
            engine.open()  # reader thread starts only now: nothing is read while producing
            d0, a0, cpu0 = engine.stats.decode_s, engine.stats.apply_s, time.process_time()
            l0 = engine.stats.locked_s
            seconds, ops = run_phase(engine, records) if records else (0.0, 0)
            cpu = time.process_time() - cpu0
            engine.close()
            pipe.send(
                (
                    seconds,
                    ops,
                    cpu,
                    engine.stats.decode_s - d0,
                    engine.stats.apply_s - a0,
                    engine.stats.locked_s - l0,
                )
            )
    finally:
        engine.close()
        store.close()


class Shares:
    """The engine processes, one per share."""

    def __init__(self, store_dsn: str, kafka: str, prefix: str, batch: int, shares: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.shares = shares
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for share in range(shares):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=share_worker,
                args=(theirs, store_dsn, kafka, prefix, batch, shares, share),
                daemon=True,
            )
            proc.start()
            self.pipes.append(mine)
            self.procs.append(proc)
        for pipe in self.pipes:
            assert pipe.recv() == "ready"

    def phase(self, per_partition: dict[int, int]) -> list[tuple[float, ...]]:
        for share, pipe in enumerate(self.pipes):
            pipe.send(sum(n for p, n in per_partition.items() if p % self.shares == share))
        return [pipe.recv() for pipe in self.pipes]

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for proc in self.procs:
            proc.join(60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000, help="rows per phase")
    ap.add_argument("--batch", type=int, default=5000, help="engine batch_max_events")
    ap.add_argument("--shares", type=int, default=1, help="engine processes (shares)")
    ap.add_argument("--partitions", type=int, default=2, help="partitions of the change topic")
    bench_support.add_service_flags(ap)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = ap.parse_args(argv)
    n = min(args.rows, 3000) if args.quick else args.rows

    with bench_support.services(args.pg_dsn, args.kafka_bootstrap) as svc:
        version = svc.server_version()
        store_dsn = svc.new_database("relay_bench")
        prefix = svc.new_topic_prefix("bench")
        producer = Producer(svc.kafka, prefix)
        create_topic(svc.kafka, producer.topic, args.partitions)
        shares = Shares(store_dsn, svc.kafka, prefix, args.batch, args.shares)
        phases = [
            ("insert -> 1 of 10,000 buckets", "c", rows(n, 0, "open"), 1),
            ("update -> same bucket (PUT replaces)", "u", rows(n, 0, "open", note="m"), 1),
            ("reassign -> REMOVE + PUT", "u", rows(n, 0, "open", tech_shift=1), 2),
            ("insert -> no bucket", "c", rows(n, n, "archived"), 0),
            ("update -> no bucket (lookup)", "u", rows(n, n, "archived", note="m"), 0),
        ]
        results = []
        try:
            for name, op, data, ops_per in phases:
                per_partition = producer.send(op, data)
                load = os.getloadavg()[0]
                done = shares.phase(per_partition)
                seconds = max(d[0] for d in done)
                ops = sum(d[1] for d in done)
                assert ops == n * ops_per, f"{name}: {ops} ops, expected {n * ops_per}"
                cpu, dec, app, locked = (sum(d[k] for d in done) for k in (2, 3, 4, 5))
                results.append((name, n, seconds, int(ops), dec, app, locked, cpu, load))
                print(f"{name}: {n / seconds:,.0f} changes/s (load {load:.1f})", file=sys.stderr)
        finally:
            shares.close()
            producer.close()
        with PgBucketStore(store_dsn, group="bench") as store:
            stats = store.stats()

    print(
        f"\nrelay bucket engine, {n:,} changes per phase, batch {args.batch}, "
        f"{args.shares} engine process(es), {args.partitions} partitions; "
        f"PostgreSQL {version}, {machine()}\n"
    )
    columns = [
        "phase",
        "changes",
        "seconds",
        "changes/s",
        "ops",
        "decode+rules s",
        "store s",
        "write lock µs/change",
        "engine CPU µs/change",
        "load",
    ]
    table = MarkdownTable(columns, right=columns[1:])
    for name, count, seconds, ops, dec, app, locked, cpu, load in results:
        table.add(
            name,
            count,
            f"{seconds:.2f}",
            f"{count / seconds:,.0f}",
            ops,
            f"{dec:.2f}",
            f"{app:.2f}",
            f"{locked / count * 1e6:.1f}",
            f"{cpu / count * 1e6:.1f}",
            f"{load:.1f}",
        )
    print(table.render())
    print(f"\nstore afterwards: {stats}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
