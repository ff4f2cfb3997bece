"""Conflict policies: how a column both sides changed is settled, read from a TOML file.

Policies (per column, or per table for its other columns and for row-level decisions):

  ============== ===========================================================
  ``lww``        the later edit wins: device HLC vs the server version's time
  ``fww``        the earlier edit wins
  ``server_wins`` the server's value stays
  ``client_wins`` the device's value is written
  ``ask``        the server's value stays for now; both are kept for a person
                 (decision ``held``, outcome ``conflict``)
  ``precedence`` the value ranked higher in ``order`` wins (unlisted values rank
                 below all listed ones); equal ranks fall back to ``fallback``
  ``counter``    deltas add: ``server + (device - base)`` (also when only the
                 device changed it, which gives the device value; NULL counts as 0)
  ============== ===========================================================

``precedence`` and ``counter`` are column-only; a table's policy is one of the others
(:data:`ROW_POLICIES`).  A table may name a ``time_column`` giving the server version's
time for ``lww``/``fww``.  How the policies are applied: :mod:`relay.upstream.merge`.

Conflict policies are data (TOML, see config/conflicts.example.toml), validated when
loaded (:func:`load_conflicts`, :func:`conflicts_from_mapping`) and against the captured
tables' column types (:meth:`ConflictPolicies.check_schema`); every problem names the
file, table and column (:class:`~relay.errors.ConflictsError`).

Pure and immutable once loaded (:func:`load_conflicts` reads the file); a
:class:`ConflictPolicies` can be shared between threads (its cache of unlisted tables
is plain dict writes, safe under the GIL).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from core.settings_checks import close_match_hint
from core.values import ColumnType, Kind
from relay.config_file import ProblemCollector, read_toml
from relay.errors import ConflictsError, RulesProblem

__all__ = [
    "DEFAULT_POLICY",
    "ROW_POLICIES",
    "TIMED",
    "ColumnPolicy",
    "ConflictPolicies",
    "Policy",
    "TablePolicy",
    "conflicts_from_mapping",
    "load_conflicts",
]


class Policy(enum.StrEnum):
    LWW = "lww"
    FWW = "fww"
    SERVER_WINS = "server_wins"
    CLIENT_WINS = "client_wins"
    ASK = "ask"
    PRECEDENCE = "precedence"
    COUNTER = "counter"


ROW_POLICIES: Final = frozenset(
    {Policy.LWW, Policy.FWW, Policy.SERVER_WINS, Policy.CLIENT_WINS, Policy.ASK}
)
"""Policies a table (and row-level decisions) may use; ``precedence``/``counter`` are column-only."""
TIMED: Final = frozenset({Policy.LWW, Policy.FWW})
NUMERIC_KINDS: Final = frozenset({Kind.INT, Kind.FLOAT, Kind.DECIMAL, Kind.NUMERIC})
DEFAULT_POLICY: Final = Policy.SERVER_WINS


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class ColumnPolicy:
    """A column's policy; ``order`` (highest first) and ``fallback`` are for ``precedence``."""

    policy: Policy
    order: tuple[str, ...] = ()
    fallback: Policy = DEFAULT_POLICY

    @property
    def timed(self) -> bool:
        return self.policy in TIMED or (self.policy is Policy.PRECEDENCE and self.fallback in TIMED)


_PLAIN: Final = {p: ColumnPolicy(p) for p in Policy}


@dataclass(frozen=True)
class TablePolicy:
    """A table's policy (row-level decisions, and columns without their own), column
    policies, and the optional ``time_column`` giving the server version's time."""

    table: str
    policy: Policy = DEFAULT_POLICY
    columns: Mapping[str, ColumnPolicy] = field(default_factory=dict)
    time_column: str | None = None

    def column(self, name: str) -> ColumnPolicy:
        found = self.columns.get(name)
        return found if found is not None else _PLAIN[self.policy]

    @functools.cached_property
    def timed(self) -> bool:
        """Whether any decision of this table needs the server version's time."""
        return self.policy in TIMED or any(c.timed for c in self.columns.values())


class ConflictPolicies:
    """The policies of every table; tables not listed use ``default``.  Immutable."""

    def __init__(
        self,
        tables: Iterable[TablePolicy] = (),
        default: Policy = DEFAULT_POLICY,
        source: str = "<conflicts>",
    ) -> None:
        self.default = default
        self.source = source
        self.tables: Mapping[str, TablePolicy] = MappingProxyType({t.table: t for t in tables})
        self._defaults: dict[str, TablePolicy] = {}  # unlisted tables (a cache)

    def table(self, name: str) -> TablePolicy:
        found = self.tables.get(name)
        if found is None:
            found = self._defaults.get(name)
            if found is None:
                found = self._defaults[name] = TablePolicy(name, self.default)
        return found

    def check_schema(self, types: Mapping[str, Mapping[str, ColumnType]]) -> None:
        """Check tables, columns and counter/time-column types against the schema;
        raises :class:`ConflictsError` listing every problem."""
        problems: list[RulesProblem] = []
        for t in self.tables.values():
            scope = f"table {t.table!r}"
            cols = types.get(t.table)
            if cols is None:
                problems.append(
                    RulesProblem(
                        self.source,
                        scope,
                        "table",
                        f"{t.table!r} is not a known table{close_match_hint(t.table, types)}",
                    )
                )
                continue
            for name, cp in t.columns.items():
                ct = cols.get(name)
                if ct is None:
                    problems.append(
                        RulesProblem(
                            self.source,
                            scope,
                            f"columns.{name}",
                            f"{name!r} is not a column of {t.table}{close_match_hint(name, cols)}",
                        )
                    )
                elif cp.policy is Policy.COUNTER and ct.kind not in NUMERIC_KINDS:
                    problems.append(
                        RulesProblem(
                            self.source,
                            scope,
                            f"columns.{name}",
                            f"policy 'counter' needs a numeric column; {name} is {ct.describe()}",
                        )
                    )
            if t.time_column is not None:
                ct = cols.get(t.time_column)
                if ct is None or ct.kind not in (Kind.TIMESTAMP, Kind.TIMESTAMPTZ):
                    what = "not a column" if ct is None else f"a {ct.describe()} column"
                    problems.append(
                        RulesProblem(
                            self.source,
                            scope,
                            "time_column",
                            f"{t.time_column!r} is {what}; it must be a timestamp or timestamptz column",
                        )
                    )
        if problems:
            raise ConflictsError(problems)


_TOP_KEYS: Final = ("default", "table")
_DEFAULT_KEYS: Final = ("policy",)
_TABLE_KEYS: Final = ("table", "policy", "time_column", "columns")
_COLUMN_KEYS: Final = ("policy", "order", "fallback")


def load_conflicts(
    path: str | Path, types: Mapping[str, Mapping[str, ColumnType]] | None = None
) -> ConflictPolicies:
    """Read and validate a conflicts file (checked against ``types`` when given)."""
    return conflicts_from_mapping(read_toml(path, ConflictsError), str(path), types)


def conflicts_from_mapping(
    data: Mapping[str, Any],
    source: str = "<conflicts>",
    types: Mapping[str, Mapping[str, ColumnType]] | None = None,
) -> ConflictPolicies:
    """Validate conflict policies given as the mapping a TOML file parses to."""
    parser = _Parser(source)
    policies = parser.document(data)
    parser.raise_problems(ConflictsError)
    if types is not None:
        policies.check_schema(types)
    return policies


class _Parser(ProblemCollector):
    """Walks a parsed conflicts file, collecting every problem (relay/config_file.py)."""

    def policy(self, scope: str, key: str, raw: object, allowed: Iterable[Policy]) -> Policy | None:
        names = [p.value for p in allowed]
        if not isinstance(raw, str) or raw not in names:
            shown = repr(raw) if isinstance(raw, str) else f"a {type(raw).__name__}"
            hint = close_match_hint(raw, names) if isinstance(raw, str) else ""
            self.problem(
                scope, key, f"{shown} is not a policy here{hint} (use one of {', '.join(names)})"
            )
            return None
        return Policy(raw)

    def document(self, data: Mapping[str, Any]) -> ConflictPolicies:
        self.unknown_keys("", "", data, _TOP_KEYS)
        default = DEFAULT_POLICY
        raw_default = data.get("default", {})
        if not isinstance(raw_default, dict):
            self.problem("", "default", "must be a table ([default])")
        else:
            self.unknown_keys("[default]", "", raw_default, _DEFAULT_KEYS)
            if "policy" in raw_default:
                default = (
                    self.policy("[default]", "policy", raw_default["policy"], ROW_POLICIES)
                    or default
                )
        raw_tables = data.get("table", [])
        if not isinstance(raw_tables, list) or not all(isinstance(t, dict) for t in raw_tables):
            self.problem("", "table", "must be an array of tables ([[table]])")
            raw_tables = []
        tables: list[TablePolicy] = []
        seen: set[str] = set()
        for i, raw in enumerate(raw_tables):
            t = self.table(i, raw, default)
            if t is None:
                continue
            if t.table in seen:
                self.problem(f"table {t.table!r}", "table", "is listed twice")
                continue
            seen.add(t.table)
            tables.append(t)
        return ConflictPolicies(tables, default, self.source)

    def table(self, index: int, raw: Mapping[str, Any], default: Policy) -> TablePolicy | None:
        before = len(self.problems)
        name = raw.get("table")
        scope = f"table #{index + 1}"
        if not isinstance(name, str) or "." not in name:
            self.problem(scope, "table", 'is missing or not "schema.table"')
        else:
            scope = f"table {name!r}"
        self.unknown_keys(scope, "", raw, _TABLE_KEYS)
        policy = default
        if "policy" in raw:
            policy = self.policy(scope, "policy", raw["policy"], ROW_POLICIES) or default
        time_column = raw.get("time_column")
        if time_column is not None and (not isinstance(time_column, str) or not time_column):
            self.problem(scope, "time_column", "must be a column name")
        columns: dict[str, ColumnPolicy] = {}
        raw_columns = raw.get("columns", {})
        if not isinstance(raw_columns, dict):
            self.problem(scope, "columns", 'must be a table (column = "policy" or { policy = … })')
        else:
            for column, spec in raw_columns.items():
                cp = self.column(scope, f"columns.{column}", spec)
                if cp is not None:
                    columns[column] = cp
        if len(self.problems) > before or not isinstance(name, str):
            return None
        return TablePolicy(
            name,
            policy,
            MappingProxyType(columns),
            time_column if isinstance(time_column, str) else None,
        )

    def column(self, scope: str, key: str, spec: object) -> ColumnPolicy | None:
        if isinstance(spec, str):
            spec = {"policy": spec}
        if not isinstance(spec, dict):
            self.problem(scope, key, 'must be a policy name or a table { policy = "…" }')
            return None
        self.unknown_keys(scope, key + ".", spec, _COLUMN_KEYS)
        policy = self.policy(scope, key + ".policy", spec.get("policy"), Policy)
        if policy is None:
            return None
        order: tuple[str, ...] = ()
        fallback = DEFAULT_POLICY
        if policy is Policy.PRECEDENCE:
            raw_order = spec.get("order")
            if (
                not isinstance(raw_order, list)
                or not raw_order
                or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in raw_order)
            ):
                self.problem(
                    scope, key + ".order", "must be a non-empty array of values, highest first"
                )
                return None
            order = tuple(str(v) for v in raw_order)
            if len(set(order)) != len(order):
                self.problem(scope, key + ".order", "lists a value twice")
                return None
            if "fallback" in spec:
                got = self.policy(scope, key + ".fallback", spec["fallback"], ROW_POLICIES)
                if got is None:
                    return None
                fallback = got
        else:
            for extra in ("order", "fallback"):
                if extra in spec:
                    self.problem(scope, f"{key}.{extra}", "is only for policy 'precedence'")
                    return None
        return ColumnPolicy(policy, order, fallback)
