"""Exceptions raised by the replay package (the audit tool over the Kafka change log).

Every error names the thing at fault: the table, the bound, the topic, partition and
offsets a read could not reach, the database or slot.  Library exceptions (kafka-python,
psycopg, fastavro) are converted at the boundary with ``raise ... from exc``.
:mod:`replay.cli` maps each to an exit code (docs/replay.md).

::

    core.errors.FieldsyncError
    ├── core.errors.ConfigError  bad setting, missing publication (exit 2)
    ├── core.errors.DecodeError  an event that cannot be decoded (exit 1)
    └── ReplayError              replay (the CLI maps each to an exit code; itself: exit 1)
        ├── UnknownTable         the log holds no such table (lists those it holds; exit 2)
        ├── BadKey               a --key that cannot name a row of the table (exit 2)
        ├── NoEvents             empty range, or a key without history (exit 4)
        ├── LogUnavailable       broker unreachable, or it stopped answering mid-read (exit 5)
        │   └── LogIncomplete    partitions not readable to their end (names topic, partition, offsets)
        ├── DatabaseUnavailable  PostgreSQL unreachable (verify; exit 5)
        └── LogBehind            cdc has not reached PostgreSQL's position within the wait (exit 5)
"""

from __future__ import annotations

from core.errors import FieldsyncError

__all__ = [
    "BadKey",
    "DatabaseUnavailable",
    "LogBehind",
    "LogIncomplete",
    "LogUnavailable",
    "NoEvents",
    "ReplayError",
    "UnknownTable",
]


class ReplayError(FieldsyncError):
    """Base of replay errors (the CLI maps each to an exit code)."""


class UnknownTable(ReplayError):
    """A table that the log does not hold (names it and lists the tables it does hold)."""


class BadKey(ReplayError):
    """A row key that cannot name a row of the table: not valid JSON, or not the table's key
    columns (names the table and its key columns)."""


class NoEvents(ReplayError):
    """An empty range: the bounds hold no event, or the key has no history."""


class LogUnavailable(ReplayError):
    """The broker cannot be reached or stopped answering in the middle of a read."""


class LogIncomplete(LogUnavailable):
    """The broker answers, but some partitions cannot be read to their end offset (an open
    Kafka transaction hides the rest): ``unread`` holds ``(topic, partition, first offset,
    last offset)`` of each range not read."""

    def __init__(self, message: str, unread: list[tuple[str, int, int, int]]) -> None:
        super().__init__(message)
        self.unread = unread


class DatabaseUnavailable(ReplayError):
    """PostgreSQL cannot be reached (verify)."""


class LogBehind(ReplayError):
    """cdc has not written up to PostgreSQL's current position within the wait (verify)."""
