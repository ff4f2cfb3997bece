"""PostgreSQL text values → Avro datums: one parser per type (pure, no I/O).

The pgoutput decoder, the initial snapshot and the re-snapshots hand over every column value
in PostgreSQL's *text* output format (what the type's output function prints).  The type
mapping (:mod:`core.pg_type_mapping`) picks, once per column, one of the parsers here; the hot
path then only calls it.  Each parser raises ValueError on text it does not accept (the
envelope codec names the column and the value).

The formats are those of a session using :data:`core.pg_types.SESSION_SETTINGS` (ISO dates,
``postgres`` interval style, hex bytea); a parser that meets another format says which
setting the session needs.  Dates, times and timestamps become the ints of their Avro
logical types (days, µs) across PostgreSQL's whole range (BC dates, year 294276,
``24:00:00``), ``infinity`` the symbols of the special-value enums.

Concurrency: the parsers keep no state except an LRU cache of parsed dates (thread-safe).
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Callable
from datetime import UTC as _UTC
from datetime import date as _date
from datetime import datetime as _datetime
from datetime import time as _time
from datetime import timedelta as _timedelta
from typing import Any, Final

__all__ = [
    "array_converter",
    "as_text",
    "decimal_size",
    "numeric_parser",
    "parse_array",
    "parse_bool",
    "parse_bytea",
    "parse_date",
    "parse_float",
    "parse_float4",
    "parse_interval",
    "parse_time",
    "returns_text_unchanged",
    "timestamp_parser",
]

_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1
_UNIX_EPOCH_ORDINAL: Final = 719163  # date(1970, 1, 1).toordinal()
_MICROS_PER_DAY: Final = 86_400_000_000


# --------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------


def as_text(text: str) -> str:
    return text


def returns_text_unchanged(convert: Callable[[str], Any]) -> bool:
    """Whether ``convert`` gives back PostgreSQL's text as is (a caller may skip the call)."""
    return convert is as_text


def parse_bool(text: str) -> bool:
    if text == "t":
        return True
    if text == "f":
        return False
    raise ValueError(f"not a boolean text form (expected 't' or 'f'): {text!r}")


def parse_float(text: str) -> float:
    # float() accepts PostgreSQL's NaN / Infinity / -Infinity and exponent forms.
    return float(text)


_FLOAT4: Final = struct.Struct("<f")


def parse_float4(text: str) -> float:
    """A ``real`` (float4) as the double it is exactly: PostgreSQL prints the shortest text
    that reads back as the same float4 (``0.1``), which as a double is another number; the
    change events' Avro ``float`` carries the float4 (0.10000000149011612), and whoever
    compares a device's value with the server's must see that same number."""
    return float(_FLOAT4.unpack(_FLOAT4.pack(float(text)))[0])


def parse_bytea(text: str) -> bytes:
    if text.startswith("\\x"):
        return bytes.fromhex(text[2:])
    return _parse_bytea_escape(text)


def _parse_bytea_escape(text: str) -> bytes:
    """The legacy ``bytea_output = escape`` form: ``\\\\`` and ``\\ooo`` octal escapes."""
    out = bytearray()
    i = 0
    n = len(text)
    while i < n:
        j = text.find("\\", i)
        if j < 0:
            out += text[i:].encode("latin-1")
            break
        out += text[i:j].encode("latin-1")
        if text.startswith("\\\\", j):
            out.append(0x5C)
            i = j + 2
            continue
        octal = text[j + 1 : j + 4]
        if len(octal) != 3 or any(c not in "01234567" for c in octal):
            raise ValueError(f"bad escape in bytea text at offset {j}: {text[j : j + 4]!r}")
        out.append(int(octal, 8))
        i = j + 4
    return bytes(out)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar (astronomical years)."""
    if 1 <= year <= 9999:
        return _date(year, month, day).toordinal() - _UNIX_EPOCH_ORDINAL
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    mp = (month + 9) % 12
    doy = (153 * mp + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


_DATE_RE: Final = re.compile(r"(\d{4,})-(\d\d)-(\d\d)( BC)?")


@functools.lru_cache(maxsize=8192)
def _parse_date_days(text: str) -> int:
    """``2024-01-02`` or ``0044-03-15 BC`` (ISO DateStyle) → days since 1970-01-01."""
    m = _DATE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not an ISO date: {text!r} (the replication session needs DateStyle=ISO)")
    year = int(m.group(1))
    if m.group(4):
        year = 1 - year  # 1 BC is astronomical year 0
    month, day = int(m.group(2)), int(m.group(3))
    if not (1 <= month <= 12 and 1 <= day <= 31):
        raise ValueError(f"date out of range: {text!r}")
    return _days_from_civil(year, month, day)


_TIME_RE: Final = re.compile(
    r"(\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?"
    r"(?:([+-])(\d\d)(?::(\d\d))?(?::(\d\d))?)?"
)


def _time_micros(text: str) -> tuple[int, int | None]:
    """``HH:MM:SS[.ffffff][+HH[:MM[:SS]]]`` → (micros after midnight, offset seconds or None)."""
    m = _TIME_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a time of day: {text!r}")
    hh, mm, ss, frac, sign, oh, om, os_ = m.groups()
    micros = ((int(hh) * 60 + int(mm)) * 60 + int(ss)) * 1_000_000
    if frac:
        micros += int(frac.ljust(6, "0"))
    if not sign:
        return micros, None
    offset = int(oh) * 3600 + int(om or 0) * 60 + int(os_ or 0)
    return micros, -offset if sign == "-" else offset


def parse_time(text: str) -> int:
    try:  # fast path (C); PostgreSQL's 24:00:00 and odd forms take the slow one
        t = _time.fromisoformat(text)
    except ValueError:
        pass
    else:
        if t.tzinfo is None:
            return ((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 + t.microsecond
    micros, offset = _time_micros(text)
    if offset is not None:
        raise ValueError(f"unexpected time zone offset in a time without time zone: {text!r}")
    return micros


_EPOCH_NAIVE: Final = _datetime(1970, 1, 1)
_EPOCH_UTC: Final = _datetime(1970, 1, 1, tzinfo=_UTC)
_ONE_MICRO: Final = _timedelta(microseconds=1)


def timestamp_parser(*, with_tz: bool) -> Callable[[str], int | str]:
    special = {"infinity": "INFINITY", "-infinity": "NEG_INFINITY"}
    epoch = _EPOCH_UTC if with_tz else _EPOCH_NAIVE

    def parse(text: str) -> int | str:
        # Fast path (C) for years 1..9999; BC, years > 9999 and infinity take the slow one.
        try:
            dt = _datetime.fromisoformat(text)
        except ValueError:
            return parse_slow(text)
        if (dt.tzinfo is not None) != with_tz:
            return parse_slow(text)  # raises with a clear message
        return (dt - epoch) // _ONE_MICRO

    def parse_slow(text: str) -> int | str:
        if text[-1] == "y":  # 'infinity' / '-infinity'
            try:
                return special[text]
            except KeyError:
                raise ValueError(f"not a timestamp: {text!r}") from None
        bc = text.endswith(" BC")
        body = text[:-3] if bc else text
        date_part, sep, time_part = body.partition(" ")
        if not sep:
            raise ValueError(
                f"not an ISO timestamp: {text!r} (the replication session needs DateStyle=ISO)"
            )
        days = _parse_date_days(date_part + " BC" if bc else date_part)
        micros, offset = _time_micros(time_part)
        if with_tz:
            if offset is None:
                raise ValueError(f"timestamptz without a time zone offset: {text!r}")
            micros -= offset * 1_000_000
        elif offset is not None:
            raise ValueError(f"unexpected time zone offset in a timestamp: {text!r}")
        value = days * _MICROS_PER_DAY + micros
        if _INT64_MIN <= value <= _INT64_MAX:
            return value
        raise ValueError(
            f"{text!r} is outside the range of an Avro long (64-bit microseconds since 1970)"
        )

    return parse


def parse_date(text: str) -> int | str:
    try:  # fast path (C) for years 1..9999
        return _date.fromisoformat(text).toordinal() - _UNIX_EPOCH_ORDINAL
    except ValueError:
        pass
    if text[-1] == "y":
        if text == "infinity":
            return "INFINITY"
        if text == "-infinity":
            return "NEG_INFINITY"
        raise ValueError(f"not a date: {text!r}")
    return _parse_date_days(text)


_INTERVAL_RE: Final = re.compile(
    r"(?:([+-]?\d+) years? ?)?"
    r"(?:([+-]?\d+) mons? ?)?"
    r"(?:([+-]?\d+) days? ?)?"
    r"(?:([+-])?(\d+):(\d\d):(\d\d)(?:\.(\d{1,6}))?)?"
)


def parse_interval(text: str) -> dict[str, int] | str:
    """PostgreSQL ``IntervalStyle = postgres`` output → {months, days, micros}."""
    if text == "infinity":
        return "INFINITY"
    if text == "-infinity":
        return "NEG_INFINITY"
    m = _INTERVAL_RE.fullmatch(text)
    if m is None or not text:
        raise ValueError(
            f"not an interval in IntervalStyle=postgres form: {text!r} "
            "(the replication session needs IntervalStyle=postgres)"
        )
    years, mons, days, sign, hh, mm, ss, frac = m.groups()
    months = int(years or 0) * 12 + int(mons or 0)
    micros = 0
    if hh is not None:
        micros = (int(hh) * 3600 + int(mm) * 60 + int(ss)) * 1_000_000
        if frac:
            micros += int(frac.ljust(6, "0"))
        if sign == "-":
            micros = -micros
    return {"months": months, "days": int(days or 0), "micros": micros}


_NUMERIC_SPECIAL: Final = {"NaN": "NAN", "Infinity": "INFINITY", "-Infinity": "NEG_INFINITY"}


def decimal_size(precision: int) -> int:
    """Smallest fixed size (bytes) holding any unscaled value of ``precision`` digits."""
    size = 1
    while (1 << (8 * size - 1)) < 10**precision:
        size += 1
    return size


def numeric_parser(precision: int, scale: int, size: int) -> Callable[[str], bytes | str]:
    limit = 10**precision

    def parse(text: str) -> bytes | str:
        if text[-1] > "9":  # NaN, Infinity, -Infinity
            try:
                return _NUMERIC_SPECIAL[text]
            except KeyError:
                raise ValueError(f"not a numeric: {text!r}") from None
        whole, _, frac = text.partition(".")
        if len(frac) != scale:
            if len(frac) < scale:
                frac = frac.ljust(scale, "0")
            elif frac[scale:].strip("0"):
                raise ValueError(f"{text!r} has more than {scale} decimal places")
            else:
                frac = frac[:scale]
        unscaled = int(whole + frac)
        if -limit < unscaled < limit:
            return unscaled.to_bytes(size, "big", signed=True)
        raise ValueError(f"{text!r} does not fit the declared precision {precision}")

    return parse


# --------------------------------------------------------------------------------------
# PostgreSQL array literals.
# --------------------------------------------------------------------------------------


def parse_array(text: str) -> list[Any]:
    """Parse a PostgreSQL array literal (``array_out`` form) into nested lists.

    Leaves are ``str`` (element text, quotes and backslash escapes removed) or ``None``
    (an unquoted ``NULL``).  Multi-dimensional arrays become nested lists.  A literal with
    explicit bounds (``[0:1]={1,2}``) is rejected with ValueError; callers keep those as text.
    """
    if not text.startswith("{") or not text.endswith("}"):
        raise ValueError(f"not an array literal: {text[:60]!r}")
    if '"' not in text and "\\" not in text and text.count("{") == 1 and text.count("}") == 1:
        inner = text[1:-1]
        if not inner:
            return []
        return [None if _is_null(p) else p for p in inner.split(",")]
    return _parse_array_general(text)


def _is_null(token: str) -> bool:
    return len(token) == 4 and token.upper() == "NULL"


def _parse_array_general(text: str) -> list[Any]:
    root: list[Any] = []
    stack: list[list[Any]] = []
    current: list[Any] | None = None
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "{":
            new: list[Any] = []
            if current is None:
                if stack or root:
                    raise ValueError(f"text after the end of the array literal: {text[:60]!r}")
                root = new
            else:
                current.append(new)
                stack.append(current)
            current = new
            i += 1
        elif c == "}":
            if current is None:
                raise ValueError(f"unbalanced '}}' in array literal: {text[:60]!r}")
            current = stack.pop() if stack else None
            i += 1
        elif current is None:
            raise ValueError(f"text after the end of the array literal: {text[:60]!r}")
        elif c == ",":
            i += 1
        elif c == '"':
            value, i = _read_quoted(text, i + 1)
            current.append(value)
        else:
            j = i
            while j < n and text[j] not in ",}":
                j += 1
            token = text[i:j]
            if "\\" in token:
                token = re.sub(r"\\(.)", r"\1", token)
                current.append(token)
            else:
                current.append(None if _is_null(token) else token)
            i = j
    if current is not None or stack:
        raise ValueError(f"unterminated array literal: {text[:60]!r}")
    return root


def _read_quoted(text: str, i: int) -> tuple[str, int]:
    """Read a quoted element starting after its opening quote; return (value, next index)."""
    parts: list[str] = []
    n = len(text)
    while True:
        q = text.find('"', i)
        b = text.find("\\", i)
        if q < 0:
            raise ValueError(f"unterminated quoted element in array literal: {text[:60]!r}")
        if 0 <= b < q:
            parts.append(text[i:b])
            if b + 1 >= n:
                raise ValueError(f"dangling backslash in array literal: {text[:60]!r}")
            parts.append(text[b + 1])
            i = b + 2
            continue
        parts.append(text[i:q])
        return "".join(parts), q + 1


def array_converter(elem_convert: Callable[[str], Any]) -> Callable[[str], Any]:
    text_elements = elem_convert is as_text

    def convert_list(items: list[Any]) -> list[Any]:
        out: list[Any] = []
        for x in items:
            if x is None:
                out.append(None)
            elif x.__class__ is list:
                out.append(convert_list(x))
            else:
                out.append(elem_convert(x))
        return out

    def convert(text: str) -> Any:
        if text.startswith("["):
            return text  # explicit lower bounds: kept as the literal (string branch)
        items = parse_array(text)
        if text_elements and all(x is None or x.__class__ is str for x in items):
            return items
        return convert_list(items)

    return convert
