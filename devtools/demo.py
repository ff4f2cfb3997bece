"""``fieldsync demo``: the whole pipeline on embedded services, as ops would run it.

Starts a throw-away PostgreSQL (``wal_level=logical``) and a tansu broker, writes
real settings files into a temporary directory, and starts the three server
processes with their real commands: ``fieldsync cdc run``, ``fieldsync relay run``
(device API, bucket engine, journal intake, outcome feed) and ``fieldsync relay
applier``.  A technician's device is then driven with the ``device-agent``
command and plain ``sqlite3`` (as any app would write the local database), and
each step is checked, not just printed:

1. the device syncs its technician's open work orders (and the parts catalogue);
2. an app edits a row offline; the edit goes upstream, is merged into PostgreSQL
   and comes back ``synced``;
3. the office reassigns an order: it leaves the device (REMOVE);
4. device and office both change the notes of one order (policy ``ask``): a kept
   conflict, resolved on the device with its own value, which reaches PostgreSQL;
5. ``fieldsync replay history`` shows order 1's versions: the device's edit
   with its origin, journal entry, base position and outcome.

A step whose expected state does not appear within its time limit fails the demo
(:class:`DemoError`, exit 1) with the logs of the server processes.  With
``--seconds`` 0 the services keep running afterwards (URLs and a token are printed)
until Ctrl-C.  Concurrency: this process only waits and runs commands; the work
happens in the child processes, PostgreSQL and the broker.
"""

from __future__ import annotations

import json
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TextIO

import psycopg

from devtools import demo_schema
from devtools.local_services import EmbeddedBroker, EmbeddedPostgres, free_port, wait_for_port
from relay.errors import RelayError

CONFIG = Path(__file__).resolve().parent.parent / "config"
SECRET = "demo-secret-" + "x" * 32
STEP_TIMEOUT_S = 60.0


class DemoError(RelayError):
    """A demo step did not reach its expected state in time (names the step)."""


class Demo:
    """The running stack: services, settings files, server processes, one device."""

    def __init__(self, work: Path, pg: EmbeddedPostgres, broker: EmbeddedBroker, out: TextIO):
        self.work, self.pg, self.broker, self.out = work, pg, broker, out
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = str(work / "tablet-7.db")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.token = ""

    # -- output -------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def ok(self, text: str) -> None:
        self.say(f"  ✓ {text}")

    # -- set-up -------------------------------------------------------------------------

    def write_settings(self) -> None:
        w = self.work
        (w / "keys.toml").write_text(
            f'current = "k1"\n[[key]]\nkid = "k1"\nalg = "HS256"\nsecret = "{SECRET}"\n'
        )
        (w / "rules.toml").write_text((CONFIG / "rules.example.toml").read_text())
        (w / "conflicts.toml").write_text((CONFIG / "conflicts.example.toml").read_text())
        kafka = self.broker.bootstrap
        (w / "cdc.toml").write_text(
            f'[postgres]\ndsn = "{self.pg.dsn}"\ntables = {json.dumps(list(demo_schema.TABLES))}'
            f'\n\n[kafka]\nbootstrap_servers = "{kafka}"\n'
            f'batch_max_ms = 20\n\n[cdc]\nstate_dir = "{w / "cdc-state"}"\nlog_level = "WARNING"\n'
        )
        (w / "relay.toml").write_text(
            f'[relay]\nstore_dsn = "{self.pg.dsn_for(demo_schema.STORE_DATABASE)}"\n'
            f'rules = "{w / "rules.toml"}"\nsource_dsn = "{self.pg.dsn}"\n'
            f'kafka_bootstrap_servers = "{kafka}"\nbatch_max_ms = 20\nlog_level = "WARNING"\n\n'
            f"[http]\nport = {self.port}\nlong_poll_s = 5\n\n"
            f'[auth]\nkeys_file = "{w / "keys.toml"}"\n\n'
            f'[journal]\ndsn = "{self.pg.dsn}"\nconflicts = "{w / "conflicts.toml"}"\n'
            "batch_max_ms = 20\n"
        )

    def create_schema(self) -> None:
        with psycopg.connect(self.pg.dsn, autocommit=True) as conn:
            conn.execute(demo_schema.DDL)
            conn.execute(demo_schema.SEED)
            conn.execute(f"create database {demo_schema.STORE_DATABASE}")

    def start(self, name: str, *args: str) -> None:
        log = open(self.work / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "fieldsync.cli", *args], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def logs(self) -> str:
        parts = []
        for name in self.procs:
            text = (self.work / f"{name}.log").read_text(errors="replace").strip()
            parts.append(f"--- {name}.log (last lines)\n" + "\n".join(text.splitlines()[-15:]))
        return "\n".join(parts)

    # -- helpers ------------------------------------------------------------------------

    def run(self, module: str, *args: str, show: bool = True) -> str:
        """Run ``fieldsync`` (module fieldsync.cli) or ``device-agent`` and return stdout."""
        command = "fieldsync" if module == "fieldsync.cli" else "device-agent"
        if show:
            self.say(f"  $ {command} {shlex.join(args)}")
        res = subprocess.run(
            [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120
        )
        if res.returncode != 0:
            raise DemoError(f"{command} {shlex.join(args)} exited {res.returncode}: {res.stderr}")
        return res.stdout

    def agent(self, *args: str, show: bool = True) -> str:
        return self.run("device_agent.cli", *args, "--db", self.db, show=show)

    def sync(self) -> dict[str, Any]:
        out = self.agent("sync", "--once", "--json", show=False)
        result: dict[str, Any] = json.loads(out)
        return result

    def app_sql(self, sql: str, *params: Any) -> None:
        self.say(f"  sqlite3> {sql}")
        conn = sqlite3.connect(self.db, isolation_level=None)
        try:
            conn.execute(sql, params)
        finally:
            conn.close()

    def device_rows(self) -> dict[int, tuple[Any, ...]]:
        conn = sqlite3.connect(self.db)
        try:
            rows = conn.execute("select id, technician, status, notes from work_orders").fetchall()
        finally:
            conn.close()
        return {r[0]: r for r in rows}

    def server_sql(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg.dsn, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def until(self, what: str, check: Callable[[], bool], sync: bool = True) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            if sync:
                self.sync()
            if check():
                return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"{what}: not reached within {STEP_TIMEOUT_S:g}s; the device holds "
                    f"{sorted(self.device_rows().values())}\n{self.logs()}"
                )
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise DemoError(f"{name} exited with {proc.returncode}\n{self.logs()}")
            time.sleep(0.5)

    def journal(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = json.loads(self.agent("journal", "--json", show=False))
        return entries

    # -- the story ----------------------------------------------------------------------

    def steps(self) -> None:
        self.say("\n1. A technician's tablet syncs what its token grants")
        token = self.run(
            "fieldsync.cli",
            *("token", "issue", "--keys", str(self.work / "keys.toml"), "--device", "tablet-7"),
            *("--claim", "technician=t42", "--ttl", "1d"),
        ).strip()
        self.agent("init", "--relay", self.url, "--token", token)
        self.until(
            "the tablet holds t42's open orders", lambda: set(self.device_rows()) == {1, 2, 3}
        )
        for row in sorted(self.device_rows().values()):
            self.say(f"    {row}")
        self.ok("orders 1-3 of t42 arrived; the closed one (4) and t7's (5) did not")

        self.say("\n2. An app edits the local database with plain sqlite3, offline")
        self.app_sql("update work_orders set status = 'in_progress' where id = 1")
        self.say(f"  journal: {[(e['seq'], e['op'], e['status']) for e in self.journal()]}")
        self.until(
            "the edit merged upstream and synced",
            lambda: self.journal()[0]["status"] == "synced",
        )
        status = self.server_sql("select status from work_orders where id = 1")[0][0]
        if status != "in_progress":
            raise DemoError(f"step 2: PostgreSQL has status {status!r} for order 1")
        self.ok("PostgreSQL has order 1 in_progress; the edit's outcome came back: synced")

        self.say("\n3. The office reassigns order 2 to another technician")
        self.say("  psql> update work_orders set technician = 't7' where id = 2")
        self.server_sql("update work_orders set technician = 't7' where id = 2")
        self.until("order 2 removed from the tablet", lambda: 2 not in self.device_rows())
        self.ok("order 2 left the tablet (REMOVE): it may no longer see it")

        self.say("\n4. Both sides change the notes of order 3 (policy: ask)")
        self.app_sql(
            "update work_orders set notes = 'sensor replaced, not calibrated' where id = 3"
        )
        self.say("  psql> update work_orders set notes = 'customer called: urgent' where id = 3")
        self.server_sql(
            "update work_orders set notes = 'customer called: urgent', updated_at = now() "
            "where id = 3"
        )
        self.until("a kept conflict", lambda: self.journal()[0]["status"] == "conflict")
        conflicts = json.loads(self.agent("conflicts", "list", "--json"))
        self.say(f"    {json.dumps(conflicts[0], default=str)[:160]}")
        self.agent("conflicts", "resolve", str(conflicts[0]["id"]), "--mine")
        self.until(
            "the resolution in PostgreSQL",
            lambda: (
                self.server_sql("select notes from work_orders where id = 3")[0][0]
                == "sensor replaced, not calibrated"
            ),
        )
        self.ok("the conflict was kept, resolved on the tablet, and PostgreSQL has its value")

        self.say("\n5. The audit trail of order 1, read back from Kafka")
        history = self.run(
            "fieldsync.cli",
            *("replay", "history", "--table", "public.work_orders", "--key", "1", "--quiet"),
            *("--config", str(self.work / "cdc.toml")),
        )
        self.say("\n".join("    " + line for line in history.strip().splitlines()[-12:]))
        if "device tablet-7" not in history or "based on 0/" not in history:
            raise DemoError(
                "step 5: the history does not name device tablet-7 as the origin of the edit, "
                "with the position it was based on"
            )
        self.ok("the edit is traced to device tablet-7, its journal entry, base and outcome")

        self.token = token

    def linger(self, seconds: float) -> None:
        self.say(
            f"\nServices keep running{f' for {seconds:g}s' if seconds else ''}; Ctrl-C stops "
            f"them.\n  relay    {self.url}  (OpenAPI: {self.url}/docs)\n  postgres {self.pg.dsn}"
            f"\n  device   device-agent sync --watch --db {self.db}\n  token    {self.token}"
        )
        deadline = time.monotonic() + seconds if seconds else None
        try:
            while all(p.poll() is None for p in self.procs.values()):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


@contextmanager
def _services(out: TextIO) -> Iterator[tuple[Path, EmbeddedPostgres, EmbeddedBroker]]:
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fieldsync-demo-")))
        print("starting embedded PostgreSQL and broker ...", file=out, flush=True)
        pg = stack.enter_context(EmbeddedPostgres())
        broker = stack.enter_context(EmbeddedBroker())
        yield work, pg, broker


def run_full_demo(keep_s: float | None = 0.0, out: TextIO = sys.stdout) -> None:
    """Run the story (module docstring), then keep the services running for ``keep_s``
    seconds (0: until Ctrl-C; None: stop at once).  Raises :class:`DemoError` when a step
    fails."""
    with _services(out) as (work, pg, broker):
        demo = Demo(work, pg, broker, out)
        demo.create_schema()
        demo.write_settings()
        demo.start("cdc", "cdc", "run", "--config", str(work / "cdc.toml"))
        demo.start("relay", "relay", "run", "--config", str(work / "relay.toml"))
        demo.start("applier", "relay", "applier", "--config", str(work / "relay.toml"))
        try:
            if not wait_for_port("127.0.0.1", demo.port, 60, demo.procs["relay"]):
                raise DemoError(f"the relay did not listen on port {demo.port}\n{demo.logs()}")
            demo.say(f"cdc, relay ({demo.url}) and applier running; settings in {work}")
            demo.steps()
            demo.say("\nAll steps checked.")
            if keep_s is not None:
                demo.linger(keep_s)
        finally:
            demo.stop_all()
