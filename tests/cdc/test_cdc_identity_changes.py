"""A table's row identity in Kafka changes shape: its replica identity index replaced or
its column retyped, the identity switched between DEFAULT, FULL, USING INDEX and NOTHING,
a primary key added or dropped (docs/cdc.md "A changed key", docs/events.md "Key").  The
Kafka key is the identity index under USING INDEX, else the primary key, else none; adding
or dropping a primary key under USING INDEX keeps it (checked too).

Against the real PostgreSQL and broker, each while another session inserts, updates and
deletes rows: the table topic read as a compacted table (the latest record of each Kafka
key, deletes dropped, records without a key skipped) equals the table in PostgreSQL when
the table has key columns after the change, and holds no row when it has none (its events
then have no Kafka key): no row is left under a key of the old identity.  The same when the
daemon is killed (SIGKILL, at the fault points) while it deletes the old keys and while it
sends the rows again.  REPLICA IDENTITY NOTHING: PostgreSQL refuses the table's updates and
deletes (an error to the writer, nothing lost in the log).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc.resnapshot_stream import INCREMENTAL
from core.avro_envelope import decode
from devtools.cdc_demo import read_schemas
from tests.cdc.cdc_support import running_daemon, wait_for
from tests.cdc.test_cdc_ddl_resync import settings_for
from tests.cdc.test_cdc_key_retirement import (
    ROWS,
    Writer,
    assert_only_old_or_gone_keys,
    crash_daemon,
    finished,
    job_finished,
    killed_at,
    pg_table,
    retire_deletes,
    topic_table,
    wait_topic_equals_pg,
)

INSERT_U = "insert into u (id, a, v) values (%s, %s::int + 500000, %s)"
"""The writer's rows: ``a`` never equals an ``id`` (a key text of one identity is never a
key text of the other by chance)."""
INSERT_SAME = "insert into u (id, a, v) values (%s, %s, %s)"
"""Rows whose ``a`` equals their ``id``: each key text is one of both identities."""


@dataclasses.dataclass(frozen=True)
class Change:
    setup: tuple[str, ...]  # after the table and its unique indexes u_id (id), u_a (a)
    ddl: str
    before: tuple[str, ...]  # the Kafka key columns before the DDL (() none)
    after: tuple[str, ...]
    refused: bool = False  # updates and deletes are refused before or after the DDL
    same_values: bool = False  # a = id in every row (else a = id + 500000)

    @property
    def insert(self) -> str:
        return INSERT_SAME if self.same_values else INSERT_U

    @property
    def rekeyed(self) -> bool:
        """Whether the rows' Kafka keys change (else no re-snapshot runs)."""
        return self.before != self.after or "type" in self.ddl


IDENTITY = "alter table u replica identity"
ADD_PK = "alter table u add constraint u_pkey primary key (id)"

CHANGES = {
    "index to another index": Change(
        (f"{IDENTITY} using index u_id",), f"{IDENTITY} using index u_a", ("id",), ("a",)
    ),
    "index to another index, same values": Change(
        (f"{IDENTITY} using index u_id",),
        f"{IDENTITY} using index u_a",
        ("id",),
        ("a",),
        same_values=True,
    ),
    "index column retyped": Change(
        (f"{IDENTITY} using index u_id",),
        "alter table u alter column id type text",
        ("id",),
        ("id",),
    ),
    "primary key to an index identity": Change(
        (ADD_PK,), f"{IDENTITY} using index u_a", ("id",), ("a",)
    ),
    "index identity back to the primary key": Change(
        (ADD_PK, f"{IDENTITY} using index u_a"), f"{IDENTITY} default", ("a",), ("id",)
    ),
    "primary key added to an index identity": Change(
        (f"{IDENTITY} using index u_a",), ADD_PK, ("a",), ("a",)
    ),
    "primary key dropped, index identity left": Change(
        (ADD_PK, f"{IDENTITY} using index u_a"),
        "alter table u drop constraint u_pkey",
        ("a",),
        ("a",),
    ),
    "full to index": Change((f"{IDENTITY} full",), f"{IDENTITY} using index u_id", (), ("id",)),
    "default to index": Change((), f"{IDENTITY} using index u_id", (), ("id",), refused=True),
    "primary key added to a full table": Change((f"{IDENTITY} full",), ADD_PK, (), ("id",)),
    "index to full": Change((f"{IDENTITY} using index u_id",), f"{IDENTITY} full", ("id",), ()),
    "index to default": Change(
        (f"{IDENTITY} using index u_id",), f"{IDENTITY} default", ("id",), (), refused=True
    ),
    "index to nothing": Change(
        (f"{IDENTITY} using index u_id",), f"{IDENTITY} nothing", ("id",), (), refused=True
    ),
    "primary key dropped, no identity left": Change(
        (ADD_PK,), "alter table u drop constraint u_pkey", ("id",), (), refused=True
    ),
}


def create_u(conn: psycopg.Connection[Any], change: Change) -> None:
    conn.execute("create table u (id int not null, a int not null, v text)")
    conn.execute("create unique index u_id on u (id)")
    conn.execute("create unique index u_a on u (a)")
    for statement in change.setup:
        conn.execute(statement)
    conn.execute(
        "insert into u select g, g + %s, 'v' || g from generate_series(1, %s) g",
        (0 if change.same_values else 500000, ROWS),
    )


def wait_sent(
    bootstrap: str, prefix: str, conn: psycopg.Connection[Any], key: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The table's rows are in the topic: folded by key when it has key columns, else as
    many events without a key as it has rows."""
    if key:
        return wait_topic_equals_pg(bootstrap, prefix, conn, "u", key)

    def keyless() -> list[dict[str, Any]] | None:
        _, events = topic_table(bootstrap, prefix, "u", key)
        return events if sum(1 for e in events if e["_keybytes"] is None) >= ROWS else None

    events: list[dict[str, Any]] = wait_for(keyless, timeout=60, interval=1.0, what="the rows")
    return events


def wait_converged(
    settings: Any, bootstrap: str, prefix: str, conn: psycopg.Connection[Any], change: Change
) -> list[dict[str, Any]]:
    """The re-snapshot the DDL queued ran and ended (when the key changed); the topic folded
    by key is the table (key columns after the DDL) or holds no row (none)."""

    def started() -> bool:
        _, events = topic_table(bootstrap, prefix, "u", change.after)
        return bool(retire_deletes(events)) or any(
            e["source"]["snapshot"] == INCREMENTAL for e in events
        )

    if change.rekeyed:
        wait_for(started, timeout=120, interval=1.0, what="the old keys deleted or the rows sent")
        marker = iter(range(10_000, 20_000))
        wait_for(
            lambda: job_finished(settings, conn, marker, change.insert),
            timeout=120,
            interval=0.5,
            what="the re-snapshot job to finish",
        )
    # later changes go out under the key of now too (not under the old one)
    for statement in (
        "update u set v = 'later' where id::text::int % 7 = 0",
        "delete from u where id::text::int % 11 = 0",
    ):
        try:
            conn.execute(statement)
        except psycopg.errors.ObjectNotInPrerequisiteState:
            assert change.refused, statement
    if change.after:
        events = wait_topic_equals_pg(bootstrap, prefix, conn, "u", change.after)
        assert_live_keys_of(bootstrap, prefix, events, change.after)
        return events
    last: dict[str, Any] = {}

    def no_keyed_row() -> bool:
        live, last["events"] = topic_table(bootstrap, prefix, "u", change.before)
        last["live"] = live
        return not live

    try:
        wait_for(no_keyed_row, timeout=60, interval=1.0, what="no row under a key")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; left: {list(last.get('live', {}).items())[:6]}") from None
    events: list[dict[str, Any]] = last["events"]
    return events


def assert_live_keys_of(
    bootstrap: str, prefix: str, events: list[dict[str, Any]], key: tuple[str, ...]
) -> None:
    """Every Kafka key the topic leaves present (its latest record not a delete) is made of
    the key columns of now: no row is left under a key of the old identity (which the
    table's rows, named by their values, would not show)."""
    latest = {e["_keybytes"]: e for e in events if e["_keybytes"] is not None}
    live = [k for k, e in latest.items() if e["op"] != "d"]
    registry = wait_for(
        lambda: (lambda reg: reg if all(k[2:10] in reg for k in live) else None)(
            read_schemas(bootstrap, prefix)
        ),
        timeout=30,
        what="the key schemas",
    )
    stale = [decode(k, registry) for k in live if tuple(decode(k, registry)) != key]
    assert not stale, f"{len(stale)} row(s) left under a key of the old identity: {stale[:5]}"


@pytest.mark.parametrize("what", list(CHANGES), ids=list(CHANGES))
def test_identity_change_leaves_no_row_under_an_old_key(
    what: str,
    pg_conn: psycopg.Connection[Any],
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    change = CHANGES[what]
    create_u(pg_conn, change)
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix)
    with running_daemon(settings):
        first = wait_sent(kafka_bootstrap, topic_prefix, pg_conn, change.before)
        writer = Writer(pg_dsn, "u", change.insert, refusable=change.refused)
        writer.start()
        wait_for(lambda: writer.ops >= 5, timeout=30, what="the writer to run")
        pg_conn.execute(change.ddl)
        after_ddl = writer.ops + 30
        wait_for(lambda: writer.ops >= after_ddl, timeout=60, what="the writer to write on")
        writer.finish()
        events = wait_converged(settings, kafka_bootstrap, topic_prefix, pg_conn, change)
    deletes = retire_deletes(events)
    if not change.rekeyed:
        assert not deletes and not [e for e in events if e["source"]["snapshot"] == INCREMENTAL]
        return
    # a delete is of a key of the old identity, or a second one of a key whose row a
    # streamed change deleted while the keys were read (harmless)
    old_fps = {e["_keybytes"][2:10] for e in first if e["_keybytes"] is not None}
    old = assert_only_old_or_gone_keys(events, old_fps)
    if change.before:
        assert old > 0, "the old keys are deleted"
    else:
        assert old == 0, "no key of the old identity (it had none)"
    if change.after:
        now = pg_table(pg_conn, "u", change.after)
        resent = [e for e in events if e["source"]["snapshot"] == INCREMENTAL]
        assert len({e["_keybytes"] for e in resent}) >= ROWS // 2, "the rows are sent again"
        assert all(e["_keybytes"] is not None for e in resent), "under their new keys"
        assert len(now) > ROWS // 2
    else:
        keyless = [e for e in events if e["_keybytes"] is None and e["op"] == "c"]
        assert any(e["after"]["v"].startswith("w") for e in keyless), (
            "the writer's rows after the change go out without a key"
        )
    if change.refused:
        assert writer.refused > 0, "PostgreSQL refuses updates and deletes without an identity"


def test_nothing_refuses_updates_and_keeps_the_primary_key(
    pg_conn: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """REPLICA IDENTITY NOTHING on a table with a primary key: inserts keep their key, and
    PostgreSQL refuses updates and deletes of the published table with an error (nothing is
    lost in the log: they never happen)."""
    pg_conn.execute("create table n (id int primary key, v text)")
    pg_conn.execute("insert into n select g, 'v' || g from generate_series(1, 5) g")
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix)
    with running_daemon(settings):
        wait_topic_equals_pg(kafka_bootstrap, topic_prefix, pg_conn, "n", ("id",))
        pg_conn.execute("alter table n replica identity nothing")
        pg_conn.execute("insert into n values (6, 'six')")
        for statement in ("update n set v = 'x' where id = 1", "delete from n where id = 2"):
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as refused:
                pg_conn.execute(statement)
            assert "does not have a replica identity" in str(refused.value)
        events = wait_topic_equals_pg(kafka_bootstrap, topic_prefix, pg_conn, "n", ("id",))
    assert not retire_deletes(events), "the key stays the primary key"
    assert [e["after"]["v"] for e in events if e["op"] == "c"] == ["six"]


KILLED = {
    "primary key to an index identity": CHANGES["primary key to an index identity"],
    "index to full": CHANGES["index to full"],
    "full to index": CHANGES["full to index"],
}


@pytest.mark.parametrize("what", list(KILLED), ids=list(KILLED))
def test_kill_9_mid_retirement_and_mid_resnapshot(
    what: str,
    tmp_path: Path,
    pg_conn: psycopg.Connection[Any],
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """SIGKILL after the deletes of the old keys are handed to the sink (some committed, in
    batches of 40 events; when the table had key columns), and after a chunk of its rows is
    (when it has key columns now); the next start finishes: the topic folded by key equals
    the table (or holds no keyed row), and `fieldsync replay verify` agrees with PostgreSQL
    (keyless rows from before the change included, when the table was given a key)."""
    change = KILLED[what]
    create_u(pg_conn, change)
    config, d = crash_daemon(tmp_path, pg_dsn, kafka_bootstrap, topic_prefix)
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix)
    try:
        d.start()
        d.wait_streaming()
        wait_sent(kafka_bootstrap, topic_prefix, pg_conn, change.before)
        d.signal(15)
        assert d.wait(30) == 0, d.log()[-3000:]
        writer = Writer(pg_dsn, "u", change.insert, max_ops=200, refusable=change.refused)
        writer.start()
        wait_for(lambda: writer.ops >= 5, timeout=30, what="the writer to run")
        pg_conn.execute(change.ddl)
        killed_at(
            d,
            (["retire_deletes:1"] if change.before else [])
            + (["resnapshot_chunk:3"] if change.after else []),
        )
        writer.finish()
        events = finished(
            d,
            config,
            lambda: wait_converged(settings, kafka_bootstrap, topic_prefix, pg_conn, change),
            # (a table left without key columns is not sent again: replay's multiset of its
            # keyless events does not hold the rows from before the change)
            verify=bool(change.after),
        )
    finally:
        d.kill()
    assert bool(retire_deletes(events)) == bool(change.before), "old keys are deleted"
    assert "Traceback" not in d.log()
