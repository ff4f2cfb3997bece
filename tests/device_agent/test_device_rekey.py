"""A table's key changes on the server (``(id)`` → ``(id, site)``): the device rebuilds the
table under the new key and downloads its buckets again, whose logs still hold the rows of
the old key and their removals; rows named by other key columns than the table's that stay
in a bucket refuse the apply with :class:`~device_agent.errors.KeyMismatch` (nothing
applied); unsent local edits of the table are named by the new key and stay on top, and one
that cannot be (a new key column NULL) blocks the change, named.  No network:
:class:`tests.device_agent.test_device_apply.FakeServer` serves the ops."""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson
import pytest

from device_agent.bucket_ops import local_checksums
from device_agent.consistency import check_tables
from device_agent.errors import KeyMismatch, SchemaBlocked
from device_agent.journal_wire import wire_entries
from device_agent.local_db import get_meta
from device_agent.local_tables import PREFIX
from device_agent.rekey import JournalRow, rekey_entries
from device_agent.relay_schema import parse_schema
from device_agent.schema_sync import apply_schema
from tests.device_agent.test_device_apply import SCHEMA, T1, WO, FakeServer, app_conn, order, sync
from tests.device_agent.test_device_apply import db as db  # the fixture


def rekeyed() -> dict[str, Any]:
    schema: dict[str, Any] = orjson.loads(orjson.dumps(SCHEMA))
    schema["tables"][0]["key"] = ["id", "site"]
    return schema


def rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute("select id, site, notes from work_orders order by id").fetchall()


def holds(conn: sqlite3.Connection) -> list[Any]:
    return [k for (k,) in conn.execute(f"select k from {PREFIX}rows order by k")]


def synced_device(db: sqlite3.Connection) -> FakeServer:
    server = FakeServer()
    for oid in (1, 2, 3):
        server.put(T1, WO, [oid], order(oid))
    sync(db, server)
    return server


def test_a_rekeyed_table_takes_a_download_holding_the_old_keys_and_their_removals(
    db: sqlite3.Connection,
) -> None:
    server = synced_device(db)
    plan = apply_schema(db, parse_schema(rekeyed()))
    assert plan.rebuilt_tables == [WO]
    assert holds(db) == [] and rows(db) == []  # rebuilt; its buckets are downloaded again
    # cdc: the old keys deleted, then every row under its new key
    for oid in (1, 2, 3):
        server.remove(T1, WO, [oid])
    server.put(T1, WO, [1, "plant-1"], order(1))
    server.put(T1, WO, [3, "plant-1"], order(3, notes="changed"))
    result = sync(db, server)  # the whole log: PUT [1] … REMOVE [1] … PUT [1, "plant-1"]
    assert result.verified == [T1] and not result.mismatched
    assert rows(db) == [(1, "plant-1", "order 1"), (3, "plant-1", "changed")]
    assert holds(db) == ['[1,"plant-1"]', '[3,"plant-1"]']
    count, checksum = local_checksums(db)[T1]
    cp = server.checkpoint()["buckets"][T1]
    assert (count, checksum) == (cp["count"], int(cp["checksum"]))


def test_rows_left_under_another_key_refuse_the_apply_and_nothing_changes(
    db: sqlite3.Connection,
) -> None:
    server = synced_device(db)
    apply_schema(db, parse_schema(rekeyed()))
    server.remove(T1, WO, [1])
    server.put(T1, WO, [1, "plant-1"], order(1))  # [2] and [3] not removed yet
    cursor = get_meta(db, "cursor")
    with pytest.raises(KeyMismatch, match=r"public.work_orders: the relay's buckets hold the row"):
        sync(db, server)
    assert rows(db) == [] and holds(db) == [] and get_meta(db, "cursor") == cursor
    # the relay catches up: the next download applies
    server.remove(T1, WO, [2])
    server.remove(T1, WO, [3])
    assert sync(db, server).verified == [T1]
    assert rows(db) == [(1, "plant-1", "order 1")]


def test_a_row_named_by_the_key_columns_in_another_order_is_refused(
    db: sqlite3.Connection,
) -> None:
    apply_schema(db, parse_schema(rekeyed()))
    server = FakeServer()
    server.put(T1, WO, ["plant-1", 1], order(1))  # not (id, site) of its data
    with pytest.raises(KeyMismatch, match=r'the row \["plant-1",1\], named by other key'):
        sync(db, server)
    assert rows(db) == []


def test_an_unsent_edit_is_named_by_the_new_key_and_stays_on_top(db: sqlite3.Connection) -> None:
    server = synced_device(db)
    app = app_conn(db)
    app.execute("update work_orders set notes = 'mine' where id = 2")
    app.execute("insert into work_orders (id, site, notes) values (9, 'plant-4', 'new')")
    plan = apply_schema(db, parse_schema(rekeyed()))
    assert f"{WO}: 2 local edit(s) kept on top, named by the new key" in plan.notes
    # the rows the edits act on stay, the others come with the download
    assert rows(db) == [(2, "plant-1", "mine"), (9, "plant-4", "new")]
    assert db.execute(f"select k, op, status from {PREFIX}journal order by seq").fetchall() == [
        ('[2,"plant-1"]', "update", "pending"),
        ('[9,"plant-4"]', "insert", "pending"),
    ]
    for oid in (1, 2, 3):
        server.remove(T1, WO, [oid])
        server.put(T1, WO, [oid, "plant-1"], order(oid, notes="server"))
    assert sync(db, server).verified == [T1]
    assert rows(db) == [
        (1, "plant-1", "server"),
        (2, "plant-1", "mine"),  # the edit on top of the new version
        (3, "plant-1", "server"),
        (9, "plant-4", "new"),
    ]
    assert check_tables(db) == []
    entries = wire_entries(db, "tab-1")
    assert [(e["key"], e["key_columns"], e["op"]) for e in entries] == [
        ([2, "plant-1"], ["id", "site"], "update"),
        ([9, "plant-4"], ["id", "site"], "insert"),
    ]


def test_an_edit_that_cannot_be_named_by_the_new_key_blocks_it_and_stays(
    db: sqlite3.Connection,
) -> None:
    synced_device(db)
    app = app_conn(db)
    app.execute("update work_orders set notes = 'mine' where id = 2")
    app.execute("insert into work_orders (id, notes) values (9, 'no site')")
    with pytest.raises(
        SchemaBlocked,
        match=r"public.work_orders: the primary key changed from \(id\) to \(id, site\) and 1 "
        r"local edit\(s\) of it cannot be named by the new key \(journal #2 lacks site\)",
    ):
        apply_schema(db, parse_schema(rekeyed()))
    assert [r[2] for r in rows(db)] == ["order 1", "mine", "order 3", "no site"]
    pending = db.execute(f"select k, op, status from {PREFIX}journal order by seq").fetchall()
    assert pending == [(2, "update", "pending"), (9, "insert", "pending")]
    key = db.execute(f"select key from {PREFIX}tables where name = ?", (WO,)).fetchone()[0]
    assert orjson.loads(key) == ["id"]  # nothing changed


def test_an_edit_of_a_column_the_new_key_adds_blocks_it_and_stays(
    db: sqlite3.Connection,
) -> None:
    synced_device(db)
    app = app_conn(db)
    app.execute("update work_orders set site = 'plant-9' where id = 2")
    # named by its new site, the edit would act on (2, plant-9), a row the server lacks
    with pytest.raises(SchemaBlocked, match=r"\(journal #\d+ changes site\)"):
        apply_schema(db, parse_schema(rekeyed()))
    assert db.execute(f"select k, op, status from {PREFIX}journal").fetchall() == [
        (2, "update", "pending")
    ]
    key = db.execute(f"select key from {PREFIX}tables where name = ?", (WO,)).fetchone()[0]
    assert orjson.loads(key) == ["id"]  # nothing changed


def test_entries_are_named_by_the_new_key_from_the_rows_they_hold() -> None:
    entries = [
        JournalRow(1, "insert", None, {"id": 9, "site": "plant-4", "notes": "n"}),
        JournalRow(2, "update", {"id": 2, "site": "plant-1", "notes": "a"}, {"notes": "b"}),
        JournalRow(3, "delete", {"id": 3, "site": "plant-2", "notes": "c"}, None),
        JournalRow(4, "insert", None, {"id": 5, "notes": "no site"}),
        JournalRow(5, "update", {"id": 6, "site": None}, {"notes": "x"}),
        # an edit of a column the new key adds: the server's row is still (7, plant-1)
        JournalRow(6, "update", {"id": 7, "site": "plant-1"}, {"site": "plant-2"}),
        JournalRow(7, "update", {"id": 8, "site": "plant-1"}, {"site": "plant-1", "notes": "y"}),
    ]
    found = rekey_entries(entries, ["id", "site"])
    assert found.keys == {
        1: '[9,"plant-4"]',
        2: '[2,"plant-1"]',
        3: '[3,"plant-2"]',
        7: '[8,"plant-1"]',
    }
    assert found.unnamed == {4: "lacks site", 5: "lacks site", 6: "changes site"}
    assert rekey_entries(entries[5:6], ["id"]).keys == {6: 7}  # site not in the key: named
    shrunk = rekey_entries(entries[:3], ["id"])
    assert shrunk.keys == {1: 9, 2: 2, 3: 3} and not shrunk.unnamed
    assert rekey_entries(entries[:1], ["site", "id"]).keys == {1: '["plant-4",9]'}
