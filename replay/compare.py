"""Comparing a table's rows in the log with PostgreSQL's (verify).

Rows are matched by key (tables without key columns: by whole row, with counts).  A row
PostgreSQL has and the log does not is ``missing``; one only the log has is ``extra``;
one both have is compared column by column, every column of PostgreSQL's table of now
(:class:`TableCompare`), and is ``differs`` when a column disagrees.  Each difference is
a :class:`RowDiff` with a :class:`ColumnDiff` per column: both values as PostgreSQL
prints them, and, when the log holds no value of the column for the row or its value
cannot be read as the column's type of now, the reason.

Pure apart from the casts it asks :class:`~replay.pg_side.PgTable` for; one thread.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final, Literal

from core.row_wire import json_value
from core.values import to_pg_text
from replay.bounds import format_position
from replay.catalog import LogCatalog
from replay.keys import key_of
from replay.pg_side import CastFailed, PgTable
from replay.render import named_row, text_of
from replay.state import RowVersion, TableState

__all__ = ["ColumnDiff", "RowDiff", "TableCompare", "compare_table"]


@dataclasses.dataclass(frozen=True)
class ColumnDiff:
    """One column of a row on which the log and PostgreSQL disagree: both values as
    PostgreSQL prints them (None: NULL).  ``in_log`` False: the log holds no value of the
    column for the row at all (``reason`` says why); ``reason`` is also set when the log's
    value cannot be read as the column's type of now."""

    column: str
    log: str | None
    postgres: str | None
    in_log: bool = True
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "log": self.log,
            "postgres": self.postgres,
            "in_log": self.in_log,
            "reason": self.reason,
        }


@dataclasses.dataclass
class RowDiff:
    """One row on which the log and PostgreSQL disagree."""

    table: str
    kind: Literal["missing", "extra", "differs"]  # missing: in PostgreSQL, not in the log
    key: dict[str, Any]
    columns: list[ColumnDiff]
    log_position: str | None = None
    count: int = 1
    bare: frozenset[str] = frozenset()  # columns printed without quotes (numbers, booleans)

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "kind": self.kind,
            "key": self.key,
            "columns": [c.to_json() for c in self.columns],
            "log_position": self.log_position,
            "count": self.count,
        }


_CAST_BATCH: Final = 2_000  # rows whose values need a cast, compared together
#: Column kinds whose values are printed without quotes in a diff (numbers, booleans).
_BARE_KINDS: Final = frozenset({"bool", "int", "float", "decimal", "numeric"})


class TableCompare:
    """Compares the rows the log holds for one table with PostgreSQL's, every column of
    PostgreSQL's table of now.

    Per log schema version a plan says, per column of now, the field of the version
    that holds it (or none: the column did not exist when the row was last written) and
    whether its type changed since.  A column the log holds no value for — the version
    has no such column, or the row's last event left it unchanged (TOAST) and the log
    holds no earlier value — is a difference, with the reason.  Values of the same type
    are compared as datums (the PostgreSQL side went through the same codec, so the same
    value is the same datum); numbers by value, NaN equal to NaN.  Values whose type
    changed are cast to the type of now in PostgreSQL first (:meth:`PgTable.cast`),
    batched, so ``numeric(6,2)`` 1.50 equals ``numeric(8,3)`` 1.500 and an ``int`` 5
    equals a ``text`` '5'."""

    def __init__(self, catalog: LogCatalog, name: str, pg: PgTable) -> None:
        self.catalog = catalog
        self.name = name
        self.pg = pg
        self.bare = frozenset(c for c, ct in pg.types.items() if ct.kind.value in _BARE_KINDS)
        self.diffs: list[RowDiff] = []
        self.not_carried = 0
        self._plans: dict[bytes, list[tuple[str, str | None, Any]]] = {}
        self._pending: list[tuple[dict[str, Any], RowVersion, dict[str, Any]]] = []

    def plan(self, fp: bytes) -> list[tuple[str, str | None, Any]]:
        """Per column of now: (column, the version's field or None, the version's type
        when it differs from the column's type of now, else None)."""
        plan = self._plans.get(fp)
        if plan is None:
            version = self.catalog.versions[fp]
            field_of = {c: f for f, c in version.column_of().items()}
            plan = []
            for c in self.pg.columns:
                f = field_of.get(c)
                old = version.types.get(c) if f is not None else None
                plan.append(
                    (c, f, old if old is not None and old != self.pg.types.get(c) else None)
                )
            self._plans[fp] = plan
        return plan

    def row(self, key: dict[str, Any], have: RowVersion, pg_row: dict[str, Any]) -> None:
        plan = self.plan(have.fingerprint)
        if any(
            t is not None and f is not None and have.values.get(f) is not None for _, f, t in plan
        ):
            self._pending.append((key, have, pg_row))
            if len(self._pending) >= _CAST_BATCH:
                self.flush()
            return
        self._finish(key, have, pg_row, plan, {})

    def flush(self) -> None:
        """Compare the rows waiting for casts: one cast query per column."""
        pending, self._pending = self._pending, []
        wanted: dict[str, dict[str, None]] = {}
        for _, have, _ in pending:
            for c, f, t in self.plan(have.fingerprint):
                value = have.values.get(f) if f is not None else None
                if t is not None and value is not None and not (have.unknown and f in have.unknown):
                    text = to_pg_text(t, json_value(value))
                    if text is not None:
                        wanted.setdefault(c, {})[text] = None
        cast = {c: self.pg.cast(c, list(texts)) for c, texts in wanted.items()}
        for key, have, pg_row in pending:
            self._finish(key, have, pg_row, self.plan(have.fingerprint), cast)

    def _finish(
        self,
        key: dict[str, Any],
        have: RowVersion,
        pg_row: dict[str, Any],
        plan: list[tuple[str, str | None, Any]],
        cast: Mapping[str, Mapping[str, Any]],
    ) -> None:
        pg = self.pg
        at = format_position(have.position)
        delta: list[ColumnDiff] = []
        for c, f, old_type in plan:
            pg_value = pg_row[c]
            if f is None or (have.unknown and f in have.unknown):
                self.not_carried += 1
                why = (
                    f"its last event, at {at}, used a schema without this column"
                    if f is None
                    else f"its last event, at {at}, left it unchanged as a TOASTed value and "
                    "the log holds no earlier value"
                )
                delta.append(ColumnDiff(c, None, pg.pg_text(c, pg_value), False, why))
                continue
            log_value = have.values.get(f)
            log_text = text_of(self.catalog, have.fingerprint, c, json_value(log_value))
            if old_type is not None and log_value is not None:
                got = cast.get(c, {}).get(to_pg_text(old_type, json_value(log_value)) or "")
                if got is None or isinstance(got, CastFailed):
                    why = f"the log's value is no {pg.types[c].describe()}"
                    if got is not None:
                        why += f": {got.message}"
                    delta.append(ColumnDiff(c, log_text, pg.pg_text(c, pg_value), True, why))
                    continue
                log_value = got
            if not _same(log_value, pg_value):
                delta.append(ColumnDiff(c, log_text, pg.pg_text(c, pg_value)))
        if delta:
            self.diffs.append(RowDiff(self.name, "differs", key, delta, at, 1, self.bare))


def _same(a: Any, b: Any) -> bool:
    """Two datums of the same type hold the same value: equal, numbers by value (a
    ``Decimal`` or an unconstrained numeric's text), NaN equal to NaN (as PostgreSQL
    has it), lists and records element by element."""
    if a == b and isinstance(a, bool) == isinstance(b, bool):  # True == 1 is no match
        return True
    if isinstance(a, float) and isinstance(b, float):
        return math.isnan(a) and math.isnan(b)
    if isinstance(a, Decimal | str) and isinstance(b, Decimal | str):
        try:
            x, y = Decimal(a), Decimal(b)
        except ArithmeticError:
            return False
        if x.is_nan() or y.is_nan():
            return x.is_nan() and y.is_nan()
        return x == y
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return False


def compare_table(
    catalog: LogCatalog,
    state: TableState | None,
    name: str,
    pg: PgTable,
    counters: dict[str, int],
) -> list[RowDiff]:
    """The differences between the log's rows of a table and PostgreSQL's."""
    compare = TableCompare(catalog, name, pg)
    key_names = pg.key_columns
    log_rows = dict(state.rows) if state is not None else {}
    left = {k: r.count for k, r in log_rows.items()}  # rows of keyless tables not matched yet
    keyed = bool(pg.codec.key_field_names)
    missing: list[RowDiff] = []
    for kid, pg_row in pg.rows():
        counters["rows"] += 1
        key = {c: json_value(pg_row[c]) for c in key_names}
        have = log_rows.get(kid)
        if have is not None and not keyed:
            left[kid] -= 1
            if left[kid] <= 0:
                del log_rows[kid]
            continue
        if have is None:
            missing.append(
                RowDiff(
                    name,
                    "missing",
                    key or _short(pg_row),
                    [ColumnDiff(c, None, pg.pg_text(c, pg_row[c]), False) for c in pg.columns],
                )
            )
            continue
        del log_rows[kid]
        compare.row(key, have, pg_row)
    compare.flush()
    counters["not_carried"] += compare.not_carried
    extra: list[RowDiff] = []
    for kid, row in log_rows.items():
        version = catalog.versions[row.fingerprint]
        cells = named_row(catalog, row.fingerprint, row.values)
        key = key_of(version, row.values) if version.key_fields else _short(cells)
        extra.append(
            RowDiff(
                name,
                "extra",
                key,
                [
                    ColumnDiff(c, text_of(catalog, row.fingerprint, c, v), None)
                    for c, v in cells.items()
                ],
                format_position(row.position),
                left[kid],
            )
        )
    return missing + extra + compare.diffs


def _short(row: Mapping[str, Any]) -> dict[str, Any]:
    """The first columns of a row without key columns, to name it."""
    return {c: json_value(v) for c, v in list(row.items())[:4]}
