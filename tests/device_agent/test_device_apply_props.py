"""Property tests of the apply's bookkeeping: for random op sequences (puts, re-puts,
removes, rows moving between buckets, rows of a table several rules serve, compound and
text keys), applied in random pages and downloads, in bulk or flagged mode:

- every bucket's count and checksum as the apply keeps them (``_fieldsync_buckets``) equal
  the relay's (``core.row_wire.row_checksum`` over the rows the bucket holds) and the sums
  of the terms in ``_fieldsync_rows`` (:func:`device_agent.bucket_ops.local_checksums`);
- every hold carries the position of the last op of its row in its bucket (the base a
  journal entry copies), and the term of that op's data;
- the tables show the current version of each row some bucket holds, and nothing else,
  whichever order a row's PUT in a new bucket and its REMOVE from the old one come in.

And the staging area gives back exactly the messages staged, in either stored form.
"""

from __future__ import annotations

import sqlite3
import tempfile
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from core.row_wire import row_checksum, row_key_text
from device_agent import local_db, staging
from device_agent.apply import apply_messages
from device_agent.bucket_ops import local_checksums, signed
from device_agent.errors import StateError
from device_agent.local_tables import PREFIX
from device_agent.positions import pos_text
from device_agent.relay_schema import parse_schema
from device_agent.schema_sync import apply_schema
from tests.device_agent.test_device_apply import PARTS, SCHEMA, WO, FakeServer, order

STOCK = "public.site_stock"
BUCKETS = ('tech_orders["t1"]', 'tech_orders["t2"]', "catalog[]")
TABLES = {WO: "work_orders", PARTS: "parts", STOCK: "site_stock"}


def fresh_db(directory: str) -> sqlite3.Connection:
    conn = local_db.connect(str(Path(directory) / "device.db"))
    local_db.ensure_metadata(conn)
    local_db.set_meta(conn, "relay_url", "http://relay.invalid")
    apply_schema(conn, parse_schema(SCHEMA))
    return conn


def key_of(table: str, n: int) -> list[Any]:
    if table == WO:
        return [n]
    if table == PARTS:
        return [f"p-{n}"]
    return [f"site-{n % 2}", n]


def data_of(table: str, key: list[Any], v: int) -> dict[str, Any]:
    if table == WO:
        return order(key[0], status=f"s{v}", due={"v": v, "a": [v, "x"]}, done=v % 2 == 0)
    if table == PARTS:
        return {"id": key[0], "name": f"part ✓ {v}", "unit": v / 4}
    return {"site": key[0], "part_id": key[1], "qty": v}


op_strategy = st.tuples(
    st.sampled_from(["put", "put", "remove", "move"]),
    st.sampled_from(sorted(TABLES)),
    st.integers(0, 6),  # row
    st.integers(0, 2),  # bucket
    st.integers(0, 2),  # other bucket (move)
    st.integers(0, 99),  # value
)


def holders(server: FakeServer, table: str, rk: str) -> set[str]:
    return {b for b, rows in server.rows.items() if (table, rk) in rows}


def play(
    server: FakeServer,
    current: dict[tuple[str, str], dict[str, Any]],
    op: tuple[str, str, int, int, int, int],
) -> None:
    """One change as the relay serves it: a row's new version goes to every bucket that
    holds it (one rule: the buckets hold the same version), a move puts the new version in
    the new bucket and removes the row from the old one, in either order."""
    kind, table, n, b, other, v = op
    key = key_of(table, n)
    rk = row_key_text(key)
    if kind == "remove":  # also from a bucket that does not hold it
        server.remove(BUCKETS[b], table, key)
        return
    data = current[(table, rk)] = data_of(table, key, v)
    source, target = BUCKETS[b], BUCKETS[other]
    if kind == "put":
        for bucket in sorted(holders(server, table, rk) | {source}):
            server.put(bucket, table, key, data)
        return
    targets = sorted((holders(server, table, rk) - {source}) | {target})
    if other > b:  # the new bucket's PUT first
        for bucket in targets:
            server.put(bucket, table, key, data)
        server.remove(source, table, key)
    else:
        server.remove(source, table, key)
        for bucket in targets:
            server.put(bucket, table, key, data)


def check(
    conn: sqlite3.Connection, server: FakeServer, current: dict[tuple[str, str], dict[str, Any]]
) -> None:
    expected = server.checkpoint()["buckets"]
    kept = {
        name: (int(count), int(checksum))
        for name, count, checksum in conn.execute(
            f"select name, count, checksum from {PREFIX}buckets"
        )
    }
    summed = local_checksums(conn)
    for name, cp in expected.items():
        want = (cp["count"], int(cp["checksum"]))
        assert kept.get(name, (0, 0)) == want, name
        assert summed.get(name, (0, 0)) == want, name
    # each hold: the term and position of the last op of its row in its bucket
    last: dict[tuple[str, str, str], dict[str, Any]] = {}
    for o in server.log:
        last[(o["bucket"], o["table"], row_key_text(o["key"]))] = o
    ids = {n: i for i, n in conn.execute(f"select id, name from {PREFIX}tables")}
    names = {i: n for n, i in ids.items()}
    buckets = {i: n for i, n in conn.execute(f"select id, name from {PREFIX}buckets")}
    holds = {}
    for tbl, k, bucket, term, pos in conn.execute(
        f"select tbl, k, bucket, term, pos from {PREFIX}rows"
    ):
        table = names[tbl]
        key = orjson.loads(k) if table == STOCK else [k]
        holds[(buckets[bucket], table, row_key_text(key))] = (term, pos)
    want_holds = {}
    for (b, table, rk), o in last.items():
        if o["op"] == "PUT":
            term = signed(row_checksum(table, rk, o["data"]))
            want_holds[(b, table, rk)] = (term, pos_text(o.get("position")))
    assert holds == want_holds
    # the tables: the current version of every row some bucket holds (no edits here)
    for table in (WO, PARTS):
        latest = [
            data for (t, rk), data in current.items() if t == table and holders(server, table, rk)
        ]
        local = TABLES[table]
        count = conn.execute(f'select count(*) from "{local}"').fetchone()[0]
        assert count == len(latest), table
        for data in latest:
            cols = list(data)
            row = conn.execute(
                f'select {", ".join(cols)} from "{local}" where id = ?', (data["id"],)
            ).fetchone()
            assert row == tuple(local_db.to_sql(data[c]) for c in cols), (table, data)


# a row PUT in a second bucket and again in its first, then REMOVEd from the first, in one
# page: the table shows the version of that PUT, which the second bucket still holds
@example(
    rounds=[
        [
            *[("put", PARTS, 0, 0, 0, 0)] * 10,
            ("put", PARTS, 2, 0, 0, 1),
            ("remove", PARTS, 0, 0, 0, 0),
            *[("put", PARTS, 0, 2, 0, 0)] * 2,
            *[("put", PARTS, 1, 0, 0, 0)] * 2,
            *[("put", PARTS, 0, 1, 0, 0)] * 2,
            ("put", PARTS, 2, 2, 0, 0),
            *[("put", PARTS, 0, 0, 0, 0)] * 2,
            ("put", PARTS, 1, 0, 0, 0),
            ("remove", PARTS, 2, 0, 0, 0),
        ]
    ],
    page=10,
    bulk_ops=1,
).via("discovered failure")
@settings(max_examples=100, deadline=None)
@given(
    rounds=st.lists(st.lists(op_strategy, max_size=25), min_size=1, max_size=4),
    page=st.integers(1, 12),
    bulk_ops=st.sampled_from([1, 10_000]),
)
def test_bucket_sums_holds_and_rows_follow_random_ops(
    rounds: list[list[tuple[str, str, int, int, int, int]]], page: int, bulk_ops: int
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        conn = fresh_db(directory)
        try:
            server = FakeServer()
            current: dict[tuple[str, str], dict[str, Any]] = {}
            since = 0
            for ops in rounds:
                for op in ops:
                    play(server, current, op)
                msgs = server.messages(since, page)
                total = sum(len(m["ops"]) for m in msgs)
                r = apply_messages(
                    conn, msgs, f"c{server.op_id}", bulk_ops=bulk_ops, total_ops=total
                )
                assert r.mismatched == []
                since = server.op_id
                check(conn, server, current)
        finally:
            conn.close()


@settings(max_examples=25, deadline=None)
@given(
    messages=st.lists(
        st.fixed_dictionaries(
            {
                "ops": st.lists(
                    st.fixed_dictionaries(
                        {"op_id": st.integers(1, 10**12), "data": st.text(max_size=30)}
                    ),
                    max_size=5,
                ),
                "cursor": st.text(min_size=1, max_size=10),
            }
        ),
        max_size=4,
    ),
    legacy=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_staged_messages_come_back_as_staged(
    messages: list[dict[str, Any]], legacy: list[bool]
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        conn = fresh_db(directory)
        try:
            for msg, plain in zip(messages, legacy, strict=False):
                if plain:  # as earlier versions stored it: the JSON text
                    conn.execute(
                        f"insert into {PREFIX}staging (message) values (?)", (orjson.dumps(msg),)
                    )
                else:
                    staging.stage(conn, msg)
            stored = [r[0] for r in conn.execute(f"select message from {PREFIX}staging")]
            for blob, plain in zip(stored, legacy, strict=False):
                assert (blob[:1] == b"{") == plain
            last = {"ops": [], "cursor": "end"}
            n = staging.staged_count(conn)
            assert list(staging.staged_messages(conn, n, last)) == [*messages, last]
        finally:
            conn.close()


def test_an_unreadable_staged_message_is_named(tmp_path: Path) -> None:
    conn = fresh_db(str(tmp_path))
    try:
        conn.execute(
            f"insert into {PREFIX}staging (message) values (?)",
            (zlib.compress(b'{"ops": [')[:-3],),
        )
        with pytest.raises(StateError, match=r"staged message 1 .* is unreadable"):
            list(staging.staged_messages(conn, 1, {}))
    finally:
        conn.close()


def test_a_boolean_key_has_the_relays_checksum_term(tmp_path: Path) -> None:
    conn = fresh_db(str(tmp_path))
    try:
        server = FakeServer()
        server.put("catalog[]", PARTS, [True], {"id": True, "name": "yes", "unit": 1.5})
        r = apply_messages(conn, server.messages(), f"c{server.op_id}")
        assert (r.verified, r.mismatched) == (["catalog[]"], [])
        cp = server.checkpoint()["buckets"]["catalog[]"]
        assert local_checksums(conn)["catalog[]"] == (1, int(cp["checksum"]))
    finally:
        conn.close()
