"""``fieldsync status`` against the real processes and services, in both formats.

``fieldsync cdc run``, ``fieldsync relay run`` and ``fieldsync relay applier`` run as
subprocesses (tests/pipeline/pipeline_stack.py) on the test PostgreSQL and broker, and
``fieldsync status`` is run as the installed command.  The workload: rows reach the
engine; with the applier stopped a device uploads three entries (a plain edit, one that
conflicts with an office edit under ``ask``, one the database refuses: a dead letter),
and status counts exactly three journal records waiting and the shard not running; with
the applier back they are applied, one conflict is open and one dead letter kept; a
long-poll is counted as a connected device; with the relay stopped, rows committed in
PostgreSQL wait for the engine and the relay's metrics cannot be read.  Each step waits
for the state (never for a time).  Separately, settings that point at a closed port
(PostgreSQL, the broker) give a report naming each unreachable part, exit 3.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from hypothesis import given, settings
from hypothesis import strategies as st

from core.hlc import Hlc
from fieldsync.status import FACTS, Part, Report, State
from fieldsync.status_view import summary
from relay.auth import issue_token
from tests.cdc.cdc_support import wait_for
from tests.cdc.test_cdc_cli import daemon_config, run_cli
from tests.pipeline.pipeline_stack import services
from tests.schemas import CREW_JOBS_RULES

RULES = CREW_JOBS_RULES
CONFLICTS = (
    '[default]\npolicy = "server_wins"\n\n[[table]]\ntable = "public.jobs"\npolicy = "ask"\n'
)
PARTS = ("cdc", "engine", "applier", "devices", "conflicts")
TOP_KEYS = {"ok", "exit_code", "problems", *PARTS}


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("status", *args, timeout=120)


def status_json(*args: str) -> tuple[int, dict[str, Any]]:
    res = status(*args, "--json")
    assert res.stdout.strip(), f"no JSON on stdout (exit {res.returncode}): {res.stderr}"
    report: dict[str, Any] = json.loads(res.stdout)
    assert set(report) == TOP_KEYS, report
    assert report["exit_code"] == res.returncode, report
    return res.returncode, report


def wait_status(
    argv: Any, ready: Any, what: str, timeout: float = 120
) -> tuple[int, dict[str, Any]]:
    """Run ``fieldsync status --json`` (``argv()`` each time) until ``ready(report)``;
    on a timeout the last report is shown."""
    last: list[Any] = []

    def check() -> Any:
        last[:] = status_json(*argv())
        return ready(last[1]) and tuple(last)

    try:
        found: tuple[int, dict[str, Any]] = wait_for(check, timeout=timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last report: {json.dumps(last, indent=1)}") from None
    return found


def rows_of(text: str) -> dict[str, str]:
    """The human table's rows: part → the rest of its line."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.strip().partition(" ")
        if name in PARTS and name not in out:
            out[name] = rest.strip()
    return out


def entry(seq: int, key: int, old_note: str, new_note: str) -> dict[str, Any]:
    return {
        "seq": seq,
        "table": "public.jobs",
        "op": "update",
        "key": [key],
        "old": {"id": key, "crew": "a", "note": old_note},
        "new": {"note": new_note},
        "base": None,
        "hlc": Hlc(int(time.time() * 1000), seq, "tab-1").encode(),
        "prev_seq": None,
    }


def test_status_follows_a_workload_in_both_formats(
    pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "create table jobs (id integer primary key, crew text not null, "
            "note text check (note is distinct from 'poison'))"
        )
        conn.execute("insert into jobs values (1, 'a', 'one'), (2, 'a', 'two'), (3, 'b', 'x')")
    with services(
        tmp_path,
        pg_dsn,
        store_dsn,
        kafka_bootstrap,
        topic_prefix,
        rules=RULES,
        conflicts=CONFLICTS,
        tables=["public.jobs"],
    ) as stack:
        conf = ["--cdc", str(stack.cdc_config), "--relay", str(stack.relay_config)]

        def args() -> list[str]:  # the relay's metrics port changes when it restarts
            return [*conf, "--relay-metrics", stack.metrics_url("relay")]

        # ---- caught up: everything reachable and within bounds
        wait_status(args, lambda r: r["exit_code"] == 0, "status exit 0 (cdc streaming)")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:  # streamed, not in the snapshot
            conn.execute("insert into jobs values (4, 'b', 'streamed')")
        written_at = datetime.now(UTC)
        _, report = wait_status(
            args,
            lambda r: r["exit_code"] == 0 and r["cdc"]["last_event_time"],
            "status exit 0 with the streamed row's time",
        )
        assert report["ok"] is True and report["problems"] == []
        cdc = report["cdc"]
        assert cdc["state"] == "ok" and cdc["exists"] is True and cdc["active"] is True
        assert cdc["wal_status"] == "reserved" and 0 <= cdc["lag_bytes"] < 1 << 30
        last = datetime.fromisoformat(cdc["last_event_time"].replace("Z", "+00:00"))
        assert abs((last - written_at).total_seconds()) < 60, (last, written_at)
        engine = report["engine"]
        assert engine["state"] == "ok" and engine["leading"] is True
        assert engine["lag_records"] == 0 and engine["missing_topics"] == []
        assert {p["topic"] for p in engine["partitions"]} == {f"{topic_prefix}.public.jobs"}
        assert sum(p["end_offset"] for p in engine["partitions"]) >= 4  # 4 rows (+ markers)
        applier = report["applier"]
        assert applier["state"] == "ok" and applier["running_shards"] == [0]
        assert applier["lag_records"] == 0 and applier["dead_letters"] == 0
        assert applier["topic"] == f"{topic_prefix}._journal"
        assert report["devices"]["connected"] == 0
        assert report["conflicts"]["open"] == 0
        human = status(*args())
        assert human.returncode == 0, human.stdout + human.stderr
        table = rows_of(human.stdout)
        assert set(table) == set(PARTS), human.stdout
        assert all(row.startswith("ok") for row in table.values()), human.stdout
        assert "status: ok" in human.stdout

        # ---- the applier stopped: three journal records wait, the shard is not running
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("update jobs set note = 'office' where id = 2")
        stack.procs["applier"].stop()
        token = issue_token(stack.keys, None, "tab-1", {"crew": "a"}, 600)
        headers = {"Authorization": f"Bearer {token}"}
        upload = [
            entry(1, 1, "one", "edited on tab-1"),
            entry(2, 2, "two", "tablet"),  # the office changed it too: ask → conflict
            entry(3, 1, "edited on tab-1", "poison"),  # the CHECK refuses it: dead letter
        ]
        upload[2]["prev_seq"] = 1
        for one in upload:  # one upload each: its own record batch (see below)
            r = httpx.post(f"{stack.url}/v1/journal", json={"entries": [one]}, headers=headers)
            assert r.status_code == 200, r.text
            assert [x["status"] for x in r.json()["results"]] == ["accepted"], r.text
        # (the test broker, tansu, reports a partition's end offset as the last record
        # batch's first offset + 1: the three entries of one upload, sent as one batch,
        # would show as 1 waiting; Apache Kafka counts 3)
        code, report = wait_status(
            args, lambda r: r["applier"]["lag_records"] == 3, "three journal records waiting"
        )
        assert code == 1 and report["applier"]["state"] == "down", report["applier"]
        assert report["applier"]["running_shards"] == []
        assert report["problems"] == [
            "applier: applier shard(s) 0 of 1 not running (`fieldsync relay applier --shard N`)"
        ]
        code, bounded = status_json(*args(), "--max-applier-lag", "2")
        assert code == 1
        assert (
            "applier: 3 journal records not applied (bound 2, --max-applier-lag)"
            in (bounded["problems"])
        )
        human = status(*args())
        assert human.returncode == 1
        assert rows_of(human.stdout)["applier"].startswith("down"), human.stdout
        assert "3 record(s) behind" in rows_of(human.stdout)["applier"], human.stdout
        assert "problem: applier: applier shard(s) 0 of 1 not running" in human.stdout
        assert "status: 1 problem(s), exit 1" in human.stdout

        # ---- the applier back: applied, one conflict open, one dead letter kept
        stack.procs["applier"].start()
        code, report = wait_status(
            args,
            lambda r: r["applier"]["lag_records"] == 0 and r["conflicts"]["open"] == 1,
            "the journal applied and the conflict in the outcome store",
        )
        assert code == 0, report["problems"]
        assert report["applier"]["running_shards"] == [0]
        assert (report["applier"]["dead_letters"], report["applier"]["bad_records"]) == (1, 0)
        assert report["conflicts"] == {
            "state": "ok",
            "open": 1,
            "devices": 1,
            "note": None,
            "problems": [],
        }
        assert report["devices"]["uploaded_recently"] == 1
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            kept = conn.execute("select count(*) from fieldsync_applier.dead_letters").fetchone()
            opened = conn.execute(
                "select count(*) from fieldsync_applier.conflicts where status = 'open'"
            ).fetchone()
        assert kept == (1,) and opened == (1,)
        code, report = status_json(*args(), "--max-dead-letters", "0", "--max-open-conflicts", "0")
        assert code == 1
        assert (report["applier"]["state"], report["conflicts"]["state"]) == (
            "attention",
            "attention",
        )

        # ---- a long-poll is a connected device
        changes = httpx.get(f"{stack.url}/v1/changes", headers=headers, timeout=30).json()
        released = threading.Event()

        def poll_until_released() -> None:
            # as a device does: each answer's cursor is the next long-poll's, so a page that
            # arrives before the check (the engine still applying the workload) does not end it
            cursor = changes["cursor"]
            while not released.is_set():
                answer = httpx.get(
                    f"{stack.url}/v1/changes",
                    params={"cursor": cursor, "wait": 60},
                    headers=headers,
                    timeout=90,
                ).json()
                cursor = answer["cursor"]
                if any(op["key"] == [10] for op in answer["ops"]):
                    return

        poller = threading.Thread(target=poll_until_released)
        poller.start()
        _, report = wait_status(
            args, lambda r: r["devices"]["connected"] == 1, "one device connected"
        )
        assert (report["devices"]["long_polls"], report["devices"]["streams"]) == (1, 0)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("insert into jobs values (10, 'a', 'releases the long-poll')")
        poller.join(180)
        released.set()
        assert not poller.is_alive()

        # ---- the relay stopped: rows wait for the engine, its metrics cannot be read
        wait_status(  # the row that released the long-poll applied: the lag counts from 0
            args, lambda r: r["engine"]["lag_records"] == 0, "the engine caught up"
        )
        metrics = stack.metrics_url("relay")
        stack.procs["relay"].stop()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("insert into jobs select g, 'b', 'batch' from generate_series(20, 24) g")
        code, report = wait_status(
            lambda: [*conf, "--relay-metrics", metrics],
            lambda r: (r["engine"]["lag_records"] or 0) >= 5,
            "five rows waiting for the engine",
        )
        assert code == 3
        engine = report["engine"]
        assert engine["state"] == "down" and engine["leading"] is False
        # the 5 rows and one commit marker for each Kafka transaction they went out in (cdc
        # commits a batch whenever a read finds nothing more received, so on a busy machine
        # one PostgreSQL transaction's rows can go out in several, at most one a row), and
        # at most the marker after the last applied row
        assert 5 + 1 <= engine["lag_records"] <= 5 + 5 + 1, engine
        assert report["devices"]["state"] == "unreachable"
        assert any(
            p.startswith("devices: cannot read the relay's metrics at") for p in report["problems"]
        )
        assert any("no relay runs the bucket engine" in p for p in report["problems"])
        stack.procs["relay"].start()
        stack.wait_listening()
        wait_status(args, lambda r: r["exit_code"] == 0, "status exit 0 again")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_names_what_cannot_be_reached(
    pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """PostgreSQL on a closed port: every part that reads it is unreachable, naming the
    port; the broker on a closed port: cdc's Kafka side and the engine's offsets are."""
    pg_port = closed_port()
    broker = f"127.0.0.1:{closed_port()}"
    dead_pg = psycopg.conninfo.make_conninfo(pg_dsn, port=str(pg_port), host="127.0.0.1")
    (tmp_path / "rules.toml").write_text(RULES)
    cdc_down_pg = daemon_config(
        tmp_path / "cdc1.toml",
        dsn=dead_pg,
        bootstrap=kafka_bootstrap,
        prefix=topic_prefix,
        slot="s1",
    )
    relay_down_pg = tmp_path / "relay1.toml"
    relay_down_pg.write_text(
        f'[relay]\nstore_dsn = "{dead_pg}"\nrules = "{tmp_path / "rules.toml"}"\n'
        f'topic_prefix = "{topic_prefix}"\nkafka_bootstrap_servers = "{kafka_bootstrap}"\n'
        f'metrics_listen = "127.0.0.1:{closed_port()}"\n\n[journal]\ndsn = "{dead_pg}"\n'
    )
    code, report = status_json(
        "--cdc", str(cdc_down_pg), "--relay", str(relay_down_pg), "--timeout", "5"
    )
    assert code == 3 and report["ok"] is False
    for part in PARTS:
        assert report[part]["state"] == "unreachable", (part, report[part])
    for prefix in ("cdc: PostgreSQL: ", "engine: ", "applier: ", "conflicts: "):
        found = [p for p in report["problems"] if p.startswith(prefix)]
        assert found and str(pg_port) in found[0], (prefix, report["problems"])
    assert any(p.startswith("devices: cannot read the relay's metrics") for p in report["problems"])
    human = status("--cdc", str(cdc_down_pg), "--relay", str(relay_down_pg), "--timeout", "5")
    assert human.returncode == 3
    assert all(row.startswith("unreachable") for row in rows_of(human.stdout).values()), (
        human.stdout
    )
    assert f"port {pg_port}" in human.stdout and "status: " in human.stdout
    assert "exit 3" in human.stdout

    cdc_down_broker = daemon_config(
        tmp_path / "cdc2.toml", dsn=pg_dsn, bootstrap=broker, prefix=topic_prefix, slot="s2"
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table jobs (id integer primary key, crew text not null, note text)")
        conn.execute("select pg_create_logical_replication_slot('s2', 'pgoutput')")
    try:
        relay_down_broker = tmp_path / "relay2.toml"
        relay_down_broker.write_text(
            f'[relay]\nstore_dsn = "{pg_dsn}"\nrules = "{tmp_path / "rules.toml"}"\n'
            f'topic_prefix = "{topic_prefix}"\nkafka_bootstrap_servers = "{broker}"\n'
            'metrics_listen = ""\n\n[journal]\n'
            f'dsn = "{pg_dsn}"\n'
        )
        argv = ["--cdc", str(cdc_down_broker), "--relay", str(relay_down_broker), "--timeout", "3"]
        code, report = status_json(*argv)
        assert code == 3
        cdc = report["cdc"]
        assert cdc["state"] == "unreachable" and cdc["exists"] is True and cdc["active"] is False
        assert any(p.startswith("cdc: Kafka: ") and broker in p for p in report["problems"]), (
            report["problems"]
        )
        assert report["engine"]["state"] == "unreachable"
        assert any(
            p.startswith(f"engine: cannot reach the Kafka brokers {broker}")
            for p in report["problems"]
        ), report["problems"]
        assert report["devices"]["state"] == "skipped"
        assert report["devices"]["note"] == "relay.metrics_listen is off"
        human = status(*argv)
        assert human.returncode == 3
        table = rows_of(human.stdout)
        assert table["cdc"].startswith("unreachable") and table["engine"].startswith("unreachable")
        assert f"problem: engine: cannot reach the Kafka brokers {broker}" in human.stdout
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("select pg_drop_replication_slot('s2')")


def test_status_needs_settings(tmp_path: Path) -> None:
    res = status()
    assert res.returncode == 2 and "give --cdc FILE, --relay FILE or both" in res.stderr
    res = status("--cdc", "/nonexistent/cdc.toml")
    assert res.returncode == 2 and "/nonexistent/cdc.toml does not exist" in res.stderr
    relay = tmp_path / "relay.toml"
    relay.write_text('[relay]\nstore_dsn = "host=db"\nrules = "/nonexistent/rules.toml"\n')
    res = status("--relay", str(relay))
    assert res.returncode == 2 and "/nonexistent/rules.toml" in res.stderr, res.stderr


# --------------------------------------------------------------------------- the report on its own


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(list(State)), max_size=4), min_size=5, max_size=5))
def test_each_part_keeps_its_worst_state_and_the_exit_code_the_worst_part(
    flagged: list[list[State]],
) -> None:
    order = list(State)
    parts = []
    for name, states in zip(PARTS, flagged, strict=True):
        part = Part(name)
        for i, state in enumerate(states):
            part.flag(state, f"problem {i}\n  on two lines")
        assert part.state == max([State.OK, *states], key=order.index)
        assert all("\n" not in p for p in part.problems)
        parts.append(part)
    report = Report(tuple(parts))
    worst = {p.state for p in parts}
    expected = (
        3
        if State.UNREACHABLE in worst
        else 1
        if worst & {State.DOWN, State.BEHIND, State.ATTENTION}
        else 0
    )
    out = report.to_json()
    assert report.exit_code == out["exit_code"] == expected and out["ok"] == (expected == 0)
    assert len(out["problems"]) == sum(len(s) for s in flagged)
    for name in PARTS:
        assert list(out[name]) == ["state", *FACTS[name], "note", "problems"]


def test_a_skipped_part_says_why() -> None:
    part = Part("engine", State.SKIPPED, note="no --relay settings given")
    assert summary(part) == "no --relay settings given"
    assert Part("conflicts").to_json()["open"] is None
