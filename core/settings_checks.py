"""Value checks and messages shared by the settings of several components.

The cdc daemon and the relay both take PostgreSQL connection strings, Kafka
bootstrap servers and topic prefixes, and durations that must be positive or
non-negative; their settings modules pass these functions as
``Setting(check=...)``.  A check raises ``ValueError`` with a short reason ("must be
> 0"); :mod:`core.settings_registry` adds the key, the source and the value (shown
through the setting's ``redact``, never in clear when it may hold a password:
:func:`redact_dsn`).

:func:`close_match_hint` is the " (did you mean 'x'?)" suffix the relay's own
configuration files (rules, conflict policies, token keys) put on an unknown name.

Concurrency: every function here is pure; the compiled patterns are shared,
immutable module state.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from core.redaction import PASSWORD_PARAM

__all__ = [
    "KAFKA_TOPIC_MAX",
    "PG_NAME_MAX_BYTES",
    "TOPIC_PREFIX_MAX",
    "check_bootstrap_servers",
    "check_consumer_name",
    "check_dsn",
    "check_non_negative",
    "check_positive",
    "check_topic_prefix",
    "close_match_hint",
    "closest_match",
    "redact_dsn",
]

PG_NAME_MAX_BYTES = 63
"""PostgreSQL truncates identifiers to NAMEDATALEN-1 bytes."""
KAFKA_TOPIC_MAX = 249
"""Kafka topic names: at most 249 characters of [a-zA-Z0-9._-]."""
TOPIC_PREFIX_MAX = KAFKA_TOPIC_MAX - 2 * (PG_NAME_MAX_BYTES + 1)
"""A topic prefix leaves room for ".{schema}.{table}" with 63-byte PostgreSQL names."""

_TOPIC_CHARS = re.compile(r"[a-zA-Z0-9._-]+")
_DSN_URI_RE = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)
_DSN_KV_RE = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*=")
_URI_PASSWORD = re.compile(r"^(\s*postgres(?:ql)?://[^:@/?#]*):[^@/]*@", re.IGNORECASE)


def check_positive(value: float) -> None:
    """A count or duration that must be more than zero."""
    if value <= 0:
        raise ValueError("must be > 0")


def check_non_negative(value: float) -> None:
    """A count or duration where zero is allowed (usually: turned off)."""
    if value < 0:
        raise ValueError("must be >= 0")


def _is_dsn(value: str) -> bool:
    return bool(_DSN_URI_RE.match(value) or _DSN_KV_RE.match(value))


def check_dsn(value: str) -> None:
    """A libpq connection string: a ``postgresql://`` URI or ``key=value`` pairs."""
    # Never echo the DSN here: it may hold a password (the registry shows it redacted).
    if not _is_dsn(value):
        raise ValueError(
            "is not a libpq connection string (expected postgresql://… or key=value pairs)"
        )


def check_bootstrap_servers(value: str) -> None:
    """A comma-separated list of Kafka brokers, each ``host:port`` without spaces."""
    servers = [s.strip() for s in value.split(",")]
    if not value.strip() or any(not s or any(c.isspace() for c in s) for s in servers):
        raise ValueError("must be a comma-separated list of host:port")


def check_consumer_name(value: str) -> None:
    """The name several processes share to elect one leader and keep offsets under."""
    if not value or len(value) > 200 or any(c.isspace() for c in value):
        raise ValueError("must be 1 to 200 characters without spaces")


def check_topic_prefix(value: str) -> None:
    """The prefix of every fieldsync topic (``{prefix}.{schema}.{table}``, ``{prefix}._journal``)."""
    if not _TOPIC_CHARS.fullmatch(value):
        raise ValueError("must be 1 or more of the Kafka topic characters a-z A-Z 0-9 . _ -")
    if value.startswith(".") or value.endswith(".") or ".." in value:
        raise ValueError("must not start or end with '.' or contain '..'")
    if value.startswith("__"):
        raise ValueError("must not start with '__' (reserved for Kafka's internal topics)")
    if len(value) > TOPIC_PREFIX_MAX:
        raise ValueError(
            f"is longer than {TOPIC_PREFIX_MAX} characters (topics '{{prefix}}.{{schema}}.{{table}}' "
            f"must fit Kafka's {KAFKA_TOPIC_MAX})"
        )


def redact_dsn(dsn: str) -> str:
    """*dsn* with any password (URI user info, ``password=`` parameter) replaced by ``***``.

    A string that is not a libpq connection string is replaced whole by ``***``:
    where its password is cannot be known.
    """
    if not _is_dsn(dsn):
        return "***"
    dsn = _URI_PASSWORD.sub(r"\1:***@", dsn)
    return PASSWORD_PARAM.sub(r"\1***", dsn)


def closest_match(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate a misspelt *word* most likely meant: the closest by
    :func:`difflib.get_close_matches`, else one equal to it but for case, else None."""
    names = list(candidates)
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if close:
        return close[0]
    lowered = {c.lower(): c for c in names}
    return lowered.get(word.lower())


def close_match_hint(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the candidate closest to a misspelt *name*, else ``""``."""
    close = closest_match(name, candidates)
    return f" (did you mean {close!r}?)" if close is not None else ""
