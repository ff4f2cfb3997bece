"""The device agent survives SIGKILL at any moment: ``device-agent sync --watch`` runs as a
process against the real cdc, relay and applier (tests/pipeline/pipeline_stack.py) and is
killed with SIGKILL at seeded moments, then started again on the same database:

- during its initial sync of ``items`` (5,000 rows; the relay's ``http.max_page_ops`` is
  150, so the download is some 34 changes messages, all but the last staged in
  ``_fieldsync_staging``): three kills once a seeded number of messages is staged, one a
  seeded moment after nearly all are (in or around the one apply transaction), while an
  app inserts, updates and deletes rows of its own and the office edits PostgreSQL;
- then while the app (plain sqlite3 on the database file) keeps making edits of every
  kind (counter increments, notes, deletes, inserts, edits of its inserted rows) and the
  office edits the same table in PostgreSQL (counters, notes, inserts, deletes), ten kills
  in a seeded order, of each kind twice: once an entry is ``sent`` (uploaded, its outcome not recorded yet), once
  a few entries are ``pending`` (an upload about to start or running), once an entry is
  settled but its edit still awaits its server version (``await_lsn``), a seeded moment
  after a start, and once a bulk office update of 2,500 rows (a second staged download,
  applied with the journal triggers dropped and recreated in its transaction) has a
  seeded number of messages staged.  Each incarnation follows the relay by WebSocket or
  by long-poll (seeded).

The kills wait for these states by polling the metadata tables read-only.  After the last
one the app and the office stop, the agent is started once more and the test waits until
every journal entry has its final status, nothing is awaited, nothing is staged and the
device's ``items`` equals PostgreSQL's value by value; then the agent is stopped
(SIGTERM: exit 0) and checked:

- the journal holds exactly one entry per app statement, in order (none lost, none
  journaled twice), each ``synced`` or ``failed`` with its outcome;
- the applier's ``fieldsync_applier.applied`` has exactly the journal's seqs, with the
  same outcome as the device recorded;
- every counter in PostgreSQL is the office's increments plus the device's applied ones
  (an edit applied twice, or lost, would show), every delete whose outcome is
  ``applied`` is gone;
- ``device-agent verify`` (a process) exits 0; no staged message or staging cursor is left.

The seed is fixed (``SEED``); ``FIELDSYNC_DEVICE_KILL_SEED`` runs another one.  The kills,
what each interrupted, and the time to settle are printed.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from device_agent.client import RelayClient, RetryPolicy
from device_agent.local_tables import PREFIX
from device_agent.sync import init_database
from relay.auth import issue_token
from tests.cdc.test_cdc_cli import cli_env
from tests.pipeline.agent_process import AgentProcess, until
from tests.pipeline.pipeline_stack import Stack, services

SEED = int(os.environ.get("FIELDSYNC_DEVICE_KILL_SEED", "4711"))
DEVICE = "dev-kill"
ROWS = 5000
PAGE_OPS = 150
COUNTERS = range(1, 201)  # both sides add to qty (a counter: increments merge)
APP_NOTES = range(201, 1001)  # the app overwrites notes; the office too from 801
OFFICE_NOTES = range(801, 1501)
APP_DELETES = range(1001, 2001)
OFFICE_DELETES = range(2001, 2501)
BULK = (2501, 5000)  # the office's bulk update: 2,500 ops (>= 2,000: triggers dropped)
APP_INSERTS = 100_000
OFFICE_INSERTS = 200_000
WRITTEN = ("applied", "merged")
FAST = RetryPolicy(attempts=8, initial_s=0.05, max_s=0.5)
DDL = f"""
create table items (id integer primary key, qty integer not null default 0, note text,
    payload text);
insert into items select g, 0, 'seed ' || g, repeat(md5(g::text), 3)
    from generate_series(1, {ROWS}) g;
"""
RULES = '[[bucket]]\nname = "all"\n[[bucket.table]]\ntable = "public.items"\n'
CONFLICTS = (
    '[default]\npolicy = "server_wins"\n\n'
    '[[table]]\ntable = "public.items"\npolicy = "server_wins"\ncolumns = { qty = "counter" }\n'
)
COLUMNS = "id, qty, note, payload"


@dataclass
class Edit:
    """One app statement, as the test made it (its journal entry must match it)."""

    op: str
    id: int
    delta: int = 0  # a counter increment


class Device:
    """The device database: the app's connection (writes) and the test's (reads)."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.app = sqlite3.connect(db, isolation_level=None, timeout=60, check_same_thread=False)
        self.look = sqlite3.connect(db, isolation_level=None, timeout=60)
        self.edits: list[Edit] = []
        self.inserted: list[int] = []  # the app's own rows still present
        self.deletable = list(APP_DELETES)

    def close(self) -> None:
        self.app.close()
        self.look.close()

    def one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self.look.execute(sql, args).fetchone()[0]

    def meta(self, key: str) -> str | None:
        row = self.look.execute(f"select value from {PREFIX}meta where key = ?", (key,))
        got = row.fetchone()
        return None if got is None else got[0]

    def staged(self) -> int:
        return int(self.one(f"select count(*) from {PREFIX}staging"))

    def statuses(self) -> Counter[str]:
        rows = self.look.execute(f"select status, count(*) from {PREFIX}journal group by 1")
        return Counter(dict(rows.fetchall()))

    def awaiting(self) -> int:
        return int(self.one(f"select count(*) from {PREFIX}journal where await_lsn is not null"))

    def synced_once(self) -> bool:
        return self.meta("cursor") is not None and self.staged() == 0

    def rows(self) -> list[tuple[Any, ...]]:
        return self.look.execute(f"select {COLUMNS} from items order by id").fetchall()

    def state(self) -> str:
        s = self.statuses()
        return (
            f"staged {self.staged()}, cursor {'set' if self.meta('cursor') else 'none'}, "
            f"journal {dict(sorted(s.items()))}, awaiting {self.awaiting()}"
        )

    def edit(self, rng: random.Random, initial: bool) -> None:
        """One app statement (only its own rows before the initial sync brought any)."""
        kinds = ["insert", "mine", "mine"]
        if not initial:
            kinds += ["counter"] * 3 + ["note"] * 2 + ["delete"]
        kind = rng.choice(kinds)
        if kind == "mine" and not self.inserted:
            kind = "insert"
        if kind == "insert":
            new = APP_INSERTS + len(self.edits)
            self.run(
                "insert", new, "insert into items (id, qty, note) values (?, 0, ?)", (new, "app")
            )
            self.inserted.append(new)
        elif kind == "mine":
            mine = rng.choice(self.inserted)
            if rng.random() < 0.3:
                self.run("delete", mine, "delete from items where id = ?", (mine,))
                self.inserted.remove(mine)
            else:
                sql = "update items set note = ? where id = ?"
                self.run("update", mine, sql, (f"app {len(self.edits)}", mine))
        elif kind == "counter":
            rid, d = rng.choice(COUNTERS), rng.randint(1, 9)
            sql = "update items set qty = qty + ? where id = ?"
            self.run("update", rid, sql, (d, rid), delta=d)
        elif kind == "note":
            rid = rng.choice(APP_NOTES)
            sql = "update items set note = ? where id = ?"
            self.run("update", rid, sql, (f"app {len(self.edits)}", rid))
        elif self.deletable:
            rid = self.deletable.pop(rng.randrange(len(self.deletable)))
            self.run("delete", rid, "delete from items where id = ?", (rid,))

    def run(self, op: str, rid: int, sql: str, args: tuple[Any, ...], delta: int = 0) -> None:
        cur = self.app.execute(sql, args)
        assert cur.rowcount == 1, f"app: {sql} {args} changed {cur.rowcount} row(s)"
        self.edits.append(Edit(op, rid, delta))


class Office:
    """Edits in PostgreSQL (its own connection), counting what it adds to counters."""

    def __init__(self, dsn: str) -> None:
        self.pg = psycopg.connect(dsn, autocommit=True)
        self.added: Counter[int] = Counter()
        self.inserted = 0
        self.deletable = list(OFFICE_DELETES)

    def edit(self, rng: random.Random) -> None:
        kind = rng.choice(["counter", "counter", "note", "note", "insert", "delete"])
        if kind == "counter":
            rid, d = rng.choice(COUNTERS), rng.randint(1, 9)
            self.pg.execute("update items set qty = qty + %s where id = %s", (d, rid))
            self.added[rid] += d
        elif kind == "note":
            rid = rng.choice(OFFICE_NOTES)
            self.pg.execute(
                "update items set note = %s where id = %s", (f"office {rng.random()}", rid)
            )
        elif kind == "insert":
            self.inserted += 1
            self.pg.execute(
                "insert into items (id, qty, note) values (%s, 0, 'office')",
                (OFFICE_INSERTS + self.inserted,),
            )
        elif self.deletable:
            rid = self.deletable.pop(rng.randrange(len(self.deletable)))
            self.pg.execute("delete from items where id = %s", (rid,))


class Editors:
    """The app and the office editing in two threads until stopped (errors re-raised)."""

    def __init__(self, device: Device, office: Office, seed: int) -> None:
        self.device, self.office = device, office
        self.stop = threading.Event()
        self.initial = True
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._loop, args=(self._app, random.Random(seed + 1))),
            threading.Thread(target=self._loop, args=(self._office, random.Random(seed + 2))),
        ]
        for t in self.threads:
            t.start()

    def _app(self, rng: random.Random) -> None:
        self.device.edit(rng, self.initial)

    def _office(self, rng: random.Random) -> None:
        self.office.edit(rng)

    def _loop(self, step: Callable[[random.Random], None], rng: random.Random) -> None:
        try:
            while not self.stop.wait(rng.uniform(0.01, 0.06)):
                step(rng)
        except BaseException as exc:
            self.errors.append(exc)
            raise

    def check(self) -> None:
        if self.errors:
            raise AssertionError(f"an editor failed: {self.errors[0]!r}") from self.errors[0]

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        self.check()


class KillRun:
    """The kills (seeded), their log, and the waits between them."""

    def __init__(self, device: Device, agent: AgentProcess, editors: Editors, rng: random.Random):
        self.device, self.agent, self.editors, self.rng = device, agent, editors, rng
        self.log: list[str] = []
        self.since = 0.0

    def alive(self) -> None:
        self.agent.alive()
        self.editors.check()

    def start(self) -> None:
        """Start the agent; what it does from now on is new (see :meth:`fresh`)."""
        self.since = float(self.device.one("select julianday('now')"))
        self.agent.start()

    def fresh(self, where: str) -> int:
        """How many journal entries match ``where`` and changed (were made, sent or
        settled) since the agent's last start: a kill then interrupts its own work."""
        return int(
            self.device.one(
                f"""select count(*) from {PREFIX}journal where ({where})
                    and max(created_at, coalesce(sent_at, 0), coalesce(settled_at, 0)) > ?""",
                (self.since,),
            )
        )

    def kill_when(
        self, what: str, check: Callable[[], Any], timeout: float = 40, must: bool = True
    ) -> str:
        """SIGKILL once ``check()`` holds, then start again; the state it interrupted.  A
        state not reached in ``timeout`` fails the test, unless not ``must``: the kill then
        comes anyway (and says so)."""
        try:
            until(check, f"{what} (agent #{self.agent.incarnation})", timeout, self.alive)
        except AssertionError:
            if must or self.agent.proc is None or self.agent.proc.poll() is not None:
                raise
            what += f", not reached in {timeout:g} s"
        self.agent.kill()
        state = self.device.state()
        self.log.append(f"kill {len(self.log) + 1} ({what}): {state}")
        # offline for a seeded moment (the app goes on editing), then back
        self.editors.stop.wait(self.rng.uniform(0, 0.3))
        self.start()
        return state

    def initial_sync(self) -> None:
        """Three kills while messages are staged, one a seeded moment after nearly all
        are (around the apply); every one before the initial sync was applied."""
        messages = ROWS // PAGE_OPS
        for n in sorted(self.rng.sample(range(3, messages - 5), 3)):
            target = max(n, self.device.staged() + 2)
            state = self.kill_when(
                f"initial sync, {target} messages staged",
                self.staged(target),
            )
            assert not self.device.synced_once(), f"the kill came after the initial sync: {state}"
        delay = self.rng.uniform(0, 0.3)
        self.kill_when(
            f"initial sync, {delay:.2f} s after {messages - 2} messages were staged",
            self.device_then(lambda: self.device.staged() >= messages - 2, delay),
        )

    def staged(self, n: int) -> Callable[[], bool]:
        """A check that holds once ``n`` messages are staged."""
        return lambda: self.device.staged() >= n

    def device_then(self, first: Callable[[], bool], delay: float) -> Callable[[], bool]:
        """A check that holds ``delay`` seconds after ``first()`` first held."""
        seen: list[float] = []

        def check() -> bool:
            if not seen and first():
                seen.append(time.monotonic())
            return bool(seen) and time.monotonic() - seen[0] >= delay

        return check

    def editing(self, pg: psycopg.Connection[Any]) -> None:
        """Ten kills in a seeded order (each kind twice), while the app and the office edit."""
        kinds = ["sent", "pending", "awaiting", "random", "bulk"] * 2
        self.rng.shuffle(kinds)
        for kind in kinds:
            if kind == "sent":
                self.kill_when("an entry sent", lambda: self.fresh("status = 'sent'"))
            elif kind == "pending":
                self.kill_when(
                    "3 new entries pending", lambda: self.fresh("status = 'pending'") >= 3
                )
            elif kind == "awaiting":
                self.kill_when(
                    "an entry settled, awaiting its version",
                    lambda: self.fresh(
                        "await_lsn is not null and status not in ('pending', 'sent')"
                    ),
                    timeout=15,
                    must=False,
                )
            elif kind == "random":
                delay = self.rng.uniform(0.2, 2.0)
                self.kill_when(
                    f"{delay:.2f} s after a start", self.device_then(lambda: True, delay)
                )
            else:
                pg.execute(
                    "update items set payload = payload || 'b' where id between %s and %s", BULK
                )
                staged = max(
                    self.rng.randint(2, (BULK[1] - BULK[0]) // PAGE_OPS - 2),
                    self.device.staged() + 2,
                )
                state = self.kill_when(
                    f"bulk office update, {staged} messages staged",
                    self.staged(staged),
                )
                assert "staged 0," not in state, state


def expected_rows(pg: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return pg.execute(f"select {COLUMNS} from items order by id").fetchall()


def differences(device: Device, pg: psycopg.Connection[Any]) -> list[str]:
    """What still keeps the device from being settled (empty: settled)."""
    out = []
    s = device.statuses()
    if s["pending"] or s["sent"]:
        out.append(f"open entries: {s['pending']} pending, {s['sent']} sent")
    if device.awaiting():
        out.append(f"{device.awaiting()} entries awaiting their server version")
    if device.staged():
        out.append(f"{device.staged()} messages staged")
    mine = {r[0]: r for r in device.rows()}
    theirs = {r[0]: r for r in expected_rows(pg)}
    differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if differ:
        sample = [(mine.get(k), theirs.get(k)) for k in differ[:5]]
        out.append(f"{len(differ)} rows differ (device, PostgreSQL): {sample}")
    return out


def check_journal(device: Device, pg: psycopg.Connection[Any], office: Office) -> None:
    """Every app statement journaled once, settled once, applied at most once."""
    entries = device.look.execute(
        f"select seq, op, k, status, outcome from {PREFIX}journal order by seq"
    ).fetchall()
    assert len(entries) == len(device.edits), (
        f"{len(device.edits)} app statements, {len(entries)} journal entries"
    )
    wrong = [
        (seq, op, k, e)
        for (seq, op, k, _s, _o), e in zip(entries, device.edits, strict=True)
        if (op, int(k)) != (e.op, e.id)
    ]
    assert not wrong, f"journal entries not matching the app's statements: {wrong[:5]}"
    kinds: dict[int, str] = {}
    for seq, _op, _k, status, outcome in entries:
        assert outcome is not None, f"entry {seq} is {status} without an outcome"
        kind = json.loads(outcome).get("outcome")
        assert (status, kind in WRITTEN) in {("synced", True), ("failed", False)}, (
            f"entry {seq}: status {status}, outcome {outcome}"
        )
        kinds[seq] = kind
    applied = dict(
        pg.execute(
            "select seq, outcome from fieldsync_applier.applied where device_id = %s", (DEVICE,)
        ).fetchall()
    )
    missing, extra = sorted(kinds.keys() - applied.keys()), sorted(applied.keys() - kinds.keys())
    assert not missing and not extra, (
        f"the applier's record lacks entries {missing[:10]} and has unknown ones {extra[:10]}"
    )
    differ = {s: (kinds[s], applied[s]) for s in kinds if kinds[s] != applied[s]}
    assert not differ, f"outcomes (device, applier) differ: {dict(list(differ.items())[:10])}"
    # a counter increment applied twice or lost would show in the sums
    qty = dict(pg.execute("select id, qty from items where id <= %s", (COUNTERS[-1],)).fetchall())
    device_added: Counter[int] = Counter()
    for (seq, *_), e in zip(entries, device.edits, strict=True):
        if e.delta:
            assert kinds[seq] in WRITTEN, f"counter increment {seq} was {kinds[seq]}"
            device_added[e.id] += e.delta
    wrong_sums = {
        rid: (qty[rid], office.added[rid], device_added[rid])
        for rid in COUNTERS
        if qty[rid] != office.added[rid] + device_added[rid]
    }
    assert not wrong_sums, f"counters (PostgreSQL, office's, device's increments): {wrong_sums}"
    assert sum(device_added.values()) > 0, "no counter increment was made"
    # (a delete of a row the office changed is merged: the server's row stays)
    deleted = [
        e.id
        for (seq, *_), e in zip(entries, device.edits, strict=True)
        if e.op == "delete" and kinds[seq] == "applied"
    ]
    assert deleted, "no delete was applied"
    still = pg.execute("select id from items where id = any(%s)", (deleted,)).fetchall()
    assert not still, f"deletes applied, rows still in PostgreSQL: {still}"


@pytest.mark.timeout(300)
def test_device_agent_survives_kills_during_sync_and_edits(
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute(DDL)
        with services(
            tmp_path,
            pg_dsn,
            store_dsn,
            kafka_bootstrap,
            topic_prefix,
            rules=RULES,
            conflicts=CONFLICTS,
            tables=["public.items"],
            max_page_ops=PAGE_OPS,
        ) as stack:
            db = str(tmp_path / "device.db")
            token = issue_token(stack.keys, None, DEVICE, {}, 3600)
            client = RelayClient(stack.url, token, retry=FAST)
            init_database(db, stack.url, token, client=client)
            wait_for_relay(client, stack)
            client.close()
            device, office = Device(db), Office(pg_dsn)
            agent = AgentProcess(db, tmp_path / "agent.log", rng)
            editors = Editors(device, office, SEED)
            run = KillRun(device, agent, editors, rng)
            try:
                run.start()
                run.initial_sync()
                until(device.synced_once, "the initial sync applied", 60, run.alive)
                editors.initial = False
                run.editing(pg)
                editors.finish()
                last_edit = time.monotonic()
                settle(device, pg, run)
                settled_s = time.monotonic() - last_edit
                code = agent.stop()
                assert code == 0, f"the agent exited with {code} on SIGTERM:\n{agent.tail()}"
                assert device.rows() == expected_rows(pg)
                check_journal(device, pg, office)
                assert device.staged() == 0
                for key in ("staging_cursor", "staging_ops"):
                    assert device.meta(key) is None, f"{key} left behind: {device.meta(key)}"
                verify = subprocess.run(
                    [sys.executable, "-m", "device_agent.cli", "verify", "--db", db, "--json"],
                    capture_output=True,
                    text=True,
                    env=cli_env(),
                    timeout=120,
                )
                assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-3000:]
                report = json.loads(verify.stdout.splitlines()[0])
                assert report["rows"] == [], report
                assert {b["state"] for b in report["buckets"]} == {"ok"}, report
            finally:
                editors.stop.set()
                agent.ensure_dead()
                device.close()
                office.pg.close()
            with capsys.disabled():
                print(
                    f"\nseed {SEED}: {len(run.log)} kills, agent modes {agent.modes}\n"
                    + "\n".join(run.log)
                    + f"\n{len(device.edits)} app edits ({Counter(e.op for e in device.edits)}), "
                    f"{sum(office.added.values())} office counter increments; settled "
                    f"{settled_s:.2f} s after the last edit; {time.monotonic() - started:.1f} s"
                )


def wait_for_relay(client: RelayClient, stack: Stack) -> None:
    """Until the relay's bucket holds every row (so the initial sync is many messages)."""

    def counted() -> bool:
        buckets = client.checkpoint().get("buckets") or {}
        return sum(int(b.get("count", 0)) for b in buckets.values()) >= ROWS

    until(counted, f"the relay holding the {ROWS} rows", 90, stack.check)


def settle(device: Device, pg: psycopg.Connection[Any], run: KillRun) -> None:
    """Until the device is settled and equal to PostgreSQL (deadline: 60 s)."""
    deadline = time.monotonic() + 60
    while diff := differences(device, pg):
        run.agent.alive()
        if time.monotonic() > deadline:
            raise AssertionError(
                "not settled in 60 s after the last kill:\n"
                + "\n".join(diff)
                + "\nkills:\n"
                + "\n".join(run.log)
                + f"\nagent log:\n{run.agent.tail()}"
            )
        time.sleep(0.1)
