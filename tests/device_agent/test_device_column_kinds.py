"""Column kinds from the relay's ``/v1/schema`` (device_agent/relay_schema.py,
device_agent/schema_sync.py): the schema's kinds win over learned ones, a column retyped
on the server takes its new kind (values stored before are read by it), pending edits made
under the old kind go up as they were made (the migration waits for them), and a relay
without kinds still works by learning.  No network: messages come from
:class:`tests.device_agent.test_device_apply.FakeServer`."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from device_agent import local_db
from device_agent.consistency import check_tables
from device_agent.errors import MigrationWaits, StateError
from device_agent.local_tables import PREFIX, load_tables
from device_agent.relay_schema import parse_schema, schema_json
from device_agent.schema_sync import apply_schema
from device_agent.sync import wire_entries
from tests.device_agent.test_device_apply import FakeServer, app_conn, sync

T = "public.gauges"
B = "all[]"
KINDS = {"id": "int", "n": "int", "f": "float", "a": "json", "note": "text"}


def schema(kinds: dict[str, str] | None = KINDS, columns: tuple[str, ...] = ()) -> Any:
    table: dict[str, Any] = {
        "name": T,
        "columns": list(columns or KINDS),
        "key": ["id"],
        "rules": ["all"],
    }
    if kinds is not None:
        table["kinds"] = kinds
    return {"tables": [table], "buckets": [B]}


def retyped(**kinds: str) -> Any:
    return schema({**KINDS, **kinds})


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = local_db.connect(str(tmp_path / "device.db"))
    local_db.ensure_metadata(conn)
    local_db.set_meta(conn, "relay_url", "http://relay.invalid")
    yield conn
    conn.close()


def kinds(conn: sqlite3.Connection) -> dict[str, str]:
    return load_tables(conn)[T].kinds


def uploads(conn: sqlite3.Connection) -> list[tuple[Any, Any]]:
    return [(e["old"], e["new"]) for e in wire_entries(conn, "dev-1")]


# --------------------------------------------------------------------------- parse


def test_the_schema_gives_each_column_its_kind() -> None:
    spec = parse_schema(schema()).tables[0]
    assert spec.kinds == KINDS
    assert schema_json(parse_schema(schema()))["tables"][0]["kinds"] == KINDS
    assert parse_schema(schema(None)).tables[0].kinds == {}, "an older relay sends none"
    # a kind this device does not know (a newer relay's) is left to learning
    assert parse_schema(schema({"id": "int", "n": "decimal"})).tables[0].kinds == {"id": "int"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (["int"], r"schema of public\.gauges has kinds that are not an object"),
        ({"nope": "int"}, r"schema of public\.gauges gives a kind of 'nope', not one of its"),
        ({"n": 3}, r"schema of public\.gauges gives column 'n' the kind 3, not a text"),
    ],
)
def test_kinds_the_device_cannot_read_are_refused_naming_table_and_column(
    raw: Any, message: str
) -> None:
    body = schema()
    body["tables"][0]["kinds"] = raw
    with pytest.raises(StateError, match=message):
        parse_schema(body)


# --------------------------------------------------------------------------- migration


def test_the_schema_kinds_win_over_learned_ones_and_learning_stays_the_fallback(
    db: sqlite3.Connection,
) -> None:
    apply_schema(db, parse_schema(schema(None)))
    server = FakeServer()
    # first values that decide nothing right: a float column's NaN comes as a text
    server.put(B, T, [1], {"id": 1, "n": None, "f": "NaN", "a": None, "note": "x"})
    sync(db, server)
    assert kinds(db) == {"id": "int", "f": "text", "note": "text"}, "learned from values"
    apply_schema(db, parse_schema(schema()))
    assert kinds(db) == KINDS
    # with the schema's kinds, an app's integer in the float column goes up as a float,
    # and the JSON text of an array as the array
    app_conn(db).execute("""update gauges set f = 2, a = '[1, 2]' where id = 1""")
    assert uploads(db) == [
        (
            {"id": 1, "n": None, "f": "NaN", "a": None, "note": "x"},
            {"f": 2.0, "a": [1, 2]},
        )
    ]


def test_a_column_retyped_on_the_server_takes_its_new_kind_and_is_read_by_it(
    db: sqlite3.Connection,
) -> None:
    apply_schema(db, parse_schema(schema()))
    server = FakeServer()
    server.put(B, T, [1], {"id": 1, "n": 0, "f": 2.5, "a": [1], "note": "x"})
    sync(db, server)
    assert check_tables(db) == []
    # n int → boolean, f float8 → integer, a int[] → jsonb: cdc sends the rows again
    plan = apply_schema(db, parse_schema(retyped(n="bool", f="int", a="text")))
    assert kinds(db) == {**KINDS, "n": "bool", "f": "int", "a": "text"}
    assert f"{T}: column n is now of kind bool (was int)" in plan.notes
    server.put(B, T, [1], {"id": 1, "n": False, "f": 2, "a": "[1]", "note": "x"})
    sync(db, server)
    assert check_tables(db) == [], "read by the new kinds: false, 2, the JSON text"
    app_conn(db).execute("update gauges set n = 1, f = 3 where id = 1")
    assert uploads(db) == [
        ({"id": 1, "n": False, "f": 2, "a": "[1]", "note": "x"}, {"n": True, "f": 3})
    ]


def test_pending_edits_made_under_the_old_kind_go_up_as_made_before_the_kind_changes(
    db: sqlite3.Connection,
) -> None:
    apply_schema(db, parse_schema(schema()))
    server = FakeServer()
    server.put(B, T, [1], {"id": 1, "n": 5, "f": 2.5, "a": [1], "note": "x"})
    sync(db, server)
    app_conn(db).execute("update gauges set n = 1 where id = 1")
    with pytest.raises(MigrationWaits, match=r"public\.gauges: column n is now of kind bool"):
        apply_schema(db, parse_schema(retyped(n="bool")))
    assert kinds(db) == KINDS, "nothing changed"
    # the sync uploads them (as made: n = 1, an integer), then the migration goes on
    assert uploads(db) == [({"id": 1, "n": 5, "f": 2.5, "a": [1], "note": "x"}, {"n": 1})]
    db.execute(f"update {PREFIX}journal set status = 'sent'")
    apply_schema(db, parse_schema(retyped(n="bool")))
    assert kinds(db)["n"] == "bool"


def test_kind_changes_that_read_values_alike_and_first_kinds_do_not_wait(
    db: sqlite3.Connection,
) -> None:
    apply_schema(db, parse_schema(schema({"id": "int", "f": "float"})))
    server = FakeServer()
    server.put(B, T, [1], {"id": 1, "n": None, "f": 1.5, "a": None, "note": "x"})
    sync(db, server)
    assert kinds(db) == {"id": "int", "f": "float", "note": "text"}
    app_conn(db).execute("update gauges set n = 1, note = 'y' where id = 1")
    # note text → int reads every value alike; n had no kind (only NULLs came): a boolean
    # column whose first value the app writes goes up as true, not refused as 1
    apply_schema(db, parse_schema(retyped(n="bool", note="int")))
    assert kinds(db) == {**KINDS, "n": "bool", "note": "int"}
    assert uploads(db) == [
        ({"id": 1, "n": None, "f": 1.5, "a": None, "note": "x"}, {"n": True, "note": "y"})
    ]


def test_the_kind_of_a_dropped_column_is_forgotten(db: sqlite3.Connection) -> None:
    apply_schema(db, parse_schema(schema(None)))
    server = FakeServer()
    server.put(B, T, [1], {"id": 1, "n": True, "f": 1.5, "a": [1], "note": "x"})
    sync(db, server)
    assert kinds(db)["n"] == "bool"
    apply_schema(db, parse_schema(schema(None, ("id", "f", "a", "note"))))
    assert "n" not in kinds(db)
    # added again as another type: its kind is learned anew (or given by the schema)
    apply_schema(db, parse_schema(schema(None)))
    assert "n" not in kinds(db)
    stored = db.execute(f"select kinds from {PREFIX}tables").fetchone()[0]
    assert orjson.loads(stored) == kinds(db)
