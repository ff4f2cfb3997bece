"""Applying a poll of journal records: runs, transactions, retries, dead letters.

The records of one poll are grouped into *runs* (:func:`group_runs`): each device's in
offset order (edits of different devices are independent), at most ``run_max`` per run;
an unreadable record is a run of its own.  Each run is ONE PostgreSQL transaction
(:meth:`RunApplier._run_txn`):

    offsets (watermark) ── origin message ``device:<id>`` ── idempotency check
    (``applied``) ── validate ── read rows ── merge ── write rows ── ``applied``
    records, kept conflicts, row clocks, outbox ── commit

- **Exactly once.**  An entry's data write, its ``applied`` record and the consumer
  offsets commit together.  Each transaction stores, per partition, the lowest offset of
  the poll not applied yet (:class:`Watermarks`), so after a crash the rest is read
  again and what was applied is found in ``applied`` and skipped (a duplicate).
- **No entry stops a partition.**  A failure caused by an entry
  (:func:`~relay.upstream.applier_failures.classify_failure`) splits the run in halves
  until the entry is alone; that entry is rejected (``db_error`` / ``internal_error``),
  kept in ``dead_letters``, counted and logged, and the others apply.  If even its
  rejection cannot be recorded in full, a minimal one is (device, seq, reason only).
  Deadlocks, serialization failures and rows changed meanwhile retry the run (then with
  row locks); any other failure raises :class:`~relay.errors.ApplierError` and the
  applier reads the same records again after a back-off, rejecting nothing.
- **No lock stops the others.**  A run that waits for a lock another session holds past
  ``journal.lock_timeout_ms`` sets its device aside (:mod:`relay.upstream.applier_lock_waits`):
  that device's entries wait, in order, and are tried again; the other devices go on.
- **Counted** once committed: outcomes, dead letters and unreadable records in
  ``fieldsync_applier_entries_total{outcome}`` (relay/upstream/applier_metrics.py), as
  in :class:`~relay.upstream.applier_run.ApplyStats`.

Runs in the applier's one thread, on the connection of its
:class:`~relay.upstream.applier_run.ApplyContext`.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from core.errors import JournalFormatError
from core.journal_format import JournalRecord, Reason
from core.journal_outcomes import Outcome, OutcomeKind
from core.log_context import log_context
from relay.errors import ApplierError
from relay.upstream.applier_entries import apply_entry, prepare
from relay.upstream.applier_failures import (
    RETRY_ERRORS,
    Concurrent,
    Failed,
    Failure,
    classify_failure,
    pg_message,
)
from relay.upstream.applier_lock_waits import (
    RETRY_LOCK_TIMEOUT_MS,
    LockWait,
    LockWaits,
    is_lock_wait,
    lock_holders,
)
from relay.upstream.applier_metrics import ENTRIES, OUTCOMES
from relay.upstream.applier_run import ApplyContext, ApplyStats, Item, RunState
from relay.upstream.applier_store import (
    SCHEMA,
    Delivery,
    clean,
    emit_origin,
    save_offsets,
    write_bad_record,
    write_dead_letter,
    write_minimal_rejection,
)

__all__ = ["RunApplier", "Watermarks", "group_runs"]

log = logging.getLogger("relay.upstream.applier")


class RunApplier:
    """Applies polls of journal records through ``db`` (see the module docstring)."""

    def __init__(self, db: ApplyContext) -> None:
        self.db = db
        self.waits = LockWaits()

    @property
    def stats(self) -> ApplyStats:
        return self.db.stats

    def apply(
        self, deliveries: Sequence[tuple[Delivery, bytes | None]], run_max: int = 500
    ) -> list[Outcome]:
        """Apply journal records (each partition's in offset order); returns their outcomes
        (duplicates produce none).

        The records are grouped by device (each device's in order; devices are
        independent), at most ``run_max`` per transaction.  Each transaction stores, per
        partition, the lowest offset of this batch not applied yet (a watermark): after a
        crash the records from there on are read again, and those already applied are
        found in ``applied`` and skipped."""
        items: list[Item] = []
        for where, value in deliveries:
            self.stats.records += 1
            try:
                items.append(Item(where, JournalRecord.from_bytes(value or b""), value or b""))
            except JournalFormatError as exc:
                items.append(Item(where, None, value or b"", str(exc)))
        items, retried = self.waits.split(items)
        # a column added or a key changed while the applier runs: known before it judges
        self.db.follow_catalog(
            i.record.entry for i in items if i.record is not None and i.record.entry is not None
        )
        marks = Watermarks([*items, *self.waits.items()])
        outcomes: list[Outcome] = []
        blocked: set[str] = set()
        t0 = time.perf_counter()
        for run in group_runs(items, run_max):
            device = run[0].record.device_id if run[0].record is not None else None
            if device is not None and device in blocked:
                self.waits.set_aside(device, run, None)
                continue
            try:
                # while some device waits for a lock, no run waits long for one
                quick = bool(retried or blocked or self.waits.devices())
                outcomes.extend(self._apply_run(run, marks, quick=quick))
            except LockWait as wait:
                outcomes.extend(wait.outcomes)
                blocked.add(wait.device)
                self._set_aside(wait, [i for i in run if marks.pending_item(i)])
        for device, waited in self.waits.settled(retried):
            log.info(
                "applier: the entries of device %r waiting for a lock applied after %.1fs",
                device,
                waited,
                extra={"device": device},
            )
        self.stats.apply_s += time.perf_counter() - t0
        return outcomes

    def waiting_due(self) -> bool:
        """Whether entries set aside for a lock are due to be tried again."""
        return self.waits.due()

    def _set_aside(self, wait: LockWait, left: list[Item]) -> None:
        first = not self.waits.waiting_since(wait.device)
        self.waits.set_aside(wait.device, left, wait)
        if not first or not left:
            return
        tables = sorted({i.entry.table for i in left if i.entry is not None})
        holders = lock_holders(self.db.connection(), tables)
        log.warning(
            "applier: %s waits for a lock another session holds (%s%s); the device's entries "
            "wait and are tried again every %.1fs, other devices go on. Sessions holding "
            "locks on %s: %s",
            _where(left[0]),
            pg_message(wait.cause),
            f"; {wait.cause.diag.context.strip()}" if wait.cause.diag.context else "",
            self.waits.retry_s,
            ", ".join(tables) or "its tables",
            holders or "none seen",
            extra=_context_of(left[0]),
        )

    def _apply_run(self, run: list[Item], marks: Watermarks, quick: bool = False) -> list[Outcome]:
        """Apply one run in one transaction.  A failure that a retry cures (deadlock,
        serialization failure, a row changed meanwhile) retries the run; a failure caused
        by an entry (:func:`classify_failure`) splits the run in halves until the entry is
        alone, so the others still apply together, and the entry is rejected and kept as a
        dead letter (:meth:`_apply_alone`).  Any other failure raises ApplierError: the
        applier backs off and reads the same records again.  A lock not taken in time
        raises :class:`LockWait` (``quick``: a retry of entries set aside for a lock, with
        a short lock timeout)."""
        attempt = 0
        while True:
            try:
                self.stats.runs += 1
                # optimistic first (no row locks; writes check xmin), locking after a retry
                outcomes = self._run_txn(run, marks, lock=attempt > 0, quick=quick)
                marks.done(run)
                if run[0].record is None:  # unreadable, kept in bad_records
                    ENTRIES.labels("dead_letter").inc(len(run))
                return outcomes
            except Exception as exc:
                if is_lock_wait(exc):
                    raise _lock_wait(run[0], exc) from exc
                if classify_failure(exc) is Failure.ENTRY:
                    self.stats.run_retries += 1
                    if len(run) > 1:
                        half = len(run) // 2
                        first = self._apply_run(run[:half], marks, quick)
                        try:
                            return first + self._apply_run(run[half:], marks, quick)
                        except LockWait as wait:
                            wait.outcomes[:0] = first
                            raise
                    return self._apply_alone(run[0], exc, marks, quick)
                if not isinstance(exc, (*RETRY_ERRORS, Concurrent)):
                    if isinstance(exc, psycopg.Error):
                        raise ApplierError(f"applying journal entries failed: {exc}") from exc
                    raise
                attempt += 1
                self.stats.run_retries += 1
                if attempt > 5:
                    raise ApplierError(f"a run kept failing ({exc}); giving up for now") from exc
                time.sleep(0.05 * attempt)

    def _apply_alone(
        self, item: Item, exc: Exception, marks: Watermarks, quick: bool = False
    ) -> list[Outcome]:
        """Reject an entry that failed on its own, keeping it as a dead letter: first with
        the usual bookkeeping (the outcome shows the server's row), and if even that fails
        for the entry's sake, with a minimal record of it."""
        failed = Failed.of(exc)
        if failed.reason is Reason.INTERNAL_ERROR:
            log.error(
                "applier: unexpected failure on %s",
                _where(item),
                exc_info=exc,
                extra=_context_of(item),
            )
        try:
            outcomes = self._run_txn([item], marks, failed=failed, quick=quick)
        except Exception as again:
            if is_lock_wait(again):
                raise _lock_wait(item, again) from again
            if classify_failure(again) is not Failure.ENTRY:
                if isinstance(again, psycopg.Error):
                    raise ApplierError(f"applying journal entries failed: {again}") from again
                raise
            outcomes = self._dead_letter_txn(item, failed, marks)
        marks.done([item])
        if outcomes:  # else it had been applied before (a duplicate): nothing was kept
            self.stats.dead_letters += 1
            ENTRIES.labels("dead_letter").inc()
            log.error(
                "applier: %s rejected (%s), kept as a dead letter, not retried: %s",
                _where(item),
                failed.reason.value,
                failed.message,
                extra=_context_of(item),
            )
        return outcomes

    def _dead_letter_txn(self, item: Item, failed: Failed, marks: Watermarks) -> list[Outcome]:
        """The last resort for an entry whose rejection cannot be recorded in full: the
        ``applied`` record, the outcome and the dead letter carry only the device, the seq
        and the reason (nothing of the entry's content), so they cannot fail for its sake."""
        record = item.record
        if record is None:  # an unreadable record whose keeping aside failed
            raise ApplierError(f"{_where(item)} could not be kept aside in bad_records")
        outcome = Outcome(
            device_id=record.device_id,
            seq=record.seq,
            kind=OutcomeKind.REJECTED,
            reason=failed.reason.value,
            message=clean(f"entry {record.seq}: {failed.message}"),
            at_us=self.db.wall_ms() * 1000,
        )
        conn = self.db.connection()
        try:
            with conn.transaction(), conn.cursor() as cur:
                save_offsets(cur, self.db.consumer, marks.after([item]))
                if not write_minimal_rejection(cur, record, outcome):
                    return []  # applied meanwhile (an overlapping shard): nothing to do
                self._write_dead_letter(cur, item, failed)
        except psycopg.Error as exc:
            raise ApplierError(
                f"even the minimal rejection of {_where(item)} failed: {exc}"
            ) from exc
        self._count([outcome])
        return [outcome]

    def _write_dead_letter(self, cur: psycopg.Cursor[Any], item: Item, failed: Failed) -> None:
        assert item.record is not None
        write_dead_letter(cur, item.where, item.record, item.raw, failed)

    def _run_txn(
        self,
        run: list[Item],
        marks: Watermarks,
        *,
        lock: bool = False,
        failed: Failed | None = None,
        quick: bool = False,
    ) -> list[Outcome]:
        conn = self.db.connection()
        outcomes: list[Outcome] = []
        with conn.transaction(), conn.cursor() as cur:
            if quick:
                cur.execute(f"set local lock_timeout = {RETRY_LOCK_TIMEOUT_MS}")
            save_offsets(cur, self.db.consumer, marks.after(run))
            first = run[0]
            if first.record is None:
                self._record_bad(cur, run)
                return []
            device = first.record.device_id
            emit_origin(cur, f"device:{device}")
            todo, known, duplicates = self._fresh(cur, device, run)
            for item in todo:
                prepare(self.db, item, failed)
            state = RunState(self.db, cur, known, lock_rows=lock)
            state.prefetch([i for i in todo if i.entry is not None])
            with log_context(device=device):  # and the table of each group of entries
                for table, group in itertools.groupby(todo, key=_table_of):
                    with log_context(table=table):
                        for item in group:
                            outcome = apply_entry(self.db, state, item)
                            assert item.record is not None
                            known[item.record.seq] = (outcome.kind.value, outcome.reason)
                            outcomes.append(outcome)
            state.flush()
            outcomes = state.bound_written(outcomes)
            state.write_bookkeeping(outcomes, todo)
            if failed is not None:
                for item in todo:
                    self._write_dead_letter(cur, item, failed)
        self.stats.duplicates += duplicates
        self._count(outcomes)
        return outcomes

    def _count(self, outcomes: Sequence[Outcome]) -> None:
        """Count committed outcomes (stats and ``fieldsync_applier_entries_total``)."""
        for kind, n in collections.Counter(o.kind for o in outcomes).items():
            if kind is OutcomeKind.APPLIED:
                self.stats.applied += n
            elif kind is OutcomeKind.MERGED:
                self.stats.merged += n
            elif kind is OutcomeKind.CONFLICT:
                self.stats.conflicts += n
            else:
                self.stats.rejected += n
            ENTRIES.labels(kind.value if kind.value in OUTCOMES else "rejected").inc(n)

    def _fresh(
        self, cur: psycopg.Cursor[Any], device: str, run: list[Item]
    ) -> tuple[list[Item], dict[int, tuple[str, str | None]], int]:
        """The items not applied before (idempotency), the known outcomes of the run's
        seqs and of the entries they depend on (prev_seq), and how many items are
        duplicates (counted once the transaction commits)."""
        seqs: set[int] = set()
        for item in run:
            assert item.record is not None
            seqs.add(item.record.seq)
            if item.record.entry is not None and item.record.entry.prev_seq is not None:
                seqs.add(item.record.entry.prev_seq)
        rows = cur.execute(
            # a join, not "seq = any(...)": that filters every applied row of the device
            f"select a.seq, a.outcome, a.reason from unnest(%s::bigint[]) as u(seq) "
            f"join {SCHEMA}.applied as a on a.device_id = %s and a.seq = u.seq",
            (sorted(seqs), device),
        ).fetchall()
        known: dict[int, tuple[str, str | None]] = {int(s): (o, r) for s, o, r in rows}
        todo: list[Item] = []
        taken: set[int] = set()
        for item in run:
            assert item.record is not None
            seq = item.record.seq
            if seq in known or seq in taken:
                continue
            taken.add(seq)
            todo.append(item)
        return todo, known, len(run) - len(todo)

    def _record_bad(self, cur: psycopg.Cursor[Any], run: list[Item]) -> None:
        for item in run:
            log.error(
                "journal record %s/%d@%d cannot be read: %s",
                item.where.topic,
                item.where.partition,
                item.where.offset,
                item.error,
            )
            self.stats.bad_records += 1
            write_bad_record(cur, item.where, item.error, item.raw)


def _context_of(item: Item) -> dict[str, str]:
    """The log context of an entry: its device and table (those it has)."""
    record = item.record
    if record is None:
        return {}
    if record.entry is None:
        return {"device": record.device_id}
    return {"device": record.device_id, "table": record.entry.table}


def _lock_wait(item: Item, exc: BaseException) -> LockWait:
    assert isinstance(exc, psycopg.Error)
    return LockWait(item.record.device_id if item.record is not None else "", exc)


def _table_of(item: Item) -> str | None:
    """The table of an item's entry, for the log context (None: no entry)."""
    record = item.record
    return record.entry.table if record is not None and record.entry is not None else None


def _where(item: Item) -> str:
    """``entry 17 of device 'tab-1' (fs._journal/2@451)`` for logs."""
    at = f"{item.where.topic}/{item.where.partition}@{item.where.offset}"
    if item.record is None:
        return f"record {at}"
    return f"entry {item.record.seq} of device {item.record.device_id!r} ({at})"


def group_runs(items: Sequence[Item], limit: int) -> list[list[Item]]:
    """The items grouped by device, each device's in their order, groups in the order of
    their first item, at most ``limit`` per group; unreadable records alone."""
    groups: dict[str, list[list[Item]]] = {}
    order: list[list[Item]] = []
    for item in items:
        if item.record is None:
            order.append([item])
            continue
        runs = groups.setdefault(item.record.device_id, [])
        if not runs or len(runs[-1]) >= limit:
            runs.append([])
            order.append(runs[-1])
        runs[-1].append(item)
    return order


class Watermarks:
    """Per partition, the offsets of a batch not applied yet."""

    def __init__(self, items: Sequence[Item]) -> None:
        self.pending: dict[tuple[str, int], set[int]] = {}
        self.end: dict[tuple[str, int], int] = {}
        for item in items:
            tp = (item.where.topic, item.where.partition)
            self.pending.setdefault(tp, set()).add(item.where.offset)
            self.end[tp] = max(self.end.get(tp, 0), item.where.offset + 1)

    def after(self, run: Sequence[Item]) -> dict[tuple[str, int], int]:
        """The next offset to store per partition of ``run`` once ``run`` is applied."""
        out: dict[tuple[str, int], int] = {}
        for tp in {(i.where.topic, i.where.partition) for i in run}:
            left = self.pending[tp] - {
                i.where.offset for i in run if (i.where.topic, i.where.partition) == tp
            }
            out[tp] = min(left) if left else self.end[tp]
        return out

    def pending_item(self, item: Item) -> bool:
        """Whether ``item`` is not applied yet."""
        return item.where.offset in self.pending[(item.where.topic, item.where.partition)]

    def done(self, run: Sequence[Item]) -> None:
        for item in run:
            self.pending[(item.where.topic, item.where.partition)].discard(item.where.offset)
