"""Values at and past the size limits of the parts, against the real processes:

- a device edit whose journal entry is larger than the relay takes in one upload
  (``http.max_body_bytes``) even alone: the relay answers 413 to it however the device
  splits its uploads; it is kept in the device's journal as ``failed`` (reason
  ``entry_too_large``, a message naming the entry, its table and key; the edits made on
  top of it ``blocked``, as the relay does), and the edits after it go up (before, every
  upload stopped at it: no later edit reached PostgreSQL);
- an entry over ``journal.max_entry_bytes`` but under the body limit is rejected by the
  relay with the same reason, and an entry under both is applied;
- a small device edit of a row the office made large meanwhile (a 2 MB bytea): its
  outcome, which carries the row afterwards, was an outcomes record over kafka-python's
  1 MiB limit, refused at every try: the applier published no outcome for any device
  again.  Now the outcome comes without the row, and the edits after it settle.
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg

from device_agent.local_tables import PREFIX
from device_agent.sync import SyncReport
from tests.pipeline.local_device import LocalDevice, all_rows_rules
from tests.pipeline.pipeline_stack import services

TABLES = ["public.notes"]


def test_an_entry_too_large_for_any_upload_fails_alone_and_later_edits_go_up(
    pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute(
            "create table notes (id int primary key, t text);"
            "insert into notes select g, 'x' from generate_series(1, 4) g"
        )
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
            dev = LocalDevice(stack.url, stack.keys, tmp_path)
            try:
                dev.sync_until(
                    lambda: dev.app.execute("select count(*) from notes").fetchone()[0] == 4,
                    "the rows",
                )
                dev.app.execute("update notes set t = ? where id = 1", ("a" * 200_000,))
                dev.app.execute("update notes set t = ? where id = 2", ("b" * 300_000,))
                dev.app.execute("update notes set t = ? where id = 3", ("c" * 2_000_000,))
                dev.app.execute("update notes set t = 'c2' where id = 3")  # on top of it
                dev.app.execute("update notes set t = 'small' where id = 4")
                dev.sync_until(
                    lambda: (
                        dev.app.execute(
                            f"select count(*) from {PREFIX}journal where status in "
                            "('pending', 'sent')"
                        ).fetchone()[0]
                        == 0
                    ),
                    "every entry settled",
                    rounds=60,
                )
                journal = dev.app.execute(
                    f"select seq, status, reason, message from {PREFIX}journal order by seq"
                ).fetchall()
                assert [(s, st, r) for s, st, r, _ in journal] == [
                    (1, "synced", None),
                    (2, "failed", "entry_too_large"),
                    (3, "failed", "entry_too_large"),
                    (4, "failed", "blocked"),
                    (5, "synced", None),
                ], journal
                message = journal[2][3]
                assert "entry 3 (update of public.notes, key" in message, message
                assert "request_too_large" in message, message
                # the refused edit stays in the journal; the row shows the server's version
                kept = dev.app.execute(
                    f"select length(new) from {PREFIX}journal where seq = 3"
                ).fetchone()[0]
                assert kept > 2_000_000
                assert pg.execute("select id, length(t) from notes order by id").fetchall() == [
                    (1, 200_000),
                    (2, 1),
                    (3, 1),
                    (4, 5),
                ]
                dev.sync_until(
                    lambda: (
                        dev.app.execute("select length(t) from notes where id = 3").fetchone()[0]
                        == 1
                    ),
                    "the server's version of the refused row",
                )
            finally:
                dev.close()


def test_an_edit_of_a_row_grown_large_on_the_server_gets_its_outcome(
    pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute(
            "create table doc (id int primary key, b bytea, t text);"
            "insert into doc select g, null, 'x' from generate_series(1, 3) g"
        )
        with services(
            tmp_path,
            pg_dsn,
            store_dsn,
            kafka_bootstrap,
            topic_prefix,
            rules=all_rows_rules(["public.doc"]),
            conflicts='[default]\npolicy = "server_wins"\n',
            tables=["public.doc"],
        ) as stack:
            dev = LocalDevice(stack.url, stack.keys, tmp_path)
            try:
                dev.sync_until(
                    lambda: dev.app.execute("select count(*) from doc").fetchone()[0] == 3,
                    "the rows",
                )
                pg.execute("update doc set b = %s where id = 1", (os.urandom(2_000_000),))
                dev.app.execute("update doc set t = 'device' where id = 1")  # before it came
                dev.agent.upload(SyncReport())
                dev.app.execute("update doc set t = 'later' where id = 2")
                dev.sync_until(
                    lambda: (
                        dev.app.execute(
                            f"select count(*) from {PREFIX}journal where status <> 'synced'"
                        ).fetchone()[0]
                        == 0
                    ),
                    "both outcomes",
                    rounds=60,
                )
                message = dev.app.execute(
                    f"select message from {PREFIX}journal where seq = 1"
                ).fetchone()[0]
                assert "the row afterwards is left out of this outcome" in message, message
                assert pg.execute("select id, t, length(b) from doc order by id").fetchall() == [
                    (1, "device", 2_000_000),
                    (2, "later", None),
                    (3, "x", None),
                ]
            finally:
                dev.close()
