"""The human view of a ``fieldsync status`` report (fieldsync/status.py): one table row per
part (state and a one-line summary of its facts), then every problem on a line of its own,
then the verdict with the exit code.  ``--json`` prints :meth:`Report.to_json` instead.

Pure formatting: the summaries are built from the report's facts; :func:`render` writes
them with rich (wide enough that a pipe or a log keeps each row on one line).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fieldsync.status import Part, Report, State

__all__ = ["render", "summary"]

_STYLE = {
    State.OK: "green",
    State.SKIPPED: "dim",
    State.ATTENTION: "yellow",
    State.BEHIND: "yellow",
    State.DOWN: "red",
    State.UNREACHABLE: "red",
}


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _cdc(f: dict[str, Any]) -> str:
    if f["exists"] is None:
        return f"slot {f['slot']}"
    if not f["exists"]:
        return f"slot {f['slot']} missing"
    text = (
        f"slot {f['slot']} {'active' if f['active'] else 'inactive'}, WAL {f['wal_status']}; "
        f"{_bytes(f['lag_bytes'] or 0)} behind the server "
        f"(confirmed {f['confirmed_flush_lsn']} of {f['current_wal_lsn']})"
    )
    if f["last_event_time"]:
        text += f"; last event {f['last_event_time']}"
    if f["resnapshots"]:
        text += f"; {len(f['resnapshots'])} re-snapshot(s) queued or running"
    return text


def _lag(f: dict[str, Any]) -> str:
    if f["lag_records"] is None:
        return ""
    return f"{f['lag_records']} record(s) behind on {len(f['partitions'])} partition(s)"


def _engine(f: dict[str, Any]) -> str:
    parts = [f"group {f['group']}"]
    if f["leading"] is not None:
        parts[0] += " leading" if f["leading"] else " without a leader"
    if lag := _lag(f):
        parts.append(lag)
    if f["missing_topics"]:
        parts.append(f"{len(f['missing_topics'])} table(s) without events yet")
    return "; ".join(parts)


def _applier(f: dict[str, Any]) -> str:
    parts = [f"consumer {f['consumer']}"]
    if f["running_shards"] is not None:
        parts[0] += f": {len(f['running_shards'])} of {f['shards']} shard(s) running"
    if lag := _lag(f):
        parts.append(lag)
    if f["dead_letters"] is not None:
        parts.append(f"{f['dead_letters']} dead letter(s), {f['bad_records']} unreadable record(s)")
    return "; ".join(parts)


def _devices(f: dict[str, Any]) -> str:
    parts = []
    if f["connected"] is not None:
        parts.append(
            f"{f['connected']} connected ({f['streams']} stream(s), {f['long_polls']} "
            f"long-poll(s)) on {len(f['endpoints'])} relay(s)"
        )
    if f["uploaded_recently"] is not None:
        parts.append(f"{f['uploaded_recently']} uploaded in the last {f['recent_s']:g} s")
    return "; ".join(parts)


def _conflicts(f: dict[str, Any]) -> str:
    if f["open"] is None:
        return ""
    return f"{f['open']} open ({f['devices']} device(s))"


_SUMMARIES: dict[str, Callable[[dict[str, Any]], str]] = {
    "cdc": _cdc,
    "engine": _engine,
    "applier": _applier,
    "devices": _devices,
    "conflicts": _conflicts,
}


def summary(part: Part) -> str:
    """One line about ``part``: its facts, or why it was skipped."""
    if part.state is State.SKIPPED and part.name != "devices":
        return part.note or ""
    text = _SUMMARIES[part.name](part.facts)
    if part.note:
        text = f"{text}; {part.note}" if text else part.note
    return text


def render(report: Report, console: Console | None = None) -> None:
    """Print the table, the problems and the verdict."""
    out = console or Console(highlight=False)
    if not out.is_terminal:  # a pipe or a log: one line per row
        out = Console(width=200, highlight=False, file=out.file)
    table = Table(show_edge=False, box=None, pad_edge=False)
    table.add_column("part")
    table.add_column("state")
    table.add_column("summary", overflow="fold")
    for part in report.parts:
        style = _STYLE[part.state]
        table.add_row(part.name, Text(part.state.value, style=style), Text(summary(part)))
    out.print(table)
    for problem in report.problems:
        out.print(f"problem: {problem}", markup=False)
    code = report.exit_code
    out.print(
        "status: ok" if code == 0 else f"status: {len(report.problems)} problem(s), exit {code}",
        markup=False,
    )
