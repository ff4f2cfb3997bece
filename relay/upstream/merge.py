"""Per-column three-way merge of a device edit into the server's row, and conflict policies.

Three versions of a row meet when the applier applies a journal entry: the *base*
(``old``: the values the device last had), the *server* row (current, read ``FOR
UPDATE``) and the *device* values (``new``).  Values are in wire form and compared with
:func:`relay.upstream.journal.same_value`.

Update, for each column the device changed (``new`` differs from ``old``):

- ``server == base`` (the server did not change it since the base): the device value
  is applied (decision ``device``);
- ``server == device`` (both made the same change): nothing to do (``equal``);
- otherwise both changed it: a *conflict*, settled by the column's policy (or its
  table's):

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

Times for ``lww``/``fww`` (:class:`EditTimes`): the device's edit time is its HLC, its
physical part clamped to ``now + max_skew`` (a device clock far in the future cannot
win forever).  The server version's time is the HLC of the applier write that made it
(when the row's current version is the applier's), else a commit time or a time column
in ms, or unknown (treated as older than every edit).  Against an HLC, HLCs are compared
whole; against a time in ms, only the physical part, and a tie goes to the server.

Row-level cases use the table's policy (``precedence`` and ``counter`` are column-only);
every result is documented in docs/journal.md ("Defined results"):

- insert of a key that exists: every column of the insert that differs from the server
  is treated as changed on both sides (base unknown; ``counter`` adds the inserted value);
- update of a missing row (deleted on the server, "update vs delete"): the table policy
  decides between the delete and re-creating the row from ``old`` + ``new``
  (``client_wins``; ``lww``/``fww`` against the deletion time, which the applier knows for
  its own deletes and otherwise takes as *now*, so the delete stands); ``ask`` holds both;
- delete of a missing row: done (nothing to do, outcome ``applied``);
- delete of a row the server changed since the base (delete vs update): the table policy
  decides between deleting and keeping the server's row; ``ask`` holds both.

Conflict policies are data (TOML, see config/conflicts.example.toml), validated when
loaded; every problem names the file, table and column.

Everything here is pure and immutable.
"""

from __future__ import annotations

import difflib
import enum
import functools
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from core.envelope_schema import ColumnType, Kind
from core.hlc import Hlc
from relay.downstream.rules import canonical_text
from relay.errors import ConflictsError, RulesProblem
from relay.upstream.journal import Op, OutcomeKind, coerce_value, same_value

__all__ = [
    "Action",
    "ColumnPolicy",
    "ConflictPolicies",
    "ConflictsError",
    "EditTimes",
    "MergeResult",
    "Policy",
    "TablePolicy",
    "conflicts_from_mapping",
    "load_conflicts",
    "merge",
    "resolve_column",
    "row_winner",
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
                        f"{t.table!r} is not a known table{_hint(t.table, types)}",
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
                            f"{name!r} is not a column of {t.table}{_hint(name, cols)}",
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


def _hint(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_TOP_KEYS: Final = ("default", "table")
_DEFAULT_KEYS: Final = ("policy",)
_TABLE_KEYS: Final = ("table", "policy", "time_column", "columns")
_COLUMN_KEYS: Final = ("policy", "order", "fallback")


def load_conflicts(
    path: str | Path, types: Mapping[str, Mapping[str, ColumnType]] | None = None
) -> ConflictPolicies:
    """Read and validate a conflicts file (checked against ``types`` when given)."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConflictsError([RulesProblem(source, "", "", "does not exist")]) from exc
    except OSError as exc:
        raise ConflictsError([RulesProblem(source, "", "", f"cannot be read: {exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConflictsError([RulesProblem(source, "", "", f"is not valid TOML: {exc}")]) from exc
    return conflicts_from_mapping(data, source, types)


def conflicts_from_mapping(
    data: Mapping[str, Any],
    source: str = "<conflicts>",
    types: Mapping[str, Mapping[str, ColumnType]] | None = None,
) -> ConflictPolicies:
    """Validate conflict policies given as the mapping a TOML file parses to."""
    parser = _Parser(source)
    policies = parser.document(data)
    if parser.problems:
        raise ConflictsError(parser.problems)
    if types is not None:
        policies.check_schema(types)
    return policies


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[RulesProblem] = []

    def problem(self, scope: str, key: str, message: str) -> None:
        self.problems.append(RulesProblem(self.source, scope, key, message))

    def unknown(
        self, scope: str, prefix: str, raw: Mapping[str, Any], known: Sequence[str]
    ) -> None:
        for key in raw:
            if key not in known:
                self.problem(
                    scope,
                    prefix + key,
                    f"is not a known key{_hint(key, known)} (known: {', '.join(known)})",
                )

    def policy(self, scope: str, key: str, raw: object, allowed: Iterable[Policy]) -> Policy | None:
        names = [p.value for p in allowed]
        if not isinstance(raw, str) or raw not in names:
            shown = repr(raw) if isinstance(raw, str) else f"a {type(raw).__name__}"
            hint = _hint(raw, names) if isinstance(raw, str) else ""
            self.problem(
                scope, key, f"{shown} is not a policy here{hint} (use one of {', '.join(names)})"
            )
            return None
        return Policy(raw)

    def document(self, data: Mapping[str, Any]) -> ConflictPolicies:
        self.unknown("", "", data, _TOP_KEYS)
        default = DEFAULT_POLICY
        raw_default = data.get("default", {})
        if not isinstance(raw_default, dict):
            self.problem("", "default", "must be a table ([default])")
        else:
            self.unknown("[default]", "", raw_default, _DEFAULT_KEYS)
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
        self.unknown(scope, "", raw, _TABLE_KEYS)
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
        self.unknown(scope, key + ".", spec, _COLUMN_KEYS)
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


# --------------------------------------------------------------------------- deciding


@dataclass(frozen=True)
class EditTimes:
    """The times ``lww``/``fww`` compare (see the module docstring)."""

    device: Hlc
    server: Hlc | int | None
    now_ms: int
    max_skew_ms: int

    def device_is_later(self) -> bool:
        """Whether the device's (clamped) edit is later than the server version; ties: no."""
        limit = self.now_ms + self.max_skew_ms
        device = self.device
        if device.physical_ms > limit:
            device = Hlc(max(limit, 0), device.logical, device.node)
        server = self.server
        if server is None:
            return True
        if isinstance(server, Hlc):
            return device > server
        return device.physical_ms > server


def row_winner(policy: Policy, times: EditTimes) -> str:
    """``device``, ``server`` or ``held`` for a row-level conflict under a table policy."""
    if policy is Policy.CLIENT_WINS:
        return "device"
    if policy is Policy.SERVER_WINS:
        return "server"
    if policy is Policy.ASK:
        return "held"
    later = times.device_is_later()
    if policy is Policy.LWW:
        return "device" if later else "server"
    if policy is Policy.FWW:
        return "server" if later else "device"
    raise ValueError(f"policy {policy.value!r} cannot settle a row-level conflict")


def _rank(order: Sequence[str], value: Any) -> int:
    text = canonical_text(value)
    return order.index(text) if text is not None and text in order else len(order)


def resolve_column(cp: ColumnPolicy, base: Any, server: Any, device: Any, times: EditTimes) -> str:
    """``device``, ``server`` or ``held`` for a column both sides changed (not counters)."""
    if cp.policy is Policy.PRECEDENCE:
        d, s = _rank(cp.order, device), _rank(cp.order, server)
        if d != s:
            return "device" if d < s else "server"
        return row_winner(cp.fallback, times)
    if cp.policy is Policy.COUNTER:
        raise ValueError("counters are combined, not resolved")
    return row_winner(cp.policy, times)


def _number(ct: ColumnType | None, value: Any) -> Decimal | float | int | None:
    if value is None:
        return 0
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value if not isinstance(value, float) or math.isfinite(value) else None
    if isinstance(value, str) and ct is not None and ct.kind in (Kind.DECIMAL, Kind.NUMERIC):
        try:
            number = Decimal(value)
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


def counter_value(ct: ColumnType | None, base: Any, server: Any, device: Any) -> Any:
    """``server + (device - base)`` in the column's wire form; None if a value is not a
    finite number (the server's value then stays)."""
    b, s, d = _number(ct, base), _number(ct, server), _number(ct, device)
    if b is None or s is None or d is None:
        return None
    if ct is not None and ct.kind is Kind.FLOAT:
        return float(s) + (float(d) - float(b))
    if (
        isinstance(b, int)
        and isinstance(s, int)
        and isinstance(d, int)
        and (ct is None or ct.kind is Kind.INT)
    ):
        return s + (d - b)
    total = Decimal(s) + (Decimal(d) - Decimal(b))
    if ct is not None and ct.kind in (Kind.DECIMAL, Kind.NUMERIC):
        try:
            return coerce_value(ct, format(total, "f"))
        except ValueError:
            return None
    return int(total) if total == total.to_integral_value() else format(total, "f")


class Action(enum.StrEnum):
    NONE = "none"
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True)
class MergeResult:
    """What to do and what became of the entry.

    ``values``: the full row to insert (INSERT) or the columns to set (UPDATE).
    ``row``: the row afterwards (server row with ``values`` applied; None if absent).
    ``columns``: per written column ``device``/``server``/``equal``/``combined``/``held``.
    ``held``: ``ask`` columns, each ``{"base", "server", "device"}``.
    ``held_row``: a row-level ``ask`` (``{"server": row|None, "device": row|None}``).
    """

    outcome: OutcomeKind
    action: Action
    values: Mapping[str, Any]
    row: Mapping[str, Any] | None
    columns: Mapping[str, str] = field(default_factory=dict)
    held: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    held_row: Mapping[str, Any] | None = None
    message: str = ""


def merge(
    op: Op,
    policy: TablePolicy,
    types: Mapping[str, ColumnType],
    key_columns: Sequence[str],
    old: Mapping[str, Any] | None,
    server: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    times: EditTimes,
) -> MergeResult:
    """Merge one entry into the server's row (see the module docstring)."""
    if op is Op.DELETE:
        return _merge_delete(policy, types, old or {}, server, times)
    assert new is not None
    if server is None:
        if op is Op.INSERT:
            return MergeResult(
                OutcomeKind.APPLIED, Action.INSERT, dict(new), dict(new), {c: "device" for c in new}
            )
        return _update_missing(policy, old or {}, new, times)
    written = [
        c
        for c, v in new.items()
        if c not in key_columns
        and (
            op is Op.INSERT
            or old is None
            or c not in old
            or not same_value(types.get(c), old[c], v)
        )
    ]
    base = None if op is Op.INSERT else (old or {})
    return _merge_columns(policy, types, base, server, new, written, times, op is Op.INSERT)


def _merge_columns(
    policy: TablePolicy,
    types: Mapping[str, ColumnType],
    base: Mapping[str, Any] | None,
    server: Mapping[str, Any],
    new: Mapping[str, Any],
    written: Sequence[str],
    times: EditTimes,
    existing_insert: bool,
) -> MergeResult:
    values: dict[str, Any] = {}
    decisions: dict[str, str] = {}
    held: dict[str, dict[str, Any]] = {}
    for c in written:
        ct = types.get(c)
        cp = policy.column(c)
        dev, srv = new[c], server.get(c)
        old = base.get(c) if base is not None else None
        if cp.policy is Policy.COUNTER:
            value = counter_value(ct, old, srv, dev)
            if value is None:
                decisions[c] = "server"
                continue
            unchanged = base is not None and c in base and same_value(ct, srv, old)
            decisions[c] = "device" if unchanged else "combined"
            if not same_value(ct, value, srv):
                values[c] = value
            continue
        if base is not None and c in base and same_value(ct, srv, old):
            decisions[c] = "device"
            values[c] = dev
            continue
        if same_value(ct, srv, dev):
            decisions[c] = "equal"
            continue
        winner = resolve_column(cp, old, srv, dev, times)
        decisions[c] = winner
        if winner == "device":
            values[c] = dev
        elif winner == "held":
            held[c] = {"base": old, "server": srv, "device": dev}
    row = {**server, **values}
    if held:
        outcome = OutcomeKind.CONFLICT
    elif any(d in ("server", "combined") for d in decisions.values()) or (
        existing_insert and any(d == "device" for d in decisions.values())
    ):
        outcome = OutcomeKind.MERGED
    else:
        outcome = OutcomeKind.APPLIED
    message = ""
    if existing_insert:
        message = "the row already existed; the insert was merged column by column"
    action = Action.UPDATE if values else Action.NONE
    return MergeResult(outcome, action, values, row, decisions, held, None, message)


def _update_missing(
    policy: TablePolicy, old: Mapping[str, Any], new: Mapping[str, Any], times: EditTimes
) -> MergeResult:
    device_row = {**old, **new}
    winner = row_winner(policy.policy, times)
    if winner == "device":
        return MergeResult(
            OutcomeKind.MERGED,
            Action.INSERT,
            device_row,
            device_row,
            {c: "device" for c in new},
            message="the row had been deleted on the server; it was re-created from the device's version",
        )
    if winner == "held":
        return MergeResult(
            OutcomeKind.CONFLICT,
            Action.NONE,
            {},
            None,
            {c: "held" for c in new},
            held_row={"server": None, "device": device_row},
            message="the row had been deleted on the server; kept for a person to decide",
        )
    return MergeResult(
        OutcomeKind.MERGED,
        Action.NONE,
        {},
        None,
        {c: "server" for c in new},
        message="the row had been deleted on the server; the delete stands",
    )


def _merge_delete(
    policy: TablePolicy,
    types: Mapping[str, ColumnType],
    old: Mapping[str, Any],
    server: Mapping[str, Any] | None,
    times: EditTimes,
) -> MergeResult:
    if server is None:
        return MergeResult(
            OutcomeKind.APPLIED, Action.NONE, {}, None, message="the row was already deleted"
        )
    changed = [c for c in old if c in server and not same_value(types.get(c), server[c], old[c])]
    if not changed:
        return MergeResult(OutcomeKind.APPLIED, Action.DELETE, {}, None)
    winner = row_winner(policy.policy, times)
    what = f"the server changed {', '.join(sorted(changed))} since the device's version"
    if winner == "device":
        return MergeResult(
            OutcomeKind.MERGED, Action.DELETE, {}, None, message=f"{what}; the delete went through"
        )
    if winner == "held":
        return MergeResult(
            OutcomeKind.CONFLICT,
            Action.NONE,
            {},
            dict(server),
            held_row={"server": dict(server), "device": None},
            message=f"{what}; kept for a person to decide",
        )
    return MergeResult(
        OutcomeKind.MERGED,
        Action.NONE,
        {},
        dict(server),
        message=f"{what}; the server's row stays",
    )
