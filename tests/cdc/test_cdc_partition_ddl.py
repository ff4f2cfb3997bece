"""Catalog changes that add or remove rows of a partitioned table, or change every value of a
composite column, without a row event (docs/cdc.md "Re-snapshots", "Partitioned tables";
cdc/ddl_detection.py, cdc/resnapshot_catalog.py).

Against the real PostgreSQL and broker: a partitioned table ``m`` with rows in two
partitions, published through its root; one statement (ATTACH of a table with rows, DETACH,
DETACH CONCURRENTLY, DROP or TRUNCATE of a partition), then rows written through the root.
Once the daemon is idle (a marker column added to ``beat`` is in the recorded catalog and no
re-snapshot job is left), ``m``'s topic folded by Kafka key equals ``m`` in PostgreSQL: no
row the statement removed is left, no row it added is missing.  The same for a table with
composite columns after ``ALTER TYPE … ADD ATTRIBUTE`` and ``DROP ATTRIBUTE``, and for a
partition detached in a FOR ALL TABLES publication (published as itself from then on).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from cdc.incremental_snapshot import Progress
from cdc.settings import CdcSettings
from tests.cdc.cdc_support import running_daemon, wait_for
from tests.cdc.test_cdc_ddl_resync import settings_for, state_record
from tests.cdc.test_cdc_key_retirement import topic_table, wait_topic_equals_pg

KEY = ("id", "region")
SETUP = """
create table m (id int, region text, note text, primary key (id, region))
  partition by list (region);
create table m_n partition of m for values in ('n');
create table m_s partition of m for values in ('s');
insert into m select g, (array['n', 's'])[1 + g % 2], 'old' || g from generate_series(1, 30) g;
create table m_w (id int, region text, note text, primary key (id, region));
insert into m_w select g, 'w', 'attached' || g from generate_series(100, 111) g;
create table beat (id serial primary key);
"""

STATEMENTS: dict[str, list[str]] = {
    "attach a partition with rows": ["alter table m attach partition m_w for values in ('w')"],
    "detach a partition": ["alter table m detach partition m_s"],
    "detach a partition concurrently": ["alter table m detach partition m_s concurrently"],
    "drop a partition": ["drop table m_s"],
    "truncate a partition": ["truncate m_s"],
    "truncate a partition and fill it again": [
        "truncate m_s",
        "insert into m select g, 's', 'again' || g from generate_series(1, 50, 4) g",
    ],
}

AFTER = [  # written through the root while the re-snapshot runs
    "insert into m values (500, 'n', 'later')",
    "update m set note = 'updated' where id = 2",
    "delete from m where id = 4",
]


@pytest.fixture
def m_table(pg_conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    pg_conn.execute(SETUP)
    yield pg_conn


def recorded_columns(settings: CdcSettings, table: str) -> set[str]:
    """The columns of ``public.{table}`` in the recorded catalog in Kafka."""
    data = state_record(settings, "catalog", timeout_s=5)
    for t in json.loads(data or b'{"tables": []}')["tables"]:
        if (t["schema"], t["table"]) == ("public", table):
            return {str(c[1]) for c in t["columns"]}
    return set()


def wait_idle(settings: CdcSettings, conn: psycopg.Connection[Any], marker: str) -> None:
    """Add column ``marker`` to ``beat`` (a catalog change every version of the daemon
    records, and nothing to re-read) and wait until the recorded catalog has it and no job is
    left: the check that saw every statement before the marker is done, and so is any job it
    queued (the catalog and the jobs are written together)."""
    conn.execute(f"alter table beat add column {marker} int")

    def idle() -> bool:
        conn.execute("insert into beat default values")  # a Kafka transaction for the state
        if marker not in recorded_columns(settings, "beat"):
            return False
        progress = state_record(settings, "resnapshot", timeout_s=5)
        return progress is None or not Progress.from_bytes(progress).jobs  # None: never a job

    wait_for(idle, timeout=120, interval=0.5, what=f"the daemon to be idle after {marker}")


def assert_topic_equals_pg(
    bootstrap: str, prefix: str, conn: psycopg.Connection[Any], table: str, key: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The daemon is idle: the rows are there, short of the last few streamed changes."""
    return wait_topic_equals_pg(bootstrap, prefix, conn, table, key, timeout=20)


@pytest.mark.parametrize("what", list(STATEMENTS))
def test_a_partition_statement_leaves_the_topic_equal_to_the_table(
    what: str,
    m_table: psycopg.Connection[Any],
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    settings = settings_for(
        pg_dsn, kafka_bootstrap, topic_prefix, postgres_tables="public.m,public.beat"
    )
    with running_daemon(settings):
        assert_topic_equals_pg(kafka_bootstrap, topic_prefix, m_table, "m", KEY)
        wait_idle(settings, m_table, "before_ddl")
        for statement in STATEMENTS[what]:
            m_table.execute(statement)
        for statement in AFTER:
            m_table.execute(statement)
        wait_idle(settings, m_table, "after_ddl")
        assert_topic_equals_pg(kafka_bootstrap, topic_prefix, m_table, "m", KEY)


def test_a_partition_detached_in_a_for_all_tables_publication_gets_its_own_topic(
    m_table: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Published through the root, ``m_s``'s rows were only ever on ``m``'s topic; detached,
    it is a table of the publication of its own: its rows leave ``m``'s topic and are sent to
    its own."""
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix)
    with running_daemon(settings):
        assert_topic_equals_pg(kafka_bootstrap, topic_prefix, m_table, "m", KEY)
        wait_idle(settings, m_table, "before_ddl")
        m_table.execute("alter table m detach partition m_s")
        m_table.execute("update m_s set note = 'alone' where id = 1")
        wait_idle(settings, m_table, "after_ddl")
        assert_topic_equals_pg(kafka_bootstrap, topic_prefix, m_table, "m", KEY)
        assert_topic_equals_pg(kafka_bootstrap, topic_prefix, m_table, "m_s", KEY)


COMPOSITES = """
create type pair as (a int, b int);
create table c (id int primary key, p pair, ps pair[]);
insert into c select g, row(g, g * 2)::pair, array[row(g, 1)::pair, row(g, 2)::pair]
  from generate_series(1, 20) g;
create table beat (id serial primary key);
"""


def composite_rows(conn: psycopg.Connection[Any]) -> dict[int, dict[str, Any]]:
    rows = conn.execute("select id, p::text, ps::text from c").fetchall()
    return {r[0]: {"id": r[0], "p": r[1], "ps": r[2]} for r in rows}


def topic_rows(bootstrap: str, prefix: str) -> dict[int, dict[str, Any]]:
    live, _ = topic_table(bootstrap, prefix, "c", ("id",))
    return {
        int(r["id"]): {"id": int(r["id"]), "p": r.get("p"), "ps": r.get("ps")}
        for r in live.values()
    }


def test_attributes_added_to_and_dropped_from_a_composite_type_reach_the_topic(
    pg_conn: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """``(1,2)`` reads ``(1,2,)`` after ADD ATTRIBUTE and ``(2,)`` after DROP ATTRIBUTE a, in
    every row, directly and in arrays, with no row event."""
    pg_conn.execute(COMPOSITES)
    settings = settings_for(
        pg_dsn, kafka_bootstrap, topic_prefix, postgres_tables="public.c,public.beat"
    )
    with running_daemon(settings):
        wait_for(
            lambda: topic_rows(kafka_bootstrap, topic_prefix) == composite_rows(pg_conn),
            timeout=60,
            what="the initial rows of c",
        )
        wait_idle(settings, pg_conn, "before_ddl")
        steps = [
            ("alter type pair add attribute z text", "row(7, 7, 'seven')", "(1,2,)"),
            ("alter type pair drop attribute a", "row(7, 'seven')", "(2,)"),
        ]
        for n, (statement, seven, first) in enumerate(steps):
            pg_conn.execute(statement)
            pg_conn.execute(f"update c set p = {seven} where id = 7")
            wait_idle(settings, pg_conn, f"after_ddl_{n}")
            want = composite_rows(pg_conn)
            assert want[1]["p"] == first, "PostgreSQL changed every value's text"

            def same(want: dict[int, dict[str, Any]] = want) -> bool:
                return topic_rows(kafka_bootstrap, topic_prefix) == want

            wait_for(same, timeout=20, what=f"c in Kafka to equal PostgreSQL after {statement}")
