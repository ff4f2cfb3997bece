"""The wire level of ``pgoutput``: integers, strings and tuples read from one message, and
the messages whose reading needs no decoder state (pure, no I/O).

The wire format is PostgreSQL's "Logical Replication Message Formats"
(``src/backend/replication/logical/proto.c``): one type byte, then big-endian fixed-width
integers (``Int8/16/32/64``), NUL-terminated strings and length prefixed byte strings.
A reader here raises :class:`Malformed` (or ``struct.error``/``IndexError`` on short data);
:meth:`cdc.pgoutput_decoder.PgOutputDecoder.decode` turns either into a
:class:`~cdc.errors.DecodeError` naming the message byte and the LSN.  Each ``read_*``
message reader returns the message and the position after it, which must be the buffer's end.

Speed: precompiled :class:`struct.Struct` unpackers on the whole buffer; the messages that
dominate a stream (Begin, Commit and the row changes) are built through their slot
descriptors (:func:`make_insert` and friends), which skips the frozen-dataclass
``__setattr__`` detour but yields ordinary instances.

Concurrency: plain functions over immutable input.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

from cdc.pgoutput_messages import (
    PG_EPOCH_OFFSET_US,
    UNCHANGED_TOAST,
    Begin,
    BeginPrepare,
    ColumnValue,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    Message,
    OldTupleKind,
    Origin,
    Prepare,
    ReplicaIdentity,
    RollbackPrepared,
    StreamCommit,
    StreamPrepare,
    TupleData,
    Update,
)

U16: Final = struct.Struct(">H").unpack_from
U32: Final = struct.Struct(">I").unpack_from
U32_U32: Final = struct.Struct(">II").unpack_from
U32_I32: Final = struct.Struct(">Ii").unpack_from
U32_U8: Final = struct.Struct(">IB").unpack_from
U32_U32_U8: Final = struct.Struct(">IIB").unpack_from
U64: Final = struct.Struct(">Q").unpack_from
_U64_Q_I32: Final = struct.Struct(">QqI").unpack_from  # Begin
_U8_Q_Q_q: Final = struct.Struct(">BQQq").unpack_from  # Commit
_U32_U8_Q_Q_q: Final = struct.Struct(">IBQQq").unpack_from  # Stream Commit
Q_q: Final = struct.Struct(">Qq").unpack_from
_Q_Q_q_I: Final = struct.Struct(">QQqI").unpack_from  # Begin Prepare
_U8_Q_Q_q_I: Final = struct.Struct(">BQQqI").unpack_from  # Prepare, Commit Prepared, Stream Prepare
_U8_Q_Q_q_q_I: Final = struct.Struct(">BQQqqI").unpack_from  # Rollback Prepared

_KIND_TEXT: Final = ord("t")
_KIND_NULL: Final = ord("n")
_KIND_UNCHANGED: Final = ord("u")
_KIND_BINARY: Final = ord("b")
NEW_TUPLE: Final = ord("N")
_OLD_KEY: Final = ord("K")
_OLD_FULL: Final = ord("O")

REPLICA_IDENTITIES: Final[dict[int, ReplicaIdentity]] = {ord(r.value): r for r in ReplicaIdentity}
RELATION_COLUMN_KEY_FLAG: Final = 1
MESSAGE_TRANSACTIONAL_FLAG: Final = 1
TRUNCATE_CASCADE_FLAG: Final = 1
TRUNCATE_RESTART_IDENTITY_FLAG: Final = 2

OLD_KINDS: Final[dict[int, OldTupleKind]] = {
    _OLD_KEY: OldTupleKind.KEY,
    _OLD_FULL: OldTupleKind.FULL,
}


class Malformed(Exception):
    """Raised inside a message handler; :meth:`PgOutputDecoder.decode` adds the context."""


def byte_repr(value: int) -> str:
    return f"0x{value:02x} ({chr(value)!r})" if 32 <= value < 127 else f"0x{value:02x}"


def read_cstring(buf: bytes, pos: int, what: str) -> tuple[str, int]:
    """Read a NUL-terminated UTF-8 string at ``pos``; return it and the position after it."""
    end = buf.find(0, pos)
    if end < 0:
        raise Malformed(f"truncated: {what} has no terminating NUL")
    try:
        return buf[pos:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise Malformed(f"{what} is not valid UTF-8 ({exc.reason})") from None


def read_namespace(buf: bytes, pos: int) -> tuple[str, int]:
    namespace, pos = read_cstring(buf, pos, "namespace")
    return namespace or "pg_catalog", pos


def read_tuple(buf: bytes, pos: int) -> tuple[TupleData, int]:
    """Read TupleData at ``pos``: Int16 column count, then one kind byte (+ value) per column."""
    (count,) = U16(buf, pos)
    pos += 2
    values: list[ColumnValue] = []
    append = values.append
    end = pos
    # module constants bound to locals: the loop runs once per column of every change
    text, null, unchanged, u32 = _KIND_TEXT, _KIND_NULL, _KIND_UNCHANGED, U32
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
                (size,) = U32(buf, pos + 1)
                pos += 5
                end = pos + size
                append(buf[pos:end])
                pos = end
            else:
                raise Malformed(
                    f"unknown tuple column kind {byte_repr(kind)} in column {len(values)} "
                    "(expected 't', 'b', 'n' or 'u')"
                )
    except UnicodeDecodeError as exc:
        if end > len(buf):
            raise Malformed(f"truncated in column {len(values)}") from None
        raise Malformed(
            f"text value of column {len(values)} is not valid UTF-8 ({exc.reason}); "
            "is the connection's client_encoding UTF8?"
        ) from None
    return tuple(values), pos


# Building frozen slotted dataclasses through their member descriptors skips the
# per-field object.__setattr__ call of the generated __init__ (about 2x faster for
# the messages that dominate a change stream).  The result is an ordinary instance.
_new: Final = object.__new__


def _slot_setter(cls: type, name: str) -> Callable[[object, object], None]:
    descriptor: Any = cls.__dict__[name]
    setter: Callable[[object, object], None] = descriptor.__set__
    return setter


_insert_xid: Final = _slot_setter(Insert, "xid")
_insert_rel: Final = _slot_setter(Insert, "relation_oid")
_insert_new: Final = _slot_setter(Insert, "new")


_update_xid: Final = _slot_setter(Update, "xid")
_update_rel: Final = _slot_setter(Update, "relation_oid")
_update_old: Final = _slot_setter(Update, "old")
_update_old_kind: Final = _slot_setter(Update, "old_kind")
_update_new: Final = _slot_setter(Update, "new")
_delete_xid: Final = _slot_setter(Delete, "xid")
_delete_rel: Final = _slot_setter(Delete, "relation_oid")
_delete_old: Final = _slot_setter(Delete, "old")
_delete_old_kind: Final = _slot_setter(Delete, "old_kind")


_begin_final_lsn: Final = _slot_setter(Begin, "final_lsn")
_begin_ts: Final = _slot_setter(Begin, "commit_ts_us")
_begin_xid: Final = _slot_setter(Begin, "xid")
_commit_flags: Final = _slot_setter(Commit, "flags")
_commit_lsn: Final = _slot_setter(Commit, "commit_lsn")
_commit_end_lsn: Final = _slot_setter(Commit, "end_lsn")
_commit_ts: Final = _slot_setter(Commit, "commit_ts_us")


def make_begin(final_lsn: int, commit_ts_us: int, xid: int) -> Begin:
    msg: Begin = _new(Begin)
    _begin_final_lsn(msg, final_lsn)
    _begin_ts(msg, commit_ts_us)
    _begin_xid(msg, xid)
    return msg


def make_commit(flags: int, commit_lsn: int, end_lsn: int, commit_ts_us: int) -> Commit:
    msg: Commit = _new(Commit)
    _commit_flags(msg, flags)
    _commit_lsn(msg, commit_lsn)
    _commit_end_lsn(msg, end_lsn)
    _commit_ts(msg, commit_ts_us)
    return msg


def make_insert(xid: int | None, relation_oid: int, new: TupleData) -> Insert:
    msg: Insert = _new(Insert)
    _insert_xid(msg, xid)
    _insert_rel(msg, relation_oid)
    _insert_new(msg, new)
    return msg


def make_update(
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


def make_delete(
    xid: int | None, relation_oid: int, old: TupleData, old_kind: OldTupleKind
) -> Delete:
    msg: Delete = _new(Delete)
    _delete_xid(msg, xid)
    _delete_rel(msg, relation_oid)
    _delete_old(msg, old)
    _delete_old_kind(msg, old_kind)
    return msg


# --------------------------------------------------------------------------- stateless messages


def read_begin(buf: bytes) -> tuple[Message, int]:
    final_lsn, ts, xid = _U64_Q_I32(buf, 1)
    return make_begin(final_lsn, ts + PG_EPOCH_OFFSET_US, xid), 21


def read_commit(buf: bytes) -> tuple[Message, int]:
    flags, commit_lsn, end_lsn, ts = _U8_Q_Q_q(buf, 1)
    return make_commit(flags, commit_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US), 26


def read_origin(buf: bytes) -> tuple[Message, int]:
    (origin_lsn,) = U64(buf, 1)
    name, pos = read_cstring(buf, 9, "origin name")
    return Origin(origin_lsn, name), pos


def read_insert(buf: bytes) -> tuple[Message, int]:
    relation_oid, marker = U32_U8(buf, 1)
    if marker != NEW_TUPLE:
        raise Malformed(f"expected new tuple marker 'N', got {byte_repr(marker)}")
    new, pos = read_tuple(buf, 6)
    return make_insert(None, relation_oid, new), pos


def read_stream_commit(buf: bytes) -> tuple[Message, int]:
    xid, flags, commit_lsn, end_lsn, ts = _U32_U8_Q_Q_q(buf, 1)
    return StreamCommit(xid, flags, commit_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US), 30


def read_begin_prepare(buf: bytes) -> tuple[Message, int]:
    prepare_lsn, end_lsn, ts, xid = _Q_Q_q_I(buf, 1)
    gid, pos = read_cstring(buf, 29, "gid")
    return BeginPrepare(prepare_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US, xid, gid), pos


def read_prepare(buf: bytes) -> tuple[Message, int]:
    flags, prepare_lsn, end_lsn, ts, xid = _U8_Q_Q_q_I(buf, 1)
    gid, pos = read_cstring(buf, 30, "gid")
    return Prepare(flags, prepare_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US, xid, gid), pos


def read_commit_prepared(buf: bytes) -> tuple[Message, int]:
    flags, commit_lsn, end_lsn, ts, xid = _U8_Q_Q_q_I(buf, 1)
    gid, pos = read_cstring(buf, 30, "gid")
    return CommitPrepared(flags, commit_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US, xid, gid), pos


def read_rollback_prepared(buf: bytes) -> tuple[Message, int]:
    flags, prepare_end_lsn, rollback_end_lsn, prepare_ts, rollback_ts, xid = _U8_Q_Q_q_q_I(buf, 1)
    gid, pos = read_cstring(buf, 38, "gid")
    return RollbackPrepared(
        flags,
        prepare_end_lsn,
        rollback_end_lsn,
        prepare_ts + PG_EPOCH_OFFSET_US,
        rollback_ts + PG_EPOCH_OFFSET_US,
        xid,
        gid,
    ), pos


def read_stream_prepare(buf: bytes) -> tuple[Message, int]:
    flags, prepare_lsn, end_lsn, ts, xid = _U8_Q_Q_q_I(buf, 1)
    gid, pos = read_cstring(buf, 30, "gid")
    return StreamPrepare(flags, prepare_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US, xid, gid), pos


def expect_end(buf: bytes, pos: int) -> None:
    if pos < len(buf):
        raise Malformed(f"{len(buf) - pos} unexpected trailing bytes")
