"""Devices converge, end to end against the real processes: PostgreSQL and the broker
(the test fixtures), ``fieldsync cdc run``, ``fieldsync relay run`` and ``fieldsync relay
applier`` as subprocesses with their own settings, rules and conflicts files (not the
demo's), and five devices (in-process agents, apps writing with plain sqlite3).

Schema, rules and policies: the crews schema of tests/schemas.py, shared with the soak
(tests/pipeline/pipeline_soak.py): ``jobs`` (integer key; ``crew`` picks the bucket;
``state`` = done takes a job out; ``note`` lww; ``hours`` a counter; ``priority``, not
edited here; ``secret`` and ``updated_at`` excluded) and ``stock`` (two-column text key;
``qty`` a counter; buckets per region from a list claim).  Two devices share crew a (the
same jobs), two share region north.

For a number of rounds the office (plain SQL) adds to counters, overwrites notes, moves
jobs out of a crew's bucket and back (state, crew), inserts and deletes jobs and stock;
each device meanwhile makes one to three edits (counters, notes, state) and syncs.  Then
nobody edits, the devices sync until each one's tables equal PostgreSQL filtered and
projected by its rules, value by value, with no edit open; ``device-agent verify`` is
clean on every device.  The time the devices took to settle after the last edit is
printed (not asserted: the machine is shared).
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from device_agent import cli
from device_agent.client import RelayClient, RetryPolicy
from device_agent.local_tables import PREFIX
from device_agent.sync import Agent, init_database
from relay.auth import issue_token
from relay.auth_keys import KeyStore
from tests.pipeline.pipeline_stack import Process, services
from tests.schemas import JOBS_CONFLICTS, JOBS_DDL, JOBS_RULES, JOBS_TABLES

DEVICES = {
    "tab-1": ("a", ["north"]),
    "tab-2": ("a", ["north", "south"]),
    "tab-3": ("b", ["south"]),
    "tab-4": ("c", ["east"]),
    "tab-5": ("b", ["east", "north"]),
}
CREWS = ("a", "b", "c")
REGIONS = ("north", "south", "east")
ROUNDS = 12
FAST = RetryPolicy(attempts=8, initial_s=0.05, max_s=0.5)
SEED = 1616


class Device:
    def __init__(self, name: str, url: str, keys: KeyStore, tmp_path: Path) -> None:
        self.name = name
        self.crew, self.regions = DEVICES[name]
        self.db = str(tmp_path / f"{name}.db")
        token = issue_token(keys, None, name, {"crew": self.crew, "regions": self.regions}, 3600)
        init_database(self.db, url, token, client=RelayClient(url, token, retry=FAST))
        self.agent = Agent(self.db, retry=FAST)
        self.app = sqlite3.connect(self.db, isolation_level=None, timeout=30)
        self.inserted = 0

    def close(self) -> None:
        self.app.close()
        self.agent.close()

    def tables(self) -> dict[str, list[tuple[Any, ...]]]:
        return {
            "jobs": self.app.execute(
                "select id, crew, state, note, hours from jobs order by id"
            ).fetchall(),
            "stock": self.app.execute(
                "select region, part, qty from stock order by region, part"
            ).fetchall(),
        }

    def expected(self, pg: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
        """PostgreSQL filtered and projected by this device's rules."""
        return {
            "jobs": pg.execute(
                "select id, crew, state, note, hours from jobs where crew = %s and "
                "state <> 'done' order by id",
                (self.crew,),
            ).fetchall(),
            "stock": pg.execute(
                "select region, part, qty from stock where region = any(%s) "
                'order by region collate "C", part collate "C"',
                (self.regions,),
            ).fetchall(),
        }

    def open_edits(self) -> int:
        row = self.app.execute(
            f"select count(*) from {PREFIX}journal where status in ('pending', 'sent')"
        ).fetchone()
        return int(row[0])

    def edit(self, rng: random.Random, n: int) -> None:
        """``n`` edits with plain sqlite3, as an app would make them."""
        jobs = [r[0] for r in self.app.execute("select id from jobs order by id")]
        stock = self.app.execute("select region, part from stock order by 1, 2").fetchall()
        for _ in range(n):
            kind = rng.choice(["hours", "hours", "note", "state", "stock", "insert"])
            if kind == "insert":
                self.inserted += 1
                jid = 1000 * int(self.name[-1]) + self.inserted
                self.app.execute(
                    "insert into jobs (id, crew, note, hours) values (?, ?, ?, 0)",
                    (jid, self.crew, f"{self.name} new"),
                )
            elif kind == "stock" and stock:
                region, part = rng.choice(stock)
                self.app.execute(
                    "update stock set qty = qty + ? where region = ? and part = ?",
                    (rng.randint(1, 5), region, part),
                )
            elif jobs:
                jid = rng.choice(jobs)
                if kind == "hours":
                    sql, arg = "update jobs set hours = hours + ? where id = ?", rng.randint(1, 4)
                elif kind == "note":
                    sql, arg = (
                        "update jobs set note = ? where id = ?",
                        f"{self.name} {rng.random():.3f}",
                    )
                else:  # done is refused upstream (it would leave the device's buckets)
                    sql, arg = (
                        "update jobs set state = ? where id = ?",
                        rng.choice(["in_progress", "open", "done"]),
                    )
                self.app.execute(sql, (arg, jid))


def office(pg: psycopg.Connection[Any], rng: random.Random, round_no: int) -> None:
    """Two to four changes in plain SQL, each its own transaction."""
    jobs = [r[0] for r in pg.execute("select id from jobs order by id")]
    for i in range(rng.randint(2, 4)):
        kind = rng.choice(["hours", "hours", "note", "state", "crew", "insert", "delete", "stock"])
        jid = rng.choice(jobs) if jobs else None
        if kind == "insert" or jid is None:
            pg.execute(
                "insert into jobs (id, crew, note, hours) values (%s, %s, %s, %s)",
                (500 + 10 * round_no + i, rng.choice(CREWS), f"office new {round_no}", 1),
            )
        elif kind == "hours":
            pg.execute(
                "update jobs set hours = hours + %s, updated_at = now() where id = %s",
                (rng.randint(1, 9), jid),
            )
        elif kind == "note":
            pg.execute(
                "update jobs set note = %s, updated_at = now() where id = %s",
                (f"office {round_no}.{i}", jid),
            )
        elif kind == "state":  # done: out of every bucket; open: back in
            pg.execute(
                "update jobs set state = case when state = 'done' then 'open' else 'done' end, "
                "updated_at = now() where id = %s",
                (jid,),
            )
        elif kind == "crew":  # from one crew's bucket to another's
            pg.execute(
                "update jobs set crew = %s, updated_at = now() where id = %s",
                (rng.choice(CREWS), jid),
            )
        elif kind == "delete":
            pg.execute("delete from jobs where id = %s", (jid,))
        else:
            region, part = rng.choice(REGIONS), f"p{rng.randint(1, 4)}"
            pg.execute(
                "insert into stock values (%s, %s, %s) on conflict (region, part) "
                "do update set qty = stock.qty + excluded.qty",
                (region, part, rng.randint(1, 5)),
            )


@pytest.mark.parametrize("engine_shares", [1, 2], ids=["one-engine", "two-engine-shares"])
def test_devices_converge_with_postgresql(
    engine_shares: int,
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rng = random.Random(SEED)
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute(JOBS_DDL)
        for i in range(1, 13):
            pg.execute(
                "insert into jobs (id, crew, note, hours) values (%s, %s, %s, %s)",
                (i, CREWS[(i - 1) // 4], f"job {i}", i),
            )
        for region in REGIONS:
            for part in ("p1", "p2", "p3"):
                pg.execute("insert into stock values (%s, %s, 10)", (region, part))
        with services(
            tmp_path,
            pg_dsn,
            store_dsn,
            kafka_bootstrap,
            topic_prefix,
            rules=JOBS_RULES,
            conflicts=JOBS_CONFLICTS,
            tables=JOBS_TABLES,
            engine_shares=engine_shares,
        ) as stack:
            devices = [Device(name, stack.url, stack.keys, tmp_path) for name in DEVICES]

            def midway() -> None:
                # the second share's leader crashes mid-run: its restart (or the first
                # free share) takes over with nothing lost or doubled
                if "relay-2" in stack.procs:
                    stack.kill_and_restart("relay-2")

            try:
                run(pg, devices, list(stack.procs.values()), rng, capsys, midway)
                led = {
                    share
                    for name, proc in stack.procs.items()
                    if name.startswith("relay")
                    for share in re.findall(
                        r"leading \(group \S+, share (\d+) of", "".join(proc.lines)
                    )
                }
                assert led == {str(s) for s in range(engine_shares)}, led
            finally:
                for d in devices:
                    d.close()


def differences(pg: psycopg.Connection[Any], devices: list[Device]) -> list[str]:
    """After a sync of every device: what still differs (empty: converged)."""
    out = []
    for d in devices:
        d.agent.sync_once()
    for d in devices:
        if d.open_edits():
            out.append(f"{d.name}: {d.open_edits()} edit(s) open")
        mine, theirs = d.tables(), d.expected(pg)
        for t in mine:
            extra = sorted(set(mine[t]) - set(theirs[t]))
            missing = sorted(set(theirs[t]) - set(mine[t]))
            if extra or missing:
                out.append(f"{d.name} {t}: device has {extra}, PostgreSQL has {missing}")
    return out


def settle(
    pg: psycopg.Connection[Any],
    devices: list[Device],
    procs: list[Process],
    timeout: float,
    what: str,
) -> None:
    """Sync every device until all equal PostgreSQL (with a generous deadline)."""
    deadline = time.monotonic() + timeout
    while diff := differences(pg, devices):
        for p in procs:
            p.alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:g} s:\n" + "\n".join(diff))
        time.sleep(0.05)


def run(
    pg: psycopg.Connection[Any],
    devices: list[Device],
    procs: list[Process],
    rng: random.Random,
    capsys: pytest.CaptureFixture[str],
    midway: Callable[[], None],
) -> None:
    settle(pg, devices, procs, 90, "the initial sync of every device")
    assert devices[0].tables()["jobs"] == devices[1].tables()["jobs"] != []  # crew a, shared
    edits = 0
    last_edit = time.monotonic()
    for round_no in range(ROUNDS):
        if round_no == ROUNDS // 2:
            midway()
        office(pg, rng, round_no)
        for d in devices:
            n = rng.randint(1, 3)
            d.edit(rng, n)
            last_edit = time.monotonic()
            edits += n
            d.agent.sync_once()
    settle(pg, devices, procs, 120, "every device equal to PostgreSQL")
    settled = time.monotonic() - last_edit
    rows = sum(len(t) for d in devices for t in d.tables().values())
    with capsys.disabled():
        print(
            f"\n{len(devices)} devices settled {settled:.2f} s after the last edit "
            f"({edits} device edits, {ROUNDS} office rounds, {rows} rows held; target < 5 s)"
        )
    for d in devices:  # value by value
        assert d.tables() == d.expected(pg), d.name
    statuses = {
        s for d in devices for (s,) in d.app.execute(f"select distinct status from {PREFIX}journal")
    }
    assert statuses <= {"synced", "failed"} and "synced" in statuses
    for d in devices:
        r = CliRunner().invoke(cli.app, ["verify", "--db", d.db, "--json"])
        assert r.exit_code == 0, (d.name, r.output)
        out = json.loads(r.stdout.splitlines()[0])
        assert out["rows"] == [] and {b["state"] for b in out["buckets"]} == {"ok"}, out
