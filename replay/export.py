"""Export: the change events in a range, in position order, one event per line or row.

:func:`export_events` reads the tables' topics between two bounds (both inclusive;
replay.bounds) and writes every event as :func:`event_json` makes it: its position,
commit LSN and ``seq``, commit time, table, op, origin and txid, the key, ``before``
and ``after`` rows (PostgreSQL column names, JSON-form values, docs/events.md) and the
columns left unchanged.  Formats: ``jsonl`` (one object per line), ``csv`` (one record
per event; rows and lists as JSON text; replay.output) or ``sqlite`` (a table
``events``).  ``follow`` keeps the read open at the end of the log and writes new events
as they come (until interrupted, or until ``stop``).

Output is flushed at least once a second and whenever the reader waits for new events,
so a follower sees events soon after cdc writes them; a SQLite file is committed at the
same points and every 5,000 rows.

Concurrency: none; the reader and the file belong to the caller's thread.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final

from core.positions import format_lsn
from replay.bounds import Bound, format_position, format_time
from replay.catalog import LogCatalog
from replay.errors import NoEvents
from replay.events import ChangeEvent, Progress, ReadStats
from replay.keys import key_of
from replay.log_reader import LogReader
from replay.log_source import LogSource
from replay.output import Format, csv_line, quote_name
from replay.render import dumps, named_row
from replay.state import all_tables

__all__ = ["event_json", "export_events"]


class _Stopped(Exception):
    """Raised from the reader's idle callback to end a follow once ``stopped()`` is true."""


_EVENT_COLUMNS: Final = (
    "position",
    "commit_lsn",
    "seq",
    "commit_time",
    "table",
    "op",
    "origin",
    "txid",
    "key",
    "before",
    "after",
    "unchanged",
)


def event_json(catalog: LogCatalog, ev: ChangeEvent) -> dict[str, Any]:
    """An event as plain JSON (PostgreSQL column names, JSON-form values)."""
    version = catalog.versions.get(ev.fingerprint)
    row = ev.after if ev.after is not None else ev.before
    names = version.column_of() if version is not None else {}
    return {
        "position": format_position(ev.position),
        "commit_lsn": format_lsn(ev.position[0]),
        "seq": ev.position[1],
        "commit_time": format_time(ev.commit_ts_us),
        "table": ev.table,
        "op": ev.op,
        "origin": ev.origin,
        "txid": ev.source.get("txid"),
        "key": key_of(version, row) if version is not None and version.key_fields and row else None,
        "before": named_row(catalog, ev.fingerprint, ev.before) if ev.before is not None else None,
        "before_kind": ev.before_kind,
        "after": named_row(catalog, ev.fingerprint, ev.after) if ev.after is not None else None,
        "unchanged": [names.get(f, f) for f in ev.unchanged],
        "snapshot": ev.source.get("snapshot"),
    }


class _EventSink:
    def __init__(self, out: Path | IO[str], fmt: Format) -> None:
        self.fmt = fmt
        self.n = 0
        self._fh: IO[str] | None = None
        self._own = False
        self._db: sqlite3.Connection | None = None
        self._batch: list[tuple[Any, ...]] = []
        self._flushed = time.monotonic()
        if fmt == "sqlite":
            if not isinstance(out, Path):
                raise ValueError("sqlite needs a file for --out")
            if out.exists():
                out.unlink()
            self._db = sqlite3.connect(out)
            cols = ", ".join(
                f"{quote_name(c)} {'INTEGER' if c in ('seq', 'txid') else 'TEXT'}"
                for c in _EVENT_COLUMNS
            )
            self._db.execute(f"create table events ({cols})")
            self._db.commit()
        elif isinstance(out, Path):
            self._fh = out.open("w", encoding="utf-8", newline="")
            self._own = True
        else:
            self._fh = out
        if fmt == "csv":
            assert self._fh is not None
            self._fh.write(csv_line(list(_EVENT_COLUMNS)))

    def write(self, obj: dict[str, Any]) -> None:
        self.n += 1
        if self.fmt == "jsonl":
            assert self._fh is not None
            self._fh.write(dumps(obj))
            self._fh.write("\n")
        else:
            row = tuple(
                obj[c]
                if c
                in ("position", "commit_lsn", "seq", "commit_time", "table", "op", "origin", "txid")
                else (None if obj[c] is None else dumps(obj[c]))
                for c in _EVENT_COLUMNS
            )
            if self.fmt == "csv":
                assert self._fh is not None
                self._fh.write(csv_line([None if v is None else str(v) for v in row]))
            else:
                self._batch.append(row)
                if len(self._batch) >= 5000:
                    self.flush()
        if time.monotonic() - self._flushed > 1.0:
            self.flush()

    def flush(self) -> None:
        self._flushed = time.monotonic()
        if self._db is not None:
            if self._batch:
                marks = ", ".join("?" * len(_EVENT_COLUMNS))
                self._db.executemany(f"insert into events values ({marks})", self._batch)
                self._batch = []
            self._db.commit()
        elif self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        self.flush()
        if self._db is not None:
            self._db.close()
        if self._own and self._fh is not None:
            self._fh.close()


def export_events(
    source: LogSource,
    tables: Sequence[str] | None,
    start: Bound | None,
    stop: Bound | None,
    out: Path | IO[str],
    fmt: Format,
    *,
    follow: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
    stopped: Callable[[], bool] | None = None,
) -> ReadStats:
    """Write every event of ``tables`` between ``start`` and ``stop`` (both inclusive) in
    position order; ``follow``: then keep writing new events until interrupted (or until
    ``stop``).  ``stopped``: asked after each event and before each wait for new ones; when
    it answers true the export ends there, as at ``stop`` (how a follower is interrupted:
    a signal handler sets a flag, as an exception raised inside the Kafka client's wait
    would not reliably reach this loop).  Raises :class:`NoEvents` when a bounded range
    holds nothing."""
    catalog = source.catalog()
    names = all_tables(catalog, tables)
    _check_range(start, stop)
    sink = _EventSink(out, fmt)

    def idle() -> None:
        sink.flush()
        if stopped is not None and stopped():
            raise _Stopped

    try:
        with LogReader(source, names, start=start, progress=progress, workers=workers) as reader:
            with contextlib.suppress(_Stopped):
                for ev in reader.events(stop=stop, follow=follow, on_idle=idle):
                    sink.write(event_json(catalog, ev))
                    if stopped is not None and stopped():
                        break
            stats = reader.stats
    finally:
        sink.close()
    if stats.events == 0 and not follow:
        raise NoEvents(
            f"no event of {', '.join(names)} between {start or 'the start'} and "
            f"{stop or 'the end'} ({stats.records} records read)"
        )
    return stats


def _check_range(start: Bound | None, stop: Bound | None) -> None:
    if start is None or stop is None:
        return
    if start.position is not None and stop.position is not None and start.position > stop.position:
        raise NoEvents(f"empty range: {start} is after {stop}")
    if start.time_us is not None and stop.time_us is not None and start.time_us > stop.time_us:
        raise NoEvents(f"empty range: {start} is after {stop}")
