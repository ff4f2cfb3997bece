"""Replica identities, tables without a primary key, ALTER TABLE mid-stream."""

from __future__ import annotations

import psycopg

from devtools.cdc_demo import read_schemas
from tests.cdc.cdc_support import make_settings, running_daemon, table_events


def test_replica_identities(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table rid_default (id int primary key, v text, w int)")
        conn.execute("create table rid_full (id int primary key, v text, w int)")
        conn.execute("alter table rid_full replica identity full")
        conn.execute("create table rid_index (id int not null, code text not null, v text)")
        conn.execute("create unique index rid_index_code on rid_index (code)")
        conn.execute("alter table rid_index replica identity using index rid_index_code")
        conn.execute("create table rid_pk_index (id int primary key, code text not null unique)")
        conn.execute("alter table rid_pk_index replica identity using index rid_pk_index_code_key")
        conn.execute("create table nopk (a int, b text)")
        conn.execute("alter table nopk replica identity full")
        conn.execute("create table rid_nothing (id int primary key, v text)")
        conn.execute("alter table rid_nothing replica identity nothing")
        settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix)
        with running_daemon(settings):
            for t in ("rid_default", "rid_full"):
                conn.execute(f"insert into {t} values (1, 'a', 1)")
                conn.execute(f"update {t} set w = 2 where id = 1")
                conn.execute(f"update {t} set id = 10 where id = 1")
                conn.execute(f"delete from {t} where id = 10")
            conn.execute("insert into rid_index values (1, 'c1', 'x')")
            conn.execute("update rid_index set v = 'y' where code = 'c1'")
            conn.execute("delete from rid_index where code = 'c1'")
            conn.execute("insert into rid_pk_index values (1, 'c1')")
            conn.execute("delete from rid_pk_index where id = 1")
            conn.execute("insert into nopk values (1, 'x')")
            conn.execute("update nopk set b = 'y'")
            conn.execute("delete from nopk")
            conn.execute("insert into rid_nothing values (1, 'x')")
            d = table_events(kafka_bootstrap, topic_prefix, "rid_default", expect=4)
            f = table_events(kafka_bootstrap, topic_prefix, "rid_full", expect=4)
            i = table_events(kafka_bootstrap, topic_prefix, "rid_index", expect=3)
            pi = table_events(kafka_bootstrap, topic_prefix, "rid_pk_index", expect=2)
            n = table_events(kafka_bootstrap, topic_prefix, "nopk", expect=3)
            z = table_events(kafka_bootstrap, topic_prefix, "rid_nothing", expect=1)
    # DEFAULT: no before image for a plain update; the old key when the key changes; key-only before on delete
    assert [e["op"] for e in d] == ["c", "u", "u", "d"]
    assert d[1]["before"] is None and d[1]["after"]["w"] == 2
    assert d[2]["before"]["id"] == 1 and d[2]["after"]["id"] == 10 and d[2]["_key"] == {"id": 10}
    assert d[3]["before"]["id"] == 10 and d[3]["before"]["v"] is None and d[3]["_key"] == {"id": 10}
    # FULL: whole before images, key is still the primary key only
    assert f[1]["before"] == {"id": 1, "v": "a", "w": 1} and f[1]["before_kind"] == "full"
    assert d[3]["before_kind"] == "key"
    assert f[3]["before"] == {"id": 10, "v": "a", "w": 2}
    assert all(e["_key"] in ({"id": 1}, {"id": 10}) for e in f)
    # USING INDEX: key = the identity index columns (no primary key)
    assert [e["_key"] for e in i] == [{"code": "c1"}] * 3
    assert i[2]["before"]["code"] == "c1"
    # USING INDEX with a primary key on other columns: the key is the index, what a delete
    # carries (a key of the primary key would be null there)
    assert [e["_key"] for e in pi] == [{"code": "c1"}] * 2
    assert pi[1]["before"] == {"id": None, "code": "c1"}
    # no primary key, FULL: no Kafka key, full before image
    assert [e["_key"] for e in n] == [None, None, None]
    assert n[1]["before"] == {"a": 1, "b": "x"} and n[2]["before"] == {"a": 1, "b": "y"}
    # NOTHING: inserts still flow
    assert z[0]["after"] == {"id": 1, "v": "x"}


def test_alter_table_mid_stream(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table evo (id int primary key, a text, b int)")
        # the streamed events' schemas only: the re-reads these DDLs cause (op r) are
        # tested in test_cdc_ddl_resync.py
        settings = make_settings(
            pg_dsn, kafka_bootstrap, topic_prefix, cdc_resnapshot_on_ddl="false"
        )
        with running_daemon(settings):
            conn.execute("insert into evo values (1, 'one', 1)")
            conn.execute(
                "alter table evo add column c timestamptz default '2024-01-01 00:00:00+00'"
            )
            conn.execute("insert into evo values (2, 'two', 2)")
            conn.execute("alter table evo drop column b")
            conn.execute("insert into evo values (3, 'three')")
            conn.execute("alter table evo rename column a to name")
            conn.execute("insert into evo values (4, 'four')")
            conn.execute("alter table evo alter column id type bigint")
            with conn.transaction():
                conn.execute("insert into evo values (5, 'five')")
                conn.execute("alter table evo add column d int")
                conn.execute("insert into evo values (6, 'six', null, 6)")
            events = table_events(kafka_bootstrap, topic_prefix, "evo", expect=6)
    assert [e["after"]["id"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert set(events[0]["after"]) == {"id", "a", "b"}
    assert set(events[1]["after"]) == {"id", "a", "b", "c"}
    assert set(events[2]["after"]) == {"id", "a", "c"}
    assert events[3]["after"]["name"] == "four" and "a" not in events[3]["after"]
    assert set(events[5]["after"]) == {"id", "name", "c", "d"} and events[5]["after"]["d"] == 6
    registry = read_schemas(kafka_bootstrap, topic_prefix)
    # at least one value schema per distinct column set, all still readable
    assert len(registry) >= 5
