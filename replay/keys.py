"""Row keys as users give them (``--key 42``, ``[1, "x"]``, ``{"id": 42}``) and how they
match the keys in the log.

A key in the log is the row's key columns, decoded (JSON form, docs/events.md); a key a
user writes is text.  They match when the values are equal, print the same, are the
same number, or when the log's value printed as PostgreSQL prints its type equals what
the user wrote (``2024-05-01`` for a date).  :func:`same_key_value` is also how device
journal entries (JSON) are matched to rows (replay.history).

Pure functions and frozen values: no I/O, nothing shared.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from core.row_wire import json_value
from core.values import to_pg_text
from replay.catalog import TableVersion

__all__ = ["KeySpec", "key_of", "same_key_value"]


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """A row key as the user gave it: values in key-column order, or by column name."""

    values: tuple[Any, ...] | None = None
    by_name: Mapping[str, Any] | None = None
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> KeySpec:
        """``42``, ``abc``, ``[1, "x"]`` (key columns in table order) or ``{"id": 42}``."""
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        if isinstance(parsed, dict):
            return cls(by_name=parsed, text=text)
        if isinstance(parsed, list):
            return cls(values=tuple(parsed), text=text)
        return cls(values=(parsed,), text=text)

    def matches(self, key: Mapping[str, Any], types: Mapping[str, Any] | None = None) -> bool:
        """``key``: PostgreSQL column name -> JSON-form value, key columns in table order."""
        if self.by_name is not None:
            if set(self.by_name) != set(key):
                return False
            return all(
                same_key_value(self.by_name[c], v, (types or {}).get(c)) for c, v in key.items()
            )
        assert self.values is not None
        if len(self.values) != len(key):
            return False
        return all(
            same_key_value(want, have, (types or {}).get(col))
            for want, (col, have) in zip(self.values, key.items(), strict=True)
        )


def same_key_value(want: Any, have: Any, ct: Any) -> bool:
    """``want`` (as the user or a journal entry gave it) is the log's ``have`` (JSON form;
    ``ct``: its column type, when known)."""
    if want == have and type(want) is type(have):
        return True
    if str(want) == str(have):
        return True
    if isinstance(have, str) and isinstance(want, int | float) and not isinstance(want, bool):
        try:
            return Decimal(have) == Decimal(str(want))
        except ArithmeticError:
            return False
    if ct is not None:
        try:
            return to_pg_text(ct, have) == str(want)
        except (ValueError, TypeError, KeyError, ArithmeticError):
            return False
    return False


def key_of(version: TableVersion, row: Mapping[str, Any]) -> dict[str, Any]:
    """A decoded row's key: PostgreSQL column name -> JSON-form value, in key order."""
    names = version.column_of()
    return {names[f]: json_value(row.get(f)) for f in version.key_fields}
