"""Write permission: which rows and columns a device may write, judged from its rules.

A device may write a row only if the row, before and after the write, is in one of the
buckets its token grants whose rule is ``writable`` for the table, and only columns such
a bucket shows; a write that would move a row out of all of them is refused
(``forbidden_move``), and so is one that would show the device columns of the row it
cannot see now, unless a ``claim`` rule of the row's new buckets allows it
(:func:`check_write`; docs/relay-rules.md).  The intake judges an entry with the
device's ``old`` values as the row before the write; the applier with the server's
row, and a device's conflict resolution likewise.

:class:`WriteScope` is what one device may write: the rules, the column types, the
granted buckets, with placements memoized.  Rows are in wire form (:mod:`core.values`);
the rules see them as decoded-Avro datums (:func:`core.values.to_datum`).

Pure (no I/O).  A :class:`WriteScope` memoizes with plain dict writes, safe under the
GIL; it can be shared between threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final

from core.journal_format import Reason, Rejection
from core.row_wire import PLAIN_TYPES
from core.values import ColumnType, to_datum
from relay.downstream.rules import Rules, TableInfo, TableRule, canonical_text, parse_bucket_id
from relay.errors import RowError

__all__ = ["WriteScope", "check_write"]


_ABSENT: Final = object()
"""A column the row lacks."""


class WriteScope:
    """What one device may write: the rules, the column types, the buckets its token grants.

    ``types`` may lack a table (the relay has not seen its schema yet): values of that
    table are then not type-checked here (the applier checks them with the catalog's).
    """

    def __init__(
        self,
        rules: Rules,
        granted: Iterable[str],
        types: Mapping[str, Mapping[str, ColumnType]] | None = None,
    ) -> None:
        self.rules = rules
        self.granted = frozenset(granted)
        self.types: Mapping[str, Mapping[str, ColumnType]] = types or {}
        self._rule_columns: dict[tuple[str, str], frozenset[str]] = {}
        self._placing: dict[str, tuple[str, ...]] = {}
        self._placed: dict[tuple[str, tuple[tuple[bool, str | None], ...]], frozenset[str]] = {}
        self._seen: dict[tuple[str, frozenset[str]], frozenset[str]] = {}
        self._rule_of: dict[str, str] = {}
        self._writable: dict[tuple[str, frozenset[str]], frozenset[str]] = {}
        self._claimable: dict[tuple[str, frozenset[str]], frozenset[str]] = {}
        self._placed_plain: dict[tuple[Any, ...], frozenset[str] | None] = {}
        # the last row placed (the same row object is often asked again at once)
        self._last: tuple[Mapping[str, Any], str, frozenset[str] | None] | None = None
        visible: dict[str, set[str]] = {}
        for bucket in self.granted:
            try:
                rule = rules.rule_of_bucket(bucket).name
            except KeyError:
                continue
            for table in rules.buckets[rule].tables:
                cols = self._columns_of(rule, table)
                visible.setdefault(table, set()).update(cols)
        self.visible_tables: Mapping[str, frozenset[str]] = MappingProxyType(
            {t: frozenset(c) for t, c in visible.items()}
        )

    @classmethod
    def for_claims(
        cls,
        rules: Rules,
        claims: Mapping[str, Any],
        types: Mapping[str, Mapping[str, ColumnType]] | None = None,
    ) -> WriteScope:
        return cls(rules, rules.buckets_for_claims(claims), types)

    def _columns_of(self, rule: str, table: str) -> frozenset[str]:
        found = self._rule_columns.get((rule, table))
        if found is None:
            info = self.rules.table_info(table)
            found = frozenset(self.rules.project(table, rule, dict.fromkeys(info.columns)))
            self._rule_columns[rule, table] = found
        return found

    def table_info(self, table: str) -> TableInfo:
        return self.rules.table_info(table)

    def _placement_columns(self, table: str) -> tuple[str, ...]:
        """The columns the rules read to place a row of ``table`` (match and filters)."""
        found = self._placing.get(table)
        if found is None:
            cols: set[str] = set()
            for rule in self.rules.buckets.values():
                entry = rule.tables.get(table)
                if entry is not None:
                    cols.update(c for c, _ in entry.match)
                    cols.update(f.column for f in entry.filters)
            found = self._placing[table] = tuple(sorted(cols))
        return found

    def row_buckets(self, table: str, row: Mapping[str, Any]) -> frozenset[str] | None:
        """The granted buckets the row (wire form) is in; None if the row lacks a column
        the rules need to place it.

        Memoized by the placing columns' values as the rules compare them (NULL or not,
        canonical text), so rows differing elsewhere share one computation."""
        last = self._last
        if last is not None and last[0] is row and last[1] == table:
            return last[2]
        plain = self._plain_placement(table, row)
        if plain is not None and plain in self._placed_plain:
            found = self._placed_plain[plain]
        else:
            found = self._row_buckets(table, row)
            if plain is not None:
                if len(self._placed_plain) > 100_000:
                    self._placed_plain.clear()
                self._placed_plain[plain] = found
        self._last = (row, table, found)
        return found

    def _plain_placement(self, table: str, row: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """A cache key of the row's placing values as they are (each with its type),
        when all are text, integers, booleans or NULL: equal keys place rows alike.
        None otherwise (other kinds are compared through their canonical text)."""
        out: list[Any] = [table]
        for c in self._placement_columns(table):
            value = row.get(c, _ABSENT)
            kind = type(value)
            if kind not in PLAIN_TYPES:
                return None
            out.append(kind)
            out.append(value)
        return tuple(out)

    def _row_buckets(self, table: str, row: Mapping[str, Any]) -> frozenset[str] | None:
        columns = self._placement_columns(table)
        types = self.types.get(table, {})
        probe: dict[str, Any] = {}
        for c in columns:
            if c not in row:
                return None
            probe[c] = to_datum(types.get(c), row[c])
        key = (table, tuple((v is None, canonical_text(v)) for v in probe.values()))
        found = self._placed.get(key)
        if found is None:
            try:
                found = self.rules.buckets_for_row(table, probe) & self.granted
            except RowError:
                return None
            if len(self._placed) > 100_000:
                self._placed.clear()
            self._placed[key] = found
        return found

    def _rule_name(self, bucket: str) -> str:
        rule = self._rule_of.get(bucket)
        if rule is None:
            rule = self._rule_of[bucket] = parse_bucket_id(bucket)[0]
        return rule

    def columns_in(self, table: str, buckets: frozenset[str]) -> frozenset[str]:
        """The columns the device sees of a row that is in ``buckets`` (granted ones)."""
        found = self._seen.get((table, buckets))
        if found is None:
            cols: set[str] = set()
            for b in buckets:
                cols |= self._columns_of(self._rule_name(b), table)
            found = self._seen[(table, buckets)] = frozenset(cols)
        return found

    def _entry(self, bucket: str, table: str) -> TableRule | None:
        rule = self.rules.buckets.get(self._rule_name(bucket))
        return rule.tables.get(table) if rule is not None else None

    def writable(self, table: str, buckets: frozenset[str]) -> frozenset[str]:
        """Those of ``buckets`` through which the device may write rows of ``table``
        (``writable`` in the rules, the default)."""
        found = self._writable.get((table, buckets))
        if found is None:
            found = frozenset(
                b for b in buckets if (e := self._entry(b, table)) is not None and e.writable
            )
            self._writable[(table, buckets)] = found
        return found

    def claim_columns(self, table: str, buckets: frozenset[str]) -> frozenset[str]:
        """The columns shown through those of ``buckets`` whose rule may claim rows of
        ``table`` (``claim = true``)."""
        found = self._claimable.get((table, buckets))
        if found is None:
            claimers = frozenset(
                b for b in buckets if (e := self._entry(b, table)) is not None and e.claim
            )
            found = self.columns_in(table, claimers) if claimers else frozenset()
            self._claimable[(table, buckets)] = found
        return found

    def project(self, table: str, row: Mapping[str, Any] | None, buckets: frozenset[str]) -> Any:
        """``row`` cut to the columns the device sees in ``buckets``."""
        if row is None:
            return None
        cols = self.columns_in(table, buckets)
        return {c: v for c, v in row.items() if c in cols}

    def datum_row(self, table: str, row: Mapping[str, Any]) -> dict[str, Any]:
        types = self.types.get(table, {})
        return {c: to_datum(types.get(c), v) for c, v in row.items()}


def check_write(
    scope: WriteScope,
    table: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
    written: Iterable[str],
) -> Rejection | None:
    """Whether the device may turn ``before`` into ``after`` (rows in wire form, None for
    absent), writing ``written`` columns.  Rows lacking a column the rules need are not
    judged (only full rows are: the applier's).

    - ``before`` must be in a bucket of the device whose rule lets it write the table
      (``writable``, the default), else ``forbidden_row``;
    - ``after`` likewise, else ``forbidden_move`` (the write would put the row out of the
      device's reach, e.g. reassigning it to another technician);
    - ``written`` must be columns those writable buckets show, else ``forbidden_column``;
    - the write must not *widen* what the device sees: if ``after`` shows it columns of
      the row that ``before`` did not (claiming a colleague's row, say), each of them must
      be shown by a bucket whose rule may claim rows (``claim = true``), else
      ``forbidden_move``.
    """
    before_buckets: frozenset[str] | None = None
    if before is not None:
        before_buckets = scope.row_buckets(table, before)
        if before_buckets is not None and not scope.writable(table, before_buckets):
            where = (
                "only in buckets this device may read, not write (writable = false)"
                if before_buckets
                else "not in any bucket of this device"
            )
            return Rejection(
                Reason.FORBIDDEN_ROW, f"{table}: the row is {where}, so it may not change it"
            )
    after_buckets: frozenset[str] | None = None
    if after is not None:
        after_buckets = scope.row_buckets(table, after)
        if after_buckets is not None and not scope.writable(table, after_buckets):
            what = "moves the row out of" if before is not None else "puts the row into none of"
            return Rejection(
                Reason.FORBIDDEN_MOVE,
                f"{table}: the write {what} this device's buckets"
                + (" it may write" if after_buckets else ""),
            )
    basis = before_buckets if before is not None else after_buckets
    if basis is not None:
        allowed = scope.columns_in(table, scope.writable(table, basis))
        denied = sorted(c for c in written if c not in allowed)
        if denied:
            return Rejection(
                Reason.FORBIDDEN_COLUMN,
                f"{table}: this device may not write column(s) {', '.join(denied)} of this row",
            )
    if before_buckets is not None and after_buckets is not None and after_buckets != before_buckets:
        gained = scope.columns_in(table, after_buckets) - scope.columns_in(table, before_buckets)
        hidden = sorted(gained - scope.claim_columns(table, after_buckets))
        if hidden:
            return Rejection(
                Reason.FORBIDDEN_MOVE,
                f"{table}: the write would show this device column(s) {', '.join(hidden)} of "
                "the row, which it cannot see now (taking rows over needs claim = true in "
                "the rules)",
            )
    return None
