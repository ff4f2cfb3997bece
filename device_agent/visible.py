"""What the app sees: the one definition of a visible row.

The device keeps, per row, the latest server version it received (the *received
version*: what the buckets holding the row last sent, merged over the buckets) and the
app's own edits of the row that are still *open* (journal status ``pending`` or ``sent``,
in seq order).  The row the app's table shows is always::

    visible_row(received, open_edits)

and nothing else: the agent writes the tables only through this function, whatever
happened (server ops applied, an outcome recorded, an upload rejected), so the app's
table can never drift from it.  ``device-agent verify`` recomputes it for every row.

Rules, applied edit by edit on top of the received version (None: no bucket holds the row):

- ``delete``: the row is gone;
- ``insert``: the row is the inserted one;
- ``update``: the columns the edit changed (``new`` differs from ``old``) take its values;
  a *counter* column (policy ``counter`` on the server, ``counters`` in ``/v1/schema``)
  takes the received value plus the edit's delta ``new - old`` (NULL counts as 0), as the
  server will merge it;
- an ``update`` of a row no bucket holds any more (it left the device's buckets while the
  edit was open) shows the edit's own row (``old`` with ``new`` on top), so the row stays
  until its last open edit settles and then leaves.

A result without a value for every key column is no row (a key column is never NULL).

Values are in SQLite form (as stored in the tables and in the journal's ``old``/``new``;
:func:`device_agent.local_db.to_sql` turns received wire values into it).  Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

Row = dict[str, Any]


class EditOp(enum.StrEnum):
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"


@dataclasses.dataclass(frozen=True)
class Edit:
    """One open journal entry of a row (``old``/``new`` are whole rows, SQLite form)."""

    seq: int
    op: EditOp
    old: Mapping[str, Any] | None
    new: Mapping[str, Any] | None

    @classmethod
    def from_journal(cls, seq: int, op: str, old: str | None, new: str | None) -> Edit:
        return cls(
            int(seq),
            EditOp(op),
            orjson.loads(old) if old else None,
            orjson.loads(new) if new else None,
        )


def same(a: Any, b: Any) -> bool:
    """Equal as SQLite values: numbers by value, JSON text by content."""
    if a == b and type(a) is type(b):
        return True
    if isinstance(a, bool | int | float) and isinstance(b, bool | int | float):
        return bool(a == b)
    if isinstance(a, str) and isinstance(b, str) and a[:1] in "[{" and b[:1] in "[{":
        try:
            return bool(orjson.loads(a) == orjson.loads(b))
        except orjson.JSONDecodeError:
            return False
    return False


def written(edit: Edit) -> Row:
    """The columns an edit set: an insert's whole row; an update's changed columns."""
    if edit.new is None:
        return {}
    if edit.op is EditOp.INSERT or edit.old is None:
        return dict(edit.new)
    old = edit.old
    return {c: v for c, v in edit.new.items() if c not in old or not same(old[c], v)}


def _number(value: Any) -> int | float | Decimal | None:
    if value is None:
        return 0
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return Decimal(value)
        except InvalidOperation:
            return None
    return None


def add_delta(current: Any, old: Any, new: Any) -> Any:
    """A counter: ``current + (new - old)``, NULL counting as 0; ``new`` when a value is not
    a number.  Integers stay integers, decimal text stays decimal text."""
    nums = [_number(v) for v in (current, old, new)]
    if any(n is None for n in nums):
        return new
    cur, base, mine = nums
    if any(isinstance(n, Decimal) for n in nums):
        total = Decimal(str(cur)) + Decimal(str(mine)) - Decimal(str(base))
        return str(total)
    return cur + (mine - base)  # type: ignore[operator]


def visible_row(
    received: Mapping[str, Any] | None,
    edits: Sequence[Edit],
    key: Sequence[str],
    counters: Collection[str] = (),
) -> Row | None:
    """The row the app sees (see the module docstring); None: no row."""
    row: Row | None = dict(received) if received is not None else None
    for edit in edits:
        if edit.op is EditOp.DELETE:
            row = None
        elif edit.op is EditOp.INSERT:
            row = dict(edit.new or {})
        elif row is None:
            row = {**(edit.old or {}), **(edit.new or {})}
        else:
            old = edit.old or {}
            for c, v in written(edit).items():
                row[c] = add_delta(row.get(c), old.get(c), v) if c in counters else v
    if row is None or any(row.get(c) is None for c in key):
        return None
    return row


def differences(
    expected: Mapping[str, Any] | None, found: Mapping[str, Any] | None, columns: Sequence[str]
) -> dict[str, tuple[Any, Any]]:
    """Columns whose values differ, ``{column: (expected, found)}``; a missing or extra row
    differs in every column."""
    if expected is None and found is None:
        return {}
    if expected is None or found is None:
        return {
            c: (
                None if expected is None else expected.get(c),
                None if found is None else found.get(c),
            )
            for c in columns
        }
    return {
        c: (expected.get(c), found.get(c))
        for c in columns
        if not same(expected.get(c), found.get(c))
    }
