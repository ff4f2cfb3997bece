"""A partitioned table synced end to end, against the real processes (cdc, relay, applier;
a device agent whose app writes with plain sqlite3): the device receives the table's rows
(cdc used to publish them as the partitions', so it received none), follows a row that an
office UPDATE moves to another partition (a delete and an insert of the table), and its own
edits are applied, among them an insert (the applier's ``RETURNING xmin`` was refused for a
partitioned table, which stalled the applier for good) and a row it moves to another
partition (a delete and an insert); the device ends equal to PostgreSQL, value by value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from typer.testing import CliRunner

from device_agent import cli as device_cli
from device_agent.local_tables import PREFIX
from tests.pipeline.local_device import LocalDevice, all_rows_rules
from tests.pipeline.pipeline_stack import services

DDL = """
create table m (id int, region text, note text, primary key (id, region)) partition by list (region);
create table m_n partition of m for values in ('n');
create table m_s partition of m for values in ('s');
insert into m values (1, 'n', 'a'), (2, 'n', 'b'), (3, 's', 'c');
"""
ROWS = "select id, region, note from m order by id"


class Device(LocalDevice):
    wait_s = 0.5

    def rows(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.app.execute(ROWS)]

    def outcomes(self) -> list[str]:
        """Every edit's outcome, once none is open."""
        self.sync_until(
            lambda: (
                not self.app.execute(
                    f"select count(*) from {PREFIX}journal where status in ('pending', 'sent')"
                ).fetchone()[0]
            ),
            "outcome of every edit",
        )
        return [
            r[0]
            for r in self.app.execute(
                f"select json_extract(outcome, '$.outcome') from {PREFIX}journal order by seq"
            )
        ]


def test_a_partitioned_table_syncs_both_ways(
    pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute(DDL)

        def equal(dev: Device, what: str) -> None:
            dev.sync_until(lambda: dev.rows() == pg.execute(ROWS).fetchall(), what)

        with services(
            tmp_path,
            pg_dsn,
            store_dsn,
            kafka_bootstrap,
            topic_prefix,
            rules=all_rows_rules(["public.m"]),
            conflicts='[default]\npolicy = "server_wins"\n',
            tables=["public.m"],
        ) as stack:
            dev = Device(stack.url, stack.keys, tmp_path)
            try:
                equal(dev, "the table's rows")
                pg.execute("insert into m values (4, 's', 'd')")
                pg.execute("update m set region = 's' where id = 2")  # to partition m_s
                equal(dev, "office changes, a row moved to another partition")
                dev.app.execute("update m set note = 'dev' where id = 1")
                dev.app.execute("insert into m values (9, 's', 'ins')")
                dev.app.execute("update m set region = 'n' where id = 3")  # to partition m_n
                dev.app.execute("delete from m where id = 4")
                assert dev.outcomes() == ["applied"] * 5  # the move: a delete and an insert
                equal(dev, "the device's edits")
                assert pg.execute(
                    "select tableoid::regclass::text, id from m order by id"
                ).fetchall() == [("m_n", 1), ("m_s", 2), ("m_n", 3), ("m_s", 9)]
                assert pg.execute("select note from m where id = 1").fetchone() == ("dev",)
                result = CliRunner().invoke(device_cli.app, ["verify", "--db", dev.db, "--json"])
                assert result.exit_code == 0, result.output[-2000:]
            finally:
                dev.close()
