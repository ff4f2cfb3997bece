"""Catalog lookups on a normal (non-replication) connection: types and primary keys.

The replication connection is busy in COPY_BOTH mode, so the cdc daemon keeps a
second, ordinary connection for these.  Results are cached; the cache of a
relation is dropped when a new Relation message redefines it.  Lookups reflect
the catalog *now*, which matters only for user-defined types dropped after the
change was made: those fall back to their text form (with a warning).
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from cdc.pg_types import BUILTIN_TYPES, CATALOG_QUERY, TypeInfo

log = logging.getLogger(__name__)

PK_QUERY = """
select a.attname
from pg_index i
join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
where i.indrelid = %s and i.indisprimary
order by array_position(i.indkey::int2[], a.attnum)
"""


class PgCatalog:
    """Implements ``RelationCatalog`` over a psycopg connection factory."""

    def __init__(self, dsn: str, password: str | None = None) -> None:
        self.dsn = dsn
        self.password = password
        self._conn: psycopg.Connection[Any] | None = None
        self._types: dict[int, TypeInfo | None] = {}
        self._pk: dict[int, tuple[str, ...] | None] = {}

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            kw: dict[str, Any] = {"autocommit": True, "connect_timeout": 10}
            if self.password:
                kw["password"] = self.password
            self._conn = psycopg.connect(self.dsn, **kw)
        return self._conn

    def lookup(self, oid: int) -> TypeInfo | None:
        if oid in BUILTIN_TYPES:
            return BUILTIN_TYPES[oid]
        if oid not in self._types:
            self._load_types([oid])
        return self._types.get(oid)

    def _load_types(self, oids: list[int]) -> None:
        todo = list(oids)
        seen: set[int] = set()
        while todo:
            batch = [o for o in todo if o not in seen and o not in BUILTIN_TYPES]
            if not batch:
                break
            seen.update(batch)
            rows = self._connection().execute(CATALOG_QUERY, {"oids": batch}).fetchall()
            found: dict[int, TypeInfo] = {}
            for row in rows:
                parsed = TypeInfo.from_catalog_row(row)
                found[parsed.oid] = parsed
            todo = []
            for o in batch:
                info = found.get(o)
                self._types[o] = info
                if info is not None:
                    for dep in (info.base_oid, info.elem_oid):
                        if dep and dep not in self._types and dep not in BUILTIN_TYPES:
                            todo.append(dep)

    def primary_key(self, relation_oid: int) -> tuple[str, ...] | None:
        if relation_oid not in self._pk:
            rows = self._connection().execute(PK_QUERY, (relation_oid,)).fetchall()
            self._pk[relation_oid] = tuple(r[0] for r in rows) or None
        return self._pk[relation_oid]

    def forget_relation(self, relation_oid: int) -> None:
        self._pk.pop(relation_oid, None)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
