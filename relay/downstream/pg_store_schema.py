"""The bucket store's PostgreSQL schema ``fieldsync_relay``: tables, migrations, locks,
the wake-up channel, and the SQL parameter helpers its statements share.

Tables (migration 1; :data:`MIGRATIONS` is the versioned, append-only list; migration 2
leaves free space in ``buckets`` and ``row_state`` pages for in-place updates, migration 3
records the rules' placement and makes compaction epochs unique to the store)::

    schema_migrations  version, description, applied_at
    meta               one row: head_op_id (highest committed op id), store_id (uuid),
                       rules_placement (migration 3: the rules' placement it is built with)
    ops                (bucket, op_id) PK, tbl, row_key, kind PUT|REMOVE, data (canonical
                       JSON text of the projected row, NULL for REMOVE), commit_lsn, seq
    buckets            bucket PK, last_op_id, row_count, checksum (u64 as two's-complement
                       bigint), compacted_below, epoch (from migration 3 a bucket's first
                       epoch is the store's creation time in µs), log_count (ops in the log)
    row_state          (tbl, row_key) PK, entries (JSON text [[bucket, op_id, term], ...]:
                       the buckets the row is in, its latest PUT there and its checksum
                       term; ``[]`` is a tombstone), commit_lsn, seq (last applied position)
    table_state        tbl PK, truncated_lsn, truncated_seq (position of the last truncate)
    consumer_progress  (grp, topic, part) PK, next_offset, commit_lsn, seq

Advisory locks (class ``"fs" + 1``): :data:`WRITE_LOCK` orders the writers' op ids,
:data:`MIGRATE_LOCK` serializes migrations, :func:`group_lock` is an engine group's
leadership.  Wake-ups: each writing transaction ends with ``pg_notify(NOTIFY_CHANNEL,
notify_payload(head, buckets))``, ``<head op id>\n<bucket>\n<bucket>…`` (only
``<head>\n*`` when the bucket list does not fit in a NOTIFY payload).

:func:`migrate` runs on a connection the caller holds (under :data:`MIGRATE_LOCK`),
:func:`bind_placement` in the caller's transaction; everything else here is pure.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any, Final

import psycopg

from core.row_wire import CHECKSUM_MODULUS
from core.topic_names import change_topic_of
from relay.downstream.rules_placement import changed_tables, placement_changes
from relay.errors import StoreError, StoreRulesMismatch

log = logging.getLogger("relay.downstream.pg_bucket_store")

SCHEMA: Final = "fieldsync_relay"
NOTIFY_CHANNEL: Final = "fieldsync_relay_ops"
LOCK_CLASS: Final = 0x66730001  # advisory lock namespace ("fs" + 1)
WRITE_LOCK: Final = (LOCK_CLASS, 1)
MIGRATE_LOCK: Final = (LOCK_CLASS, 2)
NOTIFY_MAX: Final = 7900  # NOTIFY payloads must stay below 8000 bytes


MIGRATIONS: Final[tuple[tuple[int, str, str], ...]] = (
    (
        1,
        "op logs, bucket checkpoints, row state, table state, consumer progress",
        f"""
        create table {SCHEMA}.meta (
            id int primary key default 1 check (id = 1),
            head_op_id bigint not null default 0,
            store_id uuid not null default gen_random_uuid(),
            created_at timestamptz not null default now()
        );
        insert into {SCHEMA}.meta default values;
        create sequence {SCHEMA}.op_id_seq as bigint minvalue 1 cache 1;
        create table {SCHEMA}.ops (
            bucket text not null,
            op_id bigint not null,
            tbl text not null,
            row_key text not null,
            kind text not null check (kind in ('PUT', 'REMOVE')),
            data text,
            commit_lsn bigint not null,
            seq bigint not null,
            primary key (bucket, op_id)
        );
        create table {SCHEMA}.buckets (
            bucket text primary key,
            last_op_id bigint not null default 0,
            row_count bigint not null default 0,
            checksum bigint not null default 0,
            compacted_below bigint not null default 0,
            epoch bigint not null default 0,
            log_count bigint not null default 0
        );
        create table {SCHEMA}.row_state (
            tbl text not null,
            row_key text not null,
            entries text not null,
            commit_lsn bigint not null,
            seq bigint not null,
            primary key (tbl, row_key)
        );
        create table {SCHEMA}.table_state (
            tbl text primary key,
            truncated_lsn bigint not null,
            truncated_seq bigint not null
        );
        create table {SCHEMA}.consumer_progress (
            grp text not null,
            topic text not null,
            part int not null,
            next_offset bigint not null,
            commit_lsn bigint not null,
            seq bigint not null,
            primary key (grp, topic, part)
        );
        """,
    ),
    (
        2,
        "room for in-place (HOT) updates of bucket checkpoints and row states",
        # every batch rewrites the checkpoint of each bucket it touches and the state of
        # each row it places: with free space on the page the new row version stays there
        # and no index entry is added (full pages made each update grow the indexes)
        f"""
        alter table {SCHEMA}.buckets set (fillfactor = 50);
        alter table {SCHEMA}.row_state set (fillfactor = 80);
        """,
    ),
    (
        3,
        "the placement of the rules the store is built with; compaction epochs per store",
        # meta.rules_placement: relay/downstream/rules_placement.py (a relay refuses to serve
        # the store under rules that place rows differently).  A bucket's first epoch is the
        # store's creation time in µs, so a cursor from another store (one rebuilt from the
        # topics, whose op ids may have passed the cursor's) names an epoch this store never
        # had, and the device re-syncs that bucket at once instead of at its checksum check.
        f"""
        alter table {SCHEMA}.meta add column rules_placement text;
        alter table {SCHEMA}.meta add column rules_bound_at timestamptz;
        do $$ begin
            execute format(
                'alter table {SCHEMA}.buckets alter column epoch set default %s',
                (extract(epoch from clock_timestamp()) * 1000000)::bigint
            );
        end $$;
        """,
    ),
)


def i64(u: int) -> int:
    """A u64 checksum as the two's-complement bigint the tables store."""
    return u - CHECKSUM_MODULUS if u >= 1 << 63 else u


def u64(i: int) -> int:
    """A stored bigint checksum back as the u64 it stands for."""
    return i % CHECKSUM_MODULUS


_SEP: Final = "\x1f"  # never in canonical JSON text (control characters are escaped)


def texts(values: Sequence[str]) -> str:
    """One text parameter for ``string_to_array(%s, E'\\x1f')``: much cheaper than a list
    parameter (psycopg dumps lists element by element in Python)."""
    joined = _SEP.join(values)
    if joined.count(_SEP) != max(0, len(values) - 1):
        raise StoreError(f"a value contains the separator character U+001F: {values!r:.200}")
    return joined


def ints(values: Sequence[int]) -> str:
    """One text parameter for ``string_to_array(%s, ',')::bigint[]``."""
    return ",".join(map(str, values))


TEXTS: Final = "string_to_array(%s, E'\\x1f')"
"""SQL of a text array parameter made with :func:`texts`."""
INTS: Final = "string_to_array(%s, ',')::bigint[]"
"""SQL of a bigint array parameter made with :func:`ints`."""
NULLABLE_INTS: Final = "string_to_array(%s, ',', '')::bigint[]"
"""SQL of a bigint array parameter with NULLs: the numbers' texts joined by ``,``, an empty
text for NULL."""


WRAP_SUM: Final = (
    "((({}::numeric + {}::numeric + 9223372036854775808) %% 18446744073709551616 "
    "+ 18446744073709551616) %% 18446744073709551616 - 9223372036854775808)::bigint"
)
"""SQL of ``a + b`` wrapping around in two's-complement 64 bits (u64 addition modulo 2**64
on the bigint representation)."""


def group_lock(group: str, share: int = 0) -> tuple[int, int]:
    """The session advisory lock the engine of consumer ``group`` leads ``share`` under
    (share 0 is the whole group's lock when there is one share)."""
    name = group if share == 0 else f"{group}\x00share {share}"
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return (LOCK_CLASS + 1, int.from_bytes(digest[:4], "big", signed=True))


def notify_payload(head: int, buckets: Sequence[str]) -> str:
    """``<head>\\n<bucket>…``, or ``<head>\\n*`` (every bucket) when that does not fit."""
    text = "\n".join([str(head), *buckets])
    return text if len(text.encode("utf-8")) <= NOTIFY_MAX else f"{head}\n*"


def parse_notify_payload(payload: str) -> tuple[int, frozenset[str] | None]:
    """The head op id and buckets of a payload (``None``: any bucket)."""
    head, _, rest = payload.partition("\n")
    if rest == "*":
        return int(head), None
    return int(head), frozenset(rest.split("\n")) if rest else frozenset()


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Create the schema and apply every migration not yet applied; returns the schema
    version.  The caller holds :data:`MIGRATE_LOCK` and converts psycopg errors."""
    with conn.transaction():
        conn.execute(f"create schema if not exists {SCHEMA}")
        conn.execute(
            f"create table if not exists {SCHEMA}.schema_migrations ("
            "version int primary key, description text not null, "
            "applied_at timestamptz not null default now())"
        )
    row = conn.execute(
        f"select coalesce(max(version), 0) from {SCHEMA}.schema_migrations"
    ).fetchone()
    current = int(row[0]) if row else 0
    known = MIGRATIONS[-1][0]
    if current > known:
        raise StoreError(
            f"bucket store schema {SCHEMA} is at version {current}, newer than this "
            f"relay knows ({known}); upgrade the relay"
        )
    for version, description, sql in MIGRATIONS:
        if version <= current:
            continue
        with conn.transaction():
            conn.execute(sql)
            conn.execute(
                f"insert into {SCHEMA}.schema_migrations (version, description) values (%s, %s)",
                (version, description),
            )
        log.info("bucket store: applied migration %d (%s)", version, description)
        current = version
    return current


def bind_placement(
    conn: psycopg.Connection[Any], placement: str, source: str, topic_prefix: str
) -> str:
    """Record the placement of the rules in ``source`` (canonical JSON,
    relay/downstream/rules_placement.py) in ``meta``, or check it against the recorded one,
    inside the caller's transaction.  Returns ``"same"``, ``"recorded"`` (the placement
    changed only for tables the store holds nothing of: no row state, no offset of the
    table's topic ``{topic_prefix}.{table}``) or ``"adopted"`` (a store from before
    migration 3 that holds rows: its rules are taken to be these).  Raises
    :class:`relay.errors.StoreRulesMismatch` naming each difference when the placement of
    a table the store holds changed."""
    row = conn.execute(
        f"select rules_placement, rules_bound_at from {SCHEMA}.meta for update"
    ).fetchone()
    if row is None:
        raise StoreError(f"bucket store {SCHEMA}.meta has no row")
    stored, bound_at = row
    if stored == placement:
        return "same"
    new = json.loads(placement)
    if stored is None:
        verdict = "adopted" if _held_tables(conn, None, topic_prefix) else "recorded"
    else:
        old = _stored_placement(stored)
        changes = placement_changes(old, new)
        held = _held_tables(conn, changed_tables(old, new), topic_prefix) if changes else []
        if held:
            raise StoreRulesMismatch(
                f"{source}: these rules place rows differently from the rules the bucket "
                f"store (schema {SCHEMA} of relay.store_dsn) was built with{_since(bound_at)}, "
                f"in tables it already holds rows or offsets of ({', '.join(held)}):\n  "
                + "\n  ".join(changes)
                + "\nServed under these rules the store would keep rows where the old rules "
                "put them, with the columns they chose, and devices would hold them. Restore "
                "the rules file, or rebuild the store for the new rules (docs/operations.md, "
                '"Rebuild the bucket store"): stop every relay and point relay.store_dsn at an '
                f"empty database, or drop schema {SCHEMA} there.",
                changes,
            )
        verdict = "recorded" if changes else "same"
    conn.execute(
        f"update {SCHEMA}.meta set rules_placement = %s, rules_bound_at = now()", (placement,)
    )
    return verdict


def _held_tables(
    conn: psycopg.Connection[Any], tables: set[str] | None, topic_prefix: str
) -> list[str]:
    """Of ``tables`` (None: any table), those the store holds a row state or a read offset
    of, sorted."""
    if tables is not None and not tables:
        return []
    rows = conn.execute(
        f"select distinct tbl from {SCHEMA}.row_state "
        "where %(all)s or tbl = any(%(tables)s) "
        f"union select distinct topic from {SCHEMA}.consumer_progress "
        "where %(all)s or topic = any(%(topics)s)",
        {
            "all": tables is None,
            "tables": sorted(tables or ()),
            "topics": [change_topic_of(topic_prefix, t) for t in sorted(tables or ())],
        },
    ).fetchall()
    found = {str(r[0]) for r in rows}
    if tables is None:
        return sorted(found)
    return sorted(t for t in tables if t in found or change_topic_of(topic_prefix, t) in found)


def _since(when: Any) -> str:
    return f" on {when:%Y-%m-%d %H:%M:%S %Z}" if when is not None else ""


def _stored_placement(stored: str) -> dict[str, Any]:
    try:
        old = json.loads(stored)
    except ValueError as exc:
        raise StoreError(f"bucket store {SCHEMA}.meta.rules_placement is not JSON: {exc}") from exc
    if not isinstance(old, dict):
        raise StoreError(f"bucket store {SCHEMA}.meta.rules_placement is not a JSON object")
    return old


_VERDICTS: Final = {
    "same": "built under the same placement of rows: it serves these rules as it is",
    "recorded": "serves these rules: the tables they place differently, if any, hold nothing "
    "there yet (a relay reads them from the beginning of their topics)",
    "adopted": "records no placement (made by an older relay): a relay starting with these "
    "rules takes them as the ones it was built with; rebuild it if they changed since",
}


def check_placement(dsn: str, placement: str, source: str, topic_prefix: str) -> str:
    """What :func:`bind_placement` would decide for the store at ``dsn``, as a sentence,
    with nothing written (``fieldsync relay check-rules --store-dsn``); raises
    StoreRulesMismatch as it would."""
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            row = conn.execute(
                "select to_regclass(%s)", (f"{SCHEMA}.schema_migrations",)
            ).fetchone()
            if not row or row[0] is None:
                return f"no bucket store there yet (schema {SCHEMA}): a relay creates it"
            version = conn.execute(
                f"select coalesce(max(version), 0) from {SCHEMA}.schema_migrations"
            ).fetchone()
            if not version or version[0] < 3:
                return _VERDICTS["adopted"]
            with conn.transaction(force_rollback=True):
                return _VERDICTS[bind_placement(conn, placement, source, topic_prefix)]
    except psycopg.Error as exc:
        raise StoreError(f"cannot read the bucket store: {exc}") from exc
