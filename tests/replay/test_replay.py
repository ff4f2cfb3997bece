"""Audit replay against the real PostgreSQL and broker, with the real cdc daemon writing
the log: row history with origins and journal outcomes, as-of by time and position in
every format, export ranges and follow, verify (agreement and detected differences),
schema versions, truncates, snapshot reads, re-delivered duplicates, tombstones, a
multi-partition merge, and the errors (unknown table, empty range, broker down)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from core.avro_envelope import POSITION_HEADER, Source, TableCodec, position_header
from core.hlc import Hlc
from core.journal_format import JournalRecord, Reason, entry_from_json
from core.journal_outcomes import Outcome, OutcomeKind, encode_outcomes
from core.pg_types import ColumnSpec, MappingCatalog
from replay.bounds import MAX_SEQ, Bound, format_position, parse_bound, parse_position, parse_time
from replay.catalog import LogCatalog
from replay.cli import (
    EXIT_DIFFERENCES,
    EXIT_EMPTY,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    app,
)
from replay.errors import NoEvents
from replay.keys import KeySpec
from replay.log_reader import LogReader
from replay.log_source import LogSource
from replay.output import read_csv
from replay.state import LogState, state_as_of
from tests.cdc.cdc_support import make_settings, running_daemon, table_events, wait_for
from tests.fix_kafka import read_topic
from tests.schemas import REPO


class Env:
    """A captured database, a topic prefix, a cdc config file for the CLI."""

    def __init__(self, dsn: str, bootstrap: str, prefix: str, tmp: Path) -> None:
        self.dsn, self.bootstrap, self.prefix, self.tmp = dsn, bootstrap, prefix, tmp
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.config = tmp / "cdc.toml"
        self.config.write_text(
            f"[postgres]\ndsn = {json.dumps(dsn)}\nstatus_interval_s = 1\n"
            f"[kafka]\nbootstrap_servers = {json.dumps(bootstrap)}\n"
            f"topic_prefix = {json.dumps(prefix)}\ntimeout_s = 10\n"
        )
        self.settings = make_settings(dsn, bootstrap, prefix)
        self.source = LogSource({"bootstrap_servers": bootstrap}, prefix, timeout_s=10)
        self._producer: Any = None

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []

    def cli(self, *args: str, code: int = 0) -> Any:
        result = CliRunner().invoke(app, [*args, "--config", str(self.config)])
        assert result.exit_code == code, (
            f"exit {result.exit_code} (expected {code}); stdout: {result.stdout}\n"
            f"stderr: {result.stderr}\n{result.exception!r}"
        )
        return result

    def events(self, table: str, expect: int) -> list[dict[str, Any]]:
        return table_events(self.bootstrap, self.prefix, table, expect=expect, timeout=30)

    def producer(self) -> Any:
        from kafka import KafkaProducer

        if self._producer is None:
            self._producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        return self._producer

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
        self.conn.close()


@pytest.fixture
def env(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Iterator[Env]:
    e = Env(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    try:
        yield e
    finally:
        e.close()


def pos_text(event: dict[str, Any]) -> str:
    return format_position(event["_pos"])


def commit_time(event: dict[str, Any]) -> str:
    us = event["source"]["commit_ts_us"]
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us // 1_000_000)) + f".{us % 1_000_000:06d}Z"
    )


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# --------------------------------------------------------------------------- pure parts


def test_positions_and_times_parse_and_print() -> None:
    assert parse_position("16/B374D848:3") == ((0x16 << 32) | 0xB374D848, 3)
    assert parse_position("0/10") == (16, 0)
    assert parse_position("0/10", end=True) == (16, MAX_SEQ)
    assert format_position((0x16 << 32 | 0xB374D848, 3)) == "16/B374D848:3"
    assert parse_time("1970-01-01T00:00:01Z") == 1_000_000
    assert parse_time("1970-01-01 02:00:00.5+02:00") == 500_000
    assert parse_time("1970-01-01T00:00:00") == 0  # no zone: UTC
    assert parse_bound("0/10:2").position == (16, 2)
    assert parse_bound("2024-01-01T00:00:00Z").time_us == parse_time("2024-01-01T00:00:00Z")
    with pytest.raises(ValueError, match="not a position"):
        parse_position("12345")
    with pytest.raises(ValueError, match="not a time"):
        parse_time("yesterday")


def test_key_spec_forms() -> None:
    assert KeySpec.parse("42").matches({"id": 42})
    assert KeySpec.parse('"42"').matches({"id": 42})
    assert not KeySpec.parse("43").matches({"id": 42})
    assert KeySpec.parse('[1, "x"]').matches({"a": 1, "b": "x"})
    assert not KeySpec.parse('["x", 1]').matches({"a": 1, "b": "x"})
    assert KeySpec.parse('{"b": "x", "a": 1}').matches({"a": 1, "b": "x"})
    assert KeySpec.parse("12.5").matches({"price": "12.50"})
    assert KeySpec.parse("abc").matches({"code": "abc"})


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.one_of(st.none(), st.text(max_size=12)), min_size=3, max_size=3),
        max_size=6,
    )
)
def test_csv_keeps_null_apart_from_empty_text(
    tmp_path_factory: Any, rows: list[list[str | None]]
) -> None:
    from replay.output import csv_line

    path = tmp_path_factory.mktemp("csv") / "t.csv"
    path.write_text(
        csv_line(["a", "b", "c"]) + "".join(csv_line(r) for r in rows),
        encoding="utf-8",
        newline="",
    )
    got = read_csv(path)
    assert [[r["a"], r["b"], r["c"]] for r in got] == rows


CODEC_COLUMNS = [
    ColumnSpec("id", 20, -1, True),
    ColumnSpec("v", 25, -1, False),
]


def _codec(prefix: str, columns: list[ColumnSpec] = CODEC_COLUMNS, table: str = "t") -> TableCodec:
    return TableCodec(
        db="app",
        schema="public",
        table=table,
        columns=columns,
        catalog=MappingCatalog(),
        unchanged_sentinel=UNCHANGED,
        warn=lambda _m: None,
        namespace_prefix=prefix,
    )


UNCHANGED = object()

ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["c", "u", "d", "t", "k"]),  # k: update that changes the key
        st.integers(1, 5),
        st.integers(1, 5),
        st.text(max_size=3),
        st.booleans(),  # update: leave v out (unchanged TOAST)
    ),
    max_size=40,
)


@settings(max_examples=80, deadline=None)
@given(ops_strategy)
def test_state_follows_a_model_of_the_table(ops: list[tuple[str, int, int, str, bool]]) -> None:
    """Applying decoded events gives the rows a dict model of the table has."""
    from core.avro_envelope import decode
    from replay.events import ChangeEvent

    codec = _codec("p")
    catalog = LogCatalog("p")
    catalog.add(codec.value_schema_json)
    assert codec.key_schema_json is not None
    catalog.add(codec.key_schema_json)
    state = LogState(catalog, ["public.t"])
    model: dict[int, str] = {}
    lsn = 100
    for op, k, k2, v, toast in ops:
        lsn += 1
        source = Source("app", "public", "t", lsn, lsn, 1, 0, lsn)
        if op == "t":
            key, value = None, codec.encode_truncate(source, 0)
            model.clear()
        elif op == "c":
            if k in model:
                continue
            key, value = codec.encode_change("c", None, [str(k), v], source, 0)
            model[k] = v
        elif op == "u":
            if k not in model:
                continue
            key, value = codec.encode_change(
                "u", None, [str(k), UNCHANGED if toast else v], source, 0
            )
            model[k] = model[k] if toast else v
        elif op == "k":
            if k not in model or k2 in model or k == k2:
                continue
            key, value = codec.encode_change("u", [str(k), None], [str(k2), v], source, 0)
            del model[k]
            model[k2] = v
        else:
            if k not in model:
                continue
            key, value = codec.encode_change("d", [str(k), None], None, source, 0)
            del model[k]
        d = decode(value, catalog.registry)
        state.apply(
            ChangeEvent(
                "public.t",
                (lsn, 0),
                d["op"],
                d["before"],
                d["after"],
                d["before_kind"],
                d["unchanged"],
                d["source"],
                value[2:10],
                "p.public.t",
                0,
                lsn,
                key_fingerprint=None if key is None else key[2:10],
            )
        )
    rows = {r.values["id"]: r.values["v"] for r in state.tables["public.t"].rows.values()}
    assert rows == model


# --------------------------------------------------------------------------- as-of, export

WORK_ORDERS = """
create table work_orders (
    id bigint primary key,
    site text not null,
    status text not null default 'open',
    cost numeric(10,2),
    due date,
    notes text
)
"""


def test_as_of_time_and_position_in_every_format(env: Env) -> None:
    env.sql(WORK_ORDERS)
    env.sql(
        "insert into work_orders values (1, 's1', 'open', 10.50, '2024-03-01', 'a, \"quoted\"'), (2, 's1', 'open', null, null, '')"
    )
    with running_daemon(env.settings):
        env.sql("update work_orders set status = 'done', cost = 12.00 where id = 1")
        env.sql("insert into work_orders values (3, 's2', 'open', 1.25, '1999-12-31', null)")
        first = env.events("work_orders", 4)
        time.sleep(1.2)  # commit times of the next transactions are clearly later
        env.sql("delete from work_orders where id = 2")
        env.sql("update work_orders set notes = 'later' where id = 3")
        events = env.events("work_orders", 6)
    assert [e["op"] for e in events] == ["r", "r", "u", "c", "d", "u"]
    cut = first[-1]
    expect = {
        1: {
            "id": "1",
            "site": "s1",
            "status": "done",
            "cost": "12.00",
            "due": "2024-03-01",
            "notes": 'a, "quoted"',
        },
        2: {"id": "2", "site": "s1", "status": "open", "cost": None, "due": None, "notes": ""},
        3: {
            "id": "3",
            "site": "s2",
            "status": "open",
            "cost": "1.25",
            "due": "1999-12-31",
            "notes": None,
        },
    }
    bounds = [("--position", pos_text(cut)), ("--time", commit_time(cut))]
    for flag, value in bounds:
        out = env.tmp / f"state{flag}.jsonl"
        env.cli("as-of", flag, value, "--table", "work_orders", "--out", str(out), "--quiet")
        rows = {r["key"]["id"]: r for r in jsonl(out)}
        assert sorted(rows) == [1, 2, 3]
        assert rows[1]["row"]["status"] == "done" and rows[1]["row"]["cost"] == "12.00"
        assert rows[1]["origin"] is None and rows[3]["position"] == pos_text(cut)
        assert rows[2]["row"]["notes"] == "" and rows[2]["row"]["cost"] is None

        csv_out = env.tmp / f"state{flag}.csv"
        env.cli("as-of", flag, value, "-t", "public.work_orders", "--out", str(csv_out), "-q")
        got = {
            r["id"]: {k: v for k, v in r.items() if not k.startswith("_")}
            for r in read_csv(csv_out)
        }
        assert got == {str(k): v for k, v in expect.items()}

        db_out = env.tmp / f"state{flag}.sqlite"
        env.cli(
            "as-of",
            flag,
            value,
            "-t",
            "work_orders",
            "--out",
            str(db_out),
            "--format",
            "sqlite",
            "-q",
        )
        with sqlite3.connect(db_out) as db:
            got_rows = db.execute(
                'select id, status, cost, due, notes, _position from "public.work_orders" order by id'
            ).fetchall()
            meta = dict(db.execute("select name, value from _replay").fetchall())
        assert got_rows == [
            (1, "done", "12.00", "2024-03-01", 'a, "quoted"', pos_text(first[2])),
            (2, "open", None, None, "", pos_text(first[1])),
            (3, "open", "1.25", "1999-12-31", None, pos_text(cut)),
        ]
        assert meta["as_of"] == value

    # the end of the log: row 2 deleted, row 3 updated
    out = env.tmp / "now.jsonl"
    env.cli("as-of", "--position", pos_text(events[-1]), "--out", str(out), "-q")
    rows = {r["key"]["id"]: r["row"] for r in jsonl(out)}
    assert sorted(rows) == [1, 3] and rows[3]["notes"] == "later"
    # before the first event: nothing to show
    result = env.cli(
        "as-of", "--time", "2000-01-01T00:00:00Z", "--out", str(out), "-q", code=EXIT_EMPTY
    )
    assert "no event" in result.stderr


def test_export_ranges_in_every_format(env: Env) -> None:
    env.sql("create table t (id int primary key, v text)")
    env.sql("create table u (id int primary key, w int)")
    with running_daemon(env.settings):
        for i in range(1, 6):
            env.sql("insert into t values (%s, %s)", i, f"v{i}")
            env.sql("insert into u values (%s, %s)", i, i * 10)
        env.sql("update t set v = 'x' where id = 2")
        t_events = env.events("t", 6)
        u_events = env.events("u", 5)
    every = sorted(t_events + u_events, key=lambda e: e["_pos"])
    lo, hi = every[2], every[7]
    out = env.tmp / "range.jsonl"
    env.cli("export", "--from", pos_text(lo), "--to", pos_text(hi), "--out", str(out), "-q")
    got = jsonl(out)
    assert [g["position"] for g in got] == [pos_text(e) for e in every[2:8]]
    assert {g["table"] for g in got} == {"public.t", "public.u"}
    assert got[0]["op"] == "c" and got[0]["after"] is not None

    # one table, by time; the update is the last event of t
    out_csv = env.tmp / "t.csv"
    env.cli("export", "-t", "t", "--from", commit_time(t_events[3]), "--out", str(out_csv), "-q")
    rows = read_csv(out_csv)
    assert [r["position"] for r in rows] == [pos_text(e) for e in t_events[3:]]
    assert json.loads(rows[-1]["after"] or "null") == {"id": 2, "v": "x"}
    assert rows[-1]["op"] == "u" and rows[-1]["origin"] is None

    state_dir = env.tmp / "state"
    env.cli(
        "as-of", "--position", pos_text(every[-1]), "--format", "csv", "--out", str(state_dir), "-q"
    )
    assert sorted(p.name for p in state_dir.iterdir()) == ["public.t.csv", "public.u.csv"]
    assert [r["w"] for r in read_csv(state_dir / "public.u.csv")] == ["10", "20", "30", "40", "50"]

    out_db = env.tmp / "all.sqlite"
    env.cli("export", "--out", str(out_db), "-q")
    with sqlite3.connect(out_db) as db:
        positions = [r[0] for r in db.execute("select position from events order by rowid")]
    assert positions == [pos_text(e) for e in every]

    # empty ranges
    result = env.cli(
        "export",
        "--from",
        pos_text(hi),
        "--to",
        pos_text(lo),
        "--out",
        str(out),
        "-q",
        code=EXIT_EMPTY,
    )
    assert "empty range" in result.stderr
    last = every[-1]["_pos"]
    beyond = format_position((last[0] + 1, 0))
    result = env.cli("export", "--from", beyond, "--out", str(out), "-q", code=EXIT_EMPTY)
    assert "no event" in result.stderr


# --------------------------------------------------------------------------- history


def journal_record(
    device: str, seq: int, op: str, key: list[Any], old: Any, new: Any
) -> JournalRecord:
    raw = {
        "seq": seq,
        "table": "public.work_orders",
        "op": op,
        "key": key,
        "old": old,
        "new": new,
        "base": {"commit_lsn": 1, "seq": 0},
        "hlc": Hlc(int(time.time() * 1000), 0, device).encode(),
        "prev_seq": None,
    }
    return JournalRecord(
        device, seq, entry_from_json(raw, device), {"sub": device}, None, int(time.time() * 1e6)
    )


def test_history_names_origins_and_device_edits_with_outcomes(env: Env) -> None:
    env.sql(WORK_ORDERS)
    producer = env.producer()
    with running_daemon(env.settings):
        env.sql(
            "insert into work_orders (id, site, notes) values (1, 's1', 'first'), (2, 's1', 'other')"
        )
        with env.conn.transaction():
            env.sql("select pg_logical_emit_message(true, 'fieldsync.origin', 'device:d1')")
            env.sql("update work_orders set status = 'done' where id = 1")
            env.sql("update work_orders set status = 'done' where id = 2")
        env.sql("update work_orders set notes = 'checked' where id = 1")
        with env.conn.transaction():
            env.sql("select pg_logical_emit_message(true, 'fieldsync.origin', 'device:d1')")
            env.sql("delete from work_orders where id = 1")
        events = env.events("work_orders", 6)
    old = {"id": 1, "site": "s1", "status": "open", "notes": "first"}
    records = [
        journal_record("d1", 1, "update", [1], old, {"status": "done"}),
        journal_record("d1", 2, "update", [2], {**old, "id": 2}, {"status": "done"}),
        journal_record("d2", 1, "update", [1], old, {"notes": "from d2"}),
        journal_record("d1", 3, "delete", [1], {**old, "status": "done", "notes": "checked"}, None),
    ]
    for r in records:
        producer.send(f"{env.prefix}._journal", key=r.kafka_key, value=r.to_bytes())
    row_done = {**old, "status": "done"}
    outcomes = [
        Outcome(
            "d1",
            1,
            OutcomeKind.APPLIED,
            "public.work_orders",
            (1,),
            row=row_done,
            columns={"status": "device"},
        ),
        Outcome(
            "d1", 2, OutcomeKind.APPLIED, "public.work_orders", (2,), row={**row_done, "id": 2}
        ),
        Outcome("d1", 3, OutcomeKind.APPLIED, "public.work_orders", (1,), row=None),
    ]
    producer.send(f"{env.prefix}._outcomes", key=b"d1", value=encode_outcomes(outcomes))
    rejected = Outcome(
        "d2",
        1,
        OutcomeKind.REJECTED,
        "public.work_orders",
        (1,),
        reason=Reason.FORBIDDEN_COLUMN.value,
        message="notes is not yours",
    )
    producer.send(f"{env.prefix}._outcomes", key=b"d2", value=encode_outcomes([rejected]))
    producer.flush()

    report = json.loads(
        env.cli("history", "--table", "work_orders", "--key", "1", "--format", "json", "-q").stdout
    )
    versions = report["versions"]
    assert [v["change"] for v in versions] == ["insert", "update", "update", "delete"]
    mine = [e for e in events if (e["after"] or e["before"])["id"] == 1]
    assert [v["position"] for v in versions] == [pos_text(e) for e in mine]
    assert [v["origin"]["kind"] for v in versions] == ["session", "device", "session", "device"]
    assert versions[0]["origin"]["txid"] == mine[0]["source"]["txid"]
    assert versions[1]["origin"]["device_id"] == "d1" and versions[1]["changed"] == ["status"]
    assert versions[1]["previous"]["status"] == "open" and versions[1]["row"]["status"] == "done"
    assert versions[1]["commit_time"] == commit_time(mine[1])
    assert versions[1]["journal"]["seq"] == 1 and versions[1]["journal"]["new"] == {
        "status": "done"
    }
    assert versions[1]["outcome"]["outcome"] == "applied"
    assert "journal" not in versions[2]
    assert (
        versions[3]["row"] is None
        and versions[3]["journal"]["seq"] == 3
        and versions[3]["journal"]["op"] == "delete"
    )
    unmatched = report["edits_without_version"]
    assert [(u["journal"]["device_id"], u["journal"]["seq"]) for u in unmatched] == [("d2", 1)]
    assert unmatched[0]["outcome"]["outcome"] == "rejected"

    text = env.cli("history", "-t", "public.work_orders", "-k", "1", "-q").stdout
    assert "device d1" in text and "database session" in text
    assert 'status: "open" → "done"' in text
    assert "outcome: applied" in text and "outcome: rejected, forbidden_column" in text
    assert "journal: d1 seq 3, delete" in text

    env.cli("history", "-t", "work_orders", "-k", "99", "-q", code=EXIT_EMPTY)
    result = env.cli("history", "-t", "nosuch", "-k", "1", "-q", code=EXIT_USAGE)
    assert "nosuch" in result.stderr and "public.work_orders" in result.stderr


# --------------------------------------------------------------------------- verify

TYPES_TABLE = """
create table kinds (
    id int primary key,
    b bool, i8 bigint, f8 float8, n numeric(12,3), nn numeric, t text, by bytea,
    d date, ts timestamp, tz timestamptz, iv interval, u uuid, j jsonb, arr int[]
)
"""


def test_verify_agrees_after_every_kind_of_change(env: Env) -> None:
    env.sql(TYPES_TABLE)
    env.sql("create table bag (v text)")  # no key columns: a multiset of rows
    typed = (
        "insert into kinds values (%s, true, 9007199254740993, 'NaN', 1.5, 3.14159265358979323846,"
        " 'x', '\\x00ff', 'infinity', '2024-01-01 10:00', '2024-01-01 10:00+02', '1 mon -2 days',"
        " gen_random_uuid(), '{\"a\": [1, 2]}', '{1,NULL,3}')"
    )
    env.sql(typed, 0)  # read by the snapshot
    env.sql("insert into bag values ('a'), ('a'), ('b')")
    with running_daemon(env.settings):
        env.sql(typed, 1)  # streamed
        env.sql("insert into kinds (id, t) select g, 'row ' || g from generate_series(2, 40) g")
        env.sql("update kinds set n = 2.25, f8 = 'Infinity' where id = 1")
        env.sql("delete from kinds where id between 10 and 14")
        env.sql("update kinds set id = 100 where id = 2")  # key change
        env.sql("insert into bag values ('c')")
        env.events("kinds", 2 + 39 + 1 + 5 + 1)
        result = env.cli("verify", "-q", "--wait", "30")
    assert "agree" in result.stderr and "2 tables, 40 rows" in result.stderr


def test_verify_reports_rows_postgresql_never_sent(env: Env) -> None:
    """Rows changed while the publication did not publish that kind of change are in
    PostgreSQL but not in the log (or the other way round): verify must say so."""
    env.sql("create table t (id int primary key, v text, n int)")
    env.sql("insert into t select g, 'v' || g, g from generate_series(1, 10) g")
    with running_daemon(env.settings):
        env.events("t", 10)
        env.cli("verify", "-q")
        publication = env.settings.postgres.publication
        env.sql(f"alter publication {publication} set (publish = 'insert, update, truncate')")
        env.sql("delete from t where id = 3")
        env.sql(f"alter publication {publication} set (publish = 'update, delete, truncate')")
        env.sql("insert into t values (99, 'ghost', 0)")
        env.sql(f"alter publication {publication} set (publish = 'insert, delete, truncate')")
        env.sql("update t set v = 'changed', n = -5 where id = 7")
        env.sql(
            f"alter publication {publication} set (publish = 'insert, update, delete, truncate')"
        )
        env.sql("update t set v = 'seen' where id = 8")
        env.events("t", 11)
        result = env.cli("verify", "-q", "--rechecks", "1", code=EXIT_DIFFERENCES)
        as_json = json.loads(
            env.cli("verify", "-q", "--json", "--rechecks", "0", code=EXIT_DIFFERENCES).stdout
        )
    out = result.stdout
    assert "public.t: 1 missing from the log, 1 only in the log, 1 different" in out
    assert "missing  id=99: in PostgreSQL, not in the log" in out
    assert "extra    id=3: in the log" in out
    assert (
        "differs  id=7" in out
        and "v: log 'v7', PostgreSQL 'changed'" in out
        and "n: log 7, PostgreSQL -5" in out
    )
    assert "3 rows differ" in result.stderr
    kinds = {(d["kind"], d["key"]["id"]) for d in as_json["differences"]}
    assert kinds == {("missing", 99), ("extra", 3), ("differs", 7)}
    assert as_json["ok"] is False and as_json["rows_compared"] == 10


# --------------------------------------------------------------------------- log shapes


def test_schema_versions_truncate_snapshot_duplicates_and_tombstones(env: Env) -> None:
    from kafka import KafkaProducer

    env.sql("create table s (id int primary key, a text, gone int)")
    env.sql("insert into s values (1, 'snap', 7), (2, 'snap', 8)")  # read by the snapshot
    # schema versions of streamed events only: no re-read after ADD COLUMN … DEFAULT
    # (test_cdc_ddl_resync.py covers those)
    settings = make_settings(env.dsn, env.bootstrap, env.prefix, cdc_resnapshot_on_ddl="false")
    with running_daemon(settings):
        env.sql("insert into s values (3, 'v1', 9)")
        env.sql("alter table s add column b numeric(6,2) default 1.5")
        env.sql("insert into s values (4, 'v2', 10, 2.25)")
        env.sql("alter table s drop column gone")
        env.sql("update s set a = 'v3' where id = 1")
        env.sql("alter table s alter column b type numeric(8,3)")
        env.sql("insert into s values (5, 'v4', 3.125)")
        cut = env.events("s", 6)[-1]
        env.sql("truncate s")
        env.sql("insert into s values (6, 'after truncate', null)")
        events = env.events("s", 8)
        assert [e["op"] for e in events] == ["r", "r", "c", "c", "u", "c", "t", "c"]
        catalog = env.source.catalog()
        assert len(catalog.tables["public.s"]) >= 4  # a schema version per shape

        # re-deliver some records (same position header), and add a tombstone
        records = read_topic(env.bootstrap, f"{env.prefix}.public.s")
        producer = KafkaProducer(bootstrap_servers=env.bootstrap, acks="all")
        try:
            for r in records[2:5] + records[-2:]:
                producer.send(
                    r.topic,
                    key=r.key,
                    value=r.value,
                    headers=list(r.headers),
                    partition=r.partition,
                )
            producer.send(
                records[0].topic, key=records[0].key, value=None, partition=records[0].partition
            )
            producer.flush()
        finally:
            producer.close()

        state, stats = state_as_of(env.source, ["s"], None)
        assert stats.duplicates == 5 and stats.tombstones == 1 and stats.events == 8
        rows = {r.values["id"]: r.values for r in state.tables["public.s"].rows.values()}
        assert list(rows) == [6] and rows[6]["a"] == "after truncate"

        out = env.tmp / "before-truncate.csv"
        env.cli("as-of", "--position", pos_text(cut), "-t", "s", "--out", str(out), "-q")
        got = {r["id"]: r for r in read_csv(out)}
        assert list(next(iter(got.values())))[:4] == [
            "id",
            "a",
            "b",
            "gone",
        ]  # newest columns first
        assert got["1"]["a"] == "v3" and got["1"]["gone"] is None and got["1"]["b"] == "1.50"
        assert (
            got["2"]["a"] == "snap" and got["2"]["gone"] == "8" and got["2"]["_commit_time"] is None
        )
        assert got["4"]["b"] == "2.25" and got["4"]["gone"] == "10"
        assert got["5"]["b"] == "3.125" and got["5"]["gone"] is None

        exported = env.tmp / "all.jsonl"
        env.cli("export", "-t", "s", "--out", str(exported), "-q")
        lines = jsonl(exported)
        assert [x["position"] for x in lines] == [pos_text(e) for e in events]  # no duplicates
        assert lines[0]["snapshot"] == "true" and lines[0]["commit_time"] is None
        assert lines[6]["op"] == "t" and lines[6]["key"] is None

        history = json.loads(env.cli("history", "-t", "s", "-k", "1", "-f", "json", "-q").stdout)
        assert [v["change"] for v in history["versions"]] == ["snapshot read", "update", "truncate"]
        assert history["versions"][1]["changed"] == ["a", "b"]  # b appeared in the new version
        assert history["versions"][2]["row"] is None

        result = env.cli("verify", "-q")
        assert "agree" in result.stderr and "5 duplicates dropped" in result.stderr


def test_partitions_are_merged_by_position(env: Env) -> None:
    """A topic with several partitions (an operator may create them): the reader merges
    them by position and drops a duplicate re-sent to another partition."""
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    codec = _codec(env.prefix)
    topic = f"{env.prefix}.public.t"
    admin = KafkaAdminClient(bootstrap_servers=env.bootstrap)
    admin.create_topics([NewTopic(topic, 3, 1), NewTopic(f"{env.prefix}._schemas", 1, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=env.bootstrap, acks="all")
    try:
        for schema in (codec.value_schema_json, codec.key_schema_json):
            assert schema is not None
            producer.send(f"{env.prefix}._schemas", value=schema.encode())
        sent = []
        for n in range(60):
            lsn, seq = 0x1000 + n // 3, n % 3
            k = n % 7
            op = "c" if n < 7 else "u"
            source = Source("app", "public", "t", lsn, lsn, 1, seq, 1_700_000_000_000_000 + n)
            key, value = codec.encode_change(op, None, [str(k), f"v{n}"], source, 0)
            header = [(POSITION_HEADER, position_header(lsn, seq))]
            producer.send(topic, key=key, value=value, headers=header, partition=k % 3)
            if n == 40:  # the same event again, on another partition
                producer.send(topic, key=key, value=value, headers=header, partition=(k + 1) % 3)
            sent.append(((lsn, seq), k, f"v{n}"))
        producer.flush()
    finally:
        producer.close()
    with LogReader(env.source, ["public.t"]) as reader:
        got = [(ev.position, ev.after["id"], ev.after["v"]) for ev in reader.events() if ev.after]
        assert reader.stats.duplicates == 1
    assert got == sent
    state, _ = state_as_of(env.source, ["t"], Bound(position=sent[29][0]))
    expect = {k: v for _, k, v in sent[:30]}
    assert {r.values["id"]: r.values["v"] for r in state.tables["public.t"].rows.values()} == expect
    # a start position is found by binary search inside each partition
    with LogReader(env.source, ["t"], start=Bound(position=sent[45][0])) as reader:
        assert [ev.position for ev in reader.events()] == [p for p, _, _ in sent[45:]]


# --------------------------------------------------------------------------- errors


def test_unknown_table_empty_range_and_broker_down(env: Env, tmp_path: Path) -> None:
    env.sql("create table t (id int primary key)")
    with running_daemon(env.settings):
        env.sql("insert into t values (1)")
        (event,) = env.events("t", 1)
    out = str(tmp_path / "x.jsonl")
    result = env.cli(
        "as-of", "--position", pos_text(event), "-t", "nope", "--out", out, "-q", code=EXIT_USAGE
    )
    assert "'nope' is not in the log" in result.stderr and "public.t" in result.stderr
    result = env.cli("export", "-t", "t", "--to", "0/1", "--out", out, "-q", code=EXIT_EMPTY)
    assert "no event of public.t" in result.stderr
    result = env.cli(
        "as-of", "--time", "2024-01-01", "--position", "0/1", "--out", out, code=EXIT_USAGE
    )
    assert "exactly one of --time and --position" in result.stderr
    result = env.cli("as-of", "--position", "nonsense", "--out", out, code=EXIT_USAGE)
    assert "not a position" in result.stderr
    with pytest.raises(NoEvents, match="empty range"):
        from replay.export import export_events

        export_events(
            env.source, None, parse_bound("0/20"), parse_bound("0/10"), tmp_path / "y", "jsonl"
        )

    from devtools.local_services import free_port

    down = tmp_path / "down.toml"
    down.write_text(
        f"[postgres]\ndsn = {json.dumps(env.dsn)}\n"
        f"[kafka]\nbootstrap_servers = '127.0.0.1:{free_port()}'\ntopic_prefix = {json.dumps(env.prefix)}\ntimeout_s = 2\n"
    )
    started = time.monotonic()
    result = CliRunner().invoke(app, ["history", "-t", "t", "-k", "1", "--config", str(down)])
    assert result.exit_code == EXIT_UNAVAILABLE, result.stderr
    assert "cannot reach the Kafka broker" in result.stderr and "127.0.0.1" in result.stderr
    assert time.monotonic() - started < 30

    pg_down = tmp_path / "pg-down.toml"
    pg_down.write_text(
        f"[postgres]\ndsn = 'postgresql://nobody@127.0.0.1:{free_port()}/x'\n"
        f"[kafka]\nbootstrap_servers = {json.dumps(env.bootstrap)}\ntopic_prefix = {json.dumps(env.prefix)}\n"
    )
    result = CliRunner().invoke(app, ["verify", "-q", "--config", str(pg_down)])
    assert result.exit_code == EXIT_UNAVAILABLE, result.stderr
    assert "cannot connect to PostgreSQL" in result.stderr


def test_export_follow_writes_new_events_until_interrupted(env: Env) -> None:
    env.sql("create table t (id int primary key, v text)")
    out = env.tmp / "follow.jsonl"
    with running_daemon(env.settings):
        env.sql("insert into t values (1, 'a')")
        env.events("t", 1)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fieldsync.cli",
                "replay",
                "export",
                "--follow",
                "-t",
                "t",
                "--out",
                str(out),
                "--config",
                str(env.config),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for(
                lambda: out.exists() and len(jsonl(out)) == 1, timeout=60, what="the first event"
            )
            env.sql("insert into t values (2, 'b')")
            env.sql("update t set v = 'c' where id = 1")
            lines = wait_for(
                lambda: len(jsonl(out)) == 3 and jsonl(out), timeout=60, what="followed events"
            )
            assert [(x["op"], (x["after"] or {}).get("v")) for x in lines] == [
                ("c", "a"),
                ("c", "b"),
                ("u", "c"),
            ]
            assert proc.poll() is None  # still following
        finally:
            proc.send_signal(signal.SIGINT)
            # it exits once its current read returns: a generous bound on a busy machine
            try:
                _, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate(timeout=30)
                raise AssertionError(
                    "replay export --follow still ran 120 s after SIGINT; its stderr:\n"
                    + err.decode(errors="replace")[-4000:]
                ) from None
    assert proc.returncode == 0, err.decode()
    assert "stopped" in err.decode() and len(jsonl(out)) == 3, err.decode()


APPLIER_RULES = """
token_claims = ["technician"]

[[bucket]]
name = "tech"
parameters = ["technician"]
claims = { technician = "technician" }

[[bucket.table]]
table = "public.jobs"
match = { technician = "technician" }
"""
APPLIER_CONFLICTS = """
[[table]]
table = "public.jobs"
policy = "server_wins"
"""


def test_history_of_edits_applied_by_the_real_applier(env: Env) -> None:
    """Device edits go through relay.upstream.applier (origin message, _outcomes): history shows
    the device, the journal entry and the applier's outcome, and a refused edit."""
    from relay.upstream.applier import Applier
    from relay.upstream.applier_db import ApplierDb

    env.sql(
        "create table jobs (id bigint primary key, technician text not null, status text not null, notes text)"
    )
    env.sql("insert into jobs values (5, 't1', 'open', 'n0')")
    rules, conflicts = env.tmp / "rules.toml", env.tmp / "conflicts.toml"
    rules.write_text(APPLIER_RULES)
    conflicts.write_text(APPLIER_CONFLICTS)
    applier = Applier(
        ApplierDb(env.dsn, rules, conflicts),
        kafka={"bootstrap_servers": env.bootstrap},
        prefix=env.prefix,
        batch_max_ms=20,
    )
    try:
        with running_daemon(env.settings):
            applier._start()
            applier.ensure_topics()
            base = {"id": 5, "technician": "t1", "status": "open", "notes": "n0"}

            def record(device: str, seq: int, tech: str, new: dict[str, Any]) -> JournalRecord:
                raw = {
                    "seq": seq,
                    "table": "public.jobs",
                    "op": "update",
                    "key": [5],
                    "old": base,
                    "new": new,
                    "base": None,
                    "hlc": Hlc(int(time.time() * 1000), 0, device).encode(),
                    "prev_seq": None,
                }
                return JournalRecord(
                    device,
                    seq,
                    entry_from_json(raw, device),
                    {"sub": device, "technician": tech},
                    None,
                    int(time.time() * 1e6),
                )

            producer = env.producer()
            for r in (
                record("tab-1", 1, "t1", {"status": "done"}),
                record("tab-2", 1, "t9", {"notes": "not mine"}),
            ):
                producer.send(f"{env.prefix}._journal", key=r.kafka_key, value=r.to_bytes())
            producer.flush()
            applier.run_until_idle(timeout=60)
            wait_for(lambda: len(env.events("jobs", 2)) >= 2, what="the applied edit in the log")
            wait_for(
                lambda: len(read_topic(env.bootstrap, f"{env.prefix}._outcomes")) >= 2,
                timeout=30,
                what="outcomes",
            )
    finally:
        applier.close()
    report = json.loads(env.cli("history", "-t", "jobs", "-k", "5", "-f", "json", "-q").stdout)
    snap, edit = report["versions"]
    assert snap["change"] == "snapshot read" and snap["commit_time"] is None
    assert edit["origin"]["kind"] == "device" and edit["origin"]["device_id"] == "tab-1"
    assert edit["changed"] == ["status"] and edit["journal"]["seq"] == 1
    assert edit["outcome"]["outcome"] in ("applied", "merged")
    (refused,) = report["edits_without_version"]
    assert (
        refused["journal"]["device_id"] == "tab-2" and refused["outcome"]["outcome"] == "rejected"
    )


def test_decode_worker_gives_the_same_events_and_resumes_after_a_time_bound(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker-process decoding (large reads) hands out exactly what decoding in the
    reader does; a read ended by a time bound continues where it stopped."""
    from kafka import KafkaProducer

    import replay.log_reader

    codec = _codec(env.prefix)
    producer = KafkaProducer(bootstrap_servers=env.bootstrap, acks="all")
    t0 = 1_700_000_000_000_000
    try:
        for schema in (codec.value_schema_json, codec.key_schema_json):
            assert schema is not None
            producer.send(f"{env.prefix}._schemas", value=schema.encode())
        for n in range(5000):
            lsn = 0x10000 + n
            source = Source("app", "public", "t", lsn, lsn, 1, 0, t0 + n * 1_000_000)
            key, value = codec.encode_change(
                "c" if n < 100 else "u", None, [str(n % 100), f"v{n}"], source, 0
            )
            producer.send(f"{env.prefix}.public.t", key=key, value=value,
                          headers=[(POSITION_HEADER, position_header(lsn, 0))])  # fmt: skip
        producer.flush()
    finally:
        producer.close()
    monkeypatch.setattr(replay.log_reader, "PARALLEL_MIN_RECORDS", 0)

    def read(workers: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        with LogReader(env.source, ["t"], workers=workers) as reader:
            stop = Bound(time_us=t0 + 3000 * 1_000_000)  # stops 60 s (the slack) later
            first = [(e.position, e.after) for e in reader.events(stop=stop)]
            rest = [(e.position, e.after) for e in reader.events()]
            assert reader.stats.events == 5000
        return first, rest

    inline = read(0)
    parallel = read(1)
    assert parallel == inline
    first, rest = inline
    assert len(first) == 3001 and [p for p, _ in first + rest] == sorted(
        {p for p, _ in first + rest}
    )
    assert len(first) + len(rest) == 5000
