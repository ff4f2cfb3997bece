"""Row keys as users give them (``--key 42``, ``[1, "x"]``, ``{"id": 42}``) and how they
match the keys in the log.

A key in the log is the row's key columns, decoded (JSON form, docs/events.md); a key a
user writes is text.  They match when the values are equal, print the same, are the
same number, or when the log's value printed as PostgreSQL prints its type equals what
the user wrote (``2024-05-01`` for a date).  :func:`same_key_value` is also how device
journal entries (JSON) are matched to rows (replay.history).

A key is checked against the table's key columns before the log is read
(:meth:`KeySpec.check`): text that opens a JSON array or object must be valid JSON, a
list needs one value per key column, an object exactly the key columns' names; anything
else is a :class:`~replay.errors.BadKey` naming the table's key columns.

Pure functions and frozen values: no I/O, nothing shared.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from core.row_wire import json_value
from core.values import to_pg_text
from replay.catalog import TableVersion
from replay.errors import BadKey

__all__ = ["KeySpec", "key_of", "same_key_value"]


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """A row key as the user gave it: values in key-column order, or by column name."""

    values: tuple[Any, ...] | None = None
    by_name: Mapping[str, Any] | None = None
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> KeySpec:
        """``42``, ``abc``, ``[1, "x"]`` (key columns in table order) or ``{"id": 42}``.

        Text that is no JSON is one text value (``abc``), except text that opens a JSON
        array or object (``[``, ``{``): that must be valid JSON (:class:`BadKey`); a text
        key that starts so is written as a JSON string (``"[a"``)."""
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            if text.lstrip()[:1] in ("[", "{"):
                raise BadKey(f"--key {text!r} is not valid JSON: {exc}") from None
            parsed = text
        if isinstance(parsed, dict):
            return cls(by_name=parsed, text=text)
        if isinstance(parsed, list):
            return cls(values=tuple(parsed), text=text)
        return cls(values=(parsed,), text=text)

    def check(self, table: str, key_columns: Sequence[tuple[str, ...]]) -> None:
        """Raise :class:`BadKey` unless this key names a row of ``table`` under one of its
        key column lists (``key_columns``, newest last; a table whose key changed has had
        several): a list needs one value per key column, an object exactly their names."""
        if not key_columns:
            return
        if any(self._fits(cols) for cols in key_columns):
            return
        newest = key_columns[-1]
        known = f"its key columns: {', '.join(newest)}"
        older = [cols for cols in key_columns[:-1] if cols != newest]
        if older:
            known += "; earlier: " + "; ".join(", ".join(cols) for cols in older)
        if self.by_name is not None:
            names = set(self.by_name)
            unknown = sorted(names - set(newest))
            missing = [c for c in newest if c not in names]
            what = []
            if unknown:
                what.append("no key column " + ", ".join(unknown))
            if missing:
                what.append("no value for " + ", ".join(missing))
            reason = " and ".join(what)
        else:
            assert self.values is not None
            n = len(self.values)
            reason = f"{n} value{'s' if n != 1 else ''} for {len(newest)} key column" + (
                "s" if len(newest) != 1 else ""
            )
        raise BadKey(f"--key {self.text}: {reason} ({table}, {known})")

    def _fits(self, cols: tuple[str, ...]) -> bool:
        if self.by_name is not None:
            return set(self.by_name) == set(cols)
        assert self.values is not None
        return len(self.values) == len(cols)

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
