"""Verify: does the log still match the database?

:func:`verify` opens a REPEATABLE READ snapshot of PostgreSQL, notes the WAL insert
position ``L``, waits until the cdc slot has confirmed ``L`` (so Kafka holds every
transaction committed before it), rebuilds the captured tables from the log up to ``L``
(every partition read to its end or past ``L``; replay.log_reader, replay.state), and
compares them with the snapshot's rows, every column of the table of now for every row
(replay.compare): the snapshot's values go through cdc's own codec, so the same value is
the same datum (replay.pg_side); a value the log wrote under an older column type is
cast to the type of now by PostgreSQL first; a column the log holds no value for (the
row's last event used a schema without it, or left it unchanged as TOAST with no earlier
value in the log) is a difference, with the reason.  Rows that differ are checked again
against a newer snapshot (a transaction that committed at the very moment of the first
snapshot can be on one side only): the same reader continues from where it stopped, up
to the new ``L``.  What still differs is reported (:class:`VerifyReport`;
:func:`render_diff` prints it for people).

Verify writes nothing, except one non-transactional logical-decoding message that moves
the WAL past ``L`` on an idle database (:func:`~replay.pg_side.wait_for_slot`).

Concurrency: none; one reader and two PostgreSQL connections (the snapshot, and one
for casts) in the caller's thread.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Sequence
from typing import Any

from core.positions import format_lsn
from replay.bounds import MAX_SEQ, Bound
from replay.compare import RowDiff, compare_table
from replay.events import Progress, ReadStats
from replay.log_reader import LogReader
from replay.log_source import LogSource
from replay.pg_side import PgSide, PgTarget, pg_connect, pg_tables, wait_for_slot
from replay.state import LogState

__all__ = ["VerifyReport", "render_diff", "verify"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class VerifyReport:
    tables: list[str]
    rows_compared: int
    lsn: int
    diffs: list[RowDiff]
    stats: ReadStats
    rechecked: int = 0
    not_carried: int = 0  # values of compared rows the log holds no value for
    not_in_log: list[str] = dataclasses.field(default_factory=list)  # published, no schema yet
    partitions: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # read_to, end

    @property
    def ok(self) -> bool:
        return not self.diffs

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "tables": self.tables,
            "rows_compared": self.rows_compared,
            "up_to_lsn": format_lsn(self.lsn),
            "rechecked": self.rechecked,
            "values_not_in_log": self.not_carried,
            "differences": [d.to_json() for d in self.diffs],
            "read": self.stats.to_json(),
            "partitions": self.partitions,
        }


def verify(
    source: LogSource,
    pg: PgTarget,
    tables: Sequence[str] | None = None,
    *,
    wait_s: float = 60.0,
    rechecks: int = 2,
    progress: Progress | None = None,
    workers: int | None = None,
) -> VerifyReport:
    """Rebuild the captured tables from the log and compare them with PostgreSQL."""
    side: PgSide | None = None
    probe = pg_connect(pg)
    try:
        published = pg_tables(probe, pg, tables)
        names = [f"{t.schema}.{t.table}" for t in published]
        catalog = source.catalog()
        in_log = [n for n in names if n in catalog.tables]
        side = PgSide(pg, source.prefix, published)
        state = LogState(catalog, in_log)
        reader = LogReader(source, in_log, progress=progress, workers=workers)
        todo = names
        diffs: list[RowDiff] = []
        counters = {"rows": 0, "not_carried": 0}
        rows_compared = not_carried = 0
        attempt = 0
        lsn = 0
        try:
            while True:
                lsn, found = _round(probe, pg, side, reader, state, todo, wait_s, counters)
                if attempt == 0:
                    rows_compared = counters["rows"]
                    not_carried = counters["not_carried"]
                diffs = [d for d in diffs if d.table not in todo] + found
                if not found or attempt >= rechecks:
                    break
                attempt += 1
                todo = sorted({d.table for d in found})
                log.info("verify: %d differences in %s; checking them again", len(found), todo)
            stats = reader.stats
            partitions = reader.read_to()
        finally:
            reader.close()
        return VerifyReport(
            names,
            rows_compared,
            lsn,
            diffs,
            stats,
            attempt,
            not_carried,
            [n for n in names if n not in catalog.tables],
            partitions,
        )
    finally:
        if side is not None:
            side.close()
        probe.close()


def _round(
    probe: Any,
    pg: PgTarget,
    side: PgSide,
    reader: LogReader,
    state: LogState,
    todo: Sequence[str],
    wait_s: float,
    counters: dict[str, int],
) -> tuple[int, list[RowDiff]]:
    """One snapshot of PostgreSQL at WAL position ``L``: wait until cdc has confirmed
    ``L``, apply the log's events before it, compare the tables in ``todo``; returns ``L``
    and the differences."""
    lsn = side.snapshot()
    try:
        wait_for_slot(probe, pg, lsn, wait_s)
        reader.refresh_ends()
        for ev in reader.events(stop=Bound(position=(lsn - 1, MAX_SEQ))):
            state.apply(ev)
        if reader.at_end():
            state.finish()
        counters["rows"] = counters["not_carried"] = 0
        found: list[RowDiff] = []
        for name in todo:
            found += compare_table(
                state.catalog, state.tables.get(name), name, side.table(name), counters
            )
        return lsn, found
    finally:
        side.end()


def render_diff(report: VerifyReport, max_rows: int = 20) -> str:
    """The differences, readable: per table a count line, then up to ``max_rows`` rows."""
    out = io.StringIO()
    by_table: dict[str, list[RowDiff]] = {}
    for d in report.diffs:
        by_table.setdefault(d.table, []).append(d)
    for table, diffs in sorted(by_table.items()):
        counts = {
            k: sum(d.count for d in diffs if d.kind == k) for k in ("missing", "extra", "differs")
        }
        out.write(
            f"{table}: {counts['missing']} missing from the log, {counts['extra']} only in the log, "
            f"{counts['differs']} different\n"
        )
        for d in diffs[:max_rows]:
            key = ", ".join(f"{k}={_short_text(v)}" for k, v in d.key.items())
            if d.kind == "missing":
                out.write(f"  missing  {key}: in PostgreSQL, not in the log\n")
            elif d.kind == "extra":
                times = f" ({d.count} rows)" if d.count > 1 else ""
                out.write(
                    f"  extra    {key}: in the log (last written at {d.log_position}), "
                    f"not in PostgreSQL{times}\n"
                )
            else:
                out.write(f"  differs  {key} (log as of {d.log_position}):\n")
                for cd in d.columns:
                    q = cd.column not in d.bare or cd.reason is not None
                    pg_text = f"PostgreSQL {_short_text(cd.postgres, q)}"
                    if not cd.in_log:
                        out.write(
                            f"             {cd.column}: not in the log for this row "
                            f"({cd.reason}); {pg_text}\n"
                        )
                        continue
                    why = f" ({cd.reason})" if cd.reason else ""
                    out.write(
                        f"             {cd.column}: log {_short_text(cd.log, q)}{why}, {pg_text}\n"
                    )
        if len(diffs) > max_rows:
            out.write(f"  … {len(diffs) - max_rows} more\n")
    return out.getvalue()


def _short_text(value: Any, quote: bool = True, limit: int = 60) -> str:
    if value is None:
        return "NULL"
    text = value if isinstance(value, str) else json.dumps(value)
    text = repr(text) if isinstance(value, str) and quote else text
    return text if len(text) <= limit else text[: limit - 1] + "…"
