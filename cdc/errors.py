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
        │   ├── ReplicationLost      connection dropped mid-stream (retryable)
        │   └── SlotLost             the slot lost WAL it needed, or is gone while Kafka holds a
        │                            resume position, or a recovery did not finish (names
        │                            ``fieldsync cdc recover``; never retried)
        ├── SinkError                Kafka side
        │   ├── SinkUnavailable      broker unreachable / timed out (retryable)
        │   └── RecordTooLarge       an event larger than kafka.max_message_bytes, or refused
        │                            by the broker as too large (names table, key, LSN;
        │                            never skipped, not retried)
        └── SnapshotRequestError     a re-snapshot request names an unknown table or column, or an
                                     invalid WHERE clause (says which and where)

The audit tool's errors (``ReplayError`` and its subclasses) are in :mod:`replay.errors`.
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


class SlotLost(SourceError):
    """The replication slot can no longer deliver every change since the position Kafka
    holds: PostgreSQL reports it lost (``wal_status = 'lost'``) or invalidated, it is gone
    while Kafka holds a resume position, or ``fieldsync cdc recover`` did not finish.  Not
    retried: the message names the recovery command."""


class SinkError(CdcError):
    """An error on the Kafka side."""


class SinkUnavailable(SinkError):
    """The broker is unreachable or did not acknowledge in time; retryable."""


class RecordTooLarge(SinkError):
    """A change event too large for Kafka (:mod:`cdc.record_size` names it): over
    ``kafka.max_message_bytes``, or refused by the broker as too large.  The transaction is
    aborted; not retried (the same event would come again), never skipped."""

    def __init__(self, message: str, topic: str = "", size: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.topic = topic
        self.size = size
        self.limit = limit


class SnapshotRequestError(CdcError):
    """A re-snapshot request (``fieldsync cdc snapshot``, the signal table) cannot be served:
    unknown or unpublished table, unknown column, a WHERE clause outside the accepted form."""
