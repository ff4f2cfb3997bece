"""The row filter of an operator's re-snapshot request: a restricted WHERE form (pure).

``fieldsync cdc snapshot --table T --where …`` and the signal table's ``where_clause`` take a
WHERE clause of conditions joined by AND (no OR, no functions, no sub-queries).
:func:`parse_where` turns it into a :class:`WhereClause` or raises
:class:`~cdc.errors.SnapshotRequestError` naming what is wrong and where.  A clause is never
pasted into SQL: its columns become quoted identifiers and its values bound parameters
(``cdc.resnapshot_requests.where_sql``); :meth:`WhereClause.text` is its canonical text, as
kept in the re-snapshot progress.

Concurrency: plain data and functions.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Final

from cdc.errors import SnapshotRequestError

__all__ = [
    "MAX_IN_VALUES",
    "MAX_WHERE_CHARS",
    "OPERATORS",
    "Condition",
    "WhereClause",
    "parse_where",
]

OPERATORS: Final = ("=", "<>", "<", "<=", ">", ">=", "is null", "is not null", "in", "not in")
OPERATORS_TEXT: Final = "=, <>, !=, <, <=, >, >=, IS [NOT] NULL, [NOT] IN (…), BETWEEN … AND …"
MAX_WHERE_CHARS: Final = 4000
MAX_IN_VALUES: Final = 1000

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>'(?:[^']|'')*')
    | (?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<qident>"(?:[^"]|"")+")
    | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
    | (?P<op><=|>=|<>|!=|=|<|>)
    | (?P<punct>[(),])
    )""",
    re.VERBOSE,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    """``column op values``; values are literal texts PostgreSQL converts to the column's
    type (``between`` has two, ``in``/``not in`` one or more, ``is [not] null`` none)."""

    column: str
    op: str
    values: tuple[str, ...] = ()

    def text(self) -> str:
        col = '"' + self.column.replace('"', '""') + '"'
        lits = ["'" + v.replace("'", "''") + "'" for v in self.values]
        if self.op in ("is null", "is not null"):
            return f"{col} {self.op.upper()}"
        if self.op in ("in", "not in"):
            return f"{col} {self.op.upper()} ({', '.join(lits)})"
        if self.op == "between":
            return f"{col} BETWEEN {lits[0]} AND {lits[1]}"
        return f"{col} {self.op} {lits[0]}"


@dataclasses.dataclass(frozen=True, slots=True)
class WhereClause:
    """A restricted WHERE clause: conditions joined by AND (no OR, no functions, no
    sub-queries).  Never pasted into SQL: columns become quoted identifiers and values
    bound parameters (``cdc.resnapshot_requests.where_sql``)."""

    conditions: tuple[Condition, ...]

    def text(self) -> str:
        return " AND ".join(c.text() for c in self.conditions)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.column for c in self.conditions))


class _Tokens:
    def __init__(self, text: str) -> None:
        self.text = text
        self.items: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            match = _TOKEN.match(text, pos)
            if match is None or match.lastgroup is None:
                start = pos + (len(text[pos:]) - len(text[pos:].lstrip()))
                raise SnapshotRequestError(
                    f"WHERE clause: unexpected {text[start : start + 12]!r} at character {start + 1}"
                )
            kind = match.lastgroup
            self.items.append((kind, match.group(kind), match.start(kind) + 1))
            pos = match.end()
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.items[self.i] if self.i < len(self.items) else None

    def take(self) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            raise SnapshotRequestError(f"WHERE clause: {self.text!r} ends too early")
        self.i += 1
        return token

    def keyword(self, *words: str) -> bool:
        token = self.peek()
        if token is not None and token[0] == "word" and token[1].lower() in words:
            self.i += 1
            return True
        return False

    def expect(self, value: str, what: str) -> None:
        _kind, text, at = self.take()
        if text.lower() != value:
            raise SnapshotRequestError(
                f"WHERE clause: expected {what} at character {at}, found {text!r}"
            )


def _column(tokens: _Tokens) -> str:
    kind, text, at = tokens.take()
    if kind == "qident":
        return text[1:-1].replace('""', '"')
    if kind == "word" and text.lower() not in ("and", "or", "not", "is", "null", "in"):
        return text.lower()  # unquoted identifiers fold to lower case, as in SQL
    raise SnapshotRequestError(
        f"WHERE clause: expected a column name at character {at}, found {text!r}"
    )


def _literal(tokens: _Tokens) -> str:
    kind, text, at = tokens.take()
    if kind == "string":
        return text[1:-1].replace("''", "'")
    if kind == "number":
        return text
    if kind == "word" and text.lower() in ("true", "false"):
        return text.lower()
    raise SnapshotRequestError(
        f"WHERE clause: expected a value ('text', a number, true or false) at character {at}, "
        f"found {text!r}"
    )


def _condition(tokens: _Tokens) -> Condition:
    column = _column(tokens)
    if tokens.keyword("is"):
        negated = tokens.keyword("not")
        tokens.expect("null", "NULL")
        return Condition(column, "is not null" if negated else "is null")
    negated = tokens.keyword("not")
    if tokens.keyword("in"):
        tokens.expect("(", "'('")
        values = [_literal(tokens)]
        while True:
            kind, text, at = tokens.take()
            if text == ")":
                break
            if text != ",":
                raise SnapshotRequestError(
                    f"WHERE clause: expected ',' or ')' at character {at}, found {text!r}"
                )
            values.append(_literal(tokens))
        if len(values) > MAX_IN_VALUES:
            raise SnapshotRequestError(
                f"WHERE clause: IN list of {column} has more than {MAX_IN_VALUES} values"
            )
        return Condition(column, "not in" if negated else "in", tuple(values))
    if negated:
        token = tokens.peek()
        at = token[2] if token else len(tokens.text)
        raise SnapshotRequestError(f"WHERE clause: expected IN after NOT at character {at}")
    if tokens.keyword("between"):
        low = _literal(tokens)
        tokens.expect("and", "AND")
        return Condition(column, "between", (low, _literal(tokens)))
    kind, text, at = tokens.take()
    if kind != "op":
        raise SnapshotRequestError(
            f"WHERE clause: expected an operator ({OPERATORS_TEXT}) after {column!r} at "
            f"character {at}, found {text!r}"
        )
    return Condition(column, "<>" if text == "!=" else text, (_literal(tokens),))


def parse_where(text: str) -> WhereClause:
    """Parse the restricted WHERE form; :class:`SnapshotRequestError` names what is wrong.

    Grammar (keywords in any case)::

        clause    := condition ( AND condition )*
        condition := column op value | column IS [NOT] NULL
                   | column [NOT] IN ( value, … ) | column BETWEEN value AND value
        op        := = | <> | != | < | <= | > | >=
        column    := name | "quoted name"
        value     := 'text' ('' for a quote) | number | TRUE | FALSE
    """
    if len(text) > MAX_WHERE_CHARS:
        raise SnapshotRequestError(f"WHERE clause: longer than {MAX_WHERE_CHARS} characters")
    tokens = _Tokens(text)
    if tokens.peek() is None:
        raise SnapshotRequestError("WHERE clause: empty")
    conditions = [_condition(tokens)]
    while tokens.peek() is not None:
        if tokens.keyword("and"):
            conditions.append(_condition(tokens))
            continue
        _kind, word, at = tokens.take()
        hint = (
            " (OR is not supported: send one request per alternative)"
            if word.lower() == "or"
            else ""
        )
        raise SnapshotRequestError(
            f"WHERE clause: expected AND or the end at character {at}, found {word!r}{hint}"
        )
    return WhereClause(tuple(conditions))
