"""Turn decoded pgoutput messages into positioned change events (pure, no I/O).

State machine
-------------
``feed(message)`` is called for every decoded message in stream order and
returns what to write, in order:

- :class:`OutSchema` before the first event that uses a new Avro schema;
- :class:`OutEvent` per row change (and per relation of a TRUNCATE), carrying its
  position ``(commit_lsn, seq)`` where ``seq`` counts the transaction's events;
- :class:`TxnEnd` when a transaction's last event has been returned, with the
  LSN the slot may confirm once Kafka holds everything up to it.

A non-streamed transaction knows its commit LSN from Begin (``final_lsn``), so
its events flow straight through.  A streamed (in-progress) transaction learns
it only at Stream Commit: its messages go to a :class:`SpillStore` (on disk),
are dropped on Stream Abort (whole transaction, or a subtransaction: the store
truncates back to where that subtransaction began), and are replayed through
the same path at Stream Commit.  Outputs are generators, so replaying a
million-row transaction never holds it in memory.

Resuming: ``resume`` is the last position Kafka is known to hold.  Events at or
before it are skipped (a transaction that Kafka holds completely is skipped as
a whole; a partly written one resumes after its last written ``seq``), so a
restart after a crash writes nothing twice.  This relies on transactions
arriving in commit order (PostgreSQL sends a streamed transaction at Stream
Commit, in that order too); one that does not commit after its predecessor is
a :class:`DecodeError`, never silently skipped.

Relations: a Relation message (re)defines a table; when its columns change a
new codec, hence a new schema and fingerprint, is made, so ALTER TABLE
mid-stream changes the schema of the events that follow and old events stay
readable.  The Kafka key is the replica identity: the primary key (DEFAULT) or the identity
index (USING INDEX) as the Relation message flags them; under FULL and NOTHING the primary
key, looked up through the catalog (FULL flags every column), else none.

Observer: an optional :class:`MessageObserver` sees every message inside a
transaction, in commit order (streamed transactions when they are replayed), with
the transaction it belongs to: the incremental re-snapshots
(:class:`cdc.resnapshot_stream.ChunkTracker`) follow watermarks, signals, Relation
changes and the keys of changes through it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from cdc import pgoutput_messages as m
from cdc.errors import DecodeError, format_lsn
from cdc.resume_position import ResumePosition
from core.avro_envelope import (
    ORIGIN_MESSAGE_PREFIX,
    POSITION_HEADER,
    Source,
    TableCodec,
    position_header,
)
from core.pg_types import ColumnSpec, TypeCatalog
from core.topic_names import change_topic

HEARTBEAT_MESSAGE_PREFIX = "fieldsync.heartbeat"


# The classes made per event write out their __init__: compiled by mypyc it is a few plain
# stores, where the dataclass-generated one runs as interpreted code (~0.4 µs an event).


@dataclass(slots=True, init=False)
class OutEvent:
    topic: str
    key: bytes | None
    value: bytes
    commit_lsn: int
    seq: int
    headers: list[tuple[str, bytes]]
    commit_ts_us: int

    def __init__(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        commit_lsn: int,
        seq: int,
        headers: list[tuple[str, bytes]],
        commit_ts_us: int,
    ) -> None:
        self.topic = topic
        self.key = key
        self.value = value
        self.commit_lsn = commit_lsn
        self.seq = seq
        self.headers = headers
        self.commit_ts_us = commit_ts_us


@dataclass(slots=True)
class OutSchema:
    fingerprint: bytes
    schema_json: str


@dataclass(slots=True, init=False)
class TxnEnd:
    commit_lsn: int
    end_lsn: int
    events: int
    commit_ts_us: int
    streamed: bool = False  # replayed from the spill store (PostgreSQL streamed it)

    def __init__(
        self,
        commit_lsn: int,
        end_lsn: int,
        events: int,
        commit_ts_us: int,
        streamed: bool = False,
    ) -> None:
        self.commit_lsn = commit_lsn
        self.end_lsn = end_lsn
        self.events = events
        self.commit_ts_us = commit_ts_us
        self.streamed = streamed


Out = OutEvent | OutSchema | TxnEnd


class RelationCatalog(TypeCatalog, Protocol):
    """Type lookups plus the primary key of a relation (I/O lives in the implementation)."""

    def primary_key(self, relation_oid: int) -> tuple[str, ...] | None: ...


class TxnInfo(Protocol):
    """The transaction a message belongs to, as an observer sees it."""

    xid: int
    commit_lsn: int
    commit_ts_us: int


class MessageObserver(Protocol):
    """Called for every message inside a transaction, before the assembler handles it."""

    def message(self, msg: m.Message, txn: TxnInfo | None) -> None: ...


class SpillStore(Protocol):
    """Disk store for the messages of streamed, not yet committed transactions."""

    def append(self, xid: int, message: m.Message) -> None: ...
    def append_raw(self, xid: int, sub: int, payload: bytes | memoryview, lsn: int) -> None: ...
    def abort(self, xid: int, subxid: int) -> None: ...
    def replay(self, xid: int) -> Iterator[m.Message]: ...
    def discard(self, xid: int) -> None: ...
    def open_xids(self) -> Sequence[int]: ...


@dataclass(slots=True)
class TableState:
    relation: m.Relation
    codec: TableCodec
    topic: str
    pending_schemas: list[OutSchema] = field(default_factory=list)
    # the Source of this table's events in the transaction ``source_txn`` (see _source)
    source: Source | None = None
    source_txn: _Txn | None = None


_FULL: Final = m.OldTupleKind.FULL  # (an enum member looked up once, not per change)
_ROW_CHANGES: Final = (m.Insert, m.Update, m.Delete)
_UNDECODED_KINDS: Final = frozenset(b"IUD")  # type bytes of the row changes spilled undecoded


def topic_for(prefix: str, schema: str, table: str) -> str:
    return change_topic(prefix, schema, table)


@dataclass(slots=True)
class _Txn:
    xid: int
    commit_lsn: int
    commit_ts_us: int
    origin: str | None = None
    seq: int = 0
    skip_through: int = -1  # skip events with seq <= this (resume inside a partly written txn)


def new_source(db: str, rel: m.Relation, txn: _Txn, seq: int, lsn: int) -> Source:
    """The Source of an event of ``rel`` at ``lsn``, ``seq`` in transaction ``txn``."""
    # positional (keywords cost about twice as much): db, schema, table, lsn,
    # commit_lsn, txid, seq, commit_ts_us, snapshot, origin
    return Source(
        db,
        rel.namespace,
        rel.name,
        lsn,
        txn.commit_lsn,
        txn.xid,
        seq,
        txn.commit_ts_us,
        "false",
        txn.origin,
    )


class ChangeAssembler:
    def __init__(
        self,
        *,
        db: str,
        topic_prefix: str,
        catalog: RelationCatalog,
        spill: SpillStore,
        resume: ResumePosition | None = None,
        warn: Callable[[str], None] = lambda _msg: None,
        clock_us: Callable[[], int] = lambda: int(time.time() * 1_000_000),
        observer: MessageObserver | None = None,
    ) -> None:
        self.db = db
        self.observer = observer
        self.prefix = topic_prefix
        self.catalog = catalog
        self.spill = spill
        self.resume = resume
        self.warn = warn
        self.clock_us = clock_us
        self.tables: dict[int, TableState] = {}
        self.txn: _Txn | None = None
        self.stream_xid: int | None = None
        self.skipped_txns = 0
        self.last_commit_lsn = 0  # of the last transaction begun (they come in commit order)

    # ------------------------------------------------------------------ relations

    def _define(self, rel: m.Relation) -> None:
        old = self.tables.get(rel.oid)
        forget = getattr(self.catalog, "forget_relation", None)
        if forget is not None:
            # a Relation message follows every change of the table's definition, also one
            # that leaves its columns as they were but gives it another key (ADD PRIMARY
            # KEY or DROP CONSTRAINT t_pkey under REPLICA IDENTITY FULL)
            forget(rel.oid)
        keys = self._key_columns(rel)
        if (
            old is not None
            and old.relation.columns == rel.columns
            and old.relation.namespace == rel.namespace
            and old.relation.name == rel.name
            and {c.name for c in old.codec.columns if c.is_key} == keys
        ):
            self.tables[rel.oid] = TableState(rel, old.codec, old.topic, old.pending_schemas)
            return
        specs = [
            ColumnSpec(c.name, c.type_oid, c.type_modifier, c.name in keys) for c in rel.columns
        ]
        codec = TableCodec(
            db=self.db,
            schema=rel.namespace,
            table=rel.name,
            columns=specs,
            catalog=self.catalog,
            unchanged_sentinel=m.UNCHANGED_TOAST,
            warn=self.warn,
            namespace_prefix=self.prefix,
        )
        pending = [OutSchema(codec.value_fingerprint, codec.value_schema_json)]
        if codec.key_fingerprint is not None and codec.key_schema_json is not None:
            pending.insert(0, OutSchema(codec.key_fingerprint, codec.key_schema_json))
        self.tables[rel.oid] = TableState(
            rel, codec, topic_for(self.prefix, rel.namespace, rel.name), pending
        )

    def _key_columns(self, rel: m.Relation) -> set[str]:
        """The Kafka key columns of the table's events: the replica identity's columns, the
        only ones a delete carries (the primary key under DEFAULT, the index under USING
        INDEX, as pgoutput flags them from the catalog as of this WAL position); under FULL
        and NOTHING the primary key of now, else none (never FULL's every-column flags).
        ``cdc.pg_catalog.KEY_QUERY`` reads the same in the catalog of now."""
        if rel.replica_identity in (m.ReplicaIdentity.DEFAULT, m.ReplicaIdentity.INDEX):
            return {c.name for c in rel.columns if c.is_key}
        return set(self.catalog.primary_key(rel.oid) or ())

    def table(self, oid: int, lsn: int) -> TableState:
        try:
            return self.tables[oid]
        except KeyError:
            raise DecodeError(
                f"change for relation oid {oid} before its Relation message", lsn=lsn
            ) from None

    # ------------------------------------------------------------------ feeding

    def feed(self, msg: m.Message, lsn: int) -> Iterable[Out]:
        if self.stream_xid is not None and not isinstance(
            msg, m.StreamStart | m.StreamStop | m.StreamCommit | m.StreamAbort
        ):
            self.spill.append(self.stream_xid, msg)
            return ()
        if isinstance(msg, _ROW_CHANGES):  # most messages: straight on
            return self._in_txn(msg, lsn)
        match msg:
            case m.Begin():
                self.txn = self._new_txn(msg.xid, msg.final_lsn, msg.commit_ts_us, lsn)
                return ()
            case m.Commit():
                return self._end_txn(msg.commit_lsn, msg.end_lsn, lsn)
            case m.StreamStart():
                self.stream_xid = msg.xid
                return ()
            case m.StreamStop():
                self.stream_xid = None
                return ()
            case m.StreamAbort():
                self.spill.abort(msg.xid, msg.subxid)
                return ()
            case m.StreamCommit():
                self.stream_xid = None
                return self._replay_stream(msg)
            case _:
                return self._in_txn(msg, lsn)

    def spill_change(self, payload: bytes | memoryview, lsn: int) -> bool:
        """Inside a stream block, spill a row change (I, U, D, then its subtransaction's xid)
        undecoded, to decode at Stream Commit; False for anything else (the caller decodes)."""
        xid = self.stream_xid
        if xid is None or len(payload) < 5 or payload[0] not in _UNDECODED_KINDS:
            return False
        self.spill.append_raw(xid, int.from_bytes(payload[1:5], "big"), payload, lsn)
        return True

    def _new_txn(self, xid: int, commit_lsn: int, ts: int, lsn: int) -> _Txn:
        if commit_lsn <= self.last_commit_lsn:
            # resume skipping relies on transactions arriving in commit order
            raise DecodeError(
                f"transaction {xid} commits at {format_lsn(commit_lsn)}, not after the "
                f"previous one at {format_lsn(self.last_commit_lsn)}",
                lsn=lsn,
            )
        self.last_commit_lsn = commit_lsn
        txn = _Txn(xid, commit_lsn, ts)
        r = self.resume
        if r is not None:
            if commit_lsn < r.commit_lsn or (commit_lsn == r.commit_lsn and r.complete):
                txn.skip_through = 1 << 62
            elif commit_lsn == r.commit_lsn:
                txn.skip_through = r.seq
        return txn

    def _end_txn(
        self, commit_lsn: int, end_lsn: int, lsn: int, streamed: bool = False
    ) -> Iterable[Out]:
        txn = self.txn
        if txn is None:
            raise DecodeError("Commit without Begin", lsn=lsn)
        if txn.commit_lsn != commit_lsn:
            raise DecodeError(
                f"Commit LSN {commit_lsn} differs from Begin's final LSN {txn.commit_lsn}", lsn=lsn
            )
        self.txn = None
        if txn.skip_through >= (1 << 62):
            self.skipped_txns += 1
        return (TxnEnd(commit_lsn, end_lsn, txn.seq, txn.commit_ts_us, streamed),)

    def _replay_stream(self, sc: m.StreamCommit) -> Iterator[Out]:
        self.txn = self._new_txn(sc.xid, sc.commit_lsn, sc.commit_ts_us, sc.commit_lsn)
        try:
            for msg in self.spill.replay(sc.xid):
                yield from self._in_txn(msg, sc.commit_lsn)
            yield from self._end_txn(sc.commit_lsn, sc.end_lsn, sc.commit_lsn, streamed=True)
        finally:
            self.spill.discard(sc.xid)

    def _in_txn(self, msg: m.Message, lsn: int) -> Iterable[Out]:
        if self.observer is not None:
            self.observer.message(msg, self.txn)
        match msg:
            case m.Insert():
                return self._change("c", msg.relation_oid, None, msg.new, lsn)
            case m.Update():
                return self._change("u", msg.relation_oid, msg.old, msg.new, lsn, msg.old_kind)
            case m.Delete():
                return self._change("d", msg.relation_oid, msg.old, None, lsn, msg.old_kind)
            case m.Relation():
                self._define(msg)
                return ()
            case m.Type():
                return ()
            case m.Origin():
                if self.txn is not None:
                    self.txn.origin = f"pg-origin:{msg.name}"
                return ()
            case m.LogicalMessage():
                if (
                    msg.transactional
                    and self.txn is not None
                    and msg.prefix == ORIGIN_MESSAGE_PREFIX
                ):
                    self.txn.origin = msg.content.decode("utf-8", errors="replace")
                return ()
            case m.Truncate():
                return self._truncate(msg, lsn)
            case (
                m.BeginPrepare()
                | m.Prepare()
                | m.CommitPrepared()
                | m.RollbackPrepared()
                | m.StreamPrepare()
            ):
                raise DecodeError(
                    f"two-phase message {type(msg).__name__} received but two_phase is never enabled",
                    lsn=lsn,
                )
            case _:
                raise DecodeError(f"unexpected {type(msg).__name__} inside a transaction", lsn=lsn)

    def _next_seq(self, lsn: int) -> tuple[_Txn, int, bool]:
        txn = self.txn
        if txn is None:
            raise DecodeError("row change outside a transaction", lsn=lsn)
        seq = txn.seq
        txn.seq += 1
        return txn, seq, seq <= txn.skip_through

    def _source(self, st: TableState, txn: _Txn, seq: int, lsn: int) -> Source:
        """The Source of the table's events in this transaction.  Made once per transaction
        and table (and again when the origin changes); its lsn and seq are those of the
        event it was made for: the codec is given each event's own."""
        src = st.source
        if src is not None and st.source_txn is txn and src.origin == txn.origin:
            return src
        src = new_source(self.db, st.relation, txn, seq, lsn)
        st.source, st.source_txn = src, txn
        return src

    def _change(
        self,
        op: str,
        oid: int,
        before: m.TupleData | None,
        after: m.TupleData | None,
        lsn: int,
        old_kind: m.OldTupleKind | None = None,
    ) -> list[Out]:
        st = self.tables.get(oid)
        if st is None:
            st = self.table(oid, lsn)  # raises, naming the relation
        txn, seq, skip = self._next_seq(lsn)
        if skip:
            return []
        key, value = st.codec.encode_change(
            op,
            before,
            after,
            self._source(st, txn, seq, lsn),
            self.clock_us(),
            before_kind="full" if old_kind == _FULL else "key",
            lsn=lsn,
            seq=seq,
        )
        out: list[Out] = []
        self._emit(out, st, txn, seq, key, value)
        return out

    @staticmethod
    def _emit(
        out: list[Out], st: TableState, txn: _Txn, seq: int, key: bytes | None, value: bytes
    ) -> None:
        """Append the table's not yet published schemas, then the event at (commit_lsn, seq)."""
        if st.pending_schemas:
            out.extend(st.pending_schemas)
            st.pending_schemas = []
        header = [(POSITION_HEADER, position_header(txn.commit_lsn, seq))]
        out.append(OutEvent(st.topic, key, value, txn.commit_lsn, seq, header, txn.commit_ts_us))

    def _truncate(self, msg: m.Truncate, lsn: int) -> list[Out]:
        out: list[Out] = []
        for oid in msg.relation_oids:
            st = self.table(oid, lsn)
            txn, seq, skip = self._next_seq(lsn)
            if skip:
                continue
            value = st.codec.encode_truncate(
                new_source(self.db, st.relation, txn, seq, lsn), self.clock_us()
            )
            self._emit(out, st, txn, seq, None, value)
        return out

    @property
    def idle(self) -> bool:
        """No transaction is open (streamed ones may be pending in the spill store)."""
        return self.txn is None and self.stream_xid is None
