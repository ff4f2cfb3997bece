"""Logging set-up shared by every fieldsync process: two formats, context fields, no secrets.

Formats (the ``log_format`` setting beside ``log_level`` in ``[cdc]`` and ``[relay]``; the
applier uses the relay's), on standard error:

- ``text``: ``time level logger: message``, one line per record (then the traceback);
- ``json``: one JSON object per line (python-json-logger), keys in this order::

      {"time": "2025-01-31T12:00:00.123Z", "level": "INFO", "logger": "fieldsync.cdc",
       "message": "...", "component": "cdc", "exception": "Traceback ...",
       "slot": "fieldsync", "table": "public.orders", "position": "0/16B3748",
       "device": "tab-1", "request_id": "..."}

  ``time`` is ISO 8601 in UTC (milliseconds), ``component`` is ``cdc``, ``relay`` or
  ``applier``; ``exception`` (and ``stack``) only when the record has one; the context
  fields (:data:`core.log_context.CONTEXT_FIELDS`) only where they apply.

Context fields come from the code around a log call, not from its message
(:mod:`core.log_context`; :func:`setup_logging`'s ``context`` sets the process-wide ones,
cdc's ``slot``); the text format does not print them, so messages stay as they are.

Every record goes through :class:`core.redaction.RedactingFilter` first: passwords,
tokens and key material are masked whatever logged them (our code, uvicorn, psycopg,
websockets).  kafka-python's own loggers are silenced (their connection chatter repeats
what our errors already say, with the broker named).

Concurrency: set-up runs once at start, before the process's threads; the handler is
the standard library's (one lock per handler).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from core.log_context import ContextFilter, set_process_log_context
from core.redaction import RedactingFilter

__all__ = [
    "COMPONENTS",
    "LOG_FORMATS",
    "TEXT_FORMAT",
    "JsonLineFormatter",
    "hold_early_records",
    "make_handler",
    "setup_logging",
]

LOG_FORMATS = ("text", "json")
COMPONENTS = ("cdc", "relay", "applier")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLineFormatter(JsonFormatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``,
    ``component``, then ``exception``/``stack`` when present and the context fields (and
    any other ``extra`` a library passes, except uvicorn's ``color_message``)."""

    def __init__(self, component: str | None) -> None:
        super().__init__(
            ["levelname", "name", "message"],
            rename_fields={
                "levelname": "level",
                "name": "logger",
                "exc_info": "exception",
                "stack_info": "stack",
            },
            static_fields={"component": component} if component else {},
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
            timestamp="time",
        )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        stamp = log_data.pop("time")
        if isinstance(stamp, datetime):  # UTC (python-json-logger's timestamp)
            stamp = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {"time": stamp, **log_data}


def make_handler(
    fmt: str = "text", component: str | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """A stream handler (standard error by default) in format *fmt*, masking secrets and
    adding the context fields."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {LOG_FORMATS}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(
        JsonLineFormatter(component) if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    )
    handler.addFilter(RedactingFilter())
    handler.addFilter(ContextFilter())
    return handler


def setup_logging(
    level: str,
    fmt: str = "text",
    component: str | None = None,
    context: Mapping[str, object] | None = None,
    early: Iterable[logging.LogRecord] = (),
) -> None:
    """Configure the root logger at ``level`` (a name such as ``"INFO"``) in format *fmt*
    (``"text"`` or ``"json"``) for *component*; *context* holds process-wide context fields;
    *early* records (:func:`hold_early_records`) are then written in that format.

    Like :func:`logging.basicConfig`, it leaves a root logger that already has handlers
    alone (a host that configured logging itself)."""
    handler = make_handler(fmt, component)
    logging.basicConfig(level=getattr(logging, level, logging.INFO), handlers=[handler])
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    set_process_log_context(**(context or {}))
    for record in early:
        logging.getLogger(record.name).handle(record)


class _Hold(logging.Handler):
    def __init__(self, held: list[logging.LogRecord]) -> None:
        super().__init__()
        self.held = held

    def emit(self, record: logging.LogRecord) -> None:
        self.held.append(record)


@contextlib.contextmanager
def hold_early_records() -> Iterator[list[logging.LogRecord]]:
    """Keep what is logged while the settings that choose the format are read (warnings
    about the settings file), for :func:`setup_logging`'s ``early``: a JSON log then has no
    line in another format.  If the block fails, they are written at once, as text."""
    held: list[logging.LogRecord] = []
    hold = _Hold(held)
    root = logging.getLogger()
    root.addHandler(hold)
    try:
        yield held
    except BaseException:
        root.removeHandler(hold)
        fallback = make_handler("text")
        for record in held:
            fallback.handle(record)
        raise
    finally:
        root.removeHandler(hold)
