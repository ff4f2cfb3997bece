"""cdc end to end: real PostgreSQL → daemon → real broker, decoded back from Kafka."""

from __future__ import annotations

import itertools
from typing import Any

import psycopg

from tests.cdc.cdc_support import make_settings, running_daemon, table_events, wait_for


def test_snapshot_then_stream_no_gap_no_overlap(
    pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table items (id int primary key, name text, qty int)")
        conn.execute("insert into items select g, 'item ' || g, g from generate_series(1, 50) g")
        settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix)
        with running_daemon(settings):
            conn.execute("insert into items values (51, 'new', 1)")
            conn.execute("update items set qty = 100 where id = 1")
            conn.execute("delete from items where id = 2")
            events = table_events(kafka_bootstrap, topic_prefix, "items", expect=53)
    ops = [e["op"] for e in events]
    assert ops[:50] == ["r"] * 50
    assert ops[50:] == ["c", "u", "d"]
    assert sorted(e["after"]["id"] for e in events[:50]) == list(range(1, 51))
    assert events[50]["after"] == {"id": 51, "name": "new", "qty": 1}
    assert events[51]["after"]["qty"] == 100
    assert events[52]["before"]["id"] == 2 and events[52]["after"] is None
    positions = [e["_pos"] for e in events]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert events[50]["_key"] == {"id": 51}


def test_transaction_positions_and_truncate(
    pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table a (id int primary key, v text)")
        settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix)
        with running_daemon(settings):
            with conn.transaction():
                conn.execute("insert into a values (1, 'x'), (2, 'y'), (3, 'z')")
            with conn.transaction():
                conn.execute("insert into a values (9, 'aborted')")
                raise_rollback(conn)
            conn.execute("truncate a")
            events = table_events(kafka_bootstrap, topic_prefix, "a", expect=4)
    assert [e["op"] for e in events] == ["c", "c", "c", "t"]
    (l1, s1), (l2, s2), (l3, s3) = (e["_pos"] for e in events[:3])
    assert l1 == l2 == l3 and [s1, s2, s3] == [0, 1, 2]
    assert events[3]["_pos"][0] > l1
    assert all(e["after"] is None or e["after"]["v"] != "aborted" for e in events)


def raise_rollback(conn: Any) -> None:
    conn.execute("select 1")
    raise psycopg.Rollback()


def test_origin_marker_names_the_device(
    pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table o (id int primary key)")
        settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix)
        with running_daemon(settings):
            with conn.transaction():
                conn.execute(
                    "select pg_logical_emit_message(true, 'fieldsync.origin', 'device:d1')"
                )
                conn.execute("insert into o values (1)")
            conn.execute("insert into o values (2)")
            events = table_events(kafka_bootstrap, topic_prefix, "o", expect=2)
    assert [(e["after"]["id"], e["source"]["origin"]) for e in events] == [
        (1, "device:d1"),
        (2, None),
    ]
    src = events[0]["source"]
    assert (
        src["table"] == "o"
        and src["schema"] == "public"
        and src["txid"] > 0
        and src["commit_ts_us"] > 0
    )
    assert (src["commit_lsn"], src["seq"]) == events[0]["_pos"]


def test_events_are_ordered_and_waited_for(
    pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Many small transactions: every one arrives, positions strictly increase."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table many (id int primary key)")
        settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix)
        with running_daemon(settings):
            for i in range(300):
                conn.execute("insert into many values (%s)", (i,))
            events = table_events(kafka_bootstrap, topic_prefix, "many", expect=300)
            wait_for(
                lambda: _confirmed(conn, settings.postgres.slot) >= _current(conn) - 10_000,
                what="slot confirmation",
            )
    assert [e["after"]["id"] for e in events] == list(range(300))
    positions = [e["_pos"] for e in events]
    assert all(a < b for a, b in itertools.pairwise(positions))


def _confirmed(conn: Any, slot: str) -> int:
    row = conn.execute(
        "select confirmed_flush_lsn - '0/0'::pg_lsn from pg_replication_slots where slot_name = %s",
        (slot,),
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _current(conn: Any) -> int:
    return int(conn.execute("select pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0])


def test_restart_during_snapshot_starts_over(
    pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A daemon stopped mid-snapshot leaves snapshot_done=false; the next one redoes it with a new slot."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table snap (id int primary key, pad text)")
        conn.execute("insert into snap select g, repeat('p', 50) from generate_series(1, 8000) g")
        settings = make_settings(
            pg_dsn, kafka_bootstrap, topic_prefix, kafka_batch_max_events="200"
        )
        from cdc.pipeline import CdcDaemon

        first = CdcDaemon(settings)
        import threading

        t = threading.Thread(target=first.run, daemon=True)
        t.start()
        wait_for(lambda: first.stats.snapshot_rows >= 1000, what="snapshot under way")
        first.request_stop()
        t.join(30)
        assert not t.is_alive()
        assert first.stats.snapshot_rows < 8000, "the first daemon must have stopped mid-snapshot"
        with running_daemon(settings) as second:
            conn.execute("insert into snap values (0, 'after snapshot')")
            events = table_events(
                kafka_bootstrap,
                topic_prefix,
                "snap",
                expect=first.stats.snapshot_rows + 8001,
                timeout=60,
            )
        assert second.stats.snapshot_rows == 8000
    snapshot_ids = [e["after"]["id"] for e in events if e["op"] == "r"]
    # every row is there; rows of the aborted first attempt may appear again (with other positions)
    assert set(snapshot_ids) == set(range(1, 8001))
    assert events[-1]["op"] == "c" and events[-1]["after"]["id"] == 0
    positions = [e["_pos"] for e in events]
    assert len(set(positions)) == len(positions), (
        "re-written snapshot rows get new positions, never a duplicate position"
    )
