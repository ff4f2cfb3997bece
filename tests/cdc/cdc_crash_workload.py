"""The crash tests' seeded mixed workload, the daemon under test, and the check of Kafka
against PostgreSQL (imported by tests, not a plugin).

Workload (:class:`MixedWorkload`): tables ``acct``, ``item`` and ``bulk`` with
several column types; single-row and multi-row transactions, savepoints rolled
back and kept, whole transactions rolled back, one large transaction (50 000
rows by default) that PostgreSQL streams while small transactions commit beside
it, ``ALTER TABLE … ADD COLUMN`` and ``TRUNCATE``.  It counts what was committed
per table and op on the client side; rolled-back work is not counted.

Check (:func:`check_log_against_postgres`): reads every table topic from Kafka
alone (read_committed), drops duplicates (only records with the same position,
which must be identical), rebuilds each table from the events in position order,
and compares it with PostgreSQL value by value, PostgreSQL canonicalizing both
sides: the rebuilt rows go into a temporary table of the same column types, so
each value of the log is cast back through its column's type before comparing.
Per-table per-op event counts are compared with the workload's counts.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from cdc.errors import format_lsn, parse_lsn
from cdc.fault_points import ENV_VAR
from core.avro_envelope import POSITION_HEADER, decode, parse_position_header
from devtools.cdc_demo import read_schemas
from tests.cdc.test_cdc_cli import FIELDSYNC, REPO, DaemonProcess, cli_env

TABLES: dict[str, str] = {
    "acct": "create table acct (id int primary key, owner text not null, "
    "balance numeric(12,2), opened timestamptz, active bool)",
    "item": "create table item (id bigint primary key, name text, qty int, price float8, "
    "attrs jsonb, tags text[])",
    "bulk": "create table bulk (id int primary key, pad text)",
}
BIG_FIRST_ID = 1_000_000  # ids of the large transaction's rows (other bulk rows stay below)


# --------------------------------------------------------------------------- workload


@dataclass
class _Shadow:
    ids: dict[str, set[int]]
    next_id: dict[str, int]

    def copy(self) -> _Shadow:
        return _Shadow({t: set(v) for t, v in self.ids.items()}, dict(self.next_id))


@dataclass
class MixedWorkload:
    """Seeded transactions against ``dsn``; :attr:`committed` counts (table, op) of
    what PostgreSQL committed.  Runs in one thread (:meth:`start`); special steps
    (the large transaction, ALTER TABLE, TRUNCATE) are asked for with
    :meth:`request` and run between two ordinary transactions."""

    dsn: str
    seed: int
    big_rows: int = 50_000
    committed: Counter[tuple[str, str]] = field(default_factory=Counter)
    snapshot_ids: dict[str, set[int]] = field(default_factory=dict)
    txns: int = 0
    rolled_back: int = 0
    savepoints_rolled_back: int = 0
    error: BaseException | None = None
    txn_log: list[tuple[int, Counter[tuple[str, str]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rnd = random.Random(self.seed)
        self.shadow = _Shadow({t: set() for t in TABLES}, {t: 1 for t in TABLES})
        self.item_has_note = False
        self.big_xid: int | None = None
        self._stop = threading.Event()
        self._requests: queue.Queue[tuple[str, threading.Event]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()  # guards committed/txns for readers in other threads

    # -- setup

    def create_tables(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for ddl in TABLES.values():
                conn.execute(ddl)

    def populate(self, rows: int) -> None:
        """Rows present before cdc starts: they reach Kafka as snapshot reads (op r)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn, conn.transaction():
            for table in ("acct", "item"):
                for _ in range(rows):
                    self._insert(conn, table, self.shadow)
        self.snapshot_ids = {t: set(ids) for t, ids in self.shadow.ids.items()}

    # -- values

    def _values(self, table: str, i: int) -> dict[str, Any]:
        r = self.rnd
        if table == "acct":
            return {
                "owner": f"owner {i} {r.choice(['ä', 'ß', 'x', '🙂', ''])}",
                "balance": None if r.random() < 0.1 else Decimal(r.randint(-(10**9), 10**9)) / 100,
                "opened": None
                if r.random() < 0.1
                else f"20{r.randint(10, 30)}-0{r.randint(1, 9)}-1{r.randint(0, 9)} "
                f"{r.randint(0, 23)}:{r.randint(10, 59)}:{r.randint(10, 59)}.{r.randint(0, 999999):06d}+0{r.randint(0, 9)}",
                "active": r.choice([True, False, None]),
            }
        if table == "item":
            v: dict[str, Any] = {
                "name": r.choice([None, f"item {i}", "x" * r.randint(0, 300)]),
                "qty": r.randint(-5, 10_000),
                "price": r.choice([r.uniform(-1e6, 1e6), 0.1, None, float("inf")]),
                "attrs": r.choice([None, '{"a": 1, "b": [true, null]}', f'{{"n": {i}}}']),
                "tags": r.choice([None, [], ["x", None, "y z"], [f"t{i}"]]),
            }
            if self.item_has_note:
                v["note"] = r.choice([None, f"note {i}"])
            return v
        return {"pad": f"pad {i} " + "p" * r.randint(0, 40)}

    @staticmethod
    def _casts(table: str, cols: list[str]) -> list[str]:
        return [
            "%s::jsonb"
            if (table, c) == ("item", "attrs")
            else "%s::timestamptz"
            if c == "opened"
            else "%s::text[]"
            if c == "tags"
            else "%s"
            for c in cols
        ]

    def _insert(self, conn: psycopg.Connection[Any], table: str, shadow: _Shadow) -> None:
        i = shadow.next_id[table]
        shadow.next_id[table] += 1
        values = self._values(table, i)
        cols = list(values)
        conn.execute(
            f"insert into {table} (id, {', '.join(cols)}) values (%s, {', '.join(self._casts(table, cols))})",
            (i, *values.values()),
        )
        shadow.ids[table].add(i)

    def _update(self, conn: psycopg.Connection[Any], table: str, shadow: _Shadow) -> None:
        i = self.rnd.choice(sorted(shadow.ids[table]))
        values = self._values(table, i)
        cols = list(values)
        sets = ", ".join(f"{c} = {x}" for c, x in zip(cols, self._casts(table, cols), strict=True))
        conn.execute(f"update {table} set {sets} where id = %s", (*values.values(), i))

    def _delete(self, conn: psycopg.Connection[Any], table: str, shadow: _Shadow) -> None:
        i = self.rnd.choice(sorted(shadow.ids[table]))
        conn.execute(f"delete from {table} where id = %s", (i,))
        shadow.ids[table].discard(i)

    def _op(self, conn: psycopg.Connection[Any], shadow: _Shadow, counts: Counter[Any]) -> None:
        table = self.rnd.choice(["acct", "acct", "item", "item", "bulk"])
        r = self.rnd.random()
        if r < 0.5 or len(shadow.ids[table]) < 5:
            self._insert(conn, table, shadow)
            counts[(table, "c")] += 1
        elif r < 0.85:
            self._update(conn, table, shadow)
            counts[(table, "u")] += 1
        else:
            self._delete(conn, table, shadow)
            counts[(table, "d")] += 1

    # -- transactions

    def transaction(self, conn: psycopg.Connection[Any]) -> None:
        """One random transaction: single row, several rows, with savepoints, or rolled back."""
        r = self.rnd.random()
        shadow = self.shadow.copy()
        counts: Counter[tuple[str, str]] = Counter()
        conn.execute("begin")
        try:
            if r < 0.45:
                self._op(conn, shadow, counts)
            elif r < 0.75:
                for _ in range(self.rnd.randint(2, 12)):
                    self._op(conn, shadow, counts)
            elif r < 0.9:
                for _ in range(self.rnd.randint(0, 3)):
                    self._op(conn, shadow, counts)
                for sp in range(self.rnd.randint(1, 3)):
                    keep_shadow, keep_counts = shadow.copy(), Counter(counts)
                    conn.execute(f"savepoint s{sp}")
                    for _ in range(self.rnd.randint(1, 4)):
                        self._op(conn, shadow, counts)
                    if self.rnd.random() < 0.5:
                        conn.execute(f"rollback to savepoint s{sp}")
                        shadow, counts = keep_shadow, keep_counts
                        self.savepoints_rolled_back += 1
                    else:
                        conn.execute(f"release savepoint s{sp}")
                self._op(conn, shadow, counts)
            else:
                for _ in range(self.rnd.randint(1, 6)):
                    self._op(conn, shadow, counts)
                conn.execute("rollback")
                self.rolled_back += 1
                return
        except BaseException:
            conn.execute("rollback")
            raise
        xid = conn.execute("select txid_current()").fetchone()[0]  # type: ignore[index]
        conn.execute("commit")
        self._committed(shadow, counts, xid)

    def _committed(
        self, shadow: _Shadow, counts: Counter[tuple[str, str]], xid: int | None = None
    ) -> None:
        with self.lock:
            self.shadow = shadow
            self.committed.update(counts)
            self.txns += 1
            if xid is not None and counts:
                self.txn_log.append((xid, +counts))

    def big_transaction(self, conn: psycopg.Connection[Any]) -> None:
        """``big_rows`` changes in one transaction on a second connection, which PostgreSQL
        streams (the daemon's logical_decoding_work_mem is small); meanwhile ordinary
        transactions commit on ``conn`` (so they precede it in commit order).  Inside it, a
        savepoint that touches ``item`` first and is rolled back, then a kept ``item`` row."""
        half = self.big_rows // 2
        with self.lock:  # two item ids of its own, out of the ordinary transactions' way
            aborted_id, kept_id = self.shadow.next_id["item"], self.shadow.next_id["item"] + 1
            self.shadow.next_id["item"] += 2
        with psycopg.connect(self.dsn, autocommit=True) as big:
            big.execute("begin")
            big.execute(
                "insert into bulk select g, 'big ' || g from generate_series(%s, %s) g",
                (BIG_FIRST_ID, BIG_FIRST_ID + half - 1),
            )
            big.execute("savepoint first_item")
            self._insert(big, "item", _Shadow({"item": set()}, {"item": aborted_id}))
            big.execute("rollback to savepoint first_item")
            for _ in range(3):
                self.transaction(conn)  # commits before the big one
            big.execute(
                "insert into bulk select g, 'big ' || g from generate_series(%s, %s) g",
                (BIG_FIRST_ID + half, BIG_FIRST_ID + self.big_rows - 2),
            )
            kept = _Shadow({"item": set()}, {"item": kept_id})
            self._insert(big, "item", kept)
            xid = big.execute("select txid_current()").fetchone()[0]  # type: ignore[index]
            big.execute("commit")
        shadow = self.shadow.copy()
        shadow.ids["item"] |= kept.ids["item"]
        self.big_xid = xid
        self._committed(shadow, Counter({("bulk", "c"): self.big_rows - 1, ("item", "c"): 1}), xid)

    def alter(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("alter table item add column note text")
        self.item_has_note = True

    def truncate(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("truncate bulk")
        shadow = self.shadow.copy()
        shadow.ids["bulk"] = set()
        self._committed(shadow, Counter({("bulk", "t"): 1}))

    # -- the thread

    def start(self) -> MixedWorkload:
        self._thread = threading.Thread(target=self._run, name="workload", daemon=True)
        self._thread.start()
        return self

    def request_async(self, step: str) -> threading.Event:
        """Ask the workload thread to run ``big``, ``alter`` or ``truncate`` next; the event
        is set when it is done."""
        done = threading.Event()
        self._requests.put((step, done))
        return done

    def request(self, step: str, timeout: float = 300) -> None:
        """:meth:`request_async` and wait until the step is done."""
        self.wait_done(self.request_async(step), step, timeout)

    def wait_done(self, done: threading.Event, step: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not done.wait(0.2):
            self.check()
            assert time.monotonic() < deadline, f"workload step {step} did not finish"
        self.check()

    def _run(self) -> None:
        steps: dict[str, Callable[[psycopg.Connection[Any]], None]] = {
            "big": self.big_transaction,
            "alter": self.alter,
            "truncate": self.truncate,
        }
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self._stop.is_set():
                    try:
                        step, done = self._requests.get_nowait()
                    except queue.Empty:
                        self.transaction(conn)
                        time.sleep(self.rnd.random() * 0.004)
                    else:
                        steps[step](conn)
                        done.set()
        except BaseException as exc:
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the workload failed: {self.error!r}") from self.error

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "the workload thread did not stop"
        self.check()


# --------------------------------------------------------------------------- the daemon


class CrashDaemon(DaemonProcess):
    """``fieldsync cdc run`` as a subprocess, optionally with fault points armed."""

    def start(self, faults: str = "") -> CrashDaemon:  # type: ignore[override]
        import subprocess

        assert self.proc is None or self.proc.poll() is not None, "the daemon is still running"
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = cli_env()
        if faults:
            env[ENV_VAR] = faults
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(FIELDSYNC), "cdc", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        return self

    def wait_exit(self, timeout: float) -> int:
        code = self.wait(timeout)
        assert code is not None, (
            f"the daemon did not exit within {timeout}s; log:\n{self.log_since_start()[-3000:]}"
        )
        return code


def confirmed_lsn(conn: psycopg.Connection[Any], slot: str) -> int:
    row = conn.execute(
        "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = %s", (slot,)
    ).fetchone()
    return parse_lsn(row[0]) if row and row[0] else 0


# --------------------------------------------------------------------------- reading Kafka


def read_all(bootstrap: str, topic: str, timeout: float = 120.0) -> list[Any]:
    """Every record a read_committed reader gets from ``topic``, up to the end offsets taken
    at the start; fails naming the partition and offsets if they cannot be reached."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, (
                f"{topic}: could not read to the end offsets {ends} "
                f"(at {[consumer.position(tp) for tp in tps]})"
            )
            for recs in consumer.poll(timeout_ms=500, max_records=20_000).values():
                records.extend(recs)
        records.sort(key=lambda r: (r.partition, r.offset))
        return records
    finally:
        consumer.close()


# --------------------------------------------------------------------------- the check


@dataclass
class CheckReport:
    events: Counter[tuple[str, str]]
    duplicates: int
    duplicate_positions: list[str]

    def summary(self) -> str:
        return f"{sum(self.events.values())} events, {self.duplicates} duplicate record(s)"


def _to_pg(table: str, column: str, value: Any) -> tuple[str, Any]:
    """(SQL placeholder, parameter) that casts a decoded log value back through the column type."""
    if value is None:
        return "%s", None
    if column == "opened":  # timestamptz: µs since the epoch
        return "'epoch'::timestamptz + %s * interval '1 microsecond'", value
    if column == "attrs":
        return "%s::jsonb", value
    if column == "tags":
        return "%s::text[]", value
    if column == "balance":
        return "%s::numeric(12,2)", str(value)
    return "%s", value


def check_log_against_postgres(
    dsn: str, bootstrap: str, prefix: str, work: MixedWorkload
) -> CheckReport:
    registry = read_schemas(bootstrap, prefix)
    counts: Counter[tuple[str, str]] = Counter()
    duplicates = 0
    twice: list[str] = []
    problems: list[str] = []
    txids: dict[int, int] = {}  # txid -> commit_lsn, as the log has them
    per_txid: defaultdict[int, Counter[tuple[str, str]]] = defaultdict(Counter)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in TABLES:
            by_pos: dict[tuple[int, int], dict[str, Any]] = {}
            for r in read_all(bootstrap, f"{prefix}.public.{table}"):
                pos = parse_position_header(dict(r.headers)[POSITION_HEADER])
                event = decode(r.value, registry)
                event.pop("ts_us")
                seen = by_pos.get(pos)
                if seen is None:
                    by_pos[pos] = event
                    continue
                duplicates += 1
                twice.append(f"{table} {pos}")
                assert seen == event, f"{table}: two different events share position {pos}"
            for pos, e in by_pos.items():
                if e["source"]["txid"] is not None:
                    txids.setdefault(e["source"]["txid"], pos[0])
                    per_txid[e["source"]["txid"]][(table, e["op"])] += 1
            rows: dict[int, dict[str, Any]] = {}
            snapshot_reads: set[int] = set()
            for pos in sorted(by_pos):
                e = by_pos[pos]
                counts[(table, e["op"])] += 1
                if e["op"] in ("c", "u", "r"):
                    rows[e["after"]["id"]] = e["after"]
                    if e["op"] == "r":
                        snapshot_reads.add(e["after"]["id"])
                elif e["op"] == "d":
                    rows.pop(e["before"]["id"], None)
                elif e["op"] == "t":
                    rows.clear()
            missing_reads = work.snapshot_ids.get(table, set()) - snapshot_reads
            if missing_reads:
                problems.append(
                    f"{table}: {len(missing_reads)} rows of the snapshot were never read, "
                    f"e.g. {sorted(missing_reads)[:5]}"
                )
            problems += _compare_table(conn, table, rows)
    want = Counter({k: v for k, v in work.committed.items() if v})
    got = Counter({k: v for k, v in counts.items() if k[1] != "r"})
    if got != want:
        diff = {
            f"{t}.{op}": f"Kafka {got[(t, op)]}, committed {want[(t, op)]}"
            for t, op in sorted(set(got) | set(want))
            if got[(t, op)] != want[(t, op)]
        }
        problems.append(f"events per table and op differ from what was committed: {diff}")
        lost = [
            (x, format_lsn(txids.get(x, 0)), dict(c), dict(per_txid.get(x, Counter())))
            for x, c in work.txn_log
            if per_txid.get(x) != c
        ]
        problems.append(
            f"transactions whose events differ (txid, commit LSN, committed, in Kafka): {lost[:20]}; "
            f"the large transaction: txid {work.big_xid}, commit LSN "
            f"{format_lsn(txids.get(work.big_xid or -1, 0))}"
        )
    assert not problems, "Kafka does not match PostgreSQL:\n" + "\n".join(problems)
    return CheckReport(counts, duplicates, twice)


def _compare_table(
    conn: psycopg.Connection[Any], table: str, rows: dict[int, dict[str, Any]]
) -> list[str]:
    """Differences between the table and the rows rebuilt from the log, column by column."""
    cols = [
        r[0]
        for r in conn.execute(
            "select attname from pg_attribute where attrelid = %s::regclass and attnum > 0 "
            "and not attisdropped order by attnum",
            (table,),
        ).fetchall()
    ]
    chk = f"chk_{table}"
    conn.execute(f"drop table if exists {chk}")
    conn.execute(f"create temp table {chk} (like {table})")
    with conn.transaction(), conn.cursor() as cur:
        for row in rows.values():
            marks, params = zip(*(_to_pg(table, c, row.get(c)) for c in cols), strict=True)
            cur.execute(
                f"insert into {chk} ({', '.join(cols)}) values ({', '.join(marks)})", params
            )
    problems = []
    for c in cols:
        diffs = conn.execute(
            f"select coalesce(p.id, l.id), p.id is null, l.id is null, p.{c}::text, l.{c}::text "
            f"from {table} p full join {chk} l on p.id = l.id "
            f"where p.id is null or l.id is null or p.{c} is distinct from l.{c} "
            "order by 1 limit 5"
        ).fetchall()
        n = conn.execute(
            f"select count(*) from {table} p full join {chk} l on p.id = l.id "
            f"where p.id is null or l.id is null or p.{c} is distinct from l.{c}"
        ).fetchone()[0]  # type: ignore[index]
        for id_, not_in_pg, not_in_log, pv, lv in diffs:
            if not_in_pg:
                problems.append(f"{table} id {id_}: in the log, not in PostgreSQL")
            elif not_in_log:
                problems.append(f"{table} id {id_}: in PostgreSQL, not in the log")
            else:
                problems.append(f"{table} id {id_} column {c}: PostgreSQL {pv!r}, log {lv!r}")
        if n > len(diffs):
            problems.append(f"{table} column {c}: {n} differing rows in all")
        if diffs and (diffs[0][1] or diffs[0][2]):
            break  # missing rows show in every column: once is enough
    conn.execute(f"drop table {chk}")
    return problems


def wait_caught_up(
    conn: psycopg.Connection[Any], slot: str, d: CrashDaemon, timeout: float
) -> None:
    end = parse_lsn(conn.execute("select pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]
    deadline = time.monotonic() + timeout
    while confirmed_lsn(conn, slot) < end:
        assert d.proc is not None and d.proc.poll() is None, (
            f"the daemon exited (code {d.proc and d.proc.poll()}); log:\n{d.log_since_start()[-3000:]}"
        )
        assert time.monotonic() < deadline, (
            f"the slot did not reach {end:X} within {timeout}s; log:\n{d.log_since_start()[-3000:]}"
        )
        time.sleep(0.2)


def log_path(tmp: Path, n: int) -> Path:
    return tmp / f"daemon-{n}.log"
