"""A table dropped and created again under its name: its old rows leave the topic
(cdc/resnapshot_catalog.py, cdc/ddl_detection.py ``compare_catalogs``, docs/cdc.md
"Re-snapshots").

Against the real PostgreSQL and broker, in a FOR ALL TABLES publication and in one of listed
tables (where DROP TABLE takes the table out of the publication and the daemon adds the new
one back): rows before the drop; then, in one transaction, DROP (or RENAME TO t_old) and
CREATE, and rows in the new table, some with the keys of old rows and some new; then more
changes.  The table's topic folded by Kafka key (the latest event of each key, deletes
dropped) equals the table in PostgreSQL: no old row is left, no new row is lost.  The same
with the new table keyed by other columns, when the daemon is stopped during the DROP and
CREATE, and when a table is dropped for good (a warning; the others stream on) and created
again later.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from cdc.ddl_detection import signatures_from_bytes
from cdc.incremental_snapshot import Progress
from cdc.settings import CdcSettings
from tests.cdc.cdc_support import running_daemon, wait_for
from tests.cdc.test_cdc_ddl_resync import settings_for, state_record
from tests.cdc.test_cdc_key_retirement import retire_deletes, topic_table, wait_topic_equals_pg

ROWS = 40
OLD_TABLE = "create table t (id int primary key, a int not null, v text)"

# shape: (statement that takes the old table away, the new table, its key, its inserts)
SHAPES: dict[str, tuple[str, str, tuple[str, ...], list[str]]] = {
    "same key": (
        "drop table t",
        "create table t (id int primary key, a int not null, v text, note text default 'n')",
        ("id",),
        [
            # keys of old rows (new values) and new keys
            "insert into t (id, a, v) select g, g * 100, 'new' || g from generate_series(1, 8) g",
            "insert into t (id, a, v) select g, g, 'new' || g from generate_series(100, 107) g",
        ],
    ),
    "other key": (
        "drop table t",
        "create table t (code text primary key, id int, v text)",
        ("code",),
        [
            "insert into t select 'c' || g, g, 'new' || g from generate_series(1, 8) g",
            "insert into t select g::text, g, 'num' || g from generate_series(1, 3) g",
        ],
    ),
    "renamed away": (
        "alter table t rename to t_old",
        "create table t (id int primary key, a int not null, v text)",
        ("id",),
        ["insert into t select id, a + 1000, 'copied' from t_old where id % 2 = 0"],
    ),
}

AFTER = {
    # changes after the DDL's transaction, streamed while the re-snapshot runs
    ("id",): [
        "insert into t (id, a, v) values (500, 500, 'later')",
        "update t set v = 'updated' where id = 2",
        "delete from t where id = 4",
    ],
    ("code",): [
        "insert into t values ('later', 500, 'later')",
        "update t set v = 'updated' where code = 'c2'",
        "delete from t where code = 'c4'",
    ],
}


@pytest.fixture
def old_t(pg_conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    pg_conn.execute(OLD_TABLE)
    pg_conn.execute("insert into t select g, g, 'old' || g from generate_series(1, %s) g", (ROWS,))
    pg_conn.execute("create table beat (id serial primary key)")
    yield pg_conn


def settings_of(mode: str, dsn: str, bootstrap: str, prefix: str) -> CdcSettings:
    tables = {"postgres_tables": "public.t,public.beat"} if mode == "listed" else {}
    return settings_for(dsn, bootstrap, prefix, **tables)


def oid_of(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute("select %s::regclass::oid", (table,)).fetchone()
    assert row is not None
    return int(row[0])


def beat(conn: psycopg.Connection[Any]) -> None:
    """A row in ``beat``: a Kafka transaction that carries the changed state records."""
    conn.execute("insert into beat default values")


def replaced_and_done(settings: CdcSettings, conn: psycopg.Connection[Any], oid: int) -> bool:
    """The recorded catalog in Kafka has the new table (``oid``), and the progress record no
    job (they are written together: the job queued by the check that recorded the table is
    over)."""
    beat(conn)
    catalog = state_record(settings, "catalog", timeout_s=5)
    progress = state_record(settings, "resnapshot", timeout_s=5)
    if catalog is None or progress is None:
        return False
    return oid in signatures_from_bytes(catalog) and not Progress.from_bytes(progress).jobs


def wait_replaced(
    settings: CdcSettings, conn: psycopg.Connection[Any], bootstrap: str, prefix: str, key: Any
) -> list[dict[str, Any]]:
    oid = oid_of(conn, "t")
    wait_for(
        lambda: replaced_and_done(settings, conn, oid),
        timeout=120,
        interval=0.5,
        what="the re-snapshot of the new table t to be done",
    )
    return wait_topic_equals_pg(bootstrap, prefix, conn, "t", key, timeout=60)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["all tables", "listed"])
def test_dropped_and_created_again_leaves_only_the_new_rows(
    mode: str,
    shape: str,
    old_t: psycopg.Connection[Any],
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    take_away, create, key, inserts = SHAPES[shape]
    settings = settings_of(mode, pg_dsn, kafka_bootstrap, topic_prefix)
    with running_daemon(settings):
        wait_topic_equals_pg(kafka_bootstrap, topic_prefix, old_t, "t", ("id",))
        with old_t.transaction():  # the new table has rows before any check sees it
            old_t.execute(take_away)
            old_t.execute(create)
            for statement in inserts:
                old_t.execute(statement)
        for statement in AFTER[key]:
            old_t.execute(statement)
        events = wait_replaced(settings, old_t, kafka_bootstrap, topic_prefix, key)
        if shape == "renamed away":  # the renamed table goes on in a topic of its own
            wait_topic_equals_pg(kafka_bootstrap, topic_prefix, old_t, "t_old", ("id",))
    assert len(retire_deletes(events)) >= ROWS // 2, "the old rows are deleted"


@pytest.mark.parametrize("mode", ["all tables", "listed"])
def test_dropped_and_created_again_while_the_daemon_was_stopped(
    mode: str, old_t: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    take_away, create, key, inserts = SHAPES["same key"]
    settings = settings_of(mode, pg_dsn, kafka_bootstrap, topic_prefix)
    with running_daemon(settings):
        wait_topic_equals_pg(kafka_bootstrap, topic_prefix, old_t, "t", key)
        beat(old_t)
        wait_for(  # the recorded catalog with the old table is in Kafka
            lambda: state_record(settings, "catalog", timeout_s=5),
            timeout=60,
            what="the recorded catalog",
        )
    old_t.execute(take_away)
    old_t.execute(create)
    for statement in inserts:
        old_t.execute(statement)
    with running_daemon(settings):
        for statement in AFTER[key]:
            old_t.execute(statement)
        events = wait_replaced(settings, old_t, kafka_bootstrap, topic_prefix, key)
    assert len(retire_deletes(events)) >= ROWS // 2, "the old rows are deleted"


def test_a_listed_table_dropped_for_good_is_warned_about_and_remembered(
    old_t: psycopg.Connection[Any],
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Dropped: a warning that its rows stay, one that the listed table is missing, and the
    daemon streams the other tables on; the recorded catalog remembers it.  Created again
    later, empty: its old rows are deleted (the way out the warning names)."""
    settings = settings_of("listed", pg_dsn, kafka_bootstrap, topic_prefix)

    def remembered() -> bool:
        beat(old_t)
        data = state_record(settings, "catalog", timeout_s=5)
        gone = json.loads(data or b"{}").get("unpublished", [])
        return any((t["schema"], t["table"]) == ("public", "t") for t in gone)

    with caplog.at_level(logging.WARNING, logger="fieldsync.cdc"), running_daemon(settings):
        wait_topic_equals_pg(kafka_bootstrap, topic_prefix, old_t, "t", ("id",))
        old_t.execute("drop table t")
        wait_for(remembered, timeout=60, interval=0.5, what="the dropped table to be remembered")
        _, beat_events = topic_table(kafka_bootstrap, topic_prefix, "beat", ("id",))
        assert beat_events, "the other tables stream on"
        messages = [r.getMessage() for r in caplog.records]
        assert any(
            m.startswith("public.t (oid ") and "no longer published" in m for m in messages
        ), messages
        assert any(
            m.startswith("public.t is listed in postgres.tables but does not") for m in messages
        )
        old_t.execute(OLD_TABLE)
        events = wait_replaced(settings, old_t, kafka_bootstrap, topic_prefix, ("id",))
    assert len(retire_deletes(events)) == ROWS, "every old row is deleted"
    assert any("added it back" in r.getMessage() for r in caplog.records)


def test_a_listed_table_taken_out_and_added_back_while_the_daemon_was_stopped(
    old_t: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """``ALTER PUBLICATION … DROP TABLE`` and ``ADD TABLE`` again (by hand, or by a daemon
    killed after adding it back and before its next Kafka commit): the table keeps its oid,
    and changes made while it was out were never published.  Its ``pg_publication_rel``
    row is a new one, which the recorded catalog tells at the next start: the table is
    re-snapshotted with key retirement."""
    settings = settings_of("listed", pg_dsn, kafka_bootstrap, topic_prefix)
    publication = settings.postgres.publication
    with running_daemon(settings):
        wait_topic_equals_pg(kafka_bootstrap, topic_prefix, old_t, "t", ("id",))
        beat(old_t)
        wait_for(
            lambda: state_record(settings, "catalog", timeout_s=5),
            timeout=60,
            what="the recorded catalog",
        )
    old_t.execute(f"alter publication {publication} drop table t")
    old_t.execute("delete from t where id <= 5")
    old_t.execute("update t set v = 'while out' where id = 10")
    old_t.execute("insert into t values (300, 300, 'while out')")
    old_t.execute(f"alter publication {publication} add table t")
    with running_daemon(settings):
        events = wait_topic_equals_pg(
            kafka_bootstrap, topic_prefix, old_t, "t", ("id",), timeout=120
        )
    assert len(retire_deletes(events)) >= 5, "the rows deleted while out are deleted"
