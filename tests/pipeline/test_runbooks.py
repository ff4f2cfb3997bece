"""The runbooks of docs/operations.md, run as written against the real processes.

``fieldsync cdc run``, ``fieldsync relay run`` and ``fieldsync relay applier`` run as
subprocesses (tests/pipeline/pipeline_stack.py; the relay on a fixed port, so a device
keeps its URL across restarts) on the test PostgreSQL and broker; a device is driven with
the ``device-agent`` command.  tests/pipeline/runbook_steps.py runs each runbook's
commands with the variables pointing at this test's files and databases, ``systemctl``
mapped to the stack's processes.  After each runbook the test checks the state the
runbook promises:

- *add a table*: a table with rows, published with ``ALTER PUBLICATION``, reaches Kafka
  (cdc's re-snapshot), and after the rules change and the restarts the device holds its
  rows, and a row inserted later too;
- *rotate token keys*: a token of the new key is accepted once the relay restarted, the
  old one as well until the old key is retired, then refused (``token_unknown_key``);
  the device re-pointed with the new token syncs;
- *re-sync a device*: a device whose row was changed behind the agent's back fails
  ``verify``; after the runbook it holds PostgreSQL's rows and ``verify`` passes;
- *upgrade*: with everything stopped in the documented order, rows committed in
  PostgreSQL and an edit made on the device offline are not lost;
- *move the bucket store*: after ``pg_dump``/``pg_restore`` the device downloads nothing
  again (its cursors are still valid) and follows new changes;
- *rebuild the bucket store*: on an empty store the engine rebuilds from Kafka, the
  documented re-snapshot runs, and the device converges (it downloads its buckets again).

Waits are for states (a sync that brings the rows, a status that exits 0), never for a
time.  Not run here: deploying (systemd, Docker), recovering a lost slot
(``fieldsync cdc recover``, tested with that command), backups (docs/operations.md says
why).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg

from devtools.local_services import free_port
from relay.auth import issue_token
from tests.cdc.cdc_support import wait_for
from tests.cdc.test_cdc_cli import cli_env
from tests.fix_kafka import read_topic
from tests.pipeline.pipeline_stack import Stack, services
from tests.pipeline.runbook_steps import Runbooks, runbooks, steps
from tests.schemas import CREW_JOBS_RULES

RULES = CREW_JOBS_RULES
CONFLICTS = '[default]\npolicy = "server_wins"\n'
DDL = "create table jobs (id integer primary key, crew text not null, note text)"
SITES = 20


class Device:
    """A device driven with the ``device-agent`` command; the app reads with sqlite3."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.agent = str(Path(sys.executable).parent / "device-agent")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.agent, *args, "--db", str(self.db)],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    def init(self, url: str, token: str) -> None:
        res = self.cli("init", "--relay", url, "--token", token)
        assert res.returncode == 0, res.stdout + res.stderr

    def sync(self) -> dict[str, Any]:
        res = self.cli("sync", "--once", "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        report: dict[str, Any] = json.loads(res.stdout)
        return report

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db) as app:
            exists = app.execute(
                "select 1 from sqlite_master where type = 'table' and name = ?", (table,)
            ).fetchone()
            if not exists:
                return []
            return app.execute(f"select * from {table} order by 1").fetchall()


def pg_rows(pg_dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        return [tuple(r) for r in conn.execute(sql).fetchall()]


def crew_a(pg_dsn: str) -> list[tuple[Any, ...]]:
    return pg_rows(pg_dsn, "select id, crew, note from jobs where crew = 'a' order by id")


def converge(device: Device, table: str, expected: Any, what: str) -> list[dict[str, Any]]:
    """Sync until the device's ``table`` equals ``expected()``; the sync reports."""
    reports: list[dict[str, Any]] = []

    def synced() -> bool:
        reports.append(device.sync())
        return device.rows(table) == expected()

    wait_for(synced, timeout=180, interval=0.5, what=what)
    return reports


def answer(stack: Stack, token: str) -> tuple[int, str]:
    r = httpx.get(f"{stack.url}/v1/changes", headers={"Authorization": f"Bearer {token}"})
    code = r.json().get("error", {}).get("code", "") if r.status_code != 200 else ""
    return r.status_code, code


def test_every_runbook_step_is_parsed() -> None:
    """The runbooks the tests below run exist, and split into the documented commands."""
    found = runbooks()
    assert set(found) == {
        "upgrade",
        "add-table",
        "rotate-keys-add",
        "rotate-keys-retire",
        "resync-device",
        "move-store",
        "rebuild-store",
    }
    add = steps(found["add-table"])
    assert add[0].startswith("psql ") and add[2].startswith('cat >> "$RULES" <<')
    assert add[2].rstrip().endswith("EOF") and 'table = "public.sites"' in add[2]
    assert add[-1].endswith("# repeat until it exits 0")


def test_add_table_rotate_keys_and_resync_device(
    pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(DDL)
        conn.execute("create table sites (id integer primary key, name text not null)")
        conn.execute("insert into jobs values (1, 'a', 'one'), (2, 'a', 'two'), (3, 'b', 'x')")
        conn.execute(f"insert into sites select g, 'site ' || g from generate_series(1, {SITES}) g")
    with services(
        tmp_path,
        pg_dsn,
        store_dsn,
        kafka_bootstrap,
        topic_prefix,
        rules=RULES,
        conflicts=CONFLICTS,
        tables=["public.jobs"],
        http_port=free_port(),
    ) as stack:
        device = Device(tmp_path / "tablet-7.db")
        old_token = issue_token(stack.keys, None, "tablet-7", {"crew": "a"}, 3600)
        device.init(stack.url, old_token)
        converge(device, "jobs", lambda: crew_a(pg_dsn), "the device holding crew a's jobs")
        runner = Runbooks(
            stack,
            {
                "CDC": str(stack.cdc_config),
                "RELAY": str(stack.relay_config),
                "RULES": str(tmp_path / "rules.toml"),
                "KEYS": str(tmp_path / "keys.toml"),
                "PGDB": pg_dsn,
                "STORE": store_dsn,
                "DEVICE_DB": str(device.db),
                "OLD_KID": "k1",
            },
            tmp_path,
        )

        # ---- add a table to the publication
        done = runner.run("add-table")
        assert [d for d, _ in done] == ["ran", "ran", "ran", "ran", "systemctl", "repeated"]
        sent = wait_for(
            lambda: len(read_topic(kafka_bootstrap, f"{topic_prefix}.public.sites")) >= SITES,
            timeout=120,
            what="the new table's rows in Kafka",
        )
        assert sent
        every_site = "select id, name from sites order by id"
        converge(device, "sites", lambda: pg_rows(pg_dsn, every_site), "the sites on the device")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("insert into sites values (100, 'streamed after the change')")
        converge(device, "sites", lambda: pg_rows(pg_dsn, every_site), "a new site streamed")

        # ---- rotate token keys: add the new one
        assert answer(stack, old_token) == (200, "")
        runner.run("rotate-keys-add")
        new_token = (tmp_path / "tablet-7.token").read_text().strip()
        assert jwt.get_unverified_header(new_token)["kid"] == "ed-2025-01"
        assert answer(stack, new_token) == (200, "")
        assert answer(stack, old_token) == (200, ""), "the old key is still live"
        device.init(stack.url, new_token)
        device.sync()

        # ---- retire the old one
        runner.run("rotate-keys-retire")
        keys = (tmp_path / "keys.toml").read_text()
        assert 'kid = "k1"' not in keys and 'current = "ed-2025-01"' in keys, keys
        assert answer(stack, old_token) == (401, "token_unknown_key")
        assert answer(stack, new_token) == (200, "")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("update jobs set note = 'after the rotation' where id = 1")
        converge(device, "jobs", lambda: crew_a(pg_dsn), "the device syncing on the new key")

        # ---- re-sync a device whose row changed behind the agent's back
        with sqlite3.connect(device.db) as app:  # as the agent applies: not journaled
            app.execute("insert into _fieldsync_applying values (1)")
            app.execute("update jobs set note = 'corrupted' where id = 2")
            app.execute("delete from _fieldsync_applying")
        broken = device.cli("verify")
        assert broken.returncode == 6, broken.stdout + broken.stderr
        runner.run("resync-device")
        assert device.rows("jobs") == crew_a(pg_dsn)
        assert device.rows("sites") == pg_rows(pg_dsn, every_site)
        assert not stack.stopped_threads()


def test_upgrade_move_and_rebuild_the_store(
    pg_server: Any,
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(DDL)
        conn.execute("insert into jobs values (1, 'a', 'one'), (2, 'a', 'two'), (3, 'b', 'x')")
    moved, rebuilt = (
        pg_server.dsn_for("fieldsync_relay"),
        pg_server.dsn_for("fieldsync_relay_rebuilt"),
    )
    try:
        with services(
            tmp_path,
            pg_dsn,
            store_dsn,
            kafka_bootstrap,
            topic_prefix,
            rules=RULES,
            conflicts=CONFLICTS,
            tables=["public.jobs"],
            http_port=free_port(),
        ) as stack:
            device = Device(tmp_path / "tablet-7.db")
            device.init(stack.url, issue_token(stack.keys, None, "tablet-7", {"crew": "a"}, 3600))
            converge(device, "jobs", lambda: crew_a(pg_dsn), "the device holding crew a's jobs")
            variables = {
                "CDC": str(stack.cdc_config),
                "RELAY": str(stack.relay_config),
                "PGDB": pg_dsn,
                "STORE": store_dsn,
                "NEW_SERVER": pg_server.dsn,
            }

            # ---- upgrade: while everything is stopped, the office and the device write
            def while_stopped() -> None:
                for name in ("cdc", "relay", "applier"):
                    assert stack.procs[name].proc.poll() is not None, f"{name} still runs"
                with psycopg.connect(pg_dsn, autocommit=True) as conn:
                    conn.execute(
                        "insert into jobs select g, 'a', 'while down' from generate_series(10, 14) g"
                    )
                with sqlite3.connect(device.db) as app:
                    app.execute("update jobs set note = 'edited offline' where id = 1")

            done = Runbooks(stack, variables, tmp_path).run(
                "upgrade", after={"systemctl stop fieldsync-cdc": while_stopped}
            )
            assert [d for d, _ in done].count("not run") == 1  # pip install
            converge(device, "jobs", lambda: crew_a(pg_dsn), "rows written while down")
            assert pg_rows(pg_dsn, "select note from jobs where id = 1") == [("edited offline",)]
            assert len(device.rows("jobs")) == 7

            # ---- move the bucket store: devices notice nothing
            wait_for(
                lambda: device.sync()["ops"] == 0,
                timeout=120,
                interval=0.5,
                what="a sync with nothing new (the edit's own change back included)",
            )
            Runbooks(stack, {**variables, "NEW_STORE": moved}, tmp_path).run("move-store")
            assert f'store_dsn = "{moved}"' in stack.relay_config.read_text()
            first = device.sync()
            assert first["ops"] == 0, f"the device downloaded again after a move: {first}"
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute("insert into jobs values (20, 'a', 'after the move')")
            converge(device, "jobs", lambda: crew_a(pg_dsn), "a change after the move")

            # ---- rebuild the bucket store from Kafka: devices download again, converge
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute("delete from jobs where id = 2")
            Runbooks(stack, {**variables, "NEW_STORE": rebuilt}, tmp_path).run("rebuild-store")
            assert f'store_dsn = "{rebuilt}"' in stack.relay_config.read_text()
            reports = converge(device, "jobs", lambda: crew_a(pg_dsn), "the rebuilt store")
            assert sum(r["ops"] for r in reports) >= len(crew_a(pg_dsn)), reports
            verified = device.cli("verify")
            assert verified.returncode == 0, verified.stdout + verified.stderr
            assert not stack.stopped_threads()
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            for name in ("fieldsync_relay", "fieldsync_relay_rebuilt"):
                conn.execute(f'drop database if exists "{name}" with (force)')
