"""Reading one re-snapshot chunk between two watermarks (SQL on an ordinary connection).

:func:`read_between_watermarks` is steps 1 to 3 of the method in :mod:`cdc.incremental_snapshot`:
commit a low watermark (a transactional logical decoding message), read the chunk in a
REPEATABLE READ, READ ONLY transaction together with ``pg_current_snapshot()``, commit a high
watermark.  The chunk is ``select … where (key) > (last key) [and (where)] order by key limit
n`` (:func:`chunk_query`), the key being the table's Kafka key columns (its replica identity
index under USING INDEX, else its primary key: ``cdc.pg_catalog.KEY_QUERY``), every column as its type's output-function text (what pgoutput
sends), so chunk rows and streamed rows go through the same codec.

Concurrency: runs on the daemon's thread, on the re-snapshot driver's own connection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg import sql

from cdc.incremental_snapshot import WATERMARK_PREFIX, Job, Key, Row, Visibility, Watermark
from cdc.pg_catalog import table_key_columns
from cdc.resnapshot_requests import where_sql
from cdc.snapshot import COLUMNS_QUERY
from cdc.where_clause import WhereClause, parse_where
from core.pg_types import output_function_text

__all__ = ["ChunkRead", "chunk_query", "read_between_watermarks"]


def chunk_query(
    schema: str,
    table: str,
    columns: Iterable[str],
    key: Iterable[str],
    after: Key | None,
    where: WhereClause | None,
    limit: int,
) -> tuple[sql.Composed, list[str]]:
    """``select … where (key) > (after) [and (where)] order by key limit n``: the key values
    and the WHERE values are parameters of unknown type, which PostgreSQL reads as the
    columns' types (they are the text the type's output function printed)."""
    key_ids = [sql.Identifier(k) for k in key]
    conds: list[sql.Composable] = []
    params: list[str] = []
    if after is not None:
        conds.append(
            sql.SQL("({}) > ({})").format(
                sql.SQL(", ").join(key_ids), sql.SQL(", ").join(sql.Placeholder() for _ in after)
            )
        )
        params += after
    if where is not None:
        w, p = where_sql(where)
        conds.append(sql.SQL("({})").format(w))
        params += p
    query = sql.SQL("select {} from {}{} order by {} limit {}").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        sql.Identifier(schema, table),
        sql.SQL(" where ") + sql.SQL(" and ").join(conds) if conds else sql.SQL(""),
        sql.SQL(", ").join(key_ids),
        sql.Literal(int(limit)),
    )
    return query, params


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkRead:
    """One chunk as read: where from, its columns and key, rows, and its snapshot."""

    schema: str
    table: str
    key_names: tuple[str, ...]
    columns: tuple[tuple[str, int, int], ...]
    rows: list[tuple[Key, Row]]
    visibility: Visibility


def read_between_watermarks(
    conn: psycopg.Connection[Any], job: Job, chunk_id: str, chunk_rows: int
) -> ChunkRead | str:
    """Low watermark, the chunk in a REPEATABLE READ transaction, high watermark; a
    string says why the job cannot go on (psycopg errors propagate)."""
    emit = "select pg_logical_emit_message(true, %s, %s)"
    conn.execute(emit, (WATERMARK_PREFIX, Watermark(chunk_id, "low", job.table).to_json()))
    with conn.transaction():
        conn.execute("set transaction isolation level repeatable read, read only")
        snap = conn.execute("select pg_current_snapshot()::text").fetchone()
        names = conn.execute(
            "select n.nspname, c.relname from pg_class c "
            "join pg_namespace n on n.oid = c.relnamespace where c.oid = %s",
            (job.oid,),
        ).fetchone()
        if names is None or snap is None:
            return "done: the table no longer exists"
        key_names = table_key_columns(conn, job.oid)
        if not key_names:
            return (
                "rejected: the table has no key columns to read it in chunks by (no primary "
                "key, and REPLICA IDENTITY is not USING INDEX; add either, or re-create the "
                "slot for a full snapshot)"
            )
        columns = tuple(
            (str(n), int(t), int(mod))
            for n, t, mod in conn.execute(COLUMNS_QUERY, (job.oid,)).fetchall()
        )
        query, params = chunk_query(
            str(names[0]),
            str(names[1]),
            [c[0] for c in columns],
            key_names,
            job.after,
            parse_where(job.where) if job.where else None,
            chunk_rows,
        )
        with conn.cursor() as cur:
            output_function_text(cur)
            cur.execute(query, params)
            fetched: list[Row] = [tuple(r) for r in cur.fetchall()]
    conn.execute(emit, (WATERMARK_PREFIX, Watermark(chunk_id, "high", job.table).to_json()))
    order = [next(i for i, c in enumerate(columns) if c[0] == k) for k in key_names]
    return ChunkRead(
        schema=str(names[0]),
        table=str(names[1]),
        key_names=key_names,
        columns=columns,
        rows=[(tuple(str(r[i]) for i in order), r) for r in fetched],
        visibility=Visibility.parse(str(snap[0])),
    )
