"""Per-column three-way merge of a device edit into the server's row, and row-level decisions.

Three versions of a row meet when the applier applies a journal entry: the *base*
(``old``: the values the device last had), the *server* row (current, read ``FOR
UPDATE``) and the *device* values (``new``).  Values are in wire form and compared with
:func:`core.values.same_value`.

Update, for each column the device changed (``new`` differs from ``old``):

- ``server == base`` (the server did not change it since the base): the device value
  is applied (decision ``device``);
- ``server == device`` (both made the same change): nothing to do (``equal``);
- otherwise both changed it: a *conflict*, settled by the column's policy (or its
  table's; :mod:`relay.upstream.conflict_policies` lists them).

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

Everything here is pure and immutable.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from core.hlc import Hlc
from core.journal_format import Op
from core.journal_outcomes import OutcomeKind
from core.values import ColumnType, Kind, coerce_value, same_value
from relay.downstream.rules import canonical_text
from relay.upstream.conflict_policies import ColumnPolicy, Policy, TablePolicy

__all__ = [
    "Action",
    "EditTimes",
    "MergeResult",
    "counter_value",
    "merge",
    "resolve_column",
    "row_winner",
]


# --------------------------------------------------------------------------- deciding


@dataclass(frozen=True, init=False)
class EditTimes:
    """The times ``lww``/``fww`` compare (see the module docstring)."""

    device: Hlc
    server: Hlc | int | None
    now_ms: int
    max_skew_ms: int

    def __init__(
        self, device: Hlc, server: Hlc | int | None, now_ms: int, max_skew_ms: int
    ) -> None:
        # written out: compiled, each object.__setattr__ is a plain store (one per entry)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "server", server)
        object.__setattr__(self, "now_ms", now_ms)
        object.__setattr__(self, "max_skew_ms", max_skew_ms)

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


@dataclass(frozen=True, init=False)
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

    def __init__(
        self,
        outcome: OutcomeKind,
        action: Action,
        values: Mapping[str, Any],
        row: Mapping[str, Any] | None,
        columns: Mapping[str, str] | None = None,
        held: Mapping[str, Mapping[str, Any]] | None = None,
        held_row: Mapping[str, Any] | None = None,
        message: str = "",
    ) -> None:
        # written out: compiled, each object.__setattr__ is a plain store (one per entry)
        object.__setattr__(self, "outcome", outcome)
        object.__setattr__(self, "action", action)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "row", row)
        object.__setattr__(self, "columns", {} if columns is None else columns)
        object.__setattr__(self, "held", {} if held is None else held)
        object.__setattr__(self, "held_row", held_row)
        object.__setattr__(self, "message", message)


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
