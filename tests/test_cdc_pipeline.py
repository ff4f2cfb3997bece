"""cdc end to end: real PostgreSQL → daemon → real broker, decoded back from Kafka."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.cdc_support import make_settings, running_daemon, table_events


def test_snapshot_then_stream_no_gap_no_overlap(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
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


def test_transaction_positions_and_truncate(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
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
