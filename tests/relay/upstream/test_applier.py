"""The upstream applier against real PostgreSQL and the broker: rows, merges, kept
conflicts and their resolution, outcomes, origin in the cdc stream, idempotency,
restart from stored offsets, and SIGKILL at random moments (exactly once)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core.hlc import Hlc
from core.journal_format import JournalRecord, Reason, Rejection, entry_from_json
from core.journal_outcomes import Outcome, decode_outcomes
from relay.errors import ConfigError
from relay.upstream.applier import Applier
from relay.upstream.applier_db import ApplierDb
from tests.cdc.cdc_support import make_settings, running_daemon, table_events, wait_for
from tests.fix_kafka import read_topic
from tests.schemas import REPO

TABLES = """
create table work_orders (
    id bigint primary key,
    site text not null,
    technician text,
    status text not null default 'open',
    cost numeric(10,2),
    notes text,
    qty int not null default 0,
    updated_at timestamptz not null default now()
);
create table parts (id text primary key, name text not null, stock int not null default 0);
"""

RULES = """
token_claims = ["technician"]

[[bucket]]
name = "tech"
parameters = ["technician"]
claims = { technician = "technician" }

[[bucket.table]]
table = "public.work_orders"
match = { technician = "technician" }
filters = [{ column = "status", op = "!=", value = "archived" }]
exclude = ["cost"]

[[bucket]]
name = "catalog"

[[bucket.table]]
table = "public.parts"
"""

CONFLICTS = """
[[table]]
table = "public.work_orders"
policy = "lww"
time_column = "updated_at"

[table.columns]
status = { policy = "precedence", order = ["cancelled", "completed", "in_progress", "open"], fallback = "lww" }
notes = "ask"
qty = "counter"

[[table]]
table = "public.parts"
policy = "ask"
"""

BASE_ROW = {
    "id": 1,
    "site": "s1",
    "technician": "t42",
    "status": "open",
    "notes": "n0",
    "qty": 5,
}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Env:
    """A captured database with the two tables, rules and conflicts files, a topic prefix."""

    def __init__(self, dsn: str, bootstrap: str, prefix: str, tmp: Path) -> None:
        self.dsn, self.bootstrap, self.prefix = dsn, bootstrap, prefix
        self.rules = tmp / "rules.toml"
        self.rules.write_text(RULES)
        self.conflicts = tmp / "conflicts.toml"
        self.conflicts.write_text(CONFLICTS)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute(TABLES)
        self.seqs: dict[str, int] = {}
        self._producer: Any = None
        self.appliers: list[Applier] = []

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []

    def row(self, table: str, key: Any) -> dict[str, Any] | None:
        cur = self.conn.execute(f"select * from {table} where id = %s", (key,))
        found = cur.fetchone()
        if found is None:
            return None
        assert cur.description is not None
        return dict(zip([d.name for d in cur.description], found, strict=True))

    def applier(self, **kw: Any) -> Applier:
        db = ApplierDb(self.dsn, self.rules, self.conflicts, **kw)
        applier = Applier(
            db, kafka={"bootstrap_servers": self.bootstrap}, prefix=self.prefix, batch_max_ms=20
        )
        self.appliers.append(applier)
        return applier

    def run(self, applier: Applier | None = None) -> Applier:
        applier = applier or (self.appliers[0] if self.appliers else self.applier())
        applier.run_until_idle(timeout=60)
        return applier

    def record(
        self,
        device: str,
        op: str,
        key: list[Any],
        old: dict[str, Any] | None,
        new: dict[str, Any] | None,
        *,
        table: str = "public.work_orders",
        at_ms: int | None = None,
        prev_seq: int | None = None,
        technician: str = "t42",
        seq: int | None = None,
        rejection: Rejection | None = None,
    ) -> JournalRecord:
        if seq is None:
            seq = self.seqs.get(device, 0) + 1
        self.seqs[device] = max(seq, self.seqs.get(device, 0))
        raw = {
            "seq": seq,
            "table": table,
            "op": op,
            "key": key,
            "old": old,
            "new": new,
            "base": {"commit_lsn": 1, "seq": 0},
            "hlc": Hlc(at_ms or now_ms(), 0, device).encode(),
            "prev_seq": prev_seq,
        }
        entry = None if rejection else entry_from_json(raw, device)
        return JournalRecord(
            device,
            seq,
            entry,
            {"sub": device, "technician": technician},
            rejection,
            now_ms() * 1000,
        )

    def produce(self, *records: JournalRecord) -> None:
        from kafka import KafkaProducer

        if self._producer is None:
            self._producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        for r in records:
            self._producer.send(f"{self.prefix}._journal", key=r.kafka_key, value=r.to_bytes())
        self._producer.flush()

    def outcomes(self, expect: int = 0) -> dict[tuple[str, int], Outcome]:
        """The latest outcome per (device, seq) in ``_outcomes`` (waiting for ``expect``)."""
        deadline = time.monotonic() + 90
        while True:
            records = read_topic(self.bootstrap, f"{self.prefix}._outcomes", timeout=30)
            latest: dict[tuple[str, int], Outcome] = {}
            for r in records:
                for o in decode_outcomes(r.value):
                    assert r.key == o.device_id.encode()
                    latest[(o.device_id, o.seq)] = o
            if len(latest) >= expect or time.monotonic() > deadline:
                return latest
            time.sleep(0.2)

    def close(self) -> None:
        for a in self.appliers:
            a.close()
        if self._producer is not None:
            self._producer.close()
        self.conn.close()


@pytest.fixture
def env(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Iterator[Env]:
    e = Env(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    first = e.applier()
    first._start()
    first.ensure_topics()
    try:
        yield e
    finally:
        e.close()


def insert_base(env: Env, **changes: Any) -> dict[str, Any]:
    row = {**BASE_ROW, **changes}
    cols = ", ".join(row)
    env.sql(
        f"insert into work_orders ({cols}) values ({', '.join(['%s'] * len(row))})", *row.values()
    )
    return row


def seen(row: dict[str, Any]) -> dict[str, Any]:
    """What the device holds of a work order (cost excluded, updated_at as µs)."""
    return {k: v for k, v in row.items() if k not in ("cost", "updated_at")}


# --------------------------------------------------------------------------- basics


def test_update_is_applied_with_the_device_as_origin_in_the_change_stream(env: Env) -> None:
    base = insert_base(env)
    settings = make_settings(env.dsn, env.bootstrap, env.prefix)
    with running_daemon(settings):
        env.produce(env.record("d1", "update", [1], seen(base), {"notes": "fixed pump"}))
        env.run()
        events = wait_for(
            lambda: [
                e
                for e in table_events(env.bootstrap, env.prefix, "work_orders", timeout=30)
                if e["op"] == "u"
            ],
            timeout=60,
            what="the applier's update in the change stream",
        )
    assert events[0]["after"]["notes"] == "fixed pump"
    assert events[0]["source"]["origin"] == "device:d1"
    row = env.row("work_orders", 1)
    assert row is not None and row["notes"] == "fixed pump"
    out = env.outcomes(expect=1)[("d1", 1)]
    assert out.kind.value == "applied" and out.columns == {"notes": "device"}
    assert out.row is not None and out.row["notes"] == "fixed pump" and "cost" not in out.row
    audit = env.sql(
        "select outcome, tbl, row_key, op, applied_at is not null from fieldsync_applier.applied"
    )
    assert audit == [("applied", "public.work_orders", "[1]", "update", True)]


def test_outcomes_that_wrote_their_row_bound_the_positions_of_its_versions(env: Env) -> None:
    """``visible_after``: above the commit_lsn of every version of the row committed
    before the applier wrote it, at or below that of the applier's change event and of
    every later version; absent from outcomes that wrote nothing (nothing to change, a
    kept conflict, a rejection).  A resolution that writes carries its own."""
    b1, b2, b3 = insert_base(env), insert_base(env, id=2), insert_base(env, id=3)
    with running_daemon(make_settings(env.dsn, env.bootstrap, env.prefix)):
        # office versions before the device's edits are applied
        env.sql("update work_orders set status = 'in_progress', updated_at = now() where id = 1")
        env.sql("update work_orders set notes = 'same', updated_at = now() where id = 2")
        env.sql("update work_orders set notes = 'office', updated_at = now() where id = 3")
        env.produce(
            env.record("d1", "update", [1], seen(b1), {"site": "s7"}),
            env.record("d1", "update", [2], seen(b2), {"notes": "same"}),  # the server has it
            env.record("d1", "update", [3], seen(b3), {"notes": "mine"}),  # ask: kept
            env.record("d1", "insert", [4], None, {"id": 4, "site": "s4", "technician": "t42"}),
            env.record("d1", "delete", [2], {**seen(b2), "notes": "same"}, None),
            env.record("d2", "update", [1], seen(b1), {"notes": "x"}, technician="t9"),
        )
        applier = env.run()
        outs = env.outcomes(expect=6)
        kinds = {k: (o.kind.value, o.visible_after is not None) for k, o in outs.items()}
        assert kinds == {
            ("d1", 1): ("applied", True),
            ("d1", 2): ("applied", False),
            ("d1", 3): ("conflict", False),
            ("d1", 4): ("applied", True),
            ("d1", 5): ("applied", True),
            ("d2", 1): ("rejected", False),
        }
        env.sql("update work_orders set qty = 9 where id = 1")  # an office version after
        conflict = outs[("d1", 3)].conflict
        assert conflict is not None
        resolved = applier.db.resolve(conflict["id"], "device", by="dispatcher")
        assert resolved.visible_after is not None
        events = wait_for(
            lambda: (
                found
                if len(found := table_events(env.bootstrap, env.prefix, "work_orders", timeout=30))
                >= 11
                else None
            ),
            timeout=60,
            what="every version of the rows in the change stream",
        )
    history: dict[int, list[tuple[str, str, int]]] = {}  # per row: (op, who, commit_lsn)
    for e in sorted(events, key=lambda e: tuple(e["_pos"])):
        who = e["source"]["origin"] or "office"
        history.setdefault(e["_key"]["id"], []).append((e["op"], who, e["_pos"][0]))
    resolver = f"resolve:{conflict['id']}"
    assert {k: [(op, who) for op, who, _ in h] for k, h in history.items()} == {
        1: [("r", "office"), ("u", "office"), ("u", "device:d1"), ("u", "office")],
        2: [("r", "office"), ("u", "office"), ("d", "device:d1")],
        3: [("r", "office"), ("u", "office"), ("u", resolver)],
        4: [("c", "device:d1")],
    }
    lsn = {k: [at for _, _, at in h] for k, h in history.items()}
    b1, b4, b5 = (outs[("d1", seq)].visible_after or 0 for seq in (1, 4, 5))
    # earlier versions below the bound; the applier's own and later ones at or above it
    assert lsn[1][0] < lsn[1][1] < b1 <= lsn[1][2] < lsn[1][3]
    assert lsn[2][0] < lsn[2][1] < b5 <= lsn[2][2]
    assert b4 <= lsn[4][0]
    assert lsn[3][1] < b1 <= (resolved.visible_after or 0) <= lsn[3][2]


def test_insert_and_delete(env: Env) -> None:
    env.produce(
        env.record(
            "d1", "insert", [2], None, {"id": 2, "site": "s2", "technician": "t42", "notes": "new"}
        ),
        env.record(
            "d1",
            "delete",
            [2],
            {"id": 2, "site": "s2", "technician": "t42", "notes": "new"},
            None,
            prev_seq=1,
        ),
        env.record("d1", "insert", [3], None, {"id": 3, "site": "s3", "technician": "t42"}),
    )
    env.run()
    assert env.row("work_orders", 2) is None
    row = env.row("work_orders", 3)
    assert row is not None and row["status"] == "open"  # the column default
    outs = env.outcomes(expect=3)
    assert [outs[("d1", s)].kind.value for s in (1, 2, 3)] == ["applied"] * 3
    assert outs[("d1", 3)].row is not None and outs[("d1", 3)].row["status"] == "open"


# --------------------------------------------------------------------------- merging


def test_server_edits_merge_column_by_column(env: Env) -> None:
    base = insert_base(env)
    # the server changes status, qty and site meanwhile
    env.sql(
        "update work_orders set status = 'completed', qty = 7, site = 's9', updated_at = now() where id = 1"
    )
    device_edit = {"status": "cancelled", "qty": 6, "notes": "n1"}
    env.produce(env.record("d1", "update", [1], seen(base), device_edit, at_ms=now_ms() - 5_000))
    env.run()
    row = env.row("work_orders", 1)
    assert row is not None
    assert row["status"] == "cancelled"  # precedence: cancelled beats completed
    assert row["qty"] == 8  # counter: 7 + (6 - 5)
    assert row["notes"] == "n1"  # only the device changed it
    assert row["site"] == "s9"  # only the server changed it
    out = env.outcomes(expect=1)[("d1", 1)]
    assert out.kind.value == "merged"
    assert out.columns == {"status": "device", "qty": "combined", "notes": "device"}


def test_lww_between_two_devices_editing_offline(env: Env) -> None:
    base = insert_base(env)
    insert_base(env, id=2)
    t = now_ms()
    # row 1: the later edit (d2) arrives first, the earlier (d1) second: d2 stays
    # row 2: the earlier edit (d1) arrives first, the later (d2) second: d2 wins
    # (devices are in different partitions: each batch is applied before the next is sent)
    for record in (
        env.record("d2", "update", [1], seen(base), {"site": "from-d2"}, at_ms=t - 1_000),
        env.record(
            "d1",
            "update",
            [1],
            seen(base),
            {"site": "from-d1", "notes": "d1 notes"},
            at_ms=t - 2_000,
        ),
        env.record(
            "d1", "update", [2], seen({**base, "id": 2}), {"site": "from-d1"}, at_ms=t - 2_000
        ),
        env.record(
            "d2", "update", [2], seen({**base, "id": 2}), {"site": "from-d2"}, at_ms=t - 1_000
        ),
    ):
        env.produce(record)
        env.run()
    one, two = env.row("work_orders", 1), env.row("work_orders", 2)
    assert one is not None and two is not None
    assert one["site"] == "from-d2" and one["notes"] == "d1 notes"  # disjoint columns merge
    assert two["site"] == "from-d2"
    outs = env.outcomes(expect=4)
    assert outs[("d1", 1)].columns == {"site": "server", "notes": "device"}
    assert outs[("d2", 2)].columns == {"site": "device"}


def test_lww_against_the_server_uses_the_time_column_and_clamps_device_clocks(env: Env) -> None:
    base = insert_base(env)
    insert_base(env, id=2)
    env.sql("update work_orders set site = 'server', updated_at = now() where id in (1, 2)")
    env.produce(
        env.record("d1", "update", [1], seen(base), {"site": "old edit"}, at_ms=now_ms() - 60_000),
        env.record(
            "d1",
            "update",
            [2],
            seen({**base, "id": 2}),
            {"site": "later edit"},
            at_ms=now_ms() + 1_000,
        ),
    )
    env.run()
    assert env.sql("select id, site from work_orders order by id") == [
        (1, "server"),
        (2, "later edit"),
    ]
    # a device clock two hours ahead is clamped to now + max skew (0): a server edit stamped
    # one hour ahead wins, which it would not against the unclamped device time.  (An
    # hour, not a second: the device time is clamped to the applier's clock when it
    # applies, however long after the server edit that is on a busy machine.)
    insert_base(env, id=3)
    applier = env.applier(max_skew_ms=0)
    env.produce(
        env.record(
            "d9",
            "update",
            [3],
            seen({**base, "id": 3}),
            {"site": "future"},
            at_ms=now_ms() + 7_200_000,
        )
    )
    env.sql(
        "update work_orders set site = 'server now', updated_at = now() + interval '1 hour' where id = 3"
    )
    env.appliers[0].close()
    env.run(applier)
    assert env.sql("select site from work_orders where id = 3") == [("server now",)]


def test_ask_keeps_the_conflict_until_resolved_and_resolving_twice_is_harmless(env: Env) -> None:
    base = insert_base(env)
    env.sql("update work_orders set notes = 'server notes', updated_at = now() where id = 1")
    env.produce(
        env.record("d1", "update", [1], seen(base), {"notes": "device notes", "site": "s2"})
    )
    applier = env.run()
    row = env.row("work_orders", 1)
    assert row is not None and row["notes"] == "server notes" and row["site"] == "s2"
    out = env.outcomes(expect=1)[("d1", 1)]
    assert out.kind.value == "conflict" and out.conflict is not None
    assert out.conflict["columns"] == {
        "notes": {"base": "n0", "server": "server notes", "device": "device notes"}
    }
    conflict_id = out.conflict["id"]
    listed = applier.db.open_conflicts("d1")
    assert [c["id"] for c in listed] == [conflict_id]

    resolved = applier.db.resolve(conflict_id, "device", by="dispatcher")
    assert resolved.kind.value == "resolved" and resolved.row is not None
    assert resolved.row["notes"] == "device notes"
    assert env.sql("select notes from work_orders where id = 1") == [("device notes",)]
    # the server moves on; resolving again returns the first resolution and writes nothing
    env.sql("update work_orders set notes = 'later' where id = 1")
    again = applier.db.resolve(conflict_id, "server")
    assert again == resolved
    assert env.sql("select notes from work_orders where id = 1") == [("later",)]
    assert applier.db.open_conflicts() == []
    applier.step()  # publishes the outbox
    wait_for(
        lambda: env.outcomes()[("d1", 1)].kind.value == "resolved",
        what="the resolved outcome in _outcomes",
    )
    status = env.sql("select status, resolved_by from fieldsync_applier.conflicts")
    assert status == [("resolved", "dispatcher")]


def test_resolve_with_values_and_unknown_conflicts(env: Env) -> None:
    base = insert_base(env)
    env.sql("update work_orders set notes = 'server notes', updated_at = now() where id = 1")
    env.produce(env.record("d1", "update", [1], seen(base), {"notes": "device notes"}))
    applier = env.run()
    conflict_id = applier.db.open_conflicts()[0]["id"]
    from relay.errors import ConflictNotFound, ResolveError

    with pytest.raises(ResolveError, match="not in conflict"):
        applier.db.resolve(conflict_id, "values", {"site": "x"})
    with pytest.raises(ConflictNotFound):
        applier.db.resolve("nope", "server")
    applier.db.resolve(conflict_id, "values", {"notes": "both notes"})
    assert env.sql("select notes from work_orders where id = 1") == [("both notes",)]


# --------------------------------------------------------------------------- row-level results


def test_defined_row_level_results(env: Env) -> None:
    base = insert_base(env)  # id 1: insert of an existing key
    insert_base(env, id=2)  # id 2: deleted on the server, then updated by the device
    insert_base(env, id=3)  # id 3: updated on the server, deleted by the device
    env.sql("delete from work_orders where id = 2")
    env.sql("update work_orders set site = 'moved', updated_at = now() where id = 3")
    t = now_ms() - 2_000
    env.produce(
        env.record("d1", "insert", [1], None, {**seen(base), "site": "dup"}, at_ms=t),
        env.record("d1", "update", [2], seen({**base, "id": 2}), {"notes": "x"}, at_ms=t),
        env.record("d1", "delete", [3], seen({**base, "id": 3}), None, at_ms=t),
        env.record("d1", "delete", [4], seen({**base, "id": 4}), None, at_ms=t),
    )
    env.run()
    outs = env.outcomes(expect=4)
    dup = outs[("d1", 1)]
    assert dup.kind.value == "merged" and "already existed" in dup.message
    # lww: the server's row is newer than the edit; equal columns stay; a counter adds the insert
    assert dup.columns == {
        "site": "server",
        "technician": "equal",
        "status": "equal",
        "notes": "equal",
        "qty": "combined",
    }
    assert env.sql("select site, qty from work_orders where id = 1") == [("s1", 10)]
    gone = outs[("d1", 2)]
    assert gone.kind.value == "merged" and gone.row is None and "delete stands" in gone.message
    assert env.row("work_orders", 2) is None
    kept = outs[("d1", 3)]
    assert kept.kind.value == "merged" and "server's row stays" in kept.message
    assert kept.row is not None and kept.row["site"] == "moved"
    assert env.row("work_orders", 3) is not None
    missing = outs[("d1", 4)]
    assert missing.kind.value == "applied" and "already deleted" in missing.message


def test_row_level_ask_keeps_both_versions(env: Env) -> None:
    env.sql("insert into parts values ('p1', 'bolt', 3), ('p2', 'nut', 4)")
    env.sql("update parts set name = 'bolt M8' where id = 'p1'")
    env.sql("delete from parts where id = 'p2'")
    env.produce(
        env.record(
            "d1",
            "delete",
            ["p1"],
            {"id": "p1", "name": "bolt", "stock": 3},
            None,
            table="public.parts",
        ),
        env.record(
            "d1",
            "update",
            ["p2"],
            {"id": "p2", "name": "nut", "stock": 4},
            {"stock": 9},
            table="public.parts",
        ),
    )
    applier = env.run()
    outs = env.outcomes(expect=2)
    first, second = outs[("d1", 1)], outs[("d1", 2)]
    assert first.kind.value == second.kind.value == "conflict"
    assert first.conflict is not None and first.conflict["row"] == {
        "server": {"id": "p1", "name": "bolt M8", "stock": 3},
        "device": None,
    }
    assert second.conflict is not None and second.conflict["row"]["device"] == {
        "id": "p2",
        "name": "nut",
        "stock": 9,
    }
    assert env.sql("select id from parts order by id") == [("p1",)]
    applier.db.resolve(first.conflict["id"], "device")  # the delete goes through
    applier.db.resolve(second.conflict["id"], "device")  # the row comes back
    assert env.sql("select id, name, stock from parts order by id") == [("p2", "nut", 9)]


# --------------------------------------------------------------------------- rejections and order


def test_rejections_do_not_block_other_entries_except_dependent_ones(env: Env) -> None:
    base = insert_base(env)
    insert_base(env, id=2, technician="t9")  # not this device's row
    env.produce(
        # 1: moves row 1 out of the device's buckets → rejected
        env.record("d1", "update", [1], seen(base), {"technician": "t9"}),
        # 2: made on top of 1 → blocked
        env.record(
            "d1",
            "update",
            [1],
            {**seen(base), "technician": "t9"},
            {"notes": "after move"},
            prev_seq=1,
        ),
        # 3: the same row, not depending on 1 → applied
        env.record("d1", "update", [1], seen(base), {"notes": "independent"}),
        # 4: a row of another technician → forbidden_row, and its content is not shown
        env.record("d1", "update", [2], seen({**base, "id": 2}), {"notes": "x"}),
        # 5: NOT NULL violation → db_error, alone
        env.record("d1", "insert", [5], None, {"id": 5, "site": None, "technician": "t42"}),
        # 6: applied although 5 failed in the same run
        env.record(
            "d1", "update", [1], {**seen(base), "notes": "independent"}, {"qty": 6}, prev_seq=3
        ),
        # 7: rejected at intake
        env.record(
            "d1",
            "update",
            [1],
            None,
            None,
            rejection=Rejection(Reason.ENTRY_TOO_LARGE, "entry 7 is too large"),
        ),
        # 8: a column the device does not receive
        env.record("d1", "update", [1], {**seen(base), "cost": "1.00"}, {"cost": "2.00"}),
    )
    env.run()
    outs = env.outcomes(expect=8)
    reasons = {seq: (outs[("d1", seq)].kind.value, outs[("d1", seq)].reason) for seq in range(1, 9)}
    assert reasons == {
        1: ("rejected", "forbidden_move"),
        2: ("rejected", "blocked"),
        3: ("applied", None),
        4: ("rejected", "forbidden_row"),
        5: ("rejected", "db_error"),
        6: ("applied", None),
        7: ("rejected", "entry_too_large"),
        8: ("rejected", "forbidden_column"),
    }
    assert "not-null" in outs[("d1", 5)].message or "null value" in outs[("d1", 5)].message
    assert outs[("d1", 4)].row is None
    assert outs[("d1", 1)].row is not None and outs[("d1", 1)].row["technician"] == "t42"
    row = env.row("work_orders", 1)
    assert row is not None and (row["technician"], row["notes"], row["qty"]) == (
        "t42",
        "independent",
        6,
    )
    assert env.row("work_orders", 5) is None
    assert env.sql("select count(*) from fieldsync_applier.applied") == [(8,)]


def test_unreadable_records_are_kept_aside(env: Env) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=env.bootstrap)
    producer.send(f"{env.prefix}._journal", key=b"d1", value=b"not json")
    producer.flush()
    producer.close()
    base = insert_base(env)
    env.produce(env.record("d1", "update", [1], seen(base), {"notes": "ok"}))
    env.run()
    assert env.sql("select error like '%not JSON%' from fieldsync_applier.bad_records") == [(True,)]
    assert env.sql("select notes from work_orders") == [("ok",)]


# --------------------------------------------------------------------------- exactly once


def test_redelivery_and_restart_apply_nothing_twice(env: Env) -> None:
    base = insert_base(env)
    records = [
        env.record(f"d{n % 3}", "update", [1], seen(base), {"qty": base["qty"] + 1})
        for n in range(30)
    ]
    env.produce(*records)
    env.run()
    assert env.sql("select qty from work_orders") == [(5 + 30,)]
    env.produce(*records)  # delivered again (a relay retrying, a device re-uploading)
    applier = env.run()
    assert env.sql("select qty from work_orders") == [(35,)]
    assert applier.stats.duplicates == 30
    env.appliers[0].close()
    restarted = env.applier()
    restarted.run_until_idle(timeout=30)
    assert restarted.stats.records == 0  # resumed at the stored offsets
    assert env.sql("select qty from work_orders") == [(35,)]
    assert env.sql("select count(*) from fieldsync_applier.applied") == [(30,)]


def test_a_row_changed_between_read_and_write_is_merged_again(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows are read without locks and written only if unchanged (xmin); a concurrent
    change makes the run roll back and merge again, so no server change is lost."""
    from relay.upstream import applier_run as applier_module

    base = insert_base(env)
    original = applier_module.RunState.flush
    fired: list[bool] = []

    def flush_after_a_concurrent_update(self: Any) -> None:
        if self.queue and not fired:
            fired.append(True)
            with psycopg.connect(env.dsn, autocommit=True) as other:
                other.execute("update work_orders set qty = 10 where id = 1")
        original(self)

    monkeypatch.setattr(applier_module.RunState, "flush", flush_after_a_concurrent_update)
    env.produce(env.record("d1", "update", [1], seen(base), {"qty": 6}))
    applier = env.run()
    assert fired and applier.stats.run_retries >= 1
    assert env.sql("select qty from work_orders") == [(11,)]  # 10 + (6 - 5), not 6


def test_shards_split_the_partitions_and_overlapping_shards_apply_nothing_twice(env: Env) -> None:
    import threading

    for i in range(1, 9):
        insert_base(env, id=i, qty=0)
    records = [
        env.record(
            f"s{n % 8}",
            "update",
            [1 + n % 8],
            seen({**BASE_ROW, "id": 1 + n % 8, "qty": 0}),
            {"qty": 1},
        )
        for n in range(160)
    ]
    env.produce(*records)
    env.appliers[0].close()
    # shard 0 and 1 of 2, plus a misconfigured "shard 0 of 1" reading every partition
    appliers = [
        env.applier(consumer="c", shard=0, shards=2),
        env.applier(consumer="c", shard=1, shards=2),
    ]
    rogue = env.applier(consumer="c", shard=0, shards=1)
    errors: list[BaseException] = []

    def run(a: Applier) -> None:
        try:
            a.run_until_idle(timeout=60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in (*appliers, rogue)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert appliers[0].partitions | appliers[1].partitions == set(range(4))
    assert not appliers[0].partitions & appliers[1].partitions
    assert env.sql("select sum(qty) from work_orders") == [(160,)]
    assert env.sql("select count(*) from fieldsync_applier.applied") == [(160,)]


def test_lww_without_a_time_source_is_refused_at_start(env: Env, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[table]]\ntable = "public.parts"\npolicy = "lww"\n')
    db = ApplierDb(env.dsn, env.rules, bad)
    with pytest.raises(ConfigError, match=r"public\.parts.*track_commit_timestamp"):
        db.connect()


GATE_LOCK = 4242  # advisory lock the test holds to stop the applier inside a transaction

GATE = f"""
create function gate() returns trigger language plpgsql as $$
begin
    perform pg_advisory_xact_lock_shared({GATE_LOCK});
    return new;
end $$;
create trigger gate before update on work_orders for each row execute function gate();
"""


def _applied(env: Env) -> int:
    return int(env.sql("select count(*) from fieldsync_applier.applied")[0][0])


def _applier_waits_on_gate(env: Env) -> bool:
    """An applier backend is blocked on the gate lock, inside its open transaction."""
    rows = env.sql(
        "select count(*) from pg_locks where locktype = 'advisory' and not granted and objid = %s",
        GATE_LOCK,
    )
    return int(rows[0][0]) > 0


def test_sigkill_at_random_moments_applies_each_entry_exactly_once(
    env: Env, tmp_path: Path
) -> None:
    """Each kill lands while the applier is working, whatever the machine's speed: the
    applier runs until it has applied a random number of further entries, then the test
    closes a gate (an advisory lock a row trigger waits on) so the applier stops inside an
    open transaction, and kills it there (entries of that batch in flight), or a random
    number of entries later while it runs freely."""
    rows = 5
    total = 2000
    for i in range(1, rows + 1):
        insert_base(env, id=i, qty=0)
    env.sql(GATE)
    records = []
    for n in range(total):
        device = f"dev{n % 4}"
        key = 1 + n % rows
        records.append(
            env.record(device, "update", [key], seen({**BASE_ROW, "id": key, "qty": 0}), {"qty": 1})
        )
    env.produce(*records)
    env.appliers[0].close()
    config = tmp_path / "relay.toml"
    config.write_text(
        f"""
[relay]
rules = "{env.rules}"
topic_prefix = "{env.prefix}"
kafka_bootstrap_servers = "{env.bootstrap}"
log_level = "WARNING"

[journal]
dsn = "{env.dsn}"
conflicts = "{env.conflicts}"
batch_max_entries = 7
batch_max_ms = 5
"""
    )
    cmd = [sys.executable, "-m", "relay.upstream.applier_cli", "--config", str(config)]
    rng = random.Random(4)
    kills = 0
    gate = psycopg.connect(env.dsn, autocommit=True)
    try:
        for cycle in range(5):
            start = _applied(env)
            target = start + rng.randint(1, 150)
            proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )

            def progressed(proc: subprocess.Popen[bytes] = proc, target: int = target) -> bool:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"applier exited early: {err}")
                return _applied(env) >= target

            wait_for(
                progressed, timeout=120, interval=0.01, what=f"applier reached {target} entries"
            )
            if cycle % 2 == 0:
                # stop it inside a transaction: the gate is taken once the batch in flight
                # commits; the next row update then waits on it with its batch still open
                gate.execute("select pg_advisory_lock(%s)", (GATE_LOCK,))
                wait_for(lambda: _applier_waits_on_gate(env), timeout=60, what="applier at gate")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if cycle % 2 == 0:
                gate.execute("select pg_advisory_unlock(%s)", (GATE_LOCK,))
            kills += 1
            assert _applied(env) < total, f"kill {kills} came after every entry was applied"
    finally:
        gate.close()
    done_before = env.sql("select count(*) from fieldsync_applier.applied")[0][0]
    assert done_before < total, "the kills came too late to interrupt anything"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(
            lambda: env.sql("select count(*) from fieldsync_applier.applied")[0][0] == total,
            timeout=180,
            what="all entries applied",
        )
        wait_for(
            lambda: env.sql("select count(*) from fieldsync_applier.outbox")[0][0] == 0,
            timeout=30,
            what="outbox published",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert kills == 5
    assert env.sql("select sum(qty) from work_orders") == [(total,)]
    per_row = dict(env.sql("select id, qty from work_orders"))
    assert per_row == {i: total // rows for i in range(1, rows + 1)}
    outs = env.outcomes(expect=total)
    assert len(outs) == total and {o.kind.value for o in outs.values()} <= {"applied", "merged"}
    dupes = env.sql(
        "select device_id, seq, count(*) from fieldsync_applier.applied group by 1, 2 having count(*) > 1"
    )
    assert dupes == []
    assert env.sql("select count(*) from fieldsync_applier.offsets")[0][0] >= 1


# --------------------------------------------------------------------------- value round trip

KINDS = """
create type mood as enum ('ok', 'sad');
create table kinds (
    id int primary key, b bool, i2 int2, i8 int8, f4 float4, f8 float8, n102 numeric(10,2),
    n numeric, t text, j jsonb, u uuid, by bytea, d date, tm time, ts timestamp, tz timestamptz,
    tinf timestamptz, iv interval, ia int4[], ta text[], na numeric(10,2)[], ip inet, m mood
);
insert into kinds values (
    1, true, -32768, 9223372036854775807, 'Infinity', 'NaN', -12345678.91,
    '3.14159265358979323846264338327950288', 'tab\there "quoted" \\ back', '{"a": [1, 2.5, null]}',
    'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '\\x00ff10', '0044-03-15 BC', '24:00:00',
    '0044-03-15 12:00:00.5 BC', '2024-05-01 10:00:00.123456+02', 'infinity',
    '1 mon -2 days 03:04:05.000006', '{{1,NULL},{3,4}}', '{"a\\"b","c\\\\d",NULL}',
    '{1.50,NULL}', '10.1.2.0/24', 'sad'
);
"""


def test_every_value_kind_round_trips_through_the_applier(pg_dsn: str, tmp_path: Path) -> None:
    """A row read as the device receives it and inserted back by the applier is identical."""
    from relay.upstream.applier_store import Delivery

    rules = tmp_path / "rules.toml"
    rules.write_text('[[bucket]]\nname = "all"\n\n[[bucket.table]]\ntable = "public.kinds"\n')
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(KINDS)
        db = ApplierDb(pg_dsn, rules)
        db.connect()
        try:
            db.migrate()
            meta = db.tables["public.kinds"]
            cols = ", ".join(f"{c}::text" for c in meta.columns)
            # as pgoutput prints them (output functions, no casts)
            texts = (
                db.raw_cursor()
                .execute(f"select {', '.join(meta.columns)} from kinds where id = 1")
                .fetchone()
            )
            assert texts is not None
            wire = meta.read(texts)
            assert wire["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11" and wire["f8"] == "NaN"
            new = {**wire, "id": 2}
            record = JournalRecord(
                "d1",
                1,
                entry_from_json(
                    {
                        "seq": 1,
                        "table": "public.kinds",
                        "op": "insert",
                        "key": [2],
                        "old": None,
                        "new": json.loads(json.dumps(new)),
                        "hlc": Hlc(now_ms(), 0, "d1").encode(),
                    },
                    "d1",
                ),
                {"sub": "d1"},
            )
            (outcome,) = db.apply([(Delivery("t", 0, 0), record.to_bytes())])
            assert outcome.kind.value == "applied", outcome.message
            assert outcome.row == new
            first, second = (
                conn.execute(f"select {cols} from kinds where id = %s", (i,)).fetchone()
                for i in (1, 2)
            )
            assert first is not None and second is not None
            assert first[1:] == second[1:]
        finally:
            db.close()


def test_cli_refuses_bad_configuration(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from relay.upstream.applier_cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["--config", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "not found" in missing.output
    config = tmp_path / "relay.toml"
    config.write_text("[journal]\nshards = 2\n")
    no_dsn = runner.invoke(app, ["--config", str(config)])
    assert no_dsn.exit_code == 2 and "journal.dsn" in no_dsn.output
    config.write_text('[journal]\ndsn = "postgresql://x@127.0.0.1:1/db"\nshards = 2\n')
    bad_shard = runner.invoke(app, ["--config", str(config), "--shard", "2"])
    assert bad_shard.exit_code == 2 and "--shard 2" in bad_shard.output
