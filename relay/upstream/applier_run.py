"""One run of the applier: the records it applies, and the rows, clocks and writes of its
transaction.

A *run* is a device's consecutive records of one poll (:class:`Item` each), applied in
ONE PostgreSQL transaction (:mod:`relay.upstream.applier_runs`).  :class:`RunState` holds
that transaction's view of the data:

- **rows**: read with one ``SELECT`` per table for the whole run (:meth:`RunState.prefetch`),
  without locks (or ``FOR UPDATE`` in key order when the run is retried after a
  concurrent change); an entry touching a row an earlier entry of the run wrote re-reads
  it first (:meth:`RunState.row`);
- **writes**: updates and deletes are queued and sent as one ``UPDATE … FROM unnest`` /
  ``DELETE … USING unnest`` per table and column set (:meth:`RunState.flush`), each row
  guarded by the ``xmin`` the merge saw: a row another transaction changed meanwhile is
  not written, the row count shows it and :class:`~relay.upstream.applier_failures.Concurrent`
  rolls the run back.  Inserts run at once in a savepoint with ``RETURNING``, and the
  stored row (defaults, triggers) is judged by the device's write rules before it is kept;
- **row clocks**: the server version's time for ``lww``/``fww`` (:meth:`RunState.server_time`:
  the HLC of the applier's own write of the row, else the commit time, else the table's
  ``time_column``, else unknown);
- **visible_after**: after the last write and before the commit, the WAL insert position
  goes into the outcome of every entry that wrote its row (:meth:`RunState.bound_written`;
  docs/journal.md, "Outcomes").

:class:`ApplyContext` is the seam to the applier's database side (catalog, policies,
connection): :class:`relay.upstream.applier_db.ApplierDb` implements it.

Not thread-safe: a run belongs to the one thread that applies it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb

from core.hlc import Hlc, HybridClock
from core.journal_format import JournalEntry, JournalRecord, Rejection
from core.journal_outcomes import Outcome
from core.row_wire import row_key_text
from relay.upstream.applier_failures import Concurrent, Undo
from relay.upstream.applier_store import (
    SCHEMA,
    Delivery,
    current_xid,
    wal_insert_lsn,
    write_applied,
    write_conflicts,
    write_row_clocks,
)
from relay.upstream.applier_tables import TableMeta
from relay.upstream.conflict_policies import ConflictPolicies, TablePolicy
from relay.upstream.merge import Action, MergeResult
from relay.upstream.write_rules import WriteScope, check_write

__all__ = ["ApplyContext", "ApplyStats", "Clock", "Item", "Row", "RunState"]


@dataclasses.dataclass
class ApplyStats:
    """Counters since start."""

    records: int = 0
    applied: int = 0
    merged: int = 0
    conflicts: int = 0
    rejected: int = 0
    duplicates: int = 0
    bad_records: int = 0
    dead_letters: int = 0
    runs: int = 0
    run_retries: int = 0
    failures: int = 0
    apply_s: float = 0.0
    published: int = 0


@dataclasses.dataclass
class Item:
    """A journal record of a run: where it came from, the record (None: unreadable, then
    ``error`` says why) and its raw bytes; once prepared, the validated entry (or the
    rejection) and the device's write scope."""

    where: Delivery
    record: JournalRecord | None
    raw: bytes = b""
    error: str = ""
    entry: JournalEntry | None = None
    rejection: Rejection | None = None
    scope: WriteScope | None = None
    show_key: tuple[Any, ...] | None = None  # normal key of a rejected entry (to show the row)


@dataclasses.dataclass
class Row:
    """A row as read in the transaction (None: absent), its ``xmin`` and commit time."""

    row: dict[str, Any] | None
    xmin: int | None = None
    commit_ms: int | None = None


@dataclasses.dataclass
class Clock:
    """The applier's latest write of a row: its HLC, transaction id, whether a delete."""

    hlc: Hlc
    xid: int
    deleted: bool


class ApplyContext(Protocol):
    """What applying entries needs of the applier's database side."""

    def follow_catalog(self, entries: Iterable[JournalEntry]) -> bool: ...

    @property
    def tables(self) -> Mapping[str, TableMeta]: ...

    @property
    def policies(self) -> ConflictPolicies: ...

    @property
    def commit_timestamps(self) -> bool: ...

    @property
    def max_skew_ms(self) -> int: ...

    @property
    def consumer(self) -> str: ...

    @property
    def stats(self) -> ApplyStats: ...

    @property
    def clock(self) -> HybridClock: ...

    def wall_ms(self) -> int:
        """The wall clock in ms (the outcomes' time, *now* for the merge)."""
        ...

    def connection(self) -> psycopg.Connection[Any]:
        """The open connection to the captured database."""
        ...

    def raw_cursor(self) -> psycopg.Cursor[Any]:
        """A cursor returning every column as its output function's text."""
        ...

    def scope(self, claims: Mapping[str, Any]) -> WriteScope:
        """The write scope of a device holding ``claims``."""
        ...


class RunState:
    """Rows, row clocks and queued writes of one transaction."""

    def __init__(
        self,
        db: ApplyContext,
        cur: psycopg.Cursor[Any],
        known: dict[int, tuple[str, str | None]] | None = None,
        *,
        lock_rows: bool = False,
    ) -> None:
        self.db = db
        self.cur = cur
        self.lock_rows = lock_rows
        self.raw = db.raw_cursor()
        self.outcome_of = known if known is not None else {}
        self.now_ms = db.wall_ms()
        self.rows: dict[tuple[str, tuple[Any, ...]], Row] = {}
        self.clocks: dict[tuple[str, str], Clock | None] = {}
        self.dirty: set[tuple[str, tuple[Any, ...]]] = set()
        self.queue: dict[Any, tuple[TableMeta, list[list[Any]]]] = {}
        self.clock_writes: dict[tuple[str, str], tuple[str, str, str, int, bool]] = {}
        self.conflicts: list[tuple[Any, ...]] = []
        self._xid: int | None = None
        self.wrote: set[int] = set()  # seqs whose entry wrote its row in this transaction

    def known_outcome(self, seq: int) -> tuple[str, str | None] | None:
        """Outcome of an earlier entry of the run's device (loaded for every prev_seq)."""
        return self.outcome_of.get(seq)

    # ---- reading

    def prefetch(self, items: Sequence[Item]) -> None:
        by_table: dict[str, dict[tuple[Any, ...], tuple[Any, ...]]] = {}
        for item in items:
            assert item.entry is not None
            meta = self.db.tables[item.entry.table]
            by_table.setdefault(meta.name, {})[meta.key_id(item.entry.key)] = tuple(item.entry.key)
        for name in sorted(by_table):
            meta = self.db.tables[name]
            keys = list(by_table[name].items())
            for start in range(0, len(keys), 1000):
                chunk = keys[start : start + 1000]
                self._select(meta, [k for _, k in chunk])
                for kid, _ in chunk:
                    self.rows.setdefault((name, kid), Row(None))
            if self.db.policies.table(name).timed:
                self._load_clocks(meta, [k for _, k in keys])

    def _select(self, meta: TableMeta, keys: Sequence[Sequence[Any]]) -> None:
        params = [list(c) for c in zip(*(meta.key_params(k) for k in keys), strict=True)]
        rows = self.raw.execute(
            meta.select_sql(self.db.commit_timestamps, self.lock_rows), params
        ).fetchall()
        for xmin, committed, *texts in rows:
            row = meta.read(texts)
            kid = meta.key_id([row[k] for k in meta.key])
            commit_ms = int(committed) if committed is not None else None
            self.rows[(meta.name, kid)] = Row(row, int(xmin), commit_ms)

    def _load_clocks(self, meta: TableMeta, keys: Sequence[Sequence[Any]]) -> None:
        texts = [row_key_text(list(k)) for k in keys]
        for t in texts:
            self.clocks.setdefault((meta.name, t), None)
        for row_key, hlc, xid, deleted in self.cur.execute(
            f"select c.row_key, c.hlc, c.xid, c.deleted from unnest(%s::text[]) as u(k) "
            f"join {SCHEMA}.row_clock as c on c.tbl = %s and c.row_key = u.k",
            (texts, meta.name),
        ).fetchall():
            self.clocks[(meta.name, row_key)] = Clock(Hlc.decode(hlc), int(xid), bool(deleted))

    def row(self, meta: TableMeta, key: Sequence[Any], reread: bool = False) -> Row:
        ident = (meta.name, meta.key_id(key))
        if reread or ident in self.dirty or ident not in self.rows:
            self.flush()
            self.rows[ident] = Row(None)
            self._select(meta, [key])
            self.dirty.discard(ident)
        return self.rows[ident]

    def server_time(
        self, meta: TableMeta, policy: TablePolicy, key: Sequence[Any], current: Row
    ) -> Hlc | int | None:
        if not policy.timed:
            return None
        row_key = row_key_text(list(key))
        if (meta.name, row_key) not in self.clocks:
            self._load_clocks(meta, [key])
        clock = self.clocks.get((meta.name, row_key))
        if current.row is None:
            return clock.hlc if clock is not None and clock.deleted else self.now_ms
        if clock is not None and not clock.deleted and clock.xid == current.xmin:
            return clock.hlc
        if current.commit_ms is not None:
            return current.commit_ms
        if policy.time_column is not None:
            value = current.row.get(policy.time_column)
            if isinstance(value, int) and not isinstance(value, bool):
                return value // 1000
        return None

    # ---- writing

    def bound_written(self, outcomes: Sequence[Outcome]) -> list[Outcome]:
        """After the transaction's last row write (queued writes flushed) and before its
        commit: the outcomes of entries that wrote their row get ``visible_after``, the
        WAL insert position now.  The commit record, and so the ``commit_lsn`` of every
        change event of these writes, comes after it; the rows stay locked until the
        commit, so any later version of them commits after it too; every version
        committed before the writes has a lower ``commit_lsn`` (docs/journal.md)."""
        if not self.wrote:
            return list(outcomes)
        lsn = wal_insert_lsn(self.cur)
        return [o.with_visible_after(lsn) if o.seq in self.wrote else o for o in outcomes]

    def xid(self) -> int:
        """The transaction's id (the ``xmin`` of the rows it writes), read once."""
        if self._xid is None:
            self._xid = current_xid(self.cur)
        return self._xid

    def insert(
        self, meta: TableMeta, values: Mapping[str, Any], scope: WriteScope, entry: JournalEntry
    ) -> tuple[dict[str, Any], int] | None:
        """Insert in a savepoint, check the stored row; None if the key exists by now.
        Raises :class:`Undo` (rolled back) when the device may not have that row."""
        self.flush()
        columns = list(values)
        params = [meta.pg_text(c, values[c]) for c in columns]
        written = [c for c in columns if c not in meta.key or c in (entry.new or {})]
        conn = self.cur.connection
        try:
            with conn.transaction():
                got = self.raw.execute(meta.insert_sql(columns), params).fetchone()
                assert got is not None
                row = meta.read(got[1:])
                xmin = got[0]
                if xmin is None:  # a partitioned table's insert returns none
                    found = self.raw.execute(
                        meta.xmin_sql(), meta.key_params([row[k] for k in meta.key])
                    ).fetchone()
                    assert found is not None
                    xmin = found[0]
                problem = check_write(scope, meta.name, None, row, written)
                if problem is not None:
                    raise Undo(Rejection(problem.reason, f"entry {entry.seq}: {problem.message}"))
        except psycopg.errors.UniqueViolation:
            return None
        ident = (meta.name, meta.key_id([row[k] for k in meta.key]))
        self.rows[ident] = Row(row, int(xmin), None)
        return row, int(xmin)

    def write(
        self, meta: TableMeta, entry: JournalEntry, result: MergeResult, policy: TablePolicy
    ) -> None:
        ident = (meta.name, meta.key_id(entry.key))
        xmin = [str(self.rows[ident].xmin)]  # the version the merge saw
        if result.action is Action.UPDATE:
            columns = tuple(sorted(result.values))
            params = [meta.pg_text(c, result.values[c]) for c in columns]
            self._enqueue(
                ("u", meta.name, columns), meta, params + meta.key_params(entry.key) + xmin
            )
            self.dirty.add(ident)
        elif result.action is Action.DELETE:
            self._enqueue(("d", meta.name), meta, meta.key_params(entry.key) + xmin)
            self.dirty.add(ident)
        else:
            return
        if policy.timed:
            self.clock_written(
                meta, entry.key, entry.hlc, self.xid(), deleted=result.action is Action.DELETE
            )

    def clock_written(
        self, meta: TableMeta, key: Sequence[Any], hlc: Hlc, xid: int, *, deleted: bool
    ) -> None:
        """Remember the time of the row version just written (``xid``: its xmin)."""
        row_key = row_key_text(list(key))
        self.clocks[(meta.name, row_key)] = Clock(hlc, xid, deleted)
        self.clock_writes[(meta.name, row_key)] = (meta.name, row_key, hlc.encode(), xid, deleted)

    def _enqueue(self, key: Any, meta: TableMeta, params: list[Any]) -> None:
        found = self.queue.get(key)
        if found is None:
            self.queue[key] = (meta, [params])
        else:
            found[1].append(params)

    def flush(self) -> None:
        """Send the queued writes: one statement per table and shape (a row is queued at
        most once between flushes: touching it again flushes and re-reads it first)."""
        queued, self.queue = self.queue, {}
        for key, (meta, rows) in queued.items():
            columns = [list(c) for c in zip(*rows, strict=True)]
            if key[0] == "u":
                self.cur.execute(meta.update_many_sql(key[2]), columns)
            else:
                self.cur.execute(meta.delete_many_sql(), columns)
            if self.cur.rowcount != len(rows):
                raise Concurrent(
                    f"{meta.name}: {len(rows) - self.cur.rowcount} row(s) changed by another "
                    "transaction after they were read"
                )

    def conflict(
        self,
        conflict_id: str,
        record: JournalRecord,
        meta: TableMeta,
        entry: JournalEntry,
        result: MergeResult,
    ) -> None:
        if result.held:
            kind, held = "columns", dict(result.held)
        else:
            kind, held = "row", dict(result.held_row or {})
        self.conflicts.append(
            (
                conflict_id,
                record.device_id,
                record.seq,
                meta.name,
                row_key_text(list(entry.key)),
                Jsonb(list(entry.key)),
                kind,
                Jsonb(held),
                Jsonb(dict(record.claims)),
            )
        )

    def write_bookkeeping(self, outcomes: Sequence[Outcome], items: Sequence[Item]) -> None:
        """The run's ``applied`` records and outbox row, its kept conflicts and row clocks."""
        records = {i.record.seq: i.record for i in items if i.record is not None}
        write_applied(self.cur, outcomes, records)
        write_conflicts(self.cur, self.conflicts)
        write_row_clocks(self.cur, list(self.clock_writes.values()))
