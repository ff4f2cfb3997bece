"""PostgreSQL side of cdc: preflight checks, publication and slot, the replication stream.

Protocol
--------
A connection opened with ``replication="database"`` speaks the streaming
replication protocol.  ``CREATE_REPLICATION_SLOT … LOGICAL pgoutput (SNAPSHOT
'export')`` returns the slot's consistent point and an exported snapshot that
stays valid until the next command on that connection (the initial snapshot is
read through it on a second connection).  ``START_REPLICATION`` switches the
connection into COPY_BOTH mode; from then on it carries CopyData messages:

- ``w`` XLogData: walStart u64, walEnd u64, sendTime i64, then one pgoutput message;
- ``k`` primary keepalive: walEnd u64, sendTime i64, replyRequested u8.

We answer with ``r`` standby status updates (write, flush, apply LSNs, clock,
reply flag).  The flush LSN is the position the slot is allowed to confirm; the
pipeline raises it only past transactions Kafka has acknowledged.

Concurrency: one thread owns a :class:`ReplicationStream`; reads never block
longer than the timeout given to :meth:`ReplicationStream.read`.
"""

from __future__ import annotations

import logging
import re
import select
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdc.errors import PreflightError, ReplicationLost, SourceError, format_lsn, parse_lsn
from core.pg_types import SESSION_SETTINGS

log = logging.getLogger(__name__)

PG_EPOCH_US = 946_684_800_000_000
_XLOGDATA = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!Qq?")
_STATUS = struct.Struct("!cQQQq?")


def now_pg_us() -> int:
    return int(time.time() * 1_000_000) - PG_EPOCH_US


@dataclass(frozen=True, slots=True)
class SlotInfo:
    name: str
    consistent_point: int
    snapshot_name: str | None
    created: bool


def session_options(dsn: str) -> str:
    """libpq ``options`` for the session settings the text parsers rely on, after the DSN's own."""
    try:
        existing = psycopg.conninfo.conninfo_to_dict(dsn).get("options") or ""
    except psycopg.ProgrammingError:
        existing = ""
    ours = " ".join(f"-c {k}={v.replace(' ', '')}" for k, v in SESSION_SETTINGS.items())
    return f"{existing} {ours}".strip()


def connect(
    dsn: str, password: str | None = None, replication: bool = False, **kw: Any
) -> psycopg.Connection[Any]:
    extra: dict[str, Any] = {"autocommit": True, "connect_timeout": 10, **kw}
    extra["options"] = session_options(dsn)
    if password:
        extra["password"] = password
    if replication:
        extra["replication"] = "database"
        extra.setdefault("client_encoding", "UTF8")
    try:
        return psycopg.connect(dsn, **extra)
    except psycopg.OperationalError as exc:
        msg = str(exc).strip()
        if (
            replication
            and "replication" in msg
            and ("permission" in msg or "must be superuser" in msg or "no pg_hba.conf entry" in msg)
        ):
            raise PreflightError(
                f"the database refused a replication connection: {msg}. Fix: grant REPLICATION to the role "
                "(ALTER ROLE <role> REPLICATION) and allow it in pg_hba.conf"
            ) from exc
        raise ReplicationLost(f"cannot connect to PostgreSQL: {msg}") from exc


def _split_table(name: str) -> tuple[str, str]:
    if "." in name:
        schema, table = name.split(".", 1)
        return schema, table
    return "public", name


def preflight(conn: psycopg.Connection[Any], tables: Sequence[str]) -> dict[str, Any]:
    """Check the server is ready for logical replication; raise PreflightError naming the fix."""
    info: dict[str, Any] = {}
    wal_level = conn.execute("show wal_level").fetchone()
    if not wal_level or wal_level[0] != "logical":
        raise PreflightError(
            f"wal_level is {wal_level[0] if wal_level else '?'!r}, logical decoding needs 'logical'. Fix: "
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
        )
    row = conn.execute(
        "select rolreplication or rolsuper, current_user from pg_roles where rolname = current_user"
    ).fetchone()
    if not row or not row[0]:
        user = row[1] if row else "?"
        raise PreflightError(
            f"role {user!r} lacks the REPLICATION privilege. Fix: ALTER ROLE {user} REPLICATION;"
        )
    info["server_version"] = conn.info.server_version
    missing = []
    for name in tables:
        schema, table = _split_table(name)
        found = conn.execute(
            "select c.relkind from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = %s and c.relname = %s",
            (schema, table),
        ).fetchone()
        if found is None:
            missing.append(f"{schema}.{table}")
        elif found[0] not in ("r", "p"):
            raise PreflightError(
                f"{schema}.{table} is not a table (relkind {found[0]!r}); only tables can be published"
            )
    if missing:
        raise PreflightError(
            f"table(s) listed in postgres.tables do not exist: {', '.join(missing)}. Fix: create them or remove them from the config"
        )
    for schema, table, ident in conn.execute(
        """select n.nspname, c.relname, c.relreplident from pg_class c join pg_namespace n on n.oid = c.relnamespace
           where c.relkind in ('r','p') and n.nspname not in ('pg_catalog','information_schema')
           and (c.relreplident = 'n' or (c.relreplident = 'd' and not exists (select 1 from pg_index i where i.indrelid = c.oid and i.indisprimary)))"""
    ).fetchall():
        if not tables or f"{schema}.{table}" in {".".join(_split_table(t)) for t in tables}:
            log.warning(
                "table %s.%s has %s: its updates and deletes carry no before image (set REPLICA IDENTITY FULL or add a primary key)",
                schema,
                table,
                "REPLICA IDENTITY NOTHING" if ident == "n" else "no primary key",
            )
    return info


VIA_ROOT = "publish_via_partition_root"
"""The publication option that makes PostgreSQL publish a partitioned table's changes
(and its initial rows) as the table's own, not as its partitions': the relay's rules and
the applier name the partitioned table, and a row moved between partitions by an UPDATE
then arrives as a delete and an insert of that one table."""


def ensure_publication(
    conn: psycopg.Connection[Any], name: str, tables: Sequence[str]
) -> list[str]:
    """Create the publication if missing (publishing partitioned tables through their
    root, :data:`VIA_ROOT`); add listed tables it lacks.  Returns the tables added to an
    existing publication (``schema.table``).  An existing publication that publishes a
    listed partitioned table through its partitions is refused (its changes would go to
    the partitions' topics, which nothing that follows the table reads)."""
    row = conn.execute(
        "select puballtables, pubviaroot from pg_publication where pubname = %s", (name,)
    ).fetchone()
    idents = [sql.Identifier(*_split_table(t)) for t in tables]
    if row is None:
        options = sql.SQL(" with ({} = true)").format(sql.SQL(VIA_ROOT))
        if tables:
            conn.execute(
                sql.SQL("create publication {} for table {}{}").format(
                    sql.Identifier(name), sql.SQL(", ").join(idents), options
                )
            )
        else:
            conn.execute(
                sql.SQL("create publication {} for all tables{}").format(
                    sql.Identifier(name), options
                )
            )
        log.info("created publication %s (%s)", name, ", ".join(tables) or "all tables")
        return []
    if not row[1]:
        _refuse_partitioned_tables(conn, name, tables)
    if row[0] or not tables:
        if not row[0] and not tables:
            log.warning(
                "publication %s exists and does not cover all tables; using it as it is", name
            )
        return []
    added, _ = add_listed_tables(conn, name, tables)
    if added:
        log.info("added %d table(s) to publication %s: %s", len(added), name, ", ".join(added))
    return added


LISTED_TABLES_QUERY = """
select t.schema, t.name, c.oid is not null, p.tablename is not null
from unnest(%s::text[], %s::text[]) with ordinality as t(schema, name, n)
left join pg_namespace ns on ns.nspname = t.schema
left join pg_class c on c.relnamespace = ns.oid and c.relname = t.name and c.relkind in ('r', 'p')
left join pg_publication_tables p
  on p.pubname = %s and p.schemaname = t.schema and p.tablename = t.name
order by t.n
"""
"""Each listed table (schema, name): whether it exists, whether the publication has it."""


def add_listed_tables(
    conn: psycopg.Connection[Any], name: str, tables: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Add to the publication ``name`` every table of ``tables`` that exists and is not in
    it (a listed table dropped and created again, or taken out with ALTER PUBLICATION …
    DROP TABLE).  Returns the tables added and the tables that do not exist (each
    ``schema.table``)."""
    parts = list(dict.fromkeys(_split_table(t) for t in tables))
    rows = conn.execute(
        LISTED_TABLES_QUERY, ([s for s, _ in parts], [t for _, t in parts], name)
    ).fetchall()
    add = [(str(s), str(t)) for s, t, exists, published in rows if exists and not published]
    if add:
        conn.execute(
            sql.SQL("alter publication {} add table {}").format(
                sql.Identifier(name), sql.SQL(", ").join(sql.Identifier(*a) for a in add)
            )
        )
    missing = [f"{s}.{t}" for s, t, exists, _ in rows if not exists]
    return [f"{s}.{t}" for s, t in add], missing


def _refuse_partitioned_tables(
    conn: psycopg.Connection[Any], name: str, tables: Sequence[str]
) -> None:
    """PreflightError when a listed table is partitioned and publication ``name`` lacks
    :data:`VIA_ROOT` (it would publish the table's changes as its partitions')."""
    partitioned = [
        f"{schema}.{table}"
        for schema, table in map(_split_table, tables)
        if conn.execute(
            "select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname = %s and c.relname = %s and c.relkind = 'p'",
            (schema, table),
        ).fetchone()
    ]
    if partitioned:
        raise PreflightError(
            f"publication {name} publishes the partitioned table(s) {', '.join(partitioned)} "
            f"through their partitions, so their changes would never reach the table's "
            f"topic. Fix: ALTER PUBLICATION {name} SET ({VIA_ROOT} = true); then "
            f"`fieldsync cdc snapshot --table` each of them"
        )


def slot_state(conn: psycopg.Connection[Any], slot: str) -> dict[str, Any] | None:
    """The slot as ``pg_replication_slots`` shows it (None when there is no such slot):
    ``lag_bytes`` is the server's WAL end minus the confirmed flush position;
    ``wal_status`` (reserved, extended, unreserved, lost) and ``safe_wal_size`` (bytes
    that can still be written before the slot is in danger; None without
    ``max_slot_wal_keep_size``) say whether the WAL it needs is kept."""
    row = conn.execute(
        """select plugin, database, confirmed_flush_lsn::text, restart_lsn::text, active, active_pid,
                  pg_current_wal_lsn()::text,
                  pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
                  wal_status, safe_wal_size
           from pg_replication_slots where slot_name = %s""",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    return {
        "plugin": row[0],
        "database": row[1],
        "confirmed_flush_lsn": row[2],
        "restart_lsn": row[3],
        "active": row[4],
        "active_pid": row[5],
        "current_wal_lsn": row[6],
        "lag_bytes": row[7],
        "wal_status": row[8],
        "safe_wal_size": row[9],
    }


def create_slot(rconn: psycopg.Connection[Any], slot: str, export_snapshot: bool) -> SlotInfo:
    if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
        raise PreflightError(f"invalid slot name {slot!r}: use lower-case letters, digits and _")
    mode = "'export'" if export_snapshot else "'nothing'"
    try:
        row = rconn.execute(
            f"CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT {mode})"
        ).fetchone()
    except psycopg.Error as exc:
        raise SourceError(f"cannot create replication slot {slot!r}: {str(exc).strip()}") from exc
    assert row is not None
    return SlotInfo(slot, parse_lsn(row[1]), row[2], True)


def drop_slot(conn: psycopg.Connection[Any], slot: str) -> None:
    conn.execute(
        "select pg_drop_replication_slot(%s) from pg_replication_slots where slot_name = %s",
        (slot, slot),
    )


def highest_proto_version(server_version: int) -> int:
    if server_version >= 160000:
        return 4
    if server_version >= 150000:
        return 3
    if server_version >= 140000:
        return 2
    return 1


@dataclass(slots=True)
class XLogData:
    wal_start: int
    wal_end: int
    payload: memoryview


@dataclass(slots=True)
class Keepalive:
    wal_end: int
    reply_requested: bool


class ReplicationStream:
    """A started logical replication stream on a ``replication=database`` connection."""

    def __init__(
        self,
        rconn: psycopg.Connection[Any],
        slot: str,
        publication: str,
        start_lsn: int,
        proto_version: int,
        streaming: bool,
        messages: bool = True,
    ) -> None:
        self.conn = rconn
        self.pgconn = rconn.pgconn
        self.proto_version = proto_version
        opts = [f"proto_version '{proto_version}'", f"publication_names '{publication}'"]
        if messages:
            opts.append("messages 'true'")
        if streaming and proto_version >= 2:
            opts.append("streaming 'on'")
        self.streaming = streaming and proto_version >= 2
        cmd = f"START_REPLICATION SLOT {slot} LOGICAL {format_lsn(start_lsn)} ({', '.join(opts)})"
        log.info("%s", cmd)
        self.pgconn.send_query(cmd.encode())
        res = self.pgconn.get_result()
        if res is None or res.status != psycopg.pq.ExecStatus.COPY_BOTH:
            msg = (
                res.error_message.decode(errors="replace").strip()
                if res is not None
                else "no result"
            )
            text = f"START_REPLICATION failed for slot {slot!r}: {msg}"
            if _transient_start_failure(res, self.pgconn):
                # the server is shutting down or restarting, the connection is gone, or the
                # slot is still held by a walsender that has not noticed its client left:
                # a new session will do
                raise ReplicationLost(text)
            raise SourceError(text)
        self.last_status_sent = 0.0

    def fileno(self) -> int:
        return int(self.pgconn.socket)

    def read(self, timeout: float) -> XLogData | Keepalive | None:
        """Return the next message, or None when nothing arrived within ``timeout`` seconds."""
        msgs = self.read_many(timeout, 1)
        return msgs[0] if msgs else None

    def read_many(self, timeout: float, limit: int) -> list[XLogData | Keepalive]:
        """The messages already received, at most ``limit`` of them, in order; when none is,
        wait up to ``timeout`` seconds for one (an empty list: nothing arrived).

        One call hands the streaming loop a run of messages, so its per-read work (stop
        flag, watchdog, re-snapshot checks) is done once per run, not once per message."""
        out: list[XLogData | Keepalive] = []
        pgconn = self.pgconn
        deadline = None
        while True:
            try:
                n, data = pgconn.get_copy_data(1)
            except psycopg.Error as exc:
                raise ReplicationLost(f"replication stream failed: {exc}") from exc
            if n > 0:
                assert data is not None
                mv = memoryview(data)
                kind = mv[0]
                if kind == 0x77:  # 'w'
                    start, end, _ts = _XLOGDATA.unpack_from(mv, 1)
                    out.append(XLogData(start, end, mv[25:]))
                elif kind == 0x6B:  # 'k'
                    end, _ts, reply = _KEEPALIVE.unpack_from(mv, 1)
                    out.append(Keepalive(end, reply))
                else:
                    raise ReplicationLost(f"unexpected replication message type {bytes(mv[:1])!r}")
                if len(out) >= limit:
                    return out
                continue
            if n == -1:
                res = pgconn.get_result()
                msg = res.error_message.decode(errors="replace").strip() if res is not None else ""
                raise ReplicationLost(f"replication stream ended by the server {msg}".strip())
            if n < -1:
                raise ReplicationLost(
                    f"replication stream error: {pgconn.error_message.decode(errors='replace').strip()}"
                )
            # n == 0: nothing (more) buffered
            if out:
                return out
            if deadline is None:
                deadline = time.monotonic() + timeout
            # even with no time left, look at the socket once: data may be waiting in the kernel
            remaining = max(0.0, deadline - time.monotonic())
            try:
                r, _, _ = select.select([self.fileno()], [], [], remaining)
            except (OSError, ValueError) as exc:
                raise ReplicationLost(f"replication socket failed: {exc}") from exc
            if not r:
                return out
            try:
                pgconn.consume_input()
            except psycopg.Error as exc:
                raise ReplicationLost(f"replication connection lost: {str(exc).strip()}") from exc

    def send_status(
        self, flush_lsn: int, write_lsn: int | None = None, reply: bool = False
    ) -> None:
        w = max(write_lsn or 0, flush_lsn)
        msg = _STATUS.pack(b"r", w, flush_lsn, flush_lsn, now_pg_us(), reply)
        try:
            self.pgconn.put_copy_data(msg)
            self.pgconn.flush()
        except psycopg.Error as exc:
            raise ReplicationLost(f"sending standby status failed: {exc}") from exc
        self.last_status_sent = time.monotonic()

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


_TRANSIENT_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "55006"})


def _transient_start_failure(res: Any, pgconn: Any) -> bool:
    """A failed START_REPLICATION that a new session can cure: no result or a lost
    connection, connection errors (class 08), server shutdown or start-up (57P01-57P03),
    or the slot still active (55006)."""
    if res is None or pgconn.status != psycopg.pq.ConnStatus.OK:
        return True
    raw = res.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
    state = raw.decode() if raw else ""
    return state.startswith("08") or state in _TRANSIENT_SQLSTATES
