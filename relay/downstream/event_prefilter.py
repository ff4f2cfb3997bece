"""Reading the placement and key columns of a change event without decoding the whole event.

A change whose row no rule places (it lands in no bucket) needs little of its event: an
insert changes nothing in the bucket store (the planner neither looks its key up nor
writes a state for it: relay/downstream/planner.py, ``lookup_refs``), and an update or a
delete only has to take the row out of the buckets the store remembers it in, for which
the planner needs its key alone.  Those columns sit near the front of the event: the
value (core/avro_envelope.py) is ``op``, ``before``, ``before_kind``, ``after``,
``unchanged``, ... and a row is its fields in column order.

:func:`compile_prefix_reader` turns a writer schema into a reader of that prefix.  It gives
the wanted columns (the placement columns and, given ``key``, the primary key) as fastavro
would decode them (``long``/``int`` → int, ``string`` → str, ``boolean``,
``float``/``double``, ``enum`` → its symbol, ``null``; dates and times are plain ints as the
engine decodes them), with the event's op:

- ``c`` (an insert without an old row): the columns of ``after``, read and skipped only up
  to the last wanted column;
- ``u`` (an update, or a snapshot read ``r``, without an old row: the key did not change,
  and REPLICA IDENTITY FULL did not send the old row): the columns of ``after``, only when
  no column is unchanged TOAST;
- ``d`` (a delete): the columns of ``before`` (its key columns are real ones);

and for ``u`` and ``d`` also ``source.commit_ts_us`` and ``source.origin`` (the rest of the
row, ``unchanged`` and the start of ``source`` are skipped without making values of them);
``None`` for any other event, or bytes without the single-object marker (the caller
decodes it in full).  Updates and deletes are read only when ``key`` names the table's key
columns and those are of the types above.  A schema whose wanted columns have another type
(decimals, bytes, arrays...) or whose envelope is laid out otherwise gets no reader; one
where a column after the wanted ones cannot be skipped (records, arrays, maps) gets a
reader of inserts only.

Pure: no I/O; a reader keeps no state, so it may be shared between threads.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import fastavro

from core.avro_envelope import HEADER_LEN, MAGIC
from core.avro_reader import read_long

Prefix = tuple[str, dict[str, Any], int | None, str | None]
"""An event's op (``c``, ``u`` or ``d``), its wanted columns (PostgreSQL names), and for an
update or a delete its ``source.commit_ts_us`` and ``source.origin`` (None for an insert)."""
PrefixReader = Callable[[bytes], Prefix | None]
"""Event value bytes → its :data:`Prefix`, or None (decode it in full)."""

_READABLE: Final = frozenset({"null", "boolean", "int", "long", "float", "double", "string"})
_ENVELOPE_PREFIX: Final = ("op", "before", "before_kind", "after", "unchanged", "source")

# A field program step: (kind, argument); kinds below.
_NULL, _BOOL, _LONG, _FLOAT, _DOUBLE, _STRING, _BYTES, _FIXED, _ENUM, _UNION = range(10)
Step = tuple[int, Any]
_SIMPLE: Final = {
    "null": _NULL,
    "boolean": _BOOL,
    "int": _LONG,
    "long": _LONG,
    "float": _FLOAT,
    "double": _DOUBLE,
    "string": _STRING,
    "bytes": _BYTES,
}


class _Unsupported(Exception):
    """A type the prefix reader does not handle (the caller decodes in full)."""


def _step(schema: Any, readable: bool) -> Step:
    """The step reading (``readable``: into a value equal to fastavro's) or skipping one
    value of ``schema`` (an expanded schema: named types inline)."""
    if isinstance(schema, list):
        return (_UNION, tuple(_step(branch, readable) for branch in schema))
    if isinstance(schema, str):
        schema = {"type": schema}
    if not isinstance(schema, dict):
        raise _Unsupported(repr(schema))
    kind = schema["type"]
    if isinstance(kind, (dict, list)):
        return _step(kind, readable)
    if readable and (
        (kind not in _READABLE and kind != "enum") or schema.get("logicalType") == "decimal"
    ):
        raise _Unsupported(f"{kind} ({schema.get('logicalType')})")
    if kind in _SIMPLE:
        return (_SIMPLE[kind], None)
    if kind == "fixed":
        return (_FIXED, int(schema["size"]))
    if kind == "enum":
        return (_ENUM, tuple(schema["symbols"]))
    raise _Unsupported(kind)  # records, arrays and maps are never skipped here


def _branch(branches: tuple[Step, ...], data: bytes, pos: int) -> tuple[Step, int]:
    """The step of the union branch whose index is at ``pos``, and the position after it."""
    index, pos = read_long(data, pos)
    if index < 0:
        raise ValueError(f"union branch {index}")
    return branches[index], pos


def _read(step: Step, data: bytes, pos: int) -> tuple[Any, int]:
    kind, arg = step
    if kind == _UNION:
        branch, pos = _branch(arg, data, pos)
        return _read(branch, data, pos)
    if kind == _LONG:
        return read_long(data, pos)
    if kind == _STRING or kind == _BYTES:
        size, pos = read_long(data, pos)
        raw = data[pos : pos + size]
        return (raw.decode("utf-8") if kind == _STRING else bytes(raw)), pos + size
    if kind == _NULL:
        return None, pos
    if kind == _BOOL:
        return data[pos] == 1, pos + 1
    if kind == _ENUM:
        index, pos = read_long(data, pos)
        return arg[index], pos
    if kind == _FLOAT:
        return struct.unpack_from("<f", data, pos)[0], pos + 4
    if kind == _DOUBLE:
        return struct.unpack_from("<d", data, pos)[0], pos + 8
    return None, pos + int(arg)  # _FIXED: never wanted, so never read


def _skip(step: Step, data: bytes, pos: int) -> int:
    """The position after the value of ``step`` at ``pos`` (read past, nothing made of it)."""
    kind, arg = step
    if kind == _UNION:
        branch, pos = _branch(arg, data, pos)
        return _skip(branch, data, pos)
    if kind == _LONG or kind == _ENUM:
        return read_long(data, pos)[1]
    if kind == _STRING or kind == _BYTES:
        size, pos = read_long(data, pos)
        if size < 0:
            raise ValueError(f"length {size}")
        return pos + size
    if kind == _NULL:
        return pos
    if kind == _BOOL:
        return pos + 1
    if kind == _FLOAT:
        return pos + 4
    if kind == _DOUBLE:
        return pos + 8
    return pos + int(arg)  # _FIXED


def compile_prefix_reader(
    schema: Mapping[str, Any], wanted: Sequence[str], key: Sequence[str] = ()
) -> PrefixReader | None:
    """The prefix reader of change events written with ``schema`` (the value schema's
    JSON, parsed) for the placement columns ``wanted`` and the key columns ``key`` (empty:
    inserts only); None when the schema does not allow one (see the module docstring)."""
    if not wanted:
        return None
    found = _compile(schema, wanted, key) if key else None
    return found if found is not None else _compile(schema, wanted, ())


def _compile(
    schema: Mapping[str, Any], wanted: Sequence[str], key: Sequence[str]
) -> PrefixReader | None:
    try:
        expanded: Any = fastavro.parse_schema(dict(schema), expand=True)
        fields = expanded["fields"]
        if tuple(f["name"] for f in fields[:6]) != _ENVELOPE_PREFIX:
            return None
        before, after = fields[1]["type"], fields[3]["type"]
        if not (isinstance(before, list) and len(before) == 2 and before[0] == "null"):
            return None
        if not (isinstance(after, list) and len(after) == 2 and after[0] == "null"):
            return None
        if before[1] != after[1]:  # both are the table's row record
            return None
        columns = after[1]["fields"]
        by_name = {str(c.get("pg.name", c["name"])): i for i, c in enumerate(columns)}
        read_columns = [*wanted, *(k for k in key if k not in wanted)]
        if any(w not in by_name for w in read_columns):
            return None
        names = {by_name[w]: w for w in read_columns}
        last = max(names) + 1
        steps = [
            (names.get(i), _step(c["type"], readable=i in names))
            for i, c in enumerate(columns[:last])
        ]
        before_kind = _step(fields[2]["type"], readable=False)
    except (_Unsupported, KeyError, TypeError, ValueError, IndexError):
        return None
    rest: _Rest | None = None
    if key:
        try:
            rest = _Rest(
                [_step(c["type"], readable=False) for c in columns[last:]],
                _source_steps(fields[5]["type"]),
            )
        except (_Unsupported, KeyError, TypeError, ValueError, IndexError):
            rest = None
    return _make_reader(before_kind, steps, rest)


_SOURCE_WANTED: Final = ("commit_ts_us", "origin")


def _source_steps(source: Any) -> list[tuple[int, Step]]:
    """The steps reading ``source`` up to its ``commit_ts_us`` and ``origin``: (1, step)
    reads ``commit_ts_us``, (2, step) ``origin``, (0, step) skips a field."""
    names = [f["name"] for f in source["fields"]]
    last = max(names.index(n) for n in _SOURCE_WANTED) + 1
    return [
        (
            _SOURCE_WANTED.index(n) + 1 if n in _SOURCE_WANTED else 0,
            _step(f["type"], n in _SOURCE_WANTED),
        )
        for n, f in zip(names[:last], source["fields"][:last], strict=True)
    ]


class _Rest:
    """What an update's or a delete's read goes on with after the wanted columns: the
    steps skipping the rest of the row, and those reading ``source``."""

    def __init__(self, tail: list[Step], source: list[tuple[int, Step]]) -> None:
        self.tail = tail
        self.source = source


_C: Final = 0x63
_U: Final = 0x75
_R: Final = 0x72
_D: Final = 0x64


def _make_reader(
    before_kind: Step, steps: list[tuple[str | None, Step]], rest: _Rest | None
) -> PrefixReader:
    def columns(value: bytes, pos: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        for name, step in steps:
            if name is None:
                pos = _skip(step, value, pos)
            else:
                out[name], pos = _read(step, value, pos)
        return out, pos

    def finish(op: str, row: dict[str, Any], value: bytes, pos: int) -> Prefix | None:
        """The rest of an update or a delete past the wanted columns at ``pos``: ``None``
        when some column is unchanged TOAST."""
        assert rest is not None
        for step in rest.tail:
            pos = _skip(step, value, pos)
        if op == "d":
            pos = _skip(before_kind, value, pos)
            if value[pos] != 0:  # after: a row
                return None
            pos += 1
        if value[pos] != 0:  # unchanged: a non-empty array (some TOAST columns not sent)
            return None
        pos += 1
        committed: Any = None
        origin: Any = None
        for which, step in rest.source:
            if which == 0:
                pos = _skip(step, value, pos)
            elif which == 1:
                committed, pos = _read(step, value, pos)
            else:
                origin, pos = _read(step, value, pos)
        return op, row, committed, origin

    def read(value: bytes) -> Prefix | None:
        if value[:2] != MAGIC:  # not single-object encoded: the full decode says so
            return None
        size, pos = read_long(value, HEADER_LEN)
        if size != 1:
            return None
        op = value[pos]
        pos += 1
        if op == _D:
            if rest is None or value[pos] != 2:  # before: union branch 1 (zigzag 2), the row
                return None
            row, pos = columns(value, pos + 1)
            return finish("d", row, value, pos)
        if op != _C and (rest is None or (op != _U and op != _R)):
            return None
        if value[pos] != 0:  # an old row: a key change, or REPLICA IDENTITY FULL
            return None
        pos = _skip(before_kind, value, pos + 1)
        if value[pos] != 2:  # after: union branch 1 (zigzag 2), the row
            return None
        row, pos = columns(value, pos + 1)
        if op == _C:
            return "c", row, None, None
        return finish("u", row, value, pos)

    return read
