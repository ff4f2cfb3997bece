"""A table dropped and created again under its name (a migration's ``DROP TABLE`` +
``CREATE TABLE``, or ``RENAME TO`` + ``CREATE`` + ``INSERT … SELECT``) reaches a device
against the real processes: cdc re-snapshots the new table with key retirement
(docs/cdc.md), so rows the new table does not have leave the device, rows it has under
an old key arrive with their new values, and the device ends equal to PostgreSQL; a
device edit of the new table is applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.pipeline.local_device import all_rows_rules
from tests.pipeline.pipeline_stack import services
from tests.pipeline.test_value_fidelity import Device, verify

TABLES = ["public.jobs"]


@pytest.mark.parametrize("how", ["drop", "rename"])
def test_a_table_created_again_replaces_the_devices_rows(
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    how: str,
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute("create table jobs (id int primary key, note text)")
        pg.execute("insert into jobs select g, 'old ' || g from generate_series(1, 20) g")
        with services(
            tmp_path,
            pg_dsn,
            store_dsn,
            kafka_bootstrap,
            topic_prefix,
            rules=all_rows_rules(TABLES),
            conflicts='[default]\npolicy = "server_wins"\n',
            tables=TABLES,
            ddl_check_s=0.5,
        ) as stack:
            dev = Device(stack.url, stack.keys, tmp_path)
            try:

                def rows() -> list[Any]:
                    return dev.app.execute("select id, note from jobs order by id").fetchall()

                def pg_rows() -> list[Any]:
                    return pg.execute("select id, note from jobs order by id").fetchall()

                dev.sync_until(lambda: len(rows()) == 20, "the first table's rows")
                with pg.transaction():
                    if how == "drop":
                        pg.execute("drop table jobs")
                    else:
                        pg.execute("alter table jobs rename to jobs_old")
                    pg.execute("create table jobs (id int primary key, note text)")
                    # keys 15..25: 15..20 were old keys, with new values; 1..14 are gone
                    pg.execute(
                        "insert into jobs select g, 'new ' || g from generate_series(15, 25) g"
                    )
                dev.sync_until(lambda: rows() == pg_rows(), "the new table's rows")
                assert rows()[0] == (15, "new 15") and len(rows()) == 11
                code, report = verify(dev.db)
                assert code == 0, report
                dev.app.execute("update jobs set note = 'device' where id = 25")
                out = dev.settled()
                assert out["outcome"] == "applied", out
                assert pg.execute("select note from jobs where id = 25").fetchone() == ("device",)
                pg.execute("insert into jobs values (30, 'after')")
                dev.sync_until(lambda: rows() == pg_rows(), "a later insert")
            finally:
                dev.close()
