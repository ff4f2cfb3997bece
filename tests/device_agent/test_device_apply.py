"""Device agent, local side: schema → SQLite tables, journal triggers, applying changes
messages (checkpoints, checksums, REMOVE, re-download on mismatch, no flicker of local
edits).  No network: messages come from :class:`FakeServer`, a model of the relay's
bucket logs that computes checkpoints with core.row_wire.row_checksum."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.row_wire import CHECKSUM_MODULUS, row_checksum, row_key_text
from device_agent import apply as apply_mod
from device_agent import local_db, local_tables, triggers
from device_agent.apply import apply_messages
from device_agent.bucket_ops import local_checksums, signed, term_of, unsigned
from device_agent.consistency import check_tables
from device_agent.errors import SchemaBlocked
from device_agent.local_tables import PREFIX
from device_agent.relay_schema import parse_schema
from device_agent.schema_sync import apply_schema
from device_agent.sync import wire_entries

WO = "public.work_orders"
PARTS = "public.parts"
SCHEMA = {
    "tables": [
        {
            "name": WO,
            "columns": ["id", "site", "technician", "status", "due", "notes", "done"],
            "key": ["id"],
            "rules": ["tech_orders"],
        },
        {"name": PARTS, "columns": ["id", "name", "unit"], "key": ["id"], "rules": ["catalog"]},
        {
            "name": "public.site_stock",
            "columns": ["site", "part_id", "qty"],
            "key": ["site", "part_id"],
            "rules": ["site", "other"],
        },
    ],
    "buckets": ['tech_orders["t1"]', "catalog[]"],
}
T1 = 'tech_orders["t1"]'


class FakeServer:
    """Bucket op logs with checkpoints, as the relay serves them (ops in op-id order).
    Each op carries the position ``[lsn(op_id), 0]`` (``positions=False``: none, as older
    relays sent)."""

    positions = True

    @staticmethod
    def lsn(op_id: int) -> int:
        """The commit_lsn of op ``op_id``'s change event (they increase with op ids)."""
        return 1000 + op_id

    def __init__(self) -> None:
        self.op_id = 0
        self.log: list[dict[str, Any]] = []
        self.rows: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}

    def put(self, bucket: str, table: str, key: list[Any], data: dict[str, Any]) -> None:
        self.op_id += 1
        self.rows.setdefault(bucket, {})[(table, row_key_text(key))] = data
        self.log.append(
            {
                "op_id": self.op_id,
                "bucket": bucket,
                "op": "PUT",
                "table": table,
                "key": key,
                "data": data,
                **self._position(),
            }
        )

    def _position(self) -> dict[str, Any]:
        return {"position": [self.lsn(self.op_id), 0]} if self.positions else {}

    def remove(self, bucket: str, table: str, key: list[Any]) -> None:
        self.op_id += 1
        self.rows.setdefault(bucket, {}).pop((table, row_key_text(key)), None)
        self.log.append(
            {
                "op_id": self.op_id,
                "bucket": bucket,
                "op": "REMOVE",
                "table": table,
                "key": key,
                "data": None,
                **self._position(),
            }
        )

    def checkpoint(self) -> dict[str, Any]:
        buckets = {}
        for b, rows in self.rows.items():
            total = sum(row_checksum(t, k, d) for (t, k), d in rows.items()) % CHECKSUM_MODULUS
            last = max((o["op_id"] for o in self.log if o["bucket"] == b), default=0)
            buckets[b] = {
                "last_op_id": last,
                "count": len(rows),
                "checksum": str(total),
                "complete": True,
            }
        return {"complete": True, "buckets": buckets}

    def messages(self, since: int = 0, page: int = 1000) -> list[dict[str, Any]]:
        ops = [o for o in self.log if o["op_id"] > since]
        pages = [ops[i : i + page] for i in range(0, len(ops), page)] or [[]]
        out = []
        for i, chunk in enumerate(pages):
            last = i == len(pages) - 1
            cp = self.checkpoint() if last else {"complete": False, "buckets": {}}
            out.append(
                {
                    "type": "changes",
                    "ops": chunk,
                    "cursor": f"c{self.op_id}",
                    "checkpoint": cp,
                    "resync": [],
                    "dropped": [],
                    "has_more": not last,
                }
            )
        return out


def order(oid: int, **extra: Any) -> dict[str, Any]:
    row = {
        "id": oid,
        "site": "plant-1",
        "technician": "t1",
        "status": "open",
        "due": 19000,
        "notes": f"order {oid}",
        "done": False,
    }
    row.update(extra)
    return row


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = local_db.connect(str(tmp_path / "device.db"))
    local_db.ensure_metadata(conn)
    local_db.set_meta(conn, "relay_url", "http://relay.invalid")
    apply_schema(conn, parse_schema(SCHEMA))
    yield conn
    conn.close()


def app_conn(conn: sqlite3.Connection) -> sqlite3.Connection:
    """A second, plain sqlite3 connection: what an app uses."""
    path = conn.execute("pragma database_list").fetchone()[2]
    return sqlite3.connect(path, isolation_level=None)


def journal(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    triggers.assign_clocks(conn)
    return conn.execute(
        f"select seq, k, op, old, new, status, prev_seq from {PREFIX}journal order by seq"
    ).fetchall()


def sync(conn: sqlite3.Connection, server: FakeServer, since: int = 0, **kw: Any) -> Any:
    return apply_messages(conn, server.messages(since), f"c{server.op_id}", **kw)


def local_rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute('select id, status, notes, done from "work_orders" order by id').fetchall()


# --------------------------------------------------------------------------- schema


def test_schema_creates_tables_keys_metadata_and_triggers(db: sqlite3.Connection) -> None:
    names = {r[0] for r in db.execute("select name from sqlite_master where type = 'table'")}
    assert {"work_orders", "parts", "site_stock"} <= names
    assert {n for n in names if not n.startswith((PREFIX, "sqlite_"))} == {
        "work_orders",
        "parts",
        "site_stock",
    }
    pk = [r[1] for r in db.execute('pragma table_info("site_stock")') if r[5]]
    assert pk == ["site", "part_id"]
    tables = local_tables.load_tables(db)
    assert all(triggers.installed(db, t) for t in tables.values())
    assert tables["public.site_stock"].multi and not tables[WO].multi


def test_schema_change_adds_and_drops_columns_and_blocks_with_reason(
    db: sqlite3.Connection,
) -> None:
    changed = orjson.loads(orjson.dumps(SCHEMA))
    changed["tables"][1]["columns"] = ["id", "name", "price"]  # unit removed, price added
    plan = apply_schema(db, parse_schema(changed))
    assert any("new column price" in n for n in plan.notes)
    assert [r[1] for r in db.execute('pragma table_info("parts")')] == ["id", "name", "price"]
    # an app index on a column the server removes blocks, naming it
    app = app_conn(db)
    app.execute("create index app_name_idx on parts (name)")
    changed["tables"][1]["columns"] = ["id", "price"]
    with pytest.raises(SchemaBlocked, match=r"column name .* index app_name_idx"):
        apply_schema(db, parse_schema(changed))
    # a key change with pending local edits blocks too
    app.execute("insert into work_orders (id, status) values (77, 'open')")
    rekeyed = orjson.loads(orjson.dumps(SCHEMA))
    rekeyed["tables"][0]["key"] = ["id", "site"]
    with pytest.raises(SchemaBlocked, match=r"primary key changed .* 1 local edit"):
        apply_schema(db, parse_schema(rekeyed))


# --------------------------------------------------------------------------- triggers


def test_app_writes_are_journaled_with_old_new_hlc_and_prev_seq(db: sqlite3.Connection) -> None:
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    sync(db, server)
    assert journal(db) == []  # the agent's writes are not journaled
    app = app_conn(db)
    app.execute("update work_orders set status = 'done' where id = 1")
    app.execute("update work_orders set status = status where id = 1")  # no change: nothing
    app.execute("insert into work_orders (id, status, technician) values (2, 'open', 't1')")
    app.execute("update work_orders set id = 3 where id = 2")  # key change: delete + insert
    app.execute("delete from work_orders where id = 1")
    rows = journal(db)
    assert [(r[1], r[2]) for r in rows] == [
        (1, "update"),
        (2, "insert"),
        (2, "delete"),
        (3, "insert"),
        (1, "delete"),
    ]
    first = rows[0]
    assert orjson.loads(first[3])["status"] == "open" and orjson.loads(first[4])["status"] == "done"
    assert rows[4][6] == rows[0][0]  # prev_seq: the pending update of the same row
    assert rows[2][6] == rows[1][0]
    assert all(r[5] == "pending" for r in rows)
    hlcs = db.execute(f"select hlc_l, hlc_c from {PREFIX}journal order by seq").fetchall()
    assert hlcs == sorted(hlcs) and len(set(hlcs)) == len(hlcs)  # strictly increasing


@pytest.mark.parametrize("bulk", [True, False])
def test_agent_writes_not_journaled_either_way(db: sqlite3.Connection, bulk: bool) -> None:
    server = FakeServer()
    for i in range(1, 30):
        server.put(T1, WO, [i], order(i))
    server.remove(T1, WO, [5])
    result = sync(db, server, bulk_ops=1 if bulk else 10**9, total_ops=len(server.log))
    assert journal(db) == []
    assert result.verified == [T1] and not result.mismatched
    assert all(triggers.installed(db, t) for t in local_tables.load_tables(db).values())
    app_conn(db).execute("update work_orders set notes = 'x' where id = 1")
    assert len(journal(db)) == 1


# --------------------------------------------------------------------------- apply


def test_puts_removes_and_checksums_match_the_relays(db: sqlite3.Connection) -> None:
    server = FakeServer()
    for i in range(1, 6):
        server.put(T1, WO, [i], order(i, due=None if i == 2 else 19000 + i))
    server.put("catalog[]", PARTS, ["p1"], {"id": "p1", "name": "bolt", "unit": "pc"})
    r1 = sync(db, server)
    assert sorted(r1.verified) == sorted([T1, "catalog[]"])
    mark = server.op_id
    server.put(T1, WO, [3], order(3, status="done", done=True))
    server.remove(T1, WO, [4])  # reassigned away: REMOVE deletes it
    r2 = sync(db, server, since=mark)
    assert r2.verified == [T1] or sorted(r2.verified) == sorted([T1, "catalog[]"])
    assert [r[0] for r in local_rows(db)] == [1, 2, 3, 5]
    assert db.execute("select done from work_orders where id = 3").fetchone() == (1,)
    assert db.execute(f"select value from {PREFIX}meta where key = 'cursor'").fetchone() == (
        f"c{server.op_id}",
    )
    sums = local_checksums(db)
    cp = server.checkpoint()["buckets"]
    assert sums[T1] == (cp[T1]["count"], int(cp[T1]["checksum"]))
    kinds = local_tables.load_tables(db)[WO].kinds
    assert kinds["done"] == "bool" and kinds["due"] == "int"


def test_checksum_mismatch_marks_bucket_for_redownload_then_repairs(
    db: sqlite3.Connection,
) -> None:
    server = FakeServer()
    for i in range(1, 4):
        server.put(T1, WO, [i], order(i))
    msgs = server.messages()
    lost = msgs[0]["ops"].pop(1)  # an op lost in transit
    assert lost["key"] == [2]
    resets: list[list[str]] = []

    def reset_cursor(cursor: str | None, buckets: Any) -> str:
        resets.append(list(buckets))
        return "c0"

    r = apply_messages(db, msgs, "c3", reset_cursor=reset_cursor)
    assert r.mismatched == [T1] and resets == [[T1]]
    assert db.execute(f"select value from {PREFIX}meta where key = 'cursor'").fetchone() == ("c0",)
    state = db.execute(f"select state, reset_pending from {PREFIX}buckets where name = ?", (T1,))
    assert state.fetchone() == ("mismatch", 1)
    # the rows stay visible until the re-download replaces the bucket atomically
    assert [r[0] for r in local_rows(db)] == [1, 3]
    r2 = sync(db, server)
    assert r2.reset == [T1] and r2.verified == [T1] and not r2.mismatched
    assert [r[0] for r in local_rows(db)] == [1, 2, 3]
    assert db.execute(
        f"select state, reset_pending from {PREFIX}buckets where name = ?", (T1,)
    ).fetchone() == ("ok", 0)


def test_resync_and_dropped_buckets_are_emptied(db: sqlite3.Connection) -> None:
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    server.put("catalog[]", PARTS, ["p1"], {"id": "p1", "name": "bolt", "unit": "pc"})
    sync(db, server)
    msg = server.messages(server.op_id)[0]
    msg["dropped"] = ["catalog[]"]
    del server.rows["catalog[]"]
    msg["checkpoint"] = server.checkpoint()
    r = apply_messages(db, [msg], "c9")
    assert "catalog[]" in r.reset
    assert db.execute("select count(*) from parts").fetchone() == (0,)
    assert db.execute(
        f"select count(*) from {PREFIX}buckets where name = 'catalog[]'"
    ).fetchone() == (0,)


def outcome(seq: int, kind: str = "applied", visible_after: int | None = None) -> dict[str, Any]:
    o: dict[str, Any] = {"device_id": "tab-7", "seq": seq, "outcome": kind}
    if visible_after is not None:
        o["visible_after"] = visible_after
    return o


def test_local_edit_stays_on_top_until_its_outcome(db: sqlite3.Connection) -> None:
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    server.put(T1, WO, [2], order(2))
    sync(db, server)
    app = app_conn(db)
    app.execute("update work_orders set status = 'done' where id = 1")
    # the server changes another column of the row before it has the edit
    mark = server.op_id
    server.put(T1, WO, [1], order(1, notes="call first"))
    r = sync(db, server, since=mark)
    assert r.held_rows == 1 and r.verified == [T1]  # checksum is over the server's version
    assert app.execute("select status, notes from work_orders where id = 1").fetchone() == (
        "done",
        "call first",
    )
    assert journal(db)[0][5] == "pending"
    # the server's version that includes the edit, then a later one changing it again:
    # the edit is still open (no outcome yet), so it stays on top
    mark = server.op_id
    server.put(T1, WO, [1], order(1, notes="call first", status="done"))
    server.put(T1, WO, [1], order(1, notes="call first", status="closed"))
    r = sync(db, server, since=mark)
    assert r.released == 0 and journal(db)[0][5] == "pending"
    assert app.execute("select status from work_orders where id = 1").fetchone() == ("done",)
    # the outcome: the row is re-derived from the received version
    assert apply_mod.settle(db, outcomes=[outcome(1, "merged")]) == 1
    assert journal(db)[0][5] == "synced"
    assert app.execute("select status, notes from work_orders where id = 1").fetchone() == (
        "closed",
        "call first",
    )
    # from now on server changes show at once
    mark = server.op_id
    server.put(T1, WO, [1], order(1, notes="call first", status="open"))
    sync(db, server, since=mark)
    assert app.execute("select status from work_orders where id = 1").fetchone() == ("open",)


def test_an_outcome_without_visible_after_settles_at_once(db: sqlite3.Connection) -> None:
    """An outcome of an applier that sends no bound: the row shows the received version
    until the server version including the edit arrives."""
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    sync(db, server)
    app = app_conn(db)
    app.execute("update work_orders set notes = 'mine' where id = 1")
    apply_mod.settle(db, outcomes=[outcome(1)])  # applied upstream, not received yet
    assert awaiting(db) == {1: None}
    assert app.execute("select notes from work_orders where id = 1").fetchone() == ("order 1",)
    mark = server.op_id
    server.put(T1, WO, [1], order(1, notes="mine"))
    sync(db, server, since=mark)
    assert app.execute("select notes from work_orders where id = 1").fetchone() == ("mine",)


def test_outcome_recorded_with_the_apply_of_its_server_version(db: sqlite3.Connection) -> None:
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    sync(db, server)
    app = app_conn(db)
    app.execute("update work_orders set notes = 'mine' where id = 1")
    mark = server.op_id
    server.put(T1, WO, [1], order(1, notes="mine"))
    r = sync(db, server, since=mark, outcomes=[outcome(1)])
    assert r.released == 1 and journal(db)[0][5] == "synced"
    assert app.execute("select notes from work_orders where id = 1").fetchone() == ("mine",)


def awaiting(conn: sqlite3.Connection) -> dict[int, int | None]:
    """Each entry's await_lsn (None: nothing kept on top for it once settled)."""
    return dict(conn.execute(f"select seq, await_lsn from {PREFIX}journal order by seq"))


def row_of(conn: sqlite3.Connection, oid: int) -> tuple[Any, ...] | None:
    found = conn.execute("select status, notes from work_orders where id = ?", (oid,)).fetchone()
    return None if found is None else tuple(found)


def test_an_outcome_before_its_server_version_keeps_the_edit_on_top(
    db: sqlite3.Connection,
) -> None:
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    sync(db, server)
    app = app_conn(db)
    app.execute("update work_orders set notes = 'mine' where id = 1")
    # the office changes the status, then the applier writes the edit: its bound lies
    # above the office's version and at or below the applier's
    mark = server.op_id
    server.put(T1, WO, [1], order(1, status="in_progress"))
    bound = server.lsn(server.op_id) + 1
    # the outcome first: settled, but the edit stays on top (no flicker back to 'order 1')
    assert apply_mod.settle(db, outcomes=[outcome(1, "applied", bound)]) == 1
    assert journal(db)[0][5] == "synced" and awaiting(db) == {1: bound}
    assert row_of(db, 1) == ("open", "mine")
    assert check_tables(db) == []
    # the office's version (below the bound) arrives: the edit stays on top of it
    r = sync(db, server, since=mark)
    assert r.held_rows == 1 and r.verified == [T1]
    assert row_of(db, 1) == ("in_progress", "mine") and awaiting(db) == {1: bound}
    assert check_tables(db) == []
    # the version including the edit: from now on the row is the server's
    mark = server.op_id
    server.put(T1, WO, [1], order(1, status="in_progress", notes="mine"))
    sync(db, server, since=mark)
    assert row_of(db, 1) == ("in_progress", "mine") and awaiting(db) == {1: None}
    assert check_tables(db) == []
    mark = server.op_id
    server.put(T1, WO, [1], order(1, status="in_progress", notes="office"))
    sync(db, server, since=mark)
    assert row_of(db, 1) == ("in_progress", "office")
    # the same outcome delivered again keeps nothing on top any more
    apply_mod.settle(db, outcomes=[outcome(1, "applied", bound)])
    assert awaiting(db) == {1: None} and row_of(db, 1) == ("in_progress", "office")


def test_a_newer_version_releases_the_edit_though_the_office_changed_it_again(
    db: sqlite3.Connection,
) -> None:
    """The relay serves only the latest version of a row: when the office changed the row
    after the applier, the version equal to the outcome's row never arrives; the newer
    one does, and replaces the edit."""
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    sync(db, server)
    app_conn(db).execute("update work_orders set notes = 'mine' where id = 1")
    bound = server.lsn(server.op_id) + 1
    apply_mod.settle(db, outcomes=[outcome(1, "applied", bound)])
    mark = server.op_id
    server.put(T1, WO, [1], order(1, notes="mine"))  # the applier's version …
    server.put(T1, WO, [1], order(1, notes="office", status="closed"))  # … and the office's
    server.log = [o for o in server.log if o["op_id"] != mark + 1]  # compacted away
    sync(db, server, since=mark)
    assert row_of(db, 1) == ("closed", "office") and awaiting(db) == {1: None}
    assert check_tables(db) == []


def test_a_version_received_before_the_outcome_settles_it_at_once(
    db: sqlite3.Connection,
) -> None:
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    server.put(T1, WO, [2], order(2))
    sync(db, server)
    app = app_conn(db)
    app.execute("update work_orders set notes = 'mine' where id in (1, 2)")
    bound = server.lsn(server.op_id) + 1
    mark = server.op_id
    server.put(T1, WO, [1], order(1, notes="mine"))
    server.put(T1, WO, [2], order(2, notes="mine"))
    sync(db, server, since=mark)  # still open: the edits on top
    assert awaiting(db) == {1: None, 2: None}
    # one outcome on its own, the other in the apply of a newer version
    apply_mod.settle(db, outcomes=[outcome(1, "applied", bound)])
    mark = server.op_id
    server.put(T1, WO, [2], order(2, notes="office"))
    sync(db, server, since=mark, outcomes=[outcome(2, "merged", bound)])
    assert awaiting(db) == {1: None, 2: None}
    assert [row_of(db, 1), row_of(db, 2)] == [("open", "mine"), ("open", "office")]
    assert check_tables(db) == []


def test_a_remove_at_or_above_the_bound_before_the_outcome_keeps_nothing(
    db: sqlite3.Connection,
) -> None:
    """The row left the device's buckets after the applier's write, and the REMOVE came
    before the outcome: no version of the row will come any more, nothing is kept."""
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    sync(db, server)
    app_conn(db).execute("update work_orders set status = 'in_progress' where id = 1")
    bound = server.lsn(server.op_id) + 1
    mark = server.op_id
    server.put(T1, WO, [1], order(1, status="in_progress"))  # the applier's version …
    server.remove(T1, WO, [1])  # … then the office reassigns the order
    server.log = [o for o in server.log if o["op_id"] != mark + 1]
    sync(db, server, since=mark)
    assert row_of(db, 1) == ("in_progress", "order 1")  # open: the edit keeps its row
    apply_mod.settle(db, outcomes=[outcome(1, "applied", bound)])
    assert awaiting(db) == {1: None} and row_of(db, 1) is None
    assert check_tables(db) == []


def test_a_resolution_and_the_rows_removal_in_one_download_keep_nothing(
    db: sqlite3.Connection,
) -> None:
    """A kept conflict, resolved on the server (which writes the row), then the office
    moves the row away: one download brings the REMOVE and the ``resolved`` outcome. The
    REMOVE is at or above the resolution's bound, so nothing is kept on top of a row no
    bucket holds (the positions of a kept conflict's ops are recorded like an open edit's)."""
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    sync(db, server)
    app_conn(db).execute("update work_orders set notes = 'mine' where id = 1")
    apply_mod.settle(db, outcomes=[outcome(1, "conflict")])
    assert db.execute(f"select status from {PREFIX}journal").fetchall() == [("conflict",)]
    bound = server.lsn(server.op_id) + 1
    mark = server.op_id
    server.put(T1, WO, [1], order(1, notes="mine"))  # the resolution's write …
    server.remove(T1, WO, [1])  # … then the office reassigns the order
    server.log = [o for o in server.log if o["op_id"] != mark + 1]
    sync(db, server, since=mark, outcomes=[outcome(1, "resolved", bound)])
    assert row_of(db, 1) is None and awaiting(db) == {1: None}
    assert check_tables(db) == []


def test_a_remove_below_the_bound_keeps_the_edit_until_its_version(
    db: sqlite3.Connection,
) -> None:
    """A REMOVE older than the applier's write (the row was out of the buckets for a
    while, and back when the applier wrote it): the version including the edit comes,
    so the edit stays on top until it does."""
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    sync(db, server)
    app_conn(db).execute("update work_orders set notes = 'mine' where id = 1")
    mark = server.op_id
    server.remove(T1, WO, [1])
    bound = server.lsn(server.op_id) + 1
    apply_mod.settle(db, outcomes=[outcome(1, "applied", bound)])
    sync(db, server, since=mark)
    assert row_of(db, 1) == ("open", "mine") and awaiting(db) == {1: bound}
    assert check_tables(db) == []
    mark = server.op_id
    server.put(T1, WO, [1], order(1, notes="mine", status="in_progress"))
    sync(db, server, since=mark)
    assert row_of(db, 1) == ("in_progress", "mine") and awaiting(db) == {1: None}
    assert check_tables(db) == []


def test_an_inserted_row_stays_until_its_first_version_arrives(db: sqlite3.Connection) -> None:
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    sync(db, server)
    app = app_conn(db)
    app.execute("insert into work_orders (id, site, technician, notes) values (9, 'x', 't1', 'n')")
    bound = server.lsn(server.op_id) + 1
    apply_mod.settle(db, outcomes=[outcome(1, "applied", bound)])
    assert row_of(db, 9) == (None, "n") and awaiting(db) == {1: bound}
    assert check_tables(db) == []
    mark = server.op_id
    server.put(T1, WO, [9], order(9, site="x", notes="n"))  # with the server's defaults
    sync(db, server, since=mark)
    assert row_of(db, 9) == ("open", "n") and awaiting(db) == {1: None}


def test_buckets_downloaded_again_release_edits_of_rows_no_bucket_holds(
    db: sqlite3.Connection,
) -> None:
    """The token lost the bucket (``dropped``): neither the inserted row's version nor
    the updated row's will come; nothing is kept for ever."""
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    server.put("catalog[]", PARTS, ["p1"], {"id": "p1", "name": "bolt", "unit": "pc"})
    sync(db, server)
    app = app_conn(db)
    app.execute("update work_orders set notes = 'mine' where id = 1")
    app.execute("insert into work_orders (id, site, technician) values (9, 'x', 't1')")
    app.execute("update parts set name = 'screw' where id = 'p1'")
    bound = server.lsn(server.op_id) + 1
    apply_mod.settle(db, outcomes=[outcome(s, "applied", bound) for s in (1, 2, 3)])
    assert awaiting(db) == {1: bound, 2: bound, 3: bound}
    msg = server.messages(server.op_id)[0]
    msg["dropped"] = [T1]
    del server.rows[T1]
    msg["checkpoint"] = server.checkpoint()
    apply_messages(db, [msg], "c9")
    assert awaiting(db) == {1: None, 2: None, 3: bound}  # the catalog row's stays
    assert local_rows(db) == [] and check_tables(db) == []
    assert db.execute("select name from parts").fetchall() == [("screw",)]


def test_ops_without_a_position_release_awaiting_edits(db: sqlite3.Connection) -> None:
    """An older relay sends no positions: any version of the row replaces the edit."""
    server = FakeServer()
    server.positions = False
    server.put(T1, WO, [1], order(1))
    sync(db, server)
    app_conn(db).execute("update work_orders set notes = 'mine' where id = 1")
    apply_mod.settle(db, outcomes=[outcome(1, "applied", 5000)])
    assert row_of(db, 1) == ("open", "mine")
    mark = server.op_id
    server.put(T1, WO, [1], order(1, status="in_progress"))
    sync(db, server, since=mark)
    assert row_of(db, 1) == ("in_progress", "order 1") and awaiting(db) == {1: None}


def test_an_open_edit_on_top_of_an_awaiting_one(db: sqlite3.Connection) -> None:
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    sync(db, server)
    app = app_conn(db)
    app.execute("update work_orders set notes = 'first' where id = 1")
    bound = server.lsn(server.op_id) + 1
    apply_mod.settle(db, outcomes=[outcome(1, "applied", bound)])
    app.execute("update work_orders set status = 'in_progress' where id = 1")
    # the new edit was made on the row as shown: its old values include the first edit,
    # so the applier sees no conflict with its own write
    second = [e for e in wire_entries(db, "tab-7") if e["seq"] == 2]
    assert second[0]["old"]["notes"] == "first" and second[0]["prev_seq"] is None
    mark = server.op_id
    server.put(T1, WO, [1], order(1, notes="first"))
    sync(db, server, since=mark)
    assert awaiting(db) == {1: None, 2: None}
    assert row_of(db, 1) == ("in_progress", "first") and check_tables(db) == []


def test_pending_delete_and_insert_hold_their_rows(db: sqlite3.Connection) -> None:
    server = FakeServer()
    server.put(T1, WO, [1], order(1))
    sync(db, server)
    app = app_conn(db)
    app.execute("delete from work_orders where id = 1")
    app.execute("insert into work_orders (id, status, done) values (9, 'new', 0)")
    mark = server.op_id
    server.put(T1, WO, [1], order(1, notes="server edit"))
    sync(db, server, since=mark)
    assert local_rows(db) == [(9, "new", None, 0)]  # deleted row stays deleted
    mark = server.op_id
    server.remove(T1, WO, [1])
    server.put(T1, WO, [9], order(9, status="new", notes="from the server", done=False))
    r = sync(db, server, since=mark)
    assert r.released == 0 and [s[5] for s in journal(db)] == ["pending", "pending"]
    assert local_rows(db) == [(9, "new", None, 0)]  # the open insert on top
    apply_mod.settle(db, outcomes=[outcome(1), outcome(2)])
    assert [s[5] for s in journal(db)] == ["synced", "synced"]
    assert local_rows(db) == [(9, "new", "from the server", 0)]


def test_rows_of_several_rules_merge_projections(db: sqlite3.Connection) -> None:
    server = FakeServer()
    key = ["plant-1", "p1"]
    server.put(
        'site["plant-1"]', "public.site_stock", key, {"site": "plant-1", "part_id": "p1", "qty": 4}
    )
    server.put("other[]", "public.site_stock", key, {"site": "plant-1", "part_id": "p1"})
    r = sync(db, server)
    assert not r.mismatched
    assert db.execute("select site, part_id, qty from site_stock").fetchall() == [
        ("plant-1", "p1", 4)
    ]
    mark = server.op_id
    server.remove('site["plant-1"]', "public.site_stock", key)  # still in other[]: stays
    sync(db, server, since=mark)
    assert db.execute("select site, part_id, qty from site_stock").fetchall() == [
        ("plant-1", "p1", None)
    ]
    mark = server.op_id
    server.remove("other[]", "public.site_stock", key)
    sync(db, server, since=mark)
    assert db.execute("select count(*) from site_stock").fetchone() == (0,)


def test_json_values_and_unicode_round_trip(db: sqlite3.Connection) -> None:
    server = FakeServer()
    server.put(T1, WO, [1], order(1, notes="żółw ✓", due={"months": 1, "days": 2, "micros": 3}))
    r = sync(db, server)
    assert r.verified == [T1]
    assert db.execute("select notes from work_orders").fetchone() == ("żółw ✓",)
    assert local_tables.load_tables(db)[WO].kinds["due"] == "json"


@settings(max_examples=60, deadline=None)
@given(
    table=st.sampled_from(["public.t", "s.ü"]),
    key=st.lists(
        st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=5)), min_size=1, max_size=2
    ),
    data=st.dictionaries(
        st.text(max_size=4),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**63 - 1),
            st.text(max_size=8),
            st.floats(allow_nan=False, allow_infinity=False),
        ),
        max_size=5,
    ),
)
def test_term_equals_relay_row_checksum(table: str, key: list[Any], data: dict[str, Any]) -> None:
    rk = row_key_text(key)
    assert term_of(orjson.dumps(table), rk, data) == row_checksum(table, rk, data)
    assert unsigned(signed(row_checksum(table, rk, data))) == row_checksum(table, rk, data)
