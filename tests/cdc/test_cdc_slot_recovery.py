"""A lost replication slot, for real: the daemon stops naming ``fieldsync cdc recover``
instead of skipping changes, and after recovery Kafka holds every row of PostgreSQL with its
latest values, including rows inserted, updated and deleted while the slot was lost
(rebuilt from the topics here, and by ``fieldsync replay verify``).

A PostgreSQL of this test's own (``max_slot_wal_keep_size = 1MB``) loses the slot of a
stopped daemon once WAL is switched and checkpointed past it; the daemon, ``recover`` and
``status`` run as the real ``fieldsync`` processes against it and the test broker.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.local_services import EmbeddedPostgres
from tests.cdc.cdc_support import table_events, wait_for
from tests.cdc.test_cdc_cli import FIELDSYNC, REPO, cli_env, daemon_config, run_cli

SLOT = "recover_me"
TABLES = ("items", "notes")


@pytest.fixture
def small_wal_pg() -> Iterator[str]:
    """A DSN of a PostgreSQL that drops WAL past 1 MB even when a slot needs it."""
    server = EmbeddedPostgres(extra_conf={"max_slot_wal_keep_size": "1MB", "wal_keep_size": "0"})
    server.start()
    try:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("create database app")
        yield server.dsn_for("app")
    finally:
        server.cleanup()


def wal_status(conn: psycopg.Connection[Any]) -> str | None:
    row = conn.execute(
        "select wal_status from pg_replication_slots where slot_name = %s", (SLOT,)
    ).fetchone()
    return None if row is None else str(row[0])


def push_wal_until_lost(conn: psycopg.Connection[Any]) -> None:
    """Write, switch WAL segments and checkpoint until PostgreSQL reports the slot lost."""
    deadline = time.monotonic() + 120
    while wal_status(conn) != "lost":
        assert time.monotonic() < deadline, f"slot still {wal_status(conn)!r}"
        conn.execute(
            "insert into filler select g, repeat('x', 200) from generate_series(1, 2000) g"
        )
        conn.execute("select pg_switch_wal()")
        conn.execute("checkpoint")


def run_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(FIELDSYNC), "cdc", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cli_env(),
            cwd=REPO,
        )


def wait_log(log: Path, needle: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    def seen() -> bool:
        assert proc.poll() is None or needle in log.read_text(), log.read_text()[-3000:]
        return needle in log.read_text()

    wait_for(seen, timeout=timeout, what=f"{needle!r} in the daemon's log")


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()[-3000:]


def kafka_rows(
    bootstrap: str, prefix: str, table: str, timeout: float = 5
) -> dict[int, tuple[Any, ...]]:
    """The table as its topic says it is: every event applied in position order (read up to
    the topic's end, or what ``timeout`` allowed: a loop that waits for equality calls it
    again; a final check gives it time)."""
    rows: dict[int, tuple[Any, ...]] = {}
    events = table_events(bootstrap, prefix, table, timeout=timeout)
    for ev in sorted(events, key=lambda e: e["_pos"]):
        if ev["op"] == "t":
            rows.clear()
        elif ev["op"] == "d":
            rows.pop(ev["_key"]["id"], None)
        else:
            after = ev["after"]
            rows[after["id"]] = tuple(v for k, v in sorted(after.items()) if k != "id")
    return rows


def pg_rows(conn: psycopg.Connection[Any], table: str) -> dict[int, tuple[Any, ...]]:
    columns = [
        r[0]
        for r in conn.execute(
            "select attname from pg_attribute where attrelid = %s::regclass and attnum > 0 "
            "and not attisdropped order by attname",
            (table,),
        ).fetchall()
    ]
    out = {}
    for row in conn.execute(f"select {', '.join(columns)} from {table}").fetchall():
        values = dict(zip(columns, row, strict=True))
        out[values.pop("id")] = tuple(values[c] for c in columns if c != "id")
    return out


def test_lost_slot_stops_cdc_and_recover_sends_everything_again(
    tmp_path: Path, small_wal_pg: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    dsn, prefix = small_wal_pg, topic_prefix
    config = daemon_config(
        tmp_path / "cdc.toml",
        dsn=dsn,
        bootstrap=kafka_bootstrap,
        prefix=prefix,
        slot=SLOT,
        postgres={"tables": [f"public.{t}" for t in TABLES]},
        kafka={"batch_max_ms": 10},
        cdc={"metrics_listen": "", "resnapshot_chunk_rows": 7, "slot_check_interval_s": 0.5},
    )
    log = tmp_path / "cdc.log"
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        conn.execute("create table items (id int primary key, v text, n int)")
        conn.execute("create table notes (id int primary key, body text)")
        conn.execute("create table filler (id int, v text)")  # not published: WAL to push
        conn.execute("insert into items select g, 'v' || g, g from generate_series(1, 20) g")
        conn.execute("insert into notes select g, 'note ' || g from generate_series(1, 5) g")

        proc = run_daemon(config, log)
        wait_log(log, "streaming slot", proc)
        conn.execute("update items set n = n * 10 where id <= 3")
        wait_for(
            lambda: kafka_rows(kafka_bootstrap, prefix, "items") == pg_rows(conn, "items"),
            what="the first changes in Kafka",
        )
        stop(proc, log)

        # the daemon is stopped: these changes wait in the slot's WAL, which PostgreSQL drops
        conn.execute("insert into items select g, 'gap ' || g, g from generate_series(21, 30) g")
        conn.execute("update items set v = 'changed while stopped' where id between 1 and 5")
        conn.execute("delete from items where id between 6 and 8")
        conn.execute("delete from notes where id = 1")
        conn.execute("update notes set body = 'edited' where id = 2")
        push_wal_until_lost(conn)
        # and after the slot is lost
        conn.execute("insert into items values (31, 'after loss', 31)")
        conn.execute("delete from items where id = 9")
        conn.execute("update items set n = -1 where id = 10")
        request = run_cli("cdc", "snapshot", "--table", "notes", "--config", str(config))
        assert request.returncode == 0, request.stderr  # pending: no daemon reads it

        proc = run_daemon(config, log)
        assert proc.wait(60) == 3, log.read_text()[-3000:]
        text = log.read_text()
        assert f"replication slot '{SLOT}' is lost" in text, text[-3000:]
        assert "fieldsync cdc recover --config FILE" in text
        assert wal_status(conn) == "lost", "the daemon must not touch the lost slot"

        status = run_cli("cdc", "status", "--json", "--config", str(config))
        assert status.returncode == 3 and "fieldsync cdc recover" in status.stderr, status.stderr
        assert '"wal_status": "lost"' in status.stdout, status.stdout

        # without --yes (and nobody to answer) nothing is changed
        refused = run_cli("cdc", "recover", "--config", str(config))
        assert refused.returncode != 0 and "Aborted" in refused.stderr, refused.stderr
        assert wal_status(conn) == "lost"

        # killed after the new slot and the requests, before the deletes: the mark stays
        killed = subprocess.run(
            [str(FIELDSYNC), "cdc", "recover", "--config", str(config), "--yes"],
            capture_output=True,
            text=True,
            env={**cli_env(), "FIELDSYNC_FAULT_POINTS": "recover_new_slot:1"},
            cwd=REPO,
            timeout=120,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        assert "fault point recover_new_slot reached" in killed.stderr
        assert wal_status(conn) == "reserved"  # a new slot, which must not be streamed from
        proc = run_daemon(config, log)
        assert proc.wait(60) == 3, log.read_text()[-3000:]
        assert f"a recovery of slot '{SLOT}' did not finish" in log.read_text()

        done = run_cli("cdc", "recover", "--config", str(config), "--yes", timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        assert f"slot {SLOT} dropped and re-created at" in out, out
        assert "re-snapshot of public.items requested" in out
        assert "re-snapshot of public.notes requested" in out
        assert "public.items: 4 row(s) deleted while the slot was lost" in out, out
        assert "public.notes: 1 row(s) deleted while the slot was lost" in out, out
        # the killed attempt's requests (it had covered the operator's already)
        assert "2 pending request(s) in fieldsync.cdc_signals marked done" in out, out
        assert "fieldsync replay verify" in out and "next:" in out
        assert wal_status(conn) == "reserved"
        again = run_cli("cdc", "recover", "--config", str(config), "--yes")
        assert again.returncode == 0 and "nothing to recover" in again.stdout, again.stdout

        proc = run_daemon(config, log)
        wait_log(log, f"streaming slot {SLOT}", proc)
        conn.execute("update items set v = 'during the re-snapshot' where id = 11")
        conn.execute("insert into items values (32, 'new', 32)")
        conn.execute("delete from items where id = 12")
        for table in TABLES:
            wait_for(
                lambda t=table: kafka_rows(kafka_bootstrap, prefix, t) == pg_rows(conn, t),
                timeout=60,
                what=f"{table} in Kafka equal to PostgreSQL",
            )

        def statuses() -> list[str]:
            rows = conn.execute("select status from fieldsync.cdc_signals order by id")
            return [str(r[0]) for r in rows.fetchall()]

        wait_for(
            lambda: all(s.startswith("done") for s in statuses()),
            what=f"the re-snapshots done (statuses {statuses()})",
        )
        verify = run_cli("replay", "verify", "--config", str(config), "--wait", "60", timeout=180)
        assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-2000:]
        stop(proc, log)
        for table in TABLES:
            found = kafka_rows(kafka_bootstrap, prefix, table, timeout=120)
            assert found == pg_rows(conn, table), table
        events = table_events(kafka_bootstrap, prefix, "items", timeout=120)
        deletes = [e for e in events if e["op"] == "d"]
        recovered = sorted(
            e["_key"]["id"] for e in deletes if e["source"]["origin"] == "fieldsync.recover"
        )
        assert recovered == [6, 7, 8, 9]
        assert all(e["before_kind"] == "key" for e in deletes)
        resent = {
            e["after"]["id"]
            for e in events
            if e["op"] == "r" and e["source"]["snapshot"] == "incremental"
        }
        assert set(range(1, 32)) - {6, 7, 8, 9, 12} <= resent | {11}, sorted(resent)
    finally:
        conn.close()
