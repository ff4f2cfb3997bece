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

Rules are data: they are validated when loaded, every problem naming file,
rule and key; nothing from them is evaluated as code or pasted into SQL.

Everything here is pure and immutable: a :class:`Rules` can be shared between
threads and coroutines without locking.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import re
import tomllib
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from core.settings_checks import close_match_hint as _hint
from relay.claims import DEVICE_CLAIM, REGISTERED_CLAIMS
from relay.errors import RowError, RulesError, RulesProblem

OPERATORS: Final[tuple[str, ...]] = ("=", "!=", "in", "not in", "is null", "is not null")
_NULL_OPS: Final = frozenset({"is null", "is not null"})
_LIST_OPS: Final = frozenset({"in", "not in"})

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_BUCKET_KEYS: Final = ("name", "description", "parameters", "claims", "table")
_TABLE_KEYS: Final = ("table", "match", "filters", "columns", "exclude", "writable", "claim")
_FILTER_KEYS: Final = ("column", "op", "value")
_TOP_KEYS: Final = ("token_claims", "bucket")

RowKey = tuple[Any, ...]
"""A row's primary-key values, in the order of :attr:`TableInfo.key`."""


@dataclass(frozen=True)
class TableInfo:
    """What the rules need to know about a table: its columns and primary-key columns,
    and which columns hold dates or times (``temporal``: column → ``date``, ``time``,
    ``timestamp`` or ``timestamptz``), whose filter values are written as ISO text but
    compared as the change events' integers."""

    columns: tuple[str, ...]
    key: tuple[str, ...]
    temporal: tuple[tuple[str, str], ...] = ()


TEMPORAL_KINDS: Final = ("date", "time", "timestamp", "timestamptz")
_TEMPORAL_EXAMPLES: Final = {
    "date": '"2024-05-01"',
    "time": '"08:30:00"',
    "timestamp": '"2024-05-01T08:30:00"',
    "timestamptz": '"2024-05-01T08:30:00Z"',
}
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
    if not bracket or not _IDENT.match(name):
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
    :func:`relay.upstream.write_rules.check_write`.
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


# --------------------------------------------------------------------------- loading


def load_rules(path: str | Path, schema: Mapping[str, TableInfo]) -> Rules:
    """Read, validate and bind a rules file.  Raises :class:`RulesError` listing every problem."""
    source = str(path)
    return Rules(_parse(_read_rules_file(path), source, schema), schema, source)


def check_rules_file(path: str | Path) -> tuple[BucketRule, ...]:
    """Validate a rules file's structure only (no schema: tables and columns are not checked)."""
    return tuple(_parse(_read_rules_file(path), str(path), None))


def rules_from_mapping(
    data: Mapping[str, Any], schema: Mapping[str, TableInfo], source: str = "<rules>"
) -> Rules:
    """Validate and bind rules given as the mapping a TOML file parses to."""
    return Rules(_parse(data, source, schema), schema, source)


def _read_rules_file(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise RulesError([RulesProblem(str(path), "", "", "does not exist")]) from exc
    except OSError as exc:
        raise RulesError([RulesProblem(str(path), "", "", f"cannot be read: {exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise RulesError([RulesProblem(str(path), "", "", f"is not valid TOML: {exc}")]) from exc


def _parse(
    data: Mapping[str, Any], source: str, schema: Mapping[str, TableInfo] | None
) -> list[BucketRule]:
    parser = _Parser(source, schema)
    rules = parser.document(data)
    if parser.problems:
        raise RulesError(parser.problems)
    return rules


def _kind(value: object) -> str:
    return {dict: "table", list: "array", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


def _listing(names: Iterable[str]) -> str:
    names = list(names)
    return ", ".join(names) if names else "none"


class _Parser:
    """Walks the parsed TOML, collecting every problem instead of stopping at the first."""

    def __init__(self, source: str, schema: Mapping[str, TableInfo] | None) -> None:
        self.source = source
        self.schema = schema
        self.problems: list[RulesProblem] = []

    def problem(self, scope: str, key: str, message: str) -> None:
        self.problems.append(RulesProblem(self.source, scope, key, message))

    def unknown_keys(
        self, scope: str, prefix: str, raw: Mapping[str, Any], known: Sequence[str]
    ) -> None:
        for key in raw:
            if key not in known:
                self.problem(
                    scope,
                    prefix + key,
                    f"is not a known key{_hint(key, known)} (known: {', '.join(known)})",
                )

    def names(self, scope: str, key: str, raw: object, what: str) -> list[str]:
        """A list of unique identifiers."""
        if not isinstance(raw, list):
            self.problem(scope, key, f"must be an array of {what} names, not a {_kind(raw)}")
            return []
        out: list[str] = []
        for i, item in enumerate(raw):
            if not isinstance(item, str) or not _IDENT.match(item):
                self.problem(
                    scope,
                    f"{key}[{i}]",
                    f"{item!r} is not a valid {what} name (letters, digits and _, not starting with a digit)",
                )
            elif item in out:
                self.problem(scope, f"{key}[{i}]", f"{item!r} is listed twice")
            else:
                out.append(item)
        return out

    # ---- document

    def document(self, data: Mapping[str, Any]) -> list[BucketRule]:
        self.unknown_keys("", "", data, _TOP_KEYS)
        known_claims = {DEVICE_CLAIM}
        for i, claim in enumerate(
            self.names("", "token_claims", data.get("token_claims", []), "claim")
        ):
            if claim in REGISTERED_CLAIMS - {DEVICE_CLAIM}:
                self.problem(
                    "",
                    f"token_claims[{i}]",
                    f"{claim!r} is a registered JWT claim set by the issuer; it cannot select buckets",
                )
            known_claims.add(claim)
        raw = data.get("bucket")
        if raw is None:
            self.problem("", "", "defines no bucket (add a [[bucket]] table)")
            return []
        if not isinstance(raw, list) or not all(isinstance(b, dict) for b in raw):
            self.problem(
                "", "bucket", "must be an array of tables ([[bucket]]), not a " + _kind(raw)
            )
            return []
        rules: list[BucketRule] = []
        first_seen: dict[str, int] = {}
        for i, entry in enumerate(raw):
            rule = self.bucket(i, entry, known_claims, first_seen)
            if rule is not None:
                rules.append(rule)
        return rules

    # ---- buckets

    def bucket(
        self, index: int, raw: Mapping[str, Any], known_claims: set[str], first_seen: dict[str, int]
    ) -> BucketRule | None:
        before = len(self.problems)
        scope = f"bucket #{index + 1}"
        name = raw.get("name")
        if name is None:
            self.problem(scope, "name", "is missing")
        elif not isinstance(name, str) or not _IDENT.match(name):
            self.problem(
                scope,
                "name",
                f"{name!r} is not a valid name (letters, digits and _, not starting with a digit)",
            )
        else:
            scope = f"bucket {name!r}"
            if name in first_seen:
                self.problem(scope, "name", f"is already used by bucket #{first_seen[name] + 1}")
            else:
                first_seen[name] = index
        self.unknown_keys(scope, "", raw, _BUCKET_KEYS)
        description = raw.get("description", "")
        if not isinstance(description, str):
            self.problem(scope, "description", f"must be a string, not a {_kind(description)}")
        parameters = self.names(scope, "parameters", raw.get("parameters", []), "parameter")
        claims = self.bucket_claims(scope, raw.get("claims", {}), parameters, known_claims)
        tables = self.bucket_tables(scope, raw.get("table"), parameters)
        if (
            len(self.problems) > before
            or not isinstance(name, str)
            or not isinstance(description, str)
        ):
            return None
        return BucketRule(name, tuple(parameters), claims, MappingProxyType(tables), description)

    def bucket_claims(
        self, scope: str, raw: object, parameters: list[str], known: set[str]
    ) -> tuple[str, ...]:
        if not isinstance(raw, dict):
            self.problem(
                scope, "claims", f'must be a table (parameter = "claim"), not a {_kind(raw)}'
            )
            return ()
        for key, claim in raw.items():
            if key not in parameters:
                self.problem(
                    scope,
                    f"claims.{key}",
                    f"is not a parameter of this bucket{_hint(key, parameters)} (parameters: {_listing(parameters)})",
                )
            elif not isinstance(claim, str):
                self.problem(
                    scope, f"claims.{key}", f"must be a claim name (a string), not a {_kind(claim)}"
                )
            elif claim in REGISTERED_CLAIMS - {DEVICE_CLAIM}:
                self.problem(
                    scope,
                    f"claims.{key}",
                    f"{claim!r} is a registered JWT claim; of those only 'sub' (the device id) can select buckets",
                )
            elif claim not in known:
                self.problem(
                    scope,
                    f"claims.{key}",
                    f"{claim!r} is not a known claim{_hint(claim, known)} (declare it in token_claims; known: {_listing(sorted(known))})",
                )
        for p in parameters:
            if p not in raw:
                self.problem(
                    scope, "claims", f'has no claim for parameter {p!r} (add {p} = "<claim>")'
                )
        return tuple(str(raw.get(p, "")) for p in parameters)

    def bucket_tables(self, scope: str, raw: object, parameters: list[str]) -> dict[str, TableRule]:
        if raw is None:
            self.problem(scope, "table", "is missing: a bucket needs at least one [[bucket.table]]")
            return {}
        if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
            self.problem(
                scope, "table", f"must be an array of tables ([[bucket.table]]), not a {_kind(raw)}"
            )
            return {}
        tables: dict[str, TableRule] = {}
        for j, entry in enumerate(raw):
            name = entry.get("table")
            if isinstance(name, str) and name in tables:
                self.problem(
                    f"{scope} table {name!r}",
                    "table",
                    "is listed twice in this bucket (use a second bucket for a second selection)",
                )
                continue
            rule = self.table(scope, j, entry, parameters)
            if rule is not None:
                tables[rule.table] = rule
        return tables

    # ---- tables

    def table(
        self, bucket_scope: str, index: int, raw: Mapping[str, Any], parameters: list[str]
    ) -> TableRule | None:
        before = len(self.problems)
        scope = f"{bucket_scope} table #{index + 1}"
        name = raw.get("table")
        info: TableInfo | None = None
        if name is None:
            self.problem(scope, "table", 'is missing (e.g. table = "public.work_orders")')
        elif not isinstance(name, str):
            self.problem(scope, "table", f'must be a string ("schema.table"), not a {_kind(name)}')
        else:
            scope = f"{bucket_scope} table {name!r}"
            if self.schema is not None:
                info = self.schema.get(name)
                if info is None:
                    self.problem(
                        scope, "table", f"{name!r} is not a known table{_hint(name, self.schema)}"
                    )
                elif not info.key:
                    self.problem(
                        scope,
                        "table",
                        f"{name!r} has no primary key; only tables with one can be synced",
                    )
        self.unknown_keys(scope, "", raw, _TABLE_KEYS)
        table = name if isinstance(name, str) else "?"
        match = self.match(scope, raw.get("match", {}), parameters, table, info)
        filters = self.filters(scope, raw.get("filters", []), table, info)
        columns, exclude = self.projection(scope, raw, table, info)
        writable, claim = self.write_options(scope, raw)
        if len(self.problems) > before or not isinstance(name, str):
            return None
        return TableRule(name, match, filters, columns, exclude, writable, claim)

    def write_options(self, scope: str, raw: Mapping[str, Any]) -> tuple[bool, bool]:
        """``writable`` (default true) and ``claim`` (default false), both booleans;
        ``claim`` needs ``writable``."""
        found: dict[str, bool] = {}
        for key, default in (("writable", True), ("claim", False)):
            value = raw.get(key, default)
            if not isinstance(value, bool):
                self.problem(scope, key, f"must be true or false, not {value!r}")
                value = default
            found[key] = value
        if found["claim"] and not found["writable"]:
            self.problem(
                scope,
                "claim",
                "is true but writable is false: only a writable entry can claim rows",
            )
        return found["writable"], found["claim"]

    def column(
        self, scope: str, key: str, column: object, table: str, info: TableInfo | None
    ) -> bool:
        if not isinstance(column, str) or not column:
            self.problem(scope, key, f"must be a column name (a string), not {column!r}")
            return False
        if info is not None and column not in info.columns:
            self.problem(
                scope, key, f"{column!r} is not a column of {table}{_hint(column, info.columns)}"
            )
            return False
        return True

    def match(
        self, scope: str, raw: object, parameters: list[str], table: str, info: TableInfo | None
    ) -> tuple[tuple[str, str], ...]:
        if not isinstance(raw, dict):
            self.problem(
                scope, "match", f'must be a table (column = "parameter"), not a {_kind(raw)}'
            )
            return ()
        pairs: list[tuple[str, str]] = []
        for column, parameter in raw.items():
            key = f"match.{column}"
            ok = self.column(scope, key, column, table, info)
            if not parameters:
                self.problem(
                    scope, key, "a bucket without parameters (a global bucket) cannot match columns"
                )
            elif not isinstance(parameter, str) or parameter not in parameters:
                hint = _hint(parameter, parameters) if isinstance(parameter, str) else ""
                self.problem(
                    scope,
                    key,
                    f"{parameter!r} is not a parameter of this bucket{hint} (parameters: {_listing(parameters)})",
                )
            elif ok:
                pairs.append((column, parameter))
        matched = {str(p) for p in raw.values()}
        for p in parameters:
            if p not in matched:
                self.problem(
                    scope,
                    "match",
                    f"does not match parameter {p!r}: map a column to it (column = {p!r})",
                )
        return tuple(pairs)

    def filters(
        self, scope: str, raw: object, table: str, info: TableInfo | None
    ) -> tuple[Filter, ...]:
        if not isinstance(raw, list):
            self.problem(
                scope,
                "filters",
                f"must be an array of {{ column, op, value }} tables, not a {_kind(raw)}",
            )
            return ()
        out: list[Filter] = []
        for k, item in enumerate(raw):
            f = self.filter(scope, f"filters[{k}]", item, table, info)
            if f is not None:
                out.append(f)
        return tuple(out)

    def filter(
        self, scope: str, key: str, raw: object, table: str, info: TableInfo | None
    ) -> Filter | None:
        if not isinstance(raw, dict):
            self.problem(scope, key, f"must be a table {{ column, op, value }}, not a {_kind(raw)}")
            return None
        before = len(self.problems)
        self.unknown_keys(scope, key + ".", raw, _FILTER_KEYS)
        column = raw.get("column")
        if column is None:
            self.problem(scope, f"{key}.column", "is missing")
        else:
            self.column(scope, f"{key}.column", column, table, info)
        op = raw.get("op")
        norm = " ".join(op.lower().split()) if isinstance(op, str) else None
        if op is None:
            self.problem(scope, f"{key}.op", f"is missing (use one of {', '.join(OPERATORS)})")
        elif norm not in OPERATORS:
            self.problem(
                scope, f"{key}.op", f"{op!r} is not an operator (use one of {', '.join(OPERATORS)})"
            )
        kind = (
            dict(info.temporal).get(column)
            if info is not None and isinstance(column, str)
            else None
        )
        values = self.filter_values(scope, f"{key}.value", raw, norm, kind)
        if len(self.problems) > before or not isinstance(column, str) or norm is None:
            return None
        return Filter(column, norm, values)

    def filter_values(
        self,
        scope: str,
        key: str,
        raw: Mapping[str, Any],
        op: str | None,
        temporal: str | None = None,
    ) -> frozenset[str]:
        if op is None or op not in OPERATORS:
            return frozenset()
        if op in _NULL_OPS:
            if "value" in raw:
                self.problem(scope, key, f"must not be given with op {op!r}")
            return frozenset()
        if "value" not in raw:
            example = '["a", "b"]' if op in _LIST_OPS else '"a"'
            self.problem(scope, key, f"is missing (op {op!r} needs e.g. value = {example})")
            return frozenset()
        value = raw["value"]
        if op in _LIST_OPS:
            if not isinstance(value, list) or not value:
                self.problem(scope, key, f"must be a non-empty array with op {op!r}, not {value!r}")
                return frozenset()
            items = list(enumerate(value))
        else:
            if isinstance(value, list):
                self.problem(
                    scope,
                    key,
                    f"must be a single value with op {op!r} (use 'in' or 'not in' for arrays)",
                )
                return frozenset()
            items = [(-1, value)]
        texts: set[str] = set()
        for i, item in items:
            where = key if i < 0 else f"{key}[{i}]"
            if not isinstance(item, str | int):  # bool is an int
                self.problem(
                    scope,
                    where,
                    f"must be a string, integer or boolean, not a {_kind(item)} ({item!r})",
                )
                continue
            if temporal is not None and isinstance(item, str):
                try:
                    item = temporal_value(temporal, item)
                except ValueError as exc:
                    self.problem(
                        scope,
                        where,
                        f"{item!r} is not a {temporal} in ISO 8601 ({exc}); the column is a "
                        f"{temporal}, e.g. {_TEMPORAL_EXAMPLES[temporal]}",
                    )
                    continue
            text = canonical_text(item)
            assert text is not None
            texts.add(text)
        return frozenset(texts)

    def projection(
        self, scope: str, raw: Mapping[str, Any], table: str, info: TableInfo | None
    ) -> tuple[tuple[str, ...] | None, frozenset[str]]:
        if "columns" in raw and "exclude" in raw:
            self.problem(
                scope,
                "columns",
                "and exclude cannot both be given (list what is sent, or what is not)",
            )
            return None, frozenset()
        if "columns" in raw:
            return tuple(
                self.column_list(scope, "columns", raw["columns"], table, info)
            ), frozenset()
        if "exclude" in raw:
            excluded = self.column_list(scope, "exclude", raw["exclude"], table, info)
            for column in excluded:
                if info is not None and column in info.key:
                    self.problem(
                        scope,
                        "exclude",
                        f"{column!r} is a primary-key column of {table}; key columns are always sent",
                    )
            return None, frozenset(excluded)
        return None, frozenset()

    def column_list(
        self, scope: str, key: str, raw: object, table: str, info: TableInfo | None
    ) -> list[str]:
        if not isinstance(raw, list):
            self.problem(scope, key, f"must be an array of column names, not a {_kind(raw)}")
            return []
        out: list[str] = []
        for i, column in enumerate(raw):
            if not self.column(scope, f"{key}[{i}]", column, table, info):
                continue
            assert isinstance(column, str)
            if column in out:
                self.problem(scope, f"{key}[{i}]", f"{column!r} is listed twice")
            else:
                out.append(column)
        return out
