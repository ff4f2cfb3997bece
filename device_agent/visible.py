"""What the app sees: the one definition of a visible row.

The device keeps, per row, the latest server version it received (the *received
version*: what the buckets holding the row last sent, merged over the buckets) and the
app's own edits of the row that are still *open* (journal status ``pending`` or ``sent``)
or *awaiting* (settled by an outcome that wrote the row upstream, whose server version
has not arrived yet), in seq order.  The row the app's table shows is always::

    visible_row(received, edits, received_lsn=...)

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
  until its last edit on top is gone and then leaves.

A result without a value for every key column is no row (a key column is never NULL).

**Awaiting edits** (no flicker).  An outcome that wrote the edit's row in PostgreSQL
carries ``visible_after`` (docs/journal.md): every server version of the row that
includes the edit, or supersedes it, has a ``commit_lsn`` at or above it, every earlier
one below it.  Such an entry settles (its status is final) but keeps its edit on top,
:attr:`Edit.awaiting` = that bound, as long as the device has received nothing of the
row at or above it: neither the received version (``received_lsn``, the highest
``commit_lsn`` of the row's holds) nor any op of the row since the entry was made
(:attr:`Edit.seen`, REMOVEs included).  So the row goes from the edit straight to the
server version that includes it, never back to the version before.  An op without a
position (an older relay) counts as newer than any bound (:data:`UNKNOWN_POSITION`).
:func:`released` says when the agent stops keeping it: a version at or above the bound
arrived, or buckets were downloaded again (re-download, ``resync``, ``dropped``, a first
download) and no bucket holds the row, so that nothing may ever bring it.

Values are in SQLite form (as stored in the tables and in the journal's ``old``/``new``;
:func:`device_agent.local_db.to_sql` turns received wire values into it).  Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import orjson

Row = dict[str, Any]

UNKNOWN_POSITION: Final = (1 << 63) - 1
"""The ``commit_lsn`` counted for an op that carries no position: above any bound."""


class EditOp(enum.StrEnum):
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"


@dataclasses.dataclass(frozen=True)
class Edit:
    """One journal entry of a row kept on top (``old``/``new`` are whole rows, SQLite
    form): open (``awaiting`` None), or settled and awaiting the server version at or
    above ``awaiting`` (see the module docstring)."""

    seq: int
    op: EditOp
    old: Mapping[str, Any] | None
    new: Mapping[str, Any] | None
    awaiting: int | None = None
    """The outcome's ``visible_after`` while the entry awaits its server version."""
    seen: int | None = None
    """The highest ``commit_lsn`` of an op of the row received since the entry was made."""

    @classmethod
    def from_journal(
        cls,
        seq: int,
        op: str,
        old: str | None,
        new: str | None,
        awaiting: int | None = None,
        seen: int | None = None,
    ) -> Edit:
        return cls(
            int(seq),
            EditOp(op),
            orjson.loads(old) if old else None,
            orjson.loads(new) if new else None,
            None if awaiting is None else int(awaiting),
            None if seen is None else int(seen),
        )

    def shown(self, received_lsn: int | None) -> bool:
        """Open, or awaiting and nothing of the row at or above its bound received yet."""
        if self.awaiting is None:
            return True
        newest = max(
            -1 if received_lsn is None else received_lsn, -1 if self.seen is None else self.seen
        )
        return newest < self.awaiting


def released(edit: Edit, received_lsn: int | None, held: bool, buckets_reset: bool) -> bool:
    """Whether the agent stops keeping an awaiting edit on top: a version of the row at or
    above its bound was received, or buckets were downloaded again (``buckets_reset``)
    and no bucket holds the row (``held`` false: then nothing may ever bring its version;
    e.g. the token lost the bucket).  A REMOVE below the bound keeps it: the applier wrote
    the row into one of the device's buckets after that, so its version comes."""
    if edit.awaiting is None:
        return False
    return not edit.shown(received_lsn) or (buckets_reset and not held)


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
    received_lsn: int | None = None,
) -> Row | None:
    """The row the app sees (see the module docstring); None: no row.  ``edits``: the
    row's open and awaiting entries in seq order; ``received_lsn``: the highest
    ``commit_lsn`` of the positions of the received version's holds (None: unknown)."""
    row: Row | None = dict(received) if received is not None else None
    for edit in edits:
        if not edit.shown(received_lsn):
            continue
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
