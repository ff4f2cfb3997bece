"""Reading rows of the captured database as change events carry them: the
:class:`relay.downstream.unchanged_fill.SourceRows` of ``fieldsync relay run``.

:class:`PgSourceRows` reads the values of some columns of the rows of one table by key
(``relay.source_dsn``), for the unchanged TOAST values the bucket store holds no copy
of.  Each read looks the table up in the catalog (its columns, key and types: cheap, and
never stale after DDL) and selects the rows with their types' output functions, in a
session with cdc's text formats (:data:`core.pg_types.SESSION_SETTINGS`): the text
pgoutput sends.  Each row is then encoded as cdc encodes a change of it
(:class:`core.avro_envelope.TableCodec`, the table's codec of now) and decoded as the
bucket engine decodes events (:func:`core.avro_envelope.decode`), so a value read here
is the value an event carrying it would hold.  Keys are matched by PostgreSQL: each key
value is given as its input text (:func:`core.values.to_pg_text`) cast to the column's
type.

Errors: a database that cannot be reached (or a connection lost) is
:class:`relay.errors.EngineError` (the engine retries the batch); a table or column not
there now, or any other error of the read, is :class:`relay.errors.SourceUnreadable`
naming the table.  Used by the engine thread only (one connection, opened lazily, opened
again after an error).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

import psycopg
from psycopg import sql

from core.avro_envelope import SchemaRegistry, Source, TableCodec, decode
from core.errors import FieldsyncError
from core.pg_types import (
    CATALOG_QUERY,
    KEY_INDEX,
    SESSION_SETTINGS,
    ColumnSpec,
    MappingCatalog,
    TypeInfo,
    output_function_text,
)
from core.row_wire import json_value
from core.value_schemas import column_types_from_value_schema
from core.values import to_pg_text
from relay.errors import EngineError, SourceUnreadable

__all__ = ["PgSourceRows"]

# name, type oid and modifier, the type to cast input text to (without the modifier, as the
# applier casts: relay/upstream/applier_tables.py), whether the column is a key column
_COLUMNS_QUERY: Final = f"""
select a.attname::text, a.atttypid::int8, a.atttypmod::int8,
       case a.atttypid when 1560 then 'bit varying' when 1042 then 'bpchar'
            else format_type(a.atttypid, null) end,
       exists (select from pg_index i where i.indrelid = c.oid and {KEY_INDEX}
               and a.attnum = any(i.indkey))
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
    and a.attgenerated = ''
where n.nspname = %s and c.relname = %s and c.relkind in ('r', 'p')
order by a.attnum
"""


class PgSourceRows:
    """:class:`relay.downstream.unchanged_fill.SourceRows` of the PostgreSQL at ``dsn``."""

    def __init__(self, dsn: str, password: str | None = None) -> None:
        self.dsn = dsn
        self.password = password
        self.reads = 0  # reads so far (one per table and batch)
        self._conn: psycopg.Connection[Any] | None = None

    def read(
        self, table: str, columns: Sequence[str], keys: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any] | None]:
        if not keys:
            return []
        conn = self._connection(table)
        try:
            return self._read(conn, table, columns, keys)
        except psycopg.OperationalError as exc:
            self.close()
            raise EngineError(
                f"cannot read {table} from the captured database (relay.source_dsn): {exc}"
            ) from exc
        except (psycopg.Error, FieldsyncError, ValueError) as exc:
            raise SourceUnreadable(f"{table}: {exc}") from exc

    def _connection(self, table: str) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            options = _session_options(self.dsn)
            kw: dict[str, Any] = {"autocommit": True, "connect_timeout": 10, "options": options}
            if self.password:
                kw["password"] = self.password
            try:
                self._conn = psycopg.connect(self.dsn, client_encoding="UTF8", **kw)
            except psycopg.Error as exc:
                raise EngineError(
                    f"cannot read {table} from the captured database (relay.source_dsn): {exc}"
                ) from exc
        return self._conn

    def _read(
        self,
        conn: psycopg.Connection[Any],
        table: str,
        columns: Sequence[str],
        keys: Sequence[Mapping[str, Any]],
    ) -> list[dict[str, Any] | None]:
        schema, _, name = table.partition(".")
        specs = conn.execute(_COLUMNS_QUERY, (schema, name)).fetchall()
        if not specs:
            raise SourceUnreadable(f"{table}: no such table in the captured database now")
        codec = _codec(conn, schema, name, specs)
        casts = {str(s[0]): str(s[3]) for s in specs}
        key_columns = list(keys[0])
        wanted = list(dict.fromkeys([*key_columns, *columns]))
        absent = [c for c in wanted if c not in casts]
        if absent:
            raise SourceUnreadable(f"{table} has no column {', '.join(absent)} now")
        types = _column_types(codec)
        query = sql.SQL(
            "select k.ord, {cols} from unnest({arrays}) with ordinality as k({names}, ord) "
            "join {table} t on {match}"
        ).format(
            cols=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in wanted),
            arrays=sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in key_columns),
            names=sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(len(key_columns))),
            table=sql.Identifier(schema, name),
            match=sql.SQL(" and ").join(
                sql.SQL("t.{} = k.{}::{}").format(
                    sql.Identifier(c), sql.Identifier(f"k{i}"), sql.SQL(casts[c])
                )
                for i, c in enumerate(key_columns)
            ),
        )
        params = [[to_pg_text(types[c], json_value(key[c])) for key in keys] for c in key_columns]
        self.reads += 1
        out: list[dict[str, Any] | None] = [None] * len(keys)
        with conn.cursor() as cur:
            output_function_text(cur)  # the text pgoutput sends
            cur.execute(query, params)
            rows = cur.fetchall()
        names = [c.name for c in codec.columns]
        position = {c: i for i, c in enumerate(names)}
        field = dict(zip(names, codec.field_names, strict=True))
        registry = SchemaRegistry([codec.value_schema_json])
        source = Source(conn.info.dbname, schema, name, 0, 0, 0, 0, 0, "true")
        for ord_text, *values in rows:
            texts: list[str | None] = [None] * len(names)  # NULL where not read
            for column, text in zip(wanted, values, strict=True):
                texts[position[column]] = text
            _, value = codec.encode_change("r", None, texts, source, 0)
            after = decode(value, registry)["after"]
            out[int(ord_text) - 1] = {c: after[field[c]] for c in columns}
        return out

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _codec(
    conn: psycopg.Connection[Any], schema: str, table: str, specs: Sequence[Sequence[Any]]
) -> TableCodec:
    """The table's codec of now (the types its columns use read from the catalog)."""
    oids = sorted({int(s[1]) for s in specs})
    catalog = MappingCatalog(
        [TypeInfo.from_catalog_row(r) for r in conn.execute(CATALOG_QUERY, {"oids": oids})]
    )
    return TableCodec(
        db=conn.info.dbname,
        schema=schema,
        table=table,
        columns=[ColumnSpec(str(s[0]), int(s[1]), int(s[2]), bool(s[4])) for s in specs],
        catalog=catalog,
        unchanged_sentinel=object(),
        warn=lambda _message: None,
    )


def _session_options(dsn: str) -> str:
    """libpq ``options``: the DSN's own, then cdc's text formats (as cdc's sessions)."""
    try:
        existing = psycopg.conninfo.conninfo_to_dict(dsn).get("options") or ""
    except psycopg.ProgrammingError:
        existing = ""
    ours = " ".join(f"-c {k}={v.replace(' ', '')}" for k, v in SESSION_SETTINGS.items())
    return f"{existing} {ours}".strip()


def _column_types(codec: TableCodec) -> dict[str, Any]:
    found = column_types_from_value_schema(json.loads(codec.value_schema_json))
    if found is None:
        raise ValueError(f"{codec.schema}.{codec.table}: no value schema")
    return found[1]
