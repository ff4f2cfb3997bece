"""Intake validation of journal entries: the upload, each entry, the ordering rule.

An upload is ``{"entries": [entry, …]}`` (entry format: :mod:`core.journal_format`).

- :func:`parse_upload` reads its structure: the upload as a whole is refused with
  :class:`~relay.errors.UploadError` (HTTP 400) when it is not such an object, an entry
  has no integer ``seq`` or seqs do not strictly increase, and with
  :class:`~relay.errors.BatchTooLarge` (413) beyond :attr:`JournalLimits.max_entries`;
  an entry that cannot be read, or is larger than :attr:`JournalLimits.max_entry_bytes`,
  becomes a :class:`RejectedUpload`.
- :func:`validate_entry` checks an entry against the schema, the column types
  (:func:`core.values.coerce_value`: every value against the range of its PostgreSQL
  type, so nothing accepted here fails later for its size) and the device's write
  rights (:mod:`relay.upstream.write_rules`); it returns the entry with normalized
  values, or a :class:`~core.journal_format.Rejection` naming the table, column or value
  at fault.
- The ordering rule (:func:`blocked_by`): a rejected entry does not block the device's
  other entries.  An entry whose ``prev_seq`` names an entry that was rejected (or
  itself blocked) is rejected as ``blocked``: it was made on top of an edit the server
  refused.  Entries of other rows, and entries of the same row without that dependency,
  are applied normally.

The relay's intake runs all three; the applier runs :func:`validate_entry` (without the
row check: it judges writes against the server's row) and :func:`blocked_by` again.

Pure: no I/O; safe to call from any thread.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from core.journal_format import (
    MAX_BIGINT,
    EntryProblem,
    JournalEntry,
    Op,
    Reason,
    Rejection,
    entry_from_json,
    is_seq,
)
from core.values import ColumnType, coerce_value, same_value, type_name
from relay.downstream.rules import Rules, TableInfo
from relay.errors import BatchTooLarge, UploadError
from relay.upstream.write_rules import WriteScope, check_write

__all__ = [
    "BLOCKING_OUTCOMES",
    "JournalLimits",
    "RejectedUpload",
    "blocked_by",
    "key_columns_behind",
    "known_columns",
    "parse_upload",
    "validate_entry",
]


# --------------------------------------------------------------------------- the upload


@dataclass(frozen=True)
class JournalLimits:
    """Upload limits: entries per upload (more: :class:`BatchTooLarge`, HTTP 413) and the
    JSON size of one entry (more: that entry is rejected as ``entry_too_large``)."""

    max_entries: int = 500
    max_entry_bytes: int = 262_144


@dataclass(frozen=True)
class RejectedUpload:
    """An entry of an upload that could not be read as a :class:`JournalEntry`."""

    seq: int
    rejection: Rejection


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def parse_upload(
    body: Any, device_id: str, limits: JournalLimits = JournalLimits()
) -> list[JournalEntry | RejectedUpload]:
    """Read an upload ``{"entries": [entry, …]}`` (parsed JSON) of device ``device_id``.

    Entries whose structure is wrong become :class:`RejectedUpload` (``malformed``,
    ``entry_too_large``, ``bad_hlc``); the upload as a whole is refused with
    :class:`UploadError` when it is not such an object, an entry has no integer ``seq``,
    or seqs do not strictly increase, and with :class:`BatchTooLarge` when it holds more
    than ``limits.max_entries`` entries.
    """
    if not isinstance(body, dict) or not isinstance(body.get("entries"), list):
        raise UploadError('an upload is a JSON object {"entries": [entry, ...]}')
    raw_entries: list[Any] = body["entries"]
    if len(raw_entries) > limits.max_entries:
        raise BatchTooLarge(
            f"the upload holds {len(raw_entries)} entries; at most {limits.max_entries} "
            "are accepted at once (send the rest in another upload)"
        )
    out: list[JournalEntry | RejectedUpload] = []
    last = 0
    for i, raw in enumerate(raw_entries):
        seq = raw.get("seq") if isinstance(raw, dict) else None
        if not is_seq(seq):
            raise UploadError(
                f"entries[{i}] has no seq (an integer from 1 to {MAX_BIGINT}): "
                f"{'none' if seq is None else type_name(seq)} {seq!r:.40}"
            )
        assert isinstance(seq, int)
        if seq <= last:
            raise UploadError(
                f"entries[{i}]: seq {seq} does not follow seq {last}; seqs must strictly increase"
            )
        last = seq
        size = _json_size(raw)
        if size > limits.max_entry_bytes:
            out.append(
                RejectedUpload(
                    seq,
                    Rejection(
                        Reason.ENTRY_TOO_LARGE,
                        f"entry {seq} is {size} bytes of JSON; at most {limits.max_entry_bytes}",
                    ),
                )
            )
            continue
        try:
            out.append(entry_from_json(raw, device_id))
        except EntryProblem as exc:
            out.append(RejectedUpload(seq, exc.rejection))
    return out


# --------------------------------------------------------------------------- entries


def validate_entry(
    entry: JournalEntry, scope: WriteScope, *, check_rows: bool = True
) -> tuple[JournalEntry, Rejection | None]:
    """Check an entry against the schema, the column types and the device's rules.

    Returns the entry with normalized values (:func:`coerce_value`) and None, or the
    entry unchanged and the :class:`Rejection`.  With ``check_rows`` the permission
    check uses the device's ``old`` values as the row before the write (the intake); the
    applier passes False and checks with the server's row instead.
    """
    try:
        normalized, written = _normalized(entry, scope, check_rows)
    except EntryProblem as exc:
        return entry, exc.rejection
    if not check_rows:
        return normalized, None
    old, new = normalized.old, normalized.new
    before = dict(old) if old is not None else None
    after = None if entry.op is Op.DELETE else {**(old or {}), **(new or {})}
    problem = check_write(scope, entry.table, before, after, written)
    if problem is not None:
        return entry, Rejection(problem.reason, f"entry {entry.seq}: {problem.message}")
    return normalized, None


def key_columns_behind(items: Sequence[JournalEntry | RejectedUpload], rules: Rules) -> str | None:
    """A message when an entry names its row by other key columns than ``rules`` give
    its table, else None.  At intake this is not the entry's fault: this relay or the
    device has not yet read the table's new definition (each reads it again shortly), so
    the upload is refused for now rather than the entry rejected for good."""
    for item in items:
        if not isinstance(item, JournalEntry) or item.key_columns is None:
            continue
        if item.table not in rules.tables:
            continue
        ours = rules.table_info(item.table).key
        if item.key_columns != ours:
            return (
                f"entry {item.seq} ({item.table}) names its row by "
                f"({', '.join(item.key_columns)}); this relay's schema has the key "
                f"({', '.join(ours)}): one of the two has not read the table's new definition "
                "yet; sync again (the schema first), the entries are kept"
            )
    return None


def _normalized(
    entry: JournalEntry, scope: WriteScope, check_rows: bool
) -> tuple[JournalEntry, list[str]]:
    """The entry with normal values and the columns it writes; :class:`EntryProblem`
    when the table, a column, a value or the key is wrong, or a column is hidden."""
    table = entry.table
    if table not in scope.visible_tables:
        raise EntryProblem(
            Reason.UNKNOWN_TABLE, f"entry {entry.seq}: {table!r} is not a table this device syncs"
        )
    info = scope.table_info(table)
    types = scope.types.get(table)
    where = f"entry {entry.seq} ({table})"
    if entry.key_columns is not None and entry.key_columns != info.key:
        raise EntryProblem(
            Reason.BAD_KEY,
            f"{where}: the key names the row by ({', '.join(entry.key_columns)}); the "
            f"table's key is ({', '.join(info.key)}) (the table's key changed: the device "
            "renames its rows when it syncs the new schema)",
        )
    if len(entry.key) != len(info.key):
        raise EntryProblem(
            Reason.BAD_KEY,
            f"{where}: key has {len(entry.key)} value(s); the primary key is ({', '.join(info.key)})",
        )
    key = [_coerce(types, c, v, where + " key") for c, v in zip(info.key, entry.key, strict=True)]
    known_old, known_new = known_columns(entry.op, info.columns, entry.old, entry.new, where)
    new = _coerce_row(types, info, known_new, where + " new")
    # the applier needs the old values of the written columns only (and all of them
    # for a delete: a server change to any of them is a delete-vs-update conflict)
    needed = None if check_rows or new is None else set(new) | set(info.key)
    old = _coerce_row(types, info, known_old, where + " old", needed)
    _check_key_columns(types, info, key, old, new, where)
    _check_shape(entry.op, info, old, new, where)
    normalized = entry.with_values(key, old, new)
    visible = scope.visible_tables[table]
    written = normalized.written_columns(types)
    hidden = sorted(c for c in written if c not in visible)
    if hidden:
        raise EntryProblem(
            Reason.FORBIDDEN_COLUMN,
            f"{where}: this device may not write column(s) {', '.join(hidden)}",
        )
    return normalized, written


def _check_key_columns(
    types: Mapping[str, ColumnType] | None,
    info: TableInfo,
    key: Sequence[Any],
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    where: str,
) -> None:
    """Key columns given in ``old`` or ``new`` must equal the key (they cannot change)."""
    for name, values in (("old", old), ("new", new)):
        for column, wanted in zip(info.key, key, strict=True):
            if values is None or column not in values:
                continue
            if same_value(types.get(column) if types else None, values[column], wanted):
                continue
            if name == "old":
                raise EntryProblem(Reason.BAD_KEY, f"{where}: old.{column} differs from the key")
            raise EntryProblem(
                Reason.KEY_CHANGE,
                f"{where}: new.{column} differs from the key; key columns cannot change "
                "(delete the row and insert a new one)",
            )


def _check_shape(
    op: Op,
    info: TableInfo,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    where: str,
) -> None:
    """An insert sets every key column; an update sends the old value of each column it sets."""
    if op is Op.INSERT:
        assert new is not None
        missing = [c for c in info.key if c not in new]
        if missing:
            raise EntryProblem(
                Reason.BAD_KEY,
                f"{where}: an insert must set the key column(s) {', '.join(missing)}",
            )
    if op is Op.UPDATE:
        assert old is not None and new is not None
        lacking = sorted(c for c in new if c not in old)
        if lacking:
            raise EntryProblem(
                Reason.MISSING_OLD,
                f"{where}: old lacks {', '.join(lacking)}: send the value each written column "
                "had before the edit",
            )


def _coerce(types: Mapping[str, ColumnType] | None, column: str, value: Any, where: str) -> Any:
    if types is None or column not in types:
        return value
    ct = types[column]
    try:
        return coerce_value(ct, value)
    except ValueError as exc:
        raise EntryProblem(
            Reason.WRONG_TYPE,
            f"{where}: {column} ({ct.describe()}): {exc}, got {type_name(value)} {value!r:.60}",
        ) from None


def known_columns(
    op: Op,
    columns: Sequence[str],
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    where: str,
) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
    """``old`` and ``new`` without the columns the table does not have (any more: a
    column dropped or renamed on the server after the edit was made), as long as the
    entry does not change them: in ``old`` they are ignored; in ``new`` when an update
    gives the value ``old`` has (the same JSON value) or an insert gives null.  An entry
    that changes such a column is refused as ``unknown_column``, naming it (its edit
    cannot be applied)."""
    have = _column_set(tuple(columns))
    if (old is None or have.issuperset(old)) and (new is None or have.issuperset(new)):
        return old, new
    changed: list[str] = []
    if new is not None:
        for c, v in new.items():
            if c in have:
                continue
            if op is Op.UPDATE and old is not None and c in old and _same_json(old[c], v):
                continue
            if op is Op.INSERT and v is None:
                continue
            changed.append(c)
    if changed:
        named = ", ".join(repr(c) for c in sorted(changed))
        raise EntryProblem(
            Reason.UNKNOWN_COLUMN,
            f"{where}: new changes {named}, which the table does not have (dropped or "
            "renamed on the server): the edit cannot be applied",
        )
    return (
        None if old is None else {c: v for c, v in old.items() if c in have},
        None if new is None else {c: v for c, v in new.items() if c in have},
    )


def _same_json(a: Any, b: Any) -> bool:
    """Whether two JSON values are the same value (``true`` is not ``1``, ``1`` is not
    ``1.0``: the column's type is unknown)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_json(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@functools.lru_cache(maxsize=1024)
def _column_set(columns: tuple[str, ...]) -> frozenset[str]:
    return frozenset(columns)


def _coerce_row(
    types: Mapping[str, ColumnType] | None,
    info: TableInfo,
    row: Mapping[str, Any] | None,
    where: str,
    only: set[str] | None = None,
) -> dict[str, Any] | None:
    """The row with its values normalized (``only``: just those columns, the others as
    they are); unknown columns are refused (:func:`known_columns` has left out those an
    entry may name)."""
    if row is None:
        return None
    columns = info.columns
    if not _column_set(columns).issuperset(row):
        unknown = ", ".join(repr(c) for c in sorted(c for c in row if c not in columns))
        raise EntryProblem(Reason.UNKNOWN_COLUMN, f"{where}: no column(s) {unknown}")
    if only is None:
        return {c: _coerce(types, c, v, where) for c, v in row.items()}
    return {c: _coerce(types, c, v, where) if c in only else v for c, v in row.items()}


# --------------------------------------------------------------------------- ordering


BLOCKING_OUTCOMES: Final = frozenset({"rejected"})


def blocked_by(
    entry: JournalEntry, outcome_of: Callable[[int], tuple[str, str | None] | None]
) -> Rejection | None:
    """The ordering rule: ``blocked`` if ``entry.prev_seq`` names an entry whose outcome
    (``outcome_of(seq)`` → ``(kind, reason)``, None if unknown) was a rejection, the
    ``blocked`` ones included.  Unknown or absent ``prev_seq``: not blocked."""
    if entry.prev_seq is None:
        return None
    found = outcome_of(entry.prev_seq)
    if found is None or found[0] not in BLOCKING_OUTCOMES:
        return None
    return Rejection(
        Reason.BLOCKED,
        f"entry {entry.seq} was made on top of entry {entry.prev_seq}, which was rejected "
        f"({found[1] or 'rejected'})",
    )
