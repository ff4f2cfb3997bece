"""The value model of device edits: column types, wire values, comparison, PostgreSQL text.

Every value of a journal entry, of a merge and of an outcome is in the *wire form* a
device received it in (docs/events.md type table, :func:`core.row_wire.json_value`):
dates as days, times and timestamps as µs, decimals as exact text, bytes as base64,
json as its text, intervals as ``{"months", "days", "micros"}``, infinities as
``"INFINITY"``/``"NEG_INFINITY"``.  One module says what such a value means for a
column, and every part of the upstream path (intake validation, the merge, the applier,
the replay audit) uses it:

- :class:`ColumnType` describes a column (its :class:`Kind`, cdc's ``pg.type`` label,
  bits, precision/scale, array element); :mod:`core.value_schemas` derives it from the
  Avro schemas cdc publishes;
- :func:`coerce_value` checks a wire value against the column (PostgreSQL's ranges, so
  nothing accepted fails later for its size) and returns its *normal* form;
- :func:`same_value` compares two normal values as the column does (decimals by number);
- :func:`to_pg_text` turns a normal value into PostgreSQL's input text (cast in SQL);
- :func:`to_datum` into the decoded-Avro form the bucket rules compare;
- :func:`decoded_datum` turns cdc's converter output for a column into what an Avro
  reader decodes (the inverse direction: PostgreSQL text → wire, with
  :func:`core.row_wire.json_value`);
- :func:`dump_json` writes wire values as compact JSON (integers beyond 64 bits as text).

Pure: no I/O, no state; values are immutable and can be shared between threads.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from typing import Any, Final, TypeGuard

import orjson

__all__ = [
    "TEMPORAL_KINDS",
    "ColumnType",
    "Kind",
    "civil_from_days",
    "coerce_value",
    "decoded_datum",
    "dump_json",
    "is_int",
    "label_base",
    "same_value",
    "to_datum",
    "to_pg_text",
    "type_name",
]

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
_DATE_MAX_DAYS: Final = 2_145_042_905  # 5874897-12-31, PostgreSQL's last date
_NUMERIC_MAX_WEIGHT_DIGITS: Final = 131_072
_NUMERIC_MAX_SCALE: Final = 16_383
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_DECIMAL_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\Z")


# --------------------------------------------------------------------------- column types


class Kind(enum.StrEnum):
    """How a column's values look on the wire (the device's JSON)."""

    BOOL = "bool"
    INT = "int"
    FLOAT = "float"
    DECIMAL = "decimal"  # numeric(p,s): exact text, or NAN/INFINITY/NEG_INFINITY
    NUMERIC = "numeric"  # unconstrained numeric: PostgreSQL's exact text
    TEXT = "text"
    JSON = "json"
    UUID = "uuid"
    BYTES = "bytes"
    DATE = "date"
    TIME = "time"
    TIMESTAMP = "timestamp"
    TIMESTAMPTZ = "timestamptz"
    INTERVAL = "interval"
    ARRAY = "array"


TEMPORAL_KINDS: Final = frozenset({Kind.DATE, Kind.TIME, Kind.TIMESTAMP, Kind.TIMESTAMPTZ})
"""Kinds whose values are days or µs (the relay shows them to rules as such)."""


@dataclass(frozen=True)
class ColumnType:
    """A column's wire kind; ``pg_type`` is cdc's ``pg.type`` label (``numeric(10,2)``)."""

    kind: Kind
    pg_type: str = ""
    bits: int = 64
    precision: int | None = None
    scale: int | None = None
    element: ColumnType | None = None

    def describe(self) -> str:
        return self.pg_type or self.kind.value


def label_base(label: str) -> str:
    """``numeric(10,2)[]`` → ``numeric``; ``int4`` → ``int4``."""
    return label.split("(", 1)[0].split("[", 1)[0]


# --------------------------------------------------------------------------- values


def is_int(value: object) -> TypeGuard[int]:
    """An integer that is not a boolean (JSON's integers)."""
    return isinstance(value, int) and not isinstance(value, bool)


def type_name(value: object) -> str:
    """The JSON name of a value's type, for messages (``integer``, ``string``, …)."""
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
    if is_int(value):
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
    coerce = _COERCE.get(ct.kind)
    if coerce is None:  # pragma: no cover
        raise ValueError(f"unsupported column kind {ct.kind}")
    return coerce(ct, value)


def _coerce_bool(ct: ColumnType, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    raise ValueError("expected true or false")


def _coerce_int(ct: ColumnType, value: Any) -> Any:
    if not is_int(value):
        raise ValueError("expected an integer")
    low, high = -(1 << (ct.bits - 1)), (1 << (ct.bits - 1)) - 1
    if ct.pg_type == "oid":
        low, high = 0, (1 << 32) - 1
    if not low <= value <= high:
        raise ValueError(f"integer out of range {low}..{high}")
    return value


def _coerce_float(ct: ColumnType, value: Any) -> Any:
    if isinstance(value, str) and value in _FLOAT_SPECIAL:
        return value
    return _float_in_range(ct, value)


def _coerce_decimal(ct: ColumnType, value: Any) -> Any:
    if isinstance(value, str) and value in _NUMERIC_SPECIAL:
        return _NUMERIC_SPECIAL[value]
    return _quantized(ct, _numeric_in_range(_decimal_of(value)))


def _coerce_numeric(ct: ColumnType, value: Any) -> Any:
    if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
        return value
    if isinstance(value, str) and value in _NUMERIC_SPECIAL:
        return _NUMERIC_PG_TEXT[_NUMERIC_SPECIAL[value]]
    number = _numeric_in_range(_decimal_of(value))
    return value.strip() if isinstance(value, str) else format(number, "f")


def _coerce_text(ct: ColumnType, value: Any) -> Any:
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text cannot contain NUL characters")
        return value
    raise ValueError("expected a string")


def _coerce_json(ct: ColumnType, value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("expected the JSON document as a string (its text)")
    if "\x00" in value:
        raise ValueError("JSON text cannot contain NUL characters")
    try:
        json.loads(value)
    except ValueError as exc:
        raise ValueError(f"expected JSON text ({exc})") from None
    if label_base(ct.pg_type) == "jsonb" and _NUL_ESCAPE.search(value):
        raise ValueError("jsonb cannot hold the character \\u0000")
    return value


def _coerce_uuid(ct: ColumnType, value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("expected a UUID string")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError("expected a UUID string") from None


def _coerce_bytes(ct: ColumnType, value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("expected base64 text")
    try:
        return base64.b64encode(base64.b64decode(value, validate=True)).decode("ascii")
    except (binascii.Error, ValueError):
        raise ValueError("expected base64 text") from None


def _coerce_date(ct: ColumnType, value: Any) -> Any:
    return _coerce_special_or_int(value, "days since 1970-01-01", _DATE_MIN_DAYS, _DATE_MAX_DAYS)


def _coerce_time(ct: ColumnType, value: Any) -> Any:
    if is_int(value) and 0 <= value <= _MICROS_PER_DAY:
        return value
    raise ValueError(f"expected microseconds after midnight (0..{_MICROS_PER_DAY})")


def _coerce_timestamp(ct: ColumnType, value: Any) -> Any:
    return _coerce_special_or_int(
        value,
        "microseconds since 1970-01-01",
        _DATE_MIN_DAYS * _MICROS_PER_DAY,
        (1 << 63) - 1,
    )


def _coerce_array_value(ct: ColumnType, value: Any) -> Any:
    if isinstance(value, str):
        return value  # the PostgreSQL array literal form (lower bounds other than 1)
    if not isinstance(value, list):
        raise ValueError("expected an array")
    assert ct.element is not None
    return _coerce_array(ct.element, value, 1)


def _float_in_range(ct: ColumnType, value: Any) -> float:
    """A finite JSON number that the column's ``real`` / ``double precision`` can hold
    (PostgreSQL refuses values that overflow, and non-zero ones that round to zero)."""
    if not (is_int(value) or isinstance(value, float)):
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
    # the default context's 28 digits would refuse numeric(38,0) and wider values
    digits = max(number.adjusted() + 1, 1) + max(scale, 0) + 1
    try:
        q = number.quantize(
            Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP, context=Context(prec=max(28, digits))
        )
    except InvalidOperation:
        raise ValueError(f"number out of range for {ct.describe()}") from None
    if ct.precision is not None and q.adjusted() >= ct.precision - scale and q != 0:
        raise ValueError(f"number out of range for {ct.describe()}")
    return format(q, "f")


def _coerce_special_or_int(value: Any, what: str, low: int, high: int) -> Any:
    if isinstance(value, str) and value in _SPECIAL_INF:
        return value
    if is_int(value) and low <= value <= high:
        return value
    raise ValueError(f'expected an integer ({what}) or "INFINITY" / "NEG_INFINITY"')


def _coerce_interval(value: Any) -> Any:
    if isinstance(value, str) and value in _SPECIAL_INF:
        return value
    if (
        isinstance(value, dict)
        and set(value) == {"months", "days", "micros"}
        and all(is_int(v) for v in value.values())
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


_COERCE: Final[Mapping[Kind, Callable[[ColumnType, Any], Any]]] = {
    Kind.BOOL: _coerce_bool,
    Kind.INT: _coerce_int,
    Kind.FLOAT: _coerce_float,
    Kind.DECIMAL: _coerce_decimal,
    Kind.NUMERIC: _coerce_numeric,
    Kind.TEXT: _coerce_text,
    Kind.JSON: _coerce_json,
    Kind.UUID: _coerce_uuid,
    Kind.BYTES: _coerce_bytes,
    Kind.DATE: _coerce_date,
    Kind.TIME: _coerce_time,
    Kind.TIMESTAMP: _coerce_timestamp,
    Kind.TIMESTAMPTZ: _coerce_timestamp,
    Kind.INTERVAL: lambda ct, value: _coerce_interval(value),
    Kind.ARRAY: _coerce_array_value,
}
"""How each kind's wire values are checked and normalized (:func:`coerce_value`)."""


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


def decoded_datum(ct: ColumnType | None, datum: Any) -> Any:
    """cdc's converter output → what an Avro reader decodes (fixed decimals → Decimal)."""
    if ct is None or datum is None:
        return datum
    if ct.kind is Kind.DECIMAL and isinstance(datum, bytes):
        return Decimal(int.from_bytes(datum, "big", signed=True)).scaleb(-(ct.scale or 0))
    if ct.kind is Kind.ARRAY and isinstance(datum, list):
        return [decoded_datum(ct.element if not isinstance(d, list) else ct, d) for d in datum]
    return datum


# --------------------------------------------------------------------------- JSON


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
