"""Bucket engine end to end: PostgreSQL → cdc daemon → broker → engine → bucket store.

The captured database is ``pg_dsn``; the store lives in a second database on the same
server.  Expected bucket contents are always recomputed from the captured database with
the rules, and compared with what a device replaying the store's op logs from cursor 0
would hold (rows and checksums).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from core.row_wire import CHECKSUM_MODULUS, canonical_json, json_value, row_checksum, row_key_text
from relay.downstream.bucket_engine import BucketEngine, SchemaLog
from relay.downstream.bucket_store import ChangeKind, OpKind
from relay.downstream.event_decoder import EventDecoder
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.pg_store_schema import SCHEMA
from relay.downstream.rules import Rules, parse_bucket_id
from relay.downstream.rules_parser import load_rules
from relay.downstream.table_infos import table_infos_from_catalog, table_infos_from_registry
from tests.cdc.cdc_support import make_settings, running_daemon, wait_for
from tests.relay.downstream.test_schema_kinds import TYPES, USER_TYPES

RULES_TOML = """
token_claims = ["technician"]

[[bucket]]
name = "tech"
parameters = ["t"]
claims = { t = "technician" }

[[bucket.table]]
table = "public.work_orders"
match = { technician = "t" }
filters = [ { column = "status", op = "!=", value = "cancelled" } ]
exclude = ["cost"]

[[bucket]]
name = "all_open"

[[bucket.table]]
table = "public.work_orders"
filters = [ { column = "status", op = "=", value = "open" } ]
columns = ["status"]
"""

DDL = (
    "create table work_orders (id int primary key, technician text, "
    "status text not null default 'open', notes text, cost numeric(10,2))"
)


def make_rules(tmp_path: Path, pg_dsn: str) -> Rules:
    path = tmp_path / "rules.toml"
    path.write_text(RULES_TOML)
    return load_rules(path, table_infos_from_catalog(pg_dsn))


def expected(conn: psycopg.Connection[Any], rules: Rules) -> dict[str, dict[str, str]]:
    """bucket → {row_key: data_json} as the rules place the captured database's rows now."""
    out: dict[str, dict[str, str]] = {}
    cur = conn.execute("select id, technician, status, notes, cost from work_orders")
    names = [d.name for d in cur.description or ()]
    for values in cur.fetchall():
        row = dict(zip(names, values, strict=True))
        key = row_key_text(rules.key_of("public.work_orders", row))
        for bucket in rules.buckets_for_row("public.work_orders", row):
            projected = rules.project("public.work_orders", parse_bucket_id(bucket)[0], row)
            out.setdefault(bucket, {})[key] = canonical_json(json_value(projected))
    return out


def replay(store: PgBucketStore, buckets: list[str]) -> dict[str, dict[str, str]]:
    """What a device holds after reading every op of ``buckets`` from cursor 0, in pages."""
    held: dict[str, dict[str, str]] = {b: {} for b in buckets}
    cursors = dict.fromkeys(buckets, 0)
    while True:
        page = store.read_ops(cursors, limit=3)
        for op in page.ops:
            if op.kind is OpKind.PUT:
                assert op.data_json is not None
                held[op.bucket][op.row_key] = op.data_json
            else:
                held[op.bucket].pop(op.row_key, None)
        cursors = dict(page.cursors)
        if not page.has_more:
            break
    for b, cp in page.checkpoints.items():
        assert cursors[b] == cp.last_op_id
        assert cp.count == len(held[b])
        mine = sum(
            row_checksum("public.work_orders", k, canonical_data(v)) for k, v in held[b].items()
        )
        assert cp.checksum == mine % CHECKSUM_MODULUS, f"checksum of {b}"
    return {b: rows for b, rows in held.items() if rows}


def canonical_data(data_json: str) -> dict[str, Any]:
    import json

    parsed: dict[str, Any] = json.loads(data_json)
    assert canonical_json(parsed) == data_json
    return parsed


def all_buckets(store: PgBucketStore) -> list[str]:
    with psycopg.connect(store.dsn) as conn:
        return [r[0] for r in conn.execute(f"select bucket from {SCHEMA}.buckets").fetchall()]


def engine_for(store: PgBucketStore, rules: Rules, bootstrap: str, prefix: str) -> BucketEngine:
    return BucketEngine(
        store, rules, kafka={"bootstrap_servers": bootstrap}, prefix=prefix, batch_max_events=7
    )


def settle(
    engine: BucketEngine, conn: psycopg.Connection[Any], rules: Rules, what: str
) -> dict[str, dict[str, str]]:
    """Run the engine until the store matches the captured database."""
    want = expected(conn, rules)

    def matches() -> bool:
        engine.run_until_idle(timeout=5)
        return replay(engine.store, all_buckets(engine.store)) == want

    wait_for(matches, timeout=30, interval=0.1, what=what)
    return want


def test_engine_follows_every_kind_of_change(
    tmp_path: Path, pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(DDL)
        conn.execute(
            "insert into work_orders values (1, 't1', 'open', 'a', 10), (2, 't1', 'open', 'b', 20), "
            "(3, 't2', 'open', 'c', 30), (4, 't3', 'cancelled', 'd', 1), (6, null, 'done', 'e', 2)"
        )
        rules = make_rules(tmp_path, pg_dsn)
        settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix)
        store = PgBucketStore(store_dsn)
        engine = engine_for(store, rules, kafka_bootstrap, topic_prefix)
        with running_daemon(settings):
            # snapshot rows
            held = settle(engine, conn, rules, "snapshot rows in their buckets")
            assert set(held) == {'tech["t1"]', 'tech["t2"]', "all_open[]"}
            assert set(held['tech["t1"]']) == {"[1]", "[2]"}
            assert (
                held['tech["t1"]']["[1]"]
                == '{"id":1,"notes":"a","status":"open","technician":"t1"}'
            )
            assert held["all_open[]"]["[3]"] == '{"id":3,"status":"open"}'

            conn.execute("insert into work_orders values (5, 't2', 'open', 'x', 5)")
            held = settle(engine, conn, rules, "insert")
            assert "[5]" in held['tech["t2"]']

            conn.execute("update work_orders set technician = 't2' where id = 1")  # reassignment
            conn.execute("update work_orders set status = 'cancelled' where id = 3")  # filtered out
            conn.execute("delete from work_orders where id = 2")
            conn.execute("update work_orders set id = 50 where id = 5")  # key change
            conn.execute("update work_orders set notes = 'y' where id = 50")
            held = settle(engine, conn, rules, "updates, delete, key change")
            # made from their keys alone: the snapshot reads of rows 4 and 6 (in no bucket),
            # the update of row 3 out of every bucket and the delete of row 2
            assert engine.stats.skimmed == 4
            assert 'tech["t1"]' not in held
            assert set(held['tech["t2"]']) == {"[1]", "[50]"}
            ops_t1 = store.read_ops({'tech["t1"]': 0}, 100).ops
            assert [(o.kind, o.row_key) for o in ops_t1] == [
                (OpKind.PUT, "[1]"),
                (OpKind.PUT, "[2]"),
                (OpKind.REMOVE, "[1]"),
                (OpKind.REMOVE, "[2]"),
            ]
            ops_t2 = store.read_ops({'tech["t2"]': 0}, 100).ops
            assert [(o.kind, o.row_key) for o in ops_t2][-5:] == [
                (OpKind.PUT, "[1]"),
                (OpKind.REMOVE, "[3]"),
                (OpKind.REMOVE, "[5]"),
                (OpKind.PUT, "[50]"),
                (OpKind.PUT, "[50]"),
            ]

            # re-delivery: forget the offsets, read everything again: nothing changes
            before = _fingerprint(store)
            with psycopg.connect(store_dsn, autocommit=True) as sconn:
                sconn.execute(f"delete from {SCHEMA}.consumer_progress")
            store.release_leadership()
            again = engine_for(store, rules, kafka_bootstrap, topic_prefix)
            stats = again.run_until_idle(timeout=20)
            again.close()
            assert stats.records >= 11 and stats.ops == 0
            # rows 4 and 6 were never in a bucket: no state, nothing to skip
            assert stats.duplicates == stats.changes - 2
            assert _fingerprint(store) == before

            # truncate, then a new row
            conn.execute("truncate work_orders")
            conn.execute("insert into work_orders values (7, 't1', 'open', 'z', 1)")
            engine = engine_for(store, rules, kafka_bootstrap, topic_prefix)
            held = settle(engine, conn, rules, "truncate then insert")
            assert held == {
                'tech["t1"]': {"[7]": held['tech["t1"]']["[7]"]},
                "all_open[]": held["all_open[]"],
            }
            state = store.bucket_state(['tech["t2"]'])['tech["t2"]']
            assert (state.count, state.checksum) == (0, 0)

            # re-delivery across the truncate changes nothing either
            before = _fingerprint(store)
            with psycopg.connect(store_dsn, autocommit=True) as sconn:
                sconn.execute(f"delete from {SCHEMA}.consumer_progress")
            engine.close()
            store.release_leadership()
            again = engine_for(store, rules, kafka_bootstrap, topic_prefix)
            stats = again.run_until_idle(timeout=20)
            again.close()
            assert stats.ops == 0 and _fingerprint(store) == before

            # a second relay process sees exactly the same
            other = PgBucketStore(store_dsn)
            try:
                buckets = all_buckets(store)
                cursors = dict.fromkeys(buckets, 0)
                assert other.read_ops(cursors, 1000) == store.read_ops(cursors, 1000)
                assert other.bucket_state(buckets) == store.bucket_state(buckets)
            finally:
                other.close()

            # compaction keeps checksums and what a device ends up with
            before_rows = replay(store, all_buckets(store))
            states = store.bucket_state(all_buckets(store))
            result = store.compact()
            assert result.ops_deleted > 0
            assert store.bucket_state(all_buckets(store)) == states
            assert replay(store, all_buckets(store)) == before_rows
    store.close()


def _fingerprint(store: PgBucketStore) -> tuple[Any, ...]:
    buckets = sorted(all_buckets(store))
    stats = store.stats()
    return (stats["head_op_id"], stats["ops"], store.bucket_state(buckets))


def test_schema_helpers_and_decoder(
    tmp_path: Path, pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Table infos from the _schemas topic equal the catalog's; odd column names map back."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(DDL)
        conn.execute('create table "odd" ("Weird Col" text, "id" int primary key)')
        conn.execute("insert into work_orders values (1, 't1', 'open', 'a', 10)")
        conn.execute("""insert into odd values ('v', 1)""")
        conn.execute("create domain day as date")
        conn.execute(
            "create table dated (id int primary key, d date, ts timestamp, tz timestamptz, "
            "t time, dd day, n text)"
        )
        conn.execute("insert into dated (id) values (1)")
        conn.execute(USER_TYPES)  # a column of each type, and their kinds (test_schema_kinds)
        typed = ", ".join(f"c{i} {typ}" for i, (typ, _) in enumerate(TYPES))
        conn.execute(f"create table kinds_all (id int primary key, {typed})")
        conn.execute("insert into kinds_all (id) values (1)")
        settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix)
        with running_daemon(settings):
            log = SchemaLog({"bootstrap_servers": kafka_bootstrap}, topic_prefix)
            try:
                wait_for(lambda: log.refresh() >= 0 and len(log.registry) >= 4, what="schemas")
                infos = table_infos_from_registry(log.registry)
                catalog = table_infos_from_catalog(pg_dsn)
                assert infos["public.work_orders"] == catalog["public.work_orders"]
                assert infos["public.odd"] == catalog["public.odd"]
                wait_for(
                    lambda: (
                        log.refresh() >= 0
                        and "public.dated" in table_infos_from_registry(log.registry)
                    ),
                    what="the dated table's schema",
                )
                dated = table_infos_from_registry(log.registry)["public.dated"]
                assert dated == catalog["public.dated"]
                assert dated.temporal == (
                    ("d", "date"),
                    ("ts", "timestamp"),
                    ("tz", "timestamptz"),
                    ("t", "time"),
                    ("dd", "date"),
                )
                wait_for(
                    lambda: (
                        log.refresh() >= 0
                        and "public.kinds_all" in table_infos_from_registry(log.registry)
                    ),
                    what="the kinds_all table's schema",
                )
                kinds = table_infos_from_registry(log.registry)["public.kinds_all"].kinds
                assert kinds == catalog["public.kinds_all"].kinds
                assert kinds == (("id", "int"), *((f"c{i}", k) for i, (_, k) in enumerate(TYPES)))
                rules = make_rules(tmp_path, pg_dsn)
                from tests.cdc.cdc_support import table_events  # noqa: F401  (schema sanity)
                from tests.fix_kafka import read_topic

                records = read_topic(kafka_bootstrap, f"{topic_prefix}.public.odd", expect=1)
                from relay.downstream.rules_parser import rules_from_mapping

                odd_rules = rules_from_mapping(
                    {"bucket": [{"name": "g", "table": [{"table": "public.odd"}]}]}, catalog
                )
                change = EventDecoder(log.registry, odd_rules).change(records[0].value)
                assert change.kind is ChangeKind.UPSERT and change.key == (1,)
                assert change.row == {"Weird Col": "v", "id": 1}
                assert change.insert is False  # a snapshot read
                assert rules.tables == frozenset({"public.work_orders"})
            finally:
                log.close()


def test_standby_takes_over_and_long_poll_wakes(
    tmp_path: Path, pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Two engines on one store: one leads, the other stands by and takes over when the
    first stops; a long-poll in a third store client wakes when its bucket changes."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(DDL)
        rules = make_rules(tmp_path, pg_dsn)
        settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix)
        stores = [PgBucketStore(store_dsn) for _ in range(3)]
        engines = [
            BucketEngine(
                s,
                rules,
                kafka={"bootstrap_servers": kafka_bootstrap},
                prefix=topic_prefix,
                standby_retry_s=0.2,
                topic_refresh_s=0.5,
            )
            for s in stores[:2]
        ]
        threads = [threading.Thread(target=e.run, daemon=True) for e in engines]
        try:
            with running_daemon(settings):
                threads[0].start()
                assert engines[0].leading.wait(60)
                threads[1].start()
                time.sleep(1.0)
                assert not engines[1].leading.is_set()

                reader = stores[2]
                reader.migrate()
                woke: list[float] = []

                def long_poll() -> None:
                    t0 = time.monotonic()
                    reader.wait_for_change(
                        ['tech["t9"]'], reader.read_ops({'tech["t9"]': 0}, 1).head_op_id, 120
                    )
                    woke.append(time.monotonic() - t0)

                poller = threading.Thread(target=long_poll, daemon=True)
                poller.start()
                wait_for(lambda: reader.waiting('tech["t9"]') >= 1, what="the long-poll waiting")
                conn.execute("insert into work_orders values (1, 't1', 'open', 'a', 1)")
                wait_for(
                    lambda: reader.bucket_state(['tech["t1"]'])['tech["t1"]'].count == 1, what="t1"
                )
                time.sleep(0.5)
                assert not woke, "a change in another bucket must not wake the long-poll"
                conn.execute("insert into work_orders values (2, 't9', 'open', 'b', 1)")
                poller.join(90)
                assert woke and woke[0] < 90  # woken by the change, not the end of its 120 s

                engines[0].request_stop()
                threads[0].join(20)
                assert engines[1].leading.wait(60), "the standby engine took over"
                conn.execute("insert into work_orders values (3, 't9', 'open', 'c', 1)")
                wait_for(
                    lambda: reader.bucket_state(['tech["t9"]'])['tech["t9"]'].count == 2,
                    what="t9 after takeover",
                )
                assert replay(reader, all_buckets(reader)) == expected(conn, rules)
        finally:
            for e in engines:
                e.request_stop()
            for t in threads:
                t.join(20)
            for s in stores:
                s.close()
