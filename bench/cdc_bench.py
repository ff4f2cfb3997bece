#!/usr/bin/env python3
"""Benchmark of the cdc daemon against the limit of this machine.

    python3 dev.py bench                        # every benchmark in bench/, full sizes
    .venv/bin/python bench/cdc_bench.py         # this one, full sizes
    .venv/bin/python bench/cdc_bench.py --quick # smoke run with tiny sizes (seconds)

Five cases, in one run, on one machine, against a PostgreSQL and a
Kafka-protocol broker started by the script (or external ones: ``--pg-dsn``,
``--kafka-bootstrap``):

1. **bulk**: one transaction inserting ``--rows`` rows (500k).  Two logical
   slots are made at the same position before the workload, then each is
   drained on its own, one after the other: ``pg_recvlogical`` with pgoutput
   (protocol 1, output to /dev/null, exits at ``--endpos``) is the limit of
   logical decoding here; the fieldsync cdc daemon (in a thread of this
   process) runs until Kafka has acknowledged every event.  Each is timed from
   its start; events/s of both and their ratio are reported.
2. **txns**: ``--txns`` single-row transactions (100k), written by a
   procedure that commits after each row, before draining; same measurements.
3. **rss**: peak RSS (``VmHWM``) of ``fieldsync cdc run`` as a subprocess
   while it streams one ``--rss-rows`` (1M) row transaction, with the default
   settings (streaming on: PostgreSQL streams a transaction in progress once
   it exceeds ``logical_decoding_work_mem``; cdc spills it to disk).
4. **latency**: a paced writer (pgbench ``--rate``, or a Python writer where
   pgbench is missing) commits ``--rate`` single-row transactions per second
   for ``--seconds``; the daemon records now - commit timestamp of every
   transaction when its Kafka transaction commits (``Stats.commit_latencies_ms``).
5. **hotpath**: the per-event code alone (``bench/cdc_hotpath.py``: pgoutput bytes →
   decoder → assembler → Kafka records, in one process, no I/O), CPU µs per event, once as
   the checkout is built (the compiled modules where ``python3 dev.py`` could build them) and
   once on a copy of its ``.py`` sources; both must write the same record bytes.

Every case gets a database of its own (dropped afterwards, with its slots) and
a topic prefix of its own.  The result table at the end is Markdown, ready
for docs/performance.md.  ``--profile DIR`` writes a cProfile of the daemon
thread per case (the Kafka sender thread is not in it; use py-spy for that).

Concurrency: the daemon runs in a thread (cases 1, 2, 4) or a subprocess
(case 3); the main thread only waits on events and sleeps, so it takes no CPU
worth counting from the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_support
import psycopg
from bench_support import Results, Services, log, percentile

from cdc.errors import format_lsn, parse_lsn

ROOT = Path(__file__).resolve().parent.parent

TABLE_DDL = """
create table t (
    id bigserial primary key,
    h text not null,
    n bigint not null,
    ts timestamptz not null,
    note text
)
"""
BULK_SQL = "insert into t select g, md5(g::text), g, now(), 'bulk' from generate_series(1, %s) g"
TXNS_PROC = """
create procedure gen_txns(n int, inout last_lsn pg_lsn default null) language plpgsql as $$
begin
    for i in 1..n loop
        insert into t values (i, md5(i::text), i, now(), 'txn');
        if i = n then
            last_lsn := pg_current_wal_insert_lsn();
        end if;
        commit;
    end loop;
end $$
"""
WALSENDER_TIMEOUT = "terminating walsender process due to replication timeout"
PGBENCH_SCRIPT = "insert into t (h, n, ts, note) values (md5(random()::text), 1, now(), 'paced');\n"
PYTHON_WRITER = """
import sys, time, psycopg
dsn, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
n = 0
with psycopg.connect(dsn, autocommit=True) as conn:
    t0 = time.monotonic()
    while True:
        due = t0 + n / rate
        if due - t0 >= seconds:
            break
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        conn.execute("insert into t (h, n, ts, note) values (md5(random()::text), 1, now(), 'paced')")
        n += 1
    elapsed = time.monotonic() - t0
print(f"number of transactions actually processed: {n}")
print(f"tps = {n / elapsed:.3f}")
"""


# --------------------------------------------------------------------------- services


def walsender_timeouts(svc: Services) -> int | None:
    """How often PostgreSQL has ended a walsender because its client stopped replying
    (None for an external server: its log is not ours to read)."""
    if svc.pg_log is None:
        return None
    return svc.pg_log.read_text(errors="replace").count(WALSENDER_TIMEOUT)


@dataclass
class Db:
    dsn: str
    prefix: str
    publication: str = "bench_pub"
    ref_slot: str = "bench_ref"
    cdc_slot: str = "bench_cdc"


@contextlib.contextmanager
def bench_database(svc: Services, case: str) -> Iterator[Db]:
    """A fresh database with table ``t`` and a publication for it, and a topic prefix;
    dropped afterwards (with the slots), the topics deleted."""
    with svc.database(f"fsbench_{case}") as dsn, svc.topic_prefix(f"fsbench{case}") as prefix:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(TABLE_DDL)
            conn.execute("create publication bench_pub for table t")
        yield Db(dsn, prefix)


def create_slots(db: Db, *names: str) -> None:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        for name in names:
            conn.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))


def current_lsn(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("select pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(row[0])


def confirmed_lsn(dsn: str, slot: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = %s",
            (slot,),
        ).fetchone()
    return parse_lsn(row[0]) if row and row[0] else 0


def bulk_insert(dsn: str, rows: int) -> int:
    """Insert *rows* rows in one transaction; return an LSN inside it, just before its commit."""
    with psycopg.connect(dsn) as conn:
        conn.execute(BULK_SQL, (rows,))
        row = conn.execute("select pg_current_wal_insert_lsn()::text").fetchone()
        conn.commit()
    assert row is not None
    return parse_lsn(row[0])


# --------------------------------------------------------------------------- the two readers


def run_recvlogical(svc: Services, db: Db, endpos: int, timeout: float) -> float:
    """Drain ``db.ref_slot`` with pg_recvlogical up to *endpos*; return the seconds it took."""
    exe = svc.bindir / "pg_recvlogical"
    if not exe.exists():
        raise SystemExit(f"pg_recvlogical not found in {svc.bindir}; pass --pg-bindir")
    cmd = [
        str(exe), "-d", db.dsn, "--slot", db.ref_slot, "--start",
        "-o", "proto_version=1", "-o", f"publication_names={db.publication}",
        "--endpos", format_lsn(endpos), "--no-loop", "-F", "0", "-f", "/dev/null",
    ]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"pg_recvlogical failed (exit {res.returncode}): {res.stderr.strip()}")
    return elapsed


def daemon_settings(svc: Services, db: Db, **extra: str) -> Any:
    from cdc.settings import load_cdc_settings

    env = {
        "FIELDSYNC_POSTGRES_DSN": db.dsn,
        "FIELDSYNC_POSTGRES_SLOT": db.cdc_slot,
        "FIELDSYNC_POSTGRES_PUBLICATION": db.publication,
        "FIELDSYNC_POSTGRES_TABLES": "public.t",
        "FIELDSYNC_POSTGRES_SNAPSHOT": "never",
        "FIELDSYNC_POSTGRES_STATUS_INTERVAL_S": "1",
        "FIELDSYNC_KAFKA_BOOTSTRAP_SERVERS": svc.kafka,
        "FIELDSYNC_KAFKA_TOPIC_PREFIX": db.prefix,
        **{f"FIELDSYNC_{k.upper()}": v for k, v in extra.items()},
    }
    return load_cdc_settings(None, env)


class DaemonThread:
    """The cdc daemon in a thread, counting events as their Kafka transactions commit."""

    def __init__(
        self, settings: Any, *, record_latency: bool = False, profile: Path | None = None
    ) -> None:
        from cdc.pipeline import CdcDaemon

        self.committed = 0
        self.daemon = CdcDaemon(settings, on_commit=self._on_commit, record_latency=record_latency)
        self.profile = profile
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cdc-daemon", daemon=True)

    def _on_commit(self, events: Sequence[object]) -> None:
        self.committed += len(events)

    def _run(self) -> None:
        prof = cProfile.Profile() if self.profile else None
        try:
            if prof is not None:
                prof.enable()
            self.daemon.run()
        except BaseException as exc:
            self.error = exc
        finally:
            if prof is not None and self.profile is not None:
                prof.disable()
                prof.dump_stats(str(self.profile))

    def start(self) -> float:
        t0 = time.perf_counter()
        self.thread.start()
        return t0

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.daemon.ready.wait(0.05):
            if self.error is not None or not self.thread.is_alive() or time.monotonic() > deadline:
                raise SystemExit(
                    f"cdc daemon did not start streaming within {timeout:.0f}s (error {self.error!r})"
                )

    def wait_written(self, events: int, past_lsn: int, timeout: float) -> float:
        """Wait until Kafka holds *events* events (counted from the start) and the daemon's
        flush position is past *past_lsn*; return the ``perf_counter`` time it saw both.

        Kafka holds them when the daemon has counted that many in its Kafka commits or,
        after a lost session, when its flush position is past *past_lsn* alone: a commit
        that timed out on the client may still have landed, and the next session skips
        those events instead of committing them again, so they are never counted.
        """
        deadline = time.monotonic() + timeout
        while True:
            stats = self.daemon.stats
            if stats.flushed_lsn > past_lsn and (self.committed >= events or stats.sessions > 1):
                return time.perf_counter()
            if self.error is not None or not self.thread.is_alive() or time.monotonic() > deadline:
                raise SystemExit(
                    f"cdc daemon did not write {events} events and confirm past {format_lsn(past_lsn)} "
                    f"within {timeout:.0f}s (counted {self.committed}, flush position "
                    f"{format_lsn(stats.flushed_lsn)}, sessions {stats.sessions}, error {self.error!r})"
                )
            time.sleep(0.002)

    def stop(self) -> None:
        self.daemon.request_stop()
        self.thread.join(60)
        if self.thread.is_alive():
            raise SystemExit("cdc daemon did not stop within 60 s")


def run_daemon_drain(
    svc: Services, db: Db, events: int, confirm_at: int, timeout: float, profile: Path | None
) -> tuple[float, float, int, float, int]:
    """Run the daemon from the slot's position until Kafka holds all *events* events and
    the daemon may confirm the slot past *confirm_at* (an LSN inside the last transaction,
    before its commit record).

    Returns (seconds from start until then, seconds until it was streaming, sessions it
    needed: more than 1 means it lost a connection or a Kafka commit and started over, CPU
    seconds of this process meanwhile: the daemon's thread and kafka-python's sender thread,
    compression included; the main thread only waits, Kafka transactions committed).
    """
    d = DaemonThread(daemon_settings(svc, db), profile=profile)
    cpu0 = time.process_time()
    t0 = d.start()
    try:
        d.wait_ready(timeout)
        ready = time.perf_counter() - t0
        done = d.wait_written(events, confirm_at, timeout)
        stats = d.daemon.stats
        return done - t0, ready, stats.sessions, time.process_time() - cpu0, stats.kafka_commits
    finally:
        d.stop()


def compare(
    res: Results,
    svc: Services,
    db: Db,
    case: str,
    events: int,
    endpos: int,
    confirm_at: int,
    args: argparse.Namespace,
) -> None:
    timeout = max(120.0, events / 500)
    log(f"{case}: pg_recvlogical draining to {format_lsn(endpos)}")
    ref_s = run_recvlogical(svc, db, endpos, timeout)
    log(f"{case}: pg_recvlogical {ref_s:.2f}s; now fieldsync cdc")
    profile = Path(args.profile) / f"cdc_{case.split()[0]}.prof" if args.profile else None
    cdc_s, ready_s, sessions, cpu_s, commits = run_daemon_drain(
        svc, db, events, confirm_at, timeout, profile
    )
    confirmed, deadline = confirmed_lsn(db.dsn, db.cdc_slot), time.monotonic() + 5
    while confirmed < confirm_at and time.monotonic() < deadline:
        time.sleep(0.2)  # the walsender may still be processing the last status update
        confirmed = confirmed_lsn(db.dsn, db.cdc_slot)
    log(
        f"{case}: cdc {cdc_s:.2f}s (streaming after {ready_s:.2f}s); slot confirmed {format_lsn(confirmed)}"
    )
    if confirmed < confirm_at:
        res.notes.append(
            f"{case}: 5 s after the daemon stopped, the slot's confirmed position {format_lsn(confirmed)} "
            f"was still behind {format_lsn(confirm_at)} (the last transaction), though the daemon's "
            "flush position was past it"
        )
    ref_rate, cdc_rate = events / ref_s, events / cdc_s
    ratio = cdc_rate / ref_rate
    bulk = case.startswith("bulk")
    res.add(case, "pg_recvlogical (pgoutput v1, /dev/null)", ref_rate, "events/s")
    res.add(case, "fieldsync cdc to Kafka acks", cdc_rate, "events/s")
    res.add(case, "  of which daemon start-up", ready_s, "s")
    res.add(case, "cdc CPU per event (its process, all threads)", cpu_s / events * 1e6, "µs")
    res.add(case, "cdc sessions restarted (lost connection)", sessions - 1, "")
    res.add(case, "cdc Kafka transactions committed", commits, "")
    res.add(
        case,
        "ratio cdc / pg_recvlogical",
        ratio,
        "",
        ">= 0.5" if bulk else "",
        (ratio >= 0.5) if bulk else None,
    )


# --------------------------------------------------------------------------- cases


def case_bulk(res: Results, svc: Services, args: argparse.Namespace) -> None:
    case = f"bulk {args.rows:,} rows / 1 txn"
    with bench_database(svc, "bulk") as db:
        create_slots(db, db.ref_slot, db.cdc_slot)
        log(f"{case}: inserting")
        t0 = time.perf_counter()
        inside = bulk_insert(db.dsn, args.rows)
        log(f"{case}: inserted in {time.perf_counter() - t0:.1f}s")
        compare(res, svc, db, case, args.rows, current_lsn(db.dsn), inside, args)


def case_txns(res: Results, svc: Services, args: argparse.Namespace) -> None:
    case = f"txns {args.txns:,} x 1 row"
    with bench_database(svc, "txns") as db:
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute(TXNS_PROC)
        create_slots(db, db.ref_slot, db.cdc_slot)
        log(f"{case}: writing")
        t0 = time.perf_counter()
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            row = conn.execute("call gen_txns(%s)", (args.txns,)).fetchone()
        assert row is not None
        log(f"{case}: written in {time.perf_counter() - t0:.1f}s")
        compare(res, svc, db, case, args.txns, current_lsn(db.dsn), parse_lsn(row[0]), args)


def _fieldsync_command() -> list[str]:
    exe = Path(sys.executable).parent / "fieldsync"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fieldsync.cli"]


def _toml_config(svc: Services, db: Db) -> str:
    q = json.dumps
    return (
        f"[postgres]\ndsn = {q(db.dsn)}\nslot = {q(db.cdc_slot)}\npublication = {q(db.publication)}\n"
        f'tables = ["public.t"]\nsnapshot = "never"\nstatus_interval_s = 1.0\n\n'
        f"[kafka]\nbootstrap_servers = {q(svc.kafka)}\ntopic_prefix = {q(db.prefix)}\n\n"
        f'[cdc]\nlog_level = "WARNING"\n'
    )


def _proc_status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def case_rss(res: Results, svc: Services, args: argparse.Namespace) -> None:
    from cdc.kafka_sink import KafkaOptions
    from cdc.kafka_state import read_resume_position

    case = f"rss {args.rss_rows:,} rows / 1 txn"
    with (
        bench_database(svc, "rss") as db,
        tempfile.TemporaryDirectory(prefix="fieldsync-bench-") as tmp,
    ):
        create_slots(db, db.cdc_slot)
        config = Path(tmp) / "cdc.toml"
        config.write_text(_toml_config(svc, db))
        logf = open(Path(tmp) / "cdc.log", "wb")
        proc = subprocess.Popen(
            [*_fieldsync_command(), "cdc", "run", "--config", str(config)],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
        logf.close()
        opts = KafkaOptions(
            bootstrap_servers=svc.kafka, topic_prefix=db.prefix, transactional_id=""
        )
        try:
            deadline = time.monotonic() + 60
            while not _slot_active(db):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"cdc subprocess did not start streaming: {(Path(tmp) / 'cdc.log').read_text()[-2000:]}"
                    )
                time.sleep(0.2)
            base_kb = _proc_status_kb(proc.pid, "VmRSS")
            log(f"{case}: daemon streaming, RSS {base_kb / 1024:.0f} MB; inserting")
            t0 = time.perf_counter()
            inside = bulk_insert(db.dsn, args.rss_rows)
            log(f"{case}: inserted in {time.perf_counter() - t0:.1f}s; waiting for Kafka")
            deadline = time.monotonic() + max(300.0, args.rss_rows / 500)
            while True:
                if proc.poll() is not None:
                    raise SystemExit(
                        f"cdc subprocess exited ({proc.returncode}): {(Path(tmp) / 'cdc.log').read_text()[-2000:]}"
                    )
                pos = read_resume_position(opts, db.cdc_slot, timeout_s=10)
                # the last event is at seq rows-1; "complete" is not written when that
                # event fills a Kafka batch exactly (the commit then needs no new record)
                if (
                    pos is not None
                    and pos.commit_lsn >= inside
                    and (pos.complete or pos.seq >= args.rss_rows - 1)
                ):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"cdc subprocess did not write the {args.rss_rows}-row transaction to Kafka in time (position {pos})"
                    )
                time.sleep(1.0)
            elapsed = time.perf_counter() - t0
            hwm_kb = _proc_status_kb(proc.pid, "VmHWM")
            streamed_mb = _streamed_mb(db)
            restarts = (Path(tmp) / "cdc.log").read_text(errors="replace").count("; retrying in ")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    log(f"{case}: peak RSS {hwm_kb / 1024:.0f} MB, in Kafka {elapsed:.1f}s after the insert began")
    res.add(case, "cdc RSS when streaming, before the txn", base_kb / 1024, "MB")
    bound = 100 if args.rss_rows >= 10_000_000 else 300  # the targets of 10M and 1M rows
    res.add(
        case,
        "cdc peak RSS (VmHWM), streaming on",
        hwm_kb / 1024,
        "MB",
        f"<= {bound}",
        hwm_kb / 1024 <= bound,
    )
    res.add(case, "insert start to all events in Kafka", elapsed, "s")
    res.add(case, "streamed by PostgreSQL before commit", streamed_mb, "MB")
    res.add(case, "cdc sessions restarted (lost connection)", restarts, "")


def _streamed_mb(db: Db) -> float | None:
    """Bytes PostgreSQL streamed through the cdc slot as in-progress transactions (PG 14+)."""
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        try:
            row = conn.execute(
                "select stream_bytes from pg_stat_replication_slots where slot_name = %s",
                (db.cdc_slot,),
            ).fetchone()
        except psycopg.Error:
            return None
    return int(row[0]) / 2**20 if row and row[0] is not None else None


def _slot_active(db: Db) -> bool:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        row = conn.execute(
            "select active from pg_replication_slots where slot_name = %s", (db.cdc_slot,)
        ).fetchone()
    return bool(row and row[0])


def _paced_writer(svc: Services, db: Db, rate: float, seconds: float, tmp: Path) -> list[str]:
    pgbench = svc.bindir / "pgbench"
    if pgbench.exists():
        script = tmp / "insert.sql"
        script.write_text(PGBENCH_SCRIPT)
        clients = max(1, min(8, int(rate // 250)))
        return [
            str(pgbench),
            "-n",
            "-f",
            str(script),
            "-R",
            str(rate),
            "-T",
            str(max(1, round(seconds))),
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            db.dsn,
        ]
    return [sys.executable, "-c", PYTHON_WRITER, db.dsn, str(rate), str(seconds)]


def case_latency(res: Results, svc: Services, args: argparse.Namespace) -> None:
    case = f"latency {args.rate:g} txn/s x {args.seconds:g}s"
    with (
        bench_database(svc, "lat") as db,
        tempfile.TemporaryDirectory(prefix="fieldsync-bench-") as tmp,
    ):
        create_slots(db, db.cdc_slot)
        profile = Path(args.profile) / "cdc_latency.prof" if args.profile else None
        d = DaemonThread(daemon_settings(svc, db), record_latency=True, profile=profile)
        d.start()
        try:
            d.wait_ready(60)
            # warm-up: topic creation and the first schema are not part of the figure
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                conn.execute("insert into t (h, n, ts) values ('warm-up', 0, now())")
            d.wait_written(1, current_lsn(db.dsn) - 1, 120)
            d.daemon.stats.commit_latencies_ms.clear()
            counted = d.committed
            writer = _paced_writer(svc, db, args.rate, args.seconds, Path(tmp))
            log(f"{case}: {Path(writer[0]).name} writing")
            out = subprocess.run(
                writer, capture_output=True, text=True, timeout=args.seconds * 3 + 60
            )
            if out.returncode != 0:
                raise SystemExit(
                    f"paced writer failed (exit {out.returncode}): {out.stderr.strip()}"
                )
            m_n = re.search(r"actually processed: (\d+)", out.stdout)
            m_tps = re.search(r"tps = ([\d.]+)", out.stdout)
            if m_n is None or m_tps is None:
                raise SystemExit(f"cannot read the writer's output: {out.stdout}")
            written, tps = int(m_n.group(1)), float(m_tps.group(1))
            d.wait_written(counted + written, current_lsn(db.dsn) - 1, 120)
            lat = list(d.daemon.stats.commit_latencies_ms)
        finally:
            d.stop()
    if not lat:
        raise SystemExit("no commit latencies were recorded")
    p50, p99, worst = percentile(lat, 50), percentile(lat, 99), max(lat)
    log(
        f"{case}: {written} txns at {tps:.0f}/s; latency p50 {p50:.1f} ms p99 {p99:.1f} ms max {worst:.1f} ms ({len(lat)} samples)"
    )
    res.add(case, "achieved write rate", tps, "txn/s", f"{args.rate:g}", None)
    res.add(case, "commit to Kafka ack p50", p50, "ms")
    # the targets: p99 <= 25 ms at 1,000 txn/s, <= 100 ms at 5,000 txn/s
    bound = 25.0 if args.rate <= 1000 else 100.0
    res.add(case, "commit to Kafka ack p99", p99, "ms", f"<= {bound:g}", p99 <= bound)
    res.add(case, "commit to Kafka ack max", worst, "ms")


def _hotpath(root: Path, events: int, txns: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "bench" / "cdc_hotpath.py"), "--root", str(root)]
    cmd += ["--events", str(events), *(["--txns"] if txns else [])]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench/cdc_hotpath.py failed: {out.stderr.strip()}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def case_hotpath(res: Results, svc: Services, args: argparse.Namespace) -> None:
    """The per-event code alone (no I/O; CPU time), as built and as pure Python sources."""
    with tempfile.TemporaryDirectory(prefix="cdc-hotpath-") as tmp:
        pure = Path(tmp)
        for package in ("core", "cdc"):
            shutil.copytree(ROOT / package, pure / package, ignore=shutil.ignore_patterns("*.so"))
        for txns, events in ((False, min(args.rows, 100_000)), (True, min(args.txns, 100_000))):
            case = f"hotpath {events:,} inserts, {'1 txn each' if txns else '1 txn'}"
            log(f"{case}: as built, then pure Python")
            built, plain = _hotpath(ROOT, events, txns), _hotpath(pure, events, txns)
            if built["digest"] != plain["digest"]:
                raise SystemExit(f"{case}: the builds wrote different record bytes")
            res.add(case, "CPU per event, as built", built["us_per_event"], "µs")
            res.add(case, "  compiled modules loaded", built["compiled"], "")
            res.add(case, "CPU per event, pure Python", plain["us_per_event"], "µs")
            res.add(
                case, "ratio pure / as built", plain["us_per_event"] / built["us_per_event"], ""
            )


CASES: dict[str, Callable[[Results, Services, argparse.Namespace], None]] = {
    "bulk": case_bulk,
    "txns": case_txns,
    "rss": case_rss,
    "latency": case_latency,
    "hotpath": case_hotpath,
}


# --------------------------------------------------------------------------- main


def machine_description(svc: Services) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    from importlib.metadata import version

    return (
        f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GB RAM, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, kafka-python {version('kafka-python')}, psycopg {version('psycopg')}; "
        f"{svc.description}"
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny sizes (each size flag still wins)"
    )
    p.add_argument(
        "--rows", type=int, help="rows of the bulk transaction (default 500000; quick 2000)"
    )
    p.add_argument("--txns", type=int, help="single-row transactions (default 100000; quick 500)")
    p.add_argument(
        "--rss-rows",
        type=int,
        help="rows of the transaction of the RSS case (default 1000000; quick 3000)",
    )
    p.add_argument(
        "--rate", type=float, help="paced writer, transactions per second (default 1000; quick 200)"
    )
    p.add_argument("--seconds", type=float, help="paced writer duration (default 20; quick 2)")
    p.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}"
    )
    bench_support.add_service_flags(p)
    p.add_argument(
        "--pg-bindir",
        help="directory of pg_recvlogical and pgbench (default: where the embedded PostgreSQL comes from)",
    )
    p.add_argument(
        "--profile", metavar="DIR", help="write a cProfile of the daemon thread per case to DIR"
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    defaults = {
        "rows": (500_000, 2000),
        "txns": (100_000, 500),
        "rss_rows": (1_000_000, 3000),
        "rate": (1000.0, 200.0),
        "seconds": (20.0, 2.0),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    import logging

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    res = Results()
    started = time.perf_counter()
    with bench_support.services(args.pg_dsn, args.kafka_bootstrap, pg_bindir=args.pg_bindir) as svc:
        machine = machine_description(svc)
        log(machine)
        for name in args.cases.split(","):
            load_before = os.getloadavg()[0]
            timeouts_before = walsender_timeouts(svc)
            CASES[name](res, svc, args)
            timeouts_after = walsender_timeouts(svc)
            if timeouts_before is not None and timeouts_after is not None:
                res.add(
                    res.rows[-1].case if res.rows else name,
                    "PostgreSQL: walsender ended for replication timeout",
                    timeouts_after - timeouts_before,
                    "",
                )
            res.notes.append(
                f"{name}: 1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
                f"({os.cpu_count()} cores; above ~1.5 means other work competed for the CPUs)"
            )
    print()
    print(
        f"## cdc benchmark results ({time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f}s)"
    )
    print()
    print(f"Machine: {machine}")
    print(f"Command: {' '.join(['bench/cdc_bench.py', *(sys.argv[1:] if argv is None else argv)])}")
    print()
    print(res.table())
    for note in res.notes:
        print(f"\nNote: {note}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": machine, "rows": [r.__dict__ for r in res.rows], "notes": res.notes},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
