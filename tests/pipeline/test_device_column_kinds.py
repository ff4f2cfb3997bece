"""A device follows columns retyped on the server, against the real processes (cdc, relay,
applier; a device agent whose app writes with plain sqlite3).

The device stores values in typeless SQLite columns and reads them back into wire values
by each column's kind (device_agent/local_db.py).  The relay's ``/v1/schema`` gives the
kinds (docs/relay.md); when ``ALTER COLUMN … TYPE`` changes one, the relay's table
follower binds the rules to the new definitions, cdc sends the table's rows again, and
the device takes the new kind.  Here, on one table:

- ``int`` → ``boolean``, ``int`` → ``text``, ``float8`` → ``integer`` and ``int[]`` →
  ``jsonb``: the device's rows equal PostgreSQL's, value and type, and ``device-agent
  verify`` is clean (with the kinds learned from the first values, booleans read back as
  0/1, integers as floats and the JSON text as a parsed object: verify reported every row);
- edits of each retyped column, and of a boolean column whose every value was NULL when
  the device first synced (no value to learn its kind from), are applied in PostgreSQL
  with the values the app wrote (they were refused as ``wrong_type``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
from typer.testing import CliRunner

from device_agent import cli as device_cli
from device_agent.local_tables import PREFIX
from tests.pipeline.local_device import LocalDevice, all_rows_rules
from tests.pipeline.pipeline_stack import services

DDL = """
create table kinds (id int primary key, n int, m int, f float8, a int[], flag boolean);
insert into kinds values (1, 0, 10, 1.5, '{1,2}', null), (2, 5, 20, 2.0, '{3}', null),
    (3, null, null, null, null, null);
"""
RETYPE = """
alter table kinds alter column n type boolean using n <> 0,
    alter column m type text using m::text,
    alter column f type integer using round(f),
    alter column a type jsonb using to_jsonb(a);
"""
TABLES = ["public.kinds"]
DEVICE_ROWS = "select id, n, m, f, a, flag from kinds order by id"
PG_ROWS = "select id, n::int, m, f, a::text, flag::int from kinds order by id"


def typed(rows: list[tuple[Any, ...]]) -> list[tuple[tuple[str, Any], ...]]:
    """Rows with each value's type, so that 1 is not 1.0 and 5 is not '5'."""
    return [tuple((type(v).__name__, v) for v in row) for row in rows]


class Device(LocalDevice):
    wait_s = 0.5

    def rows(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.app.execute(DEVICE_ROWS)]

    def verify(self) -> tuple[int, str]:
        result = CliRunner().invoke(device_cli.app, ["verify", "--db", self.db, "--json"])
        return result.exit_code, result.output[-3000:]

    def open_edits(self) -> int:
        return int(
            self.app.execute(
                f"select count(*) from {PREFIX}journal where status in ('pending', 'sent')"
            ).fetchone()[0]
        )

    def journal(self) -> list[tuple[Any, ...]]:
        return [
            (seq, status, json.loads(outcome or "{}").get("outcome"), reason, message)
            for seq, status, outcome, reason, message in self.app.execute(
                f"select seq, status, outcome, reason, message from {PREFIX}journal order by seq"
            )
        ]


def test_a_device_follows_retyped_columns_and_its_edits_of_them_are_applied(
    pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute(DDL)

        def pg_rows() -> list[tuple[Any, ...]]:
            return [tuple(r) for r in pg.execute(PG_ROWS).fetchall()]

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
                dev.sync_until(lambda: len(dev.rows()) == 3, "initial rows")
                assert dev.verify()[0] == 0

                pg.execute(RETYPE)
                converged: list[Any] = []

                def converges() -> bool:
                    converged[:] = [typed(dev.rows()), typed(pg_rows()), dev.verify()]
                    return converged[0] == converged[1] and converged[2][0] == 0

                try:
                    dev.sync_until(converges, "rows equal to PostgreSQL's, verify clean", 120)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}: {converged}") from None
                assert pg_rows()[:2] == [
                    (1, 0, "10", 2, "[1, 2]", None),
                    (2, 1, "20", 2, "[3]", None),
                ]

                # the app writes SQLite values: 0 for false, 1 for true
                dev.app.execute(
                    """update kinds set n = 0, m = 'twenty', f = 7, a = '{"k": [1, 2]}'
                       where id = 2"""
                )
                dev.app.execute("update kinds set flag = 1 where id = 1")
                dev.app.execute("update kinds set n = 1 where id = 3")
                dev.sync_until(lambda: dev.open_edits() == 0, "an outcome of every edit", 120)
                assert [row[:5] for row in dev.journal()] == [
                    (1, "synced", "applied", None, ""),
                    (2, "synced", "applied", None, ""),
                    (3, "synced", "applied", None, ""),
                ], dev.journal()
                assert [
                    tuple(r)
                    for r in pg.execute("select id, n, m, f, a, flag from kinds order by id")
                ] == [
                    (1, False, "10", 2, [1, 2], True),
                    (2, False, "twenty", 7, {"k": [1, 2]}, None),
                    (3, True, None, None, None, None),
                ]
                dev.sync_until(converges, "rows equal to PostgreSQL's after the edits", 120)
            finally:
                dev.close()
