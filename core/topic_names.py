"""Kafka topic names of the change topics: ``{prefix}.{schema}.{table}`` (pure, no I/O).

Kafka allows topic names of at most 249 characters of ``[a-zA-Z0-9._-]``; PostgreSQL
allows any character in a quoted name (``"Work Orders"``, ``"Ünï"``).  A schema or table
name that is not made of Kafka's characters only is made valid deterministically, as Avro
names are (docs/events.md "Names and properties"): every other character becomes ``_``,
and ``_`` and the first 8 hex digits of the SHA-1 of the original name (UTF-8) are
appended, so two names that differ only in such characters (``Work Orders``,
``Work-Orders``... ``Work_Orders`` itself is valid and kept) never share a topic.  A
sanitized part is cut to fit 63 characters with its suffix, so the topic fits Kafka's
limit whatever the prefix (:data:`core.settings_checks.TOPIC_PREFIX_MAX`).  Valid names
never change.  The original names are in every event (``source.schema``,
``source.table``) and in the schemas' ``pg.schema``/``pg.table`` properties.

cdc writes to :func:`change_topic`, and the relay's bucket engine, the bucket store's
rules binding and the replay tool read from it, so all agree on every name.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

__all__ = ["change_topic", "change_topic_of", "topic_part"]

_VALID: Final = re.compile(r"[a-zA-Z0-9._-]+")
_INVALID: Final = re.compile(r"[^a-zA-Z0-9._-]")
_PART_MAX: Final = 63


def topic_part(name: str) -> str:
    """``name`` as a part of a topic name: itself when valid, else sanitized and suffixed
    (``Work Orders`` → ``Work_Orders_<8 hex>``)."""
    if _VALID.fullmatch(name) and len(name) <= _PART_MAX:
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return f"{_INVALID.sub('_', name)[: _PART_MAX - 9]}_{digest}"


def change_topic(prefix: str, schema: str, table: str) -> str:
    """The change topic of ``schema.table``."""
    return f"{prefix}.{topic_part(schema)}.{topic_part(table)}"


def change_topic_of(prefix: str, qualified: str) -> str:
    """The change topic of ``qualified`` (``schema.table``, split at the first dot)."""
    schema, _, table = qualified.partition(".")
    return change_topic(prefix, schema, table)
