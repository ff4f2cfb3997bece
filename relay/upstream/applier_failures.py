"""Why applying journal entries failed, and what the applier does about it.

A failure while applying a run of entries is either the database's or one entry's
(:func:`classify_failure`):

- **the entry's** (:data:`Failure.ENTRY`): a PostgreSQL error of a class in
  :data:`ENTRY_SQLSTATE_CLASSES` (what the entry writes: data, constraints, triggers,
  program limits) or in :data:`ENTRY_SQLSTATES` (a value for a generated column), or the applier's own code failing on the entry (it fails the same way
  every time for it).  The run is split until the entry is alone; the entry is rejected
  (``db_error`` / ``internal_error``, :class:`Failed`) and kept as a dead letter.
- **the database's** (:data:`Failure.TRANSIENT`): every other PostgreSQL error (no
  SQLSTATE: the connection), a row changed between reading and writing it
  (:class:`Concurrent`), :class:`~relay.errors.ApplierError`.  The run is retried
  (:data:`RETRY_ERRORS` and :class:`Concurrent` at once, the others after a back-off),
  rejecting nothing.

Pure: it only inspects exceptions; no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Final

import psycopg

from core.journal_format import Reason, Rejection
from relay.errors import ApplierError

__all__ = [
    "ENTRY_SQLSTATES",
    "ENTRY_SQLSTATE_CLASSES",
    "RETRY_ERRORS",
    "Concurrent",
    "Failed",
    "Failure",
    "Undo",
    "classify_failure",
    "pg_message",
]

RETRY_ERRORS: Final = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
"""Errors that a retry of the same run, at once, cures."""
ENTRY_SQLSTATE_CLASSES: Final = frozenset(
    {"09", "0A", "21", "22", "23", "27", "2F", "38", "39", "44", "54", "P0"}
)
"""SQLSTATE classes of errors caused by what an entry writes, which no retry can cure:
triggered action (09), a feature PostgreSQL does not support for what the entry writes
(0A: a trigger's statement, a table's kind; no retry makes it supported), cardinality (21), data (22: value out of range, invalid text,
…), integrity constraints (23), triggered data change (27), routine exceptions raised
by triggers and functions (2F, 38, 39, P0: RAISE), view check option (44), program
limits (54: index row too large, NUL in text).  Every other error (connection lost,
serialization failure, deadlock, lock or statement timeout, shutdown, out of resources,
missing privilege, changed schema, internal) is the database's, not the entry's: the
work is retried, except for :data:`ENTRY_SQLSTATES`."""
ENTRY_SQLSTATES: Final = frozenset({"428C9"})
"""Single SQLSTATEs of other classes that are the entry's: a value written to a column
PostgreSQL generates (``GENERATED ALWAYS AS IDENTITY``, or a generated column), 428C9."""


class Concurrent(Exception):
    """A row changed between reading it and writing it: the run is retried."""


class Undo(Exception):
    """A write the device may not keep (an inserted row out of its reach): the write is
    rolled back and the entry rejected with ``rejection``."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection


class Failure(enum.Enum):
    """What a failure while applying entries is caused by."""

    TRANSIENT = "transient"  # the database (or the applier's view of it): retry
    ENTRY = "entry"  # what one entry writes: reject that entry, go on with the others


def classify_failure(exc: BaseException) -> Failure:
    """:data:`Failure.ENTRY` for a PostgreSQL error of a class in
    :data:`ENTRY_SQLSTATE_CLASSES` and for an unexpected exception of the applier's own
    code while handling entries (it fails the same way every time for that entry);
    :data:`Failure.TRANSIENT` for every other PostgreSQL error (no SQLSTATE: the
    connection), concurrent changes and :class:`ApplierError`."""
    if isinstance(exc, Concurrent | ApplierError):
        return Failure.TRANSIENT
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate or ""
        entry = state[:2] in ENTRY_SQLSTATE_CLASSES or state in ENTRY_SQLSTATES
        return Failure.ENTRY if entry else Failure.TRANSIENT
    return Failure.ENTRY


@dataclasses.dataclass(frozen=True)
class Failed:
    """Why an entry is being rejected after failing alone: the dead letter's content."""

    reason: Reason
    message: str
    sqlstate: str | None

    @classmethod
    def of(cls, exc: BaseException) -> Failed:
        if isinstance(exc, psycopg.Error):
            return cls(
                Reason.DB_ERROR, f"PostgreSQL refused the write: {pg_message(exc)}", exc.sqlstate
            )
        return cls(
            Reason.INTERNAL_ERROR,
            f"the applier failed on this entry ({type(exc).__name__}); its log has details",
            None,
        )


def pg_message(exc: psycopg.Error) -> str:
    """PostgreSQL's primary message of ``exc`` and its SQLSTATE, for outcomes and errors."""
    diag = exc.diag
    text = diag.message_primary or str(exc).splitlines()[0]
    if diag.sqlstate:
        text = f"{text} (SQLSTATE {diag.sqlstate})"
    return text
