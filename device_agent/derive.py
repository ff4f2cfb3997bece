"""The general path of an apply: table rows derived again from their received version
and the edits on top.

A row is *held* when journal entries of it are open (``pending``/``sent``), awaiting
their server version (``await_lsn``) or kept conflicts when the transaction begins;
ops of held rows, rows of tables several rules serve (different column projections) and
rows whose outcome, rejection or bucket reset came in are *dirty*: at
:meth:`RowDeriver.flush_dirty` each is written as
:func:`device_agent.visible.visible_row` derives it from

- the *received version* (:func:`received_version`): the holds' stored versions in
  ``_fieldsync_rows`` (merged over the buckets for a table several rules serve); a hold
  that came by the fast path stores none, and then the table row is that version until
  the app edits it, after which the earliest edit's ``old`` is
  (:meth:`RowDeriver.capture_received` keeps it before any edit of the row settles);
- the edits on top (:meth:`RowDeriver.edits_on_top`), with the highest ``commit_lsn`` of
  the ops of the row seen in this transaction recorded on them (``seen_lsn``) first;
  awaiting edits whose server version arrived, or that nothing may bring any more, stop
  being kept (:func:`device_agent.visible.released`).

:class:`ApplyResult` holds the figures of one apply transaction (filled here, in
device_agent/bucket_ops.py and device_agent/outcomes.py).

Everything happens on the caller's connection, inside the caller's open transaction
(device_agent/apply.py), in the caller's thread; no network.
"""

from __future__ import annotations

import dataclasses
import enum
import sqlite3
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any, Final

import orjson

from device_agent.local_db import from_sql, to_sql
from device_agent.local_tables import PREFIX, LocalTable, q
from device_agent.positions import max_lsn, pos_lsn
from device_agent.visible import UNKNOWN_POSITION, Edit, released, visible_row

OPEN: Final = "status in ('pending', 'sent')"
"""SQL condition of open journal entries (matches the partial index ``journal_open``)."""
KEPT: Final = "status = 'conflict'"  # kept for a person: not on top, but may settle later
CHUNK: Final = 400
"""Key values or seqs bound per statement (SQLite's limit on parameters)."""

_SORT = orjson.OPT_SORT_KEYS


@dataclasses.dataclass
class ApplyResult:
    messages: int = 0
    ops: int = 0
    puts: int = 0
    removes: int = 0
    reset: list[str] = dataclasses.field(default_factory=list)
    verified: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[str] = dataclasses.field(default_factory=list)
    released: int = 0
    held_rows: int = 0
    seconds: float = 0.0


def data_text(data: Mapping[str, Any]) -> str:
    """A received version (wire form) as stored in ``_fieldsync_rows.data``."""
    return orjson.dumps(data, option=_SORT).decode()


def key_where(table: LocalTable) -> str:
    """SQL condition selecting a table row by its key columns (bound by :func:`key_values`)."""
    return " and ".join(f"{q(c)} is ?" for c in table.key)


def key_values(table: LocalTable, k: Any) -> list[Any]:
    """The key column values (SQLite form) of the row whose identity is ``k``."""
    if len(table.key) == 1:
        return [k]
    return [to_sql(v) for v in orjson.loads(k)]


class Received(enum.Enum):
    TABLE_ROW = "the table row is the received version"


TABLE_ROW: Final = Received.TABLE_ROW
"""``received_version``'s answer when the table row itself is the received version."""


def received_version(
    table: LocalTable, datas: Sequence[str | None], edits: Sequence[Edit]
) -> Mapping[str, Any] | Received | None:
    """The latest server version the device received of a row (wire form), from its
    holds' stored versions in op-id order (``datas``); None when no bucket holds it.

    A table several rules serve merges the buckets' projections (latest op last).  Else
    the latest hold's version counts; a hold that came by the fast path stores none
    (``data`` NULL): the table row is that version while the row has no open edit
    (:data:`TABLE_ROW`), and the earliest open edit's ``old`` once it has
    (:meth:`RowDeriver.capture_received` keeps it)."""
    if not datas:
        return None
    if table.multi:
        merged: dict[str, Any] = {}
        for data in datas:
            if data is not None:
                merged.update(orjson.loads(data))
        return merged
    latest = datas[-1]
    if latest is not None:
        version: dict[str, Any] = orjson.loads(latest)
        return version
    if not edits or edits[0].old is None:
        return TABLE_ROW
    return _wire(table, edits[0].old)


def _wire(table: LocalTable, row: Mapping[str, Any]) -> dict[str, Any]:
    """A row in SQLite form (a table row, a journal entry's ``old``) in wire form."""
    return {c: from_sql(row.get(c), table.kinds.get(c)) for c in table.columns}


class RowDeriver:
    """The held and dirty rows of one apply transaction, and their derivation."""

    def __init__(
        self, conn: sqlite3.Connection, by_id: dict[int, LocalTable], result: ApplyResult
    ) -> None:
        self.conn = conn
        self.by_id = by_id
        self.result = result
        # rows with edits on top (open, or awaiting their server version) when the
        # transaction began: the general path
        self.held: set[tuple[int, Any]] = {
            (tid, k) for tid, k in conn.execute(f"select tbl, k from {PREFIX}journal where {OPEN}")
        }
        self.held.update(
            conn.execute(f"select tbl, k from {PREFIX}journal where await_lsn is not null")
        )
        # rows of kept conflicts: their ops' positions are recorded (seen_lsn), so that a
        # resolution whose server version (or the row's removal) came first is not awaited
        self.held.update(conn.execute(f"select tbl, k from {PREFIX}journal where {KEPT}"))
        self.dirty: set[tuple[int, Any]] = set()
        # per held row: the highest commit_lsn of an op of it in this transaction
        self.seen: dict[tuple[int, Any], int] = {}
        # buckets were emptied for a new download (or this is a first download): an
        # awaiting edit of a row no bucket holds afterwards stops being kept
        self.buckets_reset = False

    def saw(self, tid: int, k: Any, position: Any) -> None:
        """An op of a row with edits on top arrived (its position's commit_lsn counts)."""
        lsn = pos_lsn(position)
        ref = (tid, k)
        self.seen[ref] = max(self.seen.get(ref, -1), UNKNOWN_POSITION if lsn is None else lsn)

    def capture_received(self) -> None:
        """Keep the received version of every row with edits on top whose holds came by
        the fast path (``data`` NULL: the table row itself was the received version, until
        the app edited it).  The earliest edit's ``old`` is that version (made on the row
        as received; an ``INSERT OR REPLACE`` records the row it replaced).  Runs first in
        every transaction that applies ops or settles entries, so the version is kept
        before any edit of the row settles."""
        conn = self.conn
        first: dict[tuple[int, Any], tuple[int, str | None]] = {}
        for where in ("j.status in ('pending', 'sent')", "j.await_lsn is not null"):
            for tid, k, seq, old in conn.execute(
                f"""select j.tbl, j.k, j.seq, j.old from {PREFIX}journal j
                    where {where} and exists (select 1 from {PREFIX}rows r
                        where r.tbl = j.tbl and r.k = j.k and r.data is null)
                    order by j.seq"""
            ):
                if (tid, k) not in first or first[(tid, k)][0] > seq:
                    first[(tid, k)] = (seq, old)
        for (tid, k), (_seq, old) in first.items():
            table = self.by_id.get(tid)
            if table is None or table.multi:
                continue
            if old is None:  # not known (a database of an earlier version): download again
                conn.execute(
                    f"""update {PREFIX}buckets set reset_pending = 1 where id in
                        (select bucket from {PREFIX}rows where tbl = ? and k = ?)""",
                    (tid, k),
                )
                continue
            conn.execute(
                f"update {PREFIX}rows set data = ? where tbl = ? and k = ? and data is null",
                (data_text(_wire(table, orjson.loads(old))), tid, k),
            )

    def flush_dirty(self) -> None:
        if self.buckets_reset:  # awaiting edits of rows no bucket holds: re-derived too
            for tid, k in self.conn.execute(
                f"""select distinct j.tbl, j.k from {PREFIX}journal j
                    where j.await_lsn is not null and not exists
                        (select 1 from {PREFIX}rows r where r.tbl = j.tbl and r.k = j.k)"""
            ):
                if tid in self.by_id:
                    self.dirty.add((tid, k))
        for tid, k in sorted(self.dirty, key=lambda r: (r[0], str(r[1]))):
            self.refresh_row(self.by_id[tid], k)
        self.dirty.clear()

    def edits_on_top(self, table: LocalTable, k: Any) -> list[Edit]:
        """The row's open and awaiting entries in seq order (ops of the row seen in this
        transaction recorded on them first)."""
        ref = (table.id, k)
        if ref not in self.held:  # the journal is only read for rows with edits
            return []
        seen = self.seen.pop(ref, None)
        if seen is not None:
            for where in (OPEN, "await_lsn is not null", KEPT):
                self.conn.execute(
                    f"""update {PREFIX}journal set seen_lsn = max(coalesce(seen_lsn, -1), ?)
                        where tbl = ? and k = ? and {where}""",
                    (seen, table.id, k),
                )
        rows = [
            r
            for where in (OPEN, "await_lsn is not null")
            for r in self.conn.execute(
                f"""select seq, op, old, new, await_lsn, seen_lsn from {PREFIX}journal
                    where tbl = ? and k = ? and {where}""",
                (table.id, k),
            )
        ]
        return [Edit.from_journal(*r) for r in sorted(rows, key=itemgetter(0))]

    def refresh_row(self, table: LocalTable, k: Any) -> None:
        """Write one row as :func:`device_agent.visible.visible_row` derives it from the
        received version and the edits on top; awaiting edits whose server version
        arrived (or that nothing may bring any more) stop being kept."""
        conn = self.conn
        holds = conn.execute(
            f"select data, pos from {PREFIX}rows where tbl = ? and k = ? order by op_id",
            (table.id, k),
        ).fetchall()
        received_lsn = max_lsn(h[1] for h in holds)
        edits = self.edits_on_top(table, k)
        done = [e.seq for e in edits if released(e, received_lsn, bool(holds), self.buckets_reset)]
        if done:
            conn.executemany(
                f"update {PREFIX}journal set await_lsn = null where seq = ?", [(s,) for s in done]
            )
            edits = [e for e in edits if e.seq not in done]
        received = received_version(table, [h[0] for h in holds], edits)
        if received is TABLE_ROW:
            return  # no edit on top, received by the fast path: the table row is that version
        if edits:
            self.result.held_rows += 1
        row = visible_row(
            None if received is None else {c: to_sql(v) for c, v in received.items()},
            edits,
            table.key,
            table.counters,
            received_lsn,
        )
        if row is None:
            conn.execute(
                f"delete from {q(table.local)} where {key_where(table)}", key_values(table, k)
            )
            return
        cols = ", ".join(q(c) for c in table.columns)
        marks = ", ".join("?" * len(table.columns))
        conn.execute(
            f"insert or replace into {q(table.local)} ({cols}) values ({marks})",
            [row.get(c) for c in table.columns],
        )
