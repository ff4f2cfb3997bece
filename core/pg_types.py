"""PostgreSQL column types mapped to Avro types, and PostgreSQL text values to Avro datums.

Pure code: no I/O.  The pgoutput decoder hands over every column value in PostgreSQL's
*text* output format (what ``SELECT col::text`` prints), ``None`` for SQL NULL, or a
sentinel for an unchanged TOASTed value (handled by :mod:`core.avro_envelope`, not here).
For each column this module decides, once per relation, an Avro field type and a
converter ``text -> Avro datum``; the hot path then only calls the converter.

Mapping (every field is ``["null", ...]``; see docs/events.md for the full table):

* bool→boolean; int2/int4→int; int8/oid→long; float4→float; float8→double;
* numeric(p,s) with 0 <= s <= p → ``fixed`` decimal (named ``fieldsync.pg.Numeric_p<P>_s<S>``,
  so precision/scale are part of the schema fingerprint) or the enum
  ``fieldsync.pg.NumericSpecial`` {NAN, INFINITY, NEG_INFINITY}; unconstrained numeric (and
  the scales Avro cannot express) → string holding PostgreSQL's exact text;
* text/varchar/bpchar/name/"char"/xml/inet/cidr/macaddr/bit/pg_lsn → string; bytea → bytes;
* date → int (date) | ``DateSpecial``; time → long (time-micros); timetz → string;
  timestamp → long (local-timestamp-micros) | ``TimestampSpecial``;
  timestamptz → long (timestamp-micros) | ``TimestamptzSpecial``;
* interval → record ``fieldsync.pg.Interval`` {months:int, days:int, micros:long} | ``IntervalSpecial``;
* uuid → string (uuid); json/jsonb → string with ``"pg.json": true``; enum → string with
  ``"pg.enum": "<schema.type>"``; domain → its base type; arrays → nested Avro arrays
  (elements nullable, up to PostgreSQL's 6 dimensions), or, for arrays with lower bounds other
  than 1, the PostgreSQL array literal as a string;
* anything else → string of its text form, and ``warn()`` is called once for the column.

The decoder's session must use the settings in :data:`SESSION_SETTINGS` (ISO dates,
``postgres`` interval style); the parsers reject other formats with a message naming the
setting.

Concurrency: everything here is immutable after construction; converters keep no state
except an LRU cache of parsed dates (thread-safe).
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC as _UTC
from datetime import date as _date
from datetime import datetime as _datetime
from datetime import time as _time
from datetime import timedelta as _timedelta
from typing import Any, Protocol

from core.errors import SchemaError

__all__ = [
    "BUILTIN_TYPES",
    "CATALOG_QUERY",
    "PG_NAMESPACE",
    "SESSION_SETTINGS",
    "ColumnCodec",
    "ColumnSpec",
    "MappingCatalog",
    "TypeCatalog",
    "TypeInfo",
    "TypeKind",
    "column_codec",
    "dedupe_named",
    "parse_array",
    "returns_text_unchanged",
]

#: Avro namespace of the shared helper types (special-value enums, decimals, interval).
PG_NAMESPACE = "fieldsync.pg"

#: Settings the replication session must use so that values arrive in the formats parsed
#: here (pass them as libpq ``options``, e.g. ``-c DateStyle=ISO``).  TimeZone is not
#: needed for correctness (offsets are parsed) but keeps timestamptz text short.
SESSION_SETTINGS: Mapping[str, str] = {
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "TimeZone": "UTC",
}

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_MAX_ARRAY_DIMS = 6  # PostgreSQL's MAXDIM
_UNIX_EPOCH_ORDINAL = 719163  # date(1970, 1, 1).toordinal()
_MICROS_PER_DAY = 86_400_000_000


class TypeKind(enum.Enum):
    """Kind of a PostgreSQL type (``pg_type.typtype``, plus ``a`` for true array types)."""

    BASE = "b"
    ENUM = "e"
    DOMAIN = "d"
    ARRAY = "a"
    COMPOSITE = "c"
    RANGE = "r"
    PSEUDO = "p"
    OTHER = "?"

    @classmethod
    def from_code(cls, code: str) -> TypeKind:
        """Map a catalog kind letter to a kind; unknown letters (e.g. multirange ``m``) → OTHER."""
        try:
            return cls(code)
        except ValueError:
            return cls.OTHER


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """One row of ``pg_type`` as far as the mapping needs it."""

    oid: int
    name: str
    namespace: str
    kind: TypeKind
    base_oid: int | None = None  # domain -> base type
    elem_oid: int | None = None  # array -> element type
    base_typmod: int = -1  # domain -> the base type's modifier (``numeric(10,2)``)

    @classmethod
    def from_catalog_row(cls, row: Sequence[Any] | Mapping[str, Any]) -> TypeInfo:
        """Build from a row of :data:`CATALOG_QUERY` (a tuple in column order, or a dict row)."""
        if isinstance(row, Mapping):
            values = [row.get(k) for k in _CATALOG_COLUMNS]
        else:
            values = list(row) + [None] * (len(_CATALOG_COLUMNS) - len(row))
        oid, name, namespace, kind, base_oid, elem_oid, base_typmod = values[
            : len(_CATALOG_COLUMNS)
        ]
        if oid is None or name is None:
            raise SchemaError(f"pg_type catalog row without oid or name: {row!r}")
        return cls(
            oid=int(oid),
            name=str(name),
            namespace=str(namespace or ""),
            kind=TypeKind.from_code(str(kind or "?")),
            base_oid=int(base_oid) if base_oid is not None else None,
            elem_oid=int(elem_oid) if elem_oid is not None else None,
            base_typmod=int(base_typmod) if base_typmod is not None else -1,
        )

    @property
    def qualified_name(self) -> str:
        """``int4`` for pg_catalog types, ``schema.name`` for every other type."""
        if self.namespace in ("pg_catalog", ""):
            return self.name
        return f"{self.namespace}.{self.name}"


class TypeCatalog(Protocol):
    """Where the mapping looks up types that are not in :data:`BUILTIN_TYPES`."""

    def lookup(self, oid: int) -> TypeInfo | None:
        """The type with this oid, or None if unknown."""
        ...


class MappingCatalog:
    """A :class:`TypeCatalog` over a fixed set of :class:`TypeInfo` (e.g. rows of CATALOG_QUERY)."""

    def __init__(self, infos: Mapping[int, TypeInfo] | Sequence[TypeInfo] = ()) -> None:
        items = infos.values() if isinstance(infos, Mapping) else infos
        self._infos: dict[int, TypeInfo] = {info.oid: info for info in items}

    def add(self, info: TypeInfo) -> None:
        """Add or replace one type."""
        self._infos[info.oid] = info

    def lookup(self, oid: int) -> TypeInfo | None:
        """The type with this oid, or None."""
        return self._infos.get(oid)


_CATALOG_COLUMNS = ("oid", "name", "namespace", "kind", "base_oid", "elem_oid", "base_typmod")

#: Fetches the given type oids *and*, recursively, the base types of domains and the element
#: types of arrays they need.  One parameter ``%(oids)s``: a list of ints (psycopg adapts it
#: to an array).  Columns: oid, name, namespace, kind (``b e d a c r p``, ``m`` for
#: multiranges), base_oid, elem_oid, base_typmod.  Feed each row to TypeInfo.from_catalog_row.
CATALOG_QUERY = """\
WITH RECURSIVE wanted(oid) AS (
    SELECT o::oid FROM unnest(%(oids)s::int8[]) AS o
  UNION
    SELECT CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.typelem END
    FROM pg_catalog.pg_type AS t
    JOIN wanted AS w ON t.oid = w.oid
    WHERE t.typtype = 'd' OR t.typelem <> 0
)
SELECT t.oid::int8 AS oid,
       t.typname::text AS name,
       n.nspname::text AS namespace,
       CASE WHEN e.typarray = t.oid THEN 'a' ELSE t.typtype::text END AS kind,
       CASE WHEN t.typtype = 'd' THEN t.typbasetype::int8 END AS base_oid,
       CASE WHEN e.typarray = t.oid THEN t.typelem::int8 END AS elem_oid,
       CASE WHEN t.typtype = 'd' THEN t.typtypmod END AS base_typmod
FROM pg_catalog.pg_type AS t
JOIN pg_catalog.pg_namespace AS n ON n.oid = t.typnamespace
LEFT JOIN pg_catalog.pg_type AS e ON e.oid = t.typelem AND t.typelem <> 0
WHERE t.oid IN (SELECT oid FROM wanted)
"""


def _builtin_table() -> dict[int, TypeInfo]:
    # (oid, typname, array oid)
    scalars = [
        (16, "bool", 1000),
        (17, "bytea", 1001),
        (18, "char", 1002),
        (19, "name", 1003),
        (20, "int8", 1016),
        (21, "int2", 1005),
        (23, "int4", 1007),
        (25, "text", 1009),
        (26, "oid", 1028),
        (114, "json", 199),
        (142, "xml", 143),
        (650, "cidr", 651),
        (700, "float4", 1021),
        (701, "float8", 1022),
        (774, "macaddr8", 775),
        (829, "macaddr", 1040),
        (869, "inet", 1041),
        (1042, "bpchar", 1014),
        (1043, "varchar", 1015),
        (1082, "date", 1182),
        (1083, "time", 1183),
        (1114, "timestamp", 1115),
        (1184, "timestamptz", 1185),
        (1186, "interval", 1187),
        (1266, "timetz", 1270),
        (1560, "bit", 1561),
        (1562, "varbit", 1563),
        (1700, "numeric", 1231),
        (2950, "uuid", 2951),
        (3220, "pg_lsn", 3221),
        (3802, "jsonb", 3807),
    ]
    table: dict[int, TypeInfo] = {}
    for oid, name, array_oid in scalars:
        table[oid] = TypeInfo(oid, name, "pg_catalog", TypeKind.BASE)
        table[array_oid] = TypeInfo(
            array_oid, "_" + name, "pg_catalog", TypeKind.ARRAY, elem_oid=oid
        )
    return table


#: Every builtin type (and its array type) that has a mapping here, by oid.
BUILTIN_TYPES: dict[int, TypeInfo] = _builtin_table()


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """A column of a pgoutput Relation message."""

    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True, eq=False)
class ColumnCodec:
    """How one column is represented in Avro.

    ``avro_schema`` is the field type (JSON-able, always a union with ``"null"`` first; a
    named type is defined at its first use and referenced by full name after that, see
    :func:`dedupe_named` for combining several columns).  ``convert(text)`` turns PostgreSQL's text form into the Avro datum
    (raising ValueError on text it cannot read); it is never called with None.
    """

    spec: ColumnSpec
    pg_type: str
    avro_schema: list[Any]
    convert: Callable[[str], Any]
    props: Mapping[str, Any] = field(default_factory=dict)

    def avro_field(self, field_name: str) -> dict[str, Any]:
        """The Avro record field for this column, with the ``pg.*`` properties."""
        out: dict[str, Any] = {
            "name": field_name,
            "type": self.avro_schema,
            "default": None,
            "pg.name": self.spec.name,
            "pg.type": self.pg_type,
            "pg.oid": self.spec.type_oid,
            "pg.typmod": self.spec.type_modifier,
        }
        if self.spec.is_key:
            out["pg.key"] = True
        out.update(self.props)
        return out


# --------------------------------------------------------------------------------------
# Value parsers (text -> Avro datum).  Each raises ValueError on text it does not accept.
# --------------------------------------------------------------------------------------


def _identity(text: str) -> str:
    return text


def returns_text_unchanged(convert: Callable[[str], Any]) -> bool:
    """Whether ``convert`` gives back PostgreSQL's text as is (a caller may skip the call)."""
    return convert is _identity


def _parse_bool(text: str) -> bool:
    if text == "t":
        return True
    if text == "f":
        return False
    raise ValueError(f"not a boolean text form (expected 't' or 'f'): {text!r}")


def _parse_float(text: str) -> float:
    # float() accepts PostgreSQL's NaN / Infinity / -Infinity and exponent forms.
    return float(text)


def _parse_bytea(text: str) -> bytes:
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


_DATE_RE = re.compile(r"(\d{4,})-(\d\d)-(\d\d)( BC)?")


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


_TIME_RE = re.compile(
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


def _parse_time(text: str) -> int:
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


_EPOCH_NAIVE = _datetime(1970, 1, 1)
_EPOCH_UTC = _datetime(1970, 1, 1, tzinfo=_UTC)
_ONE_MICRO = _timedelta(microseconds=1)


def _timestamp_parser(*, with_tz: bool) -> Callable[[str], int | str]:
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


def _parse_date(text: str) -> int | str:
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


_INTERVAL_RE = re.compile(
    r"(?:([+-]?\d+) years? ?)?"
    r"(?:([+-]?\d+) mons? ?)?"
    r"(?:([+-]?\d+) days? ?)?"
    r"(?:([+-])?(\d+):(\d\d):(\d\d)(?:\.(\d{1,6}))?)?"
)


def _parse_interval(text: str) -> dict[str, int] | str:
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


_NUMERIC_SPECIAL = {"NaN": "NAN", "Infinity": "INFINITY", "-Infinity": "NEG_INFINITY"}


def _decimal_size(precision: int) -> int:
    """Smallest fixed size (bytes) holding any unscaled value of ``precision`` digits."""
    size = 1
    while (1 << (8 * size - 1)) < 10**precision:
        size += 1
    return size


def _numeric_parser(precision: int, scale: int, size: int) -> Callable[[str], bytes | str]:
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


def _array_converter(elem_convert: Callable[[str], Any]) -> Callable[[str], Any]:
    identity = elem_convert is _identity

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
        if identity and all(x is None or x.__class__ is str for x in items):
            return items
        return convert_list(items)

    return convert


# --------------------------------------------------------------------------------------
# Type -> mapping.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Mapped:
    branches: list[Any]  # the non-null union branches
    convert: Callable[[str], Any]
    label: str  # value of "pg.type"
    props: dict[str, Any] = field(default_factory=dict)
    exact: bool = True  # False: fell back to the text form of an unmapped type


def _special_enum(name: str, symbols: list[str]) -> dict[str, Any]:
    return {"type": "enum", "name": f"{PG_NAMESPACE}.{name}", "symbols": symbols}


_INFINITIES = ["INFINITY", "NEG_INFINITY"]

_INTERVAL_RECORD: dict[str, Any] = {
    "type": "record",
    "name": f"{PG_NAMESPACE}.Interval",
    "fields": [
        {"name": "months", "type": "int"},
        {"name": "days", "type": "int"},
        {"name": "micros", "type": "long"},
    ],
}


def _precision_suffix(typmod: int) -> str:
    return f"({typmod})" if typmod >= 0 else ""


def _numeric_typmod(typmod: int) -> tuple[int, int] | None:
    if typmod < 4:
        return None
    t = typmod - 4
    precision = (t >> 16) & 0xFFFF
    scale = ((t & 0x7FF) ^ 1024) - 1024  # 11-bit signed since PostgreSQL 15
    return precision, scale


def _map_numeric(typmod: int) -> _Mapped:
    ps = _numeric_typmod(typmod)
    if ps is None:
        return _Mapped(["string"], _identity, "numeric")
    precision, scale = ps
    label = f"numeric({precision},{scale})"
    if not (0 <= scale <= precision) or precision < 1:
        return _Mapped(["string"], _identity, label)  # not expressible as an Avro decimal
    size = _decimal_size(precision)
    fixed = {
        "type": "fixed",
        "name": f"{PG_NAMESPACE}.Numeric_p{precision}_s{scale}",
        "size": size,
        "logicalType": "decimal",
        "precision": precision,
        "scale": scale,
    }
    special = _special_enum("NumericSpecial", ["NAN", *_INFINITIES])
    return _Mapped([fixed, special], _numeric_parser(precision, scale, size), label)


def _map_builtin_base(oid: int, typmod: int) -> _Mapped | None:
    simple = _SIMPLE.get(oid)
    if simple is not None:
        branch, convert, label = simple
        return _Mapped([branch], convert, label)
    if oid in (1042, 1043, 1560, 1562):  # bpchar(n), varchar(n), bit(n), varbit(n)
        name = BUILTIN_TYPES[oid].name
        n = typmod - 4 if oid in (1042, 1043) else typmod
        return _Mapped(["string"], _identity, name + (f"({n})" if n >= 0 else ""))
    if oid == 1700:
        return _map_numeric(typmod)
    if oid == 1082:
        return _Mapped(
            [{"type": "int", "logicalType": "date"}, _special_enum("DateSpecial", _INFINITIES)],
            _parse_date,
            "date",
        )
    if oid == 1083:
        return _Mapped(
            [{"type": "long", "logicalType": "time-micros"}],
            _parse_time,
            "time" + _precision_suffix(typmod),
        )
    if oid == 1266:
        return _Mapped(["string"], _identity, "timetz" + _precision_suffix(typmod))
    if oid == 1114:
        return _Mapped(
            [
                {"type": "long", "logicalType": "local-timestamp-micros"},
                _special_enum("TimestampSpecial", _INFINITIES),
            ],
            _timestamp_parser(with_tz=False),
            "timestamp" + _precision_suffix(typmod),
        )
    if oid == 1184:
        return _Mapped(
            [
                {"type": "long", "logicalType": "timestamp-micros"},
                _special_enum("TimestamptzSpecial", _INFINITIES),
            ],
            _timestamp_parser(with_tz=True),
            "timestamptz" + _precision_suffix(typmod),
        )
    if oid == 1186:
        return _Mapped(
            [_INTERVAL_RECORD, _special_enum("IntervalSpecial", _INFINITIES)],
            _parse_interval,
            "interval",
        )
    return None


_SIMPLE: dict[int, tuple[Any, Callable[[str], Any], str]] = {
    16: ("boolean", _parse_bool, "bool"),
    17: ("bytes", _parse_bytea, "bytea"),
    18: ("string", _identity, "char"),
    19: ("string", _identity, "name"),
    20: ("long", int, "int8"),
    21: ("int", int, "int2"),
    23: ("int", int, "int4"),
    25: ("string", _identity, "text"),
    26: ("long", int, "oid"),
    114: ({"type": "string", "pg.json": True}, _identity, "json"),
    142: ("string", _identity, "xml"),
    650: ("string", _identity, "cidr"),
    700: ("float", _parse_float, "float4"),
    701: ("double", _parse_float, "float8"),
    774: ("string", _identity, "macaddr8"),
    829: ("string", _identity, "macaddr"),
    869: ("string", _identity, "inet"),
    2950: ({"type": "string", "logicalType": "uuid"}, _identity, "uuid"),
    3220: ("string", _identity, "pg_lsn"),
    3802: ({"type": "string", "pg.json": True}, _identity, "jsonb"),
}


def _unmapped(label: str) -> _Mapped:
    return _Mapped(["string"], _identity, label, exact=False)


def _map_type(oid: int, typmod: int, catalog: TypeCatalog, depth: int = 0) -> _Mapped:
    if depth > 32:
        raise SchemaError(f"type oid {oid}: domain/array nesting deeper than 32 levels")
    info = BUILTIN_TYPES.get(oid)
    if info is None:
        info = catalog.lookup(oid)
    if info is None:
        return _unmapped(f"unknown(oid {oid})")
    kind = info.kind
    if kind is TypeKind.BASE:
        mapped = _map_builtin_base(oid, typmod) if oid in BUILTIN_TYPES else None
        return mapped if mapped is not None else _unmapped(info.qualified_name)
    if kind is TypeKind.ENUM:
        return _Mapped(
            [{"type": "string", "pg.enum": info.qualified_name}], _identity, info.qualified_name
        )
    if kind is TypeKind.DOMAIN and info.base_oid is not None:
        base = _map_type(
            info.base_oid, typmod if typmod >= 0 else info.base_typmod, catalog, depth + 1
        )
        props = {"pg.base_type": base.label, **base.props}
        return _Mapped(base.branches, base.convert, info.qualified_name, props, base.exact)
    if kind is TypeKind.ARRAY and info.elem_oid is not None:
        elem = _map_type(info.elem_oid, typmod, catalog, depth + 1)
        label = elem.label + "[]"
        if not elem.exact:
            return _unmapped(label)
        array = {"type": "array", "items": _nested_items(elem.branches, _MAX_ARRAY_DIMS - 1)}
        props = (
            {"pg.element_base_type": elem.props["pg.base_type"]}
            if "pg.base_type" in elem.props
            else {}
        )
        return _Mapped([array, "string"], _array_converter(elem.convert), label, props)
    return _unmapped(info.qualified_name)


def _nested_items(elem_branches: list[Any], levels_below: int) -> list[Any]:
    """Items union of an array level: the element, or (if dimensions remain) a nested array."""
    items: list[Any] = ["null", *elem_branches]
    if levels_below > 0:
        items.append({"type": "array", "items": _nested_items(elem_branches, levels_below - 1)})
    return items


_NAMED_TYPES = frozenset({"record", "enum", "fixed", "error"})


def dedupe_named(schema: Any, seen: dict[str, Any] | None = None) -> Any:
    """Copy of a JSON-form schema where each named type is defined once (at its first use)
    and referenced by its full name afterwards.  ``seen`` carries definitions across calls.

    Names must be full names (this module never uses ``namespace``).  Two different
    definitions under one name raise SchemaError.
    """
    if seen is None:
        seen = {}
    if isinstance(schema, list):
        return [dedupe_named(s, seen) for s in schema]
    if not isinstance(schema, dict):
        return schema
    kind = schema.get("type")
    if kind in _NAMED_TYPES:
        name = schema["name"]
        if name in seen:
            if seen[name] != schema:
                raise SchemaError(f"two different Avro types are both named {name!r}")
            return name
        seen[name] = schema
        out = dict(schema)
        if "fields" in schema:
            out["fields"] = [{**f, "type": dedupe_named(f["type"], seen)} for f in schema["fields"]]
        return out
    if kind == "array":
        return {**schema, "items": dedupe_named(schema["items"], seen)}
    if kind == "map":
        return {**schema, "values": dedupe_named(schema["values"], seen)}
    return schema


def column_codec(
    spec: ColumnSpec, catalog: TypeCatalog, warn: Callable[[str], None]
) -> ColumnCodec:
    """Decide the Avro type and value converter of one column.

    Calls ``warn`` once if the type has no mapping and is carried as its text form.
    """
    mapped = _map_type(spec.type_oid, spec.type_modifier, catalog)
    if not mapped.exact:
        warn(
            f"column {spec.name!r}: type {mapped.label} (oid {spec.type_oid}) has no Avro "
            "mapping; its values are sent as their PostgreSQL text form (Avro string)"
        )
    return ColumnCodec(
        spec=spec,
        pg_type=mapped.label,
        avro_schema=dedupe_named(["null", *mapped.branches]),
        convert=mapped.convert,
        props=dict(mapped.props),
    )
