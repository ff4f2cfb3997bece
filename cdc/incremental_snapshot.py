"""Incremental re-snapshots: re-reading a table while streaming goes on (pure, no I/O).

Why
---
Some changes give existing rows new values without writing a row change to WAL,
so logical decoding never reports them: ``ALTER TABLE … ADD COLUMN c … DEFAULT x``
(the "missing value" in ``pg_attribute.attmissingval``), a table rewrite by a
volatile default or by ``ALTER COLUMN … TYPE … USING``, and ``ALTER TYPE …
RENAME VALUE`` of an enum.  Consumers would keep the old values forever.  The cdc
daemon detects such changes (:mod:`cdc.ddl_detection`: two Relation messages of one
table, or two catalog signatures) and re-reads the table as op ``r`` events, chunk by
chunk, while the stream goes on.  Operators can ask for the same (:mod:`cdc.where_clause`
checks their row filter).  The daemon's side of it (reads, watermarks, signals, the
progress record) is :mod:`cdc.incremental_snapshot_io`.

Method (DBLog; Debezium's incremental snapshots)
-----------------------------------------------
For each chunk the daemon, on an ordinary connection:

1. commits a *low watermark*: a transactional logical decoding message, prefix
   :data:`WATERMARK_PREFIX`, content :class:`Watermark` (``mark = "low"``);
2. in a REPEATABLE READ transaction started after that commit, reads
   ``pg_current_snapshot()`` (the chunk's snapshot *S*, :class:`Visibility`) and
   ``SELECT … WHERE (pk) > (last key) ORDER BY pk LIMIT n``;
3. commits a *high watermark* (``mark = "high"``).

The rows wait in a :class:`ChunkWindow` (memory: one chunk) while the daemon
reads on in the stream.  A row must not be emitted if a streamed change to its
key is not contained in what the chunk read, since the chunk's rows are placed
after that change and would overwrite it.  So a key is dropped from the window
when a streamed transaction touching it (insert, update — old and new key —,
delete; a truncate drops every key)

- commits between the low and the high watermark (DBLog's rule), or
- commits before the low watermark but is not visible to *S* (WAL order and
  visibility order differ: a transaction's commit record can precede the low
  watermark while the transaction still counts as running in *S*).

Transactions the daemon had already read before the chunk was registered are
checked against *S* as well (:meth:`ChunkWindow.registered_after`): if one is
invisible, the chunk is discarded and read again.  A change whose key cannot be
told (an unsent TOASTed key value, a delete that carries no primary key)
invalidates the chunk, which is read again.

When the stream reaches the high watermark's commit, the remaining rows are
emitted, in key order, at positions ``(H, seq)``: ``H`` is the commit LSN of the
high watermark's transaction (which holds no row change of its own), ``seq``
counts from 0.  That is unique and totally ordered with the stream's positions:
every transaction before it in the stream committed before ``H``, every later
one after.  Each row then holds the state of *S*, which includes every change
of its key that precedes ``H`` (an invisible one would have dropped the key).

Progress (:class:`Progress`: queued requests, jobs and the last key each has
reached) is persisted by the caller atomically with the emitted rows, so a
restarted daemon continues at the last finished chunk.

Concurrency: plain data and functions, used from the daemon's one thread.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from cdc import pgoutput_messages as m

__all__ = [
    "WATERMARK_PREFIX",
    "ChunkWindow",
    "Job",
    "Progress",
    "SignalRequest",
    "Visibility",
    "Watermark",
    "WindowState",
    "message_keys",
]

WATERMARK_PREFIX: Final = "fieldsync.snapshot"
"""Prefix of the watermark messages (transactional ``pg_logical_emit_message``)."""

Key = tuple[str, ...]
"""A primary key as the text of each key column (the form pgoutput sends)."""
Row = tuple[str | None, ...]

_XID_SPAN = 1 << 32
_XID_HALF = 1 << 31


# --------------------------------------------------------------------------- visibility


@dataclasses.dataclass(frozen=True, slots=True)
class Visibility:
    """A snapshot as ``pg_current_snapshot()`` prints it: ``xmin:xmax:xip,…`` (64-bit xids).

    pgoutput names transactions by 32-bit xids; :meth:`full_xid` puts one into the
    epoch nearest to ``xmax``.
    """

    xmin: int
    xmax: int
    xip: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str) -> Visibility:
        try:
            xmin, xmax, xip = text.strip().split(":")
            return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))
        except ValueError as exc:
            raise ValueError(f"not a pg_snapshot: {text!r} (expected xmin:xmax:xip,…)") from exc

    def full_xid(self, xid: int) -> int:
        full = (self.xmax & ~(_XID_SPAN - 1)) | (xid & (_XID_SPAN - 1))
        if full - self.xmax > _XID_HALF:
            full -= _XID_SPAN
        elif self.xmax - full > _XID_HALF:
            full += _XID_SPAN
        return full

    def visible(self, xid: int) -> bool:
        """Whether a committed transaction with this (32-bit) xid is visible in the snapshot."""
        full = self.full_xid(xid)
        if full < self.xmin:
            return True
        return full < self.xmax and full not in self.xip


# --------------------------------------------------------------------------- watermarks


@dataclasses.dataclass(frozen=True, slots=True)
class Watermark:
    """Content of a watermark message: which chunk, which end of its window."""

    chunk: str
    mark: str  # "low" | "high"
    table: str = ""

    def to_json(self) -> str:
        return json.dumps({"chunk": self.chunk, "mark": self.mark, "table": self.table})

    @classmethod
    def parse(cls, content: bytes) -> Watermark | None:
        """The watermark in a message's content; None for anything else."""
        try:
            d = json.loads(content)
            chunk, mark = d["chunk"], d["mark"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(chunk, str) or mark not in ("low", "high"):
            return None
        return cls(chunk, mark, str(d.get("table", "")))


class WindowState(enum.Enum):
    WAITING_LOW = "waiting for the low watermark"
    OPEN = "open"
    CLOSED = "closed"
    INVALID = "invalid"


class ChunkWindow:
    """One chunk's rows between its watermarks, and the keys streamed changes drop.

    Feed it, in stream order, every committed change of the chunk's table
    (:meth:`change`, :meth:`truncate`) and the chunk's watermarks (:meth:`watermark`);
    at the high watermark :meth:`remaining` gives the rows to emit.
    """

    def __init__(self, chunk: str, rows: Iterable[tuple[Key, Row]], visibility: Visibility) -> None:
        self.chunk = chunk
        self.rows: dict[Key, Row] = dict(rows)
        self.read = len(self.rows)
        self.visibility = visibility
        self.state = WindowState.WAITING_LOW
        self.dropped = 0
        self.invalid_reason = ""

    def registered_after(self, xids: Iterable[int]) -> int | None:
        """The first of the transactions already read from the stream (before this window
        existed) that the chunk's snapshot does not see, or None.  With one, the chunk may
        hold a row older than a change already sent: discard it and read it again."""
        for xid in xids:
            if not self.visibility.visible(xid):
                return xid
        return None

    def watermark(self, mark: str) -> None:
        if self.state is WindowState.INVALID:
            return
        if mark == "low" and self.state is WindowState.WAITING_LOW:
            self.state = WindowState.OPEN
        elif mark == "high" and self.state is not WindowState.CLOSED:
            # (a high watermark without the low one cannot happen: both commit in order)
            self.state = WindowState.CLOSED

    def _drops(self, xid: int) -> bool:
        if self.state is WindowState.OPEN:
            return True
        return self.state is WindowState.WAITING_LOW and not self.visibility.visible(xid)

    def change(self, xid: int, keys: Sequence[Key] | None) -> None:
        """A committed change of the chunk's table; ``keys`` None when they cannot be told."""
        if not self._drops(xid):
            return
        if keys is None:
            self.invalidate("a change whose primary key was not sent")
            return
        for key in keys:
            if self.rows.pop(key, None) is not None:
                self.dropped += 1

    def truncate(self, xid: int) -> None:
        if self._drops(xid):
            self.dropped += len(self.rows)
            self.rows.clear()

    def invalidate(self, reason: str) -> None:
        if self.state is not WindowState.CLOSED:
            self.state = WindowState.INVALID
            self.invalid_reason = reason
            self.rows.clear()

    def remaining(self) -> list[tuple[Key, Row]]:
        """The rows to emit, in the order read (key order); only once the window closed."""
        if self.state is not WindowState.CLOSED:
            raise ValueError(f"chunk {self.chunk}: window is {self.state.value}, not closed")
        return list(self.rows.items())


def message_keys(
    msg: m.Insert | m.Update | m.Delete, key_positions: Sequence[int]
) -> list[Key] | None:
    """The primary keys a change touches (an update: old and new), or None if one is unknown."""
    tuples: list[m.TupleData] = []
    if isinstance(msg, m.Insert):
        tuples.append(msg.new)
    elif isinstance(msg, m.Update):
        tuples.append(msg.new)
        if msg.old is not None:
            tuples.append(msg.old)
    else:
        tuples.append(msg.old)
    keys: list[Key] = []
    for data in tuples:
        key = []
        for i in key_positions:
            value = data[i] if i < len(data) else None
            if not isinstance(value, str):
                return None
            key.append(value)
        keys.append(tuple(key))
    return keys


# --------------------------------------------------------------------------- progress


@dataclasses.dataclass(slots=True)
class SignalRequest:
    """A row of the signal table, as read from the stream, not yet checked."""

    signal_id: int
    table: str
    where: str | None
    kind: str = "snapshot"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SignalRequest:
        where = d.get("where")
        return cls(
            int(d["signal_id"]),
            str(d["table"]),
            None if where is None else str(where),
            str(d.get("kind", "snapshot")),
        )


@dataclasses.dataclass(slots=True)
class Job:
    """Re-reading one table (or the rows of it a WHERE clause selects)."""

    oid: int
    table: str  # schema.table
    reason: str
    where: str | None = None  # canonical text of a WhereClause
    after: Key | None = None  # the last key emitted; None: from the start
    chunks: int = 0
    rows: int = 0
    signal_id: int | None = None
    retire_keys: bool = False  # the key schema changed: the old keys are deleted first
    retiring: bool = False  # the old keys are being deleted (no row sent yet)
    retired: int = 0  # old keys deleted

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["after"] = None if self.after is None else list(self.after)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Job:
        after = d.get("after")
        where = d.get("where")
        signal = d.get("signal_id")
        return cls(
            oid=int(d["oid"]),
            table=str(d["table"]),
            reason=str(d["reason"]),
            where=None if where is None else str(where),
            after=None if after is None else tuple(str(v) for v in after),
            chunks=int(d.get("chunks", 0)),
            rows=int(d.get("rows", 0)),
            signal_id=None if signal is None else int(signal),
            retire_keys=bool(d.get("retire_keys", False)),
            retiring=bool(d.get("retiring", False)),
            retired=int(d.get("retired", 0)),
        )


@dataclasses.dataclass
class Progress:
    """Everything a restarted daemon needs to go on: requests read from the signal table
    but not yet checked, the jobs (the first is running), and the position (commit LSN,
    id) of the last signal taken (signals at or before it are replays)."""

    jobs: list[Job] = dataclasses.field(default_factory=list)
    requests: list[SignalRequest] = dataclasses.field(default_factory=list)
    signal_lsn: int = 0
    signal_id: int = 0  # the last signal taken from the transaction at signal_lsn

    VERSION: Final = 1

    def add(self, job: Job) -> Job:
        """Queue ``job``; a queued job for the same rows starts over instead (its rows may
        have been read before the newer reason)."""
        for queued in self.jobs:
            if queued.oid == job.oid and queued.where == job.where:
                queued.after = None
                queued.table = job.table
                if job.retire_keys:
                    queued.retire_keys = queued.retiring = True
                if job.reason not in queued.reason:
                    queued.reason = f"{queued.reason}; {job.reason}"
                return queued
        self.jobs.append(job)
        return job

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "version": self.VERSION,
                "signal_lsn": self.signal_lsn,
                "signal_id": self.signal_id,
                "requests": [r.to_json() for r in self.requests],
                "jobs": [j.to_json() for j in self.jobs],
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Progress:
        d = json.loads(data)
        if d.get("version") != cls.VERSION:
            raise ValueError(f"re-snapshot progress of version {d.get('version')!r}, expected 1")
        return cls(
            jobs=[Job.from_json(j) for j in d.get("jobs", ())],
            requests=[SignalRequest.from_json(r) for r in d.get("requests", ())],
            signal_lsn=int(d.get("signal_lsn", 0)),
            signal_id=int(d.get("signal_id", 0)),
        )
