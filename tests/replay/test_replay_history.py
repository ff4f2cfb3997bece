"""Row history: each row that held a key followed on its own through key changes, versions
compared only with the same row's previous version, snapshot reads and columns a previous
schema lacked shown for what they are, journal entries of composite keys matched column by
column, and keys that do not fit the table refused before the log is read.

The follower and the key and origin rules are tested on value literals; the CLI against
the real PostgreSQL, broker and cdc daemon (fixtures of tests/replay/test_replay.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from core.avro_envelope import Source, TableCodec, decode
from core.hlc import Hlc
from core.journal_format import JournalRecord, entry_from_json
from core.journal_outcomes import Outcome, OutcomeKind, encode_outcomes
from core.pg_types import ColumnSpec, MappingCatalog
from replay.catalog import LogCatalog
from replay.cli import EXIT_USAGE, app
from replay.errors import BadKey
from replay.events import ChangeEvent
from replay.history import RowFollower, entry_key_matches, threads_of
from replay.keys import KeySpec
from replay.render import describe_origin
from tests.cdc.cdc_support import running_daemon
from tests.replay.test_replay import Env

UNCHANGED = object()
ID_V = [ColumnSpec("id", 20, -1, True), ColumnSpec("v", 25, -1, False)]


class Log:
    """Events of one table encoded by cdc's codec and decoded as replay reads them."""

    def __init__(self, *column_sets: list[ColumnSpec]) -> None:
        self.catalog = LogCatalog("p")
        self.codecs = []
        for columns in column_sets:
            codec = TableCodec(
                db="app",
                schema="public",
                table="t",
                columns=columns,
                catalog=MappingCatalog(),
                unchanged_sentinel=UNCHANGED,
                warn=lambda _m: None,
                namespace_prefix="p",
            )
            self.catalog.add(codec.value_schema_json)
            assert codec.key_schema_json is not None
            self.catalog.add(codec.key_schema_json)
            self.codecs.append(codec)
        self.lsn = 100

    def event(
        self,
        op: str,
        before: list[Any] | None = None,
        after: list[Any] | None = None,
        *,
        schema: int = 0,
        snapshot: str = "false",
        before_kind: str = "key",
    ) -> ChangeEvent:
        self.lsn += 1
        lsn = self.lsn
        source = Source("app", "public", "t", lsn, lsn, lsn, 0, lsn, snapshot=snapshot)
        codec = self.codecs[schema]
        if op == "t":
            key, value = None, codec.encode_truncate(source, 0)
        else:
            key, value = codec.encode_change(op, before, after, source, 0, before_kind=before_kind)
        d = decode(value, self.catalog.registry)
        return ChangeEvent(
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


def follow(log: Log, key: str, events: list[ChangeEvent]) -> list[dict[str, Any]]:
    follower = RowFollower(log.catalog, KeySpec.parse(key))
    for ev in events:
        follower.apply(ev)
    return follower.versions


def brief(versions: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(v["thread"], v["change"], v["previous"], v["row"], v["changed"]) for v in versions]


# --------------------------------------------------------------------------- pure parts


def test_each_row_that_held_the_key_is_its_own_thread() -> None:
    """Row A (1) moves to 100, row B (2) moves onto 1, then each changes: history of key 1
    follows A to 100 and B from 2, and never compares one with the other."""
    log = Log(ID_V)
    events = [
        log.event("c", None, ["1", "A"]),
        log.event("c", None, ["2", "B"]),
        log.event("u", ["1", None], ["100", "A"]),
        log.event("u", ["2", None], ["1", "B"]),
        log.event("u", None, ["100", "A2"]),
        log.event("u", None, ["1", "B2"]),
        log.event("d", ["100", None], None),
    ]
    a, a100, a2 = {"id": 1, "v": "A"}, {"id": 100, "v": "A"}, {"id": 100, "v": "A2"}
    b, b2 = {"id": 1, "v": "B"}, {"id": 1, "v": "B2"}
    versions = follow(log, "1", events)
    assert brief(versions) == [
        (1, "insert", None, a, ["id", "v"]),
        (1, "update", a, a100, ["id"]),
        (2, "update", None, b, ["id", "v"]),  # B's earlier versions are under key 2
        (1, "update", a100, a2, ["v"]),
        (2, "update", b, b2, ["v"]),
        (1, "delete", a2, None, ["id", "v"]),
    ]
    assert [v["key_changed_from"] for v in versions] == [
        None,
        {"id": 1},
        {"id": 2},
        None,
        None,
        None,
    ]
    assert [v["key"] for v in versions] == [{"id": k} for k in (1, 100, 1, 100, 1, 100)]
    assert threads_of(versions) == [
        {
            "thread": 1,
            "keys": [{"id": 1}, {"id": 100}],
            "versions": 4,
            "first_position": versions[0]["position"],
            "last_position": versions[5]["position"],
            "ended": "delete",
        },
        {
            "thread": 2,
            "keys": [{"id": 2}, {"id": 1}],
            "versions": 2,
            "first_position": versions[2]["position"],
            "last_position": versions[4]["position"],
            "ended": None,
        },
    ]
    # history of key 100: A from its move onto 100; B never held 100
    assert [(v["thread"], v["change"]) for v in follow(log, "100", events)] == [
        (1, "update"),
        (1, "update"),
        (1, "delete"),
    ]


def test_a_row_that_left_a_key_is_not_followed_by_the_row_that_took_its_old_key() -> None:
    """A leaves 1 for 5, then leaves 5 for 6; C is inserted at 5: C is no row of key 1.
    A delete and a new insert of the key are two rows; a truncate ends every row."""
    log = Log(ID_V)
    events = [
        log.event("c", None, ["1", "A"]),
        log.event("u", ["1", None], ["5", "A"]),
        log.event("u", ["5", None], ["6", "A"]),
        log.event("c", None, ["5", "C"]),
        log.event("u", None, ["5", "C2"]),
        log.event("c", None, ["1", "D"]),
        log.event("d", ["1", None], None),
        log.event("c", None, ["1", "E"]),
        log.event("t"),
    ]
    versions = follow(log, "1", events)
    assert [(v["thread"], v["change"], v["key"]) for v in versions] == [
        (1, "insert", {"id": 1}),
        (1, "update", {"id": 5}),
        (1, "update", {"id": 6}),
        (2, "insert", {"id": 1}),
        (2, "delete", {"id": 1}),
        (3, "insert", {"id": 1}),
        (1, "truncate", {"id": 6}),
        (3, "truncate", {"id": 1}),
    ]
    assert versions[2]["previous"] == {"id": 5, "v": "A"}
    assert versions[3]["previous"] is None and versions[5]["previous"] is None
    assert versions[6]["previous"] == {"id": 6, "v": "A"}


def test_history_read_from_the_middle_of_a_row_s_life() -> None:
    """Read from a bound after the row's insert: the first event seen under the key starts
    its thread (a move away, a delete), and a TOAST value the log does not hold is unknown,
    not NULL; with REPLICA IDENTITY FULL the old row is the previous version."""
    log = Log(ID_V)
    assert brief(follow(log, "1", [log.event("u", ["1", None], ["7", "A"])])) == [
        (1, "update", None, {"id": 7, "v": "A"}, ["id", "v"])
    ]
    toast = follow(log, "1", [log.event("u", None, ["1", UNCHANGED])])
    assert toast[0]["unknown_columns"] == ["v"]
    full = follow(
        log,
        "1",
        [log.event("u", ["2", "B"], ["1", "B"], before_kind="full")],
    )
    assert brief(full) == [(1, "update", {"id": 2, "v": "B"}, {"id": 1, "v": "B"}, ["id"])]
    gone = follow(log, "1", [log.event("d", ["1", None], None)])
    assert [(v["thread"], v["change"], v["row"], v["key"]) for v in gone] == [
        (1, "delete", None, {"id": 1})
    ]


ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["c", "c", "u", "d", "t", "k", "k"]),  # k: update that changes the key
        st.integers(0, 3),  # u, k, d: which existing row
        st.integers(1, 3),  # c, k: the key it takes (or the first free one)
        st.booleans(),  # update: leave v out (unchanged TOAST)
    ),
    min_size=8,
    max_size=40,
)


@settings(max_examples=120, deadline=None)
@given(ops_strategy, st.integers(0, 6), st.integers(1, 3))
def test_follower_agrees_with_a_model_that_knows_each_row(
    ops: list[tuple[str, int, int, bool]], skip: int, target: int
) -> None:
    """A model gives every row an identity; the history of a key must be, per row that held
    it (from the first event read that shows it under the key), that row's own versions,
    each compared with its own previous one.  ``skip``: events before the read's start."""
    log = Log(ID_V)
    rows: dict[int, tuple[int, str]] = {}  # key -> (identity, v)
    made: list[tuple[ChangeEvent, str, list[int], int | None]] = []  # event, op, rows, key
    born = 0
    n = 0
    for op, i, j, toast in ops:
        n += 1
        v = f"v{n}"
        free = [f for f in (j, 1, 2, 3) if f not in rows]
        if op == "t":
            made.append((log.event("t"), "t", [i for i, _ in rows.values()], None))
            rows.clear()
            continue
        if op == "c":
            if free:
                born += 1
                rows[free[0]] = (born, v)
                made.append((log.event("c", None, [str(free[0]), v]), "c", [born], free[0]))
            continue
        if not rows:
            continue
        k = sorted(rows)[i % len(rows)]  # an existing row
        if op == "u":
            ident, old = rows[k]
            rows[k] = (ident, old if toast else v)
            ev = log.event("u", None, [str(k), UNCHANGED if toast else v])
            made.append((ev, "u", [ident], k))
        elif op == "k" and free:
            ident, _ = rows.pop(k)
            rows[free[0]] = (ident, v)
            made.append((log.event("u", [str(k), None], [str(free[0]), v]), "k", [ident], k))
        elif op == "d":
            ident, _ = rows.pop(k)
            made.append((log.event("d", [str(k), None], None), "d", [ident], k))
    made = made[skip:]
    # the model: rows by identity, each followed from its first event read under the key;
    # a TOAST value is the same row's previous one, or unknown (None) if it was not read
    threads: dict[int, int] = {}
    last: dict[int, dict[str, Any] | None] = {}
    expected = []
    for ev, op, idents, k in made:
        for ident in sorted(idents, key=lambda i: threads.get(i, 1 << 30)):
            if ident not in threads:
                moved_onto = op == "k" and ev.after is not None and ev.after["id"] == target
                if op == "t" or not (k == target or moved_onto):
                    continue
                threads[ident] = len(threads) + 1
                last[ident] = None
            prev = last[ident]
            shown = None
            if ev.after is not None:
                v = ev.after["v"]
                if "v" in ev.unchanged:
                    v = prev["v"] if prev is not None else None
                shown = {"id": ev.after["id"], "v": v}
            expected.append((threads[ident], ev.op, prev, shown))
            last[ident] = shown
    versions = follow(log, str(target), [ev for ev, *_ in made])
    assert [(v["thread"], v["op"], v["previous"], v["row"]) for v in versions] == expected


def test_changed_columns_are_compared_with_the_same_schema_or_marked_absent() -> None:
    """A column the previous version's schema did not have is not NULL there: it is listed
    in ``not_in_previous``; a snapshot read is credited to cdc, not to a session."""
    log = Log(ID_V, [*ID_V, ColumnSpec("c", 23, -1, False)])
    versions = follow(
        log,
        "1",
        [
            log.event("c", None, ["1", "x"]),
            log.event("u", None, ["1", "y", "5"], schema=1),
            log.event("r", None, ["1", "y", "9"], schema=1, snapshot="incremental"),
        ],
    )
    assert [(v["changed"], v["not_in_previous"]) for v in versions] == [
        (["id", "v"], []),
        (["v", "c"], ["c"]),
        (["c"], []),
    ]
    assert "c" not in versions[1]["previous"]
    assert versions[2]["origin"]["kind"] == "snapshot"
    assert versions[2]["origin"]["snapshot"] == "re-snapshot"


def test_snapshot_reads_are_credited_to_cdc() -> None:
    assert describe_origin(None, 42)["kind"] == "session"
    resnap = describe_origin(None, 42, snapshot="incremental")
    assert resnap == {
        "kind": "snapshot",
        "snapshot": "re-snapshot",
        "txid": 42,
        "text": "read again by a cdc re-snapshot (cdc's watermark txid 42)",
    }
    for flag in ("true", "last"):
        initial = describe_origin(None, None, snapshot=flag)
        assert initial["kind"] == "snapshot" and initial["snapshot"] == "initial"
        assert "session" not in initial["text"]
    assert describe_origin("device:d1", 7, snapshot="incremental")["kind"] == "snapshot"


def test_journal_entry_keys_are_matched_column_by_column() -> None:
    cols, types = ("a", "b"), {}
    assert entry_key_matches([1, 2], None, KeySpec.parse("[1, 2]"), cols, types)
    assert not entry_key_matches([2, 1], None, KeySpec.parse("[1, 2]"), cols, types)
    assert not entry_key_matches([2, 1], None, KeySpec.parse('{"a": 1, "b": 2}'), cols, types)
    assert entry_key_matches([1, 2], None, KeySpec.parse('{"b": 2, "a": 1}'), cols, types)
    # key_columns name the values: (b, a) = (2, 1) is row a=1, b=2
    assert entry_key_matches([2, 1], ["b", "a"], KeySpec.parse("[1, 2]"), cols, types)
    assert not entry_key_matches([1, 2], ["b", "a"], KeySpec.parse("[1, 2]"), cols, types)
    assert not entry_key_matches([1, 2], ["a", "c"], KeySpec.parse("[1, 2]"), cols, types)
    assert not entry_key_matches([1], None, KeySpec.parse("[1, 2]"), cols, types)
    assert not entry_key_matches(["1", "2", "3"], None, KeySpec.parse("[1, 2]"), cols, types)
    # values compared as their column's type: a date key written as PostgreSQL prints it
    typed = Log([ColumnSpec("d", 1082, -1, True), ColumnSpec("n", 23, -1, True)])
    types = typed.catalog.latest("public.t").types
    may_1 = 19844  # 2024-05-01 as days since 1970-01-01 (the JSON form)
    spec = KeySpec.parse('["2024-05-01", 3]')
    assert entry_key_matches([may_1, 3], None, spec, ("d", "n"), types)
    assert not entry_key_matches([may_1, 3], None, spec, ("d", "n"), {})
    assert not entry_key_matches([3, may_1], None, spec, ("d", "n"), types)


def test_keys_that_do_not_fit_the_table_are_refused_naming_its_key_columns() -> None:
    two = [("a", "b")]
    KeySpec.parse("[1, 2]").check("public.p", two)
    KeySpec.parse('{"b": 2, "a": 1}').check("public.p", two)
    KeySpec.parse("[1]").check("public.p", [("id",), ("a", "b")])  # an earlier key
    cases = {
        "[1": "--key '[1' is not valid JSON",
        '{"a": 1': "is not valid JSON",
    }
    for text, message in cases.items():
        with pytest.raises(BadKey, match=message.replace("[", r"\[")):
            KeySpec.parse(text)
    refused = {
        "1": "--key 1: 1 value for 2 key columns (public.p, its key columns: a, b)",
        "[1, 2, 3]": "3 values for 2 key columns (public.p, its key columns: a, b)",
        '{"a": 1}': "no value for b (public.p, its key columns: a, b)",
        '{"a": 1, "b": 2, "c": 3}': "no key column c (public.p",
        '{"nope": 1}': "no key column nope and no value for a, b",
    }
    for text, message in refused.items():
        with pytest.raises(BadKey) as caught:
            KeySpec.parse(text).check("public.p", two)
        assert message in str(caught.value), (text, str(caught.value))
    with pytest.raises(BadKey, match="its key columns: a, b; earlier: id"):
        KeySpec.parse("[1, 2, 3]").check("public.p", [("id",), ("a", "b")])
    rekeyed = Log(ID_V, [ColumnSpec("a", 23, -1, True), ColumnSpec("b", 25, -1, True)])
    assert rekeyed.catalog.key_columns("public.t") == [("id",), ("a", "b")]
    assert KeySpec.parse('"[a"').values == ("[a",)  # such a text key, written as JSON
    assert KeySpec.parse("a[1]").values == ("a[1]",)


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def env(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Iterator[Env]:
    e = Env(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    try:
        yield e
    finally:
        e.close()


def history(env: Env, table: str, key: str) -> dict[str, Any]:
    return json.loads(env.cli("history", "-t", table, "-k", key, "-f", "json", "-q").stdout)


def test_history_of_a_key_two_rows_held(env: Env) -> None:
    env.sql("create table t (id int primary key, v text)")
    with running_daemon(env.settings):
        env.sql("insert into t values (1, 'A'), (2, 'B')")
        env.sql("update t set id = 100 where id = 1")
        env.sql("update t set id = 1 where id = 2")
        env.sql("update t set v = 'A2' where id = 100")
        env.sql("update t set v = 'B2' where id = 1")
        env.events("t", 6)
    h = history(env, "t", "1")
    a, a100, a2 = {"id": 1, "v": "A"}, {"id": 100, "v": "A"}, {"id": 100, "v": "A2"}
    b, b2 = {"id": 1, "v": "B"}, {"id": 1, "v": "B2"}
    got = [(v["change"], v["previous"], v["row"]) for v in h["versions"]]
    assert got == [
        ("insert", None, a),
        ("update", a, a100),
        ("update", None, b),  # B's earlier versions are under key 2
        ("update", a100, a2),
        ("update", b, b2),
    ]
    assert [v["thread"] for v in h["versions"]] == [1, 1, 2, 1, 2]
    assert [t["keys"] for t in h["threads"]] == [[{"id": 1}, {"id": 100}], [{"id": 2}, {"id": 1}]]
    text = env.cli("history", "-t", "t", "-k", "1", "-q").stdout
    assert "5 versions of 2 rows that held the key" in text
    assert "row 1 of 2: key id=1 → id=100; 3 versions; present at the end of the read" in text
    assert "row 2 of 2: key id=2 → id=1; 2 versions" in text
    assert "key changed from id=2 to id=1" in text
    assert 'v: "B" → "B2"' in text and 'v: "A" → "A2"' in text
    assert '"B" → "A2"' not in text and '"A2" → "B2"' not in text


def test_history_matches_composite_key_journal_entries_in_key_column_order(env: Env) -> None:
    """Device d2 edits row (a=2, b=1); the history of row (1, 2) does not list it."""
    env.sql("create table p (a int, b int, v text, primary key (a, b))")
    with running_daemon(env.settings):
        env.sql("insert into p values (1, 2, 'x'), (2, 1, 'y')")
        with env.conn.transaction():
            env.sql("select pg_logical_emit_message(true, 'fieldsync.origin', 'device:d2')")
            env.sql("update p set v = 'd2' where a = 2 and b = 1")
        env.events("p", 3)
    raw = {
        "seq": 1,
        "table": "public.p",
        "op": "update",
        "key": [2, 1],
        "old": {"a": 2, "b": 1, "v": "y"},
        "new": {"v": "d2"},
        "base": None,
        "hlc": Hlc(int(time.time() * 1000), 0, "d2").encode(),
        "prev_seq": None,
    }
    r = JournalRecord(
        "d2", 1, entry_from_json(raw, "d2"), {"sub": "d2"}, None, int(time.time() * 1e6)
    )
    out = Outcome(
        "d2",
        1,
        OutcomeKind.APPLIED,
        "public.p",
        (2, 1),
        row={"a": 2, "b": 1, "v": "d2"},
        columns={"v": "device"},
    )
    producer = env.producer()
    producer.send(f"{env.prefix}._journal", key=r.kafka_key, value=r.to_bytes())
    producer.send(f"{env.prefix}._outcomes", key=b"d2", value=encode_outcomes([out]))
    producer.flush()
    for key in ("[1, 2]", '{"b": 2, "a": 1}'):
        h = history(env, "p", key)
        assert h["edits_without_version"] == [], key
        assert [v["row"]["v"] for v in h["versions"]] == ["x"]
    theirs = history(env, "p", '{"a": 2, "b": 1}')
    assert theirs["versions"][1]["journal"]["seq"] == 1
    assert theirs["versions"][1]["outcome"]["outcome"] == "applied"


def test_history_of_a_column_added_with_a_default(env: Env) -> None:
    """ADD COLUMN c DEFAULT 5: the next update's version has c, the previous one had no c in
    the log (not NULL); the row cdc's re-snapshot sends again is credited to cdc."""
    env.sql("create table a (id int primary key, v text)")
    with running_daemon(env.settings):
        env.sql("insert into a values (1, 'x')")
        with env.conn.transaction():  # the update is logged before the re-snapshot's row
            env.sql("alter table a add column c int default 5")
            env.sql("update a set v = 'y' where id = 1")
        events = env.events("a", 3)
    assert [e["op"] for e in events] == ["c", "u", "r"]
    h = history(env, "a", "1")
    by_change = {v["change"]: v for v in h["versions"]}
    update, resnap = by_change["update"], by_change["snapshot read"]
    assert resnap["origin"]["kind"] == "snapshot", resnap["origin"]
    assert resnap["origin"]["snapshot"] == "re-snapshot"
    text = env.cli("history", "-t", "a", "-k", "1", "-q").stdout
    assert "c: (not in the log) → 5" in text and "NULL" not in text, text
    assert "snapshot read  read again by a cdc re-snapshot" in text
    assert update["changed"] == ["v", "c"] and update["not_in_previous"] == ["c"]
    assert "c" not in update["previous"]


def test_keys_that_do_not_fit_the_table_are_usage_errors(env: Env) -> None:
    env.sql("create table p (a int, b int, v text, primary key (a, b))")
    with running_daemon(env.settings):
        env.sql("insert into p values (1, 2, 'x')")
        env.events("p", 1)
    for key, message in {
        "[1": "is not valid JSON",
        '{"nope": 1}': "no key column nope and no value for a, b",
        "1": "1 value for 2 key columns",
        "[1, 2, 3]": "3 values for 2 key columns",
        '{"a": 1}': "no value for b",
    }.items():
        res = CliRunner().invoke(
            app, ["history", "-t", "p", "-k", key, "-q", "--config", str(env.config)]
        )
        assert res.exit_code == EXIT_USAGE, (key, res.exit_code, res.stderr)
        assert message in res.stderr, (key, res.stderr)
        if key != "[1":
            assert "(public.p, its key columns: a, b)" in res.stderr
        assert "records read" not in res.stderr
    env.cli("history", "-t", "p", "-k", '{"b": 2, "a": 1}', "-q")
