"""The whole-pipeline convergence run (the soak): a reusable driver, seeded.

Against the real processes (``fieldsync cdc run``, ``fieldsync relay run``, ``fieldsync
relay applier`` as subprocesses, tests/pipeline/pipeline_stack.py) on the test PostgreSQL and
broker, for a number of rounds:

- the office writes in plain SQL (counters, notes, priorities, jobs moved between crews
  and out of every bucket and back, inserts, deletes, stock);
- several devices (in-process agents; apps writing with plain sqlite3, each device
  behind its own TCP proxy, tests/fix_proxy.py) edit and sync; two share a crew and edit
  the same rows (``lww`` notes, ``counter`` hours, ``ask`` priorities whose kept
  conflicts they resolve with ``device-agent conflicts resolve``), and some edits are
  refused upstream (a job moved to another crew or marked done: ``forbidden_move``);
- one device is offline (its proxy refuses connections) through ``offline_edits``
  local edits, then comes online and syncs its backlog while the run goes on;
- two devices' clocks are a day off (+1 d and -1 d);
- a hostile client uploads poison entries through the HTTP API (a value a CHECK
  constraint refuses, one a trigger refuses, a ``base`` position of 2^63), each followed
  by a good entry;

and, at seeded moments, faults: kill -9 of cdc, of the relay and of the applier (each
started again at once), a PostgreSQL restart (``fast`` or ``immediate``, i.e. a crash),
and device connections cut inside a download and inside an upload.

Then nobody edits, and the devices sync until each one's tables equal PostgreSQL
filtered and projected by its rules, value by value, with nothing open (a generous
deadline; whatever still differs then is a divergence).  Finally: every journal entry
has a final outcome (device journals, the relay's intake and outcome store, the
applier's audit table; no conflict left open, nothing in the applier's outbox or
``bad_records``), every poison entry was rejected and wrote nothing, ``fieldsync replay
verify`` is clean, and ``device-agent verify`` is clean on every device.
:meth:`SoakResult.report` prints the faults injected, the divergences found and the
time the devices took to settle.

Device clocks.  The agent has no clock parameter: the HLC of a journal entry takes as
its wall clock the entry's ``at_ms``, which SQLite's ``julianday('now')`` gives when the
app's write fires the journal trigger (device_agent/triggers.py; the column's default is
in device_agent/local_db.py), and the agent's bookkeeping times (``created_at``,
``sent_at``, ``settled_at``) come from the same function on its own connection.  A device clock is skewed by overriding SQLite's
``julianday`` on both of that device's connections (:func:`skew_clock`), so every time
the device reads is off by the same amount, as on a device whose system clock is wrong.

Concurrency: the main thread drives the office, the devices and the hostile client; one
chaos thread per round carries out that round's timed faults (kills, PostgreSQL
restart) at their seeded delays, while the main thread works; cuts are armed on a
device's proxy and fire in the proxy's pump threads.  A kill and the restart after it
hold :attr:`Stack.lock`, so a process killed on purpose is never taken for a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
from typer.testing import CliRunner

from core.hlc import Hlc
from core.row_wire import row_key_text
from device_agent import cli as agent_cli
from device_agent.client import RelayClient, RetryPolicy
from device_agent.errors import DeviceAgentError, RelayUnreachable
from device_agent.local_tables import PREFIX
from device_agent.sync import Agent, init_database
from relay.auth import issue_token
from tests.cdc.test_cdc_cli import run_cli
from tests.fix_proxy import DOWNSTREAM, UPSTREAM, MidCut, TcpProxy
from tests.pipeline.pipeline_stack import Stack, services
from tests.schemas import JOBS_CONFLICTS, JOBS_DDL, JOBS_RULES, JOBS_TABLES, POISON_MARK

CREWS = ("a", "b", "c")
REGIONS = ("north", "south", "east")
JOB_COLUMNS = ("id", "crew", "state", "note", "hours", "priority")
RESERVED_JOBS = (1, 2)
"""Crew a jobs the office never moves or deletes: the hostile client's targets."""
DAY_S = 86_400.0
FAST = RetryPolicy(attempts=8, initial_s=0.05, max_s=0.5)
FINAL_OUTCOMES = {"applied", "merged", "rejected", "resolved"}


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    name: str
    crew: str
    regions: tuple[str, ...]
    skew_s: float = 0.0
    offline: bool = False


DEVICES = (
    DeviceSpec("tab-1", "a", ("north",)),
    DeviceSpec("tab-2", "a", ("north", "south")),
    DeviceSpec("tab-3", "b", ("south",), skew_s=DAY_S),
    DeviceSpec("tab-4", "b", ("east",), skew_s=-DAY_S),
    DeviceSpec("tab-5", "c", ("east", "north")),
    DeviceSpec("tab-6", "c", ("east",), offline=True),
)
ROGUE = DeviceSpec("rogue-1", "a", ())

# --------------------------------------------------------------------------- the plan

KILLS = ("kill -9 cdc", "kill -9 relay", "kill -9 applier")
PG_RESTART = "PostgreSQL restart"
CUT_DOWNLOAD = "cut mid-download"
CUT_UPLOAD = "cut mid-upload"
POISON_KINDS = ("check constraint", "trigger", "base.commit_lsn 2^63", "base.seq 2^63")
OFFLINE = "offline edits"
FAULT_KINDS = (*KILLS, PG_RESTART, CUT_DOWNLOAD, CUT_UPLOAD, "poison entry", "clock skew", OFFLINE)


@dataclasses.dataclass(frozen=True)
class SoakPlan:
    """How big a run is; :meth:`schedule` places the faults, from the seed."""

    seed: int
    variant: str
    rounds: int
    offline_edits: int
    kills_each: int
    pg_restarts: int
    cuts_each: int
    poison_each: int
    settle_timeout_s: float

    @classmethod
    def short(cls, seed: int) -> SoakPlan:
        """Every fault kind at least once, 1,000 offline edits (CI)."""
        return cls(seed, "short", 16, 1_000, 2, 2, 1, 1, 150.0)

    @classmethod
    def full(cls, seed: int) -> SoakPlan:
        return cls(seed, "full", 60, 10_000, 6, 4, 4, 2, 300.0)

    @property
    def back_round(self) -> int:
        """The round in which the offline device comes online (with faults still to come)."""
        return self.rounds * 2 // 3

    def schedule(self) -> list[RoundPlan]:
        rng = random.Random(self.seed * 7919 + 1)
        plans = [RoundPlan() for _ in range(self.rounds)]

        def at(rounds: range, kind: str) -> None:
            plans[rng.choice(rounds)].timed.append((rng.uniform(0.0, 1.2), kind))

        later = range(1, self.rounds)
        for kind in KILLS:
            for i in range(self.kills_each):
                if kind == KILLS[2] and i == 0:
                    # while it works through the offline device's backlog: once it applied
                    # a random share of it (the round the device comes back online)
                    plans[self.back_round - 1].backlog_kill = rng.uniform(0.05, 0.6)
                else:
                    at(later, kind)
        for _ in range(self.pg_restarts):
            at(later, PG_RESTART)
        online = [d.name for d in DEVICES if not d.offline]
        for direction in (CUT_DOWNLOAD, CUT_UPLOAD):
            for _ in range(self.cuts_each):
                plans[rng.choice(later)].cuts.append((rng.choice(online), direction))
        for kind in POISON_KINDS:
            for _ in range(self.poison_each):
                plans[rng.choice(later)].poison.append(kind)
        for p in plans:
            p.timed.sort()
        return plans


@dataclasses.dataclass
class RoundPlan:
    timed: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    backlog_kill: float | None = None
    cuts: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    poison: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Fault:
    kind: str
    round: int
    detail: str


@dataclasses.dataclass
class SoakResult:
    plan: SoakPlan
    faults: list[Fault] = dataclasses.field(default_factory=list)
    divergences: list[str] = dataclasses.field(default_factory=list)
    settle_s: float | None = None
    runtime_s: float = 0.0
    device_edits: int = 0
    office_changes: int = 0
    sync_errors: Counter[str] = dataclasses.field(default_factory=Counter)
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    conflicts_resolved: int = 0
    conflicting_edits: int = 0
    rows_held: int = 0

    def count(self, kind: str) -> int:
        return sum(1 for f in self.faults if f.kind == kind)

    def report(self) -> str:
        p = self.plan
        lines = [
            f"soak {p.variant}, seed {p.seed}: {p.rounds} rounds, {len(DEVICES)} devices "
            f"(+ a hostile client), {self.device_edits} device edits "
            f"({p.offline_edits} of them offline), {self.office_changes} office changes",
            "faults injected:",
        ]
        for kind in FAULT_KINDS:
            mine = [f for f in self.faults if f.kind == kind]
            lines.append(f"  {kind}: {len(mine)}")
            lines += [f"    round {f.round}: {f.detail}" for f in mine]
        lines.append(
            "device syncs that failed while faults lasted: "
            + (", ".join(f"{k} x{n}" for k, n in sorted(self.sync_errors.items())) or "none")
        )
        lines.append(
            "outcomes (applier audit): "
            + ", ".join(f"{k} {n}" for k, n in sorted(self.outcomes.items()))
            + f"; {self.conflicting_edits} rows edited by two devices and the office at once, "
            f"{self.conflicts_resolved} kept conflicts resolved by devices"
        )
        lines.append(f"divergences found: {len(self.divergences)}")
        lines += [f"  {d}" for d in self.divergences]
        settle = "not reached" if self.settle_s is None else f"{self.settle_s:.1f} s"
        lines.append(
            f"devices settled (equal to PostgreSQL, nothing open) {settle} after the last "
            f"edit and fault; {self.rows_held} rows held; runtime {self.runtime_s:.0f} s"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------- device clocks


def skew_clock(conn: sqlite3.Connection, seconds: float) -> None:
    """SQLite's ``julianday`` on this connection reads a clock ``seconds`` off (module
    docstring); other arguments than ``'now'`` are computed by SQLite itself."""
    plain = sqlite3.connect(":memory:", check_same_thread=False)
    lock = threading.Lock()

    def julianday(*args: Any) -> float | None:
        if not args or (args[0] == "now" and len(args) == 1):
            return (time.time() + seconds) / DAY_S + 2440587.5
        with lock:
            marks = ", ".join("?" for _ in args)
            value = plain.execute(f"select julianday({marks})", args).fetchone()[0]
        return None if value is None else float(value)

    conn.create_function("julianday", -1, julianday)


# --------------------------------------------------------------------------- devices


class SoakDevice:
    """A device: its agent and an app writing with plain sqlite3, behind its own proxy."""

    def __init__(self, spec: DeviceSpec, stack: Stack, tmp_path: Path, ttl_s: float) -> None:
        self.spec = spec
        self.name = spec.name
        self.proxy = TcpProxy(*_host_port(stack.url))
        self.url = f"http://{self.proxy.address}"
        self.db = str(tmp_path / f"{spec.name}.db")
        claims = {"crew": spec.crew, "regions": list(spec.regions)}
        token = issue_token(stack.keys, None, spec.name, claims, ttl_s)
        with RelayClient(self.url, token, retry=FAST) as client:
            init_database(self.db, self.url, token, client=client)
        self.agent = Agent(self.db, retry=FAST)
        self.app = sqlite3.connect(self.db, isolation_level=None, timeout=60)
        if spec.skew_s:
            skew_clock(self.app, spec.skew_s)
            skew_clock(self.agent.conn, spec.skew_s)
        self.inserted = 0
        self.proxy_refusing = False
        self.index = int(spec.name.rsplit("-", 1)[1])
        self.conflicts_resolved = 0

    def close(self) -> None:
        self.app.close()
        self.agent.close()
        self.proxy.close()

    # ---- what it holds, what it should hold

    def tables(self) -> dict[str, dict[tuple[Any, ...], tuple[Any, ...]]]:
        jobs = self.app.execute(f"select {', '.join(JOB_COLUMNS)} from jobs").fetchall()
        stock = self.app.execute("select region, part, qty from stock").fetchall()
        return {
            "jobs": {(r[0],): tuple(r) for r in jobs},
            "stock": {(r[0], r[1]): tuple(r) for r in stock},
        }

    def expected(
        self, pg: psycopg.Connection[Any]
    ) -> dict[str, dict[tuple[Any, ...], tuple[Any, ...]]]:
        """PostgreSQL filtered and projected by this device's rules."""
        jobs = pg.execute(
            f"select {', '.join(JOB_COLUMNS)} from jobs where crew = %s and state <> 'done'",
            (self.spec.crew,),
        ).fetchall()
        stock = pg.execute(
            "select region, part, qty from stock where region = any(%s)", (list(self.spec.regions),)
        ).fetchall()
        return {
            "jobs": {(r[0],): tuple(r) for r in jobs},
            "stock": {(r[0], r[1]): tuple(r) for r in stock},
        }

    def open_edits(self) -> int:
        """Entries waiting for a final outcome: pending, sent, or kept as a conflict that
        has not been resolved yet (see :meth:`stuck_conflicts` for the others)."""
        row = self.app.execute(
            f"""select count(*) from {PREFIX}journal j where j.status in ('pending', 'sent')
                or (j.status = 'conflict' and not exists (select 1 from {PREFIX}conflicts c
                    where c.seq = j.seq and c.status = 'resolved'))"""
        ).fetchone()
        return int(row[0])

    def stuck_conflicts(self) -> list[str]:
        """Entries still ``conflict`` whose conflict the device has resolved: no outcome
        will come for them unless the server's conflict is resolved (a divergence)."""
        return [
            f"{self.name}: entry {seq} is still 'conflict', though its conflict #{cid} was "
            f"resolved ({how}) on the device; the server's conflict {detail} was not"
            for seq, cid, how, detail in self.app.execute(
                f"""select j.seq, c.id, c.resolution, json_extract(c.detail, '$.id')
                    from {PREFIX}journal j join {PREFIX}conflicts c on c.seq = j.seq
                    where j.status = 'conflict' and c.status = 'resolved'"""
            ).fetchall()
        ]

    # ---- syncing

    def sync(self, errors: Counter[str]) -> bool:
        """One ``sync_once``; a failure (expected while faults last) is counted."""
        try:
            self.agent.sync_once()
        except DeviceAgentError as exc:
            errors[type(exc).__name__] += 1
            return False
        return True

    def resolve_conflicts(self, rng: random.Random) -> None:
        """Settle the kept conflicts as a person would: ``device-agent conflicts resolve``."""
        for (cid,) in self.app.execute(
            f"select id from {PREFIX}conflicts where status = 'open' order by id"
        ).fetchall():
            choice = rng.choice(["--mine", "--theirs"])
            r = CliRunner().invoke(
                agent_cli.app, ["conflicts", "resolve", str(cid), choice, "--db", self.db, "--json"]
            )
            if r.exit_code == 0 and json.loads(r.stdout.splitlines()[0]).get("on_server"):
                self.conflicts_resolved += 1

    # ---- editing, as an app would

    def edit(self, rng: random.Random, n: int, refused: float = 0.1) -> None:
        """``n`` edits with plain sqlite3; they favour a few rows, which the device's crew
        mate and the office edit too.  A share ``refused`` of them are edits the server
        refuses (a job moved to another crew or marked done: ``forbidden_move``)."""
        jobs = [r[0] for r in self.app.execute("select id from jobs order by id")]
        hot = jobs[:4]
        mine = [j for j in jobs if j >= 10_000 * self.index]
        stock = self.app.execute("select region, part from stock order by 1, 2").fetchall()
        kinds = ["hours"] * 4 + ["note"] * 3 + ["priority"] * 2 + ["stock"] * 3
        kinds += ["state", "insert", "delete"]
        for _ in range(n):
            kind = rng.choice(["done", "reassign"]) if rng.random() < refused else rng.choice(kinds)
            jid = rng.choice(hot if hot and rng.random() < 0.6 else jobs) if jobs else None
            if kind == "insert" or jid is None:
                self.inserted += 1
                self.app.execute(
                    "insert into jobs (id, crew, note, hours, priority) values (?, ?, ?, 0, 3)",
                    (10_000 * self.index + self.inserted, self.spec.crew, f"{self.name} new"),
                )
            elif kind == "stock":
                if stock:
                    region, part = rng.choice(stock)
                    self.app.execute(
                        "update stock set qty = qty + ? where region = ? and part = ?",
                        (rng.randint(1, 5), region, part),
                    )
            elif kind == "delete":
                if mine:
                    self.app.execute("delete from jobs where id = ?", (rng.choice(mine),))
            elif kind == "hours":
                self.app.execute(
                    "update jobs set hours = hours + ? where id = ?", (rng.randint(1, 4), jid)
                )
            elif kind == "note":
                self.app.execute(
                    "update jobs set note = ? where id = ?",
                    (f"{self.name} {rng.random():.4f}", jid),
                )
            elif kind == "priority":
                self.app.execute(
                    "update jobs set priority = ? where id = ?", (rng.randint(1, 5), jid)
                )
            elif kind == "state":
                self.app.execute(
                    "update jobs set state = ? where id = ?",
                    (rng.choice(["in_progress", "open"]), jid),
                )
            elif kind == "done":  # refused upstream: the job would leave the bucket
                self.app.execute("update jobs set state = 'done' where id = ?", (jid,))
            else:  # to another crew: refused upstream (forbidden_move)
                self.app.execute(
                    "update jobs set crew = ? where id = ?",
                    (rng.choice([c for c in CREWS if c != self.spec.crew]), jid),
                )

    def edit_offline(self, rng: random.Random, n: int) -> None:
        """``n`` edits in transactions of 50 (an app batching its writes); few refused ones
        (each refusal blocks the later edits of its row: journal.md, ordering rule)."""
        done = 0
        while done < n:
            batch = min(50, n - done)
            self.app.execute("begin")
            self.edit(rng, batch, refused=0.002)
            self.app.execute("commit")
            done += batch

    def clock_offset_s(self) -> float:
        """How far the HLC of this device's latest entry is from real time."""
        row = self.app.execute(
            f"select max(at_ms) from {PREFIX}journal where hlc_l is not null"
        ).fetchone()
        return 0.0 if row[0] is None else row[0] / 1000.0 - time.time()


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


# --------------------------------------------------------------------------- office


class Office:
    """Server writes in plain SQL, each its own transaction; rides out PostgreSQL restarts
    (a change whose connection broke is dropped: PostgreSQL is the truth either way)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.Connection[Any] | None = None
        self.changes = 0
        self.next_id = 100_000

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        for _ in range(60):
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                cur = self.conn.execute(sql, args)
                return cur.fetchall() if cur.description else []
            except psycopg.OperationalError:
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                time.sleep(0.5)  # waiting out a restart; the next try checks again
        raise AssertionError(f"PostgreSQL did not come back for the office's {sql!r}")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def round(self, rng: random.Random) -> None:
        jobs = [r[0] for r in self.execute("select id from jobs order by id")]
        movable = [j for j in jobs if j not in RESERVED_JOBS]
        for _ in range(rng.randint(2, 5)):
            self.changes += 1
            kind = rng.choice(
                ["hours", "hours", "note", "priority", "state", "crew", "insert", "delete", "stock"]
            )
            # hot rows (the lowest ids of each crew) draw most of the edits, as on devices
            jid = rng.choice(jobs[:12] if rng.random() < 0.5 else jobs) if jobs else None
            mid = rng.choice(movable) if movable else None
            if kind == "insert" or jid is None:
                self.next_id += 1
                self.execute(
                    "insert into jobs (id, crew, note, hours) values (%s, %s, %s, %s)",
                    (self.next_id, rng.choice(CREWS), f"office new {self.next_id}", 1),
                )
            elif kind == "hours":
                self.execute(
                    "update jobs set hours = hours + %s, updated_at = now() where id = %s",
                    (rng.randint(1, 9), jid),
                )
            elif kind == "note":
                self.execute(
                    "update jobs set note = %s, updated_at = now() where id = %s",
                    (f"office {rng.random():.4f}", jid),
                )
            elif kind == "priority":
                self.execute(
                    "update jobs set priority = %s, updated_at = now() where id = %s",
                    (rng.randint(1, 5), jid),
                )
            elif kind == "state" and mid is not None:  # done: out of every bucket; open: back
                self.execute(
                    "update jobs set state = case when state = 'done' then 'open' else 'done' "
                    "end, updated_at = now() where id = %s",
                    (mid,),
                )
            elif kind == "crew" and mid is not None:  # reassigned to another crew
                self.execute(
                    "update jobs set crew = %s, updated_at = now() where id = %s",
                    (rng.choice(CREWS), mid),
                )
            elif kind == "delete" and mid is not None:
                self.execute("delete from jobs where id = %s", (mid,))
            else:
                self.execute(
                    "insert into stock values (%s, %s, %s) on conflict (region, part) "
                    "do update set qty = stock.qty + excluded.qty",
                    (rng.choice(REGIONS), f"p{rng.randint(1, 5)}", rng.randint(1, 5)),
                )


# --------------------------------------------------------------------------- the hostile client


@dataclasses.dataclass
class PoisonSent:
    kind: str
    seq: int
    good_seq: int
    marker: str
    answer: str = ""
    fault: Fault | None = None


class Rogue:
    """A client with a valid token uploading hand-made entries through ``POST /v1/journal``:
    each poison entry is followed by a good one (``applied`` or ``merged`` proves the
    applier moved on)."""

    def __init__(self, stack: Stack, ttl_s: float) -> None:
        self.stack = stack
        self.token = issue_token(stack.keys, None, ROGUE.name, {"crew": ROGUE.crew}, ttl_s)
        self.seq = 0
        self.sent: list[PoisonSent] = []

    def _hlc(self) -> str:
        return Hlc(int(time.time() * 1000), self.seq % 0xFFFF, ROGUE.name).encode()

    def _post(self, entries: list[dict[str, Any]], deadline_s: float = 120.0) -> httpx.Response:
        """POST until an answer that is not 'try again' (the relay may be down right now)."""
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                r = httpx.post(
                    f"{self.stack.url}/v1/journal",
                    json={"entries": entries},
                    headers={"Authorization": f"Bearer {self.token}"},
                    timeout=30,
                )
                if r.status_code != 503:
                    return r
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the relay did not take {entries} in {deadline_s:g} s")
            time.sleep(0.5)  # the relay is restarting: ask again

    def _row(self, office: Office, jid: int) -> dict[str, Any]:
        rows = office.execute(f"select {', '.join(JOB_COLUMNS)} from jobs where id = %s", (jid,))
        return dict(zip(JOB_COLUMNS, rows[0], strict=True))

    def upload(self, kind: str, office: Office, rng: random.Random) -> PoisonSent:
        self.seq += 1
        marker = f"rogue {self.seq} {rng.random():.6f}"
        old = self._row(office, RESERVED_JOBS[0])
        entry: dict[str, Any] = {
            "seq": self.seq,
            "table": "public.jobs",
            "op": "update",
            "key": [old["id"]],
            "old": old,
            "base": None,
            "hlc": self._hlc(),
            "prev_seq": None,
        }
        if kind == "check constraint":
            jid = 900_000 + self.seq
            entry.update(
                op="insert",
                key=[jid],
                new={"id": jid, "crew": ROGUE.crew, "note": f"{marker} {POISON_MARK}"},
            )
            del entry["old"]
        elif kind == "trigger":
            entry["new"] = {"hours": old["hours"] + 5_000_000}
        elif kind == "base.commit_lsn 2^63":
            entry.update(new={"note": marker}, base={"commit_lsn": 2**63, "seq": 0})
        else:
            entry.update(new={"note": marker}, base={"commit_lsn": 1, "seq": 2**63})
        sent = PoisonSent(kind, self.seq, self.seq + 1, marker)
        r = self._post([entry])
        sent.answer = f"HTTP {r.status_code} " + r.text[:200]
        self.seq += 1
        good = self._row(office, RESERVED_JOBS[1])
        self._post(
            [
                {
                    "seq": self.seq,
                    "table": "public.jobs",
                    "op": "update",
                    "key": [good["id"]],
                    "old": good,
                    "new": {"note": f"rogue good {self.seq}"},
                    "base": None,
                    "hlc": self._hlc(),
                    "prev_seq": None,
                }
            ]
        )
        self.sent.append(sent)
        return sent

    def outcomes(self) -> dict[int, dict[str, Any]]:
        """The latest outcome per seq (``GET /v1/outcomes``, every page)."""
        out: dict[int, dict[str, Any]] = {}
        with RelayClient(self.stack.url, self.token, retry=FAST) as client:
            items, _ = client.outcomes(None)
        for o in items:
            out[int(o["seq"])] = o
        return out


# --------------------------------------------------------------------------- the run


class Soak:
    """One seeded run (see the module docstring); :meth:`run` returns the result."""

    def __init__(
        self,
        plan: SoakPlan,
        *,
        pg_server: Any,
        pg_dsn: str,
        store_dsn: str,
        bootstrap: str,
        prefix: str,
        tmp_path: Path,
        log: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.plan = plan
        self.pg_server = pg_server
        self.pg_dsn, self.store_dsn = pg_dsn, store_dsn
        self.bootstrap, self.prefix = bootstrap, prefix
        self.tmp_path = tmp_path
        self.log = log
        self.rng = random.Random(plan.seed)
        self.result = SoakResult(plan)
        self.devices: list[SoakDevice] = []
        self.round_no = 0
        self._fault_lock = threading.Lock()
        self._cut_watchers: list[threading.Thread] = []
        self._notes: list[str] = []
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def note(self, line: str) -> None:
        """A progress line: kept, and handed to ``log`` by the main thread (other threads
        must not touch the output streams: the CLI runner swaps them)."""
        with self._fault_lock:
            self._notes.append(f"[soak {self.elapsed():6.1f} s] {line}")
        if threading.current_thread() is threading.main_thread():
            with self._fault_lock:
                notes, self._notes = self._notes, []
            for n in notes:
                self.log(n)

    def fault(self, kind: str, detail: str) -> Fault:
        f = Fault(kind, self.round_no, detail)
        with self._fault_lock:
            self.result.faults.append(f)
        self.note(f"round {self.round_no}: {kind}: {detail}")
        return f

    # ---- set-up

    def seed_data(self) -> None:
        with psycopg.connect(self.pg_dsn, autocommit=True) as pg:
            pg.execute(JOBS_DDL)
            for i in range(1, 25):
                pg.execute(
                    "insert into jobs (id, crew, note, hours) values (%s, %s, %s, %s)",
                    (i, CREWS[(i - 1) % 3] if i not in RESERVED_JOBS else "a", f"job {i}", i),
                )
            for region in REGIONS:
                for part in ("p1", "p2", "p3", "p4"):
                    pg.execute("insert into stock values (%s, %s, 10)", (region, part))

    @contextlib.contextmanager
    def running(self) -> Iterator[Stack]:
        with services(
            self.tmp_path,
            self.pg_dsn,
            self.store_dsn,
            self.bootstrap,
            self.prefix,
            rules=JOBS_RULES,
            conflicts=JOBS_CONFLICTS,
            tables=JOBS_TABLES,
        ) as stack:
            yield stack

    def run(self) -> SoakResult:
        self.started = time.monotonic()
        self.seed_data()
        ttl = 2 * DAY_S + 3600
        with self.running() as stack:
            self.stack = stack
            self.devices = [SoakDevice(s, stack, self.tmp_path, ttl) for s in DEVICES]
            office = Office(self.pg_dsn)
            try:
                self.rogue = Rogue(stack, ttl)
                self.drive(office)
                last = time.monotonic()
                self.note("settling")
                self.settle(office, last)
                self.note("final checks")
                self.final_checks(office)
            finally:
                self.result.office_changes = office.changes
                office.close()
                for d in self.devices:
                    d.close()
        self.result.runtime_s = self.elapsed()
        return self.result

    # ---- rounds

    def drive(self, office: Office) -> None:
        plan, rng, res = self.plan, self.rng, self.result
        by_name = {d.name: d for d in self.devices}
        with psycopg.connect(self.pg_dsn, autocommit=True) as pg:

            def synced() -> bool:
                for d in self.devices:
                    d.sync(res.sync_errors)
                return not self.differences(pg, self.devices)

            wait_until(
                synced, plan.settle_timeout_s, "the initial sync of every device", self.stack.check
            )
        offline = next(d for d in self.devices if d.spec.offline)
        offline.proxy.refuse()
        offline.proxy_refusing = True
        try:
            offline.agent.sync_once()
            raise AssertionError(f"{offline.name} synced through a proxy refusing connections")
        except RelayUnreachable:
            pass
        per_round = -(-plan.offline_edits // plan.back_round)
        offline_left = plan.offline_edits
        for d in self.devices:
            if d.spec.skew_s:
                self.fault("clock skew", f"{d.name} clock {d.spec.skew_s / 3600:+.0f} h")
        for self.round_no, rp in enumerate(plan.schedule()):
            self.note(f"round {self.round_no}")
            chaos = Chaos(self, rp)
            chaos.start()
            self.conflicting_edits(office, rng)
            office.round(rng)
            for name, kind in rp.cuts:
                self.arm_cut(by_name[name], kind, min_chunk=200)
            for kind in rp.poison:
                sent = self.rogue.upload(kind, office, rng)
                sent.fault = self.fault(
                    "poison entry", f"{kind}: seq {sent.seq}, answered {sent.answer}"
                )
            online = [
                d for d in self.devices if d is not offline or self.round_no >= plan.back_round
            ]
            rng.shuffle(online)
            for d in online:
                n = rng.randint(1, 3)
                d.edit(rng, n)
                res.device_edits += n
                d.sync(res.sync_errors)
                d.resolve_conflicts(rng)
            if self.round_no < plan.back_round:
                n = min(per_round, offline_left)
                offline.edit_offline(rng, n)
                offline_left -= n
                res.device_edits += n
                if self.round_no == plan.back_round - 1:
                    self.fault(
                        OFFLINE,
                        f"{offline.name}: {plan.offline_edits} edits in rounds 0-{self.round_no}",
                    )
                    # back online: its backlog goes up and comes down through cuts
                    self.arm_cut(offline, CUT_UPLOAD, min_chunk=2048)
                    self.arm_cut(offline, CUT_DOWNLOAD, min_chunk=1024)
                    offline.proxy.allow()
                    offline.proxy_refusing = False
                    offline.sync(res.sync_errors)
            chaos.join()
        self.round_no = plan.rounds

    def conflicting_edits(self, office: Office, rng: random.Random) -> None:
        """Two devices of one crew and the office set a job's priority (``ask``: kept
        conflicts, resolved by the devices later) and note (``lww``) to three different
        values before the devices sync."""
        online = [d for d in self.devices if not d.proxy_refusing]
        pairs = [
            (a, b) for a in online for b in online if a.name < b.name and a.spec.crew == b.spec.crew
        ]
        if not pairs:
            return
        a, b = rng.choice(pairs)
        theirs = {k[0] for k in b.tables()["jobs"]}
        shared = sorted(k[0] for k in a.tables()["jobs"] if k[0] in theirs and k[0] < 10_000)
        if not shared:
            return
        jid = rng.choice(shared)
        current = a.tables()["jobs"][(jid,)][5]
        pa, pb, po = rng.sample([p for p in range(1, 6) if p != current], 3)
        for d, p in ((a, pa), (b, pb)):
            d.app.execute(
                "update jobs set priority = ?, note = ? where id = ?", (p, f"{d.name} vs", jid)
            )
        office.execute(
            "update jobs set priority = %s, note = 'office vs', updated_at = now() where id = %s",
            (po, jid),
        )
        self.result.device_edits += 2
        self.result.conflicting_edits += 1

    def arm_cut(self, device: SoakDevice, kind: str, min_chunk: int) -> None:
        direction, request = (
            (UPSTREAM, b"POST /v1/journal")
            if kind == CUT_UPLOAD
            else (DOWNSTREAM, b"GET /v1/changes")
        )
        cut = device.proxy.cut_mid(
            direction, request, min_chunk=min_chunk, rng=random.Random(self.rng.random())
        )
        armed_round = self.round_no

        def report(cut: MidCut = cut) -> None:
            if cut.fired.wait(self.plan.settle_timeout_s):
                with self._fault_lock:
                    self.result.faults.append(
                        Fault(kind, armed_round, f"{device.name}: {cut.describe()}")
                    )

        t = threading.Thread(target=report, daemon=True)
        t.start()
        self._cut_watchers.append(t)

    # ---- convergence

    def differences(self, pg: psycopg.Connection[Any], devices: list[SoakDevice]) -> list[str]:
        """What differs between each device and PostgreSQL filtered and projected by its
        rules, value by value (empty: converged)."""
        out = []
        for d in devices:
            if n := d.open_edits():
                out.append(f"{d.name}: {n} journal entries waiting for a final outcome")
            # a conflict resolved in this very round has its outcome on the way: converged
            # only once it arrived (still missing at the deadline, it is a divergence)
            out += d.stuck_conflicts()
            mine, theirs = d.tables(), d.expected(pg)
            for t in mine:
                for key in sorted(set(mine[t]) | set(theirs[t]), key=repr):
                    a, b = mine[t].get(key), theirs[t].get(key)
                    if a != b:
                        out.append(f"{d.name} {t} {list(key)}: device {a}, PostgreSQL {b}")
        return out

    def settle(self, office: Office, last: float) -> None:
        res = self.result
        for d in self.devices:
            for cut in d.proxy.disarm():
                res.divergences.append(
                    f"{d.name}: a cut was armed but never fired ({cut.direction})"
                )
        deadline = last + self.plan.settle_timeout_s
        with psycopg.connect(self.pg_dsn, autocommit=True) as pg:
            while True:
                try:
                    self.stack.check()
                except AssertionError as exc:  # a process exited that nobody killed
                    res.divergences.append(str(exc))
                    break
                for d in self.devices:
                    d.sync(res.sync_errors)
                    d.resolve_conflicts(self.rng)
                diff = self.differences(pg, self.devices)
                if not diff:
                    res.settle_s = time.monotonic() - last
                    break
                stopped = self.stack.stopped_threads()
                if stopped or time.monotonic() > deadline:
                    # a relay thread that stopped for good leaves the devices behind for ever
                    res.divergences += stopped + diff
                    if not stopped:
                        try:
                            self.explain(pg, diff)
                        except Exception as exc:  # diagnostics only: never hide the result
                            self.note(f"explaining the differences failed: {exc!r}")
                    break
                time.sleep(0.1)  # a pause between sync rounds; the loop checks the state
            res.rows_held = sum(len(t) for d in self.devices for t in d.tables().values())
        res.conflicts_resolved = sum(d.conflicts_resolved for d in self.devices)

    def explain(self, pg: psycopg.Connection[Any], diff: list[str]) -> None:
        """For the first rows that differ: PostgreSQL's whole row, the relay's bucket ops
        for it and ``fieldsync replay history`` (printed, for whoever looks into it)."""
        keys = sorted({int(x.split("[")[1].split("]")[0]) for x in diff if " jobs [" in x})[:3]
        for k in keys:
            lines = [
                f"job {k}: PostgreSQL {pg.execute('select * from jobs where id = %s', (k,)).fetchall()}"
            ]
            with contextlib.suppress(psycopg.Error), psycopg.connect(self.store_dsn) as store:
                for op in store.execute(
                    "select bucket, op_id, kind, data, commit_lsn, seq from fieldsync_relay.ops "
                    "where tbl = 'public.jobs' and row_key = %s order by op_id",
                    (row_key_text([k]),),
                ):
                    lines.append(f"  relay op {op}")
            r = run_cli(
                "replay",
                "history",
                "--config",
                str(self.stack.cdc_config),
                "--table",
                "public.jobs",
                "--key",
                str(k),
                timeout=120,
            )
            lines.append(r.stdout[-3000:] + r.stderr[-500:])
            self.note("\n".join(lines))

    # ---- final checks

    def final_checks(self, office: Office) -> None:
        res = self.result
        res.divergences += [x for x in self.stack.stopped_threads() if x not in res.divergences]
        for t in self._cut_watchers:
            t.join(1)
        for d in self.devices:
            statuses = Counter(
                s for (s,) in d.app.execute(f"select status from {PREFIX}journal").fetchall()
            )
            if set(statuses) - {"synced", "failed"}:
                res.divergences.append(f"{d.name}: journal statuses {dict(statuses)}")
            if d.spec.skew_s:
                off = d.clock_offset_s()
                self.fault_detail_skew(d, off)
        self.check_outcomes(office)
        self.check_poison(office)
        r = run_cli(
            "replay", "verify", "--config", str(self.stack.cdc_config), "--json", timeout=300
        )
        if r.returncode != 0:
            res.divergences.append(
                f"fieldsync replay verify exit {r.returncode}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
            )
        else:
            diffs = json.loads(r.stdout).get("differences")
            if diffs:
                res.divergences.append(f"fieldsync replay verify: {diffs}")
        for d in self.devices:
            r2 = CliRunner().invoke(agent_cli.app, ["verify", "--db", d.db, "--json"])
            if r2.exit_code != 0:
                res.divergences.append(
                    f"device-agent verify {d.name}: exit {r2.exit_code} "
                    f"{(r2.stdout + r2.stderr)[-1000:]} {r2.exception!r}"
                )

    def fault_detail_skew(self, d: SoakDevice, offset_s: float) -> None:
        for f in self.result.faults:
            if f.kind == "clock skew" and f.detail.startswith(d.name + " "):
                f.detail += f"; its entries' HLC wall clock was {offset_s / 3600:+.1f} h off"

    def check_outcomes(self, office: Office) -> None:
        """Every entry the relay took in has a final outcome, in the relay's outcome store
        (what devices read) and in the applier's audit table; no conflict open; nothing
        left in the outbox or in bad_records."""
        res = self.result
        with psycopg.connect(self.store_dsn, autocommit=True) as store:

            def missing() -> list[tuple[Any, ...]]:
                return store.execute(
                    """select i.device_id, i.seq, i.status, o.outcome
                       from fieldsync_relay_journal.intake i
                       left join fieldsync_relay_journal.outcomes o using (device_id, seq)
                       where o.outcome is null or o.outcome not in
                           ('applied', 'merged', 'rejected', 'resolved')
                       order by 1, 2"""
                ).fetchall()

            try:
                wait_until(
                    lambda: not missing(), 120, "a final outcome for every entry", self.stack.check
                )
            except AssertionError:
                rows = missing()
                res.divergences.append(f"{len(rows)} entries without a final outcome: {rows[:20]}")
            intake = {
                (dev, seq)
                for dev, seq in store.execute(
                    "select device_id, seq from fieldsync_relay_journal.intake"
                ).fetchall()
            }
        applied = {
            (dev, seq): outcome
            for dev, seq, outcome in office.execute(
                "select device_id, seq, outcome from fieldsync_applier.applied"
            )
        }
        res.outcomes.update(applied.values())
        if lost := sorted(intake - set(applied)):
            res.divergences.append(
                f"{len(lost)} entries taken in but not in the applier's audit: {lost[:20]}"
            )
        for what, sql in (
            (
                "open conflicts",
                "select count(*) from fieldsync_applier.conflicts where status = 'open'",
            ),
            ("outbox rows", "select count(*) from fieldsync_applier.outbox"),
            ("bad records", "select count(*) from fieldsync_applier.bad_records"),
        ):
            n = office.execute(sql)[0][0]
            if n:
                res.divergences.append(f"{n} {what} left in fieldsync_applier")
        reasons = office.execute(
            "select reason, count(*) from fieldsync_applier.applied where outcome = 'rejected' "
            "group by 1"
        )
        res.outcomes.update({f"rejected:{r}": int(n) for r, n in reasons})

    def check_poison(self, office: Office) -> None:
        res = self.result
        outcomes = self.rogue.outcomes()
        for sent in self.rogue.sent:
            o, good = outcomes.get(sent.seq), outcomes.get(sent.good_seq)
            if o is None or o["outcome"] != "rejected":
                res.divergences.append(f"poison entry {sent.seq} ({sent.kind}): outcome {o}")
            elif sent.fault is not None:
                sent.fault.detail += f"; outcome rejected {o.get('reason')}"
            if good is None or good["outcome"] not in ("applied", "merged"):
                res.divergences.append(
                    f"good entry {sent.good_seq} after the poison: outcome {good}"
                )
            elif sent.fault is not None:
                sent.fault.detail += f", the good entry after it {good['outcome']}"
            written = office.execute(
                "select id from jobs where position(%s in coalesce(note, '')) > 0", (sent.marker,)
            )
            if written:
                res.divergences.append(
                    f"poison entry {sent.seq} ({sent.kind}) was written: {written}"
                )


class Chaos(threading.Thread):
    """One round's timed faults at their seeded delays (module docstring)."""

    def __init__(self, soak: Soak, plan: RoundPlan) -> None:
        super().__init__(daemon=True, name=f"chaos-{soak.round_no}")
        self.soak, self.plan = soak, plan
        self.error: BaseException | None = None

    def run(self) -> None:
        start = time.monotonic()
        try:
            for delay, kind in self.plan.timed:
                time.sleep(max(0.0, start + delay - time.monotonic()))  # a random moment
                self.inject(kind)
            if self.plan.backlog_kill is not None:
                self.kill_in_backlog(self.plan.backlog_kill)
        except BaseException as exc:
            self.error = exc

    def kill_in_backlog(self, share: float) -> None:
        """Kill the applier once it applied ``share`` of the offline device's backlog."""
        soak = self.soak
        device = next(d for d in soak.devices if d.spec.offline)
        want = max(1, int(share * soak.plan.offline_edits))

        def applied() -> int:
            try:
                with psycopg.connect(soak.pg_dsn, connect_timeout=5) as conn:
                    row = conn.execute(
                        "select count(*) from fieldsync_applier.applied where device_id = %s",
                        (device.name,),
                    ).fetchone()
                return int(row[0]) if row else 0
            except psycopg.OperationalError:
                return 0

        deadline = time.monotonic() + 120
        while (n := applied()) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        self.inject(
            KILLS[2],
            f"after {n} of {device.name}'s {soak.plan.offline_edits} "
            "offline entries were applied; ",
        )

    def inject(self, kind: str, when: str = "") -> None:
        soak, stack = self.soak, self.soak.stack
        t0 = time.monotonic()
        if kind == PG_RESTART:
            mode = ("immediate", "fast")[soak.result.count(PG_RESTART) % 2]
            soak.pg_server.restart(mode)
            soak.fault(
                kind,
                f"mode {mode} ({'a crash' if mode == 'immediate' else 'clean'}), "
                f"down {time.monotonic() - t0:.1f} s",
            )
            return
        name = kind.rsplit(" ", 1)[1]
        pid = stack.procs[name].proc.pid
        code = stack.kill_and_restart(name)
        if name == "relay":
            for d in soak.devices:
                d.proxy.target = _host_port(stack.url)
        soak.fault(kind, f"{when}pid {pid} exit {code}, restarted in {time.monotonic() - t0:.1f} s")

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout if timeout is not None else 300)
        if self.is_alive():
            raise AssertionError(f"{self.name}: faults not done in 300 s")
        if self.error is not None:
            raise self.error


def wait_until(
    done: Callable[[], bool], timeout: float, what: str, check: Callable[[], None] = lambda: None
) -> None:
    """Poll ``done`` (calling ``check`` between polls) until true, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not done():
        check()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:g} s")
        time.sleep(0.2)
