#!/usr/bin/env python3
"""Benchmark of the audit replay: decoded events/s against raw Kafka reads, and as-of
reconstruction over a large log.

    .venv/bin/python bench/replay_bench.py            # full sizes (1M events)
    .venv/bin/python bench/replay_bench.py --quick    # smoke run (seconds)

Issue 6: "events/s decoded by replay against reading the same raw bytes from Kafka as
the limit (target >= 0.3), and as-of reconstruction over a 1M-event log".

Setup: ``--events`` change events of one table (``public.work_orders``, 7 columns:
bigint key, texts, numeric(10,2), timestamptz) over ``--rows`` keys are encoded exactly
as cdc encodes them (:class:`core.avro_envelope.TableCodec`, Avro single-object encoding,
position header) and produced with kafka-python into one partition, with the schemas in
``{prefix}._schemas``: first an insert per key, then updates (80 %), deletes (10 %) and
re-inserts (10 %), ten events per transaction.  Producing is not timed.

Cases, each reading the whole topic from the beginning with the same consumer settings
(``read_committed``, 10,000 records per poll, 16 MiB per partition fetch):

1. ``raw read``: kafka-python records, touching each value's bytes (the limit);
2. ``replay decode``: :class:`replay.log_reader.LogReader` (position header, dedup check,
   ``core.avro_envelope.decode`` of every value, one :class:`ChangeEvent` each), decoding
   in the reading process (the default below 4 CPUs); once more (one run, against a raw
   run just before it) with one decode worker process (the default from 4 CPUs);
3. ``as-of, end of log``: :func:`replay.state.state_as_of` (decode and apply every event:
   the tables' rows at the end);
4. ``as-of, middle``: the same, stopping at the position of the middle event;
5. ``as-of → sqlite``: writing case 3's state with :func:`replay.output.write_state`;
6. ``history, one row``: :func:`replay.history.row_history` of one key over the whole log
   (only matching keys are decoded).

Cases 1 and 2 alternate ``--repeat`` times (3).  Each replay run is compared with the
raw run just before it, so both saw about the same load from other work on the
machine, and the median of these ratios is reported; seconds are the best run of each
(other load only ever slows a run down).  The broker is an embedded tansu (memory
storage) unless ``--kafka-bootstrap`` is given.  The result table is Markdown, for
docs/performance.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_support
from bench_support import MarkdownTable, machine, ratio

import replay.log_reader
from core.avro_envelope import POSITION_HEADER, Source, TableCodec, position_header
from core.pg_types import ColumnSpec, MappingCatalog
from replay.bounds import Bound
from replay.history import row_history
from replay.keys import KeySpec
from replay.log_reader import LogReader
from replay.log_source import LogSource
from replay.output import write_state
from replay.state import state_as_of

TABLE = "public.work_orders"
COLUMNS = [
    ColumnSpec("id", 20, -1, True),  # int8
    ColumnSpec("site", 25, -1, False),  # text
    ColumnSpec("technician", 25, -1, False),
    ColumnSpec("status", 25, -1, False),
    ColumnSpec("cost", 1700, (10 << 16 | 2) + 4, False),  # numeric(10,2)
    ColumnSpec("updated_at", 1184, -1, False),  # timestamptz
    ColumnSpec("notes", 25, -1, False),
]
STATUSES = ("open", "in_progress", "completed", "cancelled")


def produce(bootstrap: str, prefix: str, events: int, rows: int, seed: int = 7) -> dict[str, Any]:
    """Encode and produce the log; returns what the log holds (expected state size etc.)."""
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    topic = f"{prefix}.{TABLE}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 1, 1), NewTopic(f"{prefix}._schemas", 1, 1)])
    finally:
        admin.close()
    codec = TableCodec(
        db="app",
        schema="public",
        table="work_orders",
        columns=COLUMNS,
        catalog=MappingCatalog(),
        unchanged_sentinel=object(),
        warn=lambda _m: None,
        namespace_prefix=prefix,
    )
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=50,
        batch_size=1 << 20,
        max_request_size=16 << 20,
        acks="all",
    )
    rnd = random.Random(seed)
    alive = KeySet()
    gone: list[int] = []
    lsn = 0x1000000
    ts = int(time.time() * 1e6) - events * 1000
    middle: tuple[int, int] | None = None
    bytes_total = 0
    try:
        for schema in (codec.value_schema_json, codec.key_schema_json):
            assert schema is not None
            producer.send(f"{prefix}._schemas", value=schema.encode())
        for n in range(events):
            seq = n % 10
            if seq == 0:
                lsn += 0x400
                ts += 10_000
            if n < rows:
                op, key = "c", n
            else:
                roll = rnd.random()
                if roll < 0.1 and gone:
                    op, key = "c", gone.pop(rnd.randrange(len(gone)))
                elif roll < 0.2 and len(alive) > 1:
                    op, key = "d", alive.pick(rnd)
                else:
                    op, key = "u", alive.pick(rnd)
            row = [
                str(key),
                f"plant-{key % 50}",
                f"t{key % 400}",
                STATUSES[n % 4],
                f"{(n % 100000) / 100:.2f}",
                "2024-05-01 10:00:00.123456+00",
                f"note {n} for work order {key}",
            ]
            source = Source("app", "public", "work_orders", lsn + seq, lsn, 1, seq, ts)
            if op == "d":
                k, value = codec.encode_change("d", [str(key)] + [None] * 6, None, source, ts)
                alive.remove(key)
                gone.append(key)
            else:
                k, value = codec.encode_change(op, None, row, source, ts)
                alive.add(key)
            bytes_total += len(value) + len(k or b"")
            producer.send(
                topic, key=k, value=value, headers=[(POSITION_HEADER, position_header(lsn, seq))]
            )
            if n == events // 2:
                middle = (lsn, seq)
            if n % 100_000 == 99_999:
                print(f"produced {n + 1:,} events", file=sys.stderr)
        producer.flush()
    finally:
        producer.close()
    assert middle is not None
    return {"rows_at_end": len(alive), "middle": middle, "bytes": bytes_total}


class KeySet:
    """Live keys with O(1) add, remove and random pick."""

    def __init__(self) -> None:
        self.keys: list[int] = []
        self.index: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: int) -> None:
        if key not in self.index:
            self.index[key] = len(self.keys)
            self.keys.append(key)

    def remove(self, key: int) -> None:
        i = self.index.pop(key)
        last = self.keys.pop()
        if last != key:
            self.keys[i] = last
            self.index[last] = i

    def pick(self, rnd: random.Random) -> int:
        return self.keys[rnd.randrange(len(self.keys))]


def raw_read(source: LogSource, prefix: str) -> tuple[int, float]:
    """Every record of the topic, touching its bytes: (records, seconds)."""
    from kafka import TopicPartition

    consumer = source.consumer()
    try:
        tp = TopicPartition(f"{prefix}.{TABLE}", 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        n = 0
        touched = 0
        started = time.perf_counter()
        while consumer.position(tp) < end:
            for records in consumer.poll(timeout_ms=200).values():
                for r in records:
                    touched += len(r.value) + len(r.headers[0][1])
                n += len(records)
        return n, time.perf_counter() - started
    finally:
        consumer.close()


def replay_read(source: LogSource, workers: int = 0) -> tuple[int, float]:
    replay.log_reader.PARALLEL_MIN_RECORDS = 0  # the worker decodes whatever the size
    started = time.perf_counter()
    n = 0
    with LogReader(source, [TABLE], workers=workers) as reader:
        for _ev in reader.events():
            n += 1
    return n, time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"events": args.events, "rows": args.rows}
    with (
        bench_support.services(kafka_bootstrap=args.kafka_bootstrap, pg=False) as svc,
        svc.topic_prefix("rb") as prefix,
    ):
        bootstrap = svc.kafka
        started = time.perf_counter()
        made = produce(bootstrap, prefix, args.events, args.rows)
        results["produce_s"] = time.perf_counter() - started
        results["log_bytes"] = made["bytes"]
        source = LogSource({"bootstrap_servers": bootstrap}, prefix, timeout_s=30)
        source.catalog()
        raw: list[tuple[int, float]] = []
        rep: list[tuple[int, float]] = []
        for _ in range(args.repeat):
            raw.append(raw_read(source, prefix))
            rep.append(replay_read(source))
            print(
                f"raw {raw[-1][0] / raw[-1][1]:,.0f}/s, replay {rep[-1][0] / rep[-1][1]:,.0f}/s",
                file=sys.stderr,
            )
        for n, _ in raw + rep:
            assert n == args.events, f"read {n} of {args.events} events"
        results["raw_s"] = min(s for _, s in raw)
        results["replay_s"] = min(s for _, s in rep)
        # each replay run against the raw run just before it (similar load on the machine)
        results["ratios"] = sorted(r_s / p_s for (_, r_s), (_, p_s) in zip(raw, rep, strict=True))
        raw_w = raw_read(source, prefix)
        n_w, results["worker_s"] = replay_read(source, workers=1)
        assert n_w == args.events
        results["worker_ratio"] = raw_w[1] / results["worker_s"]

        started = time.perf_counter()
        state, _stats = state_as_of(source, [TABLE], None)
        results["asof_end_s"] = time.perf_counter() - started
        rows = len(state.tables[TABLE].rows)
        assert rows == made["rows_at_end"], (rows, made["rows_at_end"])
        results["asof_rows"] = rows

        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            written = write_state(state, Path(tmp) / "state.sqlite", "sqlite")
            results["sqlite_s"] = time.perf_counter() - started
            assert written == rows
        del state

        started = time.perf_counter()
        mid_state, mid_stats = state_as_of(source, [TABLE], Bound(position=made["middle"]))
        results["asof_mid_s"] = time.perf_counter() - started
        results["asof_mid_events"] = mid_stats.events
        results["asof_mid_rows"] = len(mid_state.tables[TABLE].rows)
        del mid_state

        started = time.perf_counter()
        report = row_history(source, TABLE, KeySpec.parse("7"), journal=False)
        results["history_s"] = time.perf_counter() - started
        results["history_versions"] = len(report.versions)
    return results


def table(r: dict[str, Any]) -> str:
    n = r["events"]
    raw_rate = n / r["raw_s"]
    rep_rate = n / r["replay_s"]
    ratios = r["ratios"]
    median = ratios[len(ratios) // 2]  # median of the paired runs
    columns = ["case", "events", "seconds", "events/s", "ratio to raw read"]
    table = MarkdownTable(columns, right=columns[1:])
    table.add(
        "raw read (kafka-python, the limit)", n, f"{r['raw_s']:.1f}", f"{raw_rate:,.0f}", "1.00"
    )
    table.add(
        "replay decode (LogReader)", n, f"{r['replay_s']:.1f}", f"{rep_rate:,.0f}", f"{median:.2f}"
    )
    table.add(
        "replay decode, 1 worker process",
        n,
        f"{r['worker_s']:.1f}",
        f"{n / r['worker_s']:,.0f}",
        f"{r['worker_ratio']:.2f}",
    )
    table.add(
        f"as-of, end of log ({r['asof_rows']:,} rows)",
        n,
        f"{r['asof_end_s']:.1f}",
        f"{n / r['asof_end_s']:,.0f}",
        ratio(r["raw_s"], r["asof_end_s"]),
    )
    table.add(
        f"as-of, middle position ({r['asof_mid_rows']:,} rows)",
        r["asof_mid_events"],
        f"{r['asof_mid_s']:.1f}",
        f"{r['asof_mid_events'] / r['asof_mid_s']:,.0f}",
        "",
    )
    table.add(
        "as-of state → sqlite file", f"{r['asof_rows']:,} rows", f"{r['sqlite_s']:.1f}", "", ""
    )
    table.add(
        f"history of one row ({r['history_versions']} versions)",
        n,
        f"{r['history_s']:.1f}",
        f"{n / r['history_s']:,.0f}",
        "",
    )
    lines = [
        "## replay benchmark results",
        "",
        f"{n:,} events over {r['rows']:,} keys, {r['log_bytes'] / 1e6:,.0f} MB of keys and "
        f"values (produced in {r['produce_s']:.0f} s, not timed)",
        "",
        table.render(),
        "",
        "seconds and events/s: the best of the runs; ratios: replay against the raw read "
        "run just before it, median of "
        f"{len(ratios)} pairs ({', '.join(f'{x:.2f}' for x in ratios)}); as-of and history "
        "against the best raw read",
        f"target: replay decode >= 0.3 of raw read: {'met' if median >= 0.3 else 'NOT met'} "
        f"({median:.2f})",
        f"machine: {machine()}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="events in the log")
    ap.add_argument("--rows", type=int, default=100_000, help="distinct keys")
    ap.add_argument("--repeat", type=int, default=3, help="paired runs of the raw/replay reads")
    bench_support.add_service_flags(ap, pg=False)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.events = min(args.events, 20_000)
        args.rows = min(args.rows, 2_000)
        args.repeat = 1
    args.rows = min(args.rows, args.events)
    print(table(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
