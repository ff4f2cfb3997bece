"""Re-snapshot requests: the signal table and ``fieldsync cdc snapshot``.

An operator (or ``fieldsync cdc snapshot --table T [--where …]``) inserts a row into the
signal table (``postgres.signal_table``; created on first use, added to the publication):
``id`` identity, ``kind`` (``snapshot``), ``table_name``, ``where_clause``, ``requested_by``,
``requested_at``, ``status``, ``status_at``.  The daemon reads that row from the replication
stream like any change, checks it (:func:`resolve_table`: the table exists and is published;
:func:`check_where`: the WHERE form names its columns and its values fit their types) and
writes the outcome into ``status`` (``accepted``, ``rejected: …``, ``done: …``).  The CLI
runs the same checks before it inserts, so a bad request is refused at once.

A WHERE clause never reaches SQL as text: :func:`where_sql` makes its columns identifiers
and its values bound parameters.

Concurrency: functions over the caller's connection (the daemon's own, or the CLI's).
"""

from __future__ import annotations

import logging
from typing import Any, Final

import psycopg
from psycopg import sql

from cdc.errors import ReplicationLost, SnapshotRequestError
from cdc.where_clause import WhereClause, parse_where

log = logging.getLogger("fieldsync.cdc")

__all__ = [
    "SIGNAL_TABLE_DDL",
    "attach_signal_table",
    "check_where",
    "create_signal_table",
    "request_snapshot",
    "resolve_table",
    "signal_status",
    "signal_table_ddl",
    "split_table",
    "where_sql",
]


def split_table(name: str) -> tuple[str, str]:
    """``schema.table`` or ``table`` (schema public), as typed by an operator."""
    if "." in name:
        schema, table = name.split(".", 1)
        return schema, table
    return "public", name


def where_sql(clause: WhereClause) -> tuple[sql.Composable, list[str]]:
    """The clause as SQL with columns as identifiers and every value a bound parameter."""
    parts: list[sql.Composable] = []
    params: list[str] = []
    for c in clause.conditions:
        col = sql.Identifier(c.column)
        if c.op in ("is null", "is not null"):
            parts.append(
                sql.SQL("{} is null" if c.op == "is null" else "{} is not null").format(col)
            )
        elif c.op in ("in", "not in"):
            marks = sql.SQL(", ").join(sql.Placeholder() for _ in c.values)
            parts.append(sql.SQL("{} " + c.op + " ({})").format(col, marks))
            params += c.values
        elif c.op == "between":
            parts.append(
                sql.SQL("{} between {} and {}").format(col, sql.Placeholder(), sql.Placeholder())
            )
            params += c.values
        else:
            assert c.op in ("=", "<>", "<", "<=", ">", ">=")
            parts.append(sql.SQL("{} " + c.op + " {}").format(col, sql.Placeholder()))
            params += c.values
    return sql.SQL(" and ").join(parts), params


def resolve_table(
    conn: psycopg.Connection[Any], publication: str, name: str
) -> tuple[int, str, str]:
    """(oid, schema, table) of a published table; SnapshotRequestError naming what is wrong."""
    schema, table = split_table(name.strip())
    row = conn.execute(
        """select c.oid, c.relkind from pg_class c join pg_namespace n on n.oid = c.relnamespace
           where n.nspname = %s and c.relname = %s""",
        (schema, table),
    ).fetchone()
    if row is None:
        raise SnapshotRequestError(f"table {schema}.{table} does not exist")
    published = [
        f"{s}.{t}"
        for s, t in conn.execute(
            "select schemaname, tablename from pg_publication_tables where pubname = %s "
            "order by 1, 2",
            (publication,),
        ).fetchall()
    ]
    if f"{schema}.{table}" not in published:
        shown = ", ".join(published[:20]) + (" …" if len(published) > 20 else "")
        raise SnapshotRequestError(
            f"table {schema}.{table} is not in publication {publication!r}, so cdc does not "
            f"capture it (published: {shown or 'none'})"
        )
    return int(row[0]), schema, table


def check_where(conn: psycopg.Connection[Any], oid: int, qualified: str, text: str) -> WhereClause:
    """Parse ``text`` and check it against the table: known columns, values of the right type."""
    clause = parse_where(text)
    columns = [
        r[0]
        for r in conn.execute(
            "select attname from pg_attribute where attrelid = %s and attnum > 0 "
            "and not attisdropped order by attnum",
            (oid,),
        ).fetchall()
    ]
    unknown = [c for c in clause.columns if c not in columns]
    if unknown:
        raise SnapshotRequestError(
            f"WHERE clause: {qualified} has no column {unknown[0]!r} (columns: {', '.join(columns)})"
        )
    schema, table = qualified.split(".", 1)
    w, params = where_sql(clause)
    probe = sql.SQL("select 1 from {} where {} limit 0").format(sql.Identifier(schema, table), w)
    try:
        with conn.transaction():
            conn.execute("set transaction read only")
            conn.execute(probe, params)
    except psycopg.Error as exc:
        raise SnapshotRequestError(
            f"WHERE clause {clause.text()} does not fit {qualified}: {str(exc).strip().splitlines()[0]}"
        ) from exc
    return clause


SIGNAL_TABLE_DDL: Final = """
create table if not exists {table} (
    id bigint generated always as identity primary key,
    kind text not null default 'snapshot' check (kind = 'snapshot'),
    table_name text not null,
    where_clause text,
    requested_by text not null default current_user,
    requested_at timestamptz not null default now(),
    status text not null default 'pending',
    status_at timestamptz
)
"""


def signal_table_ddl(name: str) -> str:
    """The SQL that creates the signal table (for a DBA, and in error messages)."""
    schema, table = split_table(name)
    quoted = '"' + schema.replace('"', '""') + '"'
    create = SIGNAL_TABLE_DDL.format(table=f'{quoted}."{table.replace(chr(34), chr(34) * 2)}"')
    return f"create schema if not exists {quoted}; {create.strip()}"


def _oid(conn: psycopg.Connection[Any], schema: str, table: str) -> int | None:
    row = conn.execute(
        "select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace "
        "where n.nspname = %s and c.relname = %s",
        (schema, table),
    ).fetchone()
    return int(row[0]) if row else None


def _publish(conn: psycopg.Connection[Any], schema: str, table: str, publication: str) -> None:
    """Add the table to the publication unless it is there (or the publication is FOR ALL
    TABLES, or does not exist yet: the daemon creates it)."""
    row = conn.execute(
        "select puballtables from pg_publication where pubname = %s", (publication,)
    ).fetchone()
    if row is None or row[0]:
        return
    have = conn.execute(
        "select 1 from pg_publication_tables where pubname = %s and schemaname = %s "
        "and tablename = %s",
        (publication, schema, table),
    ).fetchone()
    if have is None:
        conn.execute(
            sql.SQL("alter publication {} add table {}").format(
                sql.Identifier(publication), sql.Identifier(schema, table)
            )
        )


def attach_signal_table(conn: psycopg.Connection[Any], name: str, publication: str) -> int | None:
    """The signal table's oid, once it is in the publication; None when it does not exist
    (``fieldsync cdc snapshot`` creates it on first use) or cannot be published (a warning
    names the fix)."""
    schema, table = split_table(name)
    try:
        oid = _oid(conn, schema, table)
    except psycopg.OperationalError as exc:
        raise ReplicationLost(f"looking up the signal table {name}: {exc}") from exc
    if oid is None:
        log.info(
            "no signal table %s.%s yet: `fieldsync cdc snapshot` creates it on first use",
            schema,
            table,
        )
        return None
    try:
        _publish(conn, schema, table, publication)
    except psycopg.OperationalError as exc:
        raise ReplicationLost(f"adding the signal table {name} to the publication: {exc}") from exc
    except psycopg.Error as exc:
        log.warning(
            "re-snapshot signals are off: the signal table %s.%s cannot be added to publication "
            "%s (%s). Fix: as its owner, ALTER PUBLICATION %s ADD TABLE %s.%s",
            schema, table, publication, str(exc).strip(), publication, schema, table,
        )  # fmt: skip
        return None
    return oid


def create_signal_table(conn: psycopg.Connection[Any], name: str, publication: str) -> None:
    """Create the signal table (and its schema) if missing and add it to the publication, in
    one transaction; SnapshotRequestError with the DDL to run when the role may not."""
    schema, table = split_table(name)
    try:
        with conn.transaction():
            conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL(SIGNAL_TABLE_DDL).format(table=sql.Identifier(schema, table)))
            _publish(conn, schema, table, publication)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SnapshotRequestError(
            f"the signal table {schema}.{table} does not exist and this role may not create it "
            f"({str(exc).strip()}); as an owner run: {signal_table_ddl(name)}; "
            f"ALTER PUBLICATION {publication} ADD TABLE {schema}.{table}"
        ) from exc


def request_snapshot(
    conn: psycopg.Connection[Any],
    *,
    publication: str,
    signal_table: str,
    table: str,
    where: str | None,
) -> tuple[int, str]:
    """Check a request and insert it into the signal table; (signal id, qualified table)."""
    if not signal_table:
        raise SnapshotRequestError(
            "postgres.signal_table is empty: re-snapshot requests are off (set it, e.g. "
            '"fieldsync.cdc_signals", and restart `fieldsync cdc run`)'
        )
    oid, schema, name = resolve_table(conn, publication, table)
    qualified = f"{schema}.{name}"
    clause = check_where(conn, oid, qualified, where) if where is not None else None
    sschema, stable = split_table(signal_table)
    if _oid(conn, sschema, stable) is None:
        # first use: the daemon sees the table from the next transaction on (a running one
        # adds it to the publication itself only at its next start, so do that here)
        create_signal_table(conn, signal_table, publication)
    row = conn.execute(
        sql.SQL(
            "insert into {} (kind, table_name, where_clause) values ('snapshot', %s, %s) "
            "returning id"
        ).format(sql.Identifier(sschema, stable)),
        (qualified, None if clause is None else clause.text()),
    ).fetchone()
    assert row is not None
    return int(row[0]), qualified


def signal_status(conn: psycopg.Connection[Any], signal_table: str, signal_id: int) -> str:
    schema, table = split_table(signal_table)
    row = conn.execute(
        sql.SQL("select status from {} where id = %s").format(sql.Identifier(schema, table)),
        (signal_id,),
    ).fetchone()
    return str(row[0]) if row else "missing"
