"""The ops of changes messages: bucket holds, checksums, and the fast path of rows.

For each op of a message (:meth:`OpWriter.apply`), in order:

- ``PUT`` computes the row's checksum term (:func:`core.row_wire.row_checksum`,
  inlined: the hot path) and records the bucket's hold on the row in
  ``_fieldsync_rows`` (term, position and, on the general path, the version);
- ``REMOVE`` drops the hold;
- the bucket's row count and checksum (the sum mod 2**64 of the terms of the rows it
  holds) follow, from the terms of the rows it held before (:class:`BucketLedger`,
  loaded per message: one query per bucket, table and 400 keys); a bucket filled from
  empty in a bulk apply is summed once at the end instead (:meth:`BucketLedger.recount`).

Rows of tables one rule serves, with no edit on top, take the fast path: the table row
is the op's data (batched ``executemany``; a REMOVE deletes the row when no other
bucket holds it) and no copy of the version is kept.  Every other row (held rows,
tables several rules serve) is marked dirty and derived again by
:class:`device_agent.derive.RowDeriver`.  A column whose kind the relay's schema does not
give (an older relay) learns it from its first non-null value (device_agent/local_db.py).

An op whose ``key`` is not the table's key columns of its row (another number of values,
or not the values its data has there: the table's key changed, docs/device-agent.md
"Schema changes") only counts for its bucket: its hold is recorded and dropped again by
its REMOVE, the table is not touched; one still held at the end of the apply refuses it
(:meth:`OpWriter.check_keys`, :class:`~device_agent.errors.KeyMismatch`).

At the end of an apply :meth:`BucketLedger.verify` compares each complete bucket's count
and checksum with the checkpoint's; :func:`local_checksums` recomputes them from
``_fieldsync_rows`` for ``device-agent verify``.  Terms are stored as signed 64-bit
integers (:func:`signed`, :func:`unsigned`).

Runs inside the caller's open transaction (device_agent/apply.py), on its connection and
thread; no network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any, Final

import orjson

from core.row_wire import CHECKSUM_MODULUS, row_key_text
from device_agent.derive import (
    CHUNK,
    ApplyResult,
    RowDeriver,
    data_text,
    key_values,
    key_where,
)
from device_agent.errors import KeyMismatch, StateError
from device_agent.local_db import bucket_ids, key_k, kind_of, to_sql
from device_agent.local_tables import PREFIX, LocalTable, q
from device_agent.positions import pos_text

_SIGNED: Final = 1 << 63
_WRAP: Final = 1 << 64
_U64 = struct.Struct(">Q").unpack_from
_SORT = orjson.OPT_SORT_KEYS

Message = Mapping[str, Any]


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


@dataclasses.dataclass
class Bucket:
    id: int
    name: str
    count: int
    checksum: int
    fresh: bool  # holds no row: no old term to look up
    recount: bool = False  # fresh in a bulk apply: count and checksum summed at the end


class BucketLedger:
    """Count, checksum and the rows' terms of every bucket one apply transaction touches."""

    def __init__(self, conn: sqlite3.Connection, result: ApplyResult, bulk: bool) -> None:
        self.conn = conn
        self.result = result
        self.bulk = bulk
        self.buckets: dict[str, Bucket] = {}
        self.terms: dict[tuple[int, int, Any], int | None] = {}

    def bucket(self, name: str) -> Bucket:
        b = self.buckets.get(name)
        if b is None:
            bid = bucket_ids(self.conn, [name])[name]
            row = self.conn.execute(
                f"select count, checksum from {PREFIX}buckets where id = ?", (bid,)
            ).fetchone()
            # count 0: no row to look up (a wrong count shows as a checksum mismatch)
            fresh = int(row[0]) == 0
            b = Bucket(bid, name, int(row[0]), int(row[1]), fresh, fresh and self.bulk)
            self.buckets[name] = b
        return b

    def reset(self, name: str) -> list[tuple[int, Any]]:
        """Empty a bucket: its holds go.  Returns the rows they held (to derive again:
        rows no other bucket holds leave their tables)."""
        b = self.bucket(name)
        rows: list[tuple[int, Any]] = self.conn.execute(
            f"select tbl, k from {PREFIX}rows where bucket = ?", (b.id,)
        ).fetchall()
        self.conn.execute(f"delete from {PREFIX}rows where bucket = ?", (b.id,))
        for key in [key for key in self.terms if key[0] == b.id]:
            del self.terms[key]
        b.count, b.checksum, b.fresh, b.recount = 0, 0, True, self.bulk
        self.result.reset.append(name)
        return rows

    def prefetch(self, ops: Sequence[Mapping[str, Any]], tables: Mapping[str, LocalTable]) -> None:
        """Load the current terms of rows of non-fresh buckets this message touches."""
        names = {op["bucket"] for op in ops}
        if all((self.buckets.get(n) or self.bucket(n)).fresh for n in names):
            return
        wanted: dict[tuple[int, int], list[Any]] = {}
        for op in ops:
            b = self.buckets.get(op["bucket"]) or self.bucket(op["bucket"])
            if b.fresh:
                continue
            table = tables.get(op["table"])
            if table is None:
                continue
            key = op["key"]
            k = key[0] if len(key) == 1 and type(key[0]) in (int, str) else key_k(key)
            if (b.id, table.id, k) not in self.terms:
                wanted.setdefault((b.id, table.id), []).append(k)
        for (bid, tid), ks in wanted.items():
            for ref_k in ks:
                self.terms[(bid, tid, ref_k)] = None
            for i in range(0, len(ks), CHUNK):
                chunk = ks[i : i + CHUNK]
                marks = ",".join("?" * len(chunk))
                for k, term in self.conn.execute(
                    f"""select k, term from {PREFIX}rows
                        where tbl = ? and bucket = ? and k in ({marks})""",
                    (tid, bid, *chunk),
                ):
                    self.terms[(bid, tid, k)] = unsigned(int(term))

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

    def recount(self) -> None:
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

    def save(self) -> None:
        for b in self.buckets.values():
            self.conn.execute(
                f"update {PREFIX}buckets set count = ?, checksum = ? where id = ?",
                (b.count, str(b.checksum % CHECKSUM_MODULUS), b.id),
            )


@dataclasses.dataclass(slots=True)
class _TableOps:
    """What the op loop needs of one table, looked up once per apply."""

    table: LocalTable
    id: int
    name: str
    multi: bool  # several rules serve it: every row takes the general path
    getter: Callable[[Mapping[str, Any]], Any]  # the data's values in column order
    single: bool  # one column: the getter returns a value, not a tuple
    unknown: list[str]  # columns whose kind is not known yet
    arity: int  # key columns
    key_getter: Callable[[Mapping[str, Any]], Any]  # the data's key values (one: a value)

    @classmethod
    def of(cls, t: LocalTable) -> _TableOps:
        return cls(
            t,
            t.id,
            t.name,
            t.multi,
            itemgetter(*t.columns),
            len(t.columns) == 1,
            [c for c in t.columns if c not in t.kinds],
            len(t.key),
            itemgetter(*t.key),
        )

    def names_row(self, key: Sequence[Any], data: Mapping[str, Any]) -> bool:
        """Whether a PUT's key is the table's key columns of its data."""
        try:
            found = self.key_getter(data)
        except KeyError:
            return False
        return found == key[0] if self.arity == 1 else list(found) == key

    def mismatch(self, key: Sequence[Any]) -> KeyMismatch:
        return KeyMismatch(
            f"{self.name}: the relay's buckets hold the row {row_key_text(list(key))}, named "
            f"by other key columns than the table's key ({', '.join(self.table.key)}) in the "
            "relay's schema: the table's primary key changed on the server and the relay has "
            "not caught up (its schema follows a new key within its schema check interval, "
            "or when it restarts; rows under the old key are removed as cdc sends the table "
            "again); nothing was applied, sync again",
            self.name,
        )


class OpWriter:
    """Applies the ops of changes messages (holds, bucket sums, fast-path rows)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        tables: dict[str, LocalTable],
        ledger: BucketLedger,
        rows: RowDeriver,
        result: ApplyResult,
    ) -> None:
        self.conn = conn
        self.tables = tables
        self.by_id = rows.by_id
        self.ledger = ledger
        self.rows = rows
        self.result = result
        self.kinds_changed: set[int] = set()
        self.info = {name: _TableOps.of(t) for name, t in tables.items()}
        self.foreign: dict[tuple[int, Any, int], Sequence[Any]] = {}
        """Holds of rows named by other key columns than their table's, (table id, k,
        bucket id) → the op's key: PUT in this apply and not REMOVEd since."""

    def check_keys(self) -> None:
        """At the end of an apply: raise :class:`KeyMismatch` when a bucket still holds a
        row named by other key columns than its table's key.  A download may PUT such rows
        and REMOVE them later (a bucket's log holds the rows of a key before a change of
        the table's key, then their removal); one that stays means the relay's rows and its
        schema disagree (the relay has not caught up with a key change yet)."""
        for (tid, _k, _bid), key in self.foreign.items():
            raise self.info[self.by_id[tid].name].mismatch(key)

    def apply(self, msg: Message) -> None:
        """Apply the ops of one changes message (its buckets' resets are done first)."""
        ops: Sequence[Mapping[str, Any]] = msg.get("ops") or ()
        self.result.messages += 1
        if not ops:
            return
        ledger, rows = self.ledger, self.rows
        ledger.prefetch(ops, self.tables)
        fast_put: dict[int, dict[Any, tuple[Any, ...]]] = {t.id: {} for t in self.info.values()}
        fast_gone: dict[int, set[Any]] = {t.id: set() for t in self.info.values()}
        final: dict[tuple[int, Any, int], tuple[Any, ...] | None] = {}
        info, buckets, terms = self.info, ledger.buckets, ledger.terms
        held, dirty = rows.held, rows.dirty
        foreign = self.foreign
        dumps, sha256, u64 = orjson.dumps, hashlib.sha256, _U64
        puts = 0
        for op in ops:
            t = info.get(op["table"])
            if t is None:
                raise StateError(
                    f"the relay sent rows of {op['table']}, which the local schema lacks; "
                    "the schema is refreshed on the next sync"
                )
            b = buckets.get(op["bucket"]) or ledger.bucket(op["bucket"])
            key = op["key"]
            k = key[0] if len(key) == 1 and type(key[0]) in (int, str) else key_k(key)
            tid, bid = t.id, b.id
            ref = (tid, k)
            # named by another key than the table's (its key changed): bucket bookkeeping only
            other = len(key) != t.arity or (foreign and (tid, k, bid) in foreign)
            slow = t.multi or (held and ref in held)
            position = op.get("position")
            pos = (
                f"[{position[0]},{position[1]}]"
                if type(position) is list
                and len(position) == 2
                and type(position[0]) is int
                and type(position[1]) is int
                else pos_text(position)
            )
            if op["op"] == "PUT":
                puts += 1
                data = op["data"]
                other = other or not t.names_row(key, data)
                # row_checksum(table, row_key, data), inlined (the hot path)
                # (an int k of a boolean key: the relay writes it as true/false)
                rk = f"[{k}]" if type(k) is int and type(key[0]) is int else row_key_text(key)
                term = u64(sha256(dumps((t.name, rk, data), option=_SORT)).digest())[0]
                if not b.recount:  # recount: summed from _fieldsync_rows at the end
                    old = terms.get((bid, tid, k))
                    if old is None:
                        b.count += 1
                        b.checksum += term
                    else:
                        b.checksum += term - old
                    terms[(bid, tid, k)] = term
                if term >= _SIGNED:
                    term -= _WRAP
                if other:
                    final[(tid, k, bid)] = (tid, k, bid, op["op_id"], term, data_text(data), pos)
                    foreign[(tid, k, bid)] = key
                    continue
                if t.unknown:
                    self.learn_kinds(t.table, data)
                if slow:
                    final[(tid, k, bid)] = (tid, k, bid, op["op_id"], term, data_text(data), pos)
                    dirty.add(ref)
                    if ref in held:
                        rows.saw(tid, k, position)
                    fast_gone[tid].discard(k)
                    fast_put[tid].pop(k, None)
                    continue
                final[(tid, k, bid)] = (tid, k, bid, op["op_id"], term, None, pos)
                try:
                    values = t.getter(data)
                except KeyError:
                    values = tuple(data.get(c) for c in t.table.columns)
                if t.single:
                    values = (values,)
                fast_put[tid][k] = values
                gone = fast_gone[tid]
                if gone:
                    gone.discard(k)
                continue
            if not b.recount:
                old = terms.get((bid, tid, k))
                if old is not None:
                    b.count -= 1
                    b.checksum -= old
                terms[(bid, tid, k)] = None
            final[(tid, k, bid)] = None
            if other:
                foreign.pop((tid, k, bid), None)
                continue
            if slow:
                dirty.add(ref)
                if ref in held:
                    rows.saw(tid, k, position)
            else:
                # deleted at the end unless a bucket holds it; a PUT of this message stays:
                # the bucket still holding the row has that version (one rule serves the
                # table: the relay puts a row's new version in every bucket holding it)
                fast_gone[tid].add(k)
        self.result.ops += len(ops)
        self.result.puts += puts
        self.result.removes += len(ops) - puts
        self.write_rows(final)
        self.write_fast(fast_put, fast_gone)
        for b in buckets.values():  # fresh stays: rows put in this batch are in terms
            b.checksum %= CHECKSUM_MODULUS

    def learn_kinds(self, table: LocalTable, data: Mapping[str, Any]) -> None:
        unknown = self.info[table.name].unknown
        for c in list(unknown):
            kind = kind_of(data.get(c))
            if kind is not None:
                table.kinds[c] = kind
                unknown.remove(c)
                self.kinds_changed.add(table.id)

    def write_rows(self, final: dict[tuple[int, Any, int], tuple[Any, ...] | None]) -> None:
        """Write the holds' final states of one message (None: removed)."""
        gone = [ref for ref, row in final.items() if row is None]
        if gone:
            self.conn.executemany(
                f"delete from {PREFIX}rows where tbl = ? and k = ? and bucket = ?", gone
            )
        # row: (tbl, k, bucket, op_id, signed term, data text or None, position text)
        put = [row for row in final.values() if row is not None]
        if put:
            self.conn.executemany(
                f"insert or replace into {PREFIX}rows (tbl, k, bucket, op_id, term, data, pos) "
                "values (?, ?, ?, ?, ?, ?, ?)",
                put,
            )

    def write_fast(
        self, fast_put: dict[int, dict[Any, tuple[Any, ...]]], fast_gone: dict[int, set[Any]]
    ) -> None:
        """Write the fast rows of one message, after its holds (:meth:`write_rows`): rows a
        REMOVE named leave their table unless a bucket still holds them; rows PUT are
        written, but one also REMOVEd later only while a bucket holds it."""
        for tid, gone in fast_gone.items():
            table = self.by_id[tid]
            if not gone:
                continue
            where = key_where(table)
            self.conn.executemany(
                f"""delete from {q(table.local)} where {where} and not exists
                    (select 1 from {PREFIX}rows where tbl = {tid} and k = ?)""",
                [(*key_values(table, k), k) for k in gone],
            )
            both = [k for k in gone if k in fast_put[tid]]
            if both:
                held = self.held_keys(tid, both)
                for k in both:
                    if k not in held:
                        del fast_put[tid][k]
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

    def held_keys(self, tid: int, ks: Sequence[Any]) -> set[Any]:
        """Which of the rows ``ks`` of table ``tid`` some bucket holds."""
        found: set[Any] = set()
        for i in range(0, len(ks), CHUNK):
            chunk = ks[i : i + CHUNK]
            marks = ",".join("?" * len(chunk))
            for (k,) in self.conn.execute(
                f"select distinct k from {PREFIX}rows where tbl = ? and k in ({marks})",
                (tid, *chunk),
            ):
                found.add(k)
        return found


def _convert(values: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(to_sql(v) for v in values)


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
