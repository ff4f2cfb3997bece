"""Every supported PostgreSQL type through live pgoutput → Avro → Kafka → decoded."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import psycopg

from tests.cdc.cdc_support import make_settings, running_daemon, table_events

DDL = """
create type mood as enum ('sad', 'ok', 'happy');
create domain posint as int check (value > 0);
create table typed (
    id int primary key,
    b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
    n numeric(12,3), nu numeric, t text, vc varchar(20), ch char(3), by bytea,
    d date, tm time, ts timestamp, tz timestamptz, iv interval, u uuid,
    j json, jb jsonb, e mood, dm posint,
    ai int[], at text[], an numeric[], aj jsonb[], ae mood[], ad date[]
);
"""

ROW = """
insert into typed values (
    1, true, -32768, 2147483647, -9223372036854775808, 1.5, -2.25e300,
    123456789.125, 'NaN', 'héllo ☃', 'var', 'ab', '\\xdeadbeef',
    '2024-02-29', '23:59:59.999999', '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05.123456+05:30',
    '1 year 2 mons 3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
    '{"a": [1, 2]}', '{"b": null}', 'happy', 7,
    '{1,NULL,3}', '{"with \\"quote\\"","back\\\\slash",NULL,"x,y"}', '{1.5,NaN}', array['{"k":1}'::jsonb], '{sad,happy}', '{2020-01-01,infinity}'
);
insert into typed (id, d, ts, tz, n, nu, f8) values (2, 'infinity', '-infinity', 'infinity', 'NaN', '1e-30', 'Infinity');
insert into typed (id) values (3);
"""


def _after(events: list[dict[str, Any]], key: int) -> dict[str, Any]:
    return next(e["after"] for e in events if e["after"] and e["after"]["id"] == key)


def test_types_round_trip(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(DDL)
        settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix)
        with running_daemon(settings):
            conn.execute(ROW)
            events = table_events(kafka_bootstrap, topic_prefix, "typed", expect=3)
    assert [e["op"] for e in events] == ["c", "c", "c"]
    r = _after(events, 1)
    assert (
        r["b"] is True
        and r["i2"] == -32768
        and r["i4"] == 2147483647
        and r["i8"] == -9223372036854775808
    )
    assert r["f4"] == 1.5 and r["f8"] == -2.25e300
    assert r["t"] == "héllo ☃" and r["vc"] == "var" and r["ch"] == "ab "
    assert r["by"] == b"\xde\xad\xbe\xef"
    assert str(r["u"]) == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11" or r["u"] == uuid.UUID(
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    )
    assert r["e"] == "happy" and r["dm"] == 7
    assert r["ai"] == [1, None, 3]
    assert r["at"] == ['with "quote"', "back\\slash", None, "x,y"]
    # exact numeric, never a float; unconstrained numeric as its exact text (docs/events.md)
    assert r["n"] == decimal.Decimal("123456789.125")
    assert r["nu"] == "NaN" and r["an"] == ["1.5", "NaN"]
    assert _date(r["d"]) == dt.date(2024, 2, 29)
    assert r["tm"] == 86_399_999_999
    assert r["ts"] == 1704164645123456  # local-timestamp-micros: wall clock as if UTC
    assert r["tz"] == 1704144845123456  # 2024-01-01 21:34:05.123456 UTC
    assert r["iv"] == {"months": 14, "days": 3, "micros": 14_706_789_000}
    assert r["j"] == '{"a": [1, 2]}' and r["jb"] == '{"b": null}' and r["aj"] == ['{"k": 1}']
    assert r["ae"] == ["sad", "happy"] and r["ad"] == [18262, "INFINITY"]
    row3 = _after(events, 3)
    assert all(v is None for k, v in row3.items() if k != "id"), "NULL stays NULL"
    row2 = _after(events, 2)
    assert row2["nu"] == "0.000000000000000000000000000001"
    assert row2["n"] == "NAN" and row2["f8"] == float("inf")
    assert (row2["d"], row2["ts"], row2["tz"]) == ("INFINITY", "NEG_INFINITY", "INFINITY")


def _date(v: Any) -> Any:
    if isinstance(v, int):
        return dt.date(1970, 1, 1) + dt.timedelta(days=v)
    return v


def test_unchanged_toast_is_not_null(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    big = "x" * 100_000  # TOASTed (compressed out of line)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table docs (id int primary key, body text, n int)")
        conn.execute("alter table docs alter column body set storage external")
        settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix)
        with running_daemon(settings):
            conn.execute("insert into docs values (1, %s, 0)", (big,))
            conn.execute("update docs set n = 1 where id = 1")
            conn.execute("update docs set body = null, n = 2 where id = 1")
            events = table_events(kafka_bootstrap, topic_prefix, "docs", expect=3)
    ins, upd, upd_null = events
    assert ins["after"]["body"] == big
    assert upd["unchanged"] == ["body"] and upd["after"]["n"] == 1
    assert upd_null["unchanged"] == [] and upd_null["after"]["body"] is None


def test_unknown_type_falls_back_to_text(
    pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, caplog
) -> None:  # type: ignore[no-untyped-def]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "create table odd (id int primary key, p point, addr inet, r int4range, tv tsvector)"
        )
        settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix)
        with caplog.at_level("WARNING"), running_daemon(settings):
            conn.execute("insert into odd values (1, '(1,2)', '10.0.0.1/8', '[1,5)', 'a fat cat')")
            events = table_events(kafka_bootstrap, topic_prefix, "odd", expect=1)
    assert events[0]["after"] == {
        "id": 1,
        "p": "(1,2)",
        "addr": "10.0.0.1/8",
        "r": "[1,5)",
        "tv": "'a' 'cat' 'fat'",
    }
    assert any("point" in r.getMessage() for r in caplog.records if r.levelname == "WARNING"), (
        "a warning names the unmapped type"
    )


def test_snapshot_reads_equal_stream_events_for_every_type(
    pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The same row read by the initial snapshot and sent by pgoutput decodes to the same values."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(DDL)
        conn.execute("alter table typed add column ip inet, add column flag bool")
        conn.execute(ROW)
        conn.execute("update typed set ip = '10.1.2.3', flag = false")
        settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix)
        with running_daemon(settings):
            # the same rows again, through the stream, under new keys
            conn.execute(
                "insert into typed select id + 100, b, i2, i4, i8, f4, f8, n, nu, t, vc, ch, by, d, tm, ts, tz, iv, u, j, jb, e, dm, ai, at, an, aj, ae, ad, ip, flag from typed"
            )
            events = table_events(kafka_bootstrap, topic_prefix, "typed", expect=6)
    snap = {e["after"]["id"]: e["after"] for e in events if e["op"] == "r"}
    stream = {e["after"]["id"] - 100: e["after"] for e in events if e["op"] == "c"}
    assert set(snap) == set(stream) == {1, 2, 3}
    for key in snap:
        s, c = dict(snap[key]), dict(stream[key])
        s.pop("id"), c.pop("id")
        assert s == c, key
    assert snap[1]["flag"] is False and snap[1]["ip"] == "10.1.2.3" and snap[1]["ch"] == "ab "
