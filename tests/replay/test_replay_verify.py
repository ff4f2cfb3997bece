"""``fieldsync replay verify`` sees what it is for: it reads every partition of a
multi-table log to its end (a 50,000-row transaction, transaction markers, aborted and
fenced transactions in the middle of partitions), says which offsets it could not read
when a transaction stays open, and finds a difference in every column kind, including
columns the log never carried for a row."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from core.avro_envelope import POSITION_HEADER, parse_position_header
from replay.cli import EXIT_DIFFERENCES
from replay.errors import LogIncomplete
from replay.log_reader import LogReader
from replay.log_source import LogSource
from tests.cdc.cdc_support import running_daemon
from tests.fix_kafka import read_topic
from tests.replay.test_replay import Env


@pytest.fixture
def env(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Iterator[Env]:
    e = Env(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    try:
        yield e
    finally:
        e.close()


def _copy_in_transaction(
    bootstrap: str, transactional_id: str, records: list[Any], *, end: str
) -> Any:
    """Send ``records`` again (same key, value and position header: re-deliveries) in one
    Kafka transaction that ends as ``end`` says: ``abort``; ``fence`` (left open, then a
    new producer with the same transactional id takes over, as a restarted cdc does: Kafka
    aborts the open transaction, tansu commits it); ``open`` (left open; the producer is
    returned, the caller closes it)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
    producer.init_transactions()
    producer.begin_transaction()
    for r in records:
        producer.send(
            r.topic, key=r.key, value=r.value, headers=list(r.headers), partition=r.partition
        )
    producer.flush()
    if end == "abort":
        producer.abort_transaction()
        producer.close()
        return None
    if end == "fence":
        successor = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
        successor.init_transactions()
        successor.close()
        with contextlib.suppress(Exception):  # the fenced producer may complain on close
            producer.close(timeout=2)
        return None
    return producer


def _positions(records: list[Any]) -> list[tuple[int, int]]:
    return [parse_position_header(dict(r.headers)[POSITION_HEADER]) for r in records]


# --------------------------------------------------------------------------- reading


def test_verify_reads_every_partition_of_a_multi_table_log_to_its_end(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three tables, one transaction of 50,000 rows (40,000 of ``c``, 10,000 of ``b``, one
    of ``a``), then re-deliveries of some of their records in an aborted and in a fenced
    Kafka transaction, then more changes: verify without --table reads every partition to
    its end offset and agrees.  (Partitions fill the reader's per-partition buffer while
    the consumer still holds more of their records and other partitions are read: the
    path on which a paused partition stayed silent and the read gave up.)"""
    # a bound below one poll's worth of records (10,000), so every partition of the big
    # transaction reaches it while the consumer holds more of its records
    monkeypatch.setattr("replay.merge._BUFFER_HIGH", 3_000)
    for t in "abc":
        env.sql(f"create table {t} (id int primary key, v text)")
    with running_daemon(env.settings):
        env.sql("insert into a select g, 'a' || g from generate_series(1, 20) g")
        env.sql("insert into b select g, 'b' || g from generate_series(1, 20) g")
        with env.conn.transaction():
            env.sql("insert into a values (100, 'inside')")
            env.sql("insert into c select g, 'c' || g from generate_series(1, 40000) g")
            env.sql("insert into b select g, 'b' || g from generate_series(100, 10099) g")
        env.sql("insert into a values (101, 'after')")
        env.events("a", 22)  # cdc writes in commit order: the big transaction is in Kafka

        topic = {t: f"{env.prefix}.public.{t}" for t in "abc"}
        c_records = read_topic(env.bootstrap, topic["c"], timeout=60, expect=40_000)
        a_records = read_topic(env.bootstrap, topic["a"], timeout=30, expect=22)
        b_records = read_topic(env.bootstrap, topic["b"], timeout=30, expect=10_020)
        _copy_in_transaction(
            env.bootstrap,
            f"{env.prefix}-crashed",
            c_records[20_000:23_000] + a_records[:5],
            end="abort",
        )
        _copy_in_transaction(
            env.bootstrap,
            f"{env.prefix}-fenced",
            c_records[30_000:31_000] + b_records[5_000:5_300],
            end="fence",
        )
        env.sql("update c set v = 'later' where id <= 10")
        env.sql("update b set v = 'later' where id <= 3")
        env.sql("insert into a values (102, 'last')")
        env.events("a", 23)
        result = env.cli("verify", "-q", "--json", "--wait", "60")
    report = json.loads(result.stdout)
    assert report["ok"] is True, report["differences"][:5]
    assert report["tables"] == ["public.a", "public.b", "public.c"]
    assert report["rows_compared"] == 23 + 10_020 + 40_000

    # every partition was read to the end offset the broker reports now
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=env.bootstrap, isolation_level="read_committed")
    try:
        ends = consumer.end_offsets([TopicPartition(topic[t], 0) for t in "abc"])
    finally:
        consumer.close()
    read = {p["topic"]: p for p in report["partitions"]}
    assert set(read) == set(topic.values())
    for tp, end in ends.items():
        assert read[tp.topic]["end"] == end > 0
        assert read[tp.topic]["read_to"] >= end and read[tp.topic]["complete"], read[tp.topic]

    # what a plain read_committed consumer sees, the reader saw: every visible record,
    # the re-delivered ones dropped as duplicates (tansu shows aborted and fenced
    # transactions to read_committed readers; Kafka shows neither)
    visible = [r for t in "abc" for r in read_topic(env.bootstrap, topic[t], timeout=60)]
    distinct = set(_positions(visible))
    stats = report["read"]
    assert stats["records"] == len(visible)
    assert stats["duplicates"] == len(visible) - len(distinct)
    assert stats["events"] == len(distinct) == 23 + 10_020 + 40_000 + 3 + 10  # + updates


def test_a_transaction_left_open_is_named_with_its_offsets_until_it_ends(env: Env) -> None:
    """A producer that neither commits nor aborts (a cdc killed and not started again)
    leaves a transaction open.  Kafka reports the last stable offset as the end, so the
    read ends before it; tansu reports no committed end at all, so the reader reads to
    the partition's log end, and when it cannot get past the open transaction it names
    the partition and the offsets it could not read instead of waiting or calling the
    read complete.  Once the transaction commits, the same read gets every record."""
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    from core.avro_envelope import Source, position_header
    from tests.replay.test_replay import _codec

    codec = _codec(env.prefix)
    topic = f"{env.prefix}.public.t"
    admin = KafkaAdminClient(bootstrap_servers=env.bootstrap)
    admin.create_topics([NewTopic(topic, 1, 1), NewTopic(f"{env.prefix}._schemas", 1, 1)])
    admin.close()

    def send(producer: Any, n: int) -> Any:
        lsn = 0x2000 + n
        source = Source("app", "public", "t", lsn, lsn, 1, 0, 1_700_000_000_000_000 + n)
        key, value = codec.encode_change("c", None, [str(n), f"v{n}"], source, 0)
        return producer.send(
            topic, key=key, value=value, headers=[(POSITION_HEADER, position_header(lsn, 0))]
        )

    committed = KafkaProducer(bootstrap_servers=env.bootstrap, transactional_id=f"{env.prefix}-a")
    committed.init_transactions()
    committed.begin_transaction()
    for schema in (codec.value_schema_json, codec.key_schema_json):
        assert schema is not None
        committed.send(f"{env.prefix}._schemas", value=schema.encode())
    for n in range(30):
        send(committed, n)
    committed.commit_transaction()
    committed.close()
    hanging = KafkaProducer(bootstrap_servers=env.bootstrap, transactional_id=f"{env.prefix}-b")
    hanging.init_transactions()
    hanging.begin_transaction()
    first_open = send(hanging, 30).get(timeout=30).offset
    for n in range(31, 35):
        send(hanging, n)
    hanging.flush()
    try:
        source = LogSource({"bootstrap_servers": env.bootstrap}, env.prefix, timeout_s=2)
        try:
            with LogReader(source, ["t"]) as reader:
                ids = [ev.after["id"] for ev in reader.events() if ev.after]
        except LogIncomplete as exc:  # tansu: no committed end while the transaction is open
            assert exc.unread and exc.unread[0][:3] == (topic, 0, first_open)
            assert f"{topic}[0] offsets {first_open}-" in str(exc)
            assert "still open" in str(exc)
        else:  # Kafka: the last stable offset ends the read before the open transaction
            assert ids == list(range(30))
        hanging.commit_transaction()
    finally:
        hanging.close()
    # the 2 s above only make the open transaction's wait short; once it is committed the
    # read must get to the end, however long the broker takes to settle it
    source = LogSource({"bootstrap_servers": env.bootstrap}, env.prefix, timeout_s=60)
    with LogReader(source, ["t"]) as reader:
        assert [ev.after["id"] for ev in reader.events() if ev.after] == list(range(35))
        assert all(p["read_to"] >= p["end"] > first_open for p in reader.read_to())
        assert all(p["complete"] for p in reader.read_to())


# --------------------------------------------------------------------------- every column


BASE = {  # column: (type, value of every row as cdc wrote it)
    "b": ("bool", "true"),
    "i8": ("bigint", "9007199254740993"),
    "f8": ("float8", "1.5"),
    "n": ("numeric(12,3)", "1.25"),
    "nn": ("numeric", "3.14"),
    "t": ("text", "Grüße, 世界 ✓"),
    "by": ("bytea", "\\x00ff"),
    "d": ("date", "2024-02-29"),
    "tm": ("time", "12:34:56.789"),
    "ts": ("timestamp", "2024-01-01 10:00:00"),
    "tz": ("timestamptz", "2024-01-01 10:00:00+02"),
    "iv": ("interval", "1 mon 2 days 00:00:03"),
    "u": ("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    "j": ("json", '{"a": [1, 2]}'),
    "jb": ("jsonb", '{"a": [1, 2]}'),
    "arr": ("int[]", "{1,NULL,3}"),
    "tarr": ("text[]", '{"x y",z}'),
    "e": ("mood", "ok"),
}

# (case, column, value PostgreSQL gets behind cdc's back; None: NULL)
PLANTED = [
    ("bool", "b", "false"),
    ("bigint", "i8", "9007199254740992"),
    ("float", "f8", "1.5000000000000002"),
    ("numeric", "n", "1.251"),
    ("numeric unconstrained", "nn", "3.1400000001"),
    ("text with unicode", "t", "Grüsse, 世界 ✓"),
    ("bytea", "by", "\\x00fe"),
    ("date", "d", "2024-03-01"),
    ("time", "tm", "12:34:56.788"),
    ("timestamp", "ts", "2024-01-01 10:00:00.000001"),
    ("timestamptz", "tz", "2024-01-01 10:00:00+03"),
    ("interval", "iv", "1 mon 2 days 00:00:04"),
    ("uuid", "u", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12"),
    ("json", "j", '{"a": [1, 3]}'),
    ("jsonb", "jb", '{"a": [2, 1]}'),
    ("int array", "arr", "{1,2,3}"),
    ("text array", "tarr", '{"x y","z "}'),
    ("enum", "e", "happy"),
    ("NULL in PostgreSQL", "t", None),
]
# the same values spelled differently: PostgreSQL holds what the log holds
RESPELLED = {
    "f8": "1.50",
    "n": "1.250",
    "nn": "3.140",
    "tz": "2024-01-01 09:00:00+01",
    "u": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
    "jb": '{ "a" : [1,2] }',
    "arr": "{1, NULL, 3}",
    "b": "yes",
}
COLUMNS = list(BASE)


class Planted:
    """One log and one verify run, shared by the tests below (see ``planted``)."""

    def __init__(self, report: dict[str, Any], text: str, dsn: str) -> None:
        self.report = report
        self.text = text
        self.dsn = dsn

    def diffs(self, table: str, key: Any) -> list[dict[str, Any]]:
        return [
            d
            for d in self.report["differences"]
            if d["table"] == f"public.{table}" and list(d["key"].values()) == [key]
        ]

    def columns(self, table: str, key: Any) -> dict[str, dict[str, Any]]:
        (d,) = self.diffs(table, key)
        assert d["kind"] == "differs"
        return {c["column"]: c for c in d["columns"]}


def _row_values(overrides: dict[str, str | None]) -> list[str | None]:
    return [overrides[c] if c in overrides else BASE[c][1] for c in COLUMNS]


@pytest.fixture(scope="module")
def planted(
    pg_server: Any, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Planted]:
    """A log written by cdc, then changes PostgreSQL makes behind cdc's back (while the
    publication publishes inserts only), and one ``verify --json`` over all of it.

    - ``kinds``: row 0 as written; row ``i`` with the ``i``-th value of PLANTED changed;
      row 90 written with NULL in ``i8`` and given a value; row 99 with the same values
      spelled differently (RESPELLED).
    - ``grown``: rows written before ``add column c text default 'dflt'`` and
      ``add column n int`` (PostgreSQL has 'dflt' and NULL there, the log nothing), a
      row between the two, and one after both (n NULL in the log and in PostgreSQL).
    - ``toasty``: a row whose only event is an update that left its large value
      unchanged (TOAST), the insert having been unpublished.
    - ``retyped``: rows written before ``alter column … type``: cast to the type of now
      they equal PostgreSQL's, except one changed behind cdc's back and one whose text
      is no integer.
    """
    import uuid

    import psycopg

    from replay.cli import app
    from tests.cdc.cdc_support import make_settings, table_events
    from tests.fix_pg import _drop_database

    suffix = uuid.uuid4().hex[:10]
    name = f"t_verify_{suffix}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    dsn = pg_server.dsn_for(name)
    prefix = f"fs{suffix}"
    slot = f"fsv_{suffix}"
    tmp = tmp_path_factory.mktemp("planted")
    config = tmp / "cdc.toml"
    config.write_text(
        f"[postgres]\ndsn = {json.dumps(dsn)}\nslot = {json.dumps(slot)}\n"
        f"status_interval_s = 1\n[kafka]\nbootstrap_servers = {json.dumps(kafka_bootstrap)}\n"
        f"topic_prefix = {json.dumps(prefix)}\ntimeout_s = 10\n"
    )
    # re-snapshots off: the log as cdc writes it with cdc.resnapshot_on_ddl = false, where
    # DDL that changes values without row events leaves the log without them
    settings = make_settings(
        dsn, kafka_bootstrap, prefix, postgres_slot=slot, cdc_resnapshot_on_ddl="false"
    )
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        conn.execute("create type mood as enum ('sad', 'ok', 'happy')")
        decl = ", ".join(f"{c} {BASE[c][0]}" for c in COLUMNS)
        conn.execute(f"create table kinds (id int primary key, {decl})")
        conn.execute("create table grown (id int primary key, v text)")
        conn.execute("create table toasty (id int primary key, big text, v int)")
        conn.execute(
            "create table retyped (id int primary key, amount numeric(6,2), code int, tag text)"
        )
        cols = ", ".join(f"%s::{BASE[c][0]}" for c in COLUMNS)
        insert = f"insert into kinds values (%s, {cols})"
        with running_daemon(settings):
            rows = [0, 90, 99, *range(1, len(PLANTED) + 1)]
            for i in rows:
                conn.execute(insert, [i, *_row_values({"i8": None} if i == 90 else {})])
            conn.execute("insert into grown values (1, 'a'), (2, 'b'), (3, 'c')")
            conn.execute(
                "insert into retyped values (1, 1.5, 5, '7'), (2, 2.25, 5, '8'), (3, 0, 6, 'abc')"
            )
            publication = settings.postgres.publication
            conn.execute(f"alter publication {publication} set (publish = 'update')")
            conn.execute(
                "insert into toasty select 1, string_agg(md5(g::text), ''), 1 "
                "from generate_series(1, 4000) g"
            )
            conn.execute("update toasty set v = 2 where id = 1")
            conn.execute(f"alter publication {publication} set (publish = 'insert')")
            conn.execute("alter table grown add column c text default 'dflt'")
            conn.execute("insert into grown values (4, 'd', 'own')")
            conn.execute("alter table grown add column n int")
            conn.execute("insert into grown values (5, 'e', 'own', null)")
            conn.execute("alter table retyped alter column amount type numeric(8,3)")
            conn.execute("alter table retyped alter column code type text")
            conn.execute(
                "alter table retyped alter column tag type int using "
                "(case when tag ~ '^[0-9]+$' then tag::int else 0 end)"
            )
            # behind cdc's back: updates are not published
            for i, (_, column, value) in enumerate(PLANTED, start=1):
                conn.execute(
                    f"update kinds set {column} = %s::{BASE[column][0]} where id = %s", (value, i)
                )
            conn.execute("update kinds set i8 = 5 where id = 90")
            for column, value in RESPELLED.items():
                conn.execute(
                    f"update kinds set {column} = %s::{BASE[column][0]} where id = 99", (value,)
                )
            conn.execute("update retyped set code = '5x' where id = 2")
            table_events(kafka_bootstrap, prefix, "grown", expect=5, timeout=30)
            table_events(kafka_bootstrap, prefix, "toasty", expect=1, timeout=30)
            runner = CliRunner()
            as_json = runner.invoke(
                app, ["verify", "-q", "--json", "--rechecks", "0", "--config", str(config)]
            )
            as_text = runner.invoke(
                app,
                ["verify", "-q", "--rechecks", "0", "--max-rows", "50", "--config", str(config)],
            )
        for result in (as_json, as_text):
            assert result.exit_code == EXIT_DIFFERENCES, (result.stdout, result.stderr)
        yield Planted(json.loads(as_json.stdout), as_text.stdout, dsn)
    finally:
        conn.close()
        _drop_database(pg_server.dsn, name)


def _same_in_postgres(dsn: str, type_sql: str, a: str | None, b: str | None) -> bool:
    """PostgreSQL reads the two texts as the same value of the type."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            f"select (%s::{type_sql})::text is not distinct from (%s::{type_sql})::text", (a, b)
        ).fetchone()
    assert row is not None
    return bool(row[0])


@pytest.mark.parametrize(
    ("row", "column", "value"),
    [(i, column, value) for i, (_, column, value) in enumerate(PLANTED, start=1)],
    ids=[case for case, _, _ in PLANTED],
)
def test_verify_finds_a_value_changed_behind_cdcs_back_in_every_column_kind(
    planted: Planted, row: int, column: str, value: str | None
) -> None:
    columns = planted.columns("kinds", row)
    assert list(columns) == [column]  # that column, and no other
    found = columns[column]
    assert found["in_log"] is True and found["reason"] is None
    type_sql, base = BASE[column]
    # both sides as PostgreSQL prints them: the log's value is the one cdc wrote, the
    # PostgreSQL value the one planted (PostgreSQL reads each text back as that value)
    assert _same_in_postgres(planted.dsn, type_sql, found["log"], base)
    assert _same_in_postgres(planted.dsn, type_sql, found["postgres"], value)
    assert not _same_in_postgres(planted.dsn, type_sql, found["log"], found["postgres"])


def test_verify_finds_a_value_where_the_log_has_null(planted: Planted) -> None:
    columns = planted.columns("kinds", 90)
    assert list(columns) == ["i8"]
    assert columns["i8"] == {
        "column": "i8",
        "log": None,
        "postgres": "5",
        "in_log": True,  # the log holds NULL: a value, unlike a column it never carried
        "reason": None,
    }


def test_equal_values_compare_equal_however_they_are_spelled(planted: Planted) -> None:
    """Row 0 is as cdc wrote it; row 99 holds the same values written differently
    (1.50 for 1.5, another zone for the same instant, upper-case uuid, jsonb with other
    spacing, 'yes' for true); the retyped rows 1 hold, cast to the types of now, what the
    log holds; grown row 5 has NULL in the log and in PostgreSQL."""
    assert planted.diffs("kinds", 0) == []
    assert planted.diffs("kinds", 99) == []
    assert planted.diffs("retyped", 1) == []
    assert planted.diffs("grown", 5) == []
    assert planted.report["rows_compared"] == len(PLANTED) + 3 + 5 + 1 + 3


def test_a_column_added_with_a_default_is_not_in_the_log_for_older_rows(
    planted: Planted,
) -> None:
    """ADD COLUMN … DEFAULT gives old rows a value without a row event: the log holds
    none for them, and verify says which rows, which column, and why."""
    for key in (1, 2, 3):
        columns = planted.columns("grown", key)
        assert set(columns) == {"c", "n"}
        assert columns["c"]["in_log"] is False and columns["c"]["postgres"] == "dflt"
        assert columns["c"]["log"] is None
        assert "used a schema without this column" in columns["c"]["reason"]
        # NULL in PostgreSQL, and no value at all in the log: not the same thing
        assert columns["n"]["in_log"] is False and columns["n"]["postgres"] is None
    columns = planted.columns("grown", 4)
    assert set(columns) == {"n"}  # written after c was added, before n was
    assert planted.report["values_not_in_log"] == 3 * 2 + 1 + 1  # + toasty's big
    (position,) = {d["log_position"] for d in planted.diffs("grown", 1)}
    assert (
        f"c: not in the log for this row (its last event, at {position}, used a schema "
        "without this column); PostgreSQL 'dflt'"
    ) in planted.text
    assert "public.grown: 0 missing from the log, 0 only in the log, 4 different" in planted.text


def test_a_toasted_value_the_log_never_held_is_a_difference(planted: Planted) -> None:
    columns = planted.columns("toasty", 1)
    assert set(columns) == {"big"}
    assert columns["big"]["in_log"] is False and len(columns["big"]["postgres"]) == 128_000
    assert "left it unchanged as a TOASTed value" in columns["big"]["reason"]


def test_values_written_under_an_older_column_type_are_cast_to_the_type_of_now(
    planted: Planted,
) -> None:
    columns = planted.columns("retyped", 2)
    assert columns == {
        "code": {"column": "code", "log": "5", "postgres": "5x", "in_log": True, "reason": None}
    }
    columns = planted.columns("retyped", 3)
    assert set(columns) == {"tag"}
    assert columns["tag"]["log"] == "abc" and columns["tag"]["postgres"] == "0"
    assert columns["tag"]["reason"].startswith("the log's value is no int4: ")
    assert "invalid input syntax for type integer" in columns["tag"]["reason"]
