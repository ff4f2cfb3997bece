"""``fieldsync replay``: the audit tool over the Kafka change log (a thin CLI over the
replay package: replay.history, replay.state, replay.export, replay.verify).

Commands: ``history``, ``as-of``, ``export``, ``verify`` (docs/replay.md).  Settings come
from the cdc settings file (``--config``; ``[kafka]`` for the log, ``[postgres]`` for
verify) and ``FIELDSYNC_*`` environment variables.  Progress of long reads is a rich
progress bar on stderr (only on a terminal; ``--quiet`` turns it off).

Exit codes:

- 0 success (verify: the log and PostgreSQL agree)
- 1 runtime failure (an event that cannot be decoded, an unexpected error)
- 2 usage or configuration error (bad option or bound, bad config file, unknown table,
  a key that does not fit the table's key columns, missing publication)
- 3 verify found differences (printed as a readable diff)
- 4 nothing in range: empty range, no event up to the bound, no history for the key
- 5 a service is unavailable: Kafka broker down, PostgreSQL unreachable, or cdc has not
  caught up with PostgreSQL within ``--wait`` (verify)
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from core.errors import ConfigError, FieldsyncError
from core.positions import format_lsn
from replay.bounds import (
    Bound,
    format_position,
    format_time,
    parse_bound,
    parse_position,
    parse_time,
)
from replay.errors import (
    BadKey,
    DatabaseUnavailable,
    LogBehind,
    LogUnavailable,
    NoEvents,
    UnknownTable,
)
from replay.export import export_events
from replay.history import row_history, threads_of
from replay.keys import KeySpec
from replay.log_source import LogSource
from replay.output import Format, write_state
from replay.pg_side import PgTarget
from replay.state import state_as_of
from replay.verify import render_diff, verify

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_DIFFERENCES = 3
EXIT_EMPTY = 4
EXIT_UNAVAILABLE = 5

app = typer.Typer(
    help="Audit replay over the Kafka change log: row history, state as of a time, "
    "exports, and verify against PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="cdc settings file (TOML); its kafka section locates the log, its postgres "
        "section the database (verify). FIELDSYNC_<SECTION>_<KEY> env vars override it.",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="decode worker processes for large reads (default: 1 from 4 CPUs, else 0)",
    ),
]
TablesOpt = Annotated[
    list[str] | None,
    typer.Option("--table", "-t", help="schema.table (or table: public); repeat for more"),
]


def _settings(config: Path | None) -> Any:
    from cdc.settings import load_cdc_settings

    if config is not None and not config.exists():
        raise ConfigError(f"config file {config} does not exist")
    return load_cdc_settings(config)


def _source(config: Path | None) -> LogSource:
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    return LogSource.from_settings(_settings(config))


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Library errors → one line on stderr and the documented exit code."""
    try:
        yield
    except typer.Exit:
        raise
    except (ConfigError, UnknownTable, BadKey, ValueError) as exc:
        _fail(exc, EXIT_USAGE)
    except NoEvents as exc:
        _fail(exc, EXIT_EMPTY)
    except (LogUnavailable, DatabaseUnavailable, LogBehind) as exc:
        _fail(exc, EXIT_UNAVAILABLE)
    except FieldsyncError as exc:
        _fail(exc, EXIT_RUNTIME)
    except (OSError, sqlite3.Error) as exc:
        _fail(exc, EXIT_RUNTIME)


def _fail(exc: Exception, code: int) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _progress(quiet: bool, what: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr (records fetched of records expected)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update


def _bound(text: str | None, *, end: bool) -> Bound | None:
    return parse_bound(text, end=end) if text else None


def _format_of(fmt: str | None, out: str) -> Format:
    if fmt is None:
        suffix = Path(out).suffix.lower()
        fmt = {".sqlite": "sqlite", ".db": "sqlite", ".sqlite3": "sqlite", ".csv": "csv"}.get(
            suffix, "jsonl"
        )
    if fmt not in ("jsonl", "csv", "sqlite"):
        raise ValueError(f"unknown --format {fmt!r} (jsonl, csv or sqlite)")
    return fmt  # type: ignore[return-value]


def _read_summary(stats: Any) -> str:
    parts = [f"{stats.events} events"]
    if stats.duplicates:
        parts.append(f"{stats.duplicates} duplicates dropped")
    if stats.tombstones:
        parts.append(f"{stats.tombstones} tombstones skipped")
    return ", ".join(parts)


# --------------------------------------------------------------------------- history


@app.command("history")
def history(
    table: Annotated[str, typer.Option("--table", "-t", help="schema.table (or table)")],
    key: Annotated[
        str,
        typer.Option(
            "--key",
            "-k",
            help='the row\'s key: 42, abc, [1, "x"] (key columns in table order) or {"id": 42}',
        ),
    ],
    start: Annotated[
        str | None, typer.Option("--from", help="start: time (ISO 8601) or LSN[:seq]")
    ] = None,
    stop: Annotated[str | None, typer.Option("--to", help="end: time or LSN[:seq]")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="text or json")] = "text",
    no_journal: Annotated[
        bool, typer.Option("--no-journal", help="do not read _journal/_outcomes")
    ] = False,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    workers: WorkersOpt = None,
) -> None:
    """Every version of a row: position, commit time, op, origin, and for device edits
    the journal entry and its outcome."""
    with _errors():
        if fmt not in ("text", "json"):
            raise ValueError(f"unknown --format {fmt!r} (text or json)")
        source = _source(config)
        spec = KeySpec.parse(key)
        with _progress(quiet, f"history of {table}") as progress:
            report = row_history(
                source,
                table,
                spec,
                start=_bound(start, end=False),
                stop=_bound(stop, end=True),
                journal=not no_journal,
                progress=progress,
                workers=workers,
            )
        if fmt == "json":
            typer.echo(json.dumps(report.to_json(), indent=2, default=str))
        else:
            typer.echo(_history_text(report))


def _history_text(report: Any) -> str:
    threads = threads_of(report.versions)
    several = len(threads) > 1
    rows = f" of {len(threads)} rows that held the key" if several else ""
    lines = [
        f"{report.table} key {report.key.text}: {len(report.versions)} versions{rows} "
        f"({_read_summary(report.stats)} read)",
    ]
    numbered = list(enumerate(report.versions, 1))
    for t in threads:
        lines.append("")
        if several:
            keys = " → ".join(_cells(k) for k in t["keys"])
            end = {"delete": "deleted", "truncate": "truncated"}.get(
                t["ended"] or "", "present at the end of the read"
            )
            lines.append(
                f"row {t['thread']} of {len(threads)}: key {keys}; {t['versions']} versions; {end}"
            )
        for n, v in numbered:
            if v["thread"] == t["thread"]:
                lines += _version_lines(n, v)
    if report.unmatched_edits:
        lines += ["", "device edits of this key that did not produce a version:"]
        for e in report.unmatched_edits:
            lines.append("  " + _journal_line(e["journal"]))
            lines.append("    " + _outcome_line(e.get("outcome")))
    return "\n".join(lines)


def _version_lines(n: int, v: dict[str, Any]) -> list[str]:
    origin = v["origin"]
    who = origin["text"] + (
        f" (txid {origin['txid']})"
        if origin.get("txid") and origin["kind"] not in ("session", "snapshot")
        else ""
    )
    lines = [
        f"#{n:<3} {v['position']:<22} {v['commit_time'] or '(snapshot)':<28} {v['change']:<14} {who}"
    ]
    if v.get("key_changed_from"):
        lines.append(
            f"      key changed from {_cells(v['key_changed_from'])} to {_cells(v['key'])}"
        )
    if v["row"] is None:
        lines.append("      row: (gone)")
    elif v["previous"] is None:
        lines.append(f"      row: {_cells(v['row'])}")
    else:
        for c in v["changed"]:
            old = "(not in the log)" if c in v["not_in_previous"] else _value(v["previous"].get(c))
            lines.append(f"      {c}: {old} → {_value(v['row'].get(c))}")
        if not v["changed"]:
            lines.append("      (no column changed)")
    if v["unknown_columns"]:
        lines.append(f"      not in the log (unchanged TOAST): {', '.join(v['unknown_columns'])}")
    if v.get("journal"):
        lines.append("      " + _journal_line(v["journal"]))
        lines.append("      " + _outcome_line(v.get("outcome")))
    return lines


def _value(value: Any) -> str:
    return "NULL" if value is None else json.dumps(value, ensure_ascii=False, default=str)


def _cells(row: dict[str, Any]) -> str:
    return ", ".join(f"{c}={_value(v)}" for c, v in row.items())


def _journal_line(j: dict[str, Any]) -> str:
    parts = [f"journal: {j['device_id']} seq {j['seq']}"]
    if j.get("op"):
        parts.append(str(j["op"]))
    if j.get("new"):
        parts.append(f"new {_cells(j['new'])}")
    if j.get("base"):
        parts.append(f"based on {j['base']}")
    if j.get("hlc"):
        parts.append(f"hlc {j['hlc']}")
    if j.get("received_at"):
        parts.append(f"received {j['received_at']}")
    if j.get("rejection"):
        parts.append(f"rejected on upload: {j['rejection'].get('reason')}")
    return ", ".join(parts)


def _outcome_line(o: dict[str, Any] | None) -> str:
    if o is None:
        return "outcome: (none published yet)"
    parts = [f"outcome: {o['outcome']}"]
    if o.get("reason"):
        parts.append(str(o["reason"]))
    if o.get("columns"):
        parts.append("columns " + ", ".join(f"{c}: {d}" for c, d in o["columns"].items()))
    if o.get("message"):
        parts.append(str(o["message"]))
    if o.get("at_us"):
        parts.append(f"at {format_time(o['at_us'])}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- as-of


@app.command("as-of")
def as_of(
    out: Annotated[str, typer.Option("--out", "-o", help="output file ('-': stdout, jsonl/csv)")],
    at_time: Annotated[
        str | None, typer.Option("--time", help="ISO 8601 time (no zone: UTC)")
    ] = None,
    position: Annotated[
        str | None, typer.Option("--position", help="LSN or LSN:seq (inclusive)")
    ] = None,
    tables: TablesOpt = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", "-f", help="sqlite, jsonl or csv (default: from --out's suffix)"),
    ] = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    workers: WorkersOpt = None,
) -> None:
    """The state of tables at a time or position, rebuilt from the log."""
    with _errors():
        if (at_time is None) == (position is None):
            raise ValueError("give exactly one of --time and --position")
        bound = (
            Bound(time_us=parse_time(at_time), text=at_time)
            if at_time is not None
            else Bound(position=parse_position(str(position), end=True), text=str(position))
        )
        form = _format_of(fmt, out)
        target: Any = sys.stdout if out == "-" else Path(out)
        if target is sys.stdout and form == "sqlite":
            raise ValueError("--format sqlite needs a file for --out")
        source = _source(config)
        with _progress(quiet, "reading the log") as progress:
            state, stats = state_as_of(source, tables, bound, progress=progress, workers=workers)
        meta = {
            "as_of": str(bound),
            "position": format_position(state.position) if state.position else None,
            "last_commit_time": format_time(state.time_us),
            "tables": sorted(state.tables),
            "read": stats.to_json(),
        }
        n = write_state(state, target, form, meta=meta)
        typer.echo(
            f"{n} rows of {len(state.tables)} tables as of {bound} "
            f"(last event {format_position(state.position) if state.position else '-'}; "
            f"{_read_summary(stats)}) → {out}",
            err=True,
        )


# --------------------------------------------------------------------------- export


@app.command("export")
def export(
    start: Annotated[
        str | None, typer.Option("--from", help="time (ISO 8601) or LSN[:seq], inclusive")
    ] = None,
    stop: Annotated[str | None, typer.Option("--to", help="time or LSN[:seq], inclusive")] = None,
    tables: TablesOpt = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", "-f", help="jsonl, csv or sqlite (default: from --out)"),
    ] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="output file ('-': stdout)")] = "-",
    follow: Annotated[
        bool, typer.Option("--follow", help="keep exporting new events (Ctrl-C stops)")
    ] = False,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    workers: WorkersOpt = None,
) -> None:
    """The change events in a range, in position order (one event per line/row)."""
    with _errors():
        form = _format_of(fmt, out)
        target: Any = sys.stdout if out == "-" else Path(out)
        if target is sys.stdout and form == "sqlite":
            raise ValueError("--format sqlite needs a file for --out")
        source = _source(config)
        interrupted = threading.Event()
        try:
            with (
                _progress(quiet or follow, "exporting") as progress,
                _stop_on_signals(interrupted, follow),
            ):
                stats = export_events(
                    source,
                    tables,
                    _bound(start, end=False),
                    _bound(stop, end=True),
                    target,
                    form,
                    follow=follow,
                    progress=progress,
                    workers=workers,
                    stopped=interrupted.is_set,
                )
        except KeyboardInterrupt:
            typer.echo("stopped", err=True)
            return
        if interrupted.is_set():
            typer.echo("stopped", err=True)
        typer.echo(f"{_read_summary(stats)} → {out}", err=True)


@contextlib.contextmanager
def _stop_on_signals(flag: threading.Event, follow: bool) -> Iterator[None]:
    """While following, SIGINT (Ctrl-C) and SIGTERM set ``flag`` instead of raising: the
    export ends at its next event or wait with its output flushed (a KeyboardInterrupt
    raised inside kafka-python's wait is caught and logged there, so the follow would go
    on).  Only in the main thread, where Python runs signal handlers."""
    if not follow or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        sig: signal.signal(sig, lambda *_: flag.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- verify


@app.command("verify")
def verify_cmd(
    tables: TablesOpt = None,
    wait: Annotated[
        float, typer.Option("--wait", help="seconds to wait for cdc to catch up")
    ] = 60.0,
    rechecks: Annotated[
        int, typer.Option("--rechecks", help="times a difference is checked again")
    ] = 2,
    max_rows: Annotated[int, typer.Option("--max-rows", help="diff lines per table")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable report")] = False,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    workers: WorkersOpt = None,
) -> None:
    """Rebuild the captured tables from the log and diff them with PostgreSQL."""
    with _errors():
        settings = _settings(config)
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
        source = LogSource.from_settings(settings)
        with _progress(quiet, "reading the log") as progress:
            report = verify(
                source,
                PgTarget.from_settings(settings),
                tables,
                wait_s=wait,
                rechecks=rechecks,
                progress=progress,
                workers=workers,
            )
        if as_json:
            typer.echo(json.dumps(report.to_json(), indent=2, default=str))
        elif report.diffs:
            typer.echo(render_diff(report, max_rows))
        summary = (
            f"verify: {len(report.tables)} tables, {report.rows_compared} rows, log read up to "
            f"{format_lsn(report.lsn)} ({_read_summary(report.stats)})"
        )
        if report.not_in_log:
            summary += f"; no events yet for {', '.join(report.not_in_log)}"
        if report.not_carried:
            summary += f"; {report.not_carried} values of compared rows not in the log"
        if report.diffs:
            typer.echo(f"{summary}: {len(report.diffs)} rows differ", err=True)
            raise typer.Exit(EXIT_DIFFERENCES)
        typer.echo(f"{summary}: the log and PostgreSQL agree", err=True)
