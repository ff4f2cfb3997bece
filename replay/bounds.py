"""Positions, times and bounds: the two ways a reader of the log says where to start or stop.

A position is where an event is in the change stream: ``(commit_lsn, seq)``, the commit
LSN of its transaction and its place in it (docs/events.md); cdc writes it into every
record's ``fieldsync.pos`` header, and positions grow with offsets within a partition.
Users write it ``LSN[:seq]`` (``0/16B3F28:3``); a bare LSN as a start means the first
event of that transaction, as an end every event of it (``seq`` :data:`MAX_SEQ`).

A time is ISO 8601 (no zone: UTC), in µs since 1970.  An event's time is its commit
time; a snapshot read (op ``r``) has none and counts as older than any time.  Kafka
record timestamps and commit times come from different clocks, so a reader that seeks
or stops by time allows :data:`TIME_SLACK_S` between them (replay.log_reader).

Pure functions and frozen values: no I/O, nothing shared.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Final

from core.positions import format_lsn, parse_lsn

__all__ = [
    "MAX_SEQ",
    "TIME_SLACK_S",
    "Bound",
    "Pos",
    "format_position",
    "format_time",
    "parse_bound",
    "parse_position",
    "parse_time",
]

#: Largest ``seq``: ``LSN`` alone as an upper bound means "every event of that transaction".
MAX_SEQ: Final = (1 << 64) - 1
#: How far Kafka record times and commit times may disagree (clocks of two hosts).
TIME_SLACK_S: Final = 60.0
Pos = tuple[int, int]


def format_position(pos: Pos) -> str:
    """``16/B374D848:3`` (commit LSN as PostgreSQL prints it, then ``seq``)."""
    return f"{format_lsn(pos[0])}:{pos[1]}"


def parse_position(text: str, *, end: bool = False) -> Pos:
    """``LSN:seq`` or ``LSN``; a bare LSN means its first event (``end``: its last)."""
    lsn_text, sep, seq_text = text.strip().partition(":")
    try:
        lsn = parse_lsn(lsn_text)
        seq = int(seq_text) if sep else (MAX_SEQ if end else 0)
    except ValueError as exc:
        raise ValueError(
            f"not a position: {text!r} (expected LSN or LSN:seq, e.g. 0/16B3F28 or 0/16B3F28:3)"
        ) from exc
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"not a position: {text!r} (seq out of range)")
    return lsn, seq


def parse_time(text: str) -> int:
    """ISO 8601 (``2024-05-01T10:00:00Z``, ``2024-05-01 12:00+02:00``; no zone: UTC) → µs."""
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ValueError(
            f"not a time: {text!r} (expected ISO 8601, e.g. 2024-05-01T10:00:00Z)"
        ) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    delta = when - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def format_time(us: int | None) -> str | None:
    """µs since 1970 → ``2024-05-01T10:00:00.123456Z`` (None for None/0: no commit time)."""
    if not us:
        return None
    when = datetime.datetime(1970, 1, 1) + datetime.timedelta(microseconds=us)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclasses.dataclass(frozen=True)
class Bound:
    """One end of a range: a position or a time (µs), as the user wrote it (``text``)."""

    position: Pos | None = None
    time_us: int | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or (
            format_position(self.position)
            if self.position is not None
            else str(format_time(self.time_us))
        )


def parse_bound(text: str, *, end: bool = False) -> Bound:
    """A position if ``text`` holds an LSN (``/``), else a time."""
    if "/" in text:
        return Bound(position=parse_position(text, end=end), text=text)
    return Bound(time_us=parse_time(text), text=text)
