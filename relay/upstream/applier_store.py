"""The applier's own tables in the captured database (schema ``fieldsync_applier``), and
the SQL that writes them.

Tables (created and migrated by :data:`MIGRATIONS`, :func:`relay.pg_migrations.run_migrations`
under the advisory lock :data:`MIGRATE_LOCK`):

- ``applied``: one row per ``(device_id, seq)`` applied or rejected (the idempotency
  record and the audit: decision, reason, table, key, HLC, base, per-column detail);
- ``conflicts``: kept ``ask`` conflicts with both versions, until resolved;
- ``offsets``: the next ``_journal`` offset per consumer and partition (only ever
  raised: ``greatest``);
- ``row_clock``: the HLC and transaction id of the applier's latest write of a row (for
  ``lww``/``fww`` tables only);
- ``outbox``: outcomes to publish to ``_outcomes`` (one row per run);
- ``bad_records`` / ``dead_letters``: unreadable records, and entries rejected because
  writing them failed, kept with the raw record.

Every write here happens inside the caller's transaction (the run's, or a
resolution's), so the data writes, their bookkeeping and the offsets commit together.
Also here: the origin message that names the writer of a transaction's changes
(:func:`emit_origin`), the WAL and transaction positions the applier reads, and the reads
of its bookkeeping from outside (offsets, what was kept aside, the shards' lock names).

Thin I/O: each function runs its statements on the given cursor; no state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Final

import psycopg

from core.avro_envelope import ORIGIN_MESSAGE_PREFIX
from core.journal_format import JournalRecord
from core.journal_outcomes import Outcome, encode_outcomes
from core.row_wire import row_key_text
from core.values import dump_json
from relay.upstream.applier_failures import Failed

__all__ = [
    "LOCK_CLASS",
    "MIGRATE_LOCK",
    "MIGRATIONS",
    "SCHEMA",
    "Delivery",
    "clean",
    "count_kept_aside",
    "current_xid",
    "emit_origin",
    "lock_name",
    "put_outbox",
    "read_offsets",
    "save_offsets",
    "wal_insert_lsn",
    "write_applied",
    "write_bad_record",
    "write_conflicts",
    "write_dead_letter",
    "write_minimal_rejection",
    "write_row_clocks",
]

SCHEMA: Final = "fieldsync_applier"
LOCK_CLASS: Final = 0x66730002  # advisory lock namespace ("fs" + 2)
MIGRATE_LOCK: Final = (LOCK_CLASS, 0)
_EMIT: Final = "select pg_logical_emit_message(true, %s, %s)"
_XID32: Final = "select pg_current_xact_id()::text::bigint % 4294967296"

MIGRATIONS: Final[tuple[str, ...]] = (
    f"""
    create table {SCHEMA}.applied (
        device_id text not null,
        seq bigint not null,
        outcome text not null,
        reason text,
        message text not null default '',
        tbl text,
        row_key text,
        op text,
        hlc text,
        base_lsn bigint,
        base_seq bigint,
        detail jsonb,
        received_us bigint,
        applied_at timestamptz not null default clock_timestamp(),
        primary key (device_id, seq)
    );
    create index applied_at_idx on {SCHEMA}.applied (applied_at);
    create table {SCHEMA}.conflicts (
        id text primary key,
        device_id text not null,
        seq bigint not null,
        tbl text not null,
        row_key text not null,
        key jsonb not null,
        kind text not null check (kind in ('columns', 'row')),
        held jsonb not null,
        claims jsonb not null,
        status text not null default 'open' check (status in ('open', 'resolved')),
        resolution jsonb,
        created_at timestamptz not null default now(),
        resolved_at timestamptz,
        resolved_by text
    );
    create index conflicts_open_idx on {SCHEMA}.conflicts (device_id, created_at)
        where status = 'open';
    create table {SCHEMA}.offsets (
        consumer text not null,
        topic text not null,
        partition int not null,
        next_offset bigint not null,
        primary key (consumer, topic, partition)
    );
    create table {SCHEMA}.row_clock (
        tbl text not null,
        row_key text not null,
        hlc text not null,
        xid bigint not null,
        deleted boolean not null default false,
        primary key (tbl, row_key)
    );
    create table {SCHEMA}.outbox (
        id bigserial primary key,
        device_id text not null,
        payload bytea not null
    );
    create table {SCHEMA}.bad_records (
        topic text not null,
        partition int not null,
        "offset" bigint not null,
        error text not null,
        raw bytea,
        at timestamptz not null default now(),
        primary key (topic, partition, "offset")
    );
    """,
    f"""
    create table {SCHEMA}.dead_letters (
        topic text not null,
        partition int not null,
        "offset" bigint not null,
        device_id text not null,
        seq bigint not null,
        reason text not null,
        sqlstate text,
        message text not null,
        record bytea,
        at timestamptz not null default now(),
        primary key (topic, partition, "offset")
    );
    create index dead_letters_entry_idx on {SCHEMA}.dead_letters (device_id, seq);
    """,
)


@dataclasses.dataclass(frozen=True)
class Delivery:
    """Where a journal record came from (the key of its bad record or dead letter), and
    its Kafka timestamp (ms; the intake's send time), which is not part of its identity."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = dataclasses.field(default=None, compare=False)


def clean(text: str, limit: int = 4000) -> str:
    """Text PostgreSQL can store (no NUL), at most ``limit`` characters."""
    return text.replace("\x00", "\\x00")[:limit]


# --------------------------------------------------------------------------- positions


def emit_origin(cur: psycopg.Cursor[Any], origin: str) -> None:
    """Name the writer of the transaction's changes (``device:<id>``, ``resolve:<id>``):
    cdc puts it into ``source.origin`` of every change the transaction made."""
    cur.execute(_EMIT, (ORIGIN_MESSAGE_PREFIX, origin))


def wal_insert_lsn(cur: psycopg.Cursor[Any]) -> int:
    """``pg_current_wal_insert_lsn()`` as an integer (the 64-bit WAL position)."""
    row = cur.execute("select pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    high, _, low = str(row[0]).partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def current_xid(cur: psycopg.Cursor[Any]) -> int:
    """The transaction's id as 32 bits (what ``xmin`` of the rows it writes shows)."""
    row = cur.execute(_XID32).fetchone()
    assert row is not None
    return int(row[0])


# --------------------------------------------------------------------------- reads


def lock_name(consumer: str, shard: int, shards: int) -> str:
    """What the leadership lock of one applier shard is keyed by (``hashtext`` of it)."""
    return f"{consumer}/{shard}of{shards}"


def read_offsets(conn: psycopg.Connection[Any], consumer: str, topic: str) -> dict[int, int]:
    """Next offset per partition of ``topic`` recorded by ``consumer``."""
    rows = conn.execute(
        f"select partition, next_offset from {SCHEMA}.offsets where consumer = %s and topic = %s",
        (consumer, topic),
    ).fetchall()
    return {int(p): int(o) for p, o in rows}


def count_kept_aside(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """``(dead letters, bad records)``: entries kept aside because writing them failed,
    and records that could not be read; both wait for an operator."""
    row = conn.execute(
        f"select (select count(*) from {SCHEMA}.dead_letters), "
        f"(select count(*) from {SCHEMA}.bad_records)"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# --------------------------------------------------------------------------- writes


def save_offsets(
    cur: psycopg.Cursor[Any], consumer: str, top: Mapping[tuple[str, int], int]
) -> None:
    cur.executemany(
        f"insert into {SCHEMA}.offsets (consumer, topic, partition, next_offset) values (%s, %s, %s, %s) "
        "on conflict (consumer, topic, partition) do update "
        "set next_offset = greatest(offsets.next_offset, excluded.next_offset)",
        [(consumer, t, p, o) for (t, p), o in top.items()],
    )


def put_outbox(cur: psycopg.Cursor[Any], device_id: str, outcomes: Sequence[Outcome]) -> None:
    """Queue outcomes of one device for ``_outcomes`` (one outbox row)."""
    cur.execute(
        f"insert into {SCHEMA}.outbox (device_id, payload) values (%s, %s)",
        (device_id, encode_outcomes(outcomes)),
    )


def write_applied(
    cur: psycopg.Cursor[Any], outcomes: Sequence[Outcome], records: Mapping[int, JournalRecord]
) -> None:
    """The ``applied`` record of each outcome (``records``: the run's, by seq), and the
    outcomes into the outbox."""
    applied = []
    for o in outcomes:
        record = records[o.seq]
        entry = record.entry
        detail: dict[str, Any] = {}
        if o.columns:
            detail["columns"] = dict(o.columns)
        if o.conflict:
            detail["conflict"] = o.conflict.get("id")
        applied.append(
            (
                o.device_id,
                o.seq,
                o.kind.value,
                o.reason,
                o.message,
                o.table,
                row_key_text(list(o.key)) if o.key is not None else None,
                entry.op.value if entry is not None else None,
                o.hlc,
                entry.base.commit_lsn if entry is not None and entry.base is not None else None,
                entry.base.seq if entry is not None and entry.base is not None else None,
                dump_json(detail).decode("utf-8") if detail else None,
                record.received_at_us or None,
            )
        )
    if applied:
        with cur.copy(
            f"copy {SCHEMA}.applied (device_id, seq, outcome, reason, message, tbl, row_key, "
            "op, hlc, base_lsn, base_seq, detail, received_us) from stdin"
        ) as copy:
            for row in applied:
                copy.write_row(row)
        put_outbox(cur, outcomes[0].device_id, outcomes)


def write_conflicts(cur: psycopg.Cursor[Any], rows: Sequence[tuple[Any, ...]]) -> None:
    """Kept conflicts: ``(id, device_id, seq, tbl, row_key, key, kind, held, claims)``."""
    if rows:
        cur.executemany(
            f"insert into {SCHEMA}.conflicts (id, device_id, seq, tbl, row_key, key, kind, held, claims) "
            "values (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            rows,
        )


def write_row_clocks(
    cur: psycopg.Cursor[Any], rows: Sequence[tuple[str, str, str, int, bool]]
) -> None:
    """Row clocks ``(tbl, row_key, hlc, xid, deleted)``, replacing the previous ones."""
    if rows:
        columns = [list(c) for c in zip(*rows, strict=True)]
        cur.execute(
            f"insert into {SCHEMA}.row_clock (tbl, row_key, hlc, xid, deleted) "
            "select * from unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::bool[]) "
            "on conflict (tbl, row_key) do update set hlc = excluded.hlc, xid = excluded.xid, "
            "deleted = excluded.deleted",
            columns,
        )


def write_minimal_rejection(
    cur: psycopg.Cursor[Any], record: JournalRecord, outcome: Outcome
) -> bool:
    """The ``applied`` record of a rejection carrying nothing of the entry's content, and
    its outcome into the outbox; False (nothing written) if the entry has one already."""
    cur.execute(
        f"insert into {SCHEMA}.applied (device_id, seq, outcome, reason, message, "
        "received_us) values (%s, %s, %s, %s, %s, %s) on conflict do nothing",
        (
            record.device_id,
            record.seq,
            outcome.kind.value,
            outcome.reason,
            outcome.message,
            record.received_at_us or None,
        ),
    )
    if cur.rowcount == 0:  # applied meanwhile (an overlapping shard): nothing to do
        return False
    put_outbox(cur, record.device_id, [outcome])
    return True


def write_dead_letter(
    cur: psycopg.Cursor[Any], where: Delivery, record: JournalRecord, raw: bytes, failed: Failed
) -> None:
    cur.execute(
        f'insert into {SCHEMA}.dead_letters (topic, partition, "offset", device_id, seq, '
        "reason, sqlstate, message, record) values (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "on conflict do nothing",
        (
            where.topic,
            where.partition,
            where.offset,
            record.device_id,
            record.seq,
            failed.reason.value,
            failed.sqlstate,
            clean(failed.message),
            raw[: 1 << 20],
        ),
    )


def write_bad_record(cur: psycopg.Cursor[Any], where: Delivery, error: str, raw: bytes) -> None:
    cur.execute(
        f'insert into {SCHEMA}.bad_records (topic, partition, "offset", error, raw) '
        "values (%s, %s, %s, %s, %s) on conflict do nothing",
        (where.topic, where.partition, where.offset, error, raw[:65536]),
    )
