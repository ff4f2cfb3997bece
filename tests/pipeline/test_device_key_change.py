"""A device converges after the key of a table changed type: PostgreSQL → cdc (re-snapshot
under the new keys, then deletes of the old keys) → broker → bucket engine → bucket store →
device API → device agent → SQLite, against the real services.

``ALTER TABLE gauges ALTER COLUMN id TYPE text``: cdc sends every row again under its new
key (``["5"]``) and deletes the old keys (``[5]``), so the relay REMOVEs the old rows from
the bucket and the device ends with exactly PostgreSQL's rows (no row under its old key),
its bucket's count and checksum equal to the relay's.  The relay restarts after the DDL
(``fieldsync relay run`` loads the tables' columns from the catalog at start).

The primary key redefined (``(id)`` → ``(site, id)``) while the relay keeps running with
the rules it started with (rows named by ``id``): cdc deletes the old ``(id)`` keys first and
then sends every row again, so the relay REMOVEs each row and PUTs it back; the device ends
equal to PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from device_agent.bucket_ops import local_checksums
from device_agent.client import RelayClient
from device_agent.sync import Agent, init_database
from tests.cdc.cdc_support import make_settings, running_daemon
from tests.device_agent.test_device_sync import FAST, sync_until
from tests.pipeline.test_device_ddl_convergence import RULES, relay


def device_rows(agent: Agent) -> list[tuple[str, str, int]]:
    rows = agent.conn.execute("select id, site, qty from gauges").fetchall()
    return sorted((str(i), s, q) for i, s, q in rows)


def pg_rows(conn: psycopg.Connection[Any]) -> list[tuple[str, str, int]]:
    rows = conn.execute("select id, site, qty from gauges").fetchall()
    return sorted((str(i), s, q) for i, s, q in rows)


@pytest.mark.parametrize(
    ("statement", "restart"),
    [
        ("alter table gauges alter column id type text", True),
        # the relay keeps the rules it started with: it names rows by id, which cdc's
        # deletes of the old (id) keys remove and the re-sent rows put back
        ("alter table gauges drop constraint gauges_pkey, add primary key (site, id)", False),
    ],
    ids=["key type int to text", "primary key redefined, relay not restarted"],
)
def test_device_equals_postgresql_after_the_key_changes(
    statement: str,
    restart: bool,
    tmp_path: Path,
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    rules_path = tmp_path / "rules.toml"
    rules_path.write_text(RULES)
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute("create table gauges (id int primary key, site text not null, qty int not null)")
        pg.execute(
            "insert into gauges select g, 'plant-' || (g % 3), g * 10 from generate_series(1, 23) g"
        )
        settings = make_settings(
            pg_dsn,
            kafka_bootstrap,
            topic_prefix,
            cdc_ddl_check_interval_s="0.3",
            cdc_resnapshot_chunk_rows="5",
        )
        with (
            running_daemon(settings),
            relay(pg_dsn, store_dsn, rules_path, kafka_bootstrap, topic_prefix) as (r, url),
        ):
            token = r.token()
            path = tmp_path / "device.db"
            init_database(str(path), url, token, client=RelayClient(url, token, retry=FAST))
            agent = Agent(str(path), retry=FAST)
            try:
                sync_until(
                    agent,
                    lambda: device_rows(agent) == pg_rows(pg),
                    "the device to hold every row",
                    timeout=60,
                )
                pg.execute(statement)
                pg.execute("insert into gauges values ('99', 'plant-9', 1)")
                pg.execute("update gauges set qty = qty + 1 where id::text = '7'")
                pg.execute("delete from gauges where id::text = '8'")
                if restart:
                    r.restart()
                sync_until(
                    agent,
                    lambda: device_rows(agent) == pg_rows(pg),
                    "the device to equal PostgreSQL after the key type changed",
                    timeout=120,
                )
                agent.sync_once()
                server = agent.client.checkpoint()["buckets"]
                mine = local_checksums(agent.conn)
                final = device_rows(agent)
            finally:
                agent.close()
    assert len(final) == 23, "22 old rows and 99: no row left under its old key"
    assert ("99", "plant-9", 1) in final
    assert set(server) == set(mine) and server, (server, mine)
    for name, (count, checksum) in mine.items():
        assert (count, checksum) == (int(server[name]["count"]), int(server[name]["checksum"])), (
            name
        )
