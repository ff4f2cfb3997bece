"""Schema and table names Kafka cannot use as they are (spaces, letters outside ASCII),
one that differs from another table's only in such a character, and a column whose name
holds a single quote (a string literal in the device's journal triggers), sync both ways against
the real processes: cdc writes each table to its own valid topic (core/topic_names.py), the
relay reads it from there, the device holds every row under the original names, and a
device edit reaches PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from core.settings_checks import KAFKA_TOPIC_MAX, PG_NAME_MAX_BYTES, TOPIC_PREFIX_MAX
from core.topic_names import change_topic, topic_part
from tests.fix_kafka import read_topic
from tests.pipeline.local_device import all_rows_rules
from tests.pipeline.pipeline_stack import services
from tests.pipeline.test_value_fidelity import Device, verify

DDL = """
create schema "Bau Stellen";
create table "Bau Stellen"."Aufträge Ü" (id int primary key, "Notiz Text" text);
insert into "Bau Stellen"."Aufträge Ü" values (1, 'eins'), (2, 'zwei');
create table "work orders" (id int primary key, note text, "it's" text);
insert into "work orders" values (1, 'with a space', 'quote');
create table work_orders (id int primary key, note text);
insert into work_orders values (1, 'with an underscore'), (2, 'second');
"""
TABLES = ["Bau Stellen.Aufträge Ü", "public.work orders", "public.work_orders"]


def test_tables_with_names_kafka_cannot_use_sync_both_ways(
    pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute(DDL)
        with services(
            tmp_path,
            pg_dsn,
            store_dsn,
            kafka_bootstrap,
            topic_prefix,
            rules=all_rows_rules(TABLES),
            conflicts='[default]\npolicy = "server_wins"\n',
            tables=TABLES,
        ) as stack:
            dev = Device(stack.url, stack.keys, tmp_path)
            try:
                local = '"Bau Stellen__Aufträge Ü"'

                def rows(table: str) -> list[Any]:
                    return dev.app.execute(f"select * from {table} order by 1").fetchall()

                dev.sync_until(
                    lambda: (
                        len(rows(local)) == 2
                        and len(rows('"work orders"')) == 1
                        and len(rows("work_orders")) == 2
                    ),
                    "every table's rows",
                )
                assert rows(local) == [(1, "eins"), (2, "zwei")]
                assert rows('"work orders"') == [(1, "with a space", "quote")]
                assert rows("work_orders") == [(1, "with an underscore"), (2, "second")]
                code, report = verify(dev.db)
                assert code == 0, report

                dev.app.execute(f"update {local} set \"Notiz Text\" = 'geändert' where id = 2")
                out = dev.settled()
                assert out["outcome"] == "applied", out
                got = pg.execute('select "Notiz Text" from "Bau Stellen"."Aufträge Ü" where id = 2')
                assert got.fetchone() == ("geändert",)
                dev.app.execute('update "work orders" set "it\'s" = \'device\' where id = 1')
                out = dev.settled()
                assert out["outcome"] == "applied", out
                got = pg.execute('select "it\'s" from "work orders" where id = 1').fetchone()
                assert got == ("device",)
                pg.execute("update \"work orders\" set note = 'server' where id = 1")
                dev.sync_until(
                    lambda: rows('"work orders"') == [(1, "server", "device")],
                    "the server's edit",
                )
                assert rows("work_orders")[0] == (1, "with an underscore")
            finally:
                dev.close()
    topic = change_topic(topic_prefix, "Bau Stellen", "Aufträge Ü")
    assert topic.startswith(f"{topic_prefix}.Bau_Stellen_")
    assert read_topic(kafka_bootstrap, topic, timeout=30), topic


def test_topic_names_are_valid_distinct_and_keep_valid_names() -> None:
    assert change_topic("fs", "public", "work_orders") == "fs.public.work_orders"
    assert change_topic("fs", "s-1", "T.x") == "fs.s-1.T.x"  # Kafka's characters: kept
    spaced = topic_part("work orders")
    assert spaced.startswith("work_orders_") and len(spaced) == len("work orders") + 9
    names = ["work orders", "work-orders ", "work/orders", "wörk orders", "Aufträge Ü", "ü", "Ü"]
    parts = [topic_part(n) for n in names]
    assert len(set(parts)) == len(parts)
    assert all(p.isascii() and " " not in p for p in parts)
    assert topic_part("work orders") == spaced  # deterministic
    # the longest names PostgreSQL keeps, with the longest prefix, fit Kafka's limit
    longest = [" " * PG_NAME_MAX_BYTES, "é" * (PG_NAME_MAX_BYTES // 2), "x" * PG_NAME_MAX_BYTES]
    prefix = "p" * TOPIC_PREFIX_MAX
    for schema in longest:
        for table in longest:
            assert len(change_topic(prefix, schema, table)) <= KAFKA_TOPIC_MAX
