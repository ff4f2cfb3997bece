"""A table's key schema changes: the keys of the old key schema leave the log
(cdc/key_retirement.py, docs/cdc.md "Re-snapshots: a changed key").

Against the real PostgreSQL and broker: after ``ALTER COLUMN id TYPE text`` on the primary
key, and after the primary key is redefined, while another session inserts, updates and
deletes rows, the table topic read as a compacted table (the latest record of each Kafka
key, deletes dropped) equals the table in PostgreSQL: no row is left under an old key.
The same when the daemon is killed (SIGKILL, at fault points) in the middle of the
re-snapshot and in the middle of writing the deletes.  ``int`` → ``bigint`` keeps every
key's text: no delete is written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc.errors import SinkUnavailable
from cdc.incremental_snapshot import Progress
from cdc.key_retirement import RETIRE_ORIGIN
from core.avro_envelope import POSITION_HEADER, decode, parse_position_header
from core.row_wire import row_key_text
from devtools.cdc_demo import read_schemas
from tests.cdc.cdc_crash_workload import CrashDaemon
from tests.cdc.cdc_support import running_daemon, wait_for
from tests.cdc.test_cdc_cli import (
    daemon_config,
    run_cli,
)
from tests.cdc.test_cdc_ddl_resync import settings_for, state_record
from tests.fix_kafka import read_topic

ROWS = 60


def topic_table(
    bootstrap: str, prefix: str, table: str, key: tuple[str, ...], *, by_text: bool = False
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The topic as a compacted-topic consumer holds it: the latest record of each Kafka key
    (bytes), keys whose latest record is a delete dropped, records without a key skipped;
    keyed by the key columns' text.
    Also every event decoded (with ``_keybytes`` and ``_pos``).  A row under two live Kafka
    keys (its old and its new key) reads as ``{"_twice": [keys]}``, equal to no row of
    PostgreSQL.  ``by_text``: a consumer
    that identifies rows by their key values instead (the relay): the latest record of each
    key text, by position."""
    records = read_topic(bootstrap, f"{prefix}.public.{table}", timeout=20)
    wanted = {bytes(r.value[2:10]) for r in records}
    wanted |= {bytes(r.key[2:10]) for r in records if r.key is not None}
    registry = wait_for(
        lambda: (lambda reg: reg if all(fp in reg for fp in wanted) else None)(
            read_schemas(bootstrap, prefix)
        ),
        timeout=30,
        what="the schemas of the events",
    )
    events = []
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        event = decode(r.value, registry)
        event["_keybytes"] = None if r.key is None else bytes(r.key)
        event["_pos"] = parse_position_header(dict(r.headers)[POSITION_HEADER])
        events.append(event)
    latest: dict[Any, dict[str, Any]] = {}
    for event in sorted(events, key=lambda e: e["_pos"]) if by_text else events:
        if event["_keybytes"] is None:
            continue  # no Kafka key (the table had no key columns): no row to fold by key
        row = event["after"] if event["op"] != "d" else event["before"]
        ident = row_key_text([row.get(c) for c in key]) if by_text else event["_keybytes"]
        latest[ident] = event
    live: dict[str, dict[str, Any]] = {}
    for ident, event in latest.items():
        if event["op"] == "d":
            continue
        row = {c: v for c, v in event["after"].items() if v is not None}
        text = row_key_text([row.get(c) for c in key])
        if text in live:  # a row under two live Kafka keys (its old and its new one)
            live[text] = {"_twice": sorted(str(i) for i in (ident, live[text].get("_key")))}
            continue
        live[text] = {**row, "_key": ident}
    return {t: {c: v for c, v in r.items() if c != "_key"} for t, r in live.items()}, events


def pg_table(conn: psycopg.Connection[Any], table: str, key: tuple[str, ...]) -> dict[str, Any]:
    cur = conn.execute(f"select * from {table}")
    names = [d.name for d in cur.description or ()]
    rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    return {
        row_key_text([row[c] for c in key]): {c: v for c, v in row.items() if v is not None}
        for row in rows
    }


def wait_topic_equals_pg(
    bootstrap: str,
    prefix: str,
    conn: psycopg.Connection[Any],
    table: str,
    key: tuple[str, ...],
    timeout: float = 120,
    *,
    by_text: bool = False,
) -> list[dict[str, Any]]:
    last: dict[str, Any] = {}

    def same() -> bool:
        live, events = topic_table(bootstrap, prefix, table, key, by_text=by_text)
        want = pg_table(conn, table, key)
        last["diff"] = {
            k: (live.get(k), want.get(k))
            for k in sorted(set(live) | set(want))
            if live.get(k) != want.get(k)
        }
        last["events"] = events
        return not last["diff"]

    try:
        wait_for(same, timeout=timeout, interval=1.0, what=f"{table} in Kafka to equal PostgreSQL")
    except AssertionError as exc:
        shown = dict(list(last.get("diff", {}).items())[:6])
        raise AssertionError(f"{exc}; differences (kafka, postgres): {shown}") from None
    events: list[dict[str, Any]] = last["events"]
    return events


def retire_deletes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["op"] == "d" and e["source"]["origin"] == RETIRE_ORIGIN]


def assert_only_old_or_gone_keys(events: list[dict[str, Any]], old_fps: set[bytes]) -> int:
    """Every delete of an old key is of a key of the old key schema, or of a key already
    deleted before it (a row deleted after the topic was read and before the rows of now
    were: a second delete, harmless); returns how many are of the old key schema."""
    old = 0
    for d in retire_deletes(events):
        if d["_keybytes"][2:10] in old_fps:
            old += 1
            continue
        earlier = [
            e
            for e in events
            if e["_keybytes"] == d["_keybytes"] and e["_pos"] < d["_pos"] and e["op"] == "d"
        ]
        assert earlier, f"a key of the new key schema deleted while its row lived: {d}"
    return old


class Writer(threading.Thread):
    """Another session: inserts, updates and deletes rows of ``t`` (by ``id``, passed as
    text so the statements work before and after the key's type changed) until stopped
    (or ``max_ops`` rounds are done)."""

    def __init__(
        self,
        dsn: str,
        table: str,
        insert: str,
        max_ops: int = 10**9,
        *,
        refusable: bool = False,
    ) -> None:
        super().__init__(daemon=True)
        self.dsn, self.table, self.insert = dsn, table, insert
        self.max_ops = max_ops
        self.refusable = refusable
        self.stop = threading.Event()
        self.ops = 0
        self.refused = 0
        self.error: BaseException | None = None

    def _change(self, conn: psycopg.Connection[Any], statement: str, *params: str) -> None:
        """An update or delete; with ``refusable``, PostgreSQL's refusal of it (the table
        has no replica identity: SQLSTATE 55000) is counted instead of raised."""
        try:
            conn.execute(statement, params)
        except psycopg.errors.ObjectNotInPrerequisiteState:
            if not self.refusable:
                raise
            self.refused += 1

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                n = 1000
                update = f"update {self.table} set v = %s where id::text = %s"
                delete = f"delete from {self.table} where id::text = %s"
                while not self.stop.is_set() and self.ops < self.max_ops:
                    n += 1
                    conn.execute(self.insert, (str(n), str(n), f"w{n}"))
                    self._change(conn, update, f"u{n}", str(1 + n % ROWS))
                    if n % 3 == 0:
                        self._change(conn, delete, str(n % ROWS))
                    if n % 5 == 0:
                        self._change(conn, delete, str(n - 2))
                    self.ops += 1
        except BaseException as exc:  # surfaced by finish()
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        assert not self.is_alive(), "the writer did not stop"
        if self.error is not None:
            raise self.error
        assert self.ops > 0, "the writer wrote nothing"


@pytest.fixture
def t_int(pg_conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    pg_conn.execute("create table t (id int primary key, a int not null, v text)")
    pg_conn.execute("insert into t select g, g, 'v' || g from generate_series(1, %s) g", (ROWS,))
    yield pg_conn


INSERT_T = "insert into t (id, a, v) values (%s, %s, %s)"


def job_finished(
    settings: Any, conn: psycopg.Connection[Any], marker: Iterator[int], insert: str = INSERT_T
) -> bool:
    """The re-snapshot job left the progress record (its end goes out with the next Kafka
    transaction: make one, a row inserted with ``insert``)."""
    n = next(marker)
    conn.execute(insert, (str(n), str(n), "marker"))
    try:
        data = state_record(settings, "resnapshot", timeout_s=5)
    except SinkUnavailable:
        # the daemon's transaction on the progress topic still open after 5 s, or the
        # broker slow to answer (a busy machine): look again
        return False
    return data is not None and not Progress.from_bytes(data).jobs


KEY_DDLS = {
    # what: (statement, topic partitions, the key schema changes)
    "int to text": ("alter table t alter column id type text", 1, True),
    "int to text, 3 partitions": ("alter table t alter column id type text", 3, True),
    "int to numeric": ("alter table t alter column id type numeric(12,2)", 1, True),
    "int using id * 10": ("alter table t alter column id type int using id * 10 + 5000", 1, False),
}


@pytest.mark.parametrize("what", list(KEY_DDLS), ids=list(KEY_DDLS))
def test_key_values_changed_retire_every_old_key(
    what: str,
    t_int: psycopg.Connection[Any],
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    statement, partitions, new_schema = KEY_DDLS[what]
    settings = settings_for(
        pg_dsn, kafka_bootstrap, topic_prefix, kafka_topic_partitions=str(partitions)
    )
    key = ("id",)
    with running_daemon(settings):
        first = wait_topic_equals_pg(kafka_bootstrap, topic_prefix, t_int, "t", key)
        writer = Writer(pg_dsn, "t", INSERT_T)
        writer.start()
        wait_for(lambda: writer.ops >= 5, timeout=30, what="the writer to run")
        t_int.execute(statement)
        wait_for(lambda: writer.ops >= 60, timeout=60, what="the writer to write on")
        writer.finish()
        events = wait_topic_equals_pg(kafka_bootstrap, topic_prefix, t_int, "t", key)
        now = pg_table(t_int, "t", key)
    assert {r.partition for r in read_topic(kafka_bootstrap, f"{topic_prefix}.public.t")} == set(
        range(partitions)
    ), "the events are spread over every partition"
    deletes = retire_deletes(events)
    assert deletes, "old keys are deleted"
    assert not {row_key_text([e["before"]["id"]]) for e in deletes} & set(now), (
        "no row of now is deleted"
    )
    if new_schema:
        old_fps = {e["_keybytes"][2:10] for e in first}
        assert assert_only_old_or_gone_keys(events, old_fps) > 0, "old keys are deleted"
    ddl_rows = [e for e in events if e["op"] == "r" and e["source"]["snapshot"] == "incremental"]
    assert ddl_rows and max(e["_pos"] for e in deletes) < min(e["_pos"] for e in ddl_rows), (
        "the deletes precede the re-sent rows"
    )


def test_primary_key_redefined_retires_the_old_keys(
    t_int: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix)
    with running_daemon(settings):
        first = wait_topic_equals_pg(kafka_bootstrap, topic_prefix, t_int, "t", ("id",))
        writer = Writer(pg_dsn, "t", INSERT_T)
        writer.start()
        wait_for(lambda: writer.ops >= 5, timeout=30, what="the writer to run")
        t_int.execute("alter table t drop constraint t_pkey, add primary key (a, id)")
        wait_for(lambda: writer.ops >= 60, timeout=60, what="the writer to write on")
        writer.finish()
        # (the rows' values are the same under both keys: wait for the job to end first)
        marker = iter(range(10_000, 20_000))
        wait_for(
            lambda: job_finished(settings, t_int, marker),
            timeout=120,
            interval=0.5,
            what="the re-snapshot job to finish",
        )
        events = wait_topic_equals_pg(kafka_bootstrap, topic_prefix, t_int, "t", ("id", "a"))
    deletes = retire_deletes(events)
    assert deletes, "old keys are deleted"
    old_fps = {e["_keybytes"][2:10] for e in first}
    assert assert_only_old_or_gone_keys(events, old_fps) > 0, "(id) keys are deleted"
    resent = {e["_keybytes"] for e in events if e["source"]["snapshot"] == "incremental"}
    assert len(resent) >= ROWS // 2, "the rows are sent again"
    assert not {k[2:10] for k in resent} & old_fps, "under their new keys"


def test_int_to_bigint_deletes_nothing(
    t_int: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix)
    marker = iter(range(10_000, 20_000))
    with running_daemon(settings):
        wait_topic_equals_pg(kafka_bootstrap, topic_prefix, t_int, "t", ("id",))
        t_int.execute("alter table t alter column id type bigint")

        def resent() -> bool:
            _, events = topic_table(kafka_bootstrap, topic_prefix, "t", ("id",), by_text=True)
            return sum(1 for e in events if e["source"]["snapshot"] == "incremental") >= ROWS

        wait_for(resent, timeout=90, interval=1.0, what="every row sent again")
        wait_for(
            lambda: job_finished(settings, t_int, marker),
            timeout=90,
            interval=0.5,
            what="the re-snapshot job to finish",
        )
        events = wait_topic_equals_pg(
            kafka_bootstrap, topic_prefix, t_int, "t", ("id",), by_text=True
        )
    assert retire_deletes(events) == []
    assert not [e for e in events if e["op"] == "d"]


def crash_daemon(tmp_path: Path, dsn: str, bootstrap: str, prefix: str) -> tuple[Path, CrashDaemon]:
    """The settings file and the daemon of the kill tests: chunks of 7 rows, and small
    batches, so the deletes of old keys span several Kafka transactions and a kill may land
    after some of them committed."""
    config = daemon_config(
        tmp_path / "cdc.toml",
        dsn=dsn,
        bootstrap=bootstrap,
        prefix=prefix,
        slot="s_" + prefix[-10:],
        cdc={"resnapshot_chunk_rows": 7, "ddl_check_interval_s": 0.3},
        kafka={"batch_max_events": 40},
    )
    return config, CrashDaemon(config, tmp_path / "daemon.log")


def killed_at(d: CrashDaemon, faults: list[str]) -> None:
    """Start the daemon once per fault (``point:hit``) and wait for it to kill itself there."""
    for fault in faults:
        d.start(fault)
        d.wait_log(f"fault point {fault.split(':')[0]} reached: SIGKILL", timeout=120)
        assert d.wait(30) == -9, d.log()[-3000:]


def finished(
    d: CrashDaemon,
    config: Path,
    converged: Callable[[], list[dict[str, Any]]],
    *,
    verify: bool = True,
) -> list[dict[str, Any]]:
    """Start the daemon once more: it deletes the old keys left and sends the rows;
    ``converged`` waits for the topic to match PostgreSQL (its events are returned);
    `fieldsync replay verify` agrees; the daemon stops cleanly."""
    d.start()
    d.wait_log("old key(s) deleted", timeout=120)
    events = converged()
    if verify:
        result = run_cli("replay", "verify", "--config", str(config), "--wait", "60", timeout=180)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    d.signal(15)
    assert d.wait(30) == 0, d.log()[-3000:]
    return events


def test_kill_9_mid_resnapshot_and_mid_retirement(
    tmp_path: Path,
    t_int: psycopg.Connection[Any],
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """SIGKILL once after the deletes of the old keys are handed to the sink (some of them
    committed, in batches of 40 events), once after a chunk of the re-snapshot is; the third
    start finishes, and the topic equals PostgreSQL
    (no old key left, no row of now deleted)."""
    config, d = crash_daemon(tmp_path, pg_dsn, kafka_bootstrap, topic_prefix)
    try:
        d.start()
        d.wait_streaming()
        wait_topic_equals_pg(kafka_bootstrap, topic_prefix, t_int, "t", ("id",))
        d.signal(15)
        assert d.wait(30) == 0, d.log()[-3000:]
        writer = Writer(pg_dsn, "t", INSERT_T, max_ops=200)  # (bounded: the daemon restarts)
        writer.start()
        wait_for(lambda: writer.ops >= 5, timeout=30, what="the writer to run")
        t_int.execute("alter table t alter column id type text")
        killed_at(d, ["retire_deletes:1", "resnapshot_chunk:3"])
        writer.finish()
        events = finished(
            d,
            config,
            lambda: wait_topic_equals_pg(kafka_bootstrap, topic_prefix, t_int, "t", ("id",)),
        )
    finally:
        d.kill()
    assert retire_deletes(events), "old keys are deleted"
    assert "Traceback" not in d.log()
