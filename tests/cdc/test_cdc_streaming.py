"""Large in-progress transactions streamed by PostgreSQL: spilled to disk, ordered at commit."""

from __future__ import annotations

import threading

import psycopg

from tests.cdc.cdc_support import make_settings, running_daemon, table_events


def _dsn_with_small_work_mem(dsn: str) -> str:
    # logical_decoding_work_mem applies to the walsender: 64kB makes PostgreSQL stream early
    return psycopg.conninfo.make_conninfo(dsn, options="-c logical_decoding_work_mem=64kB")


def test_streamed_commit_abort_and_subtransaction_rollback(
    pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    dsn = _dsn_with_small_work_mem(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table big (id int primary key, pad text)")
        settings = make_settings(
            dsn, kafka_bootstrap, topic_prefix, cdc_spill_dir=str(tmp_path / "spill")
        )
        with running_daemon(settings) as daemon:
            # 1. a streamed transaction that commits, with a rolled-back savepoint in the middle
            with conn.transaction():
                conn.execute(
                    "insert into big select g, repeat('x', 200) from generate_series(1, 5000) g"
                )
                try:
                    with conn.transaction():
                        conn.execute(
                            "insert into big select g, repeat('y', 200) from generate_series(100001, 103000) g"
                        )
                        raise psycopg.Rollback()
                except psycopg.Rollback:
                    pass
                conn.execute(
                    "insert into big select g, repeat('z', 200) from generate_series(5001, 8000) g"
                )
            # 2. a streamed transaction that aborts
            with conn.transaction():
                conn.execute(
                    "insert into big select g, repeat('a', 200) from generate_series(200001, 206000) g"
                )
                raise_rollback()
            # 3. interleaving: a small transaction committed while a large one is in progress
            other = psycopg.connect(pg_dsn, autocommit=True)
            with conn.transaction():
                conn.execute(
                    "insert into big select g, repeat('b', 200) from generate_series(300001, 305000) g"
                )
                t = threading.Thread(
                    target=lambda: other.execute("insert into big values (400001, 'small')")
                )
                t.start()
                t.join()
            other.close()
            events = table_events(
                kafka_bootstrap, topic_prefix, "big", expect=8000 + 5000 + 1, timeout=60
            )
            spilled = daemon.stats.events
            row = conn.execute(
                "select stream_txns, stream_bytes from pg_stat_replication_slots where slot_name = %s",
                (settings.postgres.slot,),
            ).fetchone()
    ids = [e["after"]["id"] for e in events]
    assert len(ids) == len(set(ids)) == 8000 + 5000 + 1, "no row lost, none twice"
    assert not any(100001 <= i <= 103000 for i in ids), "rolled-back savepoint rows must not appear"
    assert not any(200001 <= i <= 206000 for i in ids), (
        "aborted streamed transaction must not appear"
    )
    assert ids[:8000] == list(range(1, 5001)) + list(range(5001, 8001))
    # the small transaction committed before the big one: it comes first
    assert ids.index(400001) < ids.index(300001)
    positions = [e["_pos"] for e in events]
    assert positions == sorted(positions)
    assert spilled >= 13001
    assert row is not None and row[0] >= 3, (
        f"PostgreSQL must have streamed the large transactions (stream_txns, stream_bytes = {row})"
    )
    assert not list((tmp_path / "spill").glob("xid-*")), (
        "spill files are removed after commit/abort"
    )


def raise_rollback() -> None:
    raise psycopg.Rollback()


def test_streamed_updates_and_deletes_keep_old_rows_and_unchanged_toast(
    pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Updates (one leaving a TOASTed column unchanged) and deletes inside a streamed
    transaction, under REPLICA IDENTITY DEFAULT and FULL: the row changes are spilled as
    PostgreSQL sent them and decoded at Stream Commit, with their old rows and markers."""
    dsn = _dsn_with_small_work_mem(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for name in ("docs_key", "docs_full"):
            conn.execute(f"create table {name} (id int primary key, n int, body text)")
            conn.execute(f"alter table {name} alter column body set storage external")
        conn.execute("alter table docs_full replica identity full")
        settings = make_settings(
            dsn, kafka_bootstrap, topic_prefix, cdc_spill_dir=str(tmp_path / "spill")
        )
        body = "".join(f"{i:05d}" for i in range(1000))  # 5,000 bytes: stored out of line
        with running_daemon(settings):
            for name in ("docs_key", "docs_full"):
                conn.execute(
                    f"insert into {name} select g, 0, %s from generate_series(1, 400) g", (body,)
                )
            for name in ("docs_key", "docs_full"):  # the inserts are in Kafka
                table_events(kafka_bootstrap, topic_prefix, name, expect=400)
            before = _stream_txns(conn, settings.postgres.slot)
            with conn.transaction():  # large enough to be streamed
                for name in ("docs_key", "docs_full"):
                    conn.execute(f"update {name} set n = id where id <= 300")  # body unchanged
                    conn.execute(f"delete from {name} where id > 350")
                    conn.execute(f"update {name} set body = 'short' where id = 1")
            key_events = table_events(kafka_bootstrap, topic_prefix, "docs_key", expect=751)
            full_events = table_events(kafka_bootstrap, topic_prefix, "docs_full", expect=751)
            after = _stream_txns(conn, settings.postgres.slot)
    assert after > before, f"the transaction must have been streamed ({before}, {after})"
    for events, full in ((key_events, False), (full_events, True)):
        streamed = events[400:]
        assert [e["op"] for e in streamed] == ["u"] * 300 + ["d"] * 50 + ["u"]
        first = streamed[0]
        assert first["after"]["id"] == 1 and first["after"]["n"] == 1
        assert first["after"]["body"] is None and first["unchanged"] == ["body"]
        deleted = streamed[300]
        assert deleted["_key"] == {"id": 351}
        if full:
            assert first["before"] == {"id": 1, "n": 0, "body": body}
            assert deleted["before"] == {"id": 351, "n": 0, "body": body}
        else:
            assert first["before"] is None
            assert deleted["before"]["id"] == 351
        last = streamed[-1]
        assert last["after"] == {"id": 1, "n": 1, "body": "short"} and last["unchanged"] == []
    assert not list((tmp_path / "spill").glob("xid-*"))


def _stream_txns(conn: psycopg.Connection, slot: str) -> int:  # type: ignore[type-arg]
    row = conn.execute(
        "select stream_txns from pg_stat_replication_slots where slot_name = %s", (slot,)
    ).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0
