"""Device edits across a column dropped or renamed on the server, against the real
processes (cdc, relay, applier; a device agent whose app writes with plain sqlite3):

- an edit ``sent`` (its outcome not read yet: the applier is down) and edits still
  ``pending`` when ``t1.extra`` is dropped: the device's migration waits for them
  (``MigrationWaits``), each sync uploading them and reading their outcomes, and goes on
  once they have them, without anyone's action (it used to stop every sync for good:
  the outcomes of sent entries were never read while the migration was blocked);
- edits of the columns that remain, made before the drop or the rename (``t3.note`` to
  ``memo``), are applied: the removed column in their ``old`` is left out (they used to
  be refused as ``unknown_column`` and never reached PostgreSQL);
- an edit of the dropped column itself is rejected as ``unknown_column``, naming it, and
  the row shows the server's version.

The device ends with the tables, columns and values PostgreSQL has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from device_agent.errors import MigrationWaits
from device_agent.local_tables import PREFIX
from relay.auth_keys import KeyStore
from tests.pipeline.local_device import LocalDevice, all_rows_rules
from tests.pipeline.pipeline_stack import services

DDL = """
create table t1 (id int primary key, note text, extra text);
insert into t1 select g, 'n' || g, 'x' || g from generate_series(1, 3) g;
create table t3 (id int primary key, note text, other text);
insert into t3 select g, 'n' || g, 'o' || g from generate_series(1, 2) g;
"""
TABLES = ["public.t1", "public.t3"]
RULES = all_rows_rules(TABLES)


class Device(LocalDevice):
    wait_s = 0.5

    def __init__(self, url: str, keys: KeyStore, tmp_path: Path) -> None:
        super().__init__(url, keys, tmp_path)
        self.waited = 0

    def sync(self) -> None:
        """A migration waiting for edits to be synced is the one error taken (counted in
        :attr:`waited`): the next sync goes on with it."""
        try:
            super().sync()
        except MigrationWaits:
            self.waited += 1

    def columns(self, table: str) -> list[str]:
        return [r[1] for r in self.app.execute(f'pragma table_info("{table}")')]

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.app.execute(query)]

    def journal(self) -> list[tuple[Any, ...]]:
        return self.app.execute(
            f"select seq, status, reason, message from {PREFIX}journal order by seq"
        ).fetchall()


def pg_rows(pg: psycopg.Connection[Any], query: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in pg.execute(query).fetchall()]


T1 = "select id, note from t1 order by id"
T3 = "select id, memo, other from t3 order by id"


def test_edits_across_a_dropped_and_a_renamed_column_reach_postgresql_and_the_device_follows(
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
            ddl_check_s=0.5,
        ) as stack:
            dev = Device(stack.url, stack.keys, tmp_path)
            try:
                dev.sync_until(
                    lambda: (
                        len(dev.rows("select id from t1")) == 3
                        and len(dev.rows("select id from t3")) == 2
                    ),
                    "initial rows",
                )
                # an edit sent whose outcome the device has not read: the applier is down
                with stack.lock:
                    stack.procs["applier"].kill()
                dev.app.execute("update t1 set note = 'sent-edit' where id = 1")
                dev.agent.sync_once()
                assert dev.journal() == [(1, "sent", None, None)]
                # edits made offline: of a column that stays, of the one to be dropped, and
                # of a column of a table where another is renamed
                dev.app.execute("update t1 set note = 'offline-edit' where id = 2")
                dev.app.execute("update t1 set extra = 'gone' where id = 3")
                dev.app.execute("update t3 set other = 'dev-other' where id = 1")
                pg.execute("alter table t1 drop column extra")
                pg.execute("alter table t3 rename column note to memo")
                with stack.lock:
                    stack.procs["applier"].start()

                dev.sync_until(
                    lambda: (
                        dev.columns("t1") == ["id", "note"]
                        and "memo" in dev.columns("t3")
                        and "note" not in dev.columns("t3")
                        and all(
                            status not in ("pending", "sent") for _, status, *_ in dev.journal()
                        )
                        and dev.rows(T1) == pg_rows(pg, T1)
                        and dev.rows(T3) == pg_rows(pg, T3)
                    ),
                    "migrated tables equal to PostgreSQL's, every edit settled",
                )
                assert dev.waited > 0  # the migration did wait for the edits
                assert pg_rows(pg, T1) == [(1, "sent-edit"), (2, "offline-edit"), (3, "n3")]
                assert pg_rows(pg, T3) == [(1, "n1", "dev-other"), (2, "n2", "o2")]
                assert dev.journal() == [
                    (1, "synced", None, ""),
                    (2, "synced", None, ""),
                    (
                        3,
                        "failed",
                        "unknown_column",
                        "entry 3 (public.t1): new changes 'extra', which the table does not "
                        "have (dropped or renamed on the server): the edit cannot be applied",
                    ),
                    (4, "synced", None, ""),
                ]
            finally:
                dev.close()
