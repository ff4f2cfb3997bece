"""Applying downloaded changes messages to the device database, atomically per checkpoint,
and settling journal entries (outcomes, rejections at upload).

Every table row the agent writes is :func:`device_agent.visible.visible_row` of the row's
*received version* and its edits on top: *open* ones (journal ``pending``/``sent``) and
*awaiting* ones (settled by an outcome that wrote the row upstream, ``await_lsn`` = its
``visible_after``, until a version at or above that position arrives): the app's tables
never show anything else (docs/device-agent.md, "What the app sees").

Input: the changes messages (relay/api.py, docs/relay.md "Device API") read since the last
applied cursor, up to and including one whose ``checkpoint.complete`` is true, and the
outcomes read before them.  Output: one SQLite transaction that

1. keeps the received version of every row with edits on top whose holds came by the
   fast path (:meth:`device_agent.derive.RowDeriver.capture_received`: from the
   earliest such edit's ``old``);
2. empties the buckets marked for re-download (a checksum mismatch found earlier, a
   ``resync`` or ``dropped`` bucket of a message): their holds leave ``_fieldsync_rows``
   and their rows are derived again;
3. applies every op in order: ``PUT`` records the bucket's hold on the row (checksum term,
   position and, on the general path, the version) and writes the row; ``REMOVE`` drops
   the hold and the row is derived again (gone when no bucket holds it and no edit keeps
   it); the highest ``commit_lsn`` of the ops of a row with edits on top is recorded on
   those entries (``seen_lsn``);
4. records the outcomes (final statuses, kept conflicts; ``await_lsn`` from the outcome's
   ``visible_after``) and derives their rows again from the received version with the
   edits still on top, whether the server version arrived before, with or after them;
   an awaiting entry stops being kept (``await_lsn`` NULL) once a version of its row at
   or above its bound was received, or when buckets were downloaded again and no bucket
   holds the row (:func:`device_agent.visible.released`);
5. checks each complete bucket's row count and checksum (the sum mod 2**64 of
   :func:`core.row_wire.row_checksum` over the rows it holds, computed from the
   bytes received) against the checkpoint; a bucket that differs is marked
   ``reset_pending`` and its cursor is set back to 0, so it is downloaded again and
   replaced atomically with the next checkpoint;
6. stores the new cursor (and the outcomes' cursor).

The agent's own writes are not journaled (:mod:`device_agent.triggers`: the flag row, or
for large batches the triggers are dropped and recreated inside the transaction).

Rows of tables served by one rule take a fast path while they have no edit on top:
batched ``executemany`` of the op's data (the identity case of ``visible_row``; the table
row is then the received version and no copy is kept).  Rows of tables several rules serve
(different column projections) and rows with edits on top take the general path
(:meth:`device_agent.derive.RowDeriver.refresh_row`): bucket versions kept and merged
(latest op last), edits on top.

The parts, by role: device_agent/bucket_ops.py (the ops: holds, bucket counts and
checksums, the fast path), device_agent/derive.py (held and dirty rows derived again
through :func:`device_agent.visible.visible_row`), device_agent/outcomes.py (settling
entries); this module runs them in one transaction (:class:`_Batch`) and stores the
cursors.

Everything happens on the caller's connection in the caller's thread; no network.
"""

from __future__ import annotations

import gc
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from device_agent import triggers
from device_agent.bucket_ops import (
    BucketLedger,
    Message,
    OpWriter,
)
from device_agent.derive import CHUNK, ApplyResult, RowDeriver
from device_agent.local_db import get_meta, set_meta
from device_agent.local_tables import PREFIX, LocalTable, load_tables, save_kinds, transaction
from device_agent.outcomes import record_outcomes, record_rejections

BULK_OPS: Final = 2000
"""From this many ops in one apply, triggers are dropped and recreated instead of flagged."""


class _Batch:
    """One apply transaction: the rows to derive again (device_agent/derive.py), the
    buckets' sums and the writer of the ops (device_agent/bucket_ops.py)."""

    def __init__(
        self, conn: sqlite3.Connection, tables: dict[str, LocalTable], bulk: bool = False
    ) -> None:
        self.conn = conn
        self.tables = tables
        self.by_id = {t.id: t for t in tables.values()}
        self.result = ApplyResult()
        self.rows = RowDeriver(conn, self.by_id, self.result)
        self.ledger = BucketLedger(conn, self.result, bulk)
        self.ops = OpWriter(conn, tables, self.ledger, self.rows, self.result)
        conn.execute(f"delete from {PREFIX}replaced")  # only ever needed inside one statement
        if self.rows.held:
            self.rows.capture_received()

    def reset_bucket(self, name: str) -> None:
        """Empty a bucket: its holds go; rows no other bucket holds leave their tables."""
        self.rows.dirty.update(self.ledger.reset(name))
        self.rows.buckets_reset = True

    def apply_message(self, msg: Message) -> None:
        for name in list(msg.get("resync") or ()) + list(msg.get("dropped") or ()):
            self.flush_dirty()
            self.reset_bucket(name)
        self.ops.apply(msg)

    def flush_dirty(self) -> None:
        """Write every dirty row as derived from its received version and edits on top."""
        self.rows.flush_dirty()


def apply_messages(
    conn: sqlite3.Connection,
    messages: Iterable[Message],
    cursor: str | None,
    reset_cursor: Callable[[str | None, Sequence[str]], str | None] | None = None,
    bulk_ops: int = BULK_OPS,
    total_ops: int | None = None,
    finish: Callable[[sqlite3.Connection], None] | None = None,
    outcomes: Sequence[Mapping[str, Any]] = (),
) -> ApplyResult:
    """Apply ``messages`` (ending with a complete checkpoint) in one transaction and store
    ``cursor``; buckets whose checksum differs get their cursor set back to 0 with
    ``reset_cursor(cursor, buckets)`` and are re-downloaded.  ``total_ops`` (when known)
    decides between flagging and suspending the triggers (:data:`BULK_OPS`).
    ``outcomes`` (fetched before the download) are recorded in the same transaction, so
    an edit's outcome and the server version including it show together."""
    started = time.perf_counter()
    collecting = gc.isenabled()
    gc.disable()  # the ops are short-lived and acyclic: no cyclic GC passes over them
    try:
        return _apply_messages(
            conn, messages, cursor, reset_cursor, bulk_ops, total_ops, finish, outcomes, started
        )
    finally:
        if collecting:
            gc.enable()


def _apply_messages(
    conn: sqlite3.Connection,
    messages: Iterable[Message],
    cursor: str | None,
    reset_cursor: Callable[[str | None, Sequence[str]], str | None] | None,
    bulk_ops: int,
    total_ops: int | None,
    finish: Callable[[sqlite3.Connection], None] | None,
    outcomes: Sequence[Mapping[str, Any]],
    started: float,
) -> ApplyResult:
    with transaction(conn):
        tables = load_tables(conn)
        bulk = total_ops is not None and total_ops >= bulk_ops
        batch = _Batch(conn, tables, bulk)
        if get_meta(conn, "cursor") is None:  # a first download (after init or reset)
            batch.rows.buckets_reset = True
        pending = [
            r[0] for r in conn.execute(f"select name from {PREFIX}buckets where reset_pending = 1")
        ]
        guard = triggers.suspended(conn, tables.values()) if bulk else triggers.applying(conn)
        last: Message | None = None
        dropped: set[str] = set()
        with guard:
            for name in pending:
                batch.reset_bucket(name)
            for msg in messages:
                batch.apply_message(msg)
                dropped.update(msg.get("dropped") or ())
                last = msg
            batch.ops.check_keys()
            record_outcomes(batch.rows, outcomes)
            batch.flush_dirty()
        batch.ledger.recount()
        batch.ledger.save()
        if last is not None and (last.get("checkpoint") or {}).get("complete"):
            batch.ledger.verify(last["checkpoint"])
        for tid in batch.ops.kinds_changed:
            save_kinds(conn, batch.by_id[tid])
        for name in dropped:
            conn.execute(f"delete from {PREFIX}buckets where name = ?", (name,))
        if batch.result.mismatched:
            if reset_cursor is None:
                cursor = None
            else:
                cursor = reset_cursor(cursor, batch.result.mismatched)
            if cursor is None:  # cannot reset one bucket: re-download all of them
                conn.execute(f"update {PREFIX}buckets set reset_pending = 1")
        set_meta(conn, "cursor", cursor)
        set_meta(conn, "last_applied_at", str(time.time()))
        if finish is not None:
            finish(conn)
    batch.result.seconds = time.perf_counter() - started
    return batch.result


def settle(
    conn: sqlite3.Connection,
    outcomes: Sequence[Mapping[str, Any]] = (),
    rejected: Mapping[int, tuple[str | None, str | None]] | None = None,
) -> int:
    """Record outcomes and upload rejections in one transaction; the rows of the entries
    that settled are re-derived (received version, open edits on top).  Returns how many
    entries changed."""
    with transaction(conn):
        batch = _Batch(conn, load_tables(conn))
        changed = record_outcomes(batch.rows, outcomes)
        record_rejections(batch.rows, rejected or {})
        with triggers.applying(conn):
            batch.flush_dirty()
    return changed + len(rejected or {})


def refresh_rows(conn: sqlite3.Connection, seqs: Iterable[int]) -> int:
    """Re-derive the rows of journal entries ``seqs`` (e.g. a conflict resolved locally).
    Returns how many rows were rewritten."""
    with transaction(conn):
        batch = _Batch(conn, load_tables(conn))
        wanted = sorted(set(seqs))
        for i in range(0, len(wanted), CHUNK):
            chunk = wanted[i : i + CHUNK]
            for tid, k in conn.execute(
                f"""select tbl, k from {PREFIX}journal
                    where seq in ({",".join("?" * len(chunk))})""",
                chunk,
            ):
                if tid in batch.by_id:
                    batch.rows.dirty.add((tid, k))
        n = len(batch.rows.dirty)
        with triggers.applying(conn):
            batch.flush_dirty()
    return n


def refresh_open_rows(conn: sqlite3.Connection, tables: Iterable[str]) -> int:
    """Re-derive the rows with open edits of ``tables`` (their counter columns changed)."""
    with transaction(conn):
        batch = _Batch(conn, load_tables(conn))
        chosen = {batch.tables[name].id for name in tables if name in batch.tables}
        batch.rows.dirty = {(tid, k) for tid, k in batch.rows.held if tid in chosen}
        n = len(batch.rows.dirty)
        with triggers.applying(conn):
            batch.flush_dirty()
    return n
