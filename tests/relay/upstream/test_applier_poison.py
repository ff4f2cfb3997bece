"""No entry stops the applier: entries that fail for a reason no retry can cure are
rejected, kept as dead letters (counted, logged) and the partition moves on, while
failures of the database itself are retried.  Real PostgreSQL and broker; the applier
runs its own loop (with its back-off) in a thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core.hlc import Hlc
from core.journal_format import MAX_BIGINT
from core.values import dump_json
from relay.errors import ApplierError
from relay.upstream.applier_failures import Failure, classify_failure
from tests.cdc.cdc_support import wait_for
from tests.relay.upstream.test_applier import RULES, Env, insert_base, now_ms, seen

HOSTS_RULES = (
    RULES
    + """
[[bucket]]
name = "net"

[[bucket.table]]
table = "public.hosts"
"""
)


@pytest.fixture
def env(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Iterator[Env]:
    e = Env(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    e.sql("create table hosts (addr inet primary key, label text)")
    e.rules.write_text(HOSTS_RULES)
    first = e.applier()
    first._start()
    first.ensure_topics()
    try:
        yield e
    finally:
        e.close()


def raw_record(device: str, seq: int, entry: dict[str, Any]) -> bytes:
    """A ``_journal`` value written by hand (as a relay of another version, or anything
    else with access to the topic, could): nothing checked it."""
    return dump_json(
        {
            "v": 1,
            "device_id": device,
            "seq": seq,
            "received_at_us": now_ms() * 1000,
            "claims": {"sub": device, "technician": "t42"},
            "entry": entry,
            "rejection": None,
        }
    )


def produce_raw(env: Env, device: str, value: bytes) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=env.bootstrap, acks="all")
    producer.send(f"{env.prefix}._journal", key=device.encode(), value=value)
    producer.flush()
    producer.close()


def update(device: str, seq: int, key: int, new: dict[str, Any]) -> dict[str, Any]:
    return {
        "seq": seq,
        "table": "public.work_orders",
        "op": "update",
        "key": [key],
        "old": seen(
            {
                "id": key,
                "site": "s1",
                "technician": "t42",
                "status": "open",
                "notes": "n0",
                "qty": 5,
            }
        ),
        "new": new,
        "base": {"commit_lsn": 1, "seq": 0},
        "hlc": Hlc(now_ms(), 0, device).encode(),
        "prev_seq": None,
    }


def test_poison_entries_between_good_ones_are_dead_lettered_and_the_rest_applies(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    for key in (1, 2, 3, 4):
        insert_base(env, id=key)
    env.sql("insert into hosts values ('10.0.0.1', 'gateway')")
    host_entry = {
        "seq": 2,
        "table": "public.hosts",
        "op": "update",
        "key": ["not-an-address"],  # text to the relay; PostgreSQL's inet refuses it
        "old": {"addr": "not-an-address", "label": "x"},
        "new": {"label": "y"},
        "base": None,
        "hlc": Hlc(now_ms(), 0, "dev-q").encode(),
        "prev_seq": None,
    }
    lsn_entry = {
        **update("dev-p", 1, 3, {"notes": "never"}),
        "base": {"commit_lsn": 1 << 63, "seq": 0},
    }
    produce_raw(env, "dev-a", raw_record("dev-a", 1, update("dev-a", 1, 1, {"notes": "from a"})))
    produce_raw(env, "dev-p", raw_record("dev-p", 1, lsn_entry))
    # a run of one device with the poison between two good entries
    produce_raw(env, "dev-q", raw_record("dev-q", 1, update("dev-q", 1, 3, {"qty": 6})))
    produce_raw(env, "dev-q", raw_record("dev-q", 2, host_entry))
    produce_raw(env, "dev-q", raw_record("dev-q", 3, update("dev-q", 3, 4, {"qty": 7})))
    produce_raw(env, "dev-b", raw_record("dev-b", 1, update("dev-b", 1, 2, {"notes": "from b"})))

    applier = env.appliers[0]
    thread = threading.Thread(target=applier.run, name="applier-under-test", daemon=True)
    with caplog.at_level(logging.ERROR, logger="relay.upstream.applier"):
        thread.start()
        try:
            wait_for(
                lambda: (
                    env.sql("select id, notes, qty from work_orders order by id")
                    == [(1, "from a", 5), (2, "from b", 5), (3, "n0", 6), (4, "n0", 7)]
                ),
                timeout=60,
                what="the good entries of every device applied",
            )
            outs = env.outcomes(expect=6)
        finally:
            applier.request_stop()
            thread.join(30)
    # the loop never backed off: no retry was needed to get past the poison
    assert applier.stats.failures == 0
    assert {k: (o.kind.value, o.reason) for k, o in outs.items()} == {
        ("dev-a", 1): ("applied", None),
        ("dev-b", 1): ("applied", None),
        ("dev-p", 1): ("rejected", "malformed"),
        ("dev-q", 1): ("applied", None),
        ("dev-q", 2): ("rejected", "db_error"),
        ("dev-q", 3): ("applied", None),
    }
    assert "base.commit_lsn" in outs[("dev-p", 1)].message
    assert "22P02" in outs[("dev-q", 2)].message and "inet" in outs[("dev-q", 2)].message
    dead = env.sql("select device_id, seq, reason, sqlstate from fieldsync_applier.dead_letters")
    assert dead == [("dev-q", 2, "db_error", "22P02")]
    assert applier.stats.dead_letters == 1
    assert any(
        "dead letter" in r.getMessage() and "dev-q" in r.getMessage() for r in caplog.records
    )
    assert env.sql("select label from hosts") == [("gateway",)]
    assert env.sql("select count(*) from fieldsync_applier.applied") == [(6,)]


def test_a_record_with_a_seq_beyond_bigint_is_kept_aside(env: Env) -> None:
    insert_base(env)
    produce_raw(
        env, "dev-x", raw_record("dev-x", 1 << 63, update("dev-x", 1 << 63, 1, {"notes": "x"}))
    )
    env.produce(env.record("dev-a", "update", [2], seen(insert_base(env, id=2)), {"notes": "ok"}))
    applier = env.run()
    assert applier.stats.bad_records == 1 and applier.stats.failures == 0
    bad = env.sql("select error from fieldsync_applier.bad_records")
    assert len(bad) == 1 and str(MAX_BIGINT) in bad[0][0]
    assert env.sql("select notes from work_orders where id = 2") == [("ok",)]


@pytest.mark.parametrize("errcode", ["P0001", "0A000"])
def test_a_trigger_refusing_an_entry_rejects_only_that_entry(env: Env, errcode: str) -> None:
    """An entry PostgreSQL refuses while writing (here a trigger's RAISE, as a plain
    exception or as a feature not supported) is rejected with PostgreSQL's message; the
    device's other entries of the same run still apply."""
    for key in (1, 2, 3):
        insert_base(env, id=key)
    env.sql(
        "create function no_bad_notes() returns trigger language plpgsql as $$ begin "
        "if new.notes = 'bad' then raise exception 'notes may not be bad' "
        f"using errcode = '{errcode}'; end if; "
        "return new; end $$"
    )
    env.sql(
        "create trigger no_bad before update on work_orders for each row "
        "execute function no_bad_notes()"
    )
    env.produce(
        *(
            env.record("dev-a", "update", [key], seen({**insert_row(key)}), {"notes": notes})
            for key, notes in ((1, "fine"), (2, "bad"), (3, "also fine"))
        )
    )
    applier = env.run()
    outs = env.outcomes(expect=3)
    assert [outs[("dev-a", s)].reason for s in (1, 2, 3)] == [None, "db_error", None]
    assert "notes may not be bad" in outs[("dev-a", 2)].message
    assert errcode in outs[("dev-a", 2)].message
    assert env.sql("select notes from work_orders order by id") == [
        ("fine",),
        ("n0",),
        ("also fine",),
    ]
    assert applier.stats.dead_letters == 1 and applier.stats.failures == 0


def insert_row(key: int) -> dict[str, Any]:
    return {"id": key, "site": "s1", "technician": "t42", "status": "open", "notes": "n0", "qty": 5}


def test_failures_are_classified_by_sqlstate() -> None:
    assert classify_failure(psycopg.errors.NumericValueOutOfRange()) is Failure.ENTRY
    assert classify_failure(psycopg.errors.CheckViolation()) is Failure.ENTRY
    assert classify_failure(psycopg.errors.RaiseException()) is Failure.ENTRY
    assert classify_failure(psycopg.errors.ProgramLimitExceeded()) is Failure.ENTRY
    assert classify_failure(psycopg.errors.FeatureNotSupported()) is Failure.ENTRY
    assert classify_failure(psycopg.errors.SerializationFailure()) is Failure.TRANSIENT
    assert classify_failure(psycopg.errors.DeadlockDetected()) is Failure.TRANSIENT
    assert classify_failure(psycopg.errors.AdminShutdown()) is Failure.TRANSIENT
    assert classify_failure(psycopg.errors.InsufficientPrivilege()) is Failure.TRANSIENT
    assert classify_failure(psycopg.errors.UndefinedColumn()) is Failure.TRANSIENT
    assert classify_failure(psycopg.OperationalError("connection lost")) is Failure.TRANSIENT
    assert classify_failure(ApplierError("database unreachable")) is Failure.TRANSIENT
    assert classify_failure(ValueError("a bug on this entry")) is Failure.ENTRY


def test_the_database_going_away_is_retried_not_dead_lettered(env: Env) -> None:
    """A transient failure (the connection killed mid-run) backs off and applies the
    same entries later; nothing is rejected or dead-lettered for it."""
    insert_base(env)
    applier = env.appliers[0]
    killed: list[bool] = []
    original = applier.db.runs._run_txn

    def run_txn_losing_the_connection(*args: Any, **kw: Any) -> Any:
        if not killed:
            killed.append(True)
            with psycopg.connect(env.dsn, autocommit=True) as admin:
                admin.execute(
                    "select pg_terminate_backend(%s)", (applier.db.connection().info.backend_pid,)
                )
        return original(*args, **kw)

    applier.db.runs._run_txn = run_txn_losing_the_connection  # type: ignore[method-assign]
    env.produce(env.record("dev-a", "update", [1], seen(insert_row(1)), {"notes": "after"}))
    thread = threading.Thread(target=applier.run, daemon=True)
    thread.start()
    try:
        wait_for(
            lambda: env.sql("select notes from work_orders") == [("after",)],
            timeout=60,
            what="the entry applied after the reconnect",
        )
    finally:
        applier.request_stop()
        thread.join(30)
    assert killed and applier.stats.failures >= 1
    assert applier.stats.dead_letters == 0
    assert env.sql("select outcome from fieldsync_applier.applied") == [("applied",)]


CODES_RULES = (
    RULES
    + """
[[bucket]]
name = "codes"

[[bucket.table]]
table = "public.codes"
"""
)


def test_values_too_long_for_their_column_are_refused_not_cut(env: Env) -> None:
    """An explicit cast cuts a ``varchar(n)``, ``char(n)`` or ``bit(n)`` value to length;
    the applier writes with PostgreSQL's assignment rules, which refuse it (22001, 22026):
    the entry is rejected with PostgreSQL's message and nothing is written."""
    env.sql(
        "create table codes (id int primary key, code varchar(5), tag char(2), "
        "flags bit(3), note text)"
    )
    env.sql("insert into codes values (1, 'abc', 'ab', '101', 'n'), (2, 'abc', 'ab', '101', 'n')")
    env.rules.write_text(CODES_RULES)
    old = {"id": 1, "code": "abc", "tag": "ab", "flags": "101", "note": "n"}
    env.produce(
        env.record("dev-c", "update", [1], old, {"code": "abcdefgh"}, table="public.codes"),
        env.record("dev-c", "update", [1], old, {"tag": "abc"}, table="public.codes"),
        env.record("dev-c", "update", [1], old, {"flags": "1011"}, table="public.codes"),
        env.record(
            "dev-c",
            "insert",
            [3],
            None,
            {"id": 3, "code": "toolong", "tag": "ab", "flags": "101", "note": "n"},
            table="public.codes",
        ),
        env.record(
            "dev-c",
            "update",
            [2],
            {**old, "id": 2},
            {"code": "abcde", "flags": "011"},
            table="public.codes",
        ),
    )
    applier = env.run(env.applier())
    outs = env.outcomes(expect=5)
    got = {seq: (o.kind.value, o.reason) for (dev, seq), o in outs.items() if dev == "dev-c"}
    assert got == {
        1: ("rejected", "db_error"),
        2: ("rejected", "db_error"),
        3: ("rejected", "db_error"),
        4: ("rejected", "db_error"),
        5: ("applied", None),
    }
    assert "22001" in outs[("dev-c", 1)].message and "too long" in outs[("dev-c", 1)].message
    assert "22026" in outs[("dev-c", 3)].message
    assert env.sql("select id, code, tag, flags::text from codes order by id") == [
        (1, "abc", "ab", "101"),
        (2, "abcde", "ab", "011"),
    ]
    assert applier.stats.failures == 0


def test_a_generated_column_is_not_the_devices_to_write(env: Env) -> None:
    """Generated columns are PostgreSQL's: the applier does not know them as writable
    columns (a device writing one is rejected, naming it), and PostgreSQL refusing a value
    for a column it generates (428C9, e.g. an identity column GENERATED ALWAYS) rejects
    that entry instead of stopping the partition."""
    env.sql(
        "create table codes (id int generated always as identity primary key, "
        "code varchar(5), note text, "
        "doubled text generated always as (note || note) stored)"
    )
    env.sql("insert into codes (code, note) values ('abc', 'n')")
    env.rules.write_text(CODES_RULES)
    old = {"id": 1, "code": "abc", "note": "n"}
    env.produce(
        env.record("dev-g", "update", [1], old, {"doubled": "xx"}, table="public.codes"),
        env.record(
            "dev-g",
            "insert",
            [7],
            None,
            {"id": 7, "code": "new", "note": "m"},
            table="public.codes",
        ),
        env.record("dev-g", "update", [1], old, {"note": "q"}, table="public.codes"),
    )
    applier = env.run(env.applier())
    outs = env.outcomes(expect=3)
    got = {seq: (o.kind.value, o.reason) for (dev, seq), o in outs.items() if dev == "dev-g"}
    assert got[1][0] == "rejected" and "doubled" in outs[("dev-g", 1)].message
    assert got[2] == ("rejected", "db_error") and "428C9" in outs[("dev-g", 2)].message
    assert got[3] == ("applied", None)
    assert env.sql("select id, note, doubled from codes") == [(1, "q", "qq")]
    assert applier.stats.failures == 0
