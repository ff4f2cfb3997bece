"""Devices converge: a stateful property test of the device agent (the real ``Agent``,
its SQLite database, an app writing with plain sqlite3) against an in-memory model of
the server side (tests/device_agent/device_model.py: rows, buckets, op logs with compaction,
checkpoints, journal intake, an applier merging counters and lww text, kept conflicts
and resolutions, outcomes).

Hypothesis interleaves: local edits (counters, text, state changes that move a row out
of the buckets, deletes, inserts, ``INSERT OR REPLACE``), uploads, the applier deciding
each entry (device wins, server wins, a kept conflict, a rejection), conflict
resolutions, office changes (counters, text, rows moved out of and back into the
device's buckets, inserts, deletes), ops and outcomes published in any order relative
to each other, and syncs killed between any two of their steps (a lost upload answer,
a failed schema read, a cut after the first page, the apply transaction aborted).

Invariants, after every step: each table shows exactly the versions the device received
(computed by the model at the device's applied cursor) with the device's edits on top
(recomputed here from the app's own edits, independently of the agent's code): the open
ones and the *awaiting* ones, whose outcome wrote the row (``visible_after``, the model's
bound) while no op of the row at or above the bound has reached the device since the
entry was made (followed here from the model's op log and the device's cursors); every
entry's status is the one its recorded outcome gives; and no flicker: an edit whose
outcome wrote the row still shows its values until an op of its row at or above the
bound was received.  After every quiesce (everything processed, published and synced):
nothing is open or awaiting, the tables equal the server's rows filtered and projected
for the device, and ``verify``'s local check (device_agent/consistency.py) finds nothing.
"""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from device_agent import apply as apply_mod
from device_agent.consistency import check_tables
from device_agent.local_db import get_meta
from device_agent.local_tables import PREFIX
from device_agent.sync import Agent, init_database
from tests.device_agent.device_model import (
    COLUMNS,
    COUNTERS,
    JOBS,
    KEYS,
    LOCAL,
    STOCK,
    Key,
    Killed,
    ModelClient,
    Row,
    ServerModel,
    schema_body,
    token_for,
)

BUCKETS = ('crew["a"]', "parts[]", 'region["north"]')
STATUS = {
    "applied": "synced",
    "merged": "synced",
    "resolved": "synced",
    "rejected": "failed",
    "conflict": "conflict",
}
TEXTS = st.sampled_from(["x", "y", "z", None])
DELTAS = st.integers(-3, 3)
INDEX = st.integers(0, 3)
"""Rows are picked by index into the sorted union of the server's and the device's keys
(the same index names the same row for the app and the office, so they meet often)."""
TABLES = st.sampled_from([JOBS, JOBS, STOCK])
APP_EDITS = st.tuples(
    st.sampled_from(["note", "add", "add", "state", "delete", "insert", "replace"]),
    TABLES,
    INDEX,
    TEXTS,
    DELTAS,
)
OFFICE_EDITS = st.tuples(
    st.sampled_from(["note", "add", "add", "crew", "state", "insert", "delete"]),
    TABLES,
    INDEX,
    TEXTS,
    DELTAS,
    st.booleans(),
)
APPLIER = st.tuples(
    st.sampled_from(["device", "device", "server", "ask", "reject"]),
    st.sampled_from(["none", "ops", "outcome", "both"]),
)
KILLS = st.sampled_from(
    ["no sync", None, None, None, "upload_answer", "schema", "changes", "second_page", "in_apply"]
)


class KilledInApply(Exception):
    """The apply or settle transaction aborted half-way (a process killed inside it)."""


_KILL = {"armed": False}
_flush = apply_mod._Batch.flush_dirty


def _flush_or_die(self: Any) -> None:
    if _KILL["armed"]:
        _KILL["armed"] = False
        raise KilledInApply("killed inside the transaction")
    _flush(self)


@dataclasses.dataclass(frozen=True)
class AppEdit:
    """One journal entry, as the model knows it from what the app did."""

    seq: int
    table: str
    key: Key
    op: str
    old: Row | None
    new: Row | None


def overlay(received: Row | None, edits: list[AppEdit], counters: tuple[str, ...]) -> Row | None:
    """The spec, written out independently of device_agent/visible.py: open edits on top
    of the received version; a counter edit adds its delta."""
    row = dict(received) if received is not None else None
    for e in edits:
        if e.op == "delete":
            row = None
        elif e.op == "insert":
            row = dict(e.new or {})
        elif row is None:
            row = {**(e.old or {}), **(e.new or {})}
        else:
            old, new = e.old or {}, e.new or {}
            for c, v in new.items():
                if old.get(c) == v:
                    continue
                row[c] = (row.get(c) or 0) + (v or 0) - (old.get(c) or 0) if c in counters else v
    return row


class DeviceConverges(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        apply_mod._Batch.flush_dirty = _flush_or_die  # type: ignore[method-assign]
        self.dir = Path(tempfile.mkdtemp(prefix="converge-"))
        self.db = str(self.dir / "d.db")
        m = self.model = ServerModel(BUCKETS)
        for i, crew, state, note, qty in [
            (1, "a", "open", "n1", 5),
            (2, "a", "open", "n2", 0),
            (3, "b", "open", "n3", 1),
            (4, "a", "done", "n4", 2),
            (5, "a", "open", None, None),
        ]:
            m.write(
                JOBS,
                (i,),
                {"id": i, "crew": crew, "state": state, "note": note, "qty": qty, "secret": "s"},
            )
        for region, part, qty in [("north", "p1", 10), ("north", "p2", 0), ("south", "p1", 7)]:
            m.write(STOCK, (region, part), {"region": region, "part": part, "qty": qty})
        m.publish_ops()
        token = token_for(m.device_id)
        self.client = ModelClient(m, token, schema_body(BUCKETS))
        init_database(self.db, "http://model.invalid", token, client=self.client)
        self.agent = self.new_agent()
        self.app = sqlite3.connect(self.db, isolation_level=None)
        self.edits: dict[int, AppEdit] = {}
        self.next_job = 100
        self.next_office = 50
        # the spec of awaiting edits, followed from the model: seq → bound, and per entry
        # the highest lsn of an op of its row received while it was open or awaiting
        self.awaits: dict[int, int] = {}
        self.seen: dict[int, int] = {}
        self.followed = (0, 0)  # the device's applied cursor and outcomes cursor
        self.sync_now(None)

    def new_agent(self) -> Agent:
        return Agent(self.db, client_factory=lambda _u, _t: self.client, page_ops=4)

    def teardown(self) -> None:
        apply_mod._Batch.flush_dirty = _flush  # type: ignore[method-assign]
        _KILL["armed"] = False
        self.app.close()
        self.agent.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- helpers

    def table_rows(self, table: str) -> dict[Key, Row]:
        cols = COLUMNS[table]
        out = {}
        for values in self.app.execute(f"select {', '.join(cols)} from {LOCAL[table]}"):
            row = dict(zip(cols, values, strict=True))
            out[tuple(row[c] for c in KEYS[table])] = row
        return out

    def key_at(self, table: str, i: int) -> Key:
        keys = sorted(
            {k for (t, k) in self.model.rows if t == table} | set(self.table_rows(table)), key=str
        )
        return keys[i % len(keys)] if keys else ()

    def pick(self, table: str, i: int) -> tuple[Key, Row] | None:
        """A row the app sees (None: the index names a row it does not see)."""
        key = self.key_at(table, i)
        row = self.table_rows(table).get(key)
        return (key, row) if row is not None else None

    def statuses(self) -> dict[int, str]:
        return dict(self.app.execute(f"select seq, status from {PREFIX}journal"))

    def open_seqs(self) -> list[int]:
        return sorted(s for s, st_ in self.statuses().items() if st_ in ("pending", "sent"))

    def app_write(self, table: str, key: Key, sql: str, *params: Any) -> None:
        """Run an app statement on one row; record the journal entry it made (if any)."""
        before = self.table_rows(table).get(key)
        last = self.app.execute(f"select coalesce(max(seq), 0) from {PREFIX}journal").fetchone()[0]
        self.app.execute(sql, params)
        after = self.table_rows(table).get(key)
        made = self.app.execute(
            f"select seq, op from {PREFIX}journal where seq > ? order by seq", (last,)
        ).fetchall()
        assert len(made) <= 1, made
        if made:
            seq, op = made[0]
            self.edits[seq] = AppEdit(seq, table, key, op, before, after)
        else:
            assert before == after, (sql, before, after)

    def sync_now(self, kill: str | None) -> None:
        self.client.kill = kill if kill != "in_apply" else None
        self.client.pages = 0
        _KILL["armed"] = kill == "in_apply"
        try:
            self.agent.sync_once()
        except (Killed, KilledInApply):
            self.agent.close()  # the process died; a new one starts from the database
            self.agent = self.new_agent()
        finally:
            self.client.kill = None
            _KILL["armed"] = False
            self.follow_device()

    def cursors(self) -> tuple[int, int]:
        cursor = get_meta(self.agent.conn, "cursor")
        return (
            int(cursor[1:]) if cursor else 0,
            int(get_meta(self.agent.conn, "outcomes_cursor") or 0),
        )

    def row_ops(self, table: str, key: Key, after: int, upto: int) -> list[Any]:
        """The model's ops of a row in the device's buckets with ``after < op_id <= upto``."""
        return [
            op
            for op in self.model.log
            if after < op.op_id <= upto
            and op.bucket in self.model.device_buckets
            and op.table == table
            and op.key == key
        ]

    def received_lsn(self, table: str, key: Key, applied: int) -> int:
        """The highest lsn among the row's holds (the latest op per bucket, if a PUT)."""
        lsns = [-1]
        for bucket in self.model.device_buckets:
            op = self.model.latest(bucket, applied).get((table, key))
            if op is not None and op.data is not None:
                lsns.append(ServerModel.lsn(op.op_id))
        return max(lsns)

    def follow_device(self) -> None:
        """Advance the spec of awaiting edits over what the device applied since last
        time (one apply transaction: its ops, then its outcomes, then each row derived)."""
        (applied_before, outcomes_before), now = self.followed, self.cursors()
        if now == self.followed:
            return
        self.followed = now
        applied, upto = now
        latest: dict[int, dict[str, Any]] = {}
        for o in self.model.outcomes[outcomes_before:upto]:
            latest[int(o["seq"])] = o
        for seq, o in latest.items():
            if o.get("visible_after") is not None and o["outcome"] != "rejected":
                self.awaits[seq] = int(o["visible_after"])
            else:
                self.awaits.pop(seq, None)
        on_top = set(self.open_seqs()) | set(self.awaits)
        for seq in on_top:
            e = self.edits[seq]
            ops = self.row_ops(e.table, e.key, applied_before, applied)
            if ops:
                newest = max(ServerModel.lsn(op.op_id) for op in ops)
                self.seen[seq] = max(self.seen.get(seq, -1), newest)
        for seq, bound in list(self.awaits.items()):
            e = self.edits[seq]
            if max(self.received_lsn(e.table, e.key, applied), self.seen.get(seq, -1)) >= bound:
                del self.awaits[seq]

    def server_key(self, table: str, i: int) -> Key | None:
        """A row the server has (None: the index names a row it does not have)."""
        key = self.key_at(table, i)
        return key if (table, key) in self.model.rows else None

    # ---- the app (plain sqlite3)

    def app_edit(self, action: str, table: str, i: int, text: str | None, delta: int) -> None:
        if action == "insert":
            self.next_job += 1
            jid = self.next_job
            crew = "b" if delta == 3 else "a"  # now and then a row it may not write
            self.app_write(
                JOBS,
                (jid,),
                "insert into jobs (id, crew, state, note, qty) values (?, ?, 'open', ?, ?)",
                jid,
                crew,
                text,
                delta,
            )
            return
        if action in ("note", "state", "replace"):
            table = JOBS
        got = self.pick(table, i)
        if got is None:
            return
        key, row = got
        where = " and ".join(f"{c} = ?" for c in KEYS[table])
        t = LOCAL[table]
        if action == "note":
            self.app_write(table, key, f"update {t} set note = ? where {where}", text, *key)
        elif action == "add":
            sql = f"update {t} set qty = coalesce(qty, 0) + ? where {where}"
            self.app_write(table, key, sql, delta, *key)
        elif action == "state":
            state = "done" if row["state"] == "open" else "open"  # done: leaves the bucket
            self.app_write(table, key, f"update {t} set state = ? where {where}", state, *key)
        elif action == "delete":
            self.app_write(table, key, f"delete from {t} where {where}", *key)
        else:  # INSERT OR REPLACE over the row the app sees
            self.app_write(
                JOBS,
                key,
                "insert or replace into jobs (id, crew, state, note, qty) values (?, ?, ?, ?, ?)",
                row["id"],
                row["crew"],
                row["state"],
                text,
                row["qty"],
            )

    # ---- the office (the system of record, directly)

    def office_edit(
        self, action: str, table: str, i: int, text: str | None, delta: int, publish: bool
    ) -> None:
        """A committed change; ``publish``: cdc and the engine caught up at once."""
        m = self.model
        if action == "insert":
            if table == JOBS:
                self.next_office += 1
                jid = self.next_office
                crew = "b" if delta < 0 else "a"
                row = {"id": jid, "crew": crew, "state": "open", "note": text, "qty": delta}
                m.write(JOBS, (jid,), {**row, "secret": "s"})
            else:
                region, part = ("north", "south")[i % 2], f"p{i}"
                if (STOCK, (region, part)) not in m.rows:
                    m.write(STOCK, (region, part), {"region": region, "part": part, "qty": delta})
        else:
            if action in ("note", "crew", "state"):
                table = JOBS
            key = self.server_key(table, i)
            if key is None:
                return
            row = m.rows[(table, key)]
            flip = {"crew": {"a": "b", "b": "a"}, "state": {"open": "done", "done": "open"}}
            if action == "note":
                m.write(table, key, {**row, "note": text})
            elif action == "add":
                m.write(table, key, {**row, "qty": (row["qty"] or 0) + delta})
            elif action == "delete":
                m.write(table, key, None)
            else:  # out of the device's buckets and back: another crew, or done
                m.write(table, key, {**row, action: flip[action][row[action]]})
        if publish:
            m.publish_ops()

    # ---- the applier, the feed, the engine

    def apply_entry(self, decision: str, publish: str) -> None:
        """The applier takes the oldest entry; its change and outcome are published at
        once, one before the other, or later."""
        if self.model.process(decision) is None:
            return
        if publish in ("ops", "both"):
            self.model.publish_ops()
        if publish in ("outcome", "both"):
            self.model.publish_outcomes()

    @rule(choice=st.sampled_from(["device", "server"]))
    def resolve_conflict(self, choice: str) -> None:
        self.model.resolve(choice)

    @rule()
    def intake_rejects_next(self) -> None:
        self.model.reject_next += 1

    def publish(self, what: str) -> None:
        if what == "ops":
            self.model.publish_ops()
        else:
            self.model.publish_outcomes(1)

    # ---- the device agent

    @rule(
        app=st.none() | APP_EDITS,
        office=st.none() | OFFICE_EDITS,
        applier=st.none() | APPLIER,
        publish=st.sampled_from([None, "ops", "outcome"]),
        kill=KILLS,
    )
    def step(
        self,
        app: tuple[Any, ...] | None,
        office: tuple[Any, ...] | None,
        applier: tuple[str, str] | None,
        publish: str | None,
        kill: str | None,
    ) -> None:
        """Some of: an app edit, an office change, the applier deciding an entry, ops or
        an outcome published; then a sync, killed at ``kill`` (or no sync)."""
        if app is not None:
            self.app_edit(*app)
        if office is not None:
            self.office_edit(*office)
        if applier is not None:
            self.apply_entry(*applier)
        if publish is not None:
            self.publish(publish)
        if kill != "no sync":
            self.sync_now(kill)

    @rule()
    def quiesce(self) -> None:
        for _ in range(10):
            self.sync_now(None)
            while self.model.process("device") is not None:
                pass
            self.model.publish_ops()
            self.model.publish_outcomes()
            self.sync_now(None)
            if not self.open_seqs() and not self.model.queue:
                break
        assert not self.open_seqs(), self.statuses()
        # every awaited version arrived: nothing is kept on top any more
        assert not self.awaits, self.awaits
        assert (
            self.app.execute(
                f"select seq, await_lsn from {PREFIX}journal where await_lsn is not null"
            ).fetchall()
            == []
        )
        for table in (JOBS, STOCK):
            assert self.table_rows(table) == self.model.projection(table), table
        assert [p.to_json() for p in check_tables(self.agent.conn)] == []

    # ---- invariants

    @invariant()
    def statuses_follow_recorded_outcomes(self) -> None:
        recorded: dict[int, str] = {}
        upto = int(get_meta(self.agent.conn, "outcomes_cursor") or 0)
        for o in self.model.outcomes[:upto]:
            recorded[int(o["seq"])] = STATUS[o["outcome"]]
        for seq, status in self.statuses().items():
            if seq in recorded:
                assert status == recorded[seq], (seq, status, recorded[seq])
            elif seq in self.model.intake_rejected:
                assert status in ("pending", "sent", "failed"), (seq, status)
            else:
                assert status in ("pending", "sent"), (seq, status)

    @invariant()
    def awaiting_entries_are_the_specs(self) -> None:
        found = dict(
            self.app.execute(
                f"select seq, await_lsn from {PREFIX}journal where await_lsn is not null"
            ).fetchall()
        )
        assert found == self.awaits

    @invariant()
    def no_flicker(self) -> None:
        """An edit whose recorded outcome wrote its row (the row's last edit) shows its
        values until the device received an op of the row at or above the bound."""
        applied, upto = self.cursors()
        recorded: dict[int, dict[str, Any]] = {}
        for o in self.model.outcomes[:upto]:
            recorded[int(o["seq"])] = o
        last: dict[tuple[str, Key], int] = {}
        for seq, e in sorted(self.edits.items()):
            last[(e.table, e.key)] = seq
        for seq, o in recorded.items():
            bound = o.get("visible_after")
            e = self.edits[seq]
            if bound is None or o["outcome"] == "rejected" or last[(e.table, e.key)] != seq:
                continue
            after_bound = [
                op
                for op in self.row_ops(e.table, e.key, 0, applied)
                if ServerModel.lsn(op.op_id) >= bound
            ]
            if after_bound:
                continue
            shown = self.table_rows(e.table).get(e.key)
            if e.op == "delete":
                assert shown is None, (seq, shown)
                continue
            assert shown is not None, (seq, e)
            for c, v in (e.new or {}).items():
                if c not in COUNTERS[e.table] and (e.old or {}).get(c) != v:
                    assert shown[c] == v, (seq, c, shown, e)

    @invariant()
    def tables_show_received_versions_with_open_edits(self) -> None:
        cursor = get_meta(self.agent.conn, "cursor")
        applied = int(cursor[1:]) if cursor else 0
        on_top = sorted(set(self.open_seqs()) | set(self.awaits))
        for table in (JOBS, STOCK):
            keys = self.model.keys(table) | {e.key for e in self.edits.values() if e.table == table}
            expected = {}
            for key in keys:
                edits = [
                    self.edits[s]
                    for s in on_top
                    if self.edits[s].table == table and self.edits[s].key == key
                ]
                row = overlay(self.model.received(table, key, applied), edits, COUNTERS[table])
                if row is not None:
                    expected[key] = row
            assert self.table_rows(table) == expected, table


DeviceConverges.TestCase.settings = settings(max_examples=60, stateful_step_count=50, deadline=None)
test_device_converges = DeviceConverges.TestCase
