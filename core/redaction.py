"""Masking secrets in log text: passwords, tokens and key material never reach a log line.

Two layers, both applied by :class:`RedactingFilter` to every record a fieldsync process
writes (:func:`core.logs.setup_logging` puts it on the one handler):

- **patterns** that find secrets by their shape, whatever the source (our messages,
  uvicorn's access and WebSocket lines, the ``websockets`` library's DEBUG dump of
  request headers, exception text):

  - the password in a URI's user info (``postgresql://user:PASSWORD@host``, any scheme);
  - ``password=...`` parameters (libpq key=value connection strings, query strings);
  - ``Bearer ...`` / ``Basic ...`` credentials (an ``Authorization`` header; at least
    8 characters, so that the words alone are left alone);
  - ``token=...`` parameters (the WebSocket's ``?token=`` query parameter);
  - JSON Web Tokens anywhere (``eyJ...``, three base64url parts);
  - PEM private key blocks.

  Each is replaced by ``***`` and the text around it is kept.

- **literal secrets** registered by the process at start-up (:func:`hide_secrets`): the
  values of the settings marked secret (``postgres.password``, ``relay.store_password``,
  SASL passwords) and the relay's HS256 key secrets.  Every occurrence is replaced by
  ``***``.  Values shorter than :data:`MIN_LITERAL_CHARS` are not matched literally (they
  would mangle ordinary words); the patterns still catch them in DSNs and headers.

Masking is idempotent (masked text masks to itself), so a record may pass several
filters.  Concurrency: the patterns are immutable; the literal secrets are one tuple
replaced as a whole (:func:`hide_secrets` may run while other threads log).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

__all__ = [
    "MASK",
    "MIN_LITERAL_CHARS",
    "PASSWORD_PARAM",
    "RedactingFilter",
    "clear_hidden_secrets",
    "hide_secrets",
    "redact_text",
]

MASK = "***"
MIN_LITERAL_CHARS = 4

PASSWORD_PARAM = re.compile(
    r"(?i)((?:^|[\s?&])password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&]*)",
)
"""``password=value`` (quoted or not) at the start, after a space, ``?`` or ``&``; group 1
is kept.  Used by :func:`core.settings_checks.redact_dsn` on a whole DSN; in log text the
value ends at a quote, comma or semicolon too (a DSN inside a JSON message), and the
passwords of the settings' DSNs are masked literally anyway (:func:`hide_secrets`)."""

_PASSWORD_IN_TEXT = re.compile(
    r"(?i)((?:^|[\s?&;,(])password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&\"',;)]*)",
)
_URI_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^:@/?#\s\"']*):[^@/\s\"']*@")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_BASIC = re.compile(r"\b(Basic\s+)[A-Za-z0-9+/]{8,}={0,2}")
_TOKEN_PARAM = re.compile(r"(?i)(token=)[^&\s\"',;]*")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_PEM_PRIVATE = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)",
    re.DOTALL,
)

_literals: tuple[str, ...] = ()


def hide_secrets(values: Iterable[str | bytes | None]) -> None:
    """Mask every later occurrence of each of *values* in log text (see the module
    docstring); ``None``, blank and too short values are skipped, bytes that are not
    UTF-8 too (they cannot appear in text as they are)."""
    global _literals
    found: set[str] = set(_literals)
    for value in values:
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                continue
        if value is not None and len(value.strip()) >= MIN_LITERAL_CHARS:
            found.add(value)
    # longest first: a secret that contains another is masked whole
    _literals = tuple(sorted(found, key=len, reverse=True))


def clear_hidden_secrets() -> None:
    """Forget the literal secrets (for tests)."""
    global _literals
    _literals = ()


def redact_text(text: str) -> str:
    """*text* with every secret found by the patterns or registered literally masked."""
    for literal in _literals:
        if literal in text:
            text = text.replace(literal, MASK)
    if "://" in text:
        text = _URI_USERINFO.sub(rf"\1:{MASK}@", text)
    lowered = text.lower()
    if "password" in lowered:
        text = _PASSWORD_IN_TEXT.sub(rf"\1{MASK}", text)
    if "bearer" in lowered:
        text = _BEARER.sub(rf"\1{MASK}", text)
    if "Basic" in text:
        text = _BASIC.sub(rf"\1{MASK}", text)
    if "token=" in lowered:
        text = _TOKEN_PARAM.sub(rf"\1{MASK}", text)
    if "eyJ" in text:
        text = _JWT.sub(MASK, text)
    if "PRIVATE KEY-----" in text:
        text = _PEM_PRIVATE.sub(MASK, text)
    return text


_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


class RedactingFilter(logging.Filter):
    """Masks secrets in a record before any formatter sees it: the message (its arguments
    merged in), the exception and stack text, and string attributes added by ``extra``.

    The exception is formatted here (``exc_text``) and ``exc_info`` cleared, so every
    formatter prints the masked text."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_fieldsync_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it, without secrets
            message = f"{record.msg} {record.args!r}"
        record.msg = redact_text(message)
        record.args = None
        if record.exc_info:
            record.exc_text = self._formatter.formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, redact_text(value))
        setattr(record, "_fieldsync_redacted", True)  # noqa: B010 (not a LogRecord field)
        return True
