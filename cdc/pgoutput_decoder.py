"""Pure decoder for PostgreSQL's ``pgoutput`` logical replication protocol.

What it decodes
---------------
A walsender streams logical changes inside ``XLogData`` (``'w'``) messages of
the streaming replication protocol.  The caller strips the 25-byte ``'w'``
header (``'w'``, WAL start, WAL end, send time) and hands the rest, one
pgoutput message, to :meth:`PgOutputDecoder.decode` together with the WAL start
LSN, which is used only to name the position in errors.  Messages carry no WAL
position of their own: the caller already has it.

The wire format is PostgreSQL's "Logical Replication Message Formats"
(``src/backend/replication/logical/proto.c``): one type byte, then big-endian
fixed-width integers (``Int8/16/32/64``), NUL-terminated strings and length
prefixed byte strings.  Protocol versions:

1. transactions (``B``/``C``), ``O`` origin, ``R`` relation, ``Y`` type,
   ``I``/``U``/``D``/``T`` changes, ``M`` logical decoding messages;
2. streaming of in-progress transactions: ``S`` stream start, ``E`` stream
   stop, ``c`` stream commit, ``A`` stream abort.  Between stream start and
   stop every ``R``/``Y``/``I``/``U``/``D``/``T``/``M`` message carries the
   xid of its (sub)transaction right after the type byte, and only there;
3. two-phase commit: ``b`` begin prepare, ``P`` prepare, ``K`` commit
   prepared, ``r`` rollback prepared, ``p`` stream prepare;
4. with ``streaming = parallel`` a stream abort also carries the abort LSN
   and timestamp.

Values are exposed decoded: text columns (``'t'``) as ``str`` (the connection
must use ``client_encoding = UTF8``, which is what PostgreSQL converts text to),
binary columns (``'b'``) as ``bytes``, SQL NULL (``'n'``) as ``None`` and an
unchanged TOASTed value that PostgreSQL did not send (``'u'``) as the sentinel
:data:`UNCHANGED_TOAST` -- never ``None``, so NULL stays distinct from "not
sent".  Timestamps are converted from the PostgreSQL epoch (2000-01-01) to
microseconds since the Unix epoch.  An empty namespace in ``R``/``Y`` means
``pg_catalog`` and is reported as such, as PostgreSQL's own reader does.

Strictness
----------
Nothing is skipped or guessed: an unknown type byte, an unknown column kind or
flag bit, a truncated message, trailing bytes, invalid UTF-8, or a message
that the protocol version or the current state does not allow (a stream
message with protocol 1, Stream Stop outside a stream block, Begin inside one)
raises :class:`~cdc.errors.DecodeError` naming the message byte and the LSN.
The decoder tracks only the stream block state (:attr:`PgOutputDecoder.in_stream`),
which changes only when a Stream Start/Stop message decodes without error;
pairing of Begin/Commit is left to the caller.

Concurrency model
-----------------
No I/O, no threads, no global mutable state.  A decoder instance holds the
stream state of one replication connection and must be used by one thread at a
time; separate instances are independent.  All returned messages are immutable.

Speed
-----
Hot paths use precompiled :class:`struct.Struct` unpackers on the whole
buffer, one dispatch table per stream state indexed by the type byte, and
build the immutable message objects through their slot descriptors (which
skips the frozen-dataclass ``__setattr__`` detour but yields ordinary
instances).  Bounds are checked once per message: every read either raises on
short data or advances a position that must end exactly at the buffer's end.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

from cdc.errors import DecodeError

__all__ = [
    "PG_EPOCH_OFFSET_US",
    "UNCHANGED_TOAST",
    "Begin",
    "BeginPrepare",
    "ColumnValue",
    "Commit",
    "CommitPrepared",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "MessageType",
    "OldTupleKind",
    "Origin",
    "PgOutputDecoder",
    "Prepare",
    "Relation",
    "RelationColumn",
    "ReplicaIdentity",
    "RollbackPrepared",
    "StreamAbort",
    "StreamCommit",
    "StreamPrepare",
    "StreamStart",
    "StreamStop",
    "Truncate",
    "TupleData",
    "Type",
    "Unchanged",
    "Update",
]

#: Microseconds from 1970-01-01 (Unix epoch) to 2000-01-01 (PostgreSQL epoch).
PG_EPOCH_OFFSET_US = 946_684_800_000_000

#: Lowest protocol version with streaming, two-phase, and parallel stream abort info.
_STREAM_VERSION = 2
_TWO_PHASE_VERSION = 3
_PARALLEL_VERSION = 4
_MAX_VERSION = 4


class MessageType(enum.IntEnum):
    """The closed set of pgoutput message type bytes."""

    BEGIN = ord("B")
    COMMIT = ord("C")
    ORIGIN = ord("O")
    RELATION = ord("R")
    TYPE = ord("Y")
    INSERT = ord("I")
    UPDATE = ord("U")
    DELETE = ord("D")
    TRUNCATE = ord("T")
    MESSAGE = ord("M")
    STREAM_START = ord("S")
    STREAM_STOP = ord("E")
    STREAM_COMMIT = ord("c")
    STREAM_ABORT = ord("A")
    BEGIN_PREPARE = ord("b")
    PREPARE = ord("P")
    COMMIT_PREPARED = ord("K")
    ROLLBACK_PREPARED = ord("r")
    STREAM_PREPARE = ord("p")


class ReplicaIdentity(enum.StrEnum):
    """``pg_class.relreplident`` as sent in a Relation message."""

    DEFAULT = "d"  # primary key
    NOTHING = "n"
    FULL = "f"  # all columns
    INDEX = "i"  # a chosen unique index


class OldTupleKind(enum.StrEnum):
    """Which old tuple an Update/Delete carries."""

    KEY = "K"  # replica identity columns only (the rest are NULL)
    FULL = "O"  # the whole old row (REPLICA IDENTITY FULL)


class Unchanged(enum.Enum):
    """Sentinel for a column value PostgreSQL did not send."""

    TOAST = "u"  # unchanged TOASTed value

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


#: A column whose unchanged TOASTed value was not sent (kind ``'u'``).
UNCHANGED_TOAST = Unchanged.TOAST

#: ``None`` is SQL NULL; ``str`` a text-format value; ``bytes`` a binary-format value.
ColumnValue: TypeAlias = str | bytes | Unchanged | None
TupleData: TypeAlias = tuple[ColumnValue, ...]


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Begin:
    message_type: ClassVar[MessageType] = MessageType.BEGIN
    final_lsn: int
    commit_ts_us: int
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    message_type: ClassVar[MessageType] = MessageType.COMMIT
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts_us: int


@dataclass(frozen=True, slots=True)
class Origin:
    message_type: ClassVar[MessageType] = MessageType.ORIGIN
    origin_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    name: str
    type_oid: int
    type_modifier: int  # atttypmod, -1 when none
    is_key: bool  # part of the replica identity


@dataclass(frozen=True, slots=True)
class Relation:
    message_type: ClassVar[MessageType] = MessageType.RELATION
    xid: int | None
    oid: int
    namespace: str
    name: str
    replica_identity: ReplicaIdentity
    columns: tuple[RelationColumn, ...]


@dataclass(frozen=True, slots=True)
class Type:
    message_type: ClassVar[MessageType] = MessageType.TYPE
    xid: int | None
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    message_type: ClassVar[MessageType] = MessageType.INSERT
    xid: int | None
    relation_oid: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    message_type: ClassVar[MessageType] = MessageType.UPDATE
    xid: int | None
    relation_oid: int
    old: TupleData | None
    old_kind: OldTupleKind | None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    message_type: ClassVar[MessageType] = MessageType.DELETE
    xid: int | None
    relation_oid: int
    old: TupleData
    old_kind: OldTupleKind


@dataclass(frozen=True, slots=True)
class Truncate:
    message_type: ClassVar[MessageType] = MessageType.TRUNCATE
    xid: int | None
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    message_type: ClassVar[MessageType] = MessageType.MESSAGE
    xid: int | None
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class StreamStart:
    message_type: ClassVar[MessageType] = MessageType.STREAM_START
    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    message_type: ClassVar[MessageType] = MessageType.STREAM_STOP


@dataclass(frozen=True, slots=True)
class StreamCommit:
    message_type: ClassVar[MessageType] = MessageType.STREAM_COMMIT
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts_us: int


@dataclass(frozen=True, slots=True)
class StreamAbort:
    message_type: ClassVar[MessageType] = MessageType.STREAM_ABORT
    xid: int
    subxid: int  # equals xid when the whole transaction aborted
    abort_lsn: int | None  # only with parallel streaming (protocol 4)
    abort_ts_us: int | None  # only with parallel streaming (protocol 4)


@dataclass(frozen=True, slots=True)
class BeginPrepare:
    message_type: ClassVar[MessageType] = MessageType.BEGIN_PREPARE
    prepare_lsn: int
    end_lsn: int
    prepare_ts_us: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class Prepare:
    message_type: ClassVar[MessageType] = MessageType.PREPARE
    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_ts_us: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class CommitPrepared:
    message_type: ClassVar[MessageType] = MessageType.COMMIT_PREPARED
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts_us: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class RollbackPrepared:
    message_type: ClassVar[MessageType] = MessageType.ROLLBACK_PREPARED
    flags: int
    prepare_end_lsn: int
    rollback_end_lsn: int
    prepare_ts_us: int
    rollback_ts_us: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class StreamPrepare:
    message_type: ClassVar[MessageType] = MessageType.STREAM_PREPARE
    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_ts_us: int
    xid: int
    gid: str


Message: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
    | BeginPrepare
    | Prepare
    | CommitPrepared
    | RollbackPrepared
    | StreamPrepare
)

_MESSAGE_NAMES: dict[int, str] = {
    MessageType.BEGIN: "Begin",
    MessageType.COMMIT: "Commit",
    MessageType.ORIGIN: "Origin",
    MessageType.RELATION: "Relation",
    MessageType.TYPE: "Type",
    MessageType.INSERT: "Insert",
    MessageType.UPDATE: "Update",
    MessageType.DELETE: "Delete",
    MessageType.TRUNCATE: "Truncate",
    MessageType.MESSAGE: "Message",
    MessageType.STREAM_START: "Stream Start",
    MessageType.STREAM_STOP: "Stream Stop",
    MessageType.STREAM_COMMIT: "Stream Commit",
    MessageType.STREAM_ABORT: "Stream Abort",
    MessageType.BEGIN_PREPARE: "Begin Prepare",
    MessageType.PREPARE: "Prepare",
    MessageType.COMMIT_PREPARED: "Commit Prepared",
    MessageType.ROLLBACK_PREPARED: "Rollback Prepared",
    MessageType.STREAM_PREPARE: "Stream Prepare",
}


# --------------------------------------------------------------------------- low level

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U32_U32 = struct.Struct(">II").unpack_from
_U32_I32 = struct.Struct(">Ii").unpack_from
_U32_U8 = struct.Struct(">IB").unpack_from
_U32_U32_U8 = struct.Struct(">IIB").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_U64_Q_I32 = struct.Struct(">QqI").unpack_from  # Begin
_U8_Q_Q_q = struct.Struct(">BQQq").unpack_from  # Commit
_U32_U8_Q_Q_q = struct.Struct(">IBQQq").unpack_from  # Stream Commit
_Q_q = struct.Struct(">Qq").unpack_from
_Q_Q_q_I = struct.Struct(">QQqI").unpack_from  # Begin Prepare
_U8_Q_Q_q_I = struct.Struct(">BQQqI").unpack_from  # Prepare, Commit Prepared, Stream Prepare
_U8_Q_Q_q_q_I = struct.Struct(">BQQqqI").unpack_from  # Rollback Prepared

_KIND_TEXT = ord("t")
_KIND_NULL = ord("n")
_KIND_UNCHANGED = ord("u")
_KIND_BINARY = ord("b")
_NEW = ord("N")
_OLD_KEY = ord("K")
_OLD_FULL = ord("O")

_REPLICA_IDENTITIES: dict[int, ReplicaIdentity] = {ord(r.value): r for r in ReplicaIdentity}
_RELATION_COLUMN_KEY_FLAG = 1
_MESSAGE_TRANSACTIONAL_FLAG = 1
_TRUNCATE_CASCADE_FLAG = 1
_TRUNCATE_RESTART_IDENTITY_FLAG = 2

_OLD_KINDS: dict[int, OldTupleKind] = {_OLD_KEY: OldTupleKind.KEY, _OLD_FULL: OldTupleKind.FULL}


class _Malformed(Exception):
    """Raised inside a message handler; :meth:`PgOutputDecoder.decode` adds the context."""


def _byte_repr(value: int) -> str:
    return f"0x{value:02x} ({chr(value)!r})" if 32 <= value < 127 else f"0x{value:02x}"


def _cstring(buf: bytes, pos: int, what: str) -> tuple[str, int]:
    """Read a NUL-terminated UTF-8 string at ``pos``; return it and the position after it."""
    end = buf.find(0, pos)
    if end < 0:
        raise _Malformed(f"truncated: {what} has no terminating NUL")
    try:
        return buf[pos:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise _Malformed(f"{what} is not valid UTF-8 ({exc.reason})") from None


def _namespace(buf: bytes, pos: int) -> tuple[str, int]:
    namespace, pos = _cstring(buf, pos, "namespace")
    return namespace or "pg_catalog", pos


def _read_tuple(buf: bytes, pos: int) -> tuple[TupleData, int]:
    """Read TupleData at ``pos``: Int16 column count, then one kind byte (+ value) per column."""
    (count,) = _U16(buf, pos)
    pos += 2
    values: list[ColumnValue] = []
    append = values.append
    end = pos
    # module constants bound to locals: the loop runs once per column of every change
    text, null, unchanged, u32 = _KIND_TEXT, _KIND_NULL, _KIND_UNCHANGED, _U32
    try:
        for _ in range(count):
            kind = buf[pos]
            if kind == text:
                (size,) = u32(buf, pos + 1)
                pos += 5
                end = pos + size
                append(buf[pos:end].decode())
                pos = end
            elif kind == null:
                append(None)
                pos += 1
            elif kind == unchanged:
                append(UNCHANGED_TOAST)
                pos += 1
            elif kind == _KIND_BINARY:
                (size,) = _U32(buf, pos + 1)
                pos += 5
                end = pos + size
                append(buf[pos:end])
                pos = end
            else:
                raise _Malformed(
                    f"unknown tuple column kind {_byte_repr(kind)} in column {len(values)} "
                    "(expected 't', 'b', 'n' or 'u')"
                )
    except UnicodeDecodeError as exc:
        if end > len(buf):
            raise _Malformed(f"truncated in column {len(values)}") from None
        raise _Malformed(
            f"text value of column {len(values)} is not valid UTF-8 ({exc.reason}); "
            "is the connection's client_encoding UTF8?"
        ) from None
    return tuple(values), pos


# Building frozen slotted dataclasses through their member descriptors skips the
# per-field object.__setattr__ call of the generated __init__ (about 2x faster for
# the messages that dominate a change stream).  The result is an ordinary instance.
_new = object.__new__


def _slot_setter(cls: type, name: str) -> Callable[[object, object], None]:
    descriptor: Any = cls.__dict__[name]
    setter: Callable[[object, object], None] = descriptor.__set__
    return setter


_insert_xid = _slot_setter(Insert, "xid")
_insert_rel = _slot_setter(Insert, "relation_oid")
_insert_new = _slot_setter(Insert, "new")


_update_xid = _slot_setter(Update, "xid")
_update_rel = _slot_setter(Update, "relation_oid")
_update_old = _slot_setter(Update, "old")
_update_old_kind = _slot_setter(Update, "old_kind")
_update_new = _slot_setter(Update, "new")
_delete_xid = _slot_setter(Delete, "xid")
_delete_rel = _slot_setter(Delete, "relation_oid")
_delete_old = _slot_setter(Delete, "old")
_delete_old_kind = _slot_setter(Delete, "old_kind")


def _make_insert(xid: int | None, relation_oid: int, new: TupleData) -> Insert:
    msg: Insert = _new(Insert)
    _insert_xid(msg, xid)
    _insert_rel(msg, relation_oid)
    _insert_new(msg, new)
    return msg


def _make_update(
    xid: int | None,
    relation_oid: int,
    old: TupleData | None,
    old_kind: OldTupleKind | None,
    new: TupleData,
) -> Update:
    msg: Update = _new(Update)
    _update_xid(msg, xid)
    _update_rel(msg, relation_oid)
    _update_old(msg, old)
    _update_old_kind(msg, old_kind)
    _update_new(msg, new)
    return msg


def _make_delete(
    xid: int | None, relation_oid: int, old: TupleData, old_kind: OldTupleKind
) -> Delete:
    msg: Delete = _new(Delete)
    _delete_xid(msg, xid)
    _delete_rel(msg, relation_oid)
    _delete_old(msg, old)
    _delete_old_kind(msg, old_kind)
    return msg


# --------------------------------------------------------------------------- decoder

_Handler: TypeAlias = Callable[[bytes], tuple[Message, int]]


class PgOutputDecoder:
    """Decode pgoutput messages of one replication connection.

    ``proto_version`` and ``parallel_streaming`` must match the
    ``START_REPLICATION ... (proto_version '…', streaming 'parallel')`` options
    the connection was started with: they decide which messages may appear and
    whether a Stream Abort carries its LSN and timestamp.
    """

    __slots__ = ("_in_stream", "_outside_table", "_parallel", "_proto", "_stream_table", "_table")

    def __init__(self, proto_version: int, *, parallel_streaming: bool = False) -> None:
        if not 1 <= proto_version <= _MAX_VERSION:
            raise ValueError(
                f"unsupported pgoutput proto_version {proto_version!r} (supported: 1 to {_MAX_VERSION})"
            )
        if parallel_streaming and proto_version < _PARALLEL_VERSION:
            raise ValueError(
                f"parallel_streaming needs pgoutput proto_version {_PARALLEL_VERSION}, got {proto_version}"
            )
        self._proto = proto_version
        self._parallel = parallel_streaming
        self._in_stream = False
        self._outside_table = self._build_table(in_stream=False)
        self._stream_table = self._build_table(in_stream=True)
        self._table = self._outside_table

    @property
    def proto_version(self) -> int:
        return self._proto

    @property
    def parallel_streaming(self) -> bool:
        return self._parallel

    @property
    def in_stream(self) -> bool:
        """True between a Stream Start and its Stream Stop."""
        return self._in_stream

    def decode(self, data: bytes | memoryview, lsn: int) -> Message:
        """Decode one pgoutput message (an XLogData payload) received at WAL position ``lsn``.

        Raises :class:`DecodeError` naming the message byte and ``lsn`` when the
        message is unknown, malformed, or not allowed here.
        """
        buf = data if type(data) is bytes else bytes(data)
        try:
            msg, pos = self._table[buf[0]](buf)
        except (struct.error, IndexError):
            if not buf:
                raise DecodeError("empty pgoutput message", lsn=lsn) from None
            raise DecodeError(
                f"truncated {_message_name(buf[0])} message ({len(buf)} bytes)",
                lsn=lsn,
                byte=buf[0],
            ) from None
        except _Malformed as exc:
            name = _MESSAGE_NAMES.get(buf[0])
            text = f"{name} message: {exc}" if name else str(exc)
            raise DecodeError(text, lsn=lsn, byte=buf[0]) from None
        if pos != len(buf):
            raise self._length_error(buf, pos, lsn)
        return msg

    # ----------------------------------------------------------------- dispatch tables

    def _build_table(self, *, in_stream: bool) -> tuple[_Handler, ...]:
        handlers: dict[int, _Handler] = {
            MessageType.ORIGIN: self._origin,
            MessageType.RELATION: self._relation,
            MessageType.TYPE: self._type,
            MessageType.INSERT: self._insert_stream if in_stream else self._insert,
            MessageType.UPDATE: self._update,
            MessageType.DELETE: self._delete,
            MessageType.TRUNCATE: self._truncate,
            MessageType.MESSAGE: self._message,
        }
        outside_only: dict[int, _Handler] = {
            MessageType.BEGIN: self._begin,
            MessageType.COMMIT: self._commit,
            MessageType.STREAM_START: self._stream_start,
            MessageType.STREAM_COMMIT: self._stream_commit,
            MessageType.STREAM_ABORT: self._stream_abort,
            MessageType.BEGIN_PREPARE: self._begin_prepare,
            MessageType.PREPARE: self._prepare,
            MessageType.COMMIT_PREPARED: self._commit_prepared,
            MessageType.ROLLBACK_PREPARED: self._rollback_prepared,
            MessageType.STREAM_PREPARE: self._stream_prepare,
        }
        for byte, handler in outside_only.items():
            handlers[byte] = (
                _rejecter(
                    f"{_MESSAGE_NAMES[byte]} message inside a stream block (after Stream Start)"
                )
                if in_stream
                else handler
            )
        handlers[MessageType.STREAM_STOP] = (
            self._stream_stop
            if in_stream
            else _rejecter("Stream Stop message outside a stream block (no Stream Start before it)")
        )
        minimum_version = {
            MessageType.STREAM_START: _STREAM_VERSION,
            MessageType.STREAM_STOP: _STREAM_VERSION,
            MessageType.STREAM_COMMIT: _STREAM_VERSION,
            MessageType.STREAM_ABORT: _STREAM_VERSION,
            MessageType.BEGIN_PREPARE: _TWO_PHASE_VERSION,
            MessageType.PREPARE: _TWO_PHASE_VERSION,
            MessageType.COMMIT_PREPARED: _TWO_PHASE_VERSION,
            MessageType.ROLLBACK_PREPARED: _TWO_PHASE_VERSION,
            MessageType.STREAM_PREPARE: _TWO_PHASE_VERSION,
        }
        for byte, version in minimum_version.items():
            if self._proto < version:
                handlers[byte] = _rejecter(
                    f"{_MESSAGE_NAMES[byte]} message needs pgoutput protocol version "
                    f"{version} or later, but the decoder was set up for version {self._proto}"
                )
        return tuple(handlers.get(byte, _unknown) for byte in range(256))

    def _xid(self, buf: bytes) -> tuple[int | None, int]:
        """The leading xid of a change message (only inside a stream block) and the next position."""
        if self._in_stream:
            return _U32(buf, 1)[0], 5
        return None, 1

    def _set_stream(self, in_stream: bool) -> None:
        self._in_stream = in_stream
        self._table = self._stream_table if in_stream else self._outside_table

    # ----------------------------------------------------------------- transactions

    def _begin(self, buf: bytes) -> tuple[Message, int]:
        final_lsn, ts, xid = _U64_Q_I32(buf, 1)
        return Begin(final_lsn, ts + PG_EPOCH_OFFSET_US, xid), 21

    def _commit(self, buf: bytes) -> tuple[Message, int]:
        flags, commit_lsn, end_lsn, ts = _U8_Q_Q_q(buf, 1)
        return Commit(flags, commit_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US), 26

    def _origin(self, buf: bytes) -> tuple[Message, int]:
        (origin_lsn,) = _U64(buf, 1)
        name, pos = _cstring(buf, 9, "origin name")
        return Origin(origin_lsn, name), pos

    # ----------------------------------------------------------------- metadata

    def _relation(self, buf: bytes) -> tuple[Message, int]:
        xid, pos = self._xid(buf)
        (oid,) = _U32(buf, pos)
        namespace, pos = _namespace(buf, pos + 4)
        name, pos = _cstring(buf, pos, "relation name")
        ident_byte = buf[pos]
        identity = _REPLICA_IDENTITIES.get(ident_byte)
        if identity is None:
            raise _Malformed(
                f"unknown replica identity {_byte_repr(ident_byte)} for relation {namespace}.{name} "
                "(expected 'd', 'n', 'f' or 'i')"
            )
        (count,) = _U16(buf, pos + 1)
        pos += 3
        columns = []
        for index in range(count):
            flags = buf[pos]
            if flags & ~_RELATION_COLUMN_KEY_FLAG:
                raise _Malformed(
                    f"unknown flags 0x{flags:02x} on column {index} of {namespace}.{name}"
                )
            column_name, pos = _cstring(
                buf, pos + 1, f"name of column {index} of {namespace}.{name}"
            )
            type_oid, type_modifier = _U32_I32(buf, pos)
            pos += 8
            columns.append(RelationColumn(column_name, type_oid, type_modifier, bool(flags)))
        return Relation(xid, oid, namespace, name, identity, tuple(columns)), pos

    def _type(self, buf: bytes) -> tuple[Message, int]:
        xid, pos = self._xid(buf)
        (oid,) = _U32(buf, pos)
        namespace, pos = _namespace(buf, pos + 4)
        name, pos = _cstring(buf, pos, "type name")
        return Type(xid, oid, namespace, name), pos

    # ----------------------------------------------------------------- changes

    def _insert(self, buf: bytes) -> tuple[Message, int]:
        relation_oid, marker = _U32_U8(buf, 1)
        if marker != _NEW:
            raise _Malformed(f"expected new tuple marker 'N', got {_byte_repr(marker)}")
        new, pos = _read_tuple(buf, 6)
        return _make_insert(None, relation_oid, new), pos

    def _insert_stream(self, buf: bytes) -> tuple[Message, int]:
        xid, relation_oid, marker = _U32_U32_U8(buf, 1)
        if marker != _NEW:
            raise _Malformed(f"expected new tuple marker 'N', got {_byte_repr(marker)}")
        new, pos = _read_tuple(buf, 10)
        return _make_insert(xid, relation_oid, new), pos

    def _update(self, buf: bytes) -> tuple[Message, int]:
        xid, pos = self._xid(buf)
        relation_oid, marker = _U32_U8(buf, pos)
        pos += 5
        old: TupleData | None = None
        old_kind = _OLD_KINDS.get(marker)
        if old_kind is not None:
            old, pos = _read_tuple(buf, pos)
            marker = buf[pos]
            pos += 1
        if marker != _NEW:
            expected = "'N'" if old_kind is not None else "'K', 'O' or 'N'"
            raise _Malformed(f"expected tuple marker {expected}, got {_byte_repr(marker)}")
        new, pos = _read_tuple(buf, pos)
        return _make_update(xid, relation_oid, old, old_kind, new), pos

    def _delete(self, buf: bytes) -> tuple[Message, int]:
        xid, pos = self._xid(buf)
        relation_oid, marker = _U32_U8(buf, pos)
        old_kind = _OLD_KINDS.get(marker)
        if old_kind is None:
            raise _Malformed(f"expected old tuple marker 'K' or 'O', got {_byte_repr(marker)}")
        old, pos = _read_tuple(buf, pos + 5)
        return _make_delete(xid, relation_oid, old, old_kind), pos

    def _truncate(self, buf: bytes) -> tuple[Message, int]:
        xid, pos = self._xid(buf)
        count, flags = _U32_U8(buf, pos)
        pos += 5
        if flags & ~(_TRUNCATE_CASCADE_FLAG | _TRUNCATE_RESTART_IDENTITY_FLAG):
            raise _Malformed(f"unknown truncate flags 0x{flags:02x}")
        if pos + 4 * count > len(buf):
            raise _Malformed(
                f"truncated: {count} relation oids announced, {len(buf) - pos} bytes left"
            )
        oids = struct.unpack_from(f">{count}I", buf, pos)
        return Truncate(
            xid,
            oids,
            bool(flags & _TRUNCATE_CASCADE_FLAG),
            bool(flags & _TRUNCATE_RESTART_IDENTITY_FLAG),
        ), pos + 4 * count

    def _message(self, buf: bytes) -> tuple[Message, int]:
        xid, pos = self._xid(buf)
        flags = buf[pos]
        if flags & ~_MESSAGE_TRANSACTIONAL_FLAG:
            raise _Malformed(f"unknown logical message flags 0x{flags:02x}")
        (message_lsn,) = _U64(buf, pos + 1)
        prefix, pos = _cstring(buf, pos + 9, "message prefix")
        (size,) = _U32(buf, pos)
        pos += 4
        end = pos + size
        if end > len(buf):
            raise _Malformed(f"truncated: content of {size} bytes announced, {len(buf) - pos} left")
        return LogicalMessage(
            xid, bool(flags & _MESSAGE_TRANSACTIONAL_FLAG), message_lsn, prefix, buf[pos:end]
        ), end

    # ----------------------------------------------------------------- streaming (v2+)

    def _stream_start(self, buf: bytes) -> tuple[Message, int]:
        xid, first = _U32_U8(buf, 1)
        if first > 1:
            raise _Malformed(f"first-segment flag must be 0 or 1, got {first}")
        _expect_end(buf, 6)
        self._set_stream(True)
        return StreamStart(xid, first == 1), 6

    def _stream_stop(self, buf: bytes) -> tuple[Message, int]:
        _expect_end(buf, 1)
        self._set_stream(False)
        return StreamStop(), 1

    def _stream_commit(self, buf: bytes) -> tuple[Message, int]:
        xid, flags, commit_lsn, end_lsn, ts = _U32_U8_Q_Q_q(buf, 1)
        return StreamCommit(xid, flags, commit_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US), 30

    def _stream_abort(self, buf: bytes) -> tuple[Message, int]:
        xid, subxid = _U32_U32(buf, 1)
        if not self._parallel:
            return StreamAbort(xid, subxid, None, None), 9
        abort_lsn, ts = _Q_q(buf, 9)
        return StreamAbort(xid, subxid, abort_lsn, ts + PG_EPOCH_OFFSET_US), 25

    # ----------------------------------------------------------------- two-phase (v3+)

    def _begin_prepare(self, buf: bytes) -> tuple[Message, int]:
        prepare_lsn, end_lsn, ts, xid = _Q_Q_q_I(buf, 1)
        gid, pos = _cstring(buf, 29, "gid")
        return BeginPrepare(prepare_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US, xid, gid), pos

    def _prepare(self, buf: bytes) -> tuple[Message, int]:
        flags, prepare_lsn, end_lsn, ts, xid = _U8_Q_Q_q_I(buf, 1)
        gid, pos = _cstring(buf, 30, "gid")
        return Prepare(flags, prepare_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US, xid, gid), pos

    def _commit_prepared(self, buf: bytes) -> tuple[Message, int]:
        flags, commit_lsn, end_lsn, ts, xid = _U8_Q_Q_q_I(buf, 1)
        gid, pos = _cstring(buf, 30, "gid")
        return CommitPrepared(flags, commit_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US, xid, gid), pos

    def _rollback_prepared(self, buf: bytes) -> tuple[Message, int]:
        flags, prepare_end_lsn, rollback_end_lsn, prepare_ts, rollback_ts, xid = _U8_Q_Q_q_q_I(
            buf, 1
        )
        gid, pos = _cstring(buf, 38, "gid")
        return RollbackPrepared(
            flags,
            prepare_end_lsn,
            rollback_end_lsn,
            prepare_ts + PG_EPOCH_OFFSET_US,
            rollback_ts + PG_EPOCH_OFFSET_US,
            xid,
            gid,
        ), pos

    def _stream_prepare(self, buf: bytes) -> tuple[Message, int]:
        flags, prepare_lsn, end_lsn, ts, xid = _U8_Q_Q_q_I(buf, 1)
        gid, pos = _cstring(buf, 30, "gid")
        return StreamPrepare(flags, prepare_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US, xid, gid), pos

    # ----------------------------------------------------------------- errors

    @staticmethod
    def _length_error(buf: bytes, pos: int, lsn: int) -> DecodeError:
        name = _message_name(buf[0])
        if pos > len(buf):
            return DecodeError(
                f"truncated {name} message ({len(buf)} bytes, at least {pos} expected)",
                lsn=lsn,
                byte=buf[0],
            )
        return DecodeError(
            f"{len(buf) - pos} unexpected trailing bytes after {name} message (of {len(buf)} bytes)",
            lsn=lsn,
            byte=buf[0],
        )


def _message_name(byte: int) -> str:
    return _MESSAGE_NAMES.get(byte, "unknown")


def _expect_end(buf: bytes, pos: int) -> None:
    if pos < len(buf):
        raise _Malformed(f"{len(buf) - pos} unexpected trailing bytes")


def _unknown(buf: bytes) -> tuple[Message, int]:
    raise _Malformed(
        f"unknown pgoutput message type {_byte_repr(buf[0])}; "
        "is the server newer than the decoder's protocol version?"
    )


def _rejecter(reason: str) -> _Handler:
    def reject(buf: bytes) -> tuple[Message, int]:
        raise _Malformed(f"not allowed here: {reason}")

    return reject
