"""Values that change without row events reach Kafka: re-snapshots against the real
PostgreSQL and broker (cdc/incremental_snapshot_io.py, docs/cdc.md "Re-snapshots").

After each DDL that gives existing rows new values without writing row changes (ADD COLUMN
with a default, a volatile default, ALTER COLUMN TYPE … USING, enum RENAME VALUE), the
table rebuilt from its Kafka topic alone equals the table in PostgreSQL.  Also: changes
committed between a chunk's watermarks win over the chunk; a killed daemon resumes a
re-snapshot at its last finished chunk; ``fieldsync cdc snapshot`` and the signal table.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc import resnapshot_chunks, resnapshot_requests, resnapshot_state
from cdc.ddl_detection import signatures_from_bytes
from cdc.errors import DecodeError, SinkUnavailable, parse_lsn
from cdc.incremental_snapshot import Progress
from cdc.pipeline import kafka_options
from cdc.settings import CdcSettings
from tests.cdc import test_cdc_cli
from tests.cdc.cdc_support import make_settings, running_daemon, table_events, wait_for
from tests.cdc.test_cdc_cli import daemon_config, run_cli
from tests.fix_kafka import TopicReadTimeout

daemon_process = test_cdc_cli.daemon_process  # the fixture, shared with the CLI tests

Rows = dict[Any, dict[str, Any]]


def settings_for(pg_dsn: str, bootstrap: str, prefix: str, **env: str) -> CdcSettings:
    options = {
        "postgres_slot": "s_" + prefix[-10:],
        "cdc_ddl_check_interval_s": "0.3",
        "cdc_resnapshot_chunk_rows": "7",
        **env,
    }
    return make_settings(pg_dsn, bootstrap, prefix, **options)


def rebuild(events: list[dict[str, Any]], key: str = "id") -> Rows:
    """The table as a consumer that applies every event in position order holds it."""
    rows: Rows = {}
    for e in sorted(events, key=lambda e: e["_pos"]):
        if e["op"] == "t":
            rows.clear()
        elif e["op"] == "d":
            rows.pop(e["before"][key], None)
        else:
            rows[e["after"][key]] = dict(e["after"])
    return rows


def pg_rows(conn: psycopg.Connection[Any], table: str, key: str = "id") -> Rows:
    cur = conn.execute(f"select * from {table}")
    names = [d.name for d in cur.description or ()]
    return {r[names.index(key)]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}


def wait_converged(
    bootstrap: str, prefix: str, conn: psycopg.Connection[Any], table: str, timeout: float = 60
) -> list[dict[str, Any]]:
    """Wait until the table rebuilt from Kafka equals PostgreSQL; return the events.  A column
    an event does not have reads as NULL (Avro's default for the field), so only non-null
    values are compared."""
    last: dict[str, Any] = {}

    def non_null(rows: Rows) -> Rows:
        return {k: {c: v for c, v in row.items() if v is not None} for k, row in rows.items()}

    def same() -> bool:
        try:
            events = table_events(bootstrap, prefix, table, timeout=5)
        except DecodeError as exc:
            # an event whose schema is not readable (yet): not converged; the wait fails
            # naming the fingerprint if it stays so
            last["diff"] = {"decode": str(exc)}
            return False
        except TopicReadTimeout as exc:
            # the topic not read to its end in 5 s (a busy machine): not known to have
            # converged yet; read again
            last["diff"] = {"read": str(exc)}
            return False
        built, want = non_null(rebuild(events)), non_null(pg_rows(conn, table))
        last["diff"] = {
            k: (built.get(k), want.get(k))
            for k in sorted(set(built) | set(want), key=str)
            if built.get(k) != want.get(k)
        }
        last["events"] = events
        return not last["diff"]

    try:
        wait_for(same, timeout=timeout, interval=0.5, what=f"{table} in Kafka to equal PostgreSQL")
    except AssertionError as exc:
        shown = dict(list(last.get("diff", {}).items())[:5])
        raise AssertionError(f"{exc}; first differences (kafka, postgres): {shown}") from None
    events: list[dict[str, Any]] = last["events"]
    return events


def incremental(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["op"] == "r" and e["source"]["snapshot"] == "incremental"]


def state_record(settings: CdcSettings, suffix: str, timeout_s: float = 20) -> bytes | None:
    key = f"{settings.postgres.slot}.{suffix}".encode()
    found = resnapshot_state.read_state_records(kafka_options(settings), [key], timeout_s)
    return found.get(key)


@pytest.fixture
def items(pg_conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    pg_conn.execute("create type mood as enum ('sad', 'ok', 'happy')")
    pg_conn.execute("create table items (id int primary key, qty int not null, m mood)")
    pg_conn.execute(
        "insert into items select g, g * 10, (array['sad','ok','happy'])[1 + g % 3]::mood "
        "from generate_series(1, 40) g"
    )
    yield pg_conn


# --------------------------------------------------------------------------- each DDL

DDLS: dict[str, list[str]] = {
    "add column with default": ["alter table items add column note text default 'dflt'"],
    "volatile default": ["alter table items add column r float8 default random()"],
    "alter type using": ["alter table items alter column qty type bigint using qty * 3 + 1"],
    "enum rename value": ["alter type mood rename value 'ok' to 'fine'"],
}


@pytest.mark.parametrize("ddl", list(DDLS), ids=list(DDLS))
def test_each_ddl_reaches_kafka_as_r_events(
    ddl: str, items: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix)
    with running_daemon(settings):
        wait_converged(kafka_bootstrap, topic_prefix, items, "items")
        before = parse_lsn(items.execute("select pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]
        for statement in DDLS[ddl]:
            items.execute(statement)
        events = wait_converged(kafka_bootstrap, topic_prefix, items, "items")
    again = incremental(events)
    assert Counter(e["after"]["id"] for e in again) == Counter(range(1, 41)), (
        "every row is re-sent once"
    )
    assert all(e["_pos"][0] > before for e in again), "re-sent rows come after the DDL"
    positions = [e["_pos"] for e in events]
    assert len(positions) == len(set(positions)), "positions are unique"
    chunks = {e["_pos"][0] for e in again}
    assert len(chunks) == 6, f"40 rows in chunks of 7 rows: 6 chunks, got {len(chunks)}"
    for e in again:
        assert e["_pos"] == (e["source"]["commit_lsn"], e["source"]["seq"])


def test_add_column_without_default_sends_nothing_again(
    items: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A column added without a default leaves NULL in old rows, which is what consumers
    assume: the catalog check records it and re-sends nothing."""
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix)
    with running_daemon(settings):
        wait_converged(kafka_bootstrap, topic_prefix, items, "items")
        items.execute("alter table items add column c text")
        marker = iter(range(1000, 2000))

        def recorded() -> bool:
            # the recorded catalog goes out with the next Kafka transaction: make one
            items.execute("insert into items values (%s, 0, null)", (next(marker),))
            data = state_record(settings, "catalog")
            sigs = signatures_from_bytes(data) if data else {}
            return any(c.name == "c" for s in sigs.values() for c in s.columns)

        wait_for(recorded, timeout=60, interval=0.5, what="the catalog check to record column c")
        events = wait_converged(kafka_bootstrap, topic_prefix, items, "items")
    assert incremental(events) == []


def test_changes_inside_a_chunk_window_win(
    items: psycopg.Connection[Any],
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While each chunk is read (its snapshot taken, before its high watermark), another
    session updates, deletes and re-inserts rows of that chunk: those changes are newer than
    the chunk, so the chunk must drop them, and Kafka ends equal to PostgreSQL."""
    touched: list[int] = []
    original = resnapshot_chunks.chunk_query

    def chunk_query_and_write(*args: Any, **kw: Any) -> Any:
        after = args[4]
        first = 1 if after is None else int(after[0]) + 1
        if first <= 40:
            with psycopg.connect(pg_dsn, autocommit=True) as other:
                other.execute("update items set qty = -qty where id = %s", (first,))
                other.execute("delete from items where id = %s", (first + 1,))
                other.execute(
                    "insert into items values (%s, 7, 'sad') on conflict (id) do update "
                    "set qty = 7",
                    (first + 2,),
                )
            touched.extend([first, first + 1, first + 2])
        return original(*args, **kw)

    monkeypatch.setattr(resnapshot_chunks, "chunk_query", chunk_query_and_write)
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix)
    with running_daemon(settings):
        wait_converged(kafka_bootstrap, topic_prefix, items, "items")
        items.execute("alter table items add column note text default 'dflt'")
        events = wait_converged(kafka_bootstrap, topic_prefix, items, "items")
    assert touched, "the writes inside the chunks did not run"
    again = {e["after"]["id"] for e in incremental(events)}
    assert not again & set(touched), "a chunk re-sent a row changed between its watermarks"
    assert again == set(range(1, 41)) - set(touched)
    assert rebuild(events)[touched[0]]["note"] == "dflt"


def test_cli_snapshot_with_where_and_errors(
    tmp_path: Path,
    items: psycopg.Connection[Any],
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    # a publication of listed tables: the daemon adds its signal table to it
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix, postgres_tables="public.items")
    config = daemon_config(
        tmp_path / "cdc.toml",
        dsn=pg_dsn,
        bootstrap=kafka_bootstrap,
        prefix=topic_prefix,
        slot=settings.postgres.slot,
    )
    items.execute("create table unpublished (id int primary key)")
    with running_daemon(settings):
        wait_converged(kafka_bootstrap, topic_prefix, items, "items")
        res = run_cli(
            "cdc", "snapshot", "--config", str(config), "--table", "items",
            "--where", "id between 3 and 9 and m <> 'happy'", "--wait", "60",
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
        # the first request created the signal table and added it to the publication
        assert "re-snapshot of public.items requested: signal 1" in res.stdout
        assert "signal 1: done: 5 row(s)" in res.stdout
        events = table_events(kafka_bootstrap, topic_prefix, "items")
        assert sorted(e["after"]["id"] for e in incremental(events)) == [3, 4, 6, 7, 9]
        for args, code, message in [
            (["--table", "nosuch"], 2, "table public.nosuch does not exist"),
            (
                ["--table", "unpublished"],
                2,
                "table public.unpublished is not in publication 'fieldsync'",
            ),
            (["--table", "items", "--where", "id = 1 or id = 2"], 2, "OR is not supported"),
            (["--table", "items", "--where", "nope = 1"], 2, "public.items has no column 'nope'"),
            (
                ["--table", "items", "--where", "id = 'abc'"],
                2,
                "does not fit public.items: invalid input syntax for type integer",
            ),
        ]:
            res = run_cli("cdc", "snapshot", "--config", str(config), *args)
            assert res.returncode == code, (args, res.stdout, res.stderr)
            assert message in res.stderr, (args, res.stderr)
        requested = items.execute("select count(*) from fieldsync.cdc_signals").fetchone()
        assert requested == (1,), "a rejected request left a signal row"


def test_signal_table_rows_from_operators(
    items: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """An operator without shell access inserts a row into fieldsync.cdc_signals (created
    once, here as a DBA would from the documented DDL); the daemon takes it from the stream
    and records the outcome in the row's status."""
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix)
    with running_daemon(settings):
        wait_converged(kafka_bootstrap, topic_prefix, items, "items")
        items.execute(resnapshot_requests.signal_table_ddl("fieldsync.cdc_signals"))
        bad, good = (
            items.execute(
                "insert into fieldsync.cdc_signals (table_name, where_clause) values (%s, %s) "
                "returning id",
                (table, where),
            ).fetchone()[0]  # type: ignore[index]
            for table, where in [("items", "qty >= 100; drop table items"), ("items", "qty >= 300")]
        )

        def status(signal_id: int) -> str:
            row = items.execute(
                "select status from fieldsync.cdc_signals where id = %s", (signal_id,)
            ).fetchone()
            return str(row[0]) if row else ""

        wait_for(lambda: status(good).startswith("done"), timeout=60, what="the signal done")
        assert status(good) == "done: 11 row(s)"
        assert status(bad).startswith("rejected: WHERE clause: unexpected '; drop table'")
        events = table_events(kafka_bootstrap, topic_prefix, "items")
    assert sorted(e["after"]["id"] for e in incremental(events)) == list(range(30, 41))
    assert items.execute("select count(*) from items").fetchone() == (40,)


def test_kill_9_during_a_resnapshot_resumes_at_the_last_finished_chunk(
    tmp_path: Path,
    pg_conn: psycopg.Connection[Any],
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    daemon_process: Any,
) -> None:
    """kill -9 the daemon in the middle of a re-snapshot; the next start continues after the
    last chunk the progress record in Kafka holds, not from the start, and the table rebuilt
    from Kafka equals PostgreSQL."""
    rows, chunk = 6000, 20
    settings = settings_for(
        pg_dsn, kafka_bootstrap, topic_prefix, cdc_resnapshot_chunk_rows=str(chunk)
    )
    config = daemon_config(
        tmp_path / "cdc.toml",
        dsn=pg_dsn,
        bootstrap=kafka_bootstrap,
        prefix=topic_prefix,
        slot=settings.postgres.slot,
        cdc={"resnapshot_chunk_rows": chunk, "ddl_check_interval_s": 0.3},
    )
    pg_conn.execute("create table big (id int primary key, v text not null)")
    pg_conn.execute("insert into big select g, 'v' || g from generate_series(1, %s) g", (rows,))
    d = daemon_process(config).start()
    d.wait_streaming()
    wait_converged(kafka_bootstrap, topic_prefix, pg_conn, "big")
    pg_conn.execute("alter table big add column note text not null default 'dflt'")

    def progress() -> Progress:
        data = state_record(settings, "resnapshot", timeout_s=2)
        return Progress.from_bytes(data) if data else Progress()

    # Let the daemon run in short bursts and look at its committed progress while it is
    # stopped (SIGSTOP), so the kill lands in the middle of the job whatever the machine's
    # speed: a burst does a few chunks at most, the job has 300.
    seen_job = False
    held = Progress()
    assert d.proc is not None
    for _ in range(2000):
        d.proc.send_signal(signal.SIGSTOP)
        try:
            held = progress()
        except SinkUnavailable:
            # stopped inside a Kafka transaction on the progress topic: what it holds is
            # not settled yet; let it run on and look again
            d.proc.send_signal(signal.SIGCONT)
            time.sleep(0.02)
            continue
        if held.jobs and held.jobs[0].chunks >= 3:
            d.kill()
            break
        assert not (seen_job and not held.jobs), "the re-snapshot finished between two looks"
        seen_job = seen_job or bool(held.jobs)
        d.proc.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    assert held.jobs and held.jobs[0].chunks >= 3, "never saw three chunks done"
    after = held.jobs[0].after
    assert after is not None
    # the killed daemon may have left a Kafka transaction open on the progress topic, which
    # holds back committed reads until the broker aborts it: wait for a status that has them
    deadline = time.monotonic() + 180
    while "resnapshots" not in (
        report := json.loads(run_cli("cdc", "status", "--json", "--config", str(config)).stdout)
    ):
        assert time.monotonic() < deadline, f"cdc status never read the progress: {report}"
        time.sleep(0.5)
    shown = report["resnapshots"]
    assert shown[0]["table"] == "public.big" and shown[0]["after_key"] == list(after), shown
    assert shown[0]["reason"] == "column note added with a default"
    d.start()
    d.wait_log(f"resumes after key ['{after[0]}']", timeout=60)
    d.wait_log("re-snapshot of public.big done", timeout=120)
    events = wait_converged(kafka_bootstrap, topic_prefix, pg_conn, "big")
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log()[-3000:]
    sent = Counter(e["after"]["id"] for e in incremental(events))
    assert set(sent) == set(range(1, rows + 1))
    twice = sum(n - 1 for n in sent.values())
    assert twice <= 3 * chunk, f"{twice} rows re-sent twice: the restart did not resume"
    assert "Traceback" not in d.log()


def test_table_added_to_a_publication_of_listed_tables_is_sent(
    items: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A table that already has rows when it joins a publication of listed tables: its rows
    were never in the stream, so it is read as a re-snapshot.  (In a FOR ALL TABLES
    publication a table is published from its creation: nothing to re-read.)"""
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix, postgres_tables="public.items")
    items.execute("create table later (id int primary key, v text)")
    items.execute("insert into later select g, 'x' || g from generate_series(1, 30) g")
    with running_daemon(settings):
        wait_converged(kafka_bootstrap, topic_prefix, items, "items")
        items.execute("alter publication fieldsync add table later")
        items.execute("insert into later values (31, 'streamed')")
        events = wait_converged(kafka_bootstrap, topic_prefix, items, "later")
    assert len(incremental(events)) >= 30 and len(events) <= 32


def test_new_tables_of_a_for_all_tables_publication_are_not_read_again(
    items: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix)
    with running_daemon(settings):
        wait_converged(kafka_bootstrap, topic_prefix, items, "items")
        # one transaction: a catalog check between the two statements would see the table
        # without its key, and adding one is a key change, which does re-send the rows
        with items.transaction():
            items.execute(
                "create table made as select g as id, 'x' || g as v from generate_series(1, 30) g"
            )
            items.execute("alter table made add primary key (id)")
        marker = iter(range(100, 1000))

        def recorded() -> bool:
            items.execute("insert into made values (%s, 'marker')", (next(marker),))
            data = state_record(settings, "catalog")
            sigs = signatures_from_bytes(data) if data else {}
            return any(s.table == "made" for s in sigs.values())

        wait_for(recorded, timeout=60, interval=0.5, what="the catalog check to record 'made'")
        events = wait_converged(kafka_bootstrap, topic_prefix, items, "made")
    assert incremental(events) == [] and {e["op"] for e in events} == {"c"}


def test_unreadable_progress_record_stops_the_daemon_with_the_fix(
    pg_conn: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A progress record that cannot be read is not guessed around: the daemon stops, naming
    the record and the fix (a tombstone), and starts once the tombstone is written."""
    from kafka import KafkaProducer

    from cdc.errors import SinkError
    from cdc.pipeline import CdcDaemon

    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix)
    key = resnapshot_state.progress_key(settings.postgres.slot)
    topic = resnapshot_state.resnapshot_topic(topic_prefix)
    resnapshot_state.read_state_records(kafka_options(settings), [key], 20)  # creates it
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        producer.send(topic, key=key, value=b'{"version": 1, "jobs": [{"oid": "x"}]}').get(20)
        with pytest.raises(SinkError, match="write a tombstone") as info:
            CdcDaemon(settings).run()  # fails at start: nothing to stop
        assert f"{settings.postgres.slot}.resnapshot" in str(info.value)
        producer.send(topic, key=key, value=None).get(20)
    finally:
        producer.close()
    with running_daemon(settings):
        pass


def test_re_sent_rows_equal_streamed_rows_for_every_type(
    pg_conn: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A row re-read by a re-snapshot decodes to exactly the values its streamed insert had,
    for every mapped type (the table of test_cdc_types)."""
    from tests.cdc.test_cdc_types import DDL, ROW

    pg_conn.execute(DDL)
    pg_conn.execute("alter table typed add column ip inet, add column flag bool")
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix)
    with running_daemon(settings):
        pg_conn.execute(ROW)
        pg_conn.execute("update typed set ip = '10.1.2.3', flag = false")
        streamed = table_events(kafka_bootstrap, topic_prefix, "typed", expect=4)
        resnapshot_requests.request_snapshot(
            pg_conn,
            publication=settings.postgres.publication,
            signal_table=settings.postgres.signal_table,
            table="typed",
            where=None,
        )
        events = table_events(kafka_bootstrap, topic_prefix, "typed", expect=len(streamed) + 2)
    last = {e["after"]["id"]: e["after"] for e in streamed}
    again = {e["after"]["id"]: e["after"] for e in incremental(events)}
    assert again and again == last
