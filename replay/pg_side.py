"""The PostgreSQL side of verify: the captured tables' rows in one snapshot, as cdc
encodes them.

:class:`PgTarget` is the captured database (``[postgres]`` of the cdc settings).
:func:`pg_tables` lists its published tables the way cdc's snapshot does
(:func:`cdc.snapshot.published_tables`).  :func:`wait_for_slot` waits until the cdc slot
has confirmed a WAL position: from then on Kafka holds every transaction that committed
before it.

:class:`PgSide` opens a REPEATABLE READ, read-only snapshot and notes the WAL insert
position after it (every commit the snapshot sees is before it).  :class:`PgTable`
reads a table's rows in that snapshot with the type output functions pgoutput uses (the
text cdc receives) and turns them into the datums cdc writes with the table's codec of
now (:class:`core.avro_envelope.TableCodec`), so the same value is the same datum on
both sides.  A value the log wrote under an older column type is cast to the type of now
by PostgreSQL (:meth:`PgTable.cast`) on a second connection (autocommit, outside the
snapshot), so a cast that fails cannot end the snapshot's transaction.

Concurrency: none; both connections belong to the verify that opened them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql

from cdc.pg_catalog import PgCatalog
from cdc.pg_source import connect
from cdc.snapshot import published_tables
from core.avro_envelope import SchemaRegistry, Source, TableCodec, decode
from core.errors import ConfigError, FieldsyncError, SchemaError
from core.pg_types import output_function_text
from core.positions import format_lsn, parse_lsn
from core.row_wire import json_value
from core.settings_checks import redact_dsn
from core.value_schemas import column_types_from_value_schema
from core.values import to_pg_text
from replay.errors import DatabaseUnavailable, LogBehind, UnknownTable
from replay.render import dumps
from replay.state import key_id

__all__ = [
    "CastFailed",
    "PgSide",
    "PgTable",
    "PgTarget",
    "pg_connect",
    "pg_tables",
    "wait_for_slot",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PgTarget:
    """The captured database (``[postgres]`` of the cdc settings)."""

    dsn: str
    password: str | None
    slot: str
    publication: str
    db_label: str = ""

    @classmethod
    def from_settings(cls, settings: Any) -> PgTarget:
        pg = settings.postgres
        return cls(pg.dsn, pg.password, pg.slot, pg.publication, redact_dsn(pg.dsn))


def pg_connect(pg: PgTarget) -> Any:
    """A connection to the captured database (:class:`DatabaseUnavailable` if none)."""
    try:
        return connect(pg.dsn, pg.password)
    except FieldsyncError as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL ({pg.db_label}): {exc}") from exc


def pg_tables(conn: Any, pg: PgTarget, names: Sequence[str] | None) -> list[Any]:
    """Published tables (cdc.snapshot.published_tables), as SnapshotTable."""
    row = conn.execute(
        "select 1 from pg_publication where pubname = %s", (pg.publication,)
    ).fetchone()
    if row is None:
        raise ConfigError(
            f"publication {pg.publication!r} does not exist in {pg.db_label}: "
            "is this the database cdc captures (postgres.dsn, postgres.publication)?"
        )
    found = published_tables(conn, pg.publication)
    by_name = {f"{t.schema}.{t.table}": t for t in found}
    if not names:
        return [by_name[n] for n in sorted(by_name)]
    out = []
    for n in names:
        full = n if "." in n else f"public.{n}"
        if full not in by_name:
            raise UnknownTable(
                f"table {n!r} is not in publication {pg.publication!r} "
                f"(published: {', '.join(sorted(by_name)) or 'none'})"
            )
        out.append(by_name[full])
    return out


def wait_for_slot(conn: Any, pg: PgTarget, lsn: int, wait_s: float) -> None:
    """Until the cdc slot has confirmed ``lsn`` (then Kafka holds every transaction that
    committed before it).  A non-transactional logical message moves the WAL past it, so
    an idle database does not keep the slot short of ``lsn``."""
    try:
        conn.execute("select pg_logical_emit_message(false, 'fieldsync.verify', '')")
    except psycopg.Error as exc:
        log.debug("pg_logical_emit_message refused: %s", exc)
    deadline = time.monotonic() + wait_s
    confirmed: int | None = None
    while True:
        row = conn.execute(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = %s",
            (pg.slot,),
        ).fetchone()
        if row is None:
            raise LogBehind(
                f"replication slot {pg.slot!r} does not exist in {pg.db_label}: without it "
                "there is no telling how far the log goes (is cdc running? postgres.slot?)"
            )
        confirmed = parse_lsn(row[0]) if row[0] else 0
        if confirmed >= lsn:
            return
        if time.monotonic() > deadline:
            raise LogBehind(
                f"cdc has confirmed {format_lsn(confirmed)} but PostgreSQL is at "
                f"{format_lsn(lsn)} after waiting {wait_s:.0f} s: is `fieldsync cdc run` "
                "running? (raise --wait for a busy database)"
            )
        time.sleep(0.2)


class PgSide:
    """Rows of the published tables in one REPEATABLE READ snapshot, as cdc encodes them.

    A second connection (autocommit, no snapshot) casts the log's values of columns whose
    type changed since the log wrote them (:meth:`PgTable.cast`); a cast that fails there
    cannot end the snapshot's transaction."""

    def __init__(self, pg: PgTarget, prefix: str, tables: Sequence[Any]) -> None:
        self.pg = pg
        self.prefix = prefix
        self.tables = {f"{t.schema}.{t.table}": t for t in tables}
        self.conn = pg_connect(pg)
        self.db = self.conn.info.dbname
        self._cast_conn: Any = None

    def snapshot(self) -> int:
        """Begin a snapshot; the WAL insert position after it (every visible commit is before)."""
        self.conn.autocommit = False
        self.conn.execute("set transaction isolation level repeatable read, read only")
        row = self.conn.execute("select pg_current_wal_insert_lsn()::text").fetchone()
        return parse_lsn(row[0])

    def end(self) -> None:
        self.conn.rollback()
        self.conn.autocommit = True

    def table(self, name: str) -> PgTable:
        t = self.tables[name]
        catalog = PgCatalog(self.pg.dsn, self.pg.password)
        try:
            codec = TableCodec(
                db=self.db,
                schema=t.schema,
                table=t.table,
                columns=t.columns,
                catalog=catalog,
                unchanged_sentinel=object(),
                warn=lambda _m: None,
                namespace_prefix=self.prefix,
            )
        finally:
            catalog.close()
        return PgTable(self, t, codec)

    def cast_conn(self) -> Any:
        if self._cast_conn is None:
            self._cast_conn = pg_connect(self.pg)
            self._cast_conn.autocommit = True
        return self._cast_conn

    def close(self) -> None:
        if self._cast_conn is not None:
            self._cast_conn.close()
        self.conn.close()


@dataclasses.dataclass(frozen=True)
class CastFailed:
    """A log value PostgreSQL does not accept as the column's type of now."""

    message: str


class PgTable:
    """One published table: its rows in the snapshot, and the conversion of PostgreSQL
    text into the datums cdc writes (the table's codec of now)."""

    def __init__(self, side: PgSide, table: Any, codec: Any) -> None:
        self.side = side
        self.t = table
        self.codec = codec
        found = column_types_from_value_schema(json.loads(codec.value_schema_json))
        self.types: dict[str, Any] = found[1] if found is not None else {}
        self.columns: list[str] = [c.name for c in table.columns]
        self.key_columns: list[str] = [c.name for c in table.columns if c.is_key]
        self._registry = SchemaRegistry([codec.value_schema_json])
        self._names = dict(zip(codec.field_names, self.columns, strict=True))
        self._src = Source(side.db, table.schema, table.table, 0, 0, 0, 0, 0, "true")
        self._type_sql: dict[str, str] = {}

    def datums(self, texts: Sequence[str | None]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(key id, {column: datum}) of a row given as PostgreSQL's output texts."""
        _, value = self.codec.encode_change("r", None, list(texts), self._src, 0)
        after = decode(value, self._registry)["after"]
        return key_id(after, self.codec.key_field_names), {
            self._names[f]: v for f, v in after.items()
        }

    def rows(self) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
        """(key id, {column: datum}) of every row in the snapshot."""
        t = self.t
        # no ::text casts: the output function's text is what pgoutput sends (bool::text
        # is 'true' where the output function prints 't'; inet::text adds the mask)
        query = sql.SQL("select {} from {}").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)
            if self.columns
            else sql.SQL("null"),
            sql.Identifier(t.schema, t.table),
        )
        with self.side.conn.cursor(name=f"fieldsync_verify_{t.oid}") as cur:
            output_function_text(cur)  # the text pgoutput sends
            cur.itersize = 5000
            cur.execute(query)
            for raw in cur:
                yield self.datums(list(raw) if self.columns else [])

    def pg_text(self, column: str, value: Any) -> str | None:
        """A datum as PostgreSQL prints it."""
        if value is None:
            return None
        ct = self.types.get(column)
        j = json_value(value)
        return to_pg_text(ct, j) if ct is not None else dumps(j)

    def cast(self, column: str, texts: Sequence[str]) -> dict[str, Any]:
        """``text -> datum`` of ``texts`` read as the column's type of now: PostgreSQL
        casts each (``text::type``, printed by the type's output function) and cdc's codec
        turns the result into the datum it would write; a value PostgreSQL or the codec
        does not accept maps to :class:`CastFailed`."""
        conn = self.side.cast_conn()
        index = self.columns.index(column)
        type_sql = self._type_sql.get(column)
        if type_sql is None:
            spec = self.t.columns[index]
            row = conn.execute(
                "select format_type(%s, %s)", (spec.type_oid, spec.type_modifier)
            ).fetchone()
            type_sql = self._type_sql[column] = str(row[0])
        query = (
            f"select (u.x)::{type_sql} from unnest(%s::text[]) with ordinality as u(x, n) "
            "order by u.n"
        )
        out: dict[str, Any] = {}

        def put(text: str, printed: str | None) -> None:
            row: list[str | None] = [None] * len(self.columns)
            row[index] = printed
            try:
                out[text] = self.datums(row)[1][column]
            except SchemaError as exc:
                out[text] = CastFailed(str(exc))

        with conn.cursor() as cur:
            output_function_text(cur)
            try:
                printed = [r[0] for r in cur.execute(query, (list(texts),)).fetchall()]
            except psycopg.Error:
                printed = None
            if printed is not None:
                for text, p in zip(texts, printed, strict=True):
                    put(text, p)
                return out
            for text in texts:  # one failed: find which, one by one
                try:
                    row = cur.execute(f"select (%s::text)::{type_sql}", (text,)).fetchone()
                except psycopg.Error as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                    out[text] = CastFailed(first)
                    continue
                put(text, row[0] if row is not None else None)
        return out
