"""Device edits of rows holding values at the edges of their types come back into
PostgreSQL exactly, against the real processes (cdc, relay, applier; a device agent whose
app writes with plain sqlite3):

- ``real`` (float4): the device holds the float4 as the change event carried it
  (0.10000000149011612 for 0.1); the applier reads the server's row the same way, so an
  edit or a delete of such a row is not taken for a conflict with a server change;
- ``double precision``: the journal triggers keep 17 significant digits (SQLite's
  ``json_object`` writes 15: 0.30000000000000004 became 0.3, 1/3 differed from the server's
  1/3, and 1.7976931348623157e308 became a text no JSON parser reads, which stopped the
  device's every sync);
- ``numeric(38,0)`` with 29 digits and the last ``date`` PostgreSQL has (5874897-12-31):
  accepted by the intake's checks, so other columns of such rows can be edited;
- a composite key with a ``double precision`` and a ``boolean``: the triggers and the agent
  name the row alike (``device-agent verify`` is clean), and its edits reach the row;
- an array column whose first value comes as a literal with bounds (``[0:1]={7,8}``, a
  text): the column's other values are still read back as lists.
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
create table f4t (id int primary key, f4 real, note text);
insert into f4t values (1, 0.1, 'a'), (2, 0.1, 'b'), (3, 16777217, 'c');
create table f8t (id int primary key, f8 float8, note text);
insert into f8t values (1, 2.5, 'a'), (2, 0.3333333333333333, 'b'), (3, 0.1, 'c');
create table wide (id int primary key, n numeric(38,0), d date, f8 float8, note text);
insert into wide values
    (1, 12345678901234567890123456789, '5874897-12-31', 1.7976931348623157e308, 'a');
create table fk (a int, f float8, b bool, val text, primary key (a, f, b));
insert into fk values (1, 0.30000000000000004, true, 'x'), (2, 1e16, false, 'y'), (3, 0.1, true, 'z');
create table arr (id int primary key, a int[], note text);
insert into arr values (1, '[0:1]={7,8}', 'a'), (2, '{1,2}', 'b'), (3, '{3}', 'c');
"""
TABLES = ["public.f4t", "public.f8t", "public.wide", "public.fk", "public.arr"]
RULES = all_rows_rules(TABLES)


class Device(LocalDevice):
    def settled(self) -> dict[str, Any]:
        """Sync until every edit has its outcome; the last entry's outcome."""
        self.sync_until(
            lambda: (
                not self.app.execute(
                    f"select count(*) from {PREFIX}journal where status in ('pending', 'sent')"
                ).fetchone()[0]
            ),
            "outcome of every edit",
        )
        status, outcome = self.app.execute(
            f"select status, outcome from {PREFIX}journal order by seq desc limit 1"
        ).fetchone()
        return {"status": status, **json.loads(outcome or "{}")}


def verify(db: str) -> tuple[int, str]:
    """``device-agent verify`` of the device: its exit code and output."""
    result = CliRunner().invoke(device_cli.app, ["verify", "--db", db, "--json"])
    return result.exit_code, result.output[-3000:]


def text_of(pg: psycopg.Connection[Any], query: str) -> str | None:
    """A value as PostgreSQL prints it (its text output, no Python conversion)."""
    cur = pg.execute(query)
    res = cur.pgresult
    assert res is not None and res.ntuples == 1
    raw = res.get_value(0, 0)
    return None if raw is None else raw.decode()


def test_edits_of_values_at_the_edges_of_their_types_come_back_exactly(
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
            tables=TABLES,
        ) as stack:
            dev = Device(stack.url, stack.keys, tmp_path)
            try:
                dev.sync_until(
                    lambda: dev.app.execute("select count(*) from wide").fetchone()[0] == 1,
                    "initial rows",
                )
                code, report = verify(dev.db)
                assert code == 0, report
                # the device holds the float4 the change event carried
                assert dev.app.execute("select f4 from f4t where id = 1").fetchone()[0] == (
                    0.10000000149011612
                )

                # real: an edit and a delete are applied, not taken for server changes
                dev.app.execute("update f4t set f4 = 0.5 where id = 1")
                out = dev.settled()
                assert out["outcome"] == "applied", out
                assert text_of(pg, "select f4 from f4t where id = 1") == "0.5"
                dev.app.execute("delete from f4t where id = 2")
                assert dev.settled()["outcome"] == "applied"
                assert text_of(pg, "select count(*) from f4t where id = 2") == "0"
                dev.app.execute("update f4t set note = 'c2' where id = 3")
                assert dev.settled()["outcome"] == "applied"
                assert (
                    text_of(pg, "select (f4 = 16777217::real)::text || note from f4t where id = 3")
                    == "truec2"
                )

                # double precision: 17 digits, both ways
                dev.app.execute("update f8t set f8 = 0.30000000000000004 where id = 1")
                assert dev.settled()["outcome"] == "applied"
                assert text_of(pg, "select f8 from f8t where id = 1") == "0.30000000000000004"
                dev.app.execute("update f8t set f8 = 0.5 where id = 2")  # was 1/3
                out = dev.settled()
                assert out["outcome"] == "applied", out
                assert text_of(pg, "select f8 from f8t where id = 2") == "0.5"
                dev.app.execute("update f8t set note = 'c2' where id = 3")  # 0.1 untouched
                assert dev.settled()["outcome"] == "applied"
                assert text_of(pg, "select f8::text || note from f8t where id = 3") == "0.1c2"

                # numeric(38,0) of 29 digits, the last date, the largest double
                dev.app.execute("update wide set note = 'edited' where id = 1")
                out = dev.settled()
                assert out["outcome"] == "applied", out
                assert text_of(pg, "select n::text || d::text || f8::text || note from wide") == (
                    "123456789012345678901234567895874897-12-311.7976931348623157e+308edited"
                )
                # a composite key of an int, a double and a boolean
                dev.app.execute("update fk set val = 'x2' where a = 1")
                assert dev.settled()["outcome"] == "applied"
                assert text_of(pg, "select val from fk where a = 1") == "x2"
                dev.app.execute("delete from fk where a = 2")
                assert dev.settled()["outcome"] == "applied"
                assert text_of(pg, "select count(*) from fk where a = 2") == "0"
                # an array column whose values come as literals and as lists
                assert dev.app.execute("select a from arr where id = 1").fetchone()[0] == (
                    "[0:1]={7,8}"
                )
                dev.app.execute("delete from arr where id = 2")
                assert dev.settled()["outcome"] == "applied"
                dev.app.execute("update arr set note = 'c2' where id = 3")
                assert dev.settled()["outcome"] == "applied"
                assert text_of(
                    pg, "select string_agg(a::text || note, ' ' order by id) from arr"
                ) == ("[0:1]={7,8}a {3}c2")
                # and the device goes on syncing: an office row arrives
                pg.execute("insert into f8t values (100, 1.5, 'office')")
                dev.sync_until(
                    lambda: (
                        dev.app.execute("select count(*) from f8t where id = 100").fetchone()[0]
                        == 1
                    ),
                    "office row",
                )
                pg.execute("update fk set val = 'z2' where a = 3")
                dev.sync_until(
                    lambda: dev.app.execute("select val from fk where a = 3").fetchone()[0] == "z2",
                    "office edit of a row with a composite key",
                )
                code, report = verify(dev.db)
                assert code == 0, report
                assert dev.app.execute("select a, val from fk order by a").fetchall() == [
                    (1, "x2"),
                    (3, "z2"),
                ]
            finally:
                dev.close()
