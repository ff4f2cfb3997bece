"""Validating one table entry of a bucket rule (``[[bucket.table]]`` of a rules file).

:class:`TableEntryParser` checks an entry's table (against the schema, when one is
given), its ``match`` of columns to the bucket's parameters, its fixed ``filters`` (values
of date and time columns are written as ISO text and compiled to the change events'
integers), its projection (``columns`` or ``exclude``) and its write options, and
compiles it into a :class:`relay.downstream.rules.TableRule`.  Every problem is collected
(:class:`relay.config_file.ProblemCollector`) under the entry's scope, e.g.
``bucket 'tech' table 'public.work_orders'``; the document and bucket level is
:class:`relay.downstream.rules_parser.RulesParser`.

Pure: the parser walks an already parsed mapping; one parser serves one parse, in one
thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from core.settings_checks import close_match_hint
from relay.config_file import ProblemCollector, listing, toml_kind
from relay.downstream.rules import Filter, TableInfo, TableRule, canonical_text, temporal_value

OPERATORS: Final[tuple[str, ...]] = ("=", "!=", "in", "not in", "is null", "is not null")
_NULL_OPS: Final = frozenset({"is null", "is not null"})
_LIST_OPS: Final = frozenset({"in", "not in"})
_TABLE_KEYS: Final = ("table", "match", "filters", "columns", "exclude", "writable", "claim")
_FILTER_KEYS: Final = ("column", "op", "value")
_TEMPORAL_EXAMPLES: Final = {
    "date": '"2024-05-01"',
    "time": '"08:30:00"',
    "timestamp": '"2024-05-01T08:30:00"',
    "timestamptz": '"2024-05-01T08:30:00Z"',
}


class TableEntryParser(ProblemCollector):
    """Compiles table entries of one rules file, checked against ``schema`` when given."""

    def __init__(self, source: str, schema: Mapping[str, TableInfo] | None) -> None:
        super().__init__(source)
        self.schema = schema

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
            self.problem(
                scope, "table", f'must be a string ("schema.table"), not a {toml_kind(name)}'
            )
        else:
            scope = f"{bucket_scope} table {name!r}"
            if self.schema is not None:
                info = self.schema.get(name)
                if info is None:
                    self.problem(
                        scope,
                        "table",
                        f"{name!r} is not a known table{close_match_hint(name, self.schema)}",
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
                scope,
                key,
                f"{column!r} is not a column of {table}{close_match_hint(column, info.columns)}",
            )
            return False
        return True

    def match(
        self, scope: str, raw: object, parameters: list[str], table: str, info: TableInfo | None
    ) -> tuple[tuple[str, str], ...]:
        if not isinstance(raw, dict):
            self.problem(
                scope, "match", f'must be a table (column = "parameter"), not a {toml_kind(raw)}'
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
                hint = close_match_hint(parameter, parameters) if isinstance(parameter, str) else ""
                self.problem(
                    scope,
                    key,
                    f"{parameter!r} is not a parameter of this bucket{hint} (parameters: {listing(parameters)})",
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
                f"must be an array of {{ column, op, value }} tables, not a {toml_kind(raw)}",
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
            self.problem(
                scope, key, f"must be a table {{ column, op, value }}, not a {toml_kind(raw)}"
            )
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
                    f"must be a string, integer or boolean, not a {toml_kind(item)} ({item!r})",
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
            self.problem(scope, key, f"must be an array of column names, not a {toml_kind(raw)}")
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
