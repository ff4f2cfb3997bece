"""The local half of ``device-agent verify``: every synced table shows exactly what
:func:`device_agent.visible.visible_row` derives, and nothing else.

The edits on top of a row are its open entries and its *awaiting* ones (settled by an
outcome that wrote the row upstream, kept until the server version that includes them
arrives: ``await_lsn``), shown as long as nothing of the row at or above that bound was
received (the holds' positions, the entry's ``seen_lsn``).

For each table (reads only; one pass over the table's rows joined to their holds, one
over the holds, one over the edits on top):

- a row whose key column is NULL: ``null_key``;
- a row no bucket holds and no edit keeps: ``not_held``;
- a row whose values differ from the received version with the edits on top:
  ``differs`` (with the columns, expected and found).  For a row with no edit on top that
  came by the fast path (the table row *is* the received version) this is the row's
  checksum term not matching its values: the row was changed behind the agent's back;
- a row the holds or open edits call for that the table lacks: ``missing``;
- a received version kept in ``_fieldsync_rows`` (or recovered from the earliest edit's
  ``old``) that does not hash to its hold's checksum term: ``received_corrupt``;
  one that cannot be recovered at all: ``received_lost``.

The bucket checksums (count and sum of terms against the relay's checkpoint) are
compared by the CLI; together they cover the chain relay → received versions → table.
"""

from __future__ import annotations

import dataclasses
import enum
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from core.row_wire import row_key_text
from device_agent.bucket_ops import term_of, unsigned
from device_agent.local_db import from_sql, k_key, to_sql
from device_agent.local_tables import PREFIX, LocalTable, key_expr, load_tables, q
from device_agent.positions import max_lsn
from device_agent.visible import Edit, differences, visible_row


class Problem(enum.StrEnum):
    NULL_KEY = "null_key"
    NOT_HELD = "not_held"
    DIFFERS = "differs"
    MISSING = "missing"
    RECEIVED_CORRUPT = "received_corrupt"
    RECEIVED_LOST = "received_lost"


MESSAGES: dict[Problem, str] = {
    Problem.NULL_KEY: "a key column is NULL",
    Problem.NOT_HELD: "no bucket holds the row and no open or awaiting edit keeps it",
    Problem.DIFFERS: "differs from the received version with the edits on top",
    Problem.MISSING: "missing: the received version with the edits on top is a row",
    Problem.RECEIVED_CORRUPT: "the received version kept does not match its checksum term",
    Problem.RECEIVED_LOST: "the received version of a row with open edits was not kept",
}


@dataclasses.dataclass(frozen=True)
class RowProblem:
    table: str
    key: list[Any]
    problem: Problem
    columns: Mapping[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "key": self.key,
            "problem": self.problem.value,
            "message": MESSAGES[self.problem],
            "columns": {c: {"expected": e, "found": f} for c, (e, f) in self.columns.items()},
        }


Hold = tuple[str | None, int, str | None]
"""A bucket's hold on a row: its kept version (JSON text, or NULL), checksum term and
position (``'[commit_lsn,seq]'``)."""


class _Found(Exception):
    """Enough problems found."""


class _Checker:
    def __init__(self, conn: sqlite3.Connection, table: LocalTable, limit: int) -> None:
        self.conn = conn
        self.t = table
        self.limit = limit
        self.found: list[RowProblem] = []
        self.table_json = orjson.dumps(table.name)

    def add(
        self, k: Any, problem: Problem, columns: Mapping[str, tuple[Any, Any]] | None = None
    ) -> None:
        key = k if isinstance(k, list) else k_key(k, self.t.key_kinds())
        self.found.append(RowProblem(self.t.name, key, problem, columns or {}))
        if len(self.found) >= self.limit:
            raise _Found

    def wire(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {c: from_sql(row.get(c), self.t.kinds.get(c)) for c in self.t.columns}

    def term_ok(self, k: Any, data: Mapping[str, Any], term: int) -> bool:
        key = k_key(k, self.t.key_kinds())
        return term_of(self.table_json, row_key_text(key), data) == unsigned(int(term))

    def received(
        self,
        k: Any,
        holds: Sequence[Hold],
        edits: Sequence[Edit],
        row: Mapping[str, Any] | None,
    ) -> Mapping[str, Any] | None:
        """The received version (SQLite form) per device_agent/apply.received_version,
        checking each kept version against its term."""
        if not holds:
            return None
        if self.t.multi:
            merged: dict[str, Any] = {}
            for data, term, _pos in holds:
                version = orjson.loads(data) if data is not None else None
                if version is None or not self.term_ok(k, version, term):
                    self.add(k, Problem.RECEIVED_CORRUPT)
                    continue
                merged.update(version)
            return _sql(merged)
        data, term, _pos = holds[-1]
        if data is not None:
            version = orjson.loads(data)
        elif edits and edits[0].old is not None:
            version = self.wire(edits[0].old)
        elif not edits and row is not None:
            version = self.wire(row)  # the fast path: the table row is the received version
            if not self.term_ok(k, version, term):
                self.add(k, Problem.DIFFERS)
                return None
            return row
        elif not edits:
            self.add(k, Problem.MISSING)
            return None
        else:
            self.add(k, Problem.RECEIVED_LOST)
            return None
        if not self.term_ok(k, version, term):
            self.add(k, Problem.RECEIVED_CORRUPT)
        return _sql(version)

    def compare(
        self,
        k: Any,
        holds: Sequence[Hold],
        edits: Sequence[Edit],
        row: Mapping[str, Any] | None,
    ) -> None:
        before = len(self.found)
        received = self.received(k, holds, edits, row)
        if len(self.found) > before:
            return  # already reported
        received_lsn = max_lsn(h[2] for h in holds)
        expected = visible_row(received, edits, self.t.key, self.t.counters, received_lsn)
        if expected is None and row is not None:
            problem = Problem.DIFFERS if holds or edits else Problem.NOT_HELD
            self.add(k, problem, differences(None, row, self.t.columns) if holds else {})
        elif expected is not None and row is None:
            self.add(k, Problem.MISSING, differences(expected, None, self.t.columns))
        elif expected is not None and row is not None:
            diff = differences(expected, row, self.t.columns)
            if diff:
                self.add(k, Problem.DIFFERS, diff)

    def run(self) -> None:
        t, conn = self.t, self.conn
        cols = ", ".join(f"u.{q(c)}" for c in t.columns)
        null_key = " or ".join(f"{q(c)} is null" for c in t.key)
        for values in conn.execute(
            f"select {', '.join(q(c) for c in t.columns)} from {q(t.local)} where {null_key}"
        ):
            row = dict(zip(t.columns, values, strict=True))
            self.add([from_sql(row[c], t.kinds.get(c)) for c in t.key], Problem.NULL_KEY)
        edits: dict[Any, list[Edit]] = {}
        for k, *entry in conn.execute(
            f"""select k, seq, op, old, new, await_lsn, seen_lsn from {PREFIX}journal
                where tbl = ? and status in ('pending', 'sent')
                union all
                select k, seq, op, old, new, await_lsn, seen_lsn from {PREFIX}journal
                where tbl = ? and await_lsn is not null
                order by 2""",
            (t.id, t.id),
        ):
            edits.setdefault(k, []).append(Edit.from_journal(*entry))
        seen: set[Any] = set()
        current: tuple[int, Any, dict[str, Any]] | None = None
        holds: list[Hold] = []
        n = len(t.columns)
        for rid, k, *rest in conn.execute(
            f"""select u.rowid, {key_expr(t, "u")}, {cols}, r.data, r.term, r.pos
                from {q(t.local)} u left join {PREFIX}rows r on r.tbl = ? and r.k = {key_expr(t, "u")}
                where {" and ".join(f"u.{q(c)} is not null" for c in t.key)}
                order by u.rowid, r.op_id""",
            (t.id,),
        ):
            if current is None or current[0] != rid:
                if current is not None:
                    self.compare(current[1], holds, edits.get(current[1], []), current[2])
                current = (rid, k, dict(zip(t.columns, rest[:n], strict=True)))
                holds = []
                seen.add(k)
            if rest[n + 1] is not None:
                holds.append((rest[n], rest[n + 1], rest[n + 2]))
        if current is not None:
            self.compare(current[1], holds, edits.get(current[1], []), current[2])
        missing: dict[Any, list[Hold]] = {}
        for k, data, term, pos in conn.execute(
            f"select k, data, term, pos from {PREFIX}rows where tbl = ? order by k, op_id",
            (t.id,),
        ):
            if k not in seen:
                missing.setdefault(k, []).append((data, term, pos))
        for k in edits:
            if k not in seen:
                missing.setdefault(k, [])
        for k, kept in missing.items():
            self.compare(k, kept, edits.get(k, []), None)


def _sql(row: Mapping[str, Any]) -> dict[str, Any]:
    return {c: to_sql(v) for c, v in row.items()}


def check_tables(conn: sqlite3.Connection, limit: int = 100) -> list[RowProblem]:
    """Every problem of the synced tables (see the module docstring), at most ``limit``."""
    found: list[RowProblem] = []
    for t in load_tables(conn).values():
        checker = _Checker(conn, t, limit - len(found))
        try:
            checker.run()
        except _Found:
            pass
        found += checker.found
        if len(found) >= limit:
            break
    return found
