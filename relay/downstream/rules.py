"""Authorization rules: which rows go into which buckets, and which buckets a token grants.

A rules file (TOML, see docs/relay-rules.md and config/rules.example.toml)
defines *bucket rules*.  A bucket is a rule name plus one value per rule
parameter; its id is the canonical string ``name["v1","v2"]`` (the values as a
compact, ASCII-only JSON array; a global bucket is ``name[]``).

- A row of table T is in bucket ``R[v…]`` when rule R lists T, every fixed
  filter of R's entry for T holds, and the row's ``match`` columns carry the
  values ``v…`` (each parameter's value is the row column mapped to it).
  A row is in at most one bucket per rule.
- A token's claims grant ``R[v…]`` for every combination of the values of the
  claims mapped to R's parameters (a list claim contributes each element);
  a missing, null or empty claim grants no bucket of that rule; a rule without
  parameters (a global bucket) is granted to every token.
- Values are compared by canonical text (:func:`canonical_text`): strings as
  they are, integers in decimal, booleans as ``true``/``false``, UUIDs in their
  hyphenated form, numbers without trailing zeros, dates and times in ISO 8601.
  NULL never equals anything (as in SQL), so a row with a NULL match column is
  in no bucket of that rule, and ``=``, ``!=``, ``in``, ``not in`` are false on
  NULL.  Values of other types (bytes, arrays, JSON) never compare equal.

Rules are data: they are validated when loaded (relay/downstream/rules_parser.py), every
problem naming file, rule and key; nothing from them is evaluated as code or pasted into SQL.
This module holds what a loaded rule set is and computes: values and bucket ids, the
compiled rules (:class:`Rules`), placement of rows and grants of claims.

Everything here is pure and immutable: a :class:`Rules` can be shared between
threads and coroutines without locking.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final

from relay.errors import RowError

IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
"""A rule, parameter or claim name: letters, digits and ``_``, not starting with a digit."""

RowKey = tuple[Any, ...]
"""A row's primary-key values, in the order of :attr:`TableInfo.key`."""


@dataclass(frozen=True)
class TableInfo:
    """What the rules need to know about a table: its columns and primary-key columns,
    which columns hold dates or times (``temporal``: column → ``date``, ``time``,
    ``timestamp`` or ``timestamptz``), whose filter values are written as ISO text but
    compared as the change events' integers, and each column's kind on the device wire
    (``kinds``: column → one of :data:`core.column_kinds.COLUMN_KINDS`, in column order;
    empty when not known), which ``/v1/schema`` gives devices."""

    columns: tuple[str, ...]
    key: tuple[str, ...]
    temporal: tuple[tuple[str, str], ...] = ()
    kinds: tuple[tuple[str, str], ...] = ()


TEMPORAL_KINDS: Final = ("date", "time", "timestamp", "timestamptz")
_EPOCH_DATE: Final = dt.date(1970, 1, 1)
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def temporal_value(kind: str, text: str) -> int:
    """ISO text as the integer a change event carries for a ``kind`` column (docs/events.md):
    days since 1970-01-01 (date), µs after midnight (time), µs since the epoch, wall clock
    as if UTC (timestamp) or in UTC (timestamptz, which needs a UTC offset).  ValueError
    says what is wrong."""
    if kind == "date":
        return (dt.date.fromisoformat(text) - _EPOCH_DATE).days
    if kind == "time":
        t = dt.time.fromisoformat(text)
        return ((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 + t.microsecond
    moment = dt.datetime.fromisoformat(text)
    if kind == "timestamptz":
        if moment.tzinfo is None:
            raise ValueError("needs a UTC offset, e.g. 2024-05-01T08:00:00Z or +02:00")
    elif moment.tzinfo is not None:
        raise ValueError("is a timestamp without time zone: leave the offset out")
    delta = moment.replace(tzinfo=moment.tzinfo or dt.UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


# --------------------------------------------------------------------------- values and ids


def canonical_text(value: object) -> str | None:
    """The text a value is compared by; ``None`` for NULL and for types that never compare."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return _decimal_text(Decimal(repr(value)))
    if isinstance(value, Decimal):
        return _decimal_text(value) if value.is_finite() else None
    if isinstance(value, dt.date | dt.time):  # datetime is a date
        return value.isoformat()
    return None


def _decimal_text(value: Decimal) -> str:
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def bucket_id(rule: str, values: Sequence[str]) -> str:
    """The canonical id of bucket ``rule`` with parameter ``values``: ``rule["v1","v2"]``."""
    return rule + json.dumps(list(values), ensure_ascii=True, separators=(",", ":"))


def parse_bucket_id(text: str) -> tuple[str, tuple[str, ...]]:
    """Split a bucket id into rule name and parameter values; ``ValueError`` if not canonical."""
    name, bracket, rest = text.partition("[")
    if not bracket or not IDENTIFIER.match(name):
        raise ValueError(f'not a bucket id: {text!r} (expected name["value", ...])')
    try:
        values = json.loads(bracket + rest)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a bucket id: {text!r} ({exc.msg})") from exc
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"not a bucket id: {text!r} (parameters must be strings)")
    if bucket_id(name, values) != text:
        raise ValueError(f"not a canonical bucket id: {text!r}")
    return name, tuple(values)


def claim_values(value: object) -> tuple[str, ...]:
    """The parameter values a claim contributes: one per list element, sorted, NULLs dropped."""
    items: Iterable[object] = value if isinstance(value, list | tuple) else (value,)
    texts = {t for t in (canonical_text(v) for v in items) if t is not None}
    return tuple(sorted(texts))


# --------------------------------------------------------------------------- compiled rules


@dataclass(frozen=True)
class Filter:
    """A fixed condition on one column; ``values`` are canonical texts (one for = and !=)."""

    column: str
    op: str
    values: frozenset[str]

    def holds(self, value: object) -> bool:
        if self.op == "is null":
            return value is None
        if self.op == "is not null":
            return value is not None
        text = canonical_text(value)
        if text is None:
            return False
        if self.op in ("=", "in"):
            return text in self.values
        return text not in self.values


@dataclass(frozen=True)
class TableRule:
    """A bucket rule's entry for one table.

    ``match`` pairs a row column with the bucket parameter it must equal.
    ``columns`` is the allow-list a device receives (``None``: all) and
    ``exclude`` the deny-list; at most one of them is set.  Key columns are
    always sent.  ``writable``: a device may write the rows (and the columns) it
    reaches through this entry; ``claim``: a write may bring a row into this bucket
    even though that shows the device columns it could not see before (taking a row
    over, e.g. assigning a colleague's work order to oneself).  See
    :func:`relay.upstream.journal.check_write`.
    """

    table: str
    match: tuple[tuple[str, str], ...]
    filters: tuple[Filter, ...]
    columns: tuple[str, ...] | None
    exclude: frozenset[str]
    writable: bool = True
    claim: bool = False


@dataclass(frozen=True)
class BucketRule:
    """A named bucket rule: its parameters, the claim feeding each, and its tables."""

    name: str
    parameters: tuple[str, ...]
    claims: tuple[str, ...]
    tables: Mapping[str, TableRule]
    description: str = ""


class Rules:
    """A validated rule set bound to a schema.  Immutable; safe to share."""

    def __init__(
        self,
        buckets: Sequence[BucketRule],
        schema: Mapping[str, TableInfo],
        source: str = "<rules>",
    ) -> None:
        self.source = source
        self.buckets: Mapping[str, BucketRule] = MappingProxyType({b.name: b for b in buckets})
        if len(self.buckets) != len(buckets):
            raise ValueError(f"{source}: bucket rule names must be unique")
        by_table: dict[str, list[tuple[BucketRule, TableRule]]] = {}
        keep: dict[tuple[str, str], tuple[str, ...] | None] = {}
        for rule in buckets:
            for name, entry in rule.tables.items():
                if name not in schema:
                    raise ValueError(f"{source}: bucket {rule.name!r} names unknown table {name!r}")
                info = schema[name]
                by_table.setdefault(name, []).append((rule, entry))
                if entry.columns is None:
                    keep[rule.name, name] = None
                else:
                    wanted = set(entry.columns) | set(info.key)
                    keep[rule.name, name] = tuple(c for c in info.columns if c in wanted)
        self._by_table = {t: tuple(v) for t, v in by_table.items()}
        self._keep = keep
        self._schema = dict(schema)

    @property
    def tables(self) -> frozenset[str]:
        """The tables some rule places rows of; changes to other tables reach no device."""
        return frozenset(self._by_table)

    def table_info(self, table: str) -> TableInfo:
        try:
            return self._schema[table]
        except KeyError:
            raise KeyError(
                f"{table!r} is not in the schema the rules of {self.source} were loaded with"
            ) from None

    def key_of(self, table: str, row: Mapping[str, Any]) -> RowKey:
        """The row's primary-key values (:data:`RowKey`)."""
        info = self.table_info(table)
        return tuple(_column(table, row, c, "primary key") for c in info.key)

    def buckets_for_row(self, table: str, row: Mapping[str, Any]) -> frozenset[str]:
        """The ids of the buckets ``row`` of ``table`` is in (empty for unruled tables)."""
        found: set[str] = set()
        for rule, entry in self._by_table.get(table, ()):
            values = _place(rule, entry, row)
            if values is not None:
                found.add(bucket_id(rule.name, values))
        return frozenset(found)

    def buckets_for_claims(self, claims: Mapping[str, Any]) -> frozenset[str]:
        """The ids of the buckets a token with ``claims`` may sync."""
        granted: set[str] = set()
        for rule in self.buckets.values():
            choices = [claim_values(claims.get(claim)) for claim in rule.claims]
            for combo in itertools.product(*choices):
                granted.add(bucket_id(rule.name, combo))
        return frozenset(granted)

    def project(self, table: str, bucket_rule: str, row: Mapping[str, Any]) -> dict[str, Any]:
        """The columns of ``row`` a device syncing ``bucket_rule`` receives.

        Columns absent from ``row`` are absent from the result.
        """
        try:
            keep = self._keep[bucket_rule, table]
        except KeyError:
            raise KeyError(f"bucket rule {bucket_rule!r} has no table {table!r}") from None
        if keep is not None:
            return {c: row[c] for c in keep if c in row}
        exclude = self.buckets[bucket_rule].tables[table].exclude
        return {c: v for c, v in row.items() if c not in exclude}

    def projector(
        self, table: str, bucket_rule: str
    ) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
        """``lambda row: self.project(table, bucket_rule, row)``, with the lookups done once
        (for the bucket engine's hot path)."""
        try:
            keep = self._keep[bucket_rule, table]
        except KeyError:
            raise KeyError(f"bucket rule {bucket_rule!r} has no table {table!r}") from None
        if keep is not None:
            columns = keep
            return lambda row: {c: row[c] for c in columns if c in row}
        exclude = self.buckets[bucket_rule].tables[table].exclude
        return lambda row: {c: v for c, v in row.items() if c not in exclude}

    def rule_of_bucket(self, bucket: str) -> BucketRule:
        """The rule a bucket id belongs to; ``KeyError`` for ids of no rule here."""
        name, values = parse_bucket_id(bucket)
        rule = self.buckets.get(name)
        if rule is None or len(values) != len(rule.parameters):
            raise KeyError(f"bucket {bucket!r} belongs to no rule of {self.source}")
        return rule


def _column(table: str, row: Mapping[str, Any], column: str, why: str) -> Any:
    try:
        return row[column]
    except KeyError:
        raise RowError(
            f"row of {table} has no column {column!r} ({why}); send full rows "
            "(fill unchanged TOAST values in from the stored row)"
        ) from None


def _place(rule: BucketRule, entry: TableRule, row: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The parameter values of the one bucket of ``rule`` the row is in, or ``None``."""
    for f in entry.filters:
        if not f.holds(_column(entry.table, row, f.column, f"filter of bucket rule {rule.name!r}")):
            return None
    values: dict[str, str] = {}
    for column, parameter in entry.match:
        raw = _column(entry.table, row, column, f"match of bucket rule {rule.name!r}")
        text = canonical_text(raw)
        if text is None or values.setdefault(parameter, text) != text:
            return None
    return tuple(values[p] for p in rule.parameters)
