"""Context fields of log records: which slot, table, position, device or request a line is about.

A ``contextvars`` variable holds the current fields; code around a log call sets them and
the call sites keep their messages:

- :func:`log_context` adds fields for a ``with`` block;
- :func:`bind_log_context` adds fields for the rest of the current context (an asyncio
  task, one request: the device once the request is authenticated);
- :func:`set_process_log_context` sets fields that apply to the whole process, every
  thread included (cdc's ``slot``);
- a single call may pass its own with ``extra={"table": ...}`` (they win).

:class:`ContextFilter`, on the handler :func:`core.logs.setup_logging` installs, copies the
current fields onto every record; the JSON format prints them, the text format does not.
Only the names in :data:`CONTEXT_FIELDS` are accepted (a misspelt name is a programming
error: ``ValueError``); ``None`` values are left out, others are shown as text.

Concurrency: the variable is per thread and per asyncio task (a new thread starts without
the fields of its creator; the process-wide fields apply everywhere and are replaced as a
whole).  Reading the context costs a dictionary merge per record.  No third-party imports:
any package may use this module.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType

__all__ = [
    "CONTEXT_FIELDS",
    "ContextFilter",
    "bind_log_context",
    "current_log_context",
    "log_context",
    "set_process_log_context",
]

CONTEXT_FIELDS = ("slot", "table", "position", "device", "request_id")

_EMPTY: Mapping[str, str] = MappingProxyType({})
_context: ContextVar[Mapping[str, str]] = ContextVar("fieldsync_log_context", default=_EMPTY)
_process: Mapping[str, str] = _EMPTY


def _fields(fields: Mapping[str, object]) -> dict[str, str]:
    unknown = sorted(set(fields) - set(CONTEXT_FIELDS))
    if unknown:
        raise ValueError(f"unknown log context field(s) {unknown}; known: {CONTEXT_FIELDS}")
    return {k: str(v) for k, v in fields.items() if v is not None}


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Add context fields to every record logged in the ``with`` block (this thread or task)."""
    token = _context.set(MappingProxyType({**_context.get(), **_fields(fields)}))
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**fields: object) -> None:
    """Add context fields for the rest of the current context (until the enclosing
    :func:`log_context` ends, or the task does)."""
    _context.set(MappingProxyType({**_context.get(), **_fields(fields)}))


def set_process_log_context(**fields: object) -> None:
    """Replace the process-wide context fields (every thread, every task)."""
    global _process
    _process = MappingProxyType(_fields(fields))


def current_log_context() -> dict[str, str]:
    """The context fields a record logged here gets (process-wide ones included)."""
    return {**_process, **_context.get()}


class ContextFilter(logging.Filter):
    """Puts the current context fields on each record (a field given with ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in current_log_context().items():
            if key not in record.__dict__:
                setattr(record, key, value)
        return True
