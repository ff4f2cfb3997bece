"""A partitioned table listed in ``postgres.tables``: its rows and changes are published as
the table's own (``publish_via_partition_root``), on the table's topic, which the relay's
rules and the applier name.  Without it PostgreSQL published them as the partitions'
(``public.m_n``, ``public.m_s`` topics): a device following ``public.m`` got no row at all."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from cdc.errors import PreflightError
from cdc.pg_source import ensure_publication
from tests.cdc.cdc_support import make_settings, running_daemon, table_events

DDL = """
create table m (id int, region text, note text, primary key (id, region)) partition by list (region);
create table m_n partition of m for values in ('n');
create table m_s partition of m for values in ('s');
insert into m values (1, 'n', 'a'), (2, 'n', 'b'), (3, 's', 'c');
"""


def test_a_partitioned_tables_rows_and_changes_are_on_its_own_topic(
    pg_conn: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    pg_conn.execute(DDL)
    settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix, postgres_tables="public.m")
    with running_daemon(settings):
        pg_conn.execute("insert into m values (4, 's', 'd')")
        pg_conn.execute("update m set note = 'a2' where id = 1")
        pg_conn.execute("update m set region = 's' where id = 2")  # moves to m_s
        events = table_events(kafka_bootstrap, topic_prefix, "m", expect=7, timeout=60)
    ops = [(e["op"], (e["after"] or e["before"])["id"]) for e in events]
    assert ops == [("r", 1), ("r", 2), ("r", 3), ("c", 4), ("u", 1), ("d", 2), ("c", 2)]
    assert events[-1]["after"] == {"id": 2, "region": "s", "note": "b"}
    assert events[-1]["source"]["table"] == "m"
    via_root = pg_conn.execute(
        "select pubviaroot from pg_publication where pubname = %s",
        (settings.postgres.publication,),
    ).fetchone()
    assert via_root == (True,)


def test_a_publication_publishing_a_listed_table_through_its_partitions_is_refused(
    pg_conn: psycopg.Connection[Any],
) -> None:
    pg_conn.execute(DDL)
    pg_conn.execute("create publication leaves for table m")
    with pytest.raises(PreflightError, match=r"public\.m .*SET \(publish_via_partition_root"):
        ensure_publication(pg_conn, "leaves", ["public.m"])
    pg_conn.execute("alter publication leaves set (publish_via_partition_root = true)")
    ensure_publication(pg_conn, "leaves", ["public.m"])  # now as the table's own
    pg_conn.execute("create table plain (id int primary key)")
    pg_conn.execute("create publication plain_pub for table plain")
    ensure_publication(pg_conn, "plain_pub", ["public.plain"])  # no partitioned table: as is
