"""What the app sees, and ``verify`` checking it (no network: messages from the FakeServer
of tests/device_agent/test_device_apply.py, outcomes recorded directly):

- device_agent/visible.py, the one definition of a visible row (properties);
- rows re-derived on outcomes whatever their order with the server versions; a row that
  left the buckets stays while an edit keeps it and never shows without its key;
  ``INSERT OR REPLACE`` over a synced row keeps the version it replaced;
- ``verify`` (device_agent/consistency.py and the CLI, ``--local``) failing on each kind
  of corruption — a changed row, a row no bucket holds, a key-less row, a held row left
  at the device's value, a missing row, a corrupt received version — and clean otherwise;
- a version-1 database upgraded: key columns NOT NULL (table rebuilt, the app's index,
  trigger and view kept), key-less and orphan rows gone, every bucket downloaded again.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from device_agent import apply as apply_mod
from device_agent import cli, local_db, local_tables, relay_schema, schema_sync
from device_agent.consistency import check_tables
from device_agent.local_tables import PREFIX
from device_agent.sync import wire_entries
from device_agent.visible import Edit, EditOp, add_delta, released, visible_row
from tests.device_agent.test_device_apply import (
    SCHEMA,
    T1,
    WO,
    FakeServer,
    app_conn,
    journal,
    order,
    sync,
)

STOCK = "public.site_stock"
SITE = 'site["plant-1"]'


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = local_db.connect(str(tmp_path / "device.db"))
    local_db.ensure_metadata(conn)
    local_db.set_meta(conn, "relay_url", "http://relay.invalid")
    schema_sync.apply_schema(conn, relay_schema.parse_schema(SCHEMA))
    yield conn
    conn.close()


def outcome(seq: int, kind: str = "applied") -> dict[str, Any]:
    return {"device_id": "tab-7", "seq": seq, "outcome": kind}


def problems(conn: sqlite3.Connection) -> list[tuple[str, Any, str]]:
    return [(p.table, p.key, p.problem.value) for p in check_tables(conn)]


def applying(conn: sqlite3.Connection, sql: str, *params: Any) -> None:
    """A write behind the agent's back that the triggers do not journal."""
    conn.execute(f"insert into {PREFIX}applying values (1)")
    try:
        conn.execute(sql, params)
    finally:
        conn.execute(f"delete from {PREFIX}applying")


# --------------------------------------------------------------------------- visible_row


def upd(seq: int, old: dict[str, Any], **new: Any) -> Edit:
    return Edit(seq, EditOp.UPDATE, old, {**old, **new})


@settings(max_examples=100, deadline=None)
@given(
    received=st.integers(-50, 50) | st.none(),
    base=st.integers(-50, 50) | st.none(),
    deltas=st.lists(st.integers(-5, 5), min_size=1, max_size=5),
)
def test_counter_edits_add_their_deltas_to_the_received_value(
    received: int | None, base: int | None, deltas: list[int]
) -> None:
    """However the server's value moved since the edits were made (``base`` → ``received``),
    the row shows the received value plus every open delta; a plain column shows the
    last value written."""
    edits, value = [], base
    for i, d in enumerate(deltas):
        new = (value or 0) + d
        edits.append(
            upd(i + 1, {"id": 1, "qty": value, "note": f"n{i}"}, qty=new, note=f"n{i + 1}")
        )
        value = new
    row = visible_row({"id": 1, "qty": received, "note": "server"}, edits, ["id"], {"qty"})
    assert row is not None
    written = any((e.old or {})["qty"] != (e.new or {})["qty"] for e in edits)
    assert row["qty"] == ((received or 0) + sum(deltas) if written else received)
    assert row["note"] == f"n{len(deltas)}"
    plain = visible_row({"id": 1, "qty": received, "note": "s"}, edits, ["id"])
    assert plain is not None and plain["qty"] == (value if written else received)


def test_visible_row_rules() -> None:
    old = {"id": 1, "a": "x", "qty": "10.50"}
    assert visible_row(old, [], ["id"]) == old
    assert visible_row(old, [Edit(1, EditOp.DELETE, old, None)], ["id"]) is None
    ins = Edit(2, EditOp.INSERT, None, {"id": 2, "a": "y", "qty": None})
    assert visible_row(None, [ins], ["id"]) == {"id": 2, "a": "y", "qty": None}
    # the row left the buckets while the edit is open: the edit's own row, with its key
    assert visible_row(None, [upd(3, old, a="z")], ["id"]) == {"id": 1, "a": "z", "qty": "10.50"}
    # decimal text counters stay decimal text
    assert visible_row({**old, "qty": "12.00"}, [upd(4, old, qty="11.25")], ["id"], {"qty"}) == {
        "id": 1,
        "a": "x",
        "qty": "12.75",
    }
    # never a row without its key
    assert visible_row(None, [Edit(5, EditOp.UPDATE, None, {"a": "only"})], ["id"]) is None
    assert visible_row({"id": None, "a": "x"}, [], ["id"]) is None
    assert add_delta(None, None, 3) == 3 and add_delta("x", 1, 2) == 2
    assert Decimal(add_delta(1.5, "0.5", "1")) == Decimal("2.0")


@settings(max_examples=200, deadline=None)
@given(
    received_lsn=st.integers(0, 30) | st.none(),
    seen=st.integers(0, 30) | st.none(),
    bound=st.integers(0, 30),
    held=st.booleans(),
    reset=st.booleans(),
)
def test_an_awaiting_edit_shows_until_something_at_or_above_its_bound(
    received_lsn: int | None, seen: int | None, bound: int, held: bool, reset: bool
) -> None:
    """Settled with a bound: on top while neither the received version nor any op seen
    since reaches the bound; the agent stops keeping it then, or when buckets were
    downloaded again and no bucket holds the row.  Open edits always show."""
    old = {"id": 1, "a": "server"}
    edit = Edit(1, EditOp.UPDATE, old, {**old, "a": "mine"}, awaiting=bound, seen=seen)
    newest = max(x for x in (received_lsn, seen, -1) if x is not None)
    shown = visible_row(old, [edit], ["id"], received_lsn=received_lsn)
    assert shown == ({"id": 1, "a": "mine"} if newest < bound else old)
    assert released(edit, received_lsn, held, reset) == (newest >= bound or (reset and not held))
    opened = dataclasses.replace(edit, awaiting=None)
    assert visible_row(old, [opened], ["id"], received_lsn=received_lsn) == {"id": 1, "a": "mine"}
    assert not released(opened, received_lsn, held, reset)


# --------------------------------------------------------------------------- re-derivation


def test_outcomes_re_derive_rows_in_any_order_with_the_server_versions(
    db: sqlite3.Connection,
) -> None:
    server = FakeServer()
    for i in (1, 2):
        server.put(T1, WO, [i], order(i, due=10))
    sync(db, server)
    app = app_conn(db)
    app.execute("update work_orders set due = due + 5, notes = 'mine' where id in (1, 2)")
    # row 1: the server version including the edit first, then the outcome
    mark = server.op_id
    server.put(T1, WO, [1], order(1, due=15, notes="mine"))
    sync(db, server, since=mark)
    assert app.execute("select due, notes from work_orders where id = 1").fetchone() == (15, "mine")
    # row 2: the outcome first (merged: the office had added 3 meanwhile), then the version
    apply_mod.settle(db, outcomes=[outcome(1), outcome(2, "merged")])
    assert app.execute("select due, notes from work_orders where id = 2").fetchone() == (
        10,
        "order 2",
    )
    mark = server.op_id
    server.put(T1, WO, [2], order(2, due=18, notes="mine"))
    sync(db, server, since=mark)
    assert app.execute("select due, notes from work_orders order by id").fetchall() == [
        (15, "mine"),
        (18, "mine"),
    ]
    assert problems(db) == []


def test_a_row_that_left_the_buckets_stays_while_edited_then_leaves(
    db: sqlite3.Connection,
) -> None:
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    sync(db, server)
    app = app_conn(db)
    app.execute("update work_orders set status = 'in_progress' where id = 1")
    mark = server.op_id
    server.remove(T1, WO, [1])  # reassigned on the server
    sync(db, server, since=mark)
    assert local_rows_full(db) == [(1, "plant-1", "t1", "in_progress")]
    app.execute("update work_orders set notes = 'second' where id = 1")
    apply_mod.settle(db, outcomes=[outcome(1, "rejected")])
    assert local_rows_full(db) == [(1, "plant-1", "t1", "in_progress")]  # still one open
    apply_mod.settle(db, outcomes=[outcome(2, "rejected")])
    assert local_rows_full(db) == []
    assert db.execute("select count(*) from work_orders where id is null").fetchone() == (0,)
    assert problems(db) == []


def local_rows_full(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute("select id, site, technician, status from work_orders").fetchall()


def test_insert_or_replace_keeps_the_version_it_replaced(db: sqlite3.Connection) -> None:
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    sync(db, server)
    app = app_conn(db)
    app.execute(
        "insert or replace into work_orders (id, site, technician, status, notes) "
        "values (1, 'plant-1', 't1', 'open', 'replaced')"
    )
    (entry,) = journal(db)
    assert entry[2] == "insert" and orjson.loads(entry[3])["notes"] == "order 1"
    (wire,) = wire_entries(db, "tab-7")
    assert wire["op"] == "insert" and wire["old"] is None  # an upload's insert has no old
    apply_mod.settle(db, outcomes=[outcome(1, "rejected")])
    assert app.execute("select notes, due from work_orders").fetchall() == [("order 1", 19000)]
    assert problems(db) == []
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        app.execute("insert into work_orders (id, status) values (null, 'x')")


# --------------------------------------------------------------------------- verify


def synced_db(db: sqlite3.Connection) -> FakeServer:
    """Rows of a single-rule table, a table two rules serve, one open edit."""
    server = FakeServer()
    for i in (1, 2, 3):
        server.put(T1, WO, [i], order(i))
    key = ["plant-1", "p1"]
    server.put(SITE, STOCK, key, {"site": "plant-1", "part_id": "p1", "qty": 4})
    server.put("other[]", STOCK, key, {"site": "plant-1", "part_id": "p1"})
    sync(db, server)
    app_conn(db).execute("update work_orders set notes = 'open edit' where id = 3")
    return server


def verify_local(db: sqlite3.Connection) -> tuple[int, dict[str, Any]]:
    path = db.execute("pragma database_list").fetchone()[2]
    r = CliRunner().invoke(cli.app, ["verify", "--local", "--db", path, "--json"])
    return r.exit_code, json.loads(r.stdout.splitlines()[0])


def test_verify_is_clean_on_a_clean_database(db: sqlite3.Connection) -> None:
    synced_db(db)
    assert problems(db) == []
    code, out = verify_local(db)
    assert code == 0, out
    assert out["rows"] == [] and {b["state"] for b in out["buckets"]} == {"ok"}


CORRUPTIONS = {
    "changed behind the agent's back": (
        "update work_orders set notes = 'tampered' where id = 1",
        (WO, [1], "differs"),
    ),
    "a row no bucket holds": (
        "insert into work_orders (id, site, technician, status) values (9, 'x', 't1', 'open')",
        (WO, [9], "not_held"),
    ),
    "a held row left at the device's value": (
        f"update {PREFIX}journal set status = 'synced' where seq = 1",
        (WO, [3], "differs"),
    ),
    "a missing row": ("delete from work_orders where id = 2", (WO, [2], "missing")),
    "a corrupt received version": (
        f'update {PREFIX}rows set data = \'{{"site":"plant-1","part_id":"p1","qty":5}}\' '
        "where bucket = (select id from _fieldsync_buckets where name = 'site[\"plant-1\"]')",
        (STOCK, ["plant-1", "p1"], "received_corrupt"),
    ),
    "a merged row that differs": (
        "update site_stock set qty = 40",
        (STOCK, ["plant-1", "p1"], "differs"),
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_verify_fails_on_each_corruption(db: sqlite3.Connection, case: str) -> None:
    synced_db(db)
    sql, expected = CORRUPTIONS[case]
    applying(db, sql)
    assert problems(db) == [expected]
    code, out = verify_local(db)
    assert code == 6
    assert [(r["table"], r["key"], r["problem"]) for r in out["rows"]] == [expected]


def test_verify_names_the_columns_that_differ(db: sqlite3.Connection) -> None:
    synced_db(db)
    applying(db, "update site_stock set qty = 40")
    (p,) = check_tables(db)
    assert dict(p.columns) == {"qty": (4, 40)}
    path = db.execute("pragma database_list").fetchone()[2]
    r = CliRunner().invoke(cli.app, ["verify", "--local", "--db", path])
    assert r.exit_code == 6
    assert "qty: expected 4, found 40" in r.output


def test_verify_counts_awaiting_edits(db: sqlite3.Connection) -> None:
    """A settled edit awaiting its server version is part of what the row should show:
    verify is clean while the row shows it, and reports the row if it does not."""
    server = synced_db(db)
    app = app_conn(db)
    app.execute("update site_stock set qty = 9")
    bound = FakeServer.lsn(server.op_id) + 1
    apply_mod.settle(db, outcomes=[outcome(1), {**outcome(2), "visible_after": bound}])
    assert app.execute("select qty from site_stock").fetchall() == [(9,)]
    assert problems(db) == []
    code, out = verify_local(db)
    assert code == 0, out
    applying(db, "update site_stock set qty = 4")  # the edit dropped behind the agent's back
    assert problems(db) == [(STOCK, ["plant-1", "p1"], "differs")]
    applying(db, "update site_stock set qty = 9")
    # its version arrives through one of the two rules: the row is the server's
    mark = server.op_id
    server.put(SITE, STOCK, ["plant-1", "p1"], {"site": "plant-1", "part_id": "p1", "qty": 9})
    sync(db, server, since=mark)
    assert db.execute(f"select await_lsn from {PREFIX}journal where seq = 2").fetchone() == (None,)
    assert problems(db) == []
    applying(db, "update site_stock set qty = 4")
    assert problems(db) == [(STOCK, ["plant-1", "p1"], "differs")]


def legacy_table(db: sqlite3.Connection) -> None:
    """Make ``work_orders`` what version 1 created: key columns without NOT NULL."""
    cols = ", ".join(f'"{c}"' for c in local_tables.load_tables(db)[WO].columns)
    db.execute("begin")
    db.execute(f"create table wo_old ({cols}, primary key (id))")
    db.execute(f"insert into wo_old select {cols} from work_orders")
    db.execute("drop table work_orders")
    db.execute("alter table wo_old rename to work_orders")
    db.execute("commit")


def test_verify_finds_key_less_rows_of_a_version_1_table(db: sqlite3.Connection) -> None:
    synced_db(db)
    legacy_table(db)
    applying(db, "insert into work_orders (id, status) values (null, 'in_progress')")
    assert problems(db) == [(WO, [None], "null_key")]
    code, out = verify_local(db)
    assert code == 6 and out["rows"][0]["problem"] == "null_key"


# --------------------------------------------------------------------------- upgrade


def test_upgrade_from_version_1_rebuilds_keys_and_re_derives_everything(
    db: sqlite3.Connection,
) -> None:
    server = synced_db(db)
    legacy_table(db)
    app = app_conn(db)
    app.execute("create index app_notes on work_orders (notes)")
    app.execute("create table app_log (id, notes)")
    app.execute(
        "create trigger app_audit after update on work_orders "
        "begin insert into app_log values (new.id, new.notes); end"
    )
    app.execute("create view app_open as select id, notes from work_orders where status = 'open'")
    applying(db, "insert into work_orders (id, status) values (null, 'in_progress')")
    applying(db, "insert into work_orders (id, site, status) values (77, 'gone', 'open')")
    # what version 1 had: no counters column, no replaced table, an ``expect`` hold
    db.execute(f"alter table {PREFIX}tables drop column counters")
    db.execute(f"drop table {PREFIX}replaced")
    db.execute(f"drop index {PREFIX}journal_open")
    db.execute(f"update {PREFIX}meta set value = '1' where key = 'db_version'")
    local_db.require_initialized(db, "device.db")  # metadata upgrade (any command)
    assert local_db.get_meta(db, "db_version") == str(local_db.DB_VERSION)
    plan = schema_sync.apply_schema(db, relay_schema.parse_schema(SCHEMA))  # the next sync
    assert any("NOT NULL" in n and "1 row(s) with a NULL key" in n for n in plan.notes)
    assert any("1 row(s) no bucket holds removed" in n for n in plan.notes)
    notnull = {r[1]: r[3] for r in db.execute('pragma table_info("work_orders")')}
    assert notnull["id"] == 1
    assert db.execute(
        "select count(*) from work_orders where id is null or id = 77"
    ).fetchone() == (0,)
    names = {r[0] for r in db.execute("select name from sqlite_master")}
    assert {"app_notes", "app_audit", "app_open"} <= names
    assert db.execute(f"select sum(reset_pending) = count(*) from {PREFIX}buckets").fetchone() == (
        1,
    )
    # the app's trigger and view work, and app writes are journaled again
    app.execute("update work_orders set notes = 'after upgrade' where id = 1")
    assert app.execute("select notes from app_log").fetchall() == [("after upgrade",)]
    assert app.execute("select count(*) from app_open").fetchone() == (3,)
    assert [e[2] for e in journal(db)] == ["update", "update"]
    # the re-download replaces every bucket; the open edits stay on top
    r = sync(db, server)
    assert sorted(r.reset) == sorted([T1, SITE, "other[]"]) and not r.mismatched
    assert db.execute("select id, notes from work_orders order by id").fetchall() == [
        (1, "after upgrade"),
        (2, "order 2"),
        (3, "open edit"),
    ]
    assert problems(db) == []
    assert local_db.get_meta(db, "rederive") is None


def test_upgrade_from_version_2_adds_the_awaiting_columns(db: sqlite3.Connection) -> None:
    server = synced_db(db)
    db.execute(f"drop index {PREFIX}journal_awaiting")
    db.execute(f"alter table {PREFIX}journal drop column await_lsn")
    db.execute(f"alter table {PREFIX}journal drop column seen_lsn")
    db.execute(f"update {PREFIX}meta set value = '2' where key = 'db_version'")
    local_db.require_initialized(db, "device.db")  # metadata upgrade (any command)
    assert local_db.get_meta(db, "db_version") == str(local_db.DB_VERSION)
    assert local_db.get_meta(db, "rederive") is None  # nothing to re-derive from version 2
    columns = {r[1] for r in db.execute(f"pragma table_info({PREFIX}journal)")}
    assert {"await_lsn", "seen_lsn"} <= columns
    indexes = {r[0] for r in db.execute("select name from sqlite_master where type = 'index'")}
    assert f"{PREFIX}journal_awaiting" in indexes
    # the open edit settles with a bound and stays on top until its version
    bound = FakeServer.lsn(server.op_id) + 1
    apply_mod.settle(db, outcomes=[{**outcome(1), "visible_after": bound}])
    assert db.execute("select notes from work_orders where id = 3").fetchone() == ("open edit",)
    assert problems(db) == []


# --------------------------------------------------------------------------- counters


def test_schema_names_counter_columns_from_the_conflicts_file(tmp_path: Path) -> None:
    """``/v1/schema`` lists a table's counter columns (the relay reads the conflicts file);
    the agent keeps them per table."""
    from relay.downstream.api_messages import visible_schema
    from relay.downstream.rules_parser import load_rules
    from relay.errors import ConfigError
    from relay.server import counter_columns
    from tests.schemas import DEMO_CATALOG, EXAMPLE_CONFLICTS, EXAMPLE_RULES

    counters = counter_columns(str(EXAMPLE_CONFLICTS))
    assert counters["public.site_stock"] == ("qty",) and counters[WO] == ()
    assert counter_columns(None) == {}
    rules = load_rules(EXAMPLE_RULES, DEMO_CATALOG)
    body = visible_schema(rules, ['site["plant-1"]'], counters)
    tables = {t["name"]: t for t in body["tables"]}
    assert tables[STOCK]["counters"] == ["qty"] and tables[WO]["counters"] == []
    spec = relay_schema.parse_schema(body)
    table = spec.table(STOCK)
    assert table is not None and table.counters == ("qty",)
    bad = tmp_path / "conflicts.toml"
    bad.write_text('[[table]]\ntable = "public.site_stock"\ncolumns = { qty = "countr" }\n')
    with pytest.raises(ConfigError, match=r"conflicts\.toml"):
        counter_columns(str(bad))
