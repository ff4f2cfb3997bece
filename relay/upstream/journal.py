"""Device journal entries: model, JSON forms, column types, validation, ordering rule.

A device records each local edit as a *journal entry* (docs/journal.md is the
reference for clients)::

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
- ``base``: the position ``(commit_lsn, seq)`` of the row version ``old`` came from,
  or null (a row the device created itself and has not seen back yet).
- ``hlc``: the device's hybrid logical clock at the edit (:mod:`core.hlc`); its node
  must be the device id.
- ``prev_seq``: the seq of the device's latest *earlier* entry for the same row that
  had no final outcome yet when this edit was made (so ``old`` came from that entry's
  ``new``), else null.  It drives the ordering rule below.

Values are in the JSON form the device received them in (docs/events.md type table,
``relay.downstream.bucket_store.json_value``): dates as days, times and timestamps as µs,
decimals as exact text, bytes as base64, json as its text, intervals as
``{"months", "days", "micros"}``, infinities as ``"INFINITY"``/``"NEG_INFINITY"``.
:class:`~core.envelope_schema.ColumnType` describes a column (derived from the Avro schemas
cdc publishes, :func:`core.envelope_schema.column_types_from_schemas`); :func:`coerce_value` checks and normalizes a value,
:func:`to_pg_text` turns it into PostgreSQL's input text, :func:`to_datum` into the
decoded-Avro form the rules compare.

Validation (:func:`parse_upload`, :func:`validate_entry`, :func:`check_write`) gives
each refused entry a :class:`Rejection` with a stable ``reason`` (:class:`Reason`) and a
message naming the table, column or value at fault.  Every number is checked against the
range of the column that keeps it (``seq`` and ``base`` against ``bigint``, values
against their PostgreSQL type), so nothing accepted here fails later for its size.
Write permission: a device may write a row only if the row, before and after the write,
is in one of the buckets its token grants whose rule is ``writable`` for the table, and
only columns such a bucket shows; a write that would move a row out of all of them is
refused (``forbidden_move``), and so is one that would show the device columns of the
row it cannot see now, unless a ``claim`` rule of the row's new buckets allows it.

Ordering rule: a rejected entry does not block the device's other entries.  An entry
whose ``prev_seq`` names an entry that was rejected (or itself blocked) is rejected as
``blocked``: it was made on top of an edit the server refused (:func:`blocked_by`).
Entries of other rows, and entries of the same row without that dependency, are
applied normally.

Everything here is pure; values are immutable and can be shared between threads.
:class:`WriteScope` memoizes placements (plain dict writes, safe under the GIL).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any, Final, TypeGuard

import orjson

from core.envelope_schema import ColumnType, Kind
from core.envelope_schema import label_base as _label_base
from core.hlc import Hlc
from relay.auth import valid_device_id
from relay.downstream.rules import Rules, TableInfo, TableRule, canonical_text, parse_bucket_id
from relay.errors import BatchTooLarge, JournalFormatError, RelayError, RowError, UploadError  # noqa: F401 (re-exported)

__all__ = [
    "RECORD_VERSION",
    "BasePosition",
    "BatchTooLarge",
    "JournalEntry",
    "JournalFormatError",
    "JournalLimits",
    "JournalRecord",
    "Op",
    "Outcome",
    "OutcomeKind",
    "Reason",
    "Rejection",
    "UploadError",
    "WriteScope",
    "blocked_by",
    "check_write",
    "coerce_value",
    "decode_outcomes",
    "dump_json",
    "encode_outcomes",
    "parse_upload",
    "same_value",
    "to_datum",
    "to_pg_text",
    "validate_entry",
]

RECORD_VERSION: Final = 1
MAX_BIGINT: Final = (1 << 63) - 1
"""The largest ``seq``, ``prev_seq``, ``base.commit_lsn`` and ``base.seq`` (PostgreSQL
``bigint``, where they are stored)."""
MAX_TABLE_CHARS: Final = 300
"""Longest ``table`` of an entry (``schema.table``: two identifiers of at most 63 bytes)."""
MAX_KEY_VALUES: Final = 32
"""Most values of an entry's ``key`` (PostgreSQL's limit of index columns)."""

_SPECIAL_INF: Final = ("INFINITY", "NEG_INFINITY")
_NUMERIC_SPECIAL: Final = {
    "NAN": "NAN",
    "NaN": "NAN",
    "INFINITY": "INFINITY",
    "Infinity": "INFINITY",
    "NEG_INFINITY": "NEG_INFINITY",
    "-Infinity": "NEG_INFINITY",
}
_NUMERIC_PG_TEXT: Final = {"NAN": "NaN", "INFINITY": "Infinity", "NEG_INFINITY": "-Infinity"}
_FLOAT_SPECIAL: Final = ("NaN", "Infinity", "-Infinity")
_MICROS_PER_DAY: Final = 86_400_000_000
_DATE_MIN_DAYS: Final = -2_440_588  # 4714-11-24 BC, PostgreSQL's first date
_DATE_MAX_DAYS: Final = 2_145_031_948  # 5874897-12-31
_NUMERIC_MAX_WEIGHT_DIGITS: Final = 131_072
_NUMERIC_MAX_SCALE: Final = 16_383
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_DECIMAL_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\Z")


# --------------------------------------------------------------------------- values


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: object) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _decimal_of(value: object) -> Decimal:
    if _is_int(value):
        return Decimal(value)
    if isinstance(value, float) and math.isfinite(value):
        return Decimal(repr(value))
    if isinstance(value, str) and _DECIMAL_TEXT.match(value.strip()):
        return Decimal(value.strip())
    raise ValueError('expected a decimal number as text (e.g. "12.50") or an integer')


def coerce_value(ct: ColumnType, value: Any) -> Any:
    """Check ``value`` against the column type and return its normal wire form.

    ``None`` (SQL NULL) is always accepted here (NOT NULL is PostgreSQL's to enforce).
    Raises ``ValueError`` with a message saying what was expected.
    """
    if value is None:
        return None
    kind = ct.kind
    if kind is Kind.BOOL:
        if isinstance(value, bool):
            return value
        raise ValueError("expected true or false")
    if kind is Kind.INT:
        if not _is_int(value):
            raise ValueError("expected an integer")
        low, high = -(1 << (ct.bits - 1)), (1 << (ct.bits - 1)) - 1
        if ct.pg_type == "oid":
            low, high = 0, (1 << 32) - 1
        if not low <= value <= high:
            raise ValueError(f"integer out of range {low}..{high}")
        return value
    if kind is Kind.FLOAT:
        if isinstance(value, str) and value in _FLOAT_SPECIAL:
            return value
        return _float_in_range(ct, value)
    if kind is Kind.DECIMAL:
        if isinstance(value, str) and value in _NUMERIC_SPECIAL:
            return _NUMERIC_SPECIAL[value]
        return _quantized(ct, _numeric_in_range(_decimal_of(value)))
    if kind is Kind.NUMERIC:
        if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
            return value
        if isinstance(value, str) and value in _NUMERIC_SPECIAL:
            return _NUMERIC_PG_TEXT[_NUMERIC_SPECIAL[value]]
        number = _numeric_in_range(_decimal_of(value))
        return value.strip() if isinstance(value, str) else format(number, "f")
    if kind is Kind.TEXT:
        if isinstance(value, str):
            if "\x00" in value:
                raise ValueError("text cannot contain NUL characters")
            return value
        raise ValueError("expected a string")
    if kind is Kind.JSON:
        if not isinstance(value, str):
            raise ValueError("expected the JSON document as a string (its text)")
        if "\x00" in value:
            raise ValueError("JSON text cannot contain NUL characters")
        try:
            json.loads(value)
        except ValueError as exc:
            raise ValueError(f"expected JSON text ({exc})") from None
        if _label_base(ct.pg_type) == "jsonb" and _NUL_ESCAPE.search(value):
            raise ValueError("jsonb cannot hold the character \\u0000")
        return value
    if kind is Kind.UUID:
        if not isinstance(value, str):
            raise ValueError("expected a UUID string")
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise ValueError("expected a UUID string") from None
    if kind is Kind.BYTES:
        if not isinstance(value, str):
            raise ValueError("expected base64 text")
        try:
            return base64.b64encode(base64.b64decode(value, validate=True)).decode("ascii")
        except (binascii.Error, ValueError):
            raise ValueError("expected base64 text") from None
    if kind is Kind.DATE:
        return _coerce_special_or_int(
            value, "days since 1970-01-01", _DATE_MIN_DAYS, _DATE_MAX_DAYS
        )
    if kind is Kind.TIME:
        if _is_int(value) and 0 <= value <= _MICROS_PER_DAY:
            return value
        raise ValueError(f"expected microseconds after midnight (0..{_MICROS_PER_DAY})")
    if kind in (Kind.TIMESTAMP, Kind.TIMESTAMPTZ):
        return _coerce_special_or_int(
            value,
            "microseconds since 1970-01-01",
            _DATE_MIN_DAYS * _MICROS_PER_DAY,
            (1 << 63) - 1,
        )
    if kind is Kind.INTERVAL:
        return _coerce_interval(value)
    if kind is Kind.ARRAY:
        if isinstance(value, str):
            return value  # the PostgreSQL array literal form (lower bounds other than 1)
        if not isinstance(value, list):
            raise ValueError("expected an array")
        assert ct.element is not None
        return _coerce_array(ct.element, value, 1)
    raise ValueError(f"unsupported column kind {kind}")  # pragma: no cover


def _float_in_range(ct: ColumnType, value: Any) -> float:
    """A finite JSON number that the column's ``real`` / ``double precision`` can hold
    (PostgreSQL refuses values that overflow, and non-zero ones that round to zero)."""
    if not (_is_int(value) or isinstance(value, float)):
        raise ValueError('expected a number (or "NaN", "Infinity", "-Infinity")')
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"number out of range for {ct.describe()}")
    if ct.bits == 32:
        try:
            narrow = struct.unpack("<f", struct.pack("<f", number))[0]
        except OverflowError:
            raise ValueError(f"number out of range for {ct.describe()}") from None
        if narrow == 0.0 and number != 0.0:
            raise ValueError(f"number too close to zero for {ct.describe()}")
    return number


def _numeric_in_range(number: Decimal) -> Decimal:
    """A finite decimal PostgreSQL's ``numeric`` can hold: at most 131072 digits before
    the decimal point and 16383 after it."""
    if not number.is_finite():
        raise ValueError("expected a finite decimal number")
    if number != 0 and number.adjusted() >= _NUMERIC_MAX_WEIGHT_DIGITS:
        raise ValueError(
            f"number out of range for numeric (at most {_NUMERIC_MAX_WEIGHT_DIGITS} digits "
            "before the decimal point)"
        )
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)
    if -exponent > _NUMERIC_MAX_SCALE:
        raise ValueError(
            f"number out of range for numeric (at most {_NUMERIC_MAX_SCALE} digits after the "
            "decimal point)"
        )
    return number


def _quantized(ct: ColumnType, number: Decimal) -> str:
    scale = ct.scale or 0
    try:
        q = number.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)
    except InvalidOperation:
        raise ValueError(f"number out of range for {ct.describe()}") from None
    if ct.precision is not None and q.adjusted() >= ct.precision - scale and q != 0:
        raise ValueError(f"number out of range for {ct.describe()}")
    return format(q, "f")


def _coerce_special_or_int(value: Any, what: str, low: int, high: int) -> Any:
    if isinstance(value, str) and value in _SPECIAL_INF:
        return value
    if _is_int(value) and low <= value <= high:
        return value
    raise ValueError(f'expected an integer ({what}) or "INFINITY" / "NEG_INFINITY"')


def _coerce_interval(value: Any) -> Any:
    if isinstance(value, str) and value in _SPECIAL_INF:
        return value
    if (
        isinstance(value, dict)
        and set(value) == {"months", "days", "micros"}
        and all(_is_int(v) for v in value.values())
        and all(-(1 << 31) <= value[k] < (1 << 31) for k in ("months", "days"))
        and -(1 << 63) <= value["micros"] < (1 << 63)
    ):
        return {"months": value["months"], "days": value["days"], "micros": value["micros"]}
    raise ValueError('expected {"months": int, "days": int, "micros": int}')


def _coerce_array(element: ColumnType, value: list[Any], depth: int) -> list[Any]:
    if depth > 6:
        raise ValueError("arrays have at most 6 dimensions")
    out: list[Any] = []
    for item in value:
        if isinstance(item, list):
            out.append(_coerce_array(element, item, depth + 1))
        else:
            try:
                out.append(coerce_value(element, item))
            except ValueError as exc:
                raise ValueError(f"array element {item!r:.60}: {exc}") from None
    return out


def same_value(ct: ColumnType | None, a: Any, b: Any) -> bool:
    """Whether two normal wire values are the same value of the column (decimals by
    number, so ``"12.5"`` equals ``"12.50"``; otherwise exact JSON equality)."""
    if ct is not None and ct.kind in (Kind.DECIMAL, Kind.NUMERIC):
        if isinstance(a, str) and isinstance(b, str) and a != b:
            try:
                return Decimal(a) == Decimal(b)
            except InvalidOperation:
                return False
    return _json_equal(a, b)


def _json_equal(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def to_datum(ct: ColumnType | None, value: Any) -> Any:
    """The decoded-Avro form of a wire value (what the rules compare): decimals as
    :class:`~decimal.Decimal`, bytes as bytes, non-finite floats as floats."""
    if value is None or ct is None:
        return value
    if ct.kind is Kind.DECIMAL and isinstance(value, str) and value not in _NUMERIC_PG_TEXT:
        return Decimal(value)
    if ct.kind is Kind.BYTES and isinstance(value, str):
        return base64.b64decode(value)
    if ct.kind is Kind.FLOAT and isinstance(value, str):
        return float(value.replace("Infinity", "inf"))
    return value


# ---- wire value → PostgreSQL input text


def civil_from_days(days: int) -> tuple[int, int, int]:
    """Days since 1970-01-01 → (astronomical year, month, day), proleptic Gregorian."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def _date_text(days: int) -> tuple[str, bool]:
    year, month, day = civil_from_days(days)
    bc = year <= 0
    return f"{(1 - year) if bc else year:04d}-{month:02d}-{day:02d}", bc


def _time_text(micros: int) -> str:
    seconds, frac = divmod(micros, 1_000_000)
    minutes, sec = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours:02d}:{minute:02d}:{sec:02d}.{frac:06d}"


def _timestamp_text(micros: int, with_tz: bool) -> str:
    days, rest = divmod(micros, _MICROS_PER_DAY)
    date, bc = _date_text(days)
    text = f"{date} {_time_text(rest)}{'+00' if with_tz else ''}"
    return text + " BC" if bc else text


def _array_item_text(element: ColumnType, item: Any) -> str:
    if item is None:
        return "NULL"
    if isinstance(item, list):
        return "{" + ",".join(_array_item_text(element, i) for i in item) + "}"
    text = to_pg_text(element, item)
    assert text is not None
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_pg_text(ct: ColumnType, value: Any) -> str | None:
    """PostgreSQL's input text for a normal wire value (``coerce_value``'s result);
    cast it to the column's type in SQL (``%s::numeric(10,2)``).  ``None`` for NULL."""
    if value is None:
        return None
    kind = ct.kind
    if kind is Kind.BOOL:
        return "true" if value else "false"
    if kind is Kind.FLOAT:
        return value if isinstance(value, str) else repr(float(value))
    if kind is Kind.DECIMAL:
        return _NUMERIC_PG_TEXT.get(value, value) if isinstance(value, str) else str(value)
    if kind is Kind.BYTES:
        return "\\x" + base64.b64decode(value).hex()
    if kind in (Kind.DATE, Kind.TIMESTAMP, Kind.TIMESTAMPTZ) and isinstance(value, str):
        return "infinity" if value == "INFINITY" else "-infinity"
    if kind is Kind.DATE:
        date, bc = _date_text(value)
        return date + " BC" if bc else date
    if kind is Kind.TIME:
        return _time_text(value)
    if kind in (Kind.TIMESTAMP, Kind.TIMESTAMPTZ):
        return _timestamp_text(value, kind is Kind.TIMESTAMPTZ)
    if kind is Kind.INTERVAL:
        if isinstance(value, str):
            return "infinity" if value == "INFINITY" else "-infinity"
        return f"{value['months']} mons {value['days']} days {value['micros']} microseconds"
    if kind is Kind.ARRAY:
        if isinstance(value, str):
            return value
        assert ct.element is not None
        return _array_item_text(ct.element, value)
    return str(value)


# --------------------------------------------------------------------------- entries


class Op(enum.StrEnum):
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True, order=True)
class BasePosition:
    """Position ``(commit_lsn, seq)`` of the row version an edit was based on."""

    commit_lsn: int
    seq: int

    def to_json(self) -> dict[str, int]:
        return {"commit_lsn": self.commit_lsn, "seq": self.seq}


@dataclass(frozen=True)
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

    def to_json(self) -> dict[str, Any]:
        """The entry as the device sends it (``device_id`` is not part of it)."""
        return {
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
            self.seq, self.table, self.op, tuple(key), old, new, self.hlc, self.base, self.prev_seq
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


def _reject(reason: Reason, message: str) -> Rejection:
    return Rejection(reason, message)


def _is_seq(value: object) -> TypeGuard[int]:
    """An integer 1..MAX_BIGINT (a journal sequence number)."""
    return _is_int(value) and 1 <= value <= MAX_BIGINT


def _is_position(value: object) -> TypeGuard[int]:
    """An integer 0..MAX_BIGINT (a part of a change position)."""
    return _is_int(value) and 0 <= value <= MAX_BIGINT


def _printable(text: str) -> bool:
    return text.isprintable()


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
        if not _is_seq(seq):
            raise UploadError(
                f"entries[{i}] has no seq (an integer from 1 to {MAX_BIGINT}): "
                f"{'none' if seq is None else _type_name(seq)} {seq!r:.40}"
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
                    _reject(
                        Reason.ENTRY_TOO_LARGE,
                        f"entry {seq} is {size} bytes of JSON; at most {limits.max_entry_bytes}",
                    ),
                )
            )
            continue
        try:
            out.append(entry_from_json(raw, device_id))
        except _EntryProblem as exc:
            out.append(RejectedUpload(seq, exc.rejection))
    return out


class _EntryProblem(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.rejection = Rejection(reason, message)


_OPS: Final = {op.value: op for op in Op}
_ENTRY_KEYS: Final = frozenset(
    {"seq", "table", "op", "key", "old", "new", "base", "hlc", "prev_seq"}
)


def entry_from_json(raw: Any, device_id: str) -> JournalEntry:
    """Read one entry; raises ``_EntryProblem`` (malformed / bad_hlc) naming the field."""
    if not isinstance(raw, dict):
        raise _EntryProblem(Reason.MALFORMED, "an entry is a JSON object")
    seq = raw.get("seq")
    if not _is_seq(seq):
        raise _EntryProblem(Reason.MALFORMED, f"seq must be an integer from 1 to {MAX_BIGINT}")
    where = f"entry {seq}"
    if not _ENTRY_KEYS.issuperset(raw):
        unknown = ", ".join(sorted(set(raw) - _ENTRY_KEYS))
        raise _EntryProblem(Reason.MALFORMED, f"{where}: unknown field(s) {unknown}")
    table = raw.get("table")
    if not isinstance(table, str) or not 0 < len(table) <= MAX_TABLE_CHARS or not _printable(table):
        raise _EntryProblem(
            Reason.MALFORMED,
            f'{where}: table must be "schema.table" (at most {MAX_TABLE_CHARS} printable '
            f"characters), not {table!r:.80}",
        )
    op = _OPS.get(raw.get("op"))  # type: ignore[arg-type]
    if op is None:
        raise _EntryProblem(
            Reason.MALFORMED, f"{where}: op must be insert, update or delete, not {raw.get('op')!r}"
        )
    key = raw.get("key")
    if not isinstance(key, list) or not 0 < len(key) <= MAX_KEY_VALUES:
        raise _EntryProblem(
            Reason.MALFORMED,
            f"{where}: key must be an array of 1 to {MAX_KEY_VALUES} values (the primary key's)",
        )
    old, new = raw.get("old"), raw.get("new")
    for name, value, wanted in (
        ("old", old, op is not Op.INSERT),
        ("new", new, op is not Op.DELETE),
    ):
        if wanted and not isinstance(value, dict):
            raise _EntryProblem(Reason.MALFORMED, f"{where}: {op.value} needs {name} (an object)")
        if not wanted and value is not None:
            raise _EntryProblem(Reason.MALFORMED, f"{where}: {op.value} must not carry {name}")
    base = raw.get("base")
    position = None
    if base is not None:
        if not isinstance(base, dict) or set(base) != {"commit_lsn", "seq"}:
            raise _EntryProblem(
                Reason.MALFORMED,
                f"{where}: base must be null or {{commit_lsn, seq}} (integers 0 to {MAX_BIGINT})",
            )
        for part in ("commit_lsn", "seq"):
            if not _is_position(base[part]):
                raise _EntryProblem(
                    Reason.MALFORMED,
                    f"{where}: base.{part} must be an integer from 0 to {MAX_BIGINT}, not "
                    f"{_type_name(base[part])} {base[part]!r:.40}",
                )
        position = BasePosition(base["commit_lsn"], base["seq"])
    prev = raw.get("prev_seq")
    if prev is not None and (not _is_int(prev) or not 1 <= prev < seq):
        raise _EntryProblem(
            Reason.MALFORMED, f"{where}: prev_seq must be null or an earlier seq of this device"
        )
    try:
        hlc = Hlc.decode(raw.get("hlc"))  # type: ignore[arg-type]
    except ValueError as exc:
        raise _EntryProblem(Reason.BAD_HLC, f"{where}: {exc}") from None
    if hlc.node != device_id:
        raise _EntryProblem(
            Reason.BAD_HLC,
            f"{where}: the HLC node {hlc.node!r} must be the device id {device_id!r}",
        )
    return JournalEntry(seq, table, op, tuple(key), old, new, hlc, position, prev)


# --------------------------------------------------------------------------- permissions


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
        found = self._row_buckets(table, row)
        self._last = (row, table, found)
        return found

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
        claimers = frozenset(
            b for b in buckets if (e := self._entry(b, table)) is not None and e.claim
        )
        return self.columns_in(table, claimers) if claimers else frozenset()

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
            return _reject(
                Reason.FORBIDDEN_ROW, f"{table}: the row is {where}, so it may not change it"
            )
    after_buckets: frozenset[str] | None = None
    if after is not None:
        after_buckets = scope.row_buckets(table, after)
        if after_buckets is not None and not scope.writable(table, after_buckets):
            what = "moves the row out of" if before is not None else "puts the row into none of"
            return _reject(
                Reason.FORBIDDEN_MOVE,
                f"{table}: the write {what} this device's buckets"
                + (" it may write" if after_buckets else ""),
            )
    basis = before_buckets if before is not None else after_buckets
    if basis is not None:
        allowed = scope.columns_in(table, scope.writable(table, basis))
        denied = sorted(c for c in written if c not in allowed)
        if denied:
            return _reject(
                Reason.FORBIDDEN_COLUMN,
                f"{table}: this device may not write column(s) {', '.join(denied)} of this row",
            )
    if before_buckets is not None and after_buckets is not None:
        gained = scope.columns_in(table, after_buckets) - scope.columns_in(table, before_buckets)
        hidden = sorted(gained - scope.claim_columns(table, after_buckets))
        if hidden:
            return _reject(
                Reason.FORBIDDEN_MOVE,
                f"{table}: the write would show this device column(s) {', '.join(hidden)} of "
                "the row, which it cannot see now (taking rows over needs claim = true in "
                "the rules)",
            )
    return None


def validate_entry(
    entry: JournalEntry, scope: WriteScope, *, check_rows: bool = True
) -> tuple[JournalEntry, Rejection | None]:
    """Check an entry against the schema, the column types and the device's rules.

    Returns the entry with normalized values (:func:`coerce_value`) and None, or the
    entry unchanged and the :class:`Rejection`.  With ``check_rows`` the permission
    check uses the device's ``old`` values as the row before the write (the intake); the
    applier passes False and checks with the server's row instead.
    """
    table = entry.table
    if table not in scope.visible_tables:
        return entry, _reject(
            Reason.UNKNOWN_TABLE, f"entry {entry.seq}: {table!r} is not a table this device syncs"
        )
    info = scope.table_info(table)
    types = scope.types.get(table)
    where = f"entry {entry.seq} ({table})"
    if len(entry.key) != len(info.key):
        return entry, _reject(
            Reason.BAD_KEY,
            f"{where}: key has {len(entry.key)} value(s); the primary key is ({', '.join(info.key)})",
        )
    try:
        key = [
            _coerce(types, c, v, where + " key") for c, v in zip(info.key, entry.key, strict=True)
        ]
        new = _coerce_row(types, info, entry.new, where + " new")
        # the applier needs the old values of the written columns only (and all of them
        # for a delete: a server change to any of them is a delete-vs-update conflict)
        needed = None if check_rows or new is None else set(new) | set(info.key)
        old = _coerce_row(types, info, entry.old, where + " old", needed)
    except _EntryProblem as exc:
        return entry, exc.rejection
    for name, values in (("old", old), ("new", new)):
        for column, wanted in zip(info.key, key, strict=True):
            if values is None or column not in values:
                continue
            if same_value(types.get(column) if types else None, values[column], wanted):
                continue
            if name == "old":
                return entry, _reject(Reason.BAD_KEY, f"{where}: old.{column} differs from the key")
            return entry, _reject(
                Reason.KEY_CHANGE,
                f"{where}: new.{column} differs from the key; key columns cannot change "
                "(delete the row and insert a new one)",
            )
    if entry.op is Op.INSERT:
        assert new is not None
        missing = [c for c in info.key if c not in new]
        if missing:
            return entry, _reject(
                Reason.BAD_KEY,
                f"{where}: an insert must set the key column(s) {', '.join(missing)}",
            )
    if entry.op is Op.UPDATE:
        assert old is not None and new is not None
        lacking = sorted(c for c in new if c not in old)
        if lacking:
            return entry, _reject(
                Reason.MISSING_OLD,
                f"{where}: old lacks {', '.join(lacking)}: send the value each written column "
                "had before the edit",
            )
    normalized = entry.with_values(key, old, new)
    visible = scope.visible_tables[table]
    written = normalized.written_columns(types)
    hidden = sorted(c for c in written if c not in visible)
    if hidden:
        return entry, _reject(
            Reason.FORBIDDEN_COLUMN,
            f"{where}: this device may not write column(s) {', '.join(hidden)}",
        )
    if not check_rows:
        return normalized, None
    before = dict(old) if old is not None else None
    after = None if entry.op is Op.DELETE else {**(old or {}), **(new or {})}
    problem = check_write(scope, table, before, after, written)
    if problem is not None:
        return entry, Rejection(problem.reason, f"entry {entry.seq}: {problem.message}")
    return normalized, None


def _coerce(types: Mapping[str, ColumnType] | None, column: str, value: Any, where: str) -> Any:
    if types is None or column not in types:
        return value
    ct = types[column]
    try:
        return coerce_value(ct, value)
    except ValueError as exc:
        raise _EntryProblem(
            Reason.WRONG_TYPE,
            f"{where}: {column} ({ct.describe()}): {exc}, got {_type_name(value)} {value!r:.60}",
        ) from None


def _coerce_row(
    types: Mapping[str, ColumnType] | None,
    info: TableInfo,
    row: Mapping[str, Any] | None,
    where: str,
    only: set[str] | None = None,
) -> dict[str, Any] | None:
    """The row with its values normalized (``only``: just those columns, the others as
    they are); unknown columns are refused."""
    if row is None:
        return None
    columns = info.columns
    if not all(c in columns for c in row):
        unknown = ", ".join(repr(c) for c in sorted(c for c in row if c not in columns))
        raise _EntryProblem(Reason.UNKNOWN_COLUMN, f"{where}: no column(s) {unknown}")
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
    return _reject(
        Reason.BLOCKED,
        f"entry {entry.seq} was made on top of entry {entry.prev_seq}, which was rejected "
        f"({found[1] or 'rejected'})",
    )


# --------------------------------------------------------------------------- Kafka records


@dataclass(frozen=True)
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
        if not valid_device_id(device_id) or not _is_seq(seq):
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
            except _EntryProblem as exc:
                rejection = rejection or exc.rejection
            if entry is not None and entry.seq != seq:
                entry = None
                rejection = rejection or _reject(
                    Reason.MALFORMED, f"entry {seq}: the record's entry carries another seq"
                )
        elif rejection is None:
            rejection = _reject(Reason.MALFORMED, f"entry {seq}: the record carries no entry")
        claims = obj.get("claims") or {}
        received = obj.get("received_at_us")
        return cls(
            device_id,
            int(seq),
            entry,
            claims if isinstance(claims, dict) else {},
            rejection,
            received if _is_position(received) else 0,  # audit only: nonsense counts as unknown
        )


class OutcomeKind(enum.StrEnum):
    APPLIED = "applied"
    MERGED = "merged"
    CONFLICT = "conflict"
    REJECTED = "rejected"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Outcome:
    """What became of one entry.  ``{prefix}._outcomes`` records (Kafka key: the device
    id) carry the outcomes of one device, several at a time (:func:`encode_outcomes`).  ``row`` is the row afterwards as the device sees it (its columns
    only; None when the row does not exist), ``columns`` the per-column decisions of a
    merge (``device``, ``server``, ``equal``, ``combined``, ``held``), ``conflict`` the
    kept conflict (``id``, ``columns`` with ``base``/``server``/``device`` values, or
    ``row``: both versions), ``reason``/``message`` say why (rejections, row-level
    decisions).  Several outcomes may be published for one seq (``conflict`` then
    ``resolved``); a consumer keeps the latest per ``(device_id, seq)``.

    ``visible_after`` (set only when the applier wrote the entry's row in PostgreSQL): the
    WAL insert position the applier read after writing the row and before committing.
    Every change event of that write, and of any later version of the row, has a
    ``commit_lsn`` at or above it; every earlier version's is below it.  A device keeps
    the edit on top of its row until it has received a version at or above it
    (docs/journal.md, "Outcomes")."""

    device_id: str
    seq: int
    kind: OutcomeKind
    table: str | None = None
    key: tuple[Any, ...] | None = None
    reason: str | None = None
    message: str = ""
    row: Mapping[str, Any] | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    conflict: Mapping[str, Any] | None = None
    hlc: str | None = None
    at_us: int = 0
    visible_after: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": RECORD_VERSION,
            "device_id": self.device_id,
            "seq": self.seq,
            "outcome": self.kind.value,
            "table": self.table,
            "key": list(self.key) if self.key is not None else None,
            "reason": self.reason,
            "message": self.message,
            "row": dict(self.row) if self.row is not None else None,
            "columns": dict(self.columns),
            "conflict": dict(self.conflict) if self.conflict is not None else None,
            "hlc": self.hlc,
            "at_us": self.at_us,
        }
        if self.visible_after is not None:
            out["visible_after"] = self.visible_after
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Outcome:
        if not valid_device_id(obj.get("device_id")) or not _is_seq(obj.get("seq")):
            raise JournalFormatError(
                f"outcome has no valid device_id and seq (1 to {MAX_BIGINT}): {str(obj)[:200]}"
            )
        try:
            key = obj.get("key")
            return cls(
                device_id=str(obj["device_id"]),
                seq=int(obj["seq"]),
                kind=OutcomeKind(obj["outcome"]),
                table=obj.get("table"),
                key=tuple(key) if isinstance(key, list) else None,
                reason=obj.get("reason"),
                message=str(obj.get("message") or ""),
                row=obj.get("row"),
                columns=dict(obj.get("columns") or {}),
                conflict=obj.get("conflict"),
                hlc=obj.get("hlc"),
                at_us=int(obj.get("at_us") or 0),
                visible_after=parse_visible_after(obj.get("visible_after"), obj.get("seq")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise JournalFormatError(f"not an outcome record: {str(obj)[:200]}") from exc


def parse_visible_after(value: object, seq: object = None) -> int | None:
    """An outcome's ``visible_after``: None when absent (null), else a WAL position 0 ..
    :data:`MAX_BIGINT` given as a JSON integer or its decimal text; anything else raises
    :class:`JournalFormatError` naming the outcome's seq and the value."""
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if _is_int(value) and 0 <= value <= MAX_BIGINT:
        return value
    raise JournalFormatError(
        f"outcome of entry {seq}: visible_after must be a WAL position, an integer 0 to "
        f"{MAX_BIGINT} (or its decimal text), not {str(value)[:40]!r}"
    )


def encode_outcomes(outcomes: Sequence[Outcome]) -> bytes:
    """The value of one ``{prefix}._outcomes`` record: outcomes of one device, in order::

    {"v": 1, "device_id": …, "outcomes": [outcome, …]}
    """
    if not outcomes or len({o.device_id for o in outcomes}) != 1:
        raise ValueError("an outcomes record holds the outcomes of exactly one device")
    return dump_json(
        {
            "v": RECORD_VERSION,
            "device_id": outcomes[0].device_id,
            "outcomes": [o.to_json() for o in outcomes],
        }
    )


def decode_outcomes(data: bytes) -> list[Outcome]:
    """The outcomes of one ``{prefix}._outcomes`` record."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise JournalFormatError(f"outcomes record is not JSON: {exc}") from exc
    if (
        not isinstance(obj, dict)
        or obj.get("v") != RECORD_VERSION
        or not isinstance(obj.get("outcomes"), list)
    ):
        raise JournalFormatError(
            f"not an outcomes record (version {RECORD_VERSION}): {str(data)[:120]}"
        )
    return [Outcome.from_json(o) for o in obj["outcomes"]]


def dump_json(value: Any) -> bytes:
    """Compact UTF-8 JSON (orjson).  Integers beyond 64 bits, which orjson refuses (and
    would read back as floats), are written as decimal strings."""
    try:
        return orjson.dumps(value, default=str)
    except TypeError:
        return orjson.dumps(_big_ints_as_text(value), default=str)


def _big_ints_as_text(value: Any) -> Any:
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not -(1 << 63) <= value < (1 << 64)
    ):
        return str(value)
    if isinstance(value, dict):
        return {k: _big_ints_as_text(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_big_ints_as_text(v) for v in value]
    return value
