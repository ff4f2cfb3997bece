"""The cdc daemon as a process: SIGTERM (streaming, backoff, snapshot) and kill -9 under load.

Each test runs the installed ``fieldsync cdc run --config FILE`` as a
subprocess against the session's PostgreSQL and broker, and always kills it at
the end.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc import pgoutput_messages as m
from cdc.errors import parse_lsn
from cdc.kafka_sink import KafkaOptions
from cdc.kafka_state import read_resume_position
from cdc.pgoutput_decoder import PgOutputDecoder
from devtools.local_services import free_port
from tests.cdc import test_cdc_cli
from tests.cdc.cdc_crash_workload import (
    CrashDaemon,
    MixedWorkload,
    check_log_against_postgres,
    wait_caught_up,
)
from tests.cdc.cdc_support import table_events, wait_for
from tests.cdc.test_cdc_cli import daemon_config

daemon_process = test_cdc_cli.daemon_process  # the fixture, shared with the CLI tests

PUBLICATION = "fieldsync"


def confirmed_lsn(conn: psycopg.Connection[Any], slot: str) -> int:
    row = conn.execute(
        "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = %s", (slot,)
    ).fetchone()
    return parse_lsn(row[0]) if row and row[0] else 0


def pending_in_slot(conn: psycopg.Connection[Any], slot: str) -> list[tuple[int, str]]:
    """(relation oid, first column) of every insert the slot would still send: what it has not confirmed."""
    decoder = PgOutputDecoder(1)
    out = []
    for lsn, data in conn.execute(
        "select lsn::text, data from pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version', '1', 'publication_names', %s)",
        (slot, PUBLICATION),
    ).fetchall():
        msg = decoder.decode(bytes(data), parse_lsn(lsn))
        if isinstance(msg, m.Insert):
            value = msg.new[0]
            assert isinstance(value, str)
            out.append((msg.relation_oid, value))
    return out


class InsertWriter:
    """Inserts ids 0, 1, 2 ... into ``t`` from a thread, ``rows_per_txn`` rows per transaction."""

    def __init__(self, dsn: str, rows_per_txn: int = 1) -> None:
        self.dsn = dsn
        self.rows_per_txn = rows_per_txn
        self.acked: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            i = 0
            while not self._stop.is_set():
                ids = list(range(i, i + self.rows_per_txn))
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany(
                        "insert into t (id, v) values (%s, %s)", [(j, f"row {j}") for j in ids]
                    )
                self.acked.extend(ids)
                i += self.rows_per_txn
                time.sleep(0.003)

    def __enter__(self) -> InsertWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# --------------------------------------------------------------------------- SIGTERM


@pytest.mark.parametrize("rows_per_txn", [1, 200])
def test_sigterm_flushes_and_confirms_exactly_what_kafka_holds(
    rows_per_txn: int,
    tmp_path: Path,
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    daemon_process: Any,
) -> None:
    """SIGTERM while rows stream in: exit 0; afterwards the slot's confirmed position is
    exactly the end of what Kafka holds: every row is either in Kafka or still pending in
    the slot, never neither, and never both, except for the part of one transaction the
    daemon had read when its stop grace period ran out (it then says so in its log: the
    rest of the transaction was late, e.g. on a loaded machine)."""
    slot = "s_term_" + topic_prefix[-8:]
    config = daemon_config(
        tmp_path / "cdc.toml", dsn=pg_dsn, bootstrap=kafka_bootstrap, prefix=topic_prefix, slot=slot
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table t (id int primary key, v text)")
        oid = conn.execute("select 't'::regclass::oid").fetchone()[0]  # type: ignore[index]
        d = daemon_process(config).start()
        d.wait_streaming()
        start = confirmed_lsn(conn, slot)
        with InsertWriter(pg_dsn, rows_per_txn=rows_per_txn) as writer:
            # events flow: the slot is confirmed only past transactions Kafka acknowledged
            wait_for(
                lambda: confirmed_lsn(conn, slot) > start and len(writer.acked) >= 30,
                what="events flowing",
            )
            t0 = time.monotonic()
            d.signal(signal.SIGTERM)
            code = d.wait(30)
            elapsed = time.monotonic() - t0
            time.sleep(0.2)  # keep writing after the daemon has gone
        assert code == 0, (
            f"exit code {code} after SIGTERM ({elapsed:.1f}s); log:\n{d.log()[-3000:]}"
        )
        events = table_events(kafka_bootstrap, topic_prefix, "t")
        in_kafka = [e["after"]["id"] for e in events]
        pending = [int(v) for rel, v in pending_in_slot(conn, slot) if rel == oid]
    assert len(in_kafka) == len(set(in_kafka)), "duplicates in Kafka"
    both = set(in_kafka) & set(pending)
    if "the last Kafka commit or the slot's confirmation failed" in d.log():
        pass  # the last commit's outcome unknown: Kafka may hold what the slot still has
    elif "whose rest did not arrive" in d.log():
        # the grace period ran out inside a transaction: only its rows read so far are both
        assert len({i // rows_per_txn for i in both}) <= 1, (
            f"rows of several transactions both in Kafka and unconfirmed: {sorted(both)[:10]}; "
            f"log:\n{d.log()[-3000:]}"
        )
    else:
        assert not both, (
            f"rows both in Kafka and unconfirmed in the slot: {sorted(both)[:10]}; "
            f"log:\n{d.log()[-3000:]}"
        )
    assert set(in_kafka) | set(pending) == set(writer.acked), (
        "rows neither in Kafka nor pending in the slot"
    )
    assert "Traceback" not in d.log()


def test_sigterm_during_retry_backoff(
    tmp_path: Path, pg_dsn: str, topic_prefix: str, daemon_process: Any
) -> None:
    """With the broker unreachable the daemon waits between attempts; SIGTERM
    during that wait ends it at once with exit 0."""
    dead_broker = f"127.0.0.1:{free_port()}"
    config = daemon_config(
        tmp_path / "cdc.toml",
        dsn=pg_dsn,
        bootstrap=dead_broker,
        prefix=topic_prefix,
        slot="s_backoff_" + topic_prefix[-8:],
        kafka={"timeout_s": 1.0},
        cdc={"retry_backoff_initial_s": 300.0, "retry_backoff_max_s": 600.0},
    )
    d = daemon_process(config).start()
    d.wait_log("retrying in", timeout=60)
    d.signal(signal.SIGTERM)
    # the wait is 300 s: an exit within 60 s (slow machine included) is SIGTERM ending it
    code = d.wait(60)
    assert code == 0, f"exit code {code}; log:\n{d.log()[-3000:]}"


def test_sigterm_during_snapshot_then_restart_completes_it(
    tmp_path: Path, pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, daemon_process: Any
) -> None:
    """SIGTERM in the middle of the initial snapshot: exit 0; the next
    start begins the snapshot again (documented behaviour) and then every row
    is in Kafka as a snapshot read, with unique positions."""
    rows = 50_000  # the compiled build snapshots 10,000 rows within the 0.3 s below
    slot = "s_snap_" + topic_prefix[-8:]
    config = daemon_config(
        tmp_path / "cdc.toml",
        dsn=pg_dsn,
        bootstrap=kafka_bootstrap,
        prefix=topic_prefix,
        slot=slot,
        kafka={"batch_max_events": 500},
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table t (id int primary key, v text)")
        conn.execute("insert into t select g, 'row ' || g from generate_series(1, %s) g", (rows,))
    d = daemon_process(config).start()
    d.wait_log("created slot")
    time.sleep(0.3)
    d.signal(signal.SIGTERM)
    code = d.wait(60)
    assert code == 0, f"exit code {code}; log:\n{d.log()[-3000:]}"
    assert "initial snapshot done" not in d.log(), (
        "the snapshot finished before SIGTERM: make the table bigger"
    )
    first = len(table_events(kafka_bootstrap, topic_prefix, "t"))
    assert first < rows
    d.start()
    d.wait_streaming(timeout=60)
    assert "starting over" in d.log_since_start()
    events = table_events(kafka_bootstrap, topic_prefix, "t", expect=first + rows, timeout=30)
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0
    positions = [e["_pos"] for e in events]
    assert len(positions) == len(set(positions))
    assert {e["op"] for e in events} == {"r"}
    assert Counter(e["after"]["id"] for e in events[first:]) == Counter(range(1, rows + 1)), (
        "the second snapshot is not complete"
    )


# --------------------------------------------------------------------------- kill -9 under load


@dataclass
class Change:
    table: str
    op: str  # c u d
    id: int
    row: dict[str, Any] | None  # after image (None for delete)


@dataclass
class Workload:
    """Single- and multi-row transactions on tables a and b; logs every committed change in order."""

    dsn: str
    seed: int
    committed: list[Change] = field(default_factory=list)
    txns: int = 0
    state: dict[str, dict[int, dict[str, Any]]] = field(default_factory=lambda: {"a": {}, "b": {}})
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def _one(
        self,
        rnd: random.Random,
        conn: psycopg.Connection[Any],
        next_id: dict[str, int],
        pending: list[Change],
        shadow: dict[str, dict[int, dict[str, Any]]],
    ) -> None:
        table = rnd.choice(["a", "b"])
        rows = shadow[table]
        r = rnd.random()
        if r < 0.5 or len(rows) < 5:
            i = next_id[table]
            next_id[table] += 1
            row = {"id": i, "v": f"{table}{i}", "n": 0}
            conn.execute(f"insert into {table} (id, v, n) values (%s, %s, %s)", (i, row["v"], 0))
            rows[i] = row
            pending.append(Change(table, "c", i, dict(row)))
        elif r < 0.85:
            i = rnd.choice(list(rows))
            row = dict(rows[i], n=rows[i]["n"] + 1, v=f"{table}{i}.{rows[i]['n'] + 1}")
            conn.execute(
                f"update {table} set n = %s, v = %s where id = %s", (row["n"], row["v"], i)
            )
            rows[i] = row
            pending.append(Change(table, "u", i, dict(row)))
        else:
            i = rnd.choice(list(rows))
            conn.execute(f"delete from {table} where id = %s", (i,))
            del rows[i]
            pending.append(Change(table, "d", i, None))

    def run(self) -> None:
        rnd = random.Random(self.seed)
        next_id = {"a": 0, "b": 0}
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    shadow = {t: dict(rows) for t, rows in self.state.items()}
                    pending: list[Change] = []
                    with conn.transaction():
                        for _ in range(1 if rnd.random() < 0.6 else rnd.randint(2, 12)):
                            self._one(rnd, conn, next_id, pending, shadow)
                    self.state = shadow
                    self.committed.extend(pending)
                    self.txns += 1
                    time.sleep(rnd.random() * 0.004)
        except BaseException as exc:
            self.error = exc


def test_kill_9_under_load_loses_nothing(
    tmp_path: Path, pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, daemon_process: Any
) -> None:
    """kill -9 the daemon 6 times at random moments (5 times 0.2-2 s after it
    started streaming, once during start-up) while a writer commits single-
    and multi-row transactions on two tables.  Afterwards Kafka holds every committed change, in commit
    order; records sharing a position are identical (counted: a broker that commits
    a killed producer's open transaction, such as tansu, keeps events whose resume
    position never reached it, and the next daemon writes them again)."""
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    slot = "s_kill_" + topic_prefix[-8:]
    config = daemon_config(
        tmp_path / "cdc.toml",
        dsn=pg_dsn,
        bootstrap=kafka_bootstrap,
        prefix=topic_prefix,
        slot=slot,
        # small batches: Kafka transactions end inside database transactions too
        kafka={"batch_max_events": 7, "batch_max_ms": 20},
        cdc={"retry_backoff_initial_s": 0.1, "retry_backoff_max_s": 0.5},
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for table in ("a", "b"):
            conn.execute(
                f"create table {table} (id int primary key, v text not null, n int not null)"
            )
    work = Workload(pg_dsn, seed)
    writer = threading.Thread(target=work.run, daemon=True)
    d = daemon_process(config).start()
    d.wait_streaming()
    kills: list[str] = []
    try:
        writer.start()
        for k in range(6):
            if k == 2:
                # one kill during start-up (connecting, fencing the old producer, reading the resume position)
                delay = rnd.uniform(0.2, 1.2)
                where = "start-up"
            else:
                d.wait_streaming()
                delay = rnd.uniform(0.2, 2.0)
                where = "streaming"
            time.sleep(delay)
            d.kill()
            kills.append(f"{delay:.2f}s {where}")
            d.start()
        d.wait_streaming()
        time.sleep(0.5)
    finally:
        work.stop.set()
        writer.join(10)
    assert work.error is None, f"writer failed: {work.error!r}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        end = conn.execute("select pg_current_wal_lsn()::text").fetchone()[0]  # type: ignore[index]
        wait_for(
            lambda: confirmed_lsn(conn, slot) >= parse_lsn(end),
            timeout=60,
            what="the daemon to catch up",
        )
        tables = {
            t: {
                r[0]: {"id": r[0], "v": r[1], "n": r[2]}
                for r in conn.execute(f"select id, v, n from {t}").fetchall()
            }
            for t in ("a", "b")
        }
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log()[-3000:]

    expected: dict[str, list[Change]] = defaultdict(list)
    for c in work.committed:
        expected[c.table].append(c)
    duplicates = 0
    twice: list[str] = []
    for table in ("a", "b"):
        events = table_events(kafka_bootstrap, topic_prefix, table)
        by_pos: dict[tuple[int, int], dict[str, Any]] = {}
        for e in events:
            seen = by_pos.get(e["_pos"])
            if seen is None:
                by_pos[e["_pos"]] = e
                continue
            duplicates += 1
            twice.append(
                f"{table} {e['_pos']}: offsets {seen['_offset']}/{e['_offset']}, "
                f"written at {seen['_ts_ms']}/{e['_ts_ms']} ms"
            )
            assert (seen["op"], seen["before"], seen["after"]) == (
                e["op"],
                e["before"],
                e["after"],
            ), f"two different events share position {e['_pos']}"
        unique = [by_pos[p] for p in sorted(by_pos)]
        got = [(e["op"], (e["after"] or e["before"])["id"], e["after"]) for e in unique]
        want = [(c.op, c.id, c.row) for c in expected[table]]
        assert got == want, (
            f"table {table}: Kafka has {len(got)} changes, {len(want)} were committed; first difference at {next((i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y), min(len(got), len(want)))}"
        )
        # final state rebuilt from the events equals the table
        rebuilt: dict[int, dict[str, Any]] = {}
        for e in unique:
            if e["op"] == "d":
                rebuilt.pop(e["before"]["id"], None)
            else:
                rebuilt[e["after"]["id"]] = e["after"]
        assert rebuilt == tables[table]
        inserts = Counter(e["after"]["id"] for e in unique if e["op"] == "c")
        assert inserts == Counter(c.id for c in expected[table] if c.op == "c")
    restarts = d.log().count("streaming slot")
    print(
        f"kill -9 test: seed {seed}, kills {kills}, {work.txns} transactions, {len(work.committed)} changes, "
        f"{restarts} sessions streamed, {duplicates} duplicate record(s) in Kafka"
    )
    if twice:
        print(f"  duplicates (identical, same position): {twice[:20]}")


# --------------------------------------------------------------------------- mixed workload, kills and fault points


@dataclass
class Start:
    """One start of the daemon in a crash run and how it ends."""

    faults: str = ""  # FIELDSYNC_FAULT_POINTS: it kills itself there
    kill_after_s: float | None = None  # else SIGKILL this long after it started streaming ...
    during_startup: bool = False  # ... or after it was started
    step: str | None = None  # a workload step asked for right after the start

    def describe(self) -> str:
        if self.faults:
            what = f"fault point {self.faults}"
        elif self.during_startup:
            what = f"SIGKILL {self.kill_after_s:.2f}s after start"
        else:
            what = f"SIGKILL {self.kill_after_s:.2f}s after streaming"
        return what + (f" (workload: {self.step})" if self.step else "")


def crash_plan(seed: int, random_kills: int, fault_points: bool, big_rows: int) -> list[Start]:
    """The starts of one run: ``random_kills`` kills at random moments (one of them during
    start-up) and, with ``fault_points``, one crash at each named fault point, in an order
    where each point is sure to be reached; the workload's steps in between."""
    rnd = random.Random(seed)
    randoms = [Start(kill_after_s=rnd.uniform(0.1, 2.5)) for _ in range(random_kills)]
    if randoms:
        randoms[rnd.randrange(len(randoms))] = Start(
            kill_after_s=rnd.uniform(0.05, 1.5), during_startup=True
        )
    plan: list[Start] = []
    if fault_points:
        plan += [
            Start(faults=f"after_events_sent:{rnd.randint(1, 4)}"),
            Start(faults=f"before_kafka_commit:{rnd.randint(1, 4)}", step="alter"),
            Start(faults=f"after_kafka_commit:{rnd.randint(1, 4)}", step="truncate"),
            # the large transaction: killed while replaying it, then once Kafka holds its
            # last events but not its end (PostgreSQL sends it again after each crash)
            Start(faults=f"spill_replay:{rnd.randint(1, big_rows)}", step="big"),
            Start(faults="streamed_txn_end:1"),
        ]
    else:
        randoms[0].step = "alter"
        randoms[min(1, len(randoms) - 1)].step = "truncate"
        randoms[rnd.randrange(len(randoms))].step = "big"
    # random kills go before, between and after the fault points, but not between the
    # last two: a start in between could write the large transaction to its end
    slots = [i for i in range(len(plan) + 1) if not (fault_points and i == len(plan) - 1)]
    for start in randoms:
        at = rnd.choice(slots)
        plan.insert(at, start)
        slots = [i if i <= at else i + 1 for i in slots] + [at + 1]
    order = [s.step for s in plan if s.step]
    if order.index("big") < order.index("truncate"):  # truncate first, so the big rows stay
        for s in plan:
            if s.step in ("big", "truncate"):
                s.step = "truncate" if s.step == "big" else "big"
    return plan


def run_crash_workload(
    seed: int,
    *,
    random_kills: int,
    fault_points: bool,
    big_rows: int,
    tmp_path: Path,
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> str:
    """One seeded crash run; returns its summary line (the assertions are inside)."""
    slot = "s_crash_" + topic_prefix[-8:]
    config = daemon_config(
        tmp_path / "cdc.toml",
        # a small logical_decoding_work_mem: PostgreSQL streams the large transaction
        dsn=psycopg.conninfo.make_conninfo(pg_dsn, options="-c logical_decoding_work_mem=64kB"),
        bootstrap=kafka_bootstrap,
        prefix=topic_prefix,
        slot=slot,
        # batches of 500: the snapshot takes several, and one ends exactly at the last
        # event of the large transaction (its big_rows changes), before its end is seen
        kafka={"batch_max_events": 500, "batch_max_ms": 20},
        cdc={
            "retry_backoff_initial_s": 0.1,
            "retry_backoff_max_s": 0.5,
            "spill_dir": str(tmp_path / "spill"),
        },
    )
    work = MixedWorkload(pg_dsn, seed, big_rows=big_rows)
    work.create_tables()
    work.populate(300)  # 600 rows: the snapshot takes 2 batches and a part
    d = CrashDaemon(config, tmp_path / "daemon.log")
    kills: list[str] = []
    pending: list[tuple[str, threading.Event]] = []
    try:
        if fault_points:
            d.start(faults="snapshot_batch:1")
            d.wait_exit(120)
            assert "fault point snapshot_batch reached" in d.log_since_start()
            kills.append("fault point snapshot_batch:1")
        d.start()
        d.wait_log("initial snapshot done", timeout=120)
        d.signal(signal.SIGTERM)
        assert d.wait(60) == 0, d.log_since_start()[-3000:]
        work.start()
        for start in crash_plan(seed, random_kills, fault_points, big_rows):
            d.start(faults=start.faults)
            if start.step:
                pending.append((start.step, work.request_async(start.step)))
            if start.faults:
                point = start.faults.split(":")[0]
                d.wait_exit(300)
                assert f"fault point {point} reached" in d.log_since_start(), (
                    f"the daemon exited without reaching {point}:\n{d.log_since_start()[-3000:]}"
                )
            else:
                if not start.during_startup:
                    d.wait_streaming(120)
                assert start.kill_after_s is not None
                time.sleep(start.kill_after_s)
                d.kill()
            kills.append(start.describe())
            work.check()
        d.start()
        for step, done in pending:
            work.wait_done(done, step)
        time.sleep(0.5)
        work.stop()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            wait_caught_up(conn, slot, d, timeout=300)
        d.signal(signal.SIGTERM)
        assert d.wait(60) == 0, d.log_since_start()[-3000:]
    finally:
        work.stop()
        d.kill()
    # the slot has passed every transaction: Kafka's resume position says the last is complete
    resume = read_resume_position(KafkaOptions(kafka_bootstrap, topic_prefix, ""), slot)
    assert resume is not None and resume.complete, f"seed {seed}: resume position {resume}"
    sessions = d.log().count("streaming slot")
    try:
        report = check_log_against_postgres(pg_dsn, kafka_bootstrap, topic_prefix, work)
    except AssertionError as exc:
        raise AssertionError(
            f"seed {seed}: {exc}\nkills: {kills}\nresume positions: "
            + "\n".join(line for line in d.log().splitlines() if "resume=" in line)
        ) from None
    assert "Traceback" not in d.log(), d.log()[-5000:]
    summary = (
        f"seed {seed}: {len(kills)} kills ({'; '.join(kills)}), {sessions} sessions, "
        f"{work.txns} transactions committed, {work.rolled_back} rolled back, "
        f"{work.savepoints_rolled_back} savepoints rolled back; Kafka: {report.summary()}"
    )
    print(summary)
    if report.duplicates:
        print(f"  duplicates (identical, same position): {report.duplicate_positions[:20]}")
    return summary


def soak_seeds() -> list[int]:
    """``FIELDSYNC_SOAK_SEEDS``: ``a-b`` (inclusive) or ``a,b,c``; default 101-112."""
    spec = os.environ.get("FIELDSYNC_SOAK_SEEDS", "101-112")
    if "-" in spec:
        first, last = spec.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(x) for x in spec.split(",") if x.strip()]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [1, 2])
def test_crash_at_fault_points_and_random_kills_loses_nothing(
    seed: int, tmp_path: Path, pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The mixed workload (snapshot, savepoints, rollbacks, a streamed 50 000-change
    transaction with small ones committing beside it, ALTER TABLE, TRUNCATE) while the
    daemon is killed at every named fault point and 3 times at random moments; afterwards
    every table rebuilt from Kafka alone equals PostgreSQL, value by value, and the
    events per table and op equal what was committed (the fast run of every CI run;
    ``python3 dev.py soak`` runs many seeds)."""
    run_crash_workload(
        seed,
        random_kills=3,
        fault_points=True,
        big_rows=50_000,
        tmp_path=tmp_path,
        pg_dsn=pg_dsn,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
    )


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("seed", soak_seeds())
def test_crash_soak(
    seed: int, tmp_path: Path, pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The crash run with 10 kills at random moments besides the fault points, per seed."""
    run_crash_workload(
        seed,
        random_kills=10,
        fault_points=True,
        big_rows=50_000,
        tmp_path=tmp_path,
        pg_dsn=pg_dsn,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
    )
