"""The captured tables as the applier sees them: columns, key, wire types, and their SQL.

:func:`read_tables` reads the catalog (``pg_attribute``, the primary key, the types'
catalog rows as cdc reads them) and builds one :class:`TableMeta` per table.  A
:class:`TableMeta` derives its column types from the value schema cdc's own
:class:`core.avro_envelope.TableCodec` makes for the table, and reads rows through that
codec's converters: a row read as the text PostgreSQL's output functions print (what
pgoutput sends) becomes exactly the wire form a device received
(:meth:`TableMeta.read`), so the applier compares the server's row with an entry's
``old`` values by :func:`core.values.same_value`.  Values go back to PostgreSQL as
input text (:func:`core.values.to_pg_text`) cast to the column's type in SQL.

Statements are composed once per table and shape and cached as bytes.  Reads and
writes of many rows go through ``unnest`` of one text array per column; writes are
guarded by the ``xmin`` the merge saw (optimistic concurrency, docs/journal.md).

:func:`read_tables` does I/O on the given connection; a :class:`TableMeta` is immutable
after construction except for its statement cache (plain dict writes): one applier
connection uses it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from core.avro_envelope import TableCodec
from core.pg_types import CATALOG_QUERY, KEY_INDEX, ColumnSpec, MappingCatalog, TypeInfo
from core.row_wire import PLAIN_TYPES, json_value
from core.value_schemas import column_types_from_value_schema
from core.values import ColumnType, Kind, decoded_datum, to_pg_text
from relay.downstream.rules import TableInfo, canonical_text

__all__ = ["TableMeta", "read_tables"]

log = logging.getLogger("relay.upstream.applier")

# The cast of each column's values is its type without the modifier: an explicit cast to
# varchar(5), char(2) or bit(3) cuts a longer value to length, where the assignment into
# the column (which applies the modifier) refuses it (22001, 22026).  ``character`` and
# ``bit`` without a modifier mean char(1) and bit(1), hence ``bpchar`` and ``bit varying``.
# Generated columns are PostgreSQL's to write: they are not the applier's columns (cdc
# does not publish them either).
_TABLES_QUERY = f"""
select n.nspname::text, c.relname::text, a.attname::text, a.atttypid::int8, a.atttypmod,
       case a.atttypid when 1560 then 'bit varying' when 1561 then 'bit varying[]'
            when 1042 then 'bpchar' when 1014 then 'bpchar[]'
            else format_type(a.atttypid, null) end,
       coalesce(array_position(i.indkey::int2[], a.attnum) - array_lower(i.indkey::int2[], 1) + 1, 0),
       c.relkind = 'p'
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
    and a.attgenerated = ''
left join pg_index i on i.indrelid = c.oid and {KEY_INDEX}
where c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema')
  and n.nspname not like 'pg_toast%%' and n.nspname <> 'fieldsync_applier'
order by n.nspname, c.relname, a.attnum
"""


class TableMeta:
    """One captured table: columns, key, wire types, text readers, and its SQL."""

    def __init__(
        self,
        name: str,
        columns: Sequence[tuple[str, int, int, str, int]],
        catalog: MappingCatalog,
        db: str,
        partitioned: bool = False,
    ) -> None:
        self.name = name
        self.partitioned = partitioned
        """A partitioned table: PostgreSQL refuses ``RETURNING xmin`` of an insert into it
        ("cannot retrieve a system column in this context"), so :meth:`insert_sql`
        returns a null xmin, read afterwards with :meth:`xmin_sql`."""
        self.schema, _, self.table = name.partition(".")
        self.columns: tuple[str, ...] = tuple(c[0] for c in columns)
        # key columns in column order, as the change events' keys, the relay's rows and the
        # devices' entries list them (relay/downstream/bucket_engine.py)
        self.key: tuple[str, ...] = tuple(c[0] for c in columns if c[4] > 0)
        self.info = TableInfo(self.columns, self.key)
        self.casts: dict[str, sql.Composable] = {c[0]: sql.SQL(c[3]) for c in columns}
        codec = TableCodec(
            db=db,
            schema=self.schema,
            table=self.table,
            columns=[ColumnSpec(c[0], c[1], c[2], c[4] > 0) for c in columns],
            catalog=catalog,
            unchanged_sentinel=object(),
            warn=lambda m: log.debug("%s: %s", name, m),
        )
        found = column_types_from_value_schema(json.loads(codec.value_schema_json))
        assert found is not None
        self.types: dict[str, ColumnType] = found[1]
        self._convert = {
            spec.name: c.convert for spec, c in zip(codec.columns, codec.column_codecs, strict=True)
        }
        # per column in table order: its name, its converter, and its type when the
        # converter's output needs decoding (fixed decimals, arrays), else None
        self._readers: tuple[tuple[str, Any, ColumnType | None], ...] = tuple(
            (c, self._convert[c], _decoded_type(self.types.get(c))) for c in self.columns
        )
        self.ident = sql.Identifier(self.schema, self.table)
        self._plain_key = all(
            self.types[k].kind not in (Kind.DECIMAL, Kind.NUMERIC, Kind.ARRAY, Kind.INTERVAL)
            for k in self.key
        )
        self._sql: dict[Any, bytes] = {}

    def read(self, texts: Sequence[str | None]) -> dict[str, Any]:
        """A row from its columns' text forms (table order) → wire form."""
        out: dict[str, Any] = {}
        for (column, convert, ct), text in zip(self._readers, texts, strict=True):
            if text is None:
                out[column] = None
                continue
            value = convert(text)
            if ct is not None:
                value = decoded_datum(ct, value)
            out[column] = value if type(value) in PLAIN_TYPES else json_value(value)
        return out

    def pg_text(self, column: str, value: Any) -> str | None:
        return to_pg_text(self.types[column], value)

    def key_id(self, key: Sequence[Any]) -> tuple[Any, ...]:
        """A lookup id of key values (normal wire form) that equal values share
        (decimals by number: ``"1.0"`` and ``"1"`` are one key)."""
        if self._plain_key:
            return tuple(key)
        out: list[Any] = []
        for column, value in zip(self.key, key, strict=True):
            if isinstance(value, str) and self.types[column].kind in (Kind.DECIMAL, Kind.NUMERIC):
                try:
                    value = canonical_text(Decimal(value)) or value
                except ArithmeticError:
                    pass
            elif isinstance(value, list | dict):
                value = json.dumps(value, sort_keys=True)
            out.append(value)
        return tuple(out)

    def _placeholder(self, column: str) -> sql.Composable:
        return sql.SQL("%s::") + self.casts[column]

    def _key_match(self) -> sql.Composable:
        return sql.SQL(" and ").join(
            sql.SQL("{} = {}").format(sql.Identifier(k), self._placeholder(k)) for k in self.key
        )

    def select_sql(self, commit_ts: bool, lock: bool = False) -> bytes:
        """Read (``lock``: and lock) the rows of many keys: ``unnest(text[] per key column)``."""
        cache_key = ("select", commit_ts, lock)
        found = self._sql.get(cache_key)
        if found is None:
            aliases = [sql.Identifier(f"k{i}") for i in range(len(self.key))]
            found = self._cache(
                cache_key,
                sql.SQL(
                    "select t.xmin::text, {ts}, {cols} from {t} as t join unnest({arrays}) as u({aliases})"
                    " on {match} order by {keys}{lock}"
                ).format(
                    lock=sql.SQL(" for update of t" if lock else ""),
                    ts=sql.SQL(
                        "(extract(epoch from pg_xact_commit_timestamp(t.xmin)) * 1000)::bigint::text"
                        if commit_ts
                        else "null::text"
                    ),
                    cols=sql.SQL(", ").join(sql.Identifier("t", c) for c in self.columns),
                    t=self.ident,
                    arrays=sql.SQL(", ").join([sql.SQL("%s::text[]")] * len(aliases)),
                    aliases=sql.SQL(", ").join(aliases),
                    match=self._many_key_match(aliases),
                    keys=sql.SQL(", ").join(sql.Identifier("t", k) for k in self.key),
                ),
            )
        return found

    def _cache(self, key: Any, composed: sql.Composable) -> bytes:
        rendered = composed.as_bytes(None)
        self._sql[key] = rendered
        return rendered

    def _columns(self) -> sql.Composable:
        # no ::text casts: some differ from the output function pgoutput uses
        # (bool::text is 'true', not 't'; inet::text adds the mask; char(n)::text trims)
        return sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)

    def update_sql(self, columns: Sequence[str]) -> bytes:
        cache_key = ("update", tuple(columns))
        found = self._sql.get(cache_key)
        if found is None:
            query = sql.SQL("update {t} set {sets} where {match}").format(
                t=self.ident,
                sets=sql.SQL(", ").join(
                    sql.SQL("{} = {}").format(sql.Identifier(c), self._placeholder(c))
                    for c in columns
                ),
                match=self._key_match(),
            )
            found = self._cache(cache_key, query)
        return found

    def update_many_sql(self, columns: Sequence[str]) -> bytes:
        """One UPDATE for many rows: ``from unnest(text[] per column, text[] per key column)``
        (the keys must be distinct)."""
        cache_key = ("update_many", tuple(columns))
        found = self._sql.get(cache_key)
        if found is None:
            values = [sql.Identifier(f"v{i}") for i in range(len(columns))]
            keys = [sql.Identifier(f"k{i}") for i in range(len(self.key))]
            query = sql.SQL(
                "update {t} as t set {sets} from unnest({arrays}) as u({aliases})"
                " where {match} and t.xmin = u.x::xid"
            ).format(
                t=self.ident,
                sets=sql.SQL(", ").join(
                    sql.SQL("{} = u.{}::{}").format(sql.Identifier(c), v, self.casts[c])
                    for c, v in zip(columns, values, strict=True)
                ),
                arrays=sql.SQL(", ").join([sql.SQL("%s::text[]")] * (len(values) + len(keys) + 1)),
                aliases=sql.SQL(", ").join([*values, *keys, sql.Identifier("x")]),
                match=self._many_key_match(keys),
            )
            found = self._cache(cache_key, query)
        return found

    def delete_many_sql(self) -> bytes:
        found = self._sql.get("delete_many")
        if found is None:
            keys = [sql.Identifier(f"k{i}") for i in range(len(self.key))]
            query = sql.SQL(
                "delete from {t} as t using unnest({arrays}) as u({aliases})"
                " where {match} and t.xmin = u.x::xid"
            ).format(
                t=self.ident,
                arrays=sql.SQL(", ").join([sql.SQL("%s::text[]")] * (len(keys) + 1)),
                aliases=sql.SQL(", ").join([*keys, sql.Identifier("x")]),
                match=self._many_key_match(keys),
            )
            found = self._cache("delete_many", query)
        return found

    def _many_key_match(self, aliases: Sequence[sql.Identifier]) -> sql.Composable:
        return sql.SQL(" and ").join(
            sql.SQL("t.{} = u.{}::{}").format(sql.Identifier(k), a, self.casts[k])
            for k, a in zip(self.key, aliases, strict=True)
        )

    def delete_sql(self) -> bytes:
        found = self._sql.get("delete")
        if found is None:
            query = sql.SQL("delete from {t} where {match}").format(
                t=self.ident, match=self._key_match()
            )
            found = self._cache("delete", query)
        return found

    def insert_sql(self, columns: Sequence[str]) -> bytes:
        cache_key = ("insert", tuple(columns))
        found = self._sql.get(cache_key)
        if found is None:
            query = sql.SQL(
                "insert into {t} ({cols}) values ({vals}) returning {xmin}, {texts}"
            ).format(
                t=self.ident,
                xmin=sql.SQL("null::text" if self.partitioned else "xmin::text"),
                cols=sql.SQL(", ").join(sql.Identifier(c) for c in columns),
                vals=sql.SQL(", ").join(self._placeholder(c) for c in columns),
                texts=self._columns(),
            )
            found = self._cache(cache_key, query)
        return found

    def xmin_sql(self) -> bytes:
        """The ``xmin`` of the row of a key (after :meth:`insert_sql` of a partitioned table)."""
        found = self._sql.get("xmin")
        if found is None:
            query = sql.SQL("select xmin::text from {t} where {match}").format(
                t=self.ident, match=self._key_match()
            )
            found = self._cache("xmin", query)
        return found

    def key_params(self, key: Sequence[Any]) -> list[str | None]:
        return [self.pg_text(c, v) for c, v in zip(self.key, key, strict=True)]


def _decoded_type(ct: ColumnType | None) -> ColumnType | None:
    """``ct`` when :func:`decoded_datum` changes its converted values, else None."""
    return ct if ct is not None and ct.kind in (Kind.DECIMAL, Kind.ARRAY) else None


def read_tables(
    conn: psycopg.Connection[Any], names: Iterable[str] | None = None
) -> dict[str, TableMeta]:
    """:class:`TableMeta` of the captured tables (all user tables, or ``names``)."""
    wanted = set(names) if names is not None else None
    rows = conn.execute(_TABLES_QUERY).fetchall()
    by_table: dict[str, list[tuple[str, int, int, str, int]]] = {}
    partitioned: set[str] = set()
    for nsp, rel, col, oid, typmod, fmt, keypos, is_partitioned in rows:
        name = f"{nsp}.{rel}"
        if is_partitioned:
            partitioned.add(name)
        if wanted is None or name in wanted:
            by_table.setdefault(name, []).append(
                (col, int(oid), int(typmod), str(fmt), int(keypos))
            )
    oids = sorted({c[1] for cols in by_table.values() for c in cols})
    catalog = MappingCatalog(
        [
            TypeInfo.from_catalog_row(r)
            for r in conn.execute(CATALOG_QUERY, {"oids": oids}).fetchall()
        ]
    )
    db = str(conn.info.dbname)
    return {
        name: TableMeta(name, cols, catalog, db, partitioned=name in partitioned)
        for name, cols in by_table.items()
    }
