"""A device converges after DDL that changes values without row events: PostgreSQL → cdc
(re-snapshot as op ``r`` events) → broker → bucket engine → bucket store → device API →
device agent → SQLite, against the real services.

After each of ADD COLUMN with a default, ADD COLUMN with a volatile default, ALTER COLUMN
TYPE … USING and ALTER TYPE … RENAME VALUE, the device's table equals PostgreSQL's, value by
value.  The relay takes ``r`` events as ordinary upserts (PUT ops for rows it holds).  A new
column reaches the device's schema when the relay binds its rules to the catalog again:
either restarted (the bucket engine and the API, with rules loaded from the catalog as
``fieldsync relay run`` loads them at start), or not restarted, its table follower noticing
the new column (relay/downstream/table_follower.py); the device migrates and downloads its
bucket again.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from device_agent.client import RelayClient
from device_agent.sync import Agent, init_database
from relay.auth import Authenticator, issue_token
from relay.auth_keys import Key, KeyStore
from relay.config_file import read_toml
from relay.downstream.api import create_app
from relay.downstream.api_sync import ApiConfig
from relay.downstream.bucket_engine import BucketEngine
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.rules import Rules
from relay.downstream.rules_parser import load_rules
from relay.downstream.table_follower import TableFollower
from relay.downstream.table_infos import table_infos_from_catalog
from relay.errors import RulesError
from tests.cdc.cdc_support import make_settings, running_daemon
from tests.device_agent.test_device_sync import FAST, SECRET, serve, sync_until

RULES = """
[[bucket]]
name = "all"

[[bucket.table]]
table = "public.gauges"
"""

DDLS: list[tuple[str, str, bool]] = [
    # (what, statement, adds a column: the relay restarts or follows to learn it)
    ("ADD COLUMN with a default", "alter table gauges add column note text default 'dflt'", True),
    (
        "ADD COLUMN with a volatile default",
        "alter table gauges add column r float8 default random()",
        True,
    ),
    (
        "ALTER COLUMN TYPE … USING",
        "alter table gauges alter column qty type bigint using qty * 3 + 1",
        False,
    ),
    ("ALTER TYPE … RENAME VALUE", "alter type mood rename value 'ok' to 'fine'", False),
]


class Swappable:
    """The relay's ASGI app, replaced when the relay "restarts" (same address)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class Relay:
    """Bucket engine and device API over one store; :meth:`restart` reloads the rules."""

    def __init__(
        self, pg_dsn: str, store: PgBucketStore, rules_path: Path, kafka: str, prefix: str
    ):
        self.pg_dsn, self.store, self.rules_path = pg_dsn, store, rules_path
        self.kafka, self.prefix = kafka, prefix
        self.keys = KeyStore([Key.hmac("k1", SECRET)], current="k1")
        self.engine: BucketEngine | None = None
        self.thread: threading.Thread | None = None
        self.asgi = Swappable(None)
        self.start()

    def rules(self) -> Rules:
        return load_rules(self.rules_path, table_infos_from_catalog(self.pg_dsn))

    def start(self) -> None:
        rules = self.rules()
        self.engine = BucketEngine(
            self.store,
            rules,
            kafka={"bootstrap_servers": self.kafka},
            prefix=self.prefix,
            batch_max_ms=20,
            topic_refresh_s=1.0,
        )
        self.thread = threading.Thread(target=self.engine.run, daemon=True)
        self.thread.start()
        self.asgi.app = create_app(
            self.store,
            rules,
            Authenticator(self.keys),
            ApiConfig(rate_per_s=0, long_poll_s=1, max_page_ops=5000),
            *self.mounted(rules),
        )

    def mounted(self, rules: Rules) -> list[Any]:
        """Routes served beside the sync endpoints (none here; a subclass adds the journal)."""
        return []

    def stop(self) -> None:
        if self.engine is not None and self.thread is not None:
            self.engine.request_stop()
            self.thread.join(30)
            assert not self.thread.is_alive(), "the bucket engine did not stop"
            self.engine.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def token(self) -> str:
        return issue_token(self.keys, None, "tab-ddl", {}, 3600)


class FollowingRelay(Relay):
    """A relay that follows the tables' definitions instead of restarting: its table
    follower (relay/downstream/table_follower.py, as ``relay run`` runs it) binds the rules
    again when a table changes."""

    following: contextlib.ExitStack | None = None

    def start(self) -> None:
        super().start()
        api, engine = self.asgi.app.state.api, self.engine
        assert engine is not None

        def rebind(new: Rules) -> None:
            api.rules = new
            engine.rules = new

        self.follower = TableFollower(
            api.rules,
            read_toml(self.rules_path, RulesError),
            lambda: table_infos_from_catalog(self.pg_dsn),
            rebind,
            interval_s=0.2,
        )
        self.following = contextlib.ExitStack()
        self.following.enter_context(self.follower.running())

    def stop(self) -> None:
        if self.following is not None:
            self.following.close()
            self.following = None
        super().stop()


@contextlib.contextmanager
def relay(
    pg_dsn: str,
    store_dsn: str,
    rules_path: Path,
    kafka: str,
    prefix: str,
    kind: type[Relay] = Relay,
) -> Iterator[tuple[Relay, str]]:
    store = PgBucketStore(store_dsn)
    store.migrate()
    r = kind(pg_dsn, store, rules_path, kafka, prefix)
    try:
        with serve(r.asgi) as port:
            yield r, f"http://127.0.0.1:{port}"
    finally:
        r.stop()
        store.close()


def device_rows(agent: Agent, columns: list[str]) -> list[tuple[Any, ...]] | None:
    """The device's rows of ``columns``; None while its table lacks one of them."""
    try:
        return agent.conn.execute(f"select {', '.join(columns)} from gauges order by id").fetchall()
    except sqlite3.OperationalError:  # not migrated yet: the relay's schema lacks the column
        return None


def pg_rows(conn: psycopg.Connection[Any], columns: list[str]) -> list[tuple[Any, ...]]:
    return conn.execute(f"select {', '.join(columns)} from gauges order by id").fetchall()


@pytest.mark.parametrize(
    "kind", [Relay, FollowingRelay], ids=["relay restarted", "relay follows, no restart"]
)
def test_device_equals_postgresql_after_each_ddl(
    tmp_path: Path,
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    kind: type[Relay],
) -> None:
    rules_path = tmp_path / "rules.toml"
    rules_path.write_text(RULES)
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute("create type mood as enum ('sad', 'ok', 'happy')")
        pg.execute(
            "create table gauges (id int primary key, site text not null, qty int not null, m mood)"
        )
        pg.execute(
            "insert into gauges select g, 'plant-' || (g % 3), g * 10, "
            "(array['sad','ok','happy'])[1 + g % 3]::mood from generate_series(1, 23) g"
        )
        settings = make_settings(
            pg_dsn,
            kafka_bootstrap,
            topic_prefix,
            cdc_ddl_check_interval_s="0.3",
            cdc_resnapshot_chunk_rows="5",
        )
        columns = ["id", "site", "qty", "m"]
        with (
            running_daemon(settings),
            relay(pg_dsn, store_dsn, rules_path, kafka_bootstrap, topic_prefix, kind) as (r, url),
        ):
            token = r.token()
            path = tmp_path / "device.db"
            init_database(str(path), url, token, client=RelayClient(url, token, retry=FAST))
            agent = Agent(str(path), retry=FAST)
            try:
                sync_until(
                    agent,
                    lambda: device_rows(agent, columns) == pg_rows(pg, columns),
                    "the device to hold every row",
                    timeout=60,
                )
                for what, statement, adds_column in DDLS:
                    pg.execute(statement)
                    if adds_column:
                        columns.append(statement.split("add column ")[1].split()[0])
                        if kind is Relay:
                            r.restart()
                    try:
                        sync_until(
                            agent,
                            lambda: device_rows(agent, columns) == pg_rows(pg, columns),
                            f"the device to equal PostgreSQL after {what}",
                            timeout=90,
                        )
                    except AssertionError as exc:
                        device = device_rows(agent, columns)
                        wanted = pg_rows(pg, columns)
                        diff = [
                            (d, w) for d, w in zip(device or [], wanted, strict=False) if d != w
                        ]
                        pytest.fail(f"{exc}\nfirst differences (device, postgres): {diff[:3]}")
                final = device_rows(agent, columns)
                assert final is not None
            finally:
                agent.close()
    assert {row[4] for row in final} == {"dflt"}
    assert {row[3] for row in final} == {"sad", "fine", "happy"}
    assert all(isinstance(row[5], float) for row in final)
    assert [row[2] for row in final] == [i * 30 + 1 for i in range(1, 24)]
