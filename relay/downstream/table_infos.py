"""The captured tables' definitions the rules are bound to (:class:`TableInfo`): columns,
key columns, date and time columns, and each column's kind on the device wire.

Two sources, read alike:

- cdc's value schemas (``{prefix}._schemas``): :func:`table_infos_from_schemas`,
  :func:`table_infos_from_registry`, through :func:`core.value_schemas.read_value_schemas`;
- the captured database's catalog (``relay.source_dsn``): :func:`table_infos_from_catalog`,
  :func:`table_infos_from_conn`.  A column's kind is decided as cdc decides its Avro type
  (:func:`core.pg_type_mapping.column_codec` over the column's type oid and modifier, user
  types looked up with :data:`core.pg_types.CATALOG_QUERY`), so both sources give the
  same kinds (:func:`catalog_kinds`, pure).

Kinds are :func:`core.column_kinds.column_kind` of the column's
:class:`core.values.ColumnType`.  The functions taking a DSN or a connection read the
catalog on it (the caller's thread); the rest is pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from core.avro_envelope import SchemaRegistry
from core.column_kinds import column_kind
from core.pg_type_mapping import column_codec
from core.pg_types import CATALOG_QUERY, KEY_INDEX, ColumnSpec, MappingCatalog, TypeInfo
from core.value_schemas import column_type_of_own_field, read_value_schemas
from relay.downstream.rules import TableInfo
from relay.errors import EngineError

__all__ = [
    "catalog_connection",
    "catalog_kinds",
    "table_infos_from_catalog",
    "table_infos_from_conn",
    "table_infos_from_registry",
    "table_infos_from_schemas",
]


def table_infos_from_schemas(schemas: Iterable[str | Mapping[str, Any]]) -> dict[str, TableInfo]:
    """Columns and primary keys of every table with a value schema among ``schemas``
    (JSON texts or parsed), the later schema of a table winning (pass them in the order
    of ``{prefix}._schemas``; read by :func:`core.value_schemas.read_value_schemas`)."""
    return {
        table: TableInfo(
            found.names,
            found.key,
            found.temporal,
            tuple((c.name, column_kind(c.type.kind)) for c in found.columns),
        )
        for table, found in read_value_schemas(schemas).items()
    }


def table_infos_from_registry(registry: SchemaRegistry) -> dict[str, TableInfo]:
    """:func:`table_infos_from_schemas` over every schema of ``registry``, in the order they
    were added."""
    return table_infos_from_schemas(registry.schema_texts())


_CATALOG_QUERY = f"""
select n.nspname || '.' || c.relname,
       array(select a.attname::text from pg_attribute a
             where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
               and a.attgenerated = '' order by a.attnum),
       array(select a.attname::text from pg_index i
             join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
             where i.indrelid = c.oid and {KEY_INDEX}
             order by a.attnum),
       array(select a.attname::text || ':' || bt.typname from pg_attribute a
             join pg_type t on t.oid = a.atttypid
             join pg_type bt on bt.oid = case when t.typtype = 'd' then t.typbasetype
                                             else t.oid end
             where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
               and bt.typname in ('date', 'time', 'timestamp', 'timestamptz')
             order by a.attnum),
       array(select array[a.atttypid::int8, a.atttypmod::int8] from pg_attribute a
             where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
               and a.attgenerated = '' order by a.attnum)
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema')
  and n.nspname not like 'pg_toast%%'
"""


def table_infos_from_catalog(dsn: str, password: str | None = None) -> dict[str, TableInfo]:
    """Columns and key columns of every table of the captured database (catalog read only).

    The key columns are the table's row identity, the columns cdc keys its events by
    (:data:`core.pg_types.KEY_INDEX`: the replica identity index under USING INDEX, else
    the primary key).  They are listed in the table's column order, as the Kafka key of every change
    event lists them (docs/events.md), not in the order of the primary key's definition:
    rows are named by their events' keys (relay/downstream/event_decoder.py), so a primary
    key redefined in another order, ``(site, id)`` → ``(id, site)``, names every row as
    before."""
    import psycopg

    with catalog_connection(dsn, password) as conn:
        try:
            return table_infos_from_conn(conn)
        except psycopg.Error as exc:
            raise EngineError(f"cannot read the captured database's catalog: {exc}") from exc


def catalog_connection(dsn: str, password: str | None = None) -> Any:
    """An autocommit connection to the captured database, for catalog reads;
    :class:`EngineError` naming the failure when it cannot be opened."""
    import psycopg

    kw: dict[str, Any] = {"autocommit": True, "connect_timeout": 10}
    if password:
        kw["password"] = password
    try:
        return psycopg.connect(dsn, **kw)
    except psycopg.Error as exc:
        raise EngineError(f"cannot read the captured database's catalog: {exc}") from exc


def table_infos_from_conn(conn: Any) -> dict[str, TableInfo]:
    """:func:`table_infos_from_catalog` on an open connection (psycopg errors propagate):
    one read of the tables, one of the types their columns use."""
    rows = conn.execute(_CATALOG_QUERY).fetchall()
    oids = sorted({int(t[0]) for row in rows for t in row[4]})
    catalog = MappingCatalog(
        [TypeInfo.from_catalog_row(r) for r in conn.execute(CATALOG_QUERY, {"oids": oids})]
    )
    return {
        str(name): TableInfo(
            tuple(cols),
            tuple(key),
            tuple(tuple(t.split(":", 1)) for t in temporal),
            catalog_kinds(
                [(c, int(t[0]), int(t[1])) for c, t in zip(cols, types, strict=True)], catalog
            ),
        )
        for name, cols, key, temporal, types in rows
    }


def catalog_kinds(
    columns: Sequence[tuple[str, int, int]], catalog: MappingCatalog
) -> tuple[tuple[str, str], ...]:
    """``(column, kind)`` of each column ``(name, type oid, type modifier)``: the kind of
    the Avro type cdc gives it (types not in :data:`core.pg_types.BUILTIN_TYPES` looked up
    in ``catalog``; a type cdc has no mapping for is carried as its text: ``text``)."""
    return tuple(
        (
            name,
            column_kind(
                column_type_of_own_field(
                    column_codec(ColumnSpec(name, oid, typmod, False), catalog, _quiet).avro_field(
                        name
                    )
                ).kind
            ),
        )
        for name, oid, typmod in columns
    )


def _quiet(message: str) -> None:
    """cdc warns of a column it carries as text; here that is only the column's kind."""
