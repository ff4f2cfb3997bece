"""The root of every fieldsync error, and the errors of the shared contracts.

Every package draws its own tree under :class:`FieldsyncError` in its ``errors.py``
(``cdc.errors``, ``relay.errors``, ``device_agent.errors``, ``replay.errors``); a command
line catches :class:`FieldsyncError` and turns it into an exit code and one message.
The errors here are raised by the base itself and shared by every package:

::

    FieldsyncError
    ├── ConfigError      a configuration file or setting is invalid (names the file and key)
    ├── DecodeError      a pgoutput message or change event cannot be decoded (names byte + LSN)
    │   └── JournalFormatError  a _journal / _outcomes Kafka record cannot be read
    └── SchemaError      a relation or type cannot be mapped to the change-event schema

Errors carry the context needed to act on them; library exceptions are converted at the
boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from core.positions import format_lsn


class FieldsyncError(Exception):
    """Base class of every error raised by fieldsync."""


class ConfigError(FieldsyncError):
    """A configuration file or setting is invalid; the message names the file and key."""


class DecodeError(FieldsyncError):
    """A pgoutput message or a change event could not be decoded."""

    def __init__(self, message: str, *, lsn: int | None = None, byte: int | None = None) -> None:
        self.lsn = lsn
        self.byte = byte
        parts = [message]
        if byte is not None:
            parts.append(
                f"message byte {byte!r} ({chr(byte)!r})"
                if 32 <= byte < 127
                else f"message byte {byte!r}"
            )
        if lsn is not None:
            parts.append(f"at LSN {format_lsn(lsn)}")
        super().__init__(", ".join(parts))


class JournalFormatError(DecodeError):
    """A journal or outcome record (Kafka value) cannot be read; names what is wrong."""


class SchemaError(FieldsyncError):
    """A relation or type could not be mapped to the change-event schema."""
