"""The journal's formats: device entries, rejections, ``_journal`` records, outcomes.

This is the device protocol's contract for edits (docs/journal.md is the reference).  A
device records each local edit as a *journal entry*::

    {"seq": 17, "table": "public.work_orders", "op": "update", "key": [42],
     "old": {"status": "open", "notes": "…"}, "new": {"status": "done"},
     "base": {"commit_lsn": 23456789, "seq": 0},
     "hlc": "0189f3c2a1b0.0003.tablet-7", "prev_seq": null}

- ``seq``: the device's journal sequence number (1, 2, …; strictly increasing per
  device).  ``(device_id, seq)`` identifies an entry; the device id is the token's
  ``sub``, never part of the body.
- ``op``: ``insert`` (``new`` holds the row, key columns included; no ``old``),
  ``update`` (``old`` = the values the device last had, ``new`` = the columns it set;
  every column of ``new`` must be in ``old``), ``delete`` (``old`` only).
- ``key``: the primary-key values in the table's key order (the ``key`` of the ops the
  device received).  Key columns cannot change (delete and insert instead).
- ``key_columns`` (optional): the names of the key columns ``key`` holds values of, as
  the device's schema lists them.  The relay and the applier refuse an entry whose key
  columns are not the table's (``bad_key``): after a change of the table's key, values of
  the old key would otherwise be taken as values of the new one (same arity, another row).
- ``base``: the position ``(commit_lsn, seq)`` of the row version ``old`` came from,
  or null (a row the device created itself and has not seen back yet).
- ``hlc``: the device's hybrid logical clock at the edit (:mod:`core.hlc`); its node
  must be the device id.
- ``prev_seq``: the seq of the device's latest *earlier* entry for the same row that
  had no final outcome yet when this edit was made (so ``old`` came from that entry's
  ``new``), else null.  It drives the ordering rule (``blocked``).

Values are in wire form (:mod:`core.values`).  :func:`entry_from_json` reads one entry's
structure (every number against the ``bigint`` it is stored in); a problem becomes an
:class:`EntryProblem` carrying a :class:`Rejection` with a stable :class:`Reason` and a
message naming the field.  Checking values against column types and the device's write
rights is the relay's (``relay.upstream.validation``).

Kafka records: :class:`JournalRecord` is the value of a ``{prefix}._journal`` record
(the relay writes it, the applier and the replay audit read it); what became of an entry,
the ``{prefix}._outcomes`` records, is :mod:`core.journal_outcomes`.  A record that cannot
be read raises :class:`core.errors.JournalFormatError` naming what is wrong.

Pure: no I/O; values are immutable and can be shared between threads.

The classes the applier makes per entry (:class:`BasePosition`, :class:`JournalEntry`,
:class:`JournalRecord`, and :class:`core.journal_outcomes.Outcome`) are frozen
dataclasses with their ``__init__`` written out (``init=False``): each field is set with
``object.__setattr__``, which mypyc compiles into a plain store (devtools/compiled.py),
where the ``__init__`` the dataclass would generate runs as interpreted code, ~1.5 µs a
construction.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeGuard

import orjson

from core.errors import JournalFormatError
from core.hlc import Hlc
from core.values import ColumnType, dump_json, is_int, same_value, type_name

__all__ = [
    "MAX_BIGINT",
    "MAX_COLUMN_CHARS",
    "MAX_KEY_VALUES",
    "MAX_TABLE_CHARS",
    "RECORD_VERSION",
    "BasePosition",
    "EntryProblem",
    "JournalEntry",
    "JournalRecord",
    "Op",
    "Reason",
    "Rejection",
    "entry_from_json",
    "is_position",
    "is_seq",
    "valid_device_id",
]

RECORD_VERSION: Final = 1
MAX_BIGINT: Final = (1 << 63) - 1
"""The largest ``seq``, ``prev_seq``, ``base.commit_lsn`` and ``base.seq`` (PostgreSQL
``bigint``, where they are stored)."""
MAX_TABLE_CHARS: Final = 300
"""Longest ``table`` of an entry (``schema.table``: two identifiers of at most 63 bytes)."""
MAX_KEY_VALUES: Final = 32
"""Most values of an entry's ``key`` (PostgreSQL's limit of index columns)."""
MAX_COLUMN_CHARS: Final = 128
"""Longest name in an entry's ``key_columns`` (an identifier is at most 63 bytes)."""


def valid_device_id(device_id: object) -> bool:
    """A device id is 1-128 printable characters without whitespace."""
    return (
        isinstance(device_id, str)
        and 0 < len(device_id) <= 128
        and all(ch.isprintable() and not ch.isspace() for ch in device_id)
    )


# --------------------------------------------------------------------------- entries


class Op(enum.StrEnum):
    """What an entry does to its row."""

    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True, order=True, init=False)
class BasePosition:
    """Position ``(commit_lsn, seq)`` of the row version an edit was based on."""

    commit_lsn: int
    seq: int

    def __init__(
        self,
        commit_lsn: int,
        seq: int,
    ) -> None:
        object.__setattr__(self, "commit_lsn", commit_lsn)
        object.__setattr__(self, "seq", seq)

    def to_json(self) -> dict[str, int]:
        return {"commit_lsn": self.commit_lsn, "seq": self.seq}


@dataclass(frozen=True, init=False)
class JournalEntry:
    """One device edit (see the module docstring for the fields)."""

    seq: int
    table: str
    op: Op
    key: tuple[Any, ...]
    old: Mapping[str, Any] | None
    new: Mapping[str, Any] | None
    hlc: Hlc
    base: BasePosition | None = None
    prev_seq: int | None = None
    key_columns: tuple[str, ...] | None = None

    def __init__(
        self,
        seq: int,
        table: str,
        op: Op,
        key: tuple[Any, ...],
        old: Mapping[str, Any] | None,
        new: Mapping[str, Any] | None,
        hlc: Hlc,
        base: BasePosition | None = None,
        prev_seq: int | None = None,
        key_columns: tuple[str, ...] | None = None,
    ) -> None:
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "old", old)
        object.__setattr__(self, "new", new)
        object.__setattr__(self, "hlc", hlc)
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "prev_seq", prev_seq)
        object.__setattr__(self, "key_columns", key_columns)

    def to_json(self) -> dict[str, Any]:
        """The entry as the device sends it (``device_id`` is not part of it)."""
        out: dict[str, Any] = {
            "seq": self.seq,
            "table": self.table,
            "op": self.op.value,
            "key": list(self.key),
            "old": dict(self.old) if self.old is not None else None,
            "new": dict(self.new) if self.new is not None else None,
            "base": self.base.to_json() if self.base is not None else None,
            "hlc": self.hlc.encode(),
            "prev_seq": self.prev_seq,
        }
        if self.key_columns is not None:
            out["key_columns"] = list(self.key_columns)
        return out

    def written_columns(self, types: Mapping[str, ColumnType] | None = None) -> list[str]:
        """Columns the edit sets: for an update those whose new value differs from the
        old one; for an insert every column of ``new``; none for a delete."""
        if self.new is None:
            return []
        if self.op is Op.INSERT or self.old is None:
            return list(self.new)
        types = types or {}
        return [
            c
            for c, v in self.new.items()
            if c not in self.old or not same_value(types.get(c), self.old[c], v)
        ]

    def with_values(
        self, key: Sequence[Any], old: Mapping[str, Any] | None, new: Mapping[str, Any] | None
    ) -> JournalEntry:
        return JournalEntry(
            self.seq,
            self.table,
            self.op,
            tuple(key),
            old,
            new,
            self.hlc,
            self.base,
            self.prev_seq,
            self.key_columns,
        )


class Reason(enum.StrEnum):
    """Stable codes of rejected entries."""

    MALFORMED = "malformed"
    ENTRY_TOO_LARGE = "entry_too_large"
    UNKNOWN_TABLE = "unknown_table"
    UNKNOWN_COLUMN = "unknown_column"
    WRONG_TYPE = "wrong_type"
    BAD_KEY = "bad_key"
    KEY_CHANGE = "key_change"
    MISSING_OLD = "missing_old"
    BAD_HLC = "bad_hlc"
    FORBIDDEN_ROW = "forbidden_row"
    FORBIDDEN_COLUMN = "forbidden_column"
    FORBIDDEN_MOVE = "forbidden_move"
    BLOCKED = "blocked"
    DB_ERROR = "db_error"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True)
class Rejection:
    """Why an entry was refused: a stable :class:`Reason` and a message naming the fault."""

    reason: Reason
    message: str

    def to_json(self) -> dict[str, str]:
        return {"reason": self.reason.value, "message": self.message}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rejection:
        try:
            return cls(Reason(data["reason"]), str(data["message"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise JournalFormatError(f"not a rejection: {data!r:.200}") from exc


def is_seq(value: object) -> TypeGuard[int]:
    """An integer 1..MAX_BIGINT (a journal sequence number)."""
    return is_int(value) and 1 <= value <= MAX_BIGINT


def is_position(value: object) -> TypeGuard[int]:
    """An integer 0..MAX_BIGINT (a part of a change position)."""
    return is_int(value) and 0 <= value <= MAX_BIGINT


def _printable(text: str) -> bool:
    return text.isprintable()


class EntryProblem(Exception):
    """An entry that cannot be read as a :class:`JournalEntry`; ``rejection`` says why.
    Not a failure of the reader: the caller rejects that entry and goes on."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.rejection = Rejection(reason, message)


_OPS: Final = {op.value: op for op in Op}
_ENTRY_KEYS: Final = frozenset(
    {"seq", "table", "op", "key", "old", "new", "base", "hlc", "prev_seq", "key_columns"}
)


def entry_from_json(raw: Any, device_id: str) -> JournalEntry:
    """Read one entry; raises ``EntryProblem`` (malformed / bad_hlc) naming the field."""
    if not isinstance(raw, dict):
        raise EntryProblem(Reason.MALFORMED, "an entry is a JSON object")
    seq = raw.get("seq")
    if not is_seq(seq):
        raise EntryProblem(Reason.MALFORMED, f"seq must be an integer from 1 to {MAX_BIGINT}")
    where = f"entry {seq}"
    if not _ENTRY_KEYS.issuperset(raw):
        unknown = ", ".join(sorted(set(raw) - _ENTRY_KEYS))
        raise EntryProblem(Reason.MALFORMED, f"{where}: unknown field(s) {unknown}")
    table = raw.get("table")
    if not isinstance(table, str) or not 0 < len(table) <= MAX_TABLE_CHARS or not _printable(table):
        raise EntryProblem(
            Reason.MALFORMED,
            f'{where}: table must be "schema.table" (at most {MAX_TABLE_CHARS} printable '
            f"characters), not {table!r:.80}",
        )
    raw_op = raw.get("op")
    op = _OPS.get(raw_op) if isinstance(raw_op, str) else None  # an array is unhashable
    if op is None:
        raise EntryProblem(
            Reason.MALFORMED, f"{where}: op must be insert, update or delete, not {raw.get('op')!r}"
        )
    key = raw.get("key")
    if not isinstance(key, list) or not 0 < len(key) <= MAX_KEY_VALUES:
        raise EntryProblem(
            Reason.MALFORMED,
            f"{where}: key must be an array of 1 to {MAX_KEY_VALUES} values (the primary key's)",
        )
    key_columns = _key_columns(raw.get("key_columns"), len(key), where)
    old, new = raw.get("old"), raw.get("new")
    for name, value, wanted in (
        ("old", old, op is not Op.INSERT),
        ("new", new, op is not Op.DELETE),
    ):
        if wanted and not isinstance(value, dict):
            raise EntryProblem(Reason.MALFORMED, f"{where}: {op.value} needs {name} (an object)")
        if not wanted and value is not None:
            raise EntryProblem(Reason.MALFORMED, f"{where}: {op.value} must not carry {name}")
    base = raw.get("base")
    position = None
    if base is not None:
        if not isinstance(base, dict) or set(base) != {"commit_lsn", "seq"}:
            raise EntryProblem(
                Reason.MALFORMED,
                f"{where}: base must be null or {{commit_lsn, seq}} (integers 0 to {MAX_BIGINT})",
            )
        for part in ("commit_lsn", "seq"):
            if not is_position(base[part]):
                raise EntryProblem(
                    Reason.MALFORMED,
                    f"{where}: base.{part} must be an integer from 0 to {MAX_BIGINT}, not "
                    f"{type_name(base[part])} {base[part]!r:.40}",
                )
        position = BasePosition(base["commit_lsn"], base["seq"])
    prev = raw.get("prev_seq")
    if prev is not None and (not is_int(prev) or not 1 <= prev < seq):
        raise EntryProblem(
            Reason.MALFORMED, f"{where}: prev_seq must be null or an earlier seq of this device"
        )
    try:
        hlc = Hlc.decode(raw.get("hlc"))  # type: ignore[arg-type]
    except ValueError as exc:
        raise EntryProblem(Reason.BAD_HLC, f"{where}: {exc}") from None
    if hlc.node != device_id:
        raise EntryProblem(
            Reason.BAD_HLC,
            f"{where}: the HLC node {hlc.node!r} must be the device id {device_id!r}",
        )
    return JournalEntry(seq, table, op, tuple(key), old, new, hlc, position, prev, key_columns)


def _key_columns(raw: Any, arity: int, where: str) -> tuple[str, ...] | None:
    """An entry's optional ``key_columns``: as many distinct column names as ``key`` values."""
    if raw is None:
        return None
    if (
        not isinstance(raw, list)
        or len(raw) != arity
        or not all(isinstance(c, str) and 0 < len(c) <= MAX_COLUMN_CHARS for c in raw)
        or len(set(raw)) != len(raw)
    ):
        raise EntryProblem(
            Reason.MALFORMED,
            f"{where}: key_columns must be null or an array of {arity} distinct column "
            f"name(s), one for each value of key, not {raw!r:.80}",
        )
    return tuple(raw)


# --------------------------------------------------------------------------- Kafka records


@dataclass(frozen=True, init=False)
class JournalRecord:
    """The value of a ``{prefix}._journal`` record (Kafka key: the device id, UTF-8).

    ``entry`` is None when the upload could not be read as an entry (``rejection`` then
    says why); ``claims`` are the token's claims at upload (the applier recomputes the
    granted buckets from them with its rules).  JSON::

        {"v": 1, "device_id": …, "seq": …, "received_at_us": …, "claims": {…},
         "entry": {…} | null, "rejection": {"reason", "message"} | null}
    """

    device_id: str
    seq: int
    entry: JournalEntry | None
    claims: Mapping[str, Any] = field(default_factory=dict)
    rejection: Rejection | None = None
    received_at_us: int = 0

    def __init__(
        self,
        device_id: str,
        seq: int,
        entry: JournalEntry | None,
        claims: Mapping[str, Any] | None = None,
        rejection: Rejection | None = None,
        received_at_us: int = 0,
    ) -> None:
        object.__setattr__(self, "device_id", device_id)
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "entry", entry)
        object.__setattr__(self, "claims", {} if claims is None else claims)
        object.__setattr__(self, "rejection", rejection)
        object.__setattr__(self, "received_at_us", received_at_us)

    @property
    def kafka_key(self) -> bytes:
        return self.device_id.encode("utf-8")

    def to_bytes(self) -> bytes:
        return dump_json(
            {
                "v": RECORD_VERSION,
                "device_id": self.device_id,
                "seq": self.seq,
                "received_at_us": self.received_at_us,
                "claims": dict(self.claims),
                "entry": self.entry.to_json() if self.entry is not None else None,
                "rejection": self.rejection.to_json() if self.rejection is not None else None,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> JournalRecord:
        """Parse a record; :class:`JournalFormatError` names what is wrong.  An entry
        that no longer parses becomes ``entry=None`` with a ``malformed`` rejection."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise JournalFormatError(f"journal record is not JSON: {exc}") from exc
        if not isinstance(obj, dict) or obj.get("v") != RECORD_VERSION:
            raise JournalFormatError(
                f"journal record has no version {RECORD_VERSION} ('v'): {str(data)[:120]}"
            )
        device_id, seq = obj.get("device_id"), obj.get("seq")
        if not valid_device_id(device_id) or not is_seq(seq):
            raise JournalFormatError(
                "journal record lacks a device_id (1-128 printable characters) or a seq "
                f"(1 to {MAX_BIGINT}): device_id {device_id!r:.60}, seq {seq!r:.40}"
            )
        assert isinstance(device_id, str)
        rejection = Rejection.from_json(obj["rejection"]) if obj.get("rejection") else None
        entry = None
        if obj.get("entry") is not None:
            try:
                entry = entry_from_json(obj["entry"], device_id)
            except EntryProblem as exc:
                rejection = rejection or exc.rejection
            if entry is not None and entry.seq != seq:
                entry = None
                rejection = rejection or Rejection(
                    Reason.MALFORMED, f"entry {seq}: the record's entry carries another seq"
                )
        elif rejection is None:
            rejection = Rejection(Reason.MALFORMED, f"entry {seq}: the record carries no entry")
        claims = obj.get("claims") or {}
        received = obj.get("received_at_us")
        return cls(
            device_id,
            int(seq),
            entry,
            claims if isinstance(claims, dict) else {},
            rejection,
            received if is_position(received) else 0,  # audit only: nonsense counts as unknown
        )
