"""Initial snapshot: existing rows of published tables as op ``r`` events.

The slot is created with an exported snapshot; a second connection imports it
(``SET TRANSACTION SNAPSHOT``) in a REPEATABLE READ, READ ONLY transaction, so
what it reads is exactly the database as of the slot's consistent point: every
later commit arrives through the stream, none twice, none missing.

Rows are read with a server-side cursor in chunks (bounded memory), each column
as the text of its type's output function (what pgoutput sends; not ``::text``), so snapshot and stream
events go through the same codec.  Positions are ``(consistent_point, seq)``
with ``seq`` counting across all tables; every commit lands before the first
streamed transaction (whose commit LSN is after the consistent point).

Restart during the snapshot: each Kafka transaction of snapshot rows records
``snapshot_done=false`` in the state topic.  A daemon that starts and finds its
slot but no finished snapshot drops the slot and starts over with a new slot and
a new snapshot; rows already written are written again with new positions
(``r`` events are idempotent upserts of the row by key).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdc.change_assembler import OutEvent, OutSchema, RelationCatalog, topic_for
from cdc.pg_catalog import table_key_columns
from core.avro_envelope import POSITION_HEADER, Source, TableCodec, position_header
from core.pg_types import ColumnSpec, output_function_text

log = logging.getLogger(__name__)

COLUMNS_QUERY = """
select a.attname, a.atttypid, a.atttypmod
from pg_attribute a
where a.attrelid = %s and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''
order by a.attnum
"""

PUBLISHED_TABLES = """
select c.oid, n.nspname, c.relname
from pg_publication_tables p
join pg_namespace n on n.nspname = p.schemaname
join pg_class c on c.relnamespace = n.oid and c.relname = p.tablename
where p.pubname = %s
order by n.nspname, c.relname
"""


@dataclass(frozen=True, slots=True)
class SnapshotTable:
    oid: int
    schema: str
    table: str
    columns: tuple[ColumnSpec, ...]


def published_tables(conn: psycopg.Connection[Any], publication: str) -> list[SnapshotTable]:
    """The tables of ``publication`` with their columns, the Kafka key columns flagged (the
    replica identity index under USING INDEX, else the primary key:
    ``cdc.pg_catalog.KEY_QUERY``, the key the stream's events of the table get)."""
    out = []
    for oid, schema, table in conn.execute(PUBLISHED_TABLES, (publication,)).fetchall():
        key = set(table_key_columns(conn, oid))
        cols = tuple(
            ColumnSpec(name, typ, mod, name in key)
            for name, typ, mod in conn.execute(COLUMNS_QUERY, (oid,)).fetchall()
        )
        out.append(SnapshotTable(oid, schema, table, cols))
    return out


def read_snapshot(
    conn: psycopg.Connection[Any],
    snapshot_name: str,
    publication: str,
    *,
    db: str,
    topic_prefix: str,
    consistent_point: int,
    catalog: RelationCatalog,
    unchanged_sentinel: object,
    warn: Callable[[str], None],
    clock_us: Callable[[], int],
    chunk: int = 5000,
) -> Iterator[OutEvent | OutSchema]:
    """Yield schemas and ``r`` events of every published table, as of the exported snapshot."""
    conn.autocommit = False
    with conn.transaction():
        conn.execute("set transaction isolation level repeatable read, read only")
        conn.execute(sql.SQL("set transaction snapshot {}").format(sql.Literal(snapshot_name)))
        tables = published_tables(conn, publication)
        seq = 0
        for t in tables:
            codec = TableCodec(
                db=db,
                schema=t.schema,
                table=t.table,
                columns=t.columns,
                catalog=catalog,
                unchanged_sentinel=unchanged_sentinel,
                warn=warn,
                namespace_prefix=topic_prefix,
            )
            if codec.key_fingerprint is not None and codec.key_schema_json is not None:
                yield OutSchema(codec.key_fingerprint, codec.key_schema_json)
            yield OutSchema(codec.value_fingerprint, codec.value_schema_json)
            topic = topic_for(topic_prefix, t.schema, t.table)
            if not t.columns:
                continue
            query = sql.SQL("select {} from {}").format(
                sql.SQL(", ").join(sql.Identifier(c.name) for c in t.columns),
                sql.Identifier(t.schema, t.table),
            )
            n = 0
            with conn.cursor(name=f"fieldsync_snapshot_{t.oid}") as cur:
                output_function_text(cur)
                cur.itersize = chunk
                cur.execute(query)
                for row in cur:
                    src = Source(
                        db=db,
                        schema=t.schema,
                        table=t.table,
                        lsn=consistent_point,
                        commit_lsn=consistent_point,
                        txid=0,
                        seq=seq,
                        commit_ts_us=0,
                        snapshot="true",
                        origin=None,
                    )
                    key, value = codec.encode_change("r", None, row, src, clock_us())
                    yield OutEvent(
                        topic,
                        key,
                        value,
                        consistent_point,
                        seq,
                        [(POSITION_HEADER, position_header(consistent_point, seq))],
                        0,
                    )
                    seq += 1
                    n += 1
            log.info(
                "snapshot of %s.%s: %d rows",
                t.schema,
                t.table,
                n,
                extra={"table": f"{t.schema}.{t.table}"},
            )
    conn.autocommit = True
