"""The tables' rows as the log says they were: events applied in position order.

:class:`LogState` applies events in position order, one :class:`TableState` per table:
``c``/``r`` put the row, ``u`` puts the new row (removing the old key when the key
changed; columns PostgreSQL did not send, ``unchanged``, are taken from the previous
version, or marked unknown when the log does not hold it), ``d`` removes, ``t`` empties
the table.  Tables without key columns are multisets of whole rows (a row and its count);
when such a table is given key columns, its keyless rows are dropped at its first keyed
event (every row arrives again under its key: cdc re-sends the table).
A restarted initial snapshot (a second generation of ``r`` events of an initial snapshot,
``source.snapshot`` ``true`` or ``last``, at a later consistent point) removes rows the new
snapshot did not read once that snapshot is over (a later event, or the end of the log:
:meth:`LogState.finish`).  Rows a re-snapshot sends again (``snapshot = "incremental"``,
chunk by chunk, between streamed changes) are plain upserts.

:func:`state_as_of` reads the log up to a bound into a state (``fieldsync replay
as-of``); verify builds one up to PostgreSQL's position (replay.verify).  Rows keep
their values as decoded (Avro field names, datums) with the schema version that wrote
them; replay.output turns them into files.

:class:`TableState` and :class:`LogState` are pure (no I/O) and belong to the one thread
that applies events; :func:`state_as_of` drives a :class:`~replay.log_reader.LogReader`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from core.positions import format_lsn
from replay.bounds import Bound, Pos
from replay.catalog import LogCatalog
from replay.errors import NoEvents, ReplayError
from replay.events import ChangeEvent, Progress, ReadStats
from replay.log_reader import LogReader
from replay.log_source import LogSource

__all__ = [
    "LogState",
    "RowVersion",
    "TableState",
    "all_tables",
    "hashable",
    "key_id",
    "state_as_of",
]

log = logging.getLogger(__name__)


def hashable(value: Any) -> Any:
    """A decoded datum as a hashable value (lists and records as tuples)."""
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, hashable(v)) for k, v in value.items()))
    return value


def key_id(row: Mapping[str, Any], key_fields: Sequence[str]) -> tuple[Any, ...]:
    """What tells a row apart: its key fields' values, or without key columns the whole
    row."""
    if key_fields:
        return tuple(hashable(row.get(f)) for f in key_fields)
    return ("\x00row", *sorted((k, hashable(v)) for k, v in row.items()))


@dataclasses.dataclass(slots=True)
class RowVersion:
    """A row as the log last wrote it."""

    values: dict[str, Any]  # Avro field name -> decoded datum
    fingerprint: bytes  # value schema of the event that wrote it
    position: Pos
    time_us: int  # commit time (0: snapshot read)
    origin: str | None
    txid: int | None
    op: str
    unknown: frozenset[str] | None = None  # unchanged TOAST values the log does not hold
    count: int = 1  # tables without key columns: how many identical rows


class TableState:
    """The rows of one table after the events applied so far."""

    def __init__(self, table: str, catalog: LogCatalog) -> None:
        self.table = table
        self.catalog = catalog
        self.rows: dict[tuple[Any, ...], RowVersion] = {}
        self.events = 0
        self.truncated_at: Pos | None = None
        self._keyless = False  # rows were put without a Kafka key (a multiset)
        self._snapshot_point: int | None = None
        self._prune_below: int | None = None

    def apply(self, ev: ChangeEvent) -> None:
        version = self.catalog.versions.get(ev.fingerprint)
        if version is None:  # registered after the catalog was built: refresh by decoding
            raise ReplayError(f"{ev.table}: no table schema for fingerprint {ev.fingerprint.hex()}")
        self.events += 1
        op = ev.op
        pos = ev.position
        initial = op == "r" and ev.source.get("snapshot") != "incremental"
        if self._prune_below is not None and pos[0] > self._prune_below and not initial:
            self.prune()
        if op == "t":
            self.rows.clear()
            self.truncated_at = pos
            return
        key_fields = self.catalog.key_fields(version, ev.key_fingerprint)
        if key_fields and self._keyless:
            self._keyed_from(pos)
        if op == "d":
            if ev.before is not None:
                self._remove(key_id(ev.before, key_fields), bool(key_fields))
            return
        after = ev.after
        if after is None:
            return
        if initial:
            point = pos[0]
            if self._snapshot_point is not None and point > self._snapshot_point:
                self._prune_below = point
            self._snapshot_point = (
                point if self._snapshot_point is None else max(point, self._snapshot_point)
            )
        kid = key_id(after, key_fields)
        prev: RowVersion | None = None
        if op == "u":
            if ev.before is not None:
                old = key_id(ev.before, key_fields)
                prev = self._remove(old, bool(key_fields)) if old != kid else self.rows.get(kid)
            else:
                prev = self.rows.get(kid)
        values = after
        unknown: frozenset[str] | None = None
        if ev.unchanged:
            values = dict(after)
            source_row = prev.values if prev is not None else None
            if source_row is None and ev.before_kind == "full" and ev.before is not None:
                source_row = ev.before
            missing = []
            for f in ev.unchanged:
                if (
                    source_row is not None
                    and f in source_row
                    and not (prev is not None and prev.unknown and f in prev.unknown)
                ):
                    values[f] = source_row[f]
                else:
                    missing.append(f)
            unknown = frozenset(missing) or None
            kid = key_id(values, key_fields) if not key_fields else kid
        row = RowVersion(
            values,
            ev.fingerprint,
            pos,
            ev.commit_ts_us,
            ev.origin,
            ev.source.get("txid"),
            op,
            unknown,
        )
        if key_fields:
            self.rows[kid] = row
        else:
            self._keyless = True
            have = self.rows.get(kid)
            row.count = (have.count if have is not None else 0) + 1
            self.rows[kid] = row

    def _remove(self, kid: tuple[Any, ...], keyed: bool) -> RowVersion | None:
        if keyed:
            return self.rows.pop(kid, None)
        have = self.rows.get(kid)
        if have is not None:
            have.count -= 1
            if have.count <= 0:
                del self.rows[kid]
        return have

    def _keyed_from(self, pos: Pos) -> None:
        """The table's events have a Kafka key from here on (it was given key columns): the
        rows its keyless events put are dropped, as every row it has arrives again under its
        key (the re-snapshot cdc runs after the change, or a later change of the row)."""
        keyless = [k for k in self.rows if k[:1] == ("\x00row",)]
        for k in keyless:
            del self.rows[k]
        self._keyless = False
        log.info(
            "%s: keyed from %s on; %d row(s) put without a key dropped",
            self.table,
            format_lsn(pos[0]),
            len(keyless),
        )

    def prune(self) -> None:
        """End of a restarted snapshot: drop rows it did not read (deleted before it)."""
        below = self._prune_below
        if below is None:
            return
        self._prune_below = None
        stale = [k for k, r in self.rows.items() if r.position < (below, 0)]
        for k in stale:
            del self.rows[k]
        if stale:
            log.info(
                "%s: %d rows not in the restarted snapshot at %s removed",
                self.table,
                len(stale),
                format_lsn(below),
            )


class LogState:
    """Per table state (:class:`TableState`) of the events applied so far."""

    def __init__(self, catalog: LogCatalog, tables: Iterable[str]) -> None:
        self.catalog = catalog
        self.tables: dict[str, TableState] = {t: TableState(t, catalog) for t in tables}
        self.position: Pos | None = None
        self.time_us = 0

    def apply(self, ev: ChangeEvent) -> None:
        state = self.tables.get(ev.table)
        if state is None:
            state = self.tables[ev.table] = TableState(ev.table, self.catalog)
        if ev.fingerprint not in self.catalog.versions:
            raise ReplayError(
                f"{ev.topic}[{ev.partition}]@{ev.offset}: schema {ev.fingerprint.hex()} "
                "is not a change-event schema of this log"
            )
        state.apply(ev)
        self.position = ev.position
        self.time_us = max(self.time_us, ev.time_us)

    def finish(self) -> None:
        """The log was read to its end: finish restarted snapshots."""
        for state in self.tables.values():
            state.prune()

    @property
    def events(self) -> int:
        return sum(t.events for t in self.tables.values())


def all_tables(catalog: LogCatalog, names: Sequence[str] | None) -> list[str]:
    """``schema.table`` of the tables named (every table of the log when none is)."""
    if names:
        return [catalog.resolve(n) for n in names]
    if not catalog.tables:
        raise NoEvents(f"the log with prefix {catalog.prefix!r} holds no table (no schemas)")
    return sorted(catalog.tables)


def state_as_of(
    source: LogSource,
    tables: Sequence[str] | None,
    bound: Bound | None,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
) -> tuple[LogState, ReadStats]:
    """The tables' rows after every event up to ``bound`` (None: the whole log)."""
    catalog = source.catalog()
    names = all_tables(catalog, tables)
    state = LogState(catalog, names)
    with LogReader(source, names, progress=progress, workers=workers) as reader:
        for ev in reader.events(stop=bound):
            state.apply(ev)
        if reader.at_end():
            state.finish()
        stats = reader.stats
    if stats.events == 0:
        where = f"at or before {bound}" if bound is not None else "in the log"
        raise NoEvents(
            f"no event of {', '.join(names)} {where} ({stats.records} records read; "
            "the log starts later, or the tables have no events)"
        )
    return state, stats
