"""Exceptions raised by the cdc package.

Every error carries the context needed to act on it (LSN, relation, setting
name).  Library exceptions (psycopg, kafka-python, fastavro) are converted at
the boundary with ``raise ... from exc``.

::

    core.errors.FieldsyncError
    ├── core.errors.ConfigError  bad or unknown setting, wrong type (names the key)
    ├── core.errors.DecodeError  malformed or unknown pgoutput message (names byte + LSN)
    ├── core.errors.SchemaError  a relation/type cannot be mapped to Avro
    └── CdcError
        ├── SourceError              PostgreSQL side
        │   ├── PreflightError       wal_level, privileges, missing tables (names the fix)
        │   └── ReplicationLost      connection dropped mid-stream (retryable)
        ├── SinkError                Kafka side
        │   └── SinkUnavailable      broker unreachable / timed out (retryable)
        ├── SnapshotRequestError     a re-snapshot request names an unknown table or column, or an
        │                            invalid WHERE clause (says which and where)
        └── ReplayError              replay (the CLI maps each to an exit code)
            ├── UnknownTable         the log holds no such table (lists those it holds)
            ├── NoEvents             empty range, or a key without history
            ├── LogUnavailable       broker unreachable, or it stopped answering mid-read
            │   └── LogIncomplete    partitions not readable to their end (names topic, partition, offsets)
            ├── DatabaseUnavailable  PostgreSQL unreachable (verify)
            └── LogBehind            cdc has not reached PostgreSQL's position within the wait
"""

from __future__ import annotations

from core.errors import ConfigError, DecodeError, FieldsyncError, SchemaError
from core.positions import format_lsn, parse_lsn

__all__ = [
    "ConfigError",
    "DecodeError",
    "SchemaError",
    "format_lsn",
    "parse_lsn",
]


class CdcError(FieldsyncError):
    """Base class of every error raised by the cdc package."""


class SourceError(CdcError):
    """An error on the PostgreSQL side."""


class PreflightError(SourceError):
    """The database is not ready for logical replication; the message names the fix."""


class ReplicationLost(SourceError):
    """The replication connection was lost; the caller may reconnect."""


class SinkError(CdcError):
    """An error on the Kafka side."""


class SinkUnavailable(SinkError):
    """The broker is unreachable or did not acknowledge in time; retryable."""


class SnapshotRequestError(CdcError):
    """A re-snapshot request (``fieldsync cdc snapshot``, the signal table) cannot be served:
    unknown or unpublished table, unknown column, a WHERE clause outside the accepted form."""


class ReplayError(CdcError):
    """Base of replay errors (the CLI maps each to an exit code)."""


class UnknownTable(ReplayError):
    """A table that the log does not hold (names it and lists the tables it does hold)."""


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
