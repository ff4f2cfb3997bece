"""Unchanged TOAST values the bucket engine holds no copy of: read by key from the
captured database.

PostgreSQL leaves an unchanged TOASTed value out of an update's new row (REPLICA IDENTITY
DEFAULT or USING INDEX); the change event lists the column in ``unchanged``
(docs/events.md).  The planner (relay/downstream/planner.py) fills such a column from the
event's full old row (REPLICA IDENTITY FULL), else from the row's last version in the
batch or in the store.  It has none for a row that left every bucket or never was in one,
nor for a column the rules of the row's buckets did not keep (``columns``, ``exclude``).
When such a column is one a rule reads to place the row, or one a bucket the row goes to
keeps, the planner asks for it here (:class:`Wanted`: the row's key by the rules' key
columns, taken from the event's row, and the columns): :func:`fetch_wanted` reads them
from a :class:`SourceRows` (relay/downstream/source_rows.py: PostgreSQL at
``relay.source_dsn``), one read per table and batch, and the store plans the batch again
with what it got (:class:`Fills`).  The planner's first plan of a batch asks nothing
when no value is missing, so a batch that needs none costs no read.

The value read is the row's value now, which may be newer than the event's.  The result
still converges to PostgreSQL's: a later update that changes the column carries its
value, and one that leaves it unchanged fills it from the value placed; so once the
engine has applied the events up to the time of the read, the row holds the value
PostgreSQL had then, and every later change of it follows.  Until then a device may see
the newer value next to the event's other columns.  A value read belongs to the key, not
to the row that had it at the event (the key may have passed to another row since: a key
change, then an insert of the old key), so with a source the planner never fills a key
change from the old key's data (which may be such a read): it reads the new key.

A row the captured database has no more under that key (deleted, or its key changed,
since the event) is placed in no bucket (removed from those it is in): its delete or key
change is still to come from Kafka.  A value that cannot be had (no ``relay.source_dsn``,
or :class:`relay.errors.SourceUnreadable`: the table or the column not there now) skips
the change with an error naming the table, key and columns: a row is never sent without a
column its bucket keeps (``fieldsync_relay_toast_fills_total{result}`` counts each
outcome).  A database that cannot be reached raises :class:`relay.errors.EngineError`
from the source: the batch is not applied, and the engine retries it.

Pure apart from the calls to the :class:`SourceRows` it is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from relay.errors import SourceUnreadable

__all__ = ["Fills", "SourceRows", "Wanted", "fetch_wanted", "pending"]

Ref = tuple[str, str]
"""A row's identity in the store, ``(table, row_key)`` (relay.downstream.planner.RowRef)."""


class SourceRows(Protocol):
    """Reads rows of the captured database as they are now."""

    def read(
        self, table: str, columns: Sequence[str], keys: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any] | None]:
        """The values of ``columns`` of the rows of ``table`` (``schema.table``) with the
        given keys (key column → value, values as change events carry them), one per key
        in order: column → value as a change event would carry it, None where no row
        has that key now.  Raises :class:`relay.errors.SourceUnreadable` when the table's
        rows cannot be read, :class:`relay.errors.EngineError` when the database cannot
        be reached."""
        ...


class Wanted(NamedTuple):
    """Columns of one row the planner lacks: ``key`` is the row's key column → value."""

    ref: Ref
    key: tuple[tuple[str, Any], ...]
    columns: tuple[str, ...]


@dataclasses.dataclass
class Fills:
    """What the source gave for a batch so far: ``rows`` by row (None: no row with that key
    now) and, for the rows it could not give, why (``failed``)."""

    rows: dict[Ref, Mapping[str, Any] | None] = dataclasses.field(default_factory=dict)
    failed: dict[Ref, str] = dataclasses.field(default_factory=dict)

    def __contains__(self, ref: object) -> bool:
        return ref in self.rows or ref in self.failed


def pending(wanted: Sequence[Wanted], fills: Fills) -> list[Wanted]:
    """The wants not asked of the source yet."""
    return [w for w in wanted if w.ref not in fills]


def fetch_wanted(source: SourceRows, wanted: Sequence[Wanted], fills: Fills) -> int:
    """Read what ``wanted`` names (rows already in ``fills`` excepted) into ``fills``: one
    read per table, for the union of the columns wanted of it.  A table the source cannot
    read marks its rows failed.  Returns the number of rows asked for."""
    by_table: dict[str, dict[Ref, Wanted]] = {}
    for w in pending(wanted, fills):
        rows = by_table.setdefault(w.ref[0], {})
        seen = rows.get(w.ref)
        if seen is not None:
            w = w._replace(columns=tuple(dict.fromkeys(seen.columns + w.columns)))
        rows[w.ref] = w
    asked = 0
    for table in sorted(by_table):
        rows = by_table[table]
        refs = list(rows)
        columns = sorted({c for w in rows.values() for c in w.columns})
        asked += len(refs)
        try:
            found = source.read(table, columns, [dict(rows[r].key) for r in refs])
        except SourceUnreadable as exc:
            fills.failed.update(dict.fromkeys(refs, str(exc)))
            continue
        if len(found) != len(refs):
            raise ValueError(f"{table}: the source gave {len(found)} rows for {len(refs)} keys")
        fills.rows.update(zip(refs, found, strict=True))
    return asked
