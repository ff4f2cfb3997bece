"""Incremental re-snapshots: re-reading a table while streaming goes on (pure, no I/O).

Why
---
Some changes give existing rows new values without writing a row change to WAL,
so logical decoding never reports them: ``ALTER TABLE … ADD COLUMN c … DEFAULT x``
(the "missing value" in ``pg_attribute.attmissingval``), a table rewrite by a
volatile default or by ``ALTER COLUMN … TYPE … USING``, and ``ALTER TYPE …
RENAME VALUE`` of an enum.  Consumers would keep the old values forever.  The cdc
daemon detects such changes (:func:`compare_relations` on two Relation messages of
one table, :func:`resnapshot_reasons` on two catalog :class:`TableSignature`\\ s) and
re-reads the table as op ``r`` events, chunk by chunk, while the stream goes on.
Operators can ask for the same (:func:`parse_where` checks their row filter).

Method (DBLog; Debezium's incremental snapshots)
-----------------------------------------------
For each chunk the daemon, on an ordinary connection:

1. commits a *low watermark*: a transactional logical decoding message, prefix
   :data:`WATERMARK_PREFIX`, content :class:`Watermark` (``mark = "low"``);
2. in a REPEATABLE READ transaction started after that commit, reads
   ``pg_current_snapshot()`` (the chunk's snapshot *S*, :class:`Visibility`) and
   ``SELECT … WHERE (pk) > (last key) ORDER BY pk LIMIT n``;
3. commits a *high watermark* (``mark = "high"``).

The rows wait in a :class:`ChunkWindow` (memory: one chunk) while the daemon
reads on in the stream.  A row must not be emitted if a streamed change to its
key is not contained in what the chunk read, since the chunk's rows are placed
after that change and would overwrite it.  So a key is dropped from the window
when a streamed transaction touching it (insert, update — old and new key —,
delete; a truncate drops every key)

- commits between the low and the high watermark (DBLog's rule), or
- commits before the low watermark but is not visible to *S* (WAL order and
  visibility order differ: a transaction's commit record can precede the low
  watermark while the transaction still counts as running in *S*).

Transactions the daemon had already read before the chunk was registered are
checked against *S* as well (:meth:`ChunkWindow.registered_after`): if one is
invisible, the chunk is discarded and read again.  A change whose key cannot be
told (an unsent TOASTed key value, a delete that carries no primary key)
invalidates the chunk, which is read again.

When the stream reaches the high watermark's commit, the remaining rows are
emitted, in key order, at positions ``(H, seq)``: ``H`` is the commit LSN of the
high watermark's transaction (which holds no row change of its own), ``seq``
counts from 0.  That is unique and totally ordered with the stream's positions:
every transaction before it in the stream committed before ``H``, every later
one after.  Each row then holds the state of *S*, which includes every change
of its key that precedes ``H`` (an invisible one would have dropped the key).

Progress (:class:`Progress`: queued requests, jobs and the last key each has
reached) is persisted by the caller atomically with the emitted rows, so a
restarted daemon continues at the last finished chunk.

Concurrency: plain data and functions, used from the daemon's one thread.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from cdc import pgoutput_messages as m
from cdc.errors import SnapshotRequestError

__all__ = [
    "WATERMARK_PREFIX",
    "ChunkWindow",
    "ColumnFacts",
    "Condition",
    "EnumFacts",
    "Job",
    "Progress",
    "RelationDiff",
    "SignalRequest",
    "TableSignature",
    "Visibility",
    "Watermark",
    "WhereClause",
    "WindowState",
    "compare_relations",
    "message_keys",
    "parse_where",
    "resnapshot_reasons",
]

WATERMARK_PREFIX: Final = "fieldsync.snapshot"
"""Prefix of the watermark messages (transactional ``pg_logical_emit_message``)."""

Key = tuple[str, ...]
"""A primary key as the text of each key column (the form pgoutput sends)."""
Row = tuple[str | None, ...]

_XID_SPAN = 1 << 32
_XID_HALF = 1 << 31


# --------------------------------------------------------------------------- visibility


@dataclasses.dataclass(frozen=True, slots=True)
class Visibility:
    """A snapshot as ``pg_current_snapshot()`` prints it: ``xmin:xmax:xip,…`` (64-bit xids).

    pgoutput names transactions by 32-bit xids; :meth:`full_xid` puts one into the
    epoch nearest to ``xmax``.
    """

    xmin: int
    xmax: int
    xip: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str) -> Visibility:
        try:
            xmin, xmax, xip = text.strip().split(":")
            return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))
        except ValueError as exc:
            raise ValueError(f"not a pg_snapshot: {text!r} (expected xmin:xmax:xip,…)") from exc

    def full_xid(self, xid: int) -> int:
        full = (self.xmax & ~(_XID_SPAN - 1)) | (xid & (_XID_SPAN - 1))
        if full - self.xmax > _XID_HALF:
            full -= _XID_SPAN
        elif self.xmax - full > _XID_HALF:
            full += _XID_SPAN
        return full

    def visible(self, xid: int) -> bool:
        """Whether a committed transaction with this (32-bit) xid is visible in the snapshot."""
        full = self.full_xid(xid)
        if full < self.xmin:
            return True
        return full < self.xmax and full not in self.xip


# --------------------------------------------------------------------------- watermarks


@dataclasses.dataclass(frozen=True, slots=True)
class Watermark:
    """Content of a watermark message: which chunk, which end of its window."""

    chunk: str
    mark: str  # "low" | "high"
    table: str = ""

    def to_json(self) -> str:
        return json.dumps({"chunk": self.chunk, "mark": self.mark, "table": self.table})

    @classmethod
    def parse(cls, content: bytes) -> Watermark | None:
        """The watermark in a message's content; None for anything else."""
        try:
            d = json.loads(content)
            chunk, mark = d["chunk"], d["mark"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(chunk, str) or mark not in ("low", "high"):
            return None
        return cls(chunk, mark, str(d.get("table", "")))


class WindowState(enum.Enum):
    WAITING_LOW = "waiting for the low watermark"
    OPEN = "open"
    CLOSED = "closed"
    INVALID = "invalid"


class ChunkWindow:
    """One chunk's rows between its watermarks, and the keys streamed changes drop.

    Feed it, in stream order, every committed change of the chunk's table
    (:meth:`change`, :meth:`truncate`) and the chunk's watermarks (:meth:`watermark`);
    at the high watermark :meth:`remaining` gives the rows to emit.
    """

    def __init__(self, chunk: str, rows: Iterable[tuple[Key, Row]], visibility: Visibility) -> None:
        self.chunk = chunk
        self.rows: dict[Key, Row] = dict(rows)
        self.read = len(self.rows)
        self.visibility = visibility
        self.state = WindowState.WAITING_LOW
        self.dropped = 0
        self.invalid_reason = ""

    def registered_after(self, xids: Iterable[int]) -> int | None:
        """The first of the transactions already read from the stream (before this window
        existed) that the chunk's snapshot does not see, or None.  With one, the chunk may
        hold a row older than a change already sent: discard it and read it again."""
        for xid in xids:
            if not self.visibility.visible(xid):
                return xid
        return None

    def watermark(self, mark: str) -> None:
        if self.state is WindowState.INVALID:
            return
        if mark == "low" and self.state is WindowState.WAITING_LOW:
            self.state = WindowState.OPEN
        elif mark == "high" and self.state is not WindowState.CLOSED:
            # (a high watermark without the low one cannot happen: both commit in order)
            self.state = WindowState.CLOSED

    def _drops(self, xid: int) -> bool:
        if self.state is WindowState.OPEN:
            return True
        return self.state is WindowState.WAITING_LOW and not self.visibility.visible(xid)

    def change(self, xid: int, keys: Sequence[Key] | None) -> None:
        """A committed change of the chunk's table; ``keys`` None when they cannot be told."""
        if not self._drops(xid):
            return
        if keys is None:
            self.invalidate("a change whose primary key was not sent")
            return
        for key in keys:
            if self.rows.pop(key, None) is not None:
                self.dropped += 1

    def truncate(self, xid: int) -> None:
        if self._drops(xid):
            self.dropped += len(self.rows)
            self.rows.clear()

    def invalidate(self, reason: str) -> None:
        if self.state is not WindowState.CLOSED:
            self.state = WindowState.INVALID
            self.invalid_reason = reason
            self.rows.clear()

    def remaining(self) -> list[tuple[Key, Row]]:
        """The rows to emit, in the order read (key order); only once the window closed."""
        if self.state is not WindowState.CLOSED:
            raise ValueError(f"chunk {self.chunk}: window is {self.state.value}, not closed")
        return list(self.rows.items())


def message_keys(
    msg: m.Insert | m.Update | m.Delete, key_positions: Sequence[int]
) -> list[Key] | None:
    """The primary keys a change touches (an update: old and new), or None if one is unknown."""
    tuples: list[m.TupleData] = []
    if isinstance(msg, m.Insert):
        tuples.append(msg.new)
    elif isinstance(msg, m.Update):
        tuples.append(msg.new)
        if msg.old is not None:
            tuples.append(msg.old)
    else:
        tuples.append(msg.old)
    keys: list[Key] = []
    for data in tuples:
        key = []
        for i in key_positions:
            value = data[i] if i < len(data) else None
            if not isinstance(value, str):
                return None
            key.append(value)
        keys.append(tuple(key))
    return keys


# --------------------------------------------------------------------------- DDL detection


@dataclasses.dataclass(frozen=True, slots=True)
class RelationDiff:
    """What changed between two Relation messages of one table (by column name)."""

    added: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    retyped: tuple[str, ...] = ()
    renamed_table: tuple[str, str] | None = None  # (old, new) qualified names

    @property
    def changed(self) -> bool:
        return bool(self.added or self.dropped or self.retyped or self.renamed_table)

    def describe(self) -> str:
        parts = []
        if self.renamed_table:
            parts.append(f"renamed {self.renamed_table[0]} → {self.renamed_table[1]}")
        if self.added:
            parts.append("added " + ", ".join(self.added))
        if self.dropped:
            parts.append("dropped " + ", ".join(self.dropped))
        if self.retyped:
            parts.append("retyped " + ", ".join(self.retyped))
        return "; ".join(parts) or "no column change"


def compare_relations(old: m.Relation, new: m.Relation) -> RelationDiff:
    """Columns added, dropped or retyped (type or modifier) between two Relation messages."""
    before = {c.name: (c.type_oid, c.type_modifier) for c in old.columns}
    after = {c.name: (c.type_oid, c.type_modifier) for c in new.columns}
    renamed = None
    if (old.namespace, old.name) != (new.namespace, new.name):
        renamed = (f"{old.namespace}.{old.name}", f"{new.namespace}.{new.name}")
    return RelationDiff(
        added=tuple(c.name for c in new.columns if c.name not in before),
        dropped=tuple(c.name for c in old.columns if c.name not in after),
        retyped=tuple(
            c.name for c in new.columns if c.name in before and before[c.name] != after[c.name]
        ),
        renamed_table=renamed,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class ColumnFacts:
    """One column in ``pg_attribute``: ``version`` is the xmin of its catalog row, which
    changes whenever an ALTER touches the column."""

    attnum: int
    name: str
    type_oid: int
    typmod: int
    type_name: str
    has_missing: bool
    version: str


@dataclasses.dataclass(frozen=True, slots=True)
class EnumFacts:
    """An enum type some column of the table uses (directly, or through a domain, array,
    range or composite type), with its labels in sort order."""

    oid: int
    name: str
    labels: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class TableSignature:
    """What the catalog says about a published table, as far as values depend on it."""

    oid: int
    schema: str
    table: str
    filenode: int
    columns: tuple[ColumnFacts, ...]
    enums: tuple[EnumFacts, ...] = ()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    def to_json(self) -> dict[str, Any]:
        return {
            "oid": self.oid,
            "schema": self.schema,
            "table": self.table,
            "filenode": self.filenode,
            "columns": [dataclasses.astuple(c) for c in self.columns],
            "enums": [[e.oid, e.name, list(e.labels)] for e in self.enums],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TableSignature:
        return cls(
            oid=int(d["oid"]),
            schema=str(d["schema"]),
            table=str(d["table"]),
            filenode=int(d["filenode"]),
            columns=tuple(
                ColumnFacts(int(a), str(n), int(t), int(tm), str(tn), bool(h), str(v))
                for a, n, t, tm, tn, h, v in d["columns"]
            ),
            enums=tuple(
                EnumFacts(int(o), str(n), tuple(str(x) for x in labels))
                for o, n, labels in d.get("enums", ())
            ),
        )


def resnapshot_reasons(old: TableSignature, new: TableSignature) -> list[str]:
    """Why existing rows of the table may hold values no row event reported (empty: none).

    - a column added with a default: ``atthasmissing`` (every old row reads the default),
      or with a table rewrite (a volatile default);
    - a column whose type changed (a type modifier change only when the table was
      rewritten: ``varchar(20)`` → ``varchar(40)`` keeps every value);
    - a column an ALTER touched while the table was rewritten
      (``ALTER COLUMN … TYPE <same type> USING …``);
    - a renamed column (rows arrive under the new name only with a re-read);
    - an enum label that is gone (``RENAME VALUE``; labels cannot be dropped);
    - a renamed table (its rows go to a new topic).

    A rewrite that touches no column (VACUUM FULL, CLUSTER, TRUNCATE, SET TABLESPACE)
    and a column added without a default (old rows hold NULL, what consumers assume)
    need nothing.
    """
    reasons: list[str] = []
    if (old.schema, old.table) != (new.schema, new.table):
        reasons.append(f"table renamed from {old.qualified} (its rows go to a new topic)")
    rewritten = old.filenode != new.filenode
    before = {c.attnum: c for c in old.columns}
    for col in new.columns:
        was = before.get(col.attnum)
        if was is None:
            if col.has_missing:
                reasons.append(f"column {col.name} added with a default")
            elif rewritten:
                reasons.append(f"column {col.name} added, table rewritten (volatile default)")
            continue
        if was.type_oid != col.type_oid or (was.typmod != col.typmod and rewritten):
            reasons.append(
                f"column {col.name} changed type from {was.type_name} to {col.type_name}"
            )
        elif rewritten and was.version != col.version:
            reasons.append(f"column {col.name} altered with a table rewrite")
        if was.name != col.name:
            reasons.append(f"column {was.name} renamed to {col.name}")
    old_enums = {e.oid: e for e in old.enums}
    for e in new.enums:
        was_enum = old_enums.get(e.oid)
        if was_enum is None:
            continue
        gone = [label for label in was_enum.labels if label not in e.labels]
        if gone:
            reasons.append(f"enum {e.name}: label(s) {', '.join(repr(g) for g in gone)} renamed")
    return reasons


# --------------------------------------------------------------------------- WHERE clauses

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
    bound parameters (``cdc.incremental_snapshot_io``)."""

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


# --------------------------------------------------------------------------- progress


@dataclasses.dataclass(slots=True)
class SignalRequest:
    """A row of the signal table, as read from the stream, not yet checked."""

    signal_id: int
    table: str
    where: str | None
    kind: str = "snapshot"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SignalRequest:
        where = d.get("where")
        return cls(
            int(d["signal_id"]),
            str(d["table"]),
            None if where is None else str(where),
            str(d.get("kind", "snapshot")),
        )


@dataclasses.dataclass(slots=True)
class Job:
    """Re-reading one table (or the rows of it a WHERE clause selects)."""

    oid: int
    table: str  # schema.table
    reason: str
    where: str | None = None  # canonical text of a WhereClause
    after: Key | None = None  # the last key emitted; None: from the start
    chunks: int = 0
    rows: int = 0
    signal_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["after"] = None if self.after is None else list(self.after)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Job:
        after = d.get("after")
        where = d.get("where")
        signal = d.get("signal_id")
        return cls(
            oid=int(d["oid"]),
            table=str(d["table"]),
            reason=str(d["reason"]),
            where=None if where is None else str(where),
            after=None if after is None else tuple(str(v) for v in after),
            chunks=int(d.get("chunks", 0)),
            rows=int(d.get("rows", 0)),
            signal_id=None if signal is None else int(signal),
        )


@dataclasses.dataclass
class Progress:
    """Everything a restarted daemon needs to go on: requests read from the signal table
    but not yet checked, the jobs (the first is running), and the position (commit LSN,
    id) of the last signal taken (signals at or before it are replays)."""

    jobs: list[Job] = dataclasses.field(default_factory=list)
    requests: list[SignalRequest] = dataclasses.field(default_factory=list)
    signal_lsn: int = 0
    signal_id: int = 0  # the last signal taken from the transaction at signal_lsn

    VERSION: Final = 1

    def add(self, job: Job) -> Job:
        """Queue ``job``; a queued job for the same rows starts over instead (its rows may
        have been read before the newer reason)."""
        for queued in self.jobs:
            if queued.oid == job.oid and queued.where == job.where:
                queued.after = None
                queued.table = job.table
                if job.reason not in queued.reason:
                    queued.reason = f"{queued.reason}; {job.reason}"
                return queued
        self.jobs.append(job)
        return job

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "version": self.VERSION,
                "signal_lsn": self.signal_lsn,
                "signal_id": self.signal_id,
                "requests": [r.to_json() for r in self.requests],
                "jobs": [j.to_json() for j in self.jobs],
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Progress:
        d = json.loads(data)
        if d.get("version") != cls.VERSION:
            raise ValueError(f"re-snapshot progress of version {d.get('version')!r}, expected 1")
        return cls(
            jobs=[Job.from_json(j) for j in d.get("jobs", ())],
            requests=[SignalRequest.from_json(r) for r in d.get("requests", ())],
            signal_lsn=int(d.get("signal_lsn", 0)),
            signal_id=int(d.get("signal_id", 0)),
        )


def signatures_to_bytes(signatures: Mapping[int, TableSignature]) -> bytes:
    return json.dumps(
        {"version": 1, "tables": [s.to_json() for _, s in sorted(signatures.items())]},
        sort_keys=True,
    ).encode()


def signatures_from_bytes(data: bytes) -> dict[int, TableSignature]:
    d = json.loads(data)
    if d.get("version") != 1:
        raise ValueError(f"catalog signatures of version {d.get('version')!r}, expected 1")
    return {s.oid: s for s in (TableSignature.from_json(t) for t in d.get("tables", ()))}
