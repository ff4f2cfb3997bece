"""PostgreSQL types as the capture side knows them: the type catalog, the columns of a
relation, and the session settings values are read with (pure, no I/O).

A column's type is an oid (and a type modifier).  :data:`BUILTIN_TYPES` holds every builtin
type the mapping (:mod:`core.pg_type_mapping`) knows, with its array type; anything else
(user-defined enums, domains, arrays of them) is looked up through a :class:`TypeCatalog`,
filled from :data:`CATALOG_QUERY` by whoever holds a connection (``cdc.pg_catalog``, the
applier, replay).

Values are read in PostgreSQL's *text* output format: what pgoutput sends, and what a
snapshot reads once :func:`output_function_text` is set on its cursor.  The session must use
the settings in :data:`SESSION_SETTINGS` (ISO dates, ``postgres`` interval style); the
parsers (:mod:`core.pg_values`) reject other formats with a message naming the setting.

Concurrency: everything here is immutable after construction, except a
:class:`MappingCatalog` being filled (not synchronized).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from core.errors import SchemaError

__all__ = [
    "BUILTIN_TYPES",
    "CATALOG_QUERY",
    "SESSION_SETTINGS",
    "ColumnSpec",
    "MappingCatalog",
    "TypeCatalog",
    "TypeInfo",
    "TypeKind",
    "output_function_text",
]

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

TEXT_OID: Final = 25
_TEXT_FORMAT: Final = 0  # psycopg.pq.Format.TEXT


def output_function_text(cur: Any) -> None:
    """Make a psycopg cursor ``cur`` return every column as its type's output-function text,
    unparsed.

    That is exactly what pgoutput sends; ``::text`` casts are not (``bool::text`` is
    ``true`` where the output function prints ``t``; ``inet::text`` adds the mask).
    Types psycopg does not know (enums, domains' own oids) come back as text already.
    The cursor's own adapters are used (psycopg's text loader, every type it knows), so
    this module needs no driver.
    """
    adapters = cur.adapters
    text_loader = adapters.get_loader(TEXT_OID, _TEXT_FORMAT)
    for t in adapters.types:
        for oid in (t.oid, t.array_oid):
            if oid:
                adapters.register_loader(oid, text_loader)


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


#: The index whose columns are a table's row identity, its Kafka key (``i`` an index of the
#: table ``c``, both aliases of the query it goes into): the replica identity index under
#: ``REPLICA IDENTITY USING INDEX``, else the primary key (docs/events.md "Key").  cdc keys
#: events by it; the relay names a table's rows, and the applier finds them, by the same
#: columns (in the table's column order).
KEY_INDEX = """((c.relreplident = 'i' and i.indisreplident)
  or (c.relreplident <> 'i' and i.indisprimary))"""

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
