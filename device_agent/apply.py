"""Applying downloaded changes messages to the device database, atomically per checkpoint,
and settling journal entries (outcomes, rejections at upload).

Every table row the agent writes is :func:`device_agent.visible.visible_row` of the row's
*received version* and its edits on top: *open* ones (journal ``pending``/``sent``) and
*awaiting* ones (settled by an outcome that wrote the row upstream, ``await_lsn`` = its
``visible_after``, until a version at or above that position arrives): the app's tables
never show anything else (docs/device-agent.md, "What the app sees").

Input: the changes messages (relay/downstream/api.py, docs/relay.md "Device API") read since the last
applied cursor, up to and including one whose ``checkpoint.complete`` is true, and the
outcomes read before them.  Output: one SQLite transaction that

1. keeps the received version of every row with edits on top whose holds came by the
   fast path (:meth:`_Batch.capture_received`: from the earliest such edit's ``old``);
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
   :func:`relay.downstream.bucket_store.row_checksum` over the rows it holds, computed from the
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
(:meth:`_Batch.refresh_row`): bucket versions kept and merged (latest op last), edits on
top.

Everything happens on the caller's connection in the caller's thread; no network.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import hashlib
import sqlite3
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any, Final

import orjson

from core.row_wire import CHECKSUM_MODULUS, row_key_text
from device_agent import triggers
from device_agent.errors import StateError
from device_agent.local_db import (
    PREFIX,
    LocalTable,
    bucket_ids,
    from_sql,
    get_meta,
    key_k,
    kind_of,
    load_tables,
    q,
    save_kinds,
    set_meta,
    to_sql,
    transaction,
)
from device_agent.visible import UNKNOWN_POSITION, Edit, released, visible_row

BULK_OPS: Final = 2000
"""From this many ops in one apply, triggers are dropped and recreated instead of flagged."""

_SIGNED: Final = 1 << 63
_WRAP: Final = 1 << 64
_U64 = struct.Struct(">Q").unpack_from
_SORT = orjson.OPT_SORT_KEYS
_CHUNK: Final = 400
MAX_LSN: Final = (1 << 63) - 1

Message = Mapping[str, Any]

OPEN: Final = "status in ('pending', 'sent')"
KEPT: Final = "status = 'conflict'"  # kept for a person: not on top, but may settle later
"""SQL condition of open journal entries (matches the partial index ``journal_open``)."""


# --------------------------------------------------------------------------- checksums


def term_of(table_json: bytes, row_key: str, data: Mapping[str, Any]) -> int:
    """``row_checksum(table, row_key, data)`` with the table's JSON text precomputed."""
    text = (
        b"[" + table_json + b"," + orjson.dumps(row_key) + b"," + orjson.dumps(data, option=_SORT)
    )
    return int(_U64(hashlib.sha256(text + b"]").digest())[0])


def signed(term: int) -> int:
    return term - (1 << 64) if term >= _SIGNED else term


def unsigned(term: int) -> int:
    return term + (1 << 64) if term < 0 else term


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class ApplyResult:
    messages: int = 0
    ops: int = 0
    puts: int = 0
    removes: int = 0
    reset: list[str] = dataclasses.field(default_factory=list)
    verified: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[str] = dataclasses.field(default_factory=list)
    released: int = 0
    held_rows: int = 0
    seconds: float = 0.0


@dataclasses.dataclass
class _Bucket:
    id: int
    name: str
    count: int
    checksum: int
    fresh: bool  # holds no row: no old term to look up
    recount: bool = False  # fresh in a bulk apply: count and checksum summed at the end


# --------------------------------------------------------------------------- the batch


class _Batch:
    """State of one apply transaction."""

    def __init__(
        self, conn: sqlite3.Connection, tables: dict[str, LocalTable], bulk: bool = False
    ) -> None:
        self.conn = conn
        self.bulk = bulk
        self.tables = tables
        self.by_id = {t.id: t for t in tables.values()}
        self.table_json = {t.name: orjson.dumps(t.name) for t in tables.values()}
        self.buckets: dict[str, _Bucket] = {}
        self.terms: dict[tuple[int, int, Any], int | None] = {}
        # rows with edits on top (open, or awaiting their server version) when the
        # transaction began: the general path
        self.held: set[tuple[int, Any]] = {
            (tid, k) for tid, k in conn.execute(f"select tbl, k from {PREFIX}journal where {OPEN}")
        }
        self.held.update(
            conn.execute(f"select tbl, k from {PREFIX}journal where await_lsn is not null")
        )
        # rows of kept conflicts: their ops' positions are recorded (seen_lsn), so that a
        # resolution whose server version (or the row's removal) came first is not awaited
        self.held.update(conn.execute(f"select tbl, k from {PREFIX}journal where {KEPT}"))
        self.dirty: set[tuple[int, Any]] = set()
        # per held row: the highest commit_lsn of an op of it in this transaction
        self.seen: dict[tuple[int, Any], int] = {}
        # buckets were emptied for a new download (or this is a first download): an
        # awaiting edit of a row no bucket holds afterwards stops being kept
        self.buckets_reset = False
        self.kinds_changed: set[int] = set()
        self.result = ApplyResult()
        self.unknown_kinds = {
            t.id: [c for c in t.columns if c not in t.kinds] for t in tables.values()
        }
        conn.execute(f"delete from {PREFIX}replaced")  # only ever needed inside one statement
        if self.held:
            self.capture_received()

    # ---- buckets

    def bucket(self, name: str) -> _Bucket:
        b = self.buckets.get(name)
        if b is None:
            bid = bucket_ids(self.conn, [name])[name]
            row = self.conn.execute(
                f"select count, checksum from {PREFIX}buckets where id = ?", (bid,)
            ).fetchone()
            # count 0: no row to look up (a wrong count shows as a checksum mismatch)
            fresh = int(row[0]) == 0
            b = _Bucket(bid, name, int(row[0]), int(row[1]), fresh, fresh and self.bulk)
            self.buckets[name] = b
        return b

    def reset_bucket(self, name: str) -> None:
        """Empty a bucket: its holds go; rows no other bucket holds leave their tables."""
        b = self.bucket(name)
        rows = self.conn.execute(
            f"select tbl, k from {PREFIX}rows where bucket = ?", (b.id,)
        ).fetchall()
        self.conn.execute(f"delete from {PREFIX}rows where bucket = ?", (b.id,))
        for tid, k in rows:
            self.dirty.add((tid, k))
        for key in [key for key in self.terms if key[0] == b.id]:
            del self.terms[key]
        b.count, b.checksum, b.fresh, b.recount = 0, 0, True, self.bulk
        self.result.reset.append(name)
        self.buckets_reset = True

    # ---- ops

    def apply_message(self, msg: Message) -> None:
        for name in list(msg.get("resync") or ()) + list(msg.get("dropped") or ()):
            self.flush_dirty()
            self.reset_bucket(name)
        ops: Sequence[Mapping[str, Any]] = msg.get("ops") or ()
        self.result.messages += 1
        if not ops:
            return
        self.prefetch_terms(ops)
        fast_put: dict[int, dict[Any, tuple[Any, ...]]] = {}
        fast_gone: dict[int, set[Any]] = {}
        final: dict[tuple[int, Any, int], tuple[Any, ...] | None] = {}
        tables, buckets, terms = self.tables, self.buckets, self.terms
        held, dirty = self.held, self.dirty
        getters: dict[int, Callable[[Mapping[str, Any]], Any]] = {}
        heads = {t.id: b"[" + self.table_json[t.name] + b"," for t in tables.values()}
        dumps, sha256, u64 = orjson.dumps, hashlib.sha256, _U64
        for op in ops:
            table = tables.get(op["table"])
            if table is None:
                raise StateError(
                    f"the relay sent rows of {op['table']}, which the local schema lacks; "
                    "the schema is refreshed on the next sync"
                )
            b = buckets.get(op["bucket"]) or self.bucket(op["bucket"])
            key = op["key"]
            k = key[0] if len(key) == 1 and type(key[0]) in (int, str) else key_k(key)
            tid = table.id
            recount = b.recount
            ref = (b.id, tid, k)
            old = terms[ref] if not recount and ref in terms else None
            slow = table.multi or (tid, k) in held
            if op["op"] == "PUT":
                data = op["data"]
                # row_checksum(table, row_key, data), inlined (the hot path)
                rk = f'"[{k}]",'.encode() if type(k) is int else dumps(row_key_text(key)) + b","
                digest = sha256(heads[tid] + rk + dumps(data, option=_SORT) + b"]").digest()
                term = u64(digest)[0]
                if recount:  # summed from _fieldsync_rows at the end (no per-row state)
                    pass
                elif old is None:
                    b.count += 1
                    b.checksum += term
                    terms[ref] = term
                else:
                    b.checksum += term - old
                    terms[ref] = term
                self.result.puts += 1
                if self.unknown_kinds[tid]:
                    self.learn_kinds(table, data)
                if slow:
                    final[(tid, k, b.id)] = (
                        tid,
                        k,
                        b.id,
                        op["op_id"],
                        signed(term),
                        _data_text(data),
                        op.get("position"),
                    )
                    dirty.add((tid, k))
                    if (tid, k) in held:
                        self.saw(tid, k, op.get("position"))
                    fast_gone.get(tid, set()).discard(k)
                    fast_put.get(tid, {}).pop(k, None)
                else:
                    final[(tid, k, b.id)] = (
                        tid,
                        k,
                        b.id,
                        op["op_id"],
                        term - _WRAP if term >= _SIGNED else term,
                        None,
                        op.get("position"),
                    )
                    getter = getters.get(tid)
                    if getter is None:
                        getter = getters[tid] = itemgetter(*table.columns)
                    try:
                        values = getter(data)
                    except KeyError:
                        values = tuple(data.get(c) for c in table.columns)
                    if len(table.columns) == 1:
                        values = (values,)
                    fast_put.setdefault(tid, {})[k] = values
                    gone = fast_gone.get(tid)
                    if gone is not None:
                        gone.discard(k)
            else:
                self.result.removes += 1
                if old is not None:
                    b.count -= 1
                    b.checksum -= old
                if not recount:
                    terms[ref] = None
                final[(tid, k, b.id)] = None
                if slow:
                    dirty.add((tid, k))
                    if (tid, k) in held:
                        self.saw(tid, k, op.get("position"))
                else:
                    fast_put.get(tid, {}).pop(k, None)
                    fast_gone.setdefault(tid, set()).add(k)
        self.result.ops += len(ops)
        self.write_rows(final)
        self.write_fast(fast_put, fast_gone)
        for b in buckets.values():  # fresh stays: rows put in this batch are in terms
            b.checksum %= CHECKSUM_MODULUS

    def saw(self, tid: int, k: Any, position: Any) -> None:
        """An op of a row with edits on top arrived (its position's commit_lsn counts)."""
        lsn = pos_lsn(position)
        ref = (tid, k)
        self.seen[ref] = max(self.seen.get(ref, -1), UNKNOWN_POSITION if lsn is None else lsn)

    def learn_kinds(self, table: LocalTable, data: Mapping[str, Any]) -> None:
        unknown = self.unknown_kinds[table.id]
        for c in list(unknown):
            kind = kind_of(data.get(c))
            if kind is not None:
                table.kinds[c] = kind
                unknown.remove(c)
                self.kinds_changed.add(table.id)

    def prefetch_terms(self, ops: Sequence[Mapping[str, Any]]) -> None:
        """Load the current terms of rows of non-fresh buckets this message touches."""
        wanted: dict[tuple[int, int], list[Any]] = {}
        for op in ops:
            b = self.buckets.get(op["bucket"]) or self.bucket(op["bucket"])
            if b.fresh:
                continue
            table = self.tables.get(op["table"])
            if table is None:
                continue
            key = op["key"]
            k = key[0] if len(key) == 1 and type(key[0]) in (int, str) else key_k(key)
            if (b.id, table.id, k) not in self.terms:
                wanted.setdefault((b.id, table.id), []).append(k)
        for (bid, tid), ks in wanted.items():
            for ref_k in ks:
                self.terms[(bid, tid, ref_k)] = None
            for i in range(0, len(ks), _CHUNK):
                chunk = ks[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                for k, term in self.conn.execute(
                    f"""select k, term from {PREFIX}rows
                        where tbl = ? and bucket = ? and k in ({marks})""",
                    (tid, bid, *chunk),
                ):
                    self.terms[(bid, tid, k)] = unsigned(int(term))

    def write_rows(self, final: dict[tuple[int, Any, int], tuple[Any, ...] | None]) -> None:
        """Write the holds' final states of one message (None: removed)."""
        gone = [ref for ref, row in final.items() if row is None]
        if gone:
            self.conn.executemany(
                f"delete from {PREFIX}rows where tbl = ? and k = ? and bucket = ?", gone
            )
        # row: (tbl, k, bucket, op_id, term, data text or None, position [lsn, seq] or None)
        put = [row for row in final.values() if row is not None]
        plain = [row for row in put if row[5] is None]
        if len(plain) != len(put):
            self.conn.executemany(
                f"insert or replace into {PREFIX}rows (tbl, k, bucket, op_id, term, data, pos) "
                "values (?, ?, ?, ?, ?, ?, ?)",
                [(*row[:6], _pos_text(row[6])) for row in put if row[5] is not None],
            )
        if plain:
            # one statement per message: SQLite reads the holds from one JSON array (C),
            # cheaper than binding parameters per row; json_extract of the position array
            # gives its compact JSON text ('[lsn,seq]'), the form pos is stored in
            try:
                packed = orjson.dumps(plain)
            except TypeError:  # a key orjson cannot write (e.g. bytes): bind per row
                self.conn.executemany(
                    f"insert or replace into {PREFIX}rows (tbl, k, bucket, op_id, term, pos) "
                    "values (?, ?, ?, ?, ?, ?)",
                    [(*row[:5], _pos_text(row[6])) for row in plain],
                )
                return
            self.conn.execute(
                f"""insert or replace into {PREFIX}rows (tbl, k, bucket, op_id, term, pos)
                    select json_extract(value, '$[0]'), json_extract(value, '$[1]'),
                        json_extract(value, '$[2]'), json_extract(value, '$[3]'),
                        json_extract(value, '$[4]'), json_extract(value, '$[6]')
                    from json_each(?)""",
                (packed,),
            )

    def write_fast(
        self, fast_put: dict[int, dict[Any, tuple[Any, ...]]], fast_gone: dict[int, set[Any]]
    ) -> None:
        for tid, gone in fast_gone.items():
            table = self.by_id[tid]
            if not gone:
                continue
            where = _key_where(table)
            self.conn.executemany(
                f"""delete from {q(table.local)} where {where} and not exists
                    (select 1 from {PREFIX}rows where tbl = {tid} and k = ?)""",
                [(*_key_values(table, k), k) for k in gone],
            )
        for tid, rows in fast_put.items():
            table = self.by_id[tid]
            if not rows:
                continue
            cols = ", ".join(q(c) for c in table.columns)
            marks = ", ".join("?" * len(table.columns))
            sql = f"insert or replace into {q(table.local)} ({cols}) values ({marks})"
            values = list(rows.values())
            json_cols = [i for i, c in enumerate(table.columns) if table.kinds.get(c) == "json"]
            if json_cols:
                values = [_convert(v) for v in values]
            try:
                self.conn.executemany(sql, values)
            except (sqlite3.ProgrammingError, sqlite3.InterfaceError, TypeError):
                self.conn.executemany(sql, [_convert(v) for v in values])

    # ---- the general path: rows re-derived with visible_row

    def capture_received(self) -> None:
        """Keep the received version of every row with edits on top whose holds came by
        the fast path (``data`` NULL: the table row itself was the received version, until
        the app edited it).  The earliest edit's ``old`` is that version (made on the row
        as received; an ``INSERT OR REPLACE`` records the row it replaced).  Runs first in
        every transaction that applies ops or settles entries, so the version is kept
        before any edit of the row settles."""
        conn = self.conn
        first: dict[tuple[int, Any], tuple[int, str | None]] = {}
        for where in ("j.status in ('pending', 'sent')", "j.await_lsn is not null"):
            for tid, k, seq, old in conn.execute(
                f"""select j.tbl, j.k, j.seq, j.old from {PREFIX}journal j
                    where {where} and exists (select 1 from {PREFIX}rows r
                        where r.tbl = j.tbl and r.k = j.k and r.data is null)
                    order by j.seq"""
            ):
                if (tid, k) not in first or first[(tid, k)][0] > seq:
                    first[(tid, k)] = (seq, old)
        for (tid, k), (_seq, old) in first.items():
            table = self.by_id.get(tid)
            if table is None or table.multi:
                continue
            if old is None:  # not known (a database of an earlier version): download again
                conn.execute(
                    f"""update {PREFIX}buckets set reset_pending = 1 where id in
                        (select bucket from {PREFIX}rows where tbl = ? and k = ?)""",
                    (tid, k),
                )
                continue
            conn.execute(
                f"update {PREFIX}rows set data = ? where tbl = ? and k = ? and data is null",
                (_data_text(_wire(table, orjson.loads(old))), tid, k),
            )

    def flush_dirty(self) -> None:
        if self.buckets_reset:  # awaiting edits of rows no bucket holds: re-derived too
            for tid, k in self.conn.execute(
                f"""select distinct j.tbl, j.k from {PREFIX}journal j
                    where j.await_lsn is not null and not exists
                        (select 1 from {PREFIX}rows r where r.tbl = j.tbl and r.k = j.k)"""
            ):
                if tid in self.by_id:
                    self.dirty.add((tid, k))
        for tid, k in sorted(self.dirty, key=lambda r: (r[0], str(r[1]))):
            self.refresh_row(self.by_id[tid], k)
        self.dirty.clear()

    def edits_on_top(self, table: LocalTable, k: Any) -> list[Edit]:
        """The row's open and awaiting entries in seq order (ops of the row seen in this
        transaction recorded on them first)."""
        ref = (table.id, k)
        if ref not in self.held:  # the journal is only read for rows with edits
            return []
        seen = self.seen.pop(ref, None)
        if seen is not None:
            for where in (OPEN, "await_lsn is not null", KEPT):
                self.conn.execute(
                    f"""update {PREFIX}journal set seen_lsn = max(coalesce(seen_lsn, -1), ?)
                        where tbl = ? and k = ? and {where}""",
                    (seen, table.id, k),
                )
        rows = [
            r
            for where in (OPEN, "await_lsn is not null")
            for r in self.conn.execute(
                f"""select seq, op, old, new, await_lsn, seen_lsn from {PREFIX}journal
                    where tbl = ? and k = ? and {where}""",
                (table.id, k),
            )
        ]
        return [Edit.from_journal(*r) for r in sorted(rows, key=itemgetter(0))]

    def refresh_row(self, table: LocalTable, k: Any) -> None:
        """Write one row as :func:`device_agent.visible.visible_row` derives it from the
        received version and the edits on top; awaiting edits whose server version
        arrived (or that nothing may bring any more) stop being kept."""
        conn = self.conn
        holds = conn.execute(
            f"select data, pos from {PREFIX}rows where tbl = ? and k = ? order by op_id",
            (table.id, k),
        ).fetchall()
        received_lsn = max_lsn(h[1] for h in holds)
        edits = self.edits_on_top(table, k)
        done = [e.seq for e in edits if released(e, received_lsn, bool(holds), self.buckets_reset)]
        if done:
            conn.executemany(
                f"update {PREFIX}journal set await_lsn = null where seq = ?", [(s,) for s in done]
            )
            edits = [e for e in edits if e.seq not in done]
        received = received_version(table, [h[0] for h in holds], edits)
        if received is TABLE_ROW:
            return  # no edit on top, received by the fast path: the table row is that version
        if edits:
            self.result.held_rows += 1
        row = visible_row(
            None if received is None else {c: to_sql(v) for c, v in received.items()},
            edits,
            table.key,
            table.counters,
            received_lsn,
        )
        if row is None:
            conn.execute(
                f"delete from {q(table.local)} where {_key_where(table)}", _key_values(table, k)
            )
            return
        cols = ", ".join(q(c) for c in table.columns)
        marks = ", ".join("?" * len(table.columns))
        conn.execute(
            f"insert or replace into {q(table.local)} ({cols}) values ({marks})",
            [row.get(c) for c in table.columns],
        )

    # ---- settling entries

    def record_outcomes(self, outcomes: Iterable[Mapping[str, Any]]) -> int:
        """Record outcomes (core/journal_format.py ``Outcome`` JSON; the latest per seq): final
        statuses, kept conflicts; their rows are re-derived at :meth:`flush_dirty`.
        Returns how many entries changed."""
        conn = self.conn
        changed = 0
        for o in outcomes:
            seq = int(o["seq"])
            kind = str(o.get("outcome") or o.get("kind") or "")
            status = OUTCOME_STATUS.get(kind)
            found = conn.execute(
                f"select tbl, k, outcome, await_lsn from {PREFIX}journal where seq = ?", (seq,)
            ).fetchone()
            if found is None or status is None:
                continue
            tid, k, before, awaiting = found
            bound = visible_after(o)
            if not _same_outcome(before, kind, bound):  # a repeated one changes nothing
                awaiting = bound if status != "failed" and tid in self.by_id else None
            conn.execute(
                f"""update {PREFIX}journal set status = ?, outcome = ?, reason = ?, message = ?,
                        await_lsn = ?, settled_at = julianday('now') where seq = ?""",
                (
                    status,
                    orjson.dumps(o).decode(),
                    o.get("reason"),
                    o.get("message"),
                    awaiting,
                    seq,
                ),
            )
            if awaiting is not None:
                self.held.add((tid, k))
            known = conn.execute(
                f"select id from {PREFIX}conflicts where seq = ?", (seq,)
            ).fetchone()
            if status == "conflict" and o.get("conflict") is not None and known is None:
                conn.execute(
                    f"insert into {PREFIX}conflicts (seq, tbl, k, detail) values (?, ?, ?, ?)",
                    (seq, tid, k, orjson.dumps(o["conflict"]).decode()),
                )
            if kind == "resolved" and known is not None:
                conn.execute(
                    f"""update {PREFIX}conflicts set status = 'resolved',
                            resolution = coalesce(resolution, 'on the server'),
                            resolved_at = coalesce(resolved_at, julianday('now'))
                        where seq = ?""",
                    (seq,),
                )
            if tid in self.by_id:
                self.dirty.add((tid, k))
            self.result.released += 1
            changed += 1
        return changed

    def record_rejections(self, rejected: Mapping[int, tuple[str | None, str | None]]) -> None:
        """Entries the relay refused at upload: ``failed``; their rows are re-derived."""
        for seq, (reason, message) in rejected.items():
            found = self.conn.execute(
                f"select tbl, k from {PREFIX}journal where seq = ?", (seq,)
            ).fetchone()
            self.conn.execute(
                f"""update {PREFIX}journal set status = 'failed', reason = ?, message = ?,
                        settled_at = julianday('now') where seq = ?""",
                (reason, message, seq),
            )
            if found is not None and found[0] in self.by_id:
                self.dirty.add((found[0], found[1]))
                self.result.released += 1

    # ---- end

    def verify(self, checkpoint: Mapping[str, Any]) -> None:
        now = time.time()
        for name, cp in (checkpoint.get("buckets") or {}).items():
            b = self.bucket(name)
            done = bool(cp.get("complete", True))
            server_sum = int(cp.get("checksum", "0"))
            server_count = int(cp.get("count", 0))
            ok = (b.count, b.checksum) == (server_count, server_sum)
            if done and not ok:
                self.result.mismatched.append(name)
            elif done:
                self.result.verified.append(name)
            self.conn.execute(
                f"""update {PREFIX}buckets set count = ?, checksum = ?, last_op_id = ?,
                        server_count = ?, server_checksum = ?,
                        state = ?, reset_pending = ?, mismatches = mismatches + ?,
                        verified_at = case when ? then ? else verified_at end
                    where id = ?""",
                (
                    b.count,
                    str(b.checksum),
                    int(cp.get("last_op_id", 0)),
                    server_count,
                    str(server_sum),
                    "ok" if ok or not done else "mismatch",
                    1 if done and not ok else 0,
                    1 if done and not ok else 0,
                    1 if done and ok else 0,
                    now,
                    b.id,
                ),
            )

    def recount_buckets(self) -> None:
        """Count and checksum of the buckets filled from empty in this bulk apply, summed
        from their terms in one scan (32-bit halves: SQLite's sums cannot overflow)."""
        chosen = {b.id: b for b in self.buckets.values() if b.recount}
        if not chosen:
            return
        for b in chosen.values():
            b.count, b.checksum = 0, 0
        marks = ",".join("?" * len(chosen))
        for bid, count, high, low in self.conn.execute(
            f"""select bucket, count(*), sum(term >> 32), sum(term & 4294967295)
                from {PREFIX}rows where bucket in ({marks}) group by bucket""",
            list(chosen),
        ):
            b = chosen[int(bid)]
            b.count = int(count)
            b.checksum = (int(high) * 4294967296 + int(low)) % CHECKSUM_MODULUS

    def save_buckets(self) -> None:
        for b in self.buckets.values():
            self.conn.execute(
                f"update {PREFIX}buckets set count = ?, checksum = ? where id = ?",
                (b.count, str(b.checksum % CHECKSUM_MODULUS), b.id),
            )


# --------------------------------------------------------------------------- helpers


def _data_text(data: Mapping[str, Any]) -> str:
    return orjson.dumps(data, option=_SORT).decode()


def pos_lsn(pos: Any) -> int | None:
    """The ``commit_lsn`` of a position: a wire ``[commit_lsn, seq]`` or its stored text
    ``'[lsn,seq]'``; None when there is none (older relays sent no position)."""
    if isinstance(pos, str):
        try:
            pos = orjson.loads(pos)
        except orjson.JSONDecodeError:
            return None
    if isinstance(pos, list | tuple) and len(pos) == 2 and type(pos[0]) is int:
        return int(pos[0])
    return None


def max_lsn(positions: Iterable[Any]) -> int | None:
    """The highest ``commit_lsn`` of stored positions (None: none known)."""
    found = [lsn for lsn in map(pos_lsn, positions) if lsn is not None]
    return max(found) if found else None


def visible_after(outcome: Mapping[str, Any]) -> int | None:
    """An outcome's ``visible_after`` (docs/journal.md): an integer 0 … 2**63-1 or its
    decimal text; None when absent.  A malformed one counts as absent: the entry then
    settles at once, as with an outcome of a relay that sends none (nothing is lost)."""
    value = outcome.get("visible_after")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if type(value) is int and 0 <= value <= MAX_LSN:
        return value
    return None


def _same_outcome(stored: str | None, kind: str, bound: int | None) -> bool:
    """Whether the entry's recorded outcome is this one again (same kind and bound)."""
    if not stored:
        return False
    try:
        before = orjson.loads(stored)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(before, dict):
        return False
    was = str(before.get("outcome") or before.get("kind") or "")
    return was == kind and visible_after(before) == bound


def _pos_text(pos: Any) -> str | None:
    """A wire position (``[commit_lsn, seq]``; older relays sent none) as stored in
    ``_fieldsync_rows.pos``: compact JSON ``[lsn,seq]``, what the triggers copy into a
    journal entry's ``base``."""
    if isinstance(pos, list | tuple) and len(pos) == 2:
        return f"[{int(pos[0])},{int(pos[1])}]"
    return None


def _convert(values: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(to_sql(v) for v in values)


def _key_where(table: LocalTable) -> str:
    return " and ".join(f"{q(c)} is ?" for c in table.key)


def _key_values(table: LocalTable, k: Any) -> list[Any]:
    if len(table.key) == 1:
        return [k]
    return [to_sql(v) for v in orjson.loads(k)]


class Received(enum.Enum):
    TABLE_ROW = "the table row is the received version"


TABLE_ROW: Final = Received.TABLE_ROW
"""``received_version``'s answer when the table row itself is the received version."""


def received_version(
    table: LocalTable, datas: Sequence[str | None], edits: Sequence[Edit]
) -> Mapping[str, Any] | Received | None:
    """The latest server version the device received of a row (wire form), from its
    holds' stored versions in op-id order (``datas``); None when no bucket holds it.

    A table several rules serve merges the buckets' projections (latest op last).  Else
    the latest hold's version counts; a hold that came by the fast path stores none
    (``data`` NULL): the table row is that version while the row has no open edit
    (:data:`TABLE_ROW`), and the earliest open edit's ``old`` once it has
    (:meth:`_Batch.capture_received` keeps it)."""
    if not datas:
        return None
    if table.multi:
        merged: dict[str, Any] = {}
        for data in datas:
            if data is not None:
                merged.update(orjson.loads(data))
        return merged
    latest = datas[-1]
    if latest is not None:
        version: dict[str, Any] = orjson.loads(latest)
        return version
    if not edits or edits[0].old is None:
        return TABLE_ROW
    return _wire(table, edits[0].old)


def _wire(table: LocalTable, row: Mapping[str, Any]) -> dict[str, Any]:
    """A row in SQLite form (a table row, a journal entry's ``old``) in wire form."""
    return {c: from_sql(row.get(c), table.kinds.get(c)) for c in table.columns}


OUTCOME_STATUS: Final = {
    "applied": "synced",
    "merged": "synced",
    "resolved": "synced",
    "rejected": "failed",
    "conflict": "conflict",
}
"""The journal status an outcome gives its entry (docs/journal.md, "Outcomes")."""


# --------------------------------------------------------------------------- entry point


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
            batch.buckets_reset = True
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
            batch.record_outcomes(outcomes)
            batch.flush_dirty()
        batch.recount_buckets()
        batch.save_buckets()
        if last is not None and (last.get("checkpoint") or {}).get("complete"):
            batch.verify(last["checkpoint"])
        for tid in batch.kinds_changed:
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
        changed = batch.record_outcomes(outcomes)
        batch.record_rejections(rejected or {})
        with triggers.applying(conn):
            batch.flush_dirty()
    return changed + len(rejected or {})


def refresh_rows(conn: sqlite3.Connection, seqs: Iterable[int]) -> int:
    """Re-derive the rows of journal entries ``seqs`` (e.g. a conflict resolved locally).
    Returns how many rows were rewritten."""
    with transaction(conn):
        batch = _Batch(conn, load_tables(conn))
        wanted = sorted(set(seqs))
        for i in range(0, len(wanted), _CHUNK):
            chunk = wanted[i : i + _CHUNK]
            for tid, k in conn.execute(
                f"""select tbl, k from {PREFIX}journal
                    where seq in ({",".join("?" * len(chunk))})""",
                chunk,
            ):
                if tid in batch.by_id:
                    batch.dirty.add((tid, k))
        n = len(batch.dirty)
        with triggers.applying(conn):
            batch.flush_dirty()
    return n


def refresh_open_rows(conn: sqlite3.Connection, tables: Iterable[str]) -> int:
    """Re-derive the rows with open edits of ``tables`` (their counter columns changed)."""
    with transaction(conn):
        batch = _Batch(conn, load_tables(conn))
        chosen = {batch.tables[name].id for name in tables if name in batch.tables}
        batch.dirty = {(tid, k) for tid, k in batch.held if tid in chosen}
        n = len(batch.dirty)
        with triggers.applying(conn):
            batch.flush_dirty()
    return n


def local_checksums(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """Per bucket ``(count, checksum)`` recomputed from the terms in ``_fieldsync_rows``
    (summed as 32-bit halves so SQLite's 64-bit sums cannot overflow)."""
    out: dict[str, tuple[int, int]] = {}
    for name, count, high, low in conn.execute(
        f"""select b.name, count(r.term), coalesce(sum(r.term >> 32), 0),
                coalesce(sum(r.term & 4294967295), 0)
            from {PREFIX}buckets b left join {PREFIX}rows r on r.bucket = b.id group by b.id"""
    ):
        out[name] = (int(count), (int(high) * 4294967296 + int(low)) % CHECKSUM_MODULUS)
    return out
