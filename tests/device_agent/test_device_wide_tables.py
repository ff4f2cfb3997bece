"""Tables of many columns on the device: the journal triggers of a table of 64 columns or
more could not be created (SQLite allows a function 127 arguments before 3.48:
``json_object`` of 64 columns has 128), so the device could not take the schema of a bucket
holding such a table and never synced; a table of 1000 columns or more also passed SQLite's
expression depth in the update trigger's comparisons.  Now the app's writes to a table of
1200 columns are journaled whole, and the agent's downloads of such rows are applied."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from device_agent import local_db
from device_agent.journal_wire import wire_entries
from device_agent.local_tables import PREFIX
from device_agent.relay_schema import parse_schema
from device_agent.schema_sync import apply_schema
from tests.device_agent.test_device_apply import FakeServer, app_conn, sync

WIDE = "public.wide"
COLUMNS = ["id", *(f"c{i}" for i in range(1199))]
BUCKET = "all[]"
SCHEMA = {
    "tables": [{"name": WIDE, "columns": COLUMNS, "key": ["id"], "rules": ["all"]}],
    "buckets": [BUCKET],
}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = local_db.connect(str(tmp_path / "device.db"))
    local_db.ensure_metadata(conn)
    local_db.set_meta(conn, "relay_url", "http://relay.invalid")
    apply_schema(conn, parse_schema(SCHEMA))
    yield conn
    conn.close()


def row(rid: int, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {c: f"{c}-{rid}" for c in COLUMNS[1:]}
    out["id"] = rid
    out["c7"] = None
    out.update(extra)
    return out


@pytest.mark.parametrize("bulk", [True, False])
def test_writes_to_a_table_of_1200_columns_are_journaled_whole(
    db: sqlite3.Connection, bulk: bool
) -> None:
    server = FakeServer()
    for rid in range(1, 4):
        server.put(BUCKET, WIDE, [rid], row(rid))
    sync(db, server, bulk_ops=1 if bulk else 10**9, total_ops=len(server.log))
    app = app_conn(db)
    assert app.execute("select id, c0, c1198 from wide order by id").fetchall() == [
        (r, f"c0-{r}", f"c1198-{r}") for r in range(1, 4)
    ]
    app.execute("update wide set c1198 = 'edited', c7 = 'set' where id = 1")
    app.execute("update wide set c5 = c5 where id = 2")  # no change: not journaled
    app.execute("insert into wide (id, c0, c1198) values (9, 'a', 'z')")
    app.execute("delete from wide where id = 3")
    stored = db.execute(f"select op, old, new from {PREFIX}journal order by seq").fetchall()
    assert [op for op, _, _ in stored] == ["update", "insert", "delete"]
    old, new = orjson.loads(stored[0][1]), orjson.loads(stored[0][2])
    assert old == row(1) and new == row(1, c1198="edited", c7="set")
    assert list(new) == COLUMNS  # every column, in order
    inserted = orjson.loads(stored[1][2])
    assert len(inserted) == 1200 and inserted["c1198"] == "z" and inserted["c5"] is None
    assert orjson.loads(stored[2][1]) == row(3)
    entries = wire_entries(db, "dev-1")
    assert entries[0]["new"] == {"c1198": "edited", "c7": "set"}
    assert entries[1]["new"] == {"id": 9, "c0": "a", "c1198": "z"}
    assert entries[2]["old"] == row(3)
