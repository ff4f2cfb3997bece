"""Catalog lookups on a normal (non-replication) connection: types, primary keys, a
table's Kafka key columns, and the table signatures the re-snapshots compare.

The replication connection is busy in COPY_BOTH mode, so the cdc daemon keeps a
second, ordinary connection for these.  Results are cached; the cache of a
relation is dropped when a new Relation message redefines it.  Lookups reflect
the catalog *now*, which matters only for user-defined types dropped after the
change was made: those fall back to their text form (with a warning).

:func:`read_signatures` (not cached) reads, for every table of a publication, what
values depend on: file node (changes on a rewrite), columns with type, modifier,
``atthasmissing`` and the xmin of their ``pg_attribute`` row (changes when an ALTER
touches the column), and the labels of every enum type a column uses through
domains, arrays, ranges and composite types (:mod:`cdc.incremental_snapshot`), the
attributes of every composite type they use that way, the partitions of a partitioned
table (at any depth) with their file nodes, the table's replica identity and its Kafka key
columns (:data:`core.pg_types.KEY_INDEX`).
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from cdc.ddl_detection import (
    ColumnFacts,
    CompositeFacts,
    EnumFacts,
    PartitionFacts,
    TableSignature,
)
from cdc.pgoutput_messages import ReplicaIdentity
from core.pg_types import BUILTIN_TYPES, CATALOG_QUERY, KEY_INDEX, TypeInfo

log = logging.getLogger(__name__)

PK_QUERY = """
select a.attname
from pg_index i
join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
where i.indrelid = %s and i.indisprimary
order by array_position(i.indkey::int2[], a.attnum)
"""

KEY_QUERY = f"""
select a.attname
from pg_index i
join pg_class c on c.oid = i.indrelid
join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
where i.indrelid = %s and {KEY_INDEX}
order by array_position(i.indkey::int2[], a.attnum)
"""
"""The Kafka key columns of a table now, in index order (none: its events have no key)."""


def table_key_columns(conn: psycopg.Connection[Any], relation_oid: int) -> tuple[str, ...]:
    """:data:`KEY_QUERY` of the table ``relation_oid`` on ``conn``: its Kafka key columns
    now, in index order (empty: its events have no key)."""
    return tuple(str(r[0]) for r in conn.execute(KEY_QUERY, (relation_oid,)).fetchall())


SIGNATURE_COLUMNS_QUERY = """
select c.oid, n.nspname, c.relname, c.relfilenode, c.relreplident::text,
       a.attnum, a.attname, a.atttypid, a.atttypmod, format_type(a.atttypid, a.atttypmod),
       a.atthasmissing, a.xmin::text,
       (select pr.oid from pg_publication_rel pr join pg_publication pb on pb.oid = pr.prpubid
        where pb.pubname = p.pubname and pr.prrelid = c.oid)
from pg_publication_tables p
join pg_namespace n on n.nspname = p.schemaname
join pg_class c on c.relnamespace = n.oid and c.relname = p.tablename
left join pg_attribute a
  on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''
where p.pubname = %s
order by c.oid, a.attnum
"""

_TYPE_WALK = """
with recursive walk(relid, col, typ, depth) as (
  select a.attrelid, a.attname::text, a.atttypid, 0 from pg_attribute a
  where a.attrelid = any(%s) and a.attnum > 0 and not a.attisdropped
  union all
  select w.relid, w.col, x.next, w.depth + 1
  from walk w join pg_type t on t.oid = w.typ
  cross join lateral (
    select t.typbasetype as next where t.typtype = 'd'
    union all select t.typelem where t.typcategory = 'A' and t.typelem <> 0
    union all select ca.atttypid from pg_attribute ca
      where t.typtype = 'c' and ca.attrelid = t.typrelid and ca.attnum > 0
        and not ca.attisdropped
    union all select r.rngsubtype from pg_range r where t.typtype = 'r' and r.rngtypid = t.oid
  ) x
  where w.depth < 8
)"""
"""Every type each column of the tables ``%s`` uses, through domains, arrays, composite types
and ranges: (table oid, column, type oid)."""

SIGNATURE_ENUMS_QUERY = (
    _TYPE_WALK
    + """
select w.relid, e.enumtypid, format_type(e.enumtypid, null),
       array_agg(e.enumlabel::text order by e.enumsortorder)
from (select distinct relid, typ from walk) w join pg_enum e on e.enumtypid = w.typ
group by w.relid, e.enumtypid
order by w.relid, e.enumtypid
"""
)

SIGNATURE_COMPOSITES_QUERY = (
    _TYPE_WALK
    + """
select w.relid, t.oid, format_type(t.oid, null), array_agg(distinct w.col),
       (select array_agg(array[ca.attnum::bigint, ca.atttypid::bigint, ca.atttypmod::bigint]
                         order by ca.attnum)
        from pg_attribute ca
        where ca.attrelid = t.typrelid and ca.attnum > 0 and not ca.attisdropped)
from walk w join pg_type t on t.oid = w.typ and t.typtype = 'c'
group by w.relid, t.oid
order by w.relid, t.oid
"""
)

SIGNATURE_PARTITIONS_QUERY = """
with recursive tree(root, relid, depth) as (
  select c.oid, c.oid, 0 from pg_class c where c.oid = any(%s) and c.relkind = 'p'
  union all
  select t.root, i.inhrelid, t.depth + 1
  from tree t join pg_inherits i on i.inhparent = t.relid
  where {attached} and t.depth < 64
)
select t.root, c.oid, n.nspname || '.' || c.relname, c.relfilenode
from tree t join pg_class c on c.oid = t.relid join pg_namespace n on n.oid = c.relnamespace
where t.depth > 0
order by t.root, c.oid
"""
"""The partitions (at any depth) of the partitioned tables among ``%s``, with their file
nodes; one being detached concurrently counts as gone (queries of the table no longer see
its rows)."""


def _partitions_query(conn: psycopg.Connection[Any]) -> str:
    # pg_inherits.inhdetachpending (DETACH … CONCURRENTLY) exists from PostgreSQL 14 on
    pending = conn.info.server_version >= 140000
    return SIGNATURE_PARTITIONS_QUERY.format(
        attached="not i.inhdetachpending" if pending else "true"
    )


SIGNATURE_KEYS_QUERY = f"""
select i.indrelid, array_agg(a.attname::text order by array_position(i.indkey::int2[], a.attnum))
from pg_index i
join pg_class c on c.oid = i.indrelid
join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
where i.indrelid = any(%s) and {KEY_INDEX}
group by i.indrelid
"""


def read_signatures(conn: psycopg.Connection[Any], publication: str) -> dict[int, TableSignature]:
    """The :class:`TableSignature` of every table in ``publication``, keyed by oid."""
    tables: dict[int, tuple[str, str, int, str, list[ColumnFacts]]] = {}
    memberships: dict[int, int] = {}
    for row in conn.execute(SIGNATURE_COLUMNS_QUERY, (publication,)).fetchall():
        oid, schema, table, filenode, ident, attnum, name, typ, typmod, type_name = row[:10]
        missing, version, membership = row[10:]
        entry = tables.setdefault(
            int(oid), (str(schema), str(table), int(filenode), str(ident), [])
        )
        if membership is not None:
            memberships[int(oid)] = int(membership)
        if attnum is not None:
            entry[4].append(
                ColumnFacts(
                    int(attnum),
                    str(name),
                    int(typ),
                    int(typmod),
                    str(type_name),
                    bool(missing),
                    str(version),
                )
            )
    enums: dict[int, list[EnumFacts]] = {}
    if tables:
        for relid, enum_oid, name, labels in conn.execute(
            SIGNATURE_ENUMS_QUERY, (list(tables),)
        ).fetchall():
            enums.setdefault(int(relid), []).append(
                EnumFacts(int(enum_oid), str(name), tuple(str(x) for x in labels))
            )
    keys: dict[int, tuple[str, ...]] = {}
    composites: dict[int, list[CompositeFacts]] = {}
    partitions: dict[int, list[PartitionFacts]] = {}
    if tables:
        oids = (list(tables),)
        for relid, names in conn.execute(SIGNATURE_KEYS_QUERY, oids).fetchall():
            keys[int(relid)] = tuple(str(n) for n in names)
        for relid, typ, name, cols, attrs in conn.execute(
            SIGNATURE_COMPOSITES_QUERY, oids
        ).fetchall():
            composites.setdefault(int(relid), []).append(
                CompositeFacts(
                    int(typ),
                    str(name),
                    tuple((int(a), int(t), int(tm)) for a, t, tm in attrs or ()),
                    tuple(sorted(str(c) for c in cols)),
                )
            )
        for root, oid, name, filenode in conn.execute(_partitions_query(conn), oids).fetchall():
            partitions.setdefault(int(root), []).append(
                PartitionFacts(int(oid), str(name), int(filenode))
            )
    return {
        oid: TableSignature(
            oid,
            schema,
            table,
            filenode,
            tuple(cols),
            tuple(enums.get(oid, ())),
            key=keys.get(oid, ()),
            identity=ReplicaIdentity(ident),
            membership=memberships.get(oid),
            partitions=tuple(partitions.get(oid, ())),
            composites=tuple(composites.get(oid, ())),
        )
        for oid, (schema, table, filenode, ident, cols) in tables.items()
    }


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
