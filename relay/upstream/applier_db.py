"""The upstream applier's PostgreSQL side: device journal entries into the captured database.

Data path (docs/journal.md is the reference)::

    {prefix}._journal ──poll──▶ JournalRecord ──▶ runs (one device, one partition)
        ──▶ ONE PostgreSQL transaction per run:
              pg_logical_emit_message(true, 'fieldsync.origin', 'device:<id>')
              idempotency check (fieldsync_applier.applied)
              validate ── read rows ── merge (relay.upstream.merge) ── write rows
              applied records, kept conflicts, outbox, Kafka offsets
        ──commit──▶ outbox ──▶ {prefix}._outcomes (keyed by device) ──▶ delete from outbox

:class:`ApplierDb` owns the connection: it reads the catalog (:mod:`relay.upstream.applier_tables`),
the rules and the conflict policies at :meth:`~ApplierDb.connect`, creates its tables
(:mod:`relay.upstream.applier_store`), holds the leadership lock, and is the
:class:`~relay.upstream.applier_run.ApplyContext` through which polls are applied
(:class:`~relay.upstream.applier_runs.RunApplier`: runs, retries, dead letters;
:mod:`relay.upstream.applier_entries`: one entry) and conflicts resolved
(:mod:`relay.upstream.applier_resolve`).  The Kafka side is :mod:`relay.upstream.applier`.

- **Exactly once**: each entry's data write and its idempotency record commit in the
  same transaction, and so do the consumer offsets (``fieldsync_applier.offsets``), the
  only offsets used; a record delivered twice finds its ``(device, seq)`` in ``applied``
  and is skipped.
- **The server version's time** (for ``lww``/``fww``): the HLC of the applier's own
  write of the row (``row_clock``, kept only for such tables), else the commit time of
  ``xmin`` (``track_commit_timestamp``), else the table's ``time_column``, else unknown.
  Tables whose policies need a time but have neither commit timestamps nor a
  ``time_column`` are refused at :meth:`~ApplierDb.connect`.
- **One applier per database, consumer name and shard**: a session advisory lock on
  the connection that writes; others stand by.  With ``shards`` = K, shard *i* consumes
  the partitions *p* with *p* mod K = *i*; offsets are kept per partition, so K may
  change between restarts.  Shards that overlap by mistake stay correct: an entry's
  ``applied`` record can be inserted only once, and the loser skips it as a duplicate.

The session uses cdc's text formats (:data:`core.pg_types.SESSION_SETTINGS`, TimeZone
UTC included) so values read back parse exactly.

Not thread-safe: one connection, used by one thread (the applier's, or a caller that
serializes, like the relay's conflict desk).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg.types.json import set_json_dumps

from core.hlc import HybridClock, wall_clock_ms
from core.journal_format import JournalEntry
from core.journal_outcomes import Outcome
from core.pg_types import SESSION_SETTINGS, output_function_text
from core.values import dump_json
from relay.downstream.rules import Rules
from relay.downstream.rules_parser import rules_tables
from relay.downstream.table_follower import changed_tables, describe_change
from relay.errors import ApplierError, ConfigError
from relay.pg_migrations import run_migrations
from relay.upstream.applier_catalog import (
    CATALOG_CHECK_S,
    Documents,
    bind_catalog,
    catalog_mark,
    names_unknown,
    read_documents,
)
from relay.upstream.applier_resolve import resolve_conflict
from relay.upstream.applier_run import ApplyStats
from relay.upstream.applier_runs import RunApplier
from relay.upstream.applier_store import (
    LOCK_CLASS,
    MIGRATE_LOCK,
    MIGRATIONS,
    SCHEMA,
    Delivery,
    lock_name,
    read_offsets,
)
from relay.upstream.applier_tables import TableMeta
from relay.upstream.conflict_policies import ConflictPolicies
from relay.upstream.write_rules import WriteScope

__all__ = ["SERVER_NODE", "ApplierDb"]

log = logging.getLogger("relay.upstream.applier")

SERVER_NODE: Final = "fieldsync-applier"
"""The HLC node of the applier's own edits (conflict resolutions)."""


class ApplierDb:
    """The applier's PostgreSQL side: catalog, rules, policies, runs, outbox, resolutions
    (an :class:`~relay.upstream.applier_run.ApplyContext`).

    ``rules_path``/``conflicts_path`` are read at :meth:`connect` against the captured
    database's catalog (``conflicts_path`` None: every table ``server_wins``).
    """

    def __init__(
        self,
        dsn: str,
        rules_path: str | Path,
        conflicts_path: str | Path | None = None,
        *,
        password: str | None = None,
        consumer: str = "fieldsync-applier",
        shard: int = 0,
        shards: int = 1,
        max_skew_ms: int = 60_000,
        wall_ms: Callable[[], int] = wall_clock_ms,
        lock_timeout_ms: int = 2000,
    ) -> None:
        self.dsn = dsn
        self.password = password
        self.rules_path = rules_path
        self.conflicts_path = conflicts_path
        self.consumer = consumer
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} is not one of 0..{shards - 1}")
        self.shard, self.shards = shard, shards
        self.max_skew_ms = max_skew_ms
        self.lock_timeout_ms = lock_timeout_ms
        self.wall_ms = wall_ms
        self.clock = HybridClock(SERVER_NODE, wall_ms=wall_ms)
        self.stats = ApplyStats()
        self.conn: psycopg.Connection[Any] | None = None
        self.rules: Rules | None = None
        self.policies = ConflictPolicies()
        self.tables: dict[str, TableMeta] = {}
        self.commit_timestamps = False
        self._scopes: dict[str, WriteScope] = {}
        self._lock_id = 0
        self._mark: str | None = None  # catalog_mark when the catalog was read
        self._marked_at = time.monotonic()  # when it was last compared
        self._failed_mark: str | None = None  # one a re-read failed for (logged once)
        self._documents = Documents({}, None)
        self._raw: psycopg.Cursor[Any] | None = None
        self._last_scope: tuple[dict[str, Any], WriteScope] | None = None
        self.runs = RunApplier(self)

    # ---- connection, catalog, configuration

    def connect(self) -> None:
        """(Re)connect, read the catalog, load rules and policies; raises ConfigError for
        invalid rules/policies, ApplierError when the database is unreachable."""
        self.close()
        kw: dict[str, Any] = {"autocommit": True, "connect_timeout": 10}
        if self.password:
            kw["password"] = self.password
        try:
            conn = psycopg.connect(self.dsn, **kw)
        except psycopg.Error as exc:
            raise ApplierError(f"cannot connect to the captured database: {exc}") from exc
        try:
            lock_timeout = str(self.lock_timeout_ms)  # relay/upstream/applier_lock_waits.py
            session = {**SESSION_SETTINGS, "client_encoding": "UTF8", "lock_timeout": lock_timeout}
            for name, value in session.items():
                conn.execute("select set_config(%s, %s, false)", (name, value))
            set_json_dumps(_orjson_text, conn)
            self.commit_timestamps = conn.execute(
                "select current_setting('track_commit_timestamp')"
            ).fetchone() == ("on",)
            documents = read_documents(self.rules_path, self.conflicts_path)
            mark, rules, tables, policies = self._read_catalog(
                conn, documents, rules_tables(documents.rules, str(self.rules_path))
            )
            self._lock_id = int(
                conn.execute(  # type: ignore[index]
                    "select hashtext(%s)", (lock_name(self.consumer, self.shard, self.shards),)
                ).fetchone()[0]
            )
        except BaseException:
            conn.close()
            raise
        self.conn, self.rules, self.tables, self.policies = conn, rules, tables, policies
        self._documents = documents
        self._mark, self._marked_at = mark, time.monotonic()
        self._scopes.clear()
        self._last_scope = None

    def _read_catalog(
        self, conn: psycopg.Connection[Any], documents: Documents, marked: Iterable[str]
    ) -> tuple[str, Rules, dict[str, TableMeta], ConflictPolicies]:
        """The catalog mark of the ``marked`` tables, the rules bound to the catalog's
        tables, their metadata and the conflict policies, all read in one snapshot (a
        read-only REPEATABLE READ transaction): the rules' view of a table and its metadata
        come from several queries, and a definition committed between two of them would
        leave the rules naming one key and the metadata another, with a mark that no
        longer changes.  ``conn`` is in autocommit mode, outside any transaction."""
        with conn.transaction():
            conn.execute("set transaction isolation level repeatable read, read only")
            mark = catalog_mark(conn, marked)
            rules, tables, policies = bind_catalog(
                conn, documents, self.rules_path, self.conflicts_path
            )
        self._check_times(rules, policies)
        return mark, rules, tables, policies

    def follow_catalog(self, entries: Iterable[JournalEntry]) -> bool:
        """Re-read the catalog when the captured tables' definitions changed since it was
        read (:func:`catalog_mark`); True when it was re-read.  The mark is compared when
        an entry names what the applier's view lacks (key columns other than a table's
        key, another number of key values, a column it does not have), and otherwise at
        most every :data:`CATALOG_CHECK_S`.  So a column added or a key changed while the
        applier runs is known before the entries that use it are judged, without a
        restart, and within a second for the others.  A catalog the rules or conflict
        policies no longer fit is logged and not taken (the applier keeps the one it
        has).  Outside a run's transaction."""
        unknown = any(names_unknown(self.tables.get(e.table), e) for e in entries)
        now = time.monotonic()
        if not unknown and now - self._marked_at < CATALOG_CHECK_S:
            return False
        conn = self.connection()
        assert self.rules is not None
        try:
            mark = catalog_mark(conn, self.rules.tables)
            self._marked_at = now
            if mark in (self._mark, self._failed_mark):  # nothing new, or known not to fit
                return False
            # the mark again, in the read's snapshot: what the definitions read belong to
            mark, rules, tables, policies = self._read_catalog(
                conn, self._documents, self.rules.tables
            )
        except psycopg.Error as exc:
            raise ApplierError(f"re-reading the captured tables failed: {exc}") from exc
        except ConfigError as exc:
            if mark != self._failed_mark:
                log.error(
                    "the captured tables changed, but the applier keeps their "
                    "earlier definitions: %s",
                    exc,
                )
                self._failed_mark = mark
            return False
        changed = changed_tables(self.rules, {t: rules.table_info(t) for t in rules.tables})
        if changed:
            log.warning(
                "the captured tables changed; the applier re-read them: %s",
                "; ".join(describe_change(t, b, n) for t, (b, n) in changed.items()),
            )
        else:  # types, indexes, grants: nothing an entry is named or judged by changed
            log.info("the captured tables' definitions were re-read (columns and keys unchanged)")
        self.rules, self.tables, self.policies, self._mark = rules, tables, policies, mark
        self._scopes.clear()
        self._last_scope = None
        return True

    def _check_times(self, rules: Rules, policies: ConflictPolicies) -> None:
        if self.commit_timestamps:
            return
        lacking = sorted(
            t
            for t in rules.tables
            if policies.table(t).timed and policies.table(t).time_column is None
        )
        if lacking:
            raise ConfigError(
                f"{policies.source}: table(s) {', '.join(lacking)} use lww/fww, which needs the time "
                "of the server's row version: turn on track_commit_timestamp in PostgreSQL, or set "
                "time_column for the table in the conflicts file"
            )

    def close(self) -> None:
        self._raw = None
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
            self.conn = None

    def raw_cursor(self) -> psycopg.Cursor[Any]:
        """A cursor of the connection that returns every column as the text PostgreSQL's
        output function prints (what pgoutput sends), whatever its type."""
        if self._raw is None or self._raw.closed:
            cur = self.connection().cursor()
            output_function_text(cur)
            self._raw = cur
        return self._raw

    def connection(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed:
            raise ApplierError("the applier's database connection is closed (connect() first)")
        return self.conn

    def migrate(self) -> int:
        """Create ``fieldsync_applier`` and apply pending migrations (safe concurrently)."""
        try:
            return run_migrations(self.connection(), SCHEMA, MIGRATIONS, MIGRATE_LOCK, ApplierError)
        except psycopg.Error as exc:
            raise ApplierError(f"migrating schema {SCHEMA} failed: {exc}") from exc

    def acquire_leadership(self) -> bool:
        """Try the session advisory lock of this consumer name (held until disconnect)."""
        row = (
            self.connection()
            .execute("select pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, self._lock_id))
            .fetchone()
        )
        return bool(row and row[0])

    def release_leadership(self) -> None:
        if self.conn is not None and not self.conn.closed:
            try:
                self.conn.execute("select pg_advisory_unlock(%s, %s)", (LOCK_CLASS, self._lock_id))
            except psycopg.Error:
                pass

    def load_offsets(self, topic: str) -> dict[int, int]:
        """Next offset per partition of ``topic`` recorded by this consumer."""
        return read_offsets(self.connection(), self.consumer, topic)

    def scope(self, claims: Mapping[str, Any]) -> WriteScope:
        assert self.rules is not None
        if self._last_scope is not None and claims == self._last_scope[0]:
            return self._last_scope[1]
        cache_key = json.dumps(claims, sort_keys=True, default=str)
        found = self._scopes.get(cache_key)
        if found is None:
            if len(self._scopes) > 10_000:
                self._scopes.clear()
            found = WriteScope.for_claims(
                self.rules, claims, {t: m.types for t, m in self.tables.items()}
            )
            self._scopes[cache_key] = found
        self._last_scope = (dict(claims), found)
        return found

    # ---- outbox

    def pending_outbox(self, limit: int = 5000) -> list[tuple[int, str, bytes]]:
        rows = (
            self.connection()
            .execute(
                f"select id, device_id, payload from {SCHEMA}.outbox order by id limit %s", (limit,)
            )
            .fetchall()
        )
        return [(int(i), str(d), bytes(p)) for i, d, p in rows]

    def delete_outbox(self, ids: Sequence[int]) -> None:
        if ids:
            self.connection().execute(
                f"delete from {SCHEMA}.outbox where id = any(%s)", (list(ids),)
            )

    # ---- conflicts

    def open_conflicts(
        self, device_id: str | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Kept conflicts not yet resolved (oldest first), with both versions."""
        rows = (
            self.connection()
            .execute(
                f"select id, device_id, seq, tbl, key, kind, held, created_at from {SCHEMA}.conflicts "
                "where status = 'open' and (%s::text is null or device_id = %s) order by created_at, id limit %s",
                (device_id, device_id, limit),
            )
            .fetchall()
        )
        names = ("id", "device_id", "seq", "table", "key", "kind", "held", "created_at")
        return [dict(zip(names, r, strict=True)) for r in rows]

    # ---- applying and resolving

    def apply(
        self, deliveries: Sequence[tuple[Delivery, bytes | None]], run_max: int = 500
    ) -> list[Outcome]:
        """Apply journal records (each partition's in offset order); returns their outcomes
        (duplicates produce none).  See :meth:`RunApplier.apply`."""
        return self.runs.apply(deliveries, run_max)

    def resolve(
        self,
        conflict_id: str,
        choice: str,
        values: Mapping[str, Any] | None = None,
        by: str = "",
        *,
        claims: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """Settle a kept conflict (``server``, ``device`` or ``values``); ``claims``: a
        device's resolution, judged by its write rules (None: an operator's, trusted).
        See :func:`relay.upstream.applier_resolve.resolve_conflict`."""
        return resolve_conflict(self, conflict_id, choice, values, by, claims=claims)


def _orjson_text(value: Any) -> str:
    return dump_json(value).decode("utf-8")
