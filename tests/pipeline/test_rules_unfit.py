"""The bucket engine places no change the rules were not bound to, against the real
processes: a column added (the rules still fit) is followed at once, the new column's
values reach the device; a column a rule excludes renamed (the rules no longer fit) stops
the engine before anything of the renamed column is stored or sent, and says why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from relay.downstream.pg_store_schema import SCHEMA
from tests.cdc.cdc_support import wait_for
from tests.pipeline.local_device import LocalDevice
from tests.pipeline.pipeline_stack import services

DDL = """
create table orders (id int primary key, tech text, note text, cost numeric);
insert into orders values (1, 't1', 'a', 10), (2, 't1', 'b', 20);
"""
RULES = """
[[bucket]]
name = "all"

[[bucket.table]]
table = "public.orders"
exclude = ["cost"]
"""


def test_a_renamed_excluded_column_is_never_placed(
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
            rules=RULES,
            conflicts='[default]\npolicy = "server_wins"\n',
            tables=["public.orders"],
        ) as stack:
            dev = LocalDevice(stack.url, stack.keys, tmp_path)
            app = dev.app

            def rows() -> list[tuple[Any, ...]]:
                return app.execute("select * from orders order by id").fetchall()

            def columns() -> list[str]:
                return [r[1] for r in app.execute("pragma table_info(orders)")]

            try:
                dev.sync_until(lambda: len(rows()) == 2, "initial rows")
                assert columns() == ["id", "tech", "note"]
                # a column added: the rules fit, its values come at once
                pg.execute("alter table orders add column extra text")
                pg.execute("update orders set extra = 'e', note = 'b2' where id = 2")
                dev.sync_until(lambda: (2, "t1", "b2", "e") in rows(), "the added column")
                assert columns() == ["id", "tech", "note", "extra"]

                # the excluded column renamed: the rules no longer fit
                pg.execute("alter table orders rename column cost to secret_cost")
                pg.execute("update orders set note = 'a2', secret_cost = 99 where id = 1")
                relay = stack.procs["relay"]
                wait_for(
                    lambda: any("the rules were not bound to" in x for x in relay.lines),
                    timeout=90,
                    what="the engine refusing the renamed column",
                )
                line = next(x for x in relay.lines if "the rules were not bound to" in x)
                assert "public.orders" in line and "secret_cost" in line and "cost" in line
                # nothing of the renamed column was stored, and the device has the rows
                # as they were before the rename
                with psycopg.connect(store_dsn) as store:
                    leaked = store.execute(
                        f"select count(*) from {SCHEMA}.ops where data like '%%secret_cost%%'"
                    ).fetchone()
                assert leaked == (0,)
                dev.agent.sync_once()
                assert "secret_cost" not in columns()
                assert rows() == [(1, "t1", "a", None), (2, "t1", "b2", "e")]
            finally:
                dev.close()
