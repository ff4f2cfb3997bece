"""A device converges after the key of a table changed: PostgreSQL → cdc (re-snapshot under
the new keys, after deletes of the old keys) → broker → bucket engine → bucket store → device
API → device agent → SQLite, against the real services.

``ALTER TABLE gauges ALTER COLUMN id TYPE text``: cdc deletes the old keys (``[5]``) and sends
every row again under its new key (``["5"]``), so the relay REMOVEs the old rows from the
bucket and the device ends with exactly PostgreSQL's rows (no row under its old key), its
bucket's count and checksum equal to the relay's.

The primary key redefined (``(id)`` → ``(site, id)``), shrunk (``(site, id)`` → ``(id)``) or
reordered (``(site, id)`` → ``(id, site)``), the relay restarted after the DDL (``fieldsync
relay run`` loads the tables' keys from the catalog at start): the relay names each row by
its event's key (key columns in column order), so cdc's deletes remove the rows of the old
key whenever the relay restarted; the device re-keys its table (its unsent edit of a row
stays on top, named by the new key) and ends equal to PostgreSQL.  With the relay not
restarted yet, its rows are named by the new key while its schema still says ``(id)``: the
device refuses the download with ``KeyMismatch`` and applies nothing, until the relay
restarts.  With the journal intake and the applier (restarted with the relay, or running on
without a restart): an edit made offline across the change is named by the new key before it
goes up, applied to PostgreSQL and settled.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from device_agent.bucket_ops import local_checksums
from device_agent.client import RelayClient
from device_agent.errors import KeyMismatch
from device_agent.local_tables import PREFIX
from device_agent.sync import Agent, init_database
from relay.downstream.rules import Rules
from tests.cdc.cdc_support import make_settings, running_daemon, wait_for
from tests.device_agent.test_device_sync import FAST, sync_until
from tests.pipeline.test_device_ddl_convergence import RULES, FollowingRelay, Relay, relay


def converge(
    agent: Agent,
    done: Callable[[], bool],
    what: str,
    mismatches: list[str],
    until_mismatch: bool = False,
) -> None:
    """Sync until ``done`` (or, ``until_mismatch``, until a sync is refused); a sync refused
    because the relay's rows are named by another key than its schema's (a relay not caught
    up with the key change yet) is retried and its message kept in ``mismatches``."""

    def synced() -> bool:
        try:
            agent.sync_once()
        except KeyMismatch as exc:
            mismatches.append(str(exc))
            return until_mismatch
        return done()

    wait_for(synced, timeout=120, interval=0.2, what=what)


def device_rows(agent: Agent) -> list[tuple[str, str, int]]:
    rows = agent.conn.execute("select id, site, qty from gauges").fetchall()
    return sorted((str(i), s, q) for i, s, q in rows)


def pg_rows(conn: psycopg.Connection[Any], edited: bool = False) -> list[tuple[str, str, int]]:
    """PostgreSQL's rows (``edited``: with the device's unsent edit of row 5 on top)."""
    rows = conn.execute("select id, site, qty from gauges").fetchall()
    return sorted((str(i), s, 777 if edited and i == 5 else q) for i, s, q in rows)


@contextlib.contextmanager
def synced_gauges(
    tmp_path: Path,
    pg_dsn: str,
    store_dsn: str,
    kafka: str,
    prefix: str,
    create: str,
    kind: type[Relay] = Relay,
) -> Iterator[tuple[psycopg.Connection[Any], Relay, Agent]]:
    """Table ``gauges`` (``create``, 23 rows) captured by cdc, a relay (``kind``) and a
    device (``tmp_path / "device.db"``) holding every row."""
    rules_path = tmp_path / "rules.toml"
    rules_path.write_text(RULES)
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute(create)
        pg.execute(
            "insert into gauges select g, 'plant-' || (g % 3), g * 10 from generate_series(1, 23) g"
        )
        settings = make_settings(
            pg_dsn, kafka, prefix, cdc_ddl_check_interval_s="0.3", cdc_resnapshot_chunk_rows="5"
        )
        with (
            running_daemon(settings),
            relay(pg_dsn, store_dsn, rules_path, kafka, prefix, kind) as (r, url),
        ):
            token = r.token()
            path = str(tmp_path / "device.db")
            init_database(path, url, token, client=RelayClient(url, token, retry=FAST))
            agent = Agent(path, retry=FAST)
            try:
                sync_until(
                    agent, lambda: device_rows(agent) == pg_rows(pg), "every row", timeout=60
                )
                yield pg, r, agent
            finally:
                agent.close()


ID_KEY = "create table gauges (id int primary key, site text not null, qty int not null)"
SITE_ID_KEY = (
    "create table gauges (id int not null, site text not null, qty int not null, "
    "primary key (site, id))"
)
TO_SITE_ID = "alter table gauges drop constraint gauges_pkey, add primary key (site, id)"


@pytest.mark.parametrize(
    ("create", "statement", "restart", "key", "edit"),
    [
        (ID_KEY, "alter table gauges alter column id type text", True, ["id"], False),
        # rows named by (id, site), the relay's schema still (id): the device says so and
        # waits; the relay restarted, its schema follows and the device re-keys its table
        (ID_KEY, TO_SITE_ID, False, ["id", "site"], False),
        (ID_KEY, TO_SITE_ID, True, ["id", "site"], False),
        # an edit the device has not sent stays on top of the row, named by the new key
        (ID_KEY, TO_SITE_ID, True, ["id", "site"], True),
        (
            SITE_ID_KEY,
            "alter table gauges drop constraint gauges_pkey, add primary key (id)",
            True,
            ["id"],
            True,
        ),
        # key columns are listed in column order: a reordered key names every row as before
        (
            SITE_ID_KEY,
            "alter table gauges drop constraint gauges_pkey, add primary key (id, site)",
            True,
            ["id", "site"],
            False,
        ),
    ],
    ids=[
        "key type int to text",
        "primary key redefined, relay restarted later",
        "primary key redefined, relay restarted",
        "primary key redefined, an unsent edit",
        "primary key shrunk, an unsent edit",
        "primary key reordered, relay restarted",
    ],
)
def test_device_equals_postgresql_after_the_key_changes(
    create: str,
    statement: str,
    restart: bool,
    key: list[str],
    edit: bool,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    with synced_gauges(tmp_path, pg_dsn, store_dsn, kafka_bootstrap, topic_prefix, create) as (
        pg,
        r,
        agent,
    ):
        if edit:  # the relay has no journal intake: the edit stays pending
            with sqlite3.connect(tmp_path / "device.db") as app:
                app.execute("update gauges set qty = 777 where id = 5")
        pg.execute(statement)
        pg.execute("insert into gauges values ('99', 'plant-9', 1)")
        pg.execute("update gauges set qty = qty + 1 where id::text = '7'")
        pg.execute("delete from gauges where id::text = '8'")
        if restart:
            r.restart()
        mismatches: list[str] = []
        if not restart:
            # rows named by (id, site) while the relay's schema still says (id): the
            # device refuses the download, precisely, and applies nothing of it
            before = device_rows(agent)
            converge(agent, lambda: False, "a key mismatch", mismatches, until_mismatch=True)
            assert "public.gauges: the relay's buckets hold the row [" in mismatches[0]
            assert "other key columns than the table's key (id)" in mismatches[0]
            assert device_rows(agent) == before
            assert any(
                "public.gauges's primary key is now (id, site), this relay loaded (id)"
                in rec.getMessage()
                for rec in caplog.records
            ), "the engine warns that the relay needs a restart"
            r.restart()
        converge(
            agent,
            lambda: device_rows(agent) == pg_rows(pg, edited=edit),
            "the device to equal PostgreSQL after the key changed",
            mismatches,
        )
        agent.sync_once()
        server = agent.client.checkpoint()["buckets"]
        mine = local_checksums(agent.conn)
        final = device_rows(agent)
        (local_key,) = agent.conn.execute("select key from _fieldsync_tables").fetchone()
        journal = agent.conn.execute(f"select k, status from {PREFIX}journal").fetchall()
    assert orjson.loads(local_key) == key
    named = {"id": 5, "site": "plant-2"}
    k = named["id"] if key == ["id"] else orjson.dumps([named[c] for c in key]).decode()
    assert journal == ([(k, "pending")] if edit else [])
    assert len(final) == 23, "22 old rows and 99: no row left under its old key"
    assert ("99", "plant-9", 1) in final
    assert set(server) == set(mine) and server, (server, mine)
    for name, (count, checksum) in mine.items():
        assert (count, checksum) == (int(server[name]["count"]), int(server[name]["checksum"])), (
            name
        )


def test_the_relay_follows_a_key_change_without_a_restart(
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """The primary key redefined, the relay not restarted: its table follower binds the
    rules to the new key, ``/v1/schema`` lists it, and the device re-keys its table and
    ends equal to PostgreSQL (a download refused meanwhile is retried)."""
    with synced_gauges(
        tmp_path, pg_dsn, store_dsn, kafka_bootstrap, topic_prefix, ID_KEY, FollowingRelay
    ) as (pg, _, agent):
        pg.execute(TO_SITE_ID)
        pg.execute("insert into gauges values (99, 'plant-9', 1)")
        pg.execute("update gauges set qty = qty + 1 where id = 7")
        mismatches: list[str] = []
        converge(
            agent,
            lambda: device_rows(agent) == pg_rows(pg),
            "the device to equal PostgreSQL after the key changed, the relay running on",
            mismatches,
        )
        agent.sync_once()
        server = agent.client.checkpoint()["buckets"]
        mine = local_checksums(agent.conn)
        (local_key,) = agent.conn.execute("select key from _fieldsync_tables").fetchone()
        final = device_rows(agent)
    assert orjson.loads(local_key) == ["id", "site"]
    assert len(final) == 24 and ("99", "plant-9", 1) in final
    assert mine == {n: (int(b["count"]), int(b["checksum"])) for n, b in server.items()}
    assert any(
        "the captured tables changed; /v1/schema and the journal follow: public.gauges: "
        "key (id) → (id, site)" in rec.getMessage()
        for rec in caplog.records
    )


class JournalRelay(Relay):
    """The relay with journal intake, the outcome feed and the upstream applier, restarted
    with it (each reads the tables' keys at start)."""

    def mounted(self, rules: Rules) -> list[Any]:
        from relay.upstream.intake import JournalApiConfig
        from relay.upstream.journal_api import JournalApi
        from relay.upstream.journal_kafka import JournalProducer
        from relay.upstream.journal_store import JournalStore
        from relay.upstream.outcome_feed import OutcomeFeed

        self.parts = contextlib.ExitStack()
        jstore = JournalStore(self.store.dsn)
        jstore.migrate()
        self.parts.callback(jstore.close)
        kafka = {"bootstrap_servers": self.kafka}
        config = JournalApiConfig(prefix=self.prefix, long_poll_s=1, kafka_timeout_s=10)
        feed = OutcomeFeed(jstore, kafka, self.prefix, refresh_s=0.5)
        journal = JournalApi(rules, jstore, JournalProducer(kafka, config), config, feed=feed)
        self.parts.callback(journal.close)
        self.start_applier(self.parts)
        self.parts.enter_context(feed.running())
        return [journal]

    def start_applier(self, parts: contextlib.ExitStack) -> None:
        from relay.upstream.applier import Applier
        from relay.upstream.applier_db import ApplierDb

        applier = Applier(
            ApplierDb(self.pg_dsn, self.rules_path, None),
            kafka={"bootstrap_servers": self.kafka},
            prefix=self.prefix,
            batch_max_ms=20,
            topic_refresh_s=0.5,
        )
        thread = threading.Thread(target=applier.run, daemon=True)
        thread.start()
        parts.callback(applier.close)
        parts.callback(thread.join, 30)
        parts.callback(applier.request_stop)

    def stop(self) -> None:
        super().stop()
        self.parts.close()


class JournalRelayApplierRunsOn(JournalRelay):
    """:class:`JournalRelay` whose applier is started once and runs on while the relay
    restarts: it follows the key change by itself (docs/journal.md, "The applier")."""

    kept: contextlib.ExitStack | None = None
    restarting = False

    def start_applier(self, parts: contextlib.ExitStack) -> None:
        if self.kept is None:
            self.kept = contextlib.ExitStack()
            super().start_applier(self.kept)

    def restart(self) -> None:
        self.restarting = True
        try:
            super().restart()
        finally:
            self.restarting = False

    def stop(self) -> None:
        super().stop()
        if not self.restarting and self.kept is not None:
            self.kept.close()
            self.kept = None


@pytest.mark.parametrize(
    "kind",
    [JournalRelay, JournalRelayApplierRunsOn],
    ids=["applier restarted with the relay", "applier not restarted"],
)
def test_an_edit_made_offline_across_a_key_change_goes_up_under_the_new_key(
    tmp_path: Path,
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    kind: type[JournalRelay],
) -> None:
    """The device edits row 5 while the primary key is redefined and the relay restarts:
    its next sync names the edit by the new key before uploading it, and the applier
    (restarted with the relay, or running on and re-reading the table's key) writes it to
    PostgreSQL; it comes back through cdc and settles."""
    with synced_gauges(
        tmp_path, pg_dsn, store_dsn, kafka_bootstrap, topic_prefix, ID_KEY, kind
    ) as (pg, r, agent):
        with sqlite3.connect(tmp_path / "device.db") as app:  # offline: not uploaded yet
            app.execute("update gauges set qty = 777 where id = 5")
        pg.execute(TO_SITE_ID)
        r.restart()
        mismatches: list[str] = []
        converge(
            agent,
            lambda: (
                agent.conn.execute(f"select status from {PREFIX}journal").fetchall()
                == [("synced",)]
                and device_rows(agent) == pg_rows(pg)
            ),
            "the edit to reach PostgreSQL under the new key and settle",
            mismatches,
        )
        journal = agent.conn.execute(f"select k, status from {PREFIX}journal").fetchall()
        qty = pg.execute("select qty from gauges where id = 5").fetchone()
    assert journal == [('[5,"plant-2"]', "synced")]
    assert qty == (777,)
