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

The messages are the frozen dataclasses of :mod:`cdc.pgoutput_messages`; the
integers, strings and tuples of a message are read by :mod:`cdc.pgoutput_wire`, which also
reads the messages that need no decoder state.  This module holds the state (the stream
block) and the dispatch.

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

import struct
from collections.abc import Callable
from typing import Final, TypeAlias

from cdc.errors import DecodeError
from cdc.pgoutput_messages import (
    MESSAGE_NAMES,
    PG_EPOCH_OFFSET_US,
    LogicalMessage,
    Message,
    MessageType,
    Relation,
    RelationColumn,
    StreamAbort,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    message_name,
)
from cdc.pgoutput_wire import (
    MESSAGE_TRANSACTIONAL_FLAG,
    NEW_TUPLE,
    OLD_KINDS,
    RELATION_COLUMN_KEY_FLAG,
    REPLICA_IDENTITIES,
    TRUNCATE_CASCADE_FLAG,
    TRUNCATE_RESTART_IDENTITY_FLAG,
    U16,
    U32,
    U32_I32,
    U32_U8,
    U32_U32,
    U32_U32_U8,
    U64,
    Malformed,
    Q_q,
    byte_repr,
    expect_end,
    make_delete,
    make_insert,
    make_update,
    read_begin,
    read_begin_prepare,
    read_commit,
    read_commit_prepared,
    read_cstring,
    read_insert,
    read_namespace,
    read_origin,
    read_prepare,
    read_rollback_prepared,
    read_stream_commit,
    read_stream_prepare,
    read_tuple,
)

__all__ = ["PgOutputDecoder"]

#: Lowest protocol version with streaming, two-phase, and parallel stream abort info.
_STREAM_VERSION: Final = 2
_TWO_PHASE_VERSION: Final = 3
_PARALLEL_VERSION: Final = 4
_MAX_VERSION: Final = 4


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
                f"truncated {message_name(buf[0])} message ({len(buf)} bytes)",
                lsn=lsn,
                byte=buf[0],
            ) from None
        except Malformed as exc:
            name = MESSAGE_NAMES.get(buf[0])
            text = f"{name} message: {exc}" if name else str(exc)
            raise DecodeError(text, lsn=lsn, byte=buf[0]) from None
        if pos != len(buf):
            raise self._length_error(buf, pos, lsn)
        return msg

    def decode_streamed(self, data: bytes | memoryview, lsn: int) -> Message:
        """Decode a row change received inside a stream block, once the block has ended: a
        change cdc spilled undecoded (:meth:`cdc.spill_store.FileSpillStore.append_raw`) is
        decoded when its transaction's Stream Commit replays it.  The decoder's stream
        state is as before afterwards."""
        was = self._in_stream
        self._set_stream(True)
        try:
            return self.decode(data, lsn)
        finally:
            self._set_stream(was)

    # ----------------------------------------------------------------- dispatch tables

    def _build_table(self, *, in_stream: bool) -> tuple[_Handler, ...]:
        handlers: dict[int, _Handler] = {
            MessageType.ORIGIN: read_origin,
            MessageType.RELATION: self._relation,
            MessageType.TYPE: self._type,
            MessageType.INSERT: self._insert_stream if in_stream else read_insert,
            MessageType.UPDATE: self._update,
            MessageType.DELETE: self._delete,
            MessageType.TRUNCATE: self._truncate,
            MessageType.MESSAGE: self._message,
        }
        outside_only: dict[int, _Handler] = {
            MessageType.BEGIN: read_begin,
            MessageType.COMMIT: read_commit,
            MessageType.STREAM_START: self._stream_start,
            MessageType.STREAM_COMMIT: read_stream_commit,
            MessageType.STREAM_ABORT: self._stream_abort,
            MessageType.BEGIN_PREPARE: read_begin_prepare,
            MessageType.PREPARE: read_prepare,
            MessageType.COMMIT_PREPARED: read_commit_prepared,
            MessageType.ROLLBACK_PREPARED: read_rollback_prepared,
            MessageType.STREAM_PREPARE: read_stream_prepare,
        }
        for byte, handler in outside_only.items():
            handlers[byte] = (
                _rejecter(
                    f"{MESSAGE_NAMES[byte]} message inside a stream block (after Stream Start)"
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
                    f"{MESSAGE_NAMES[byte]} message needs pgoutput protocol version "
                    f"{version} or later, but the decoder was set up for version {self._proto}"
                )
        return tuple(handlers.get(byte, _unknown) for byte in range(256))

    def _xid(self, buf: bytes) -> tuple[int | None, int]:
        """The leading xid of a change message (only inside a stream block) and the next position."""
        if self._in_stream:
            return U32(buf, 1)[0], 5
        return None, 1

    def _set_stream(self, in_stream: bool) -> None:
        self._in_stream = in_stream
        self._table = self._stream_table if in_stream else self._outside_table

    # ----------------------------------------------------------------- transactions

    # ----------------------------------------------------------------- metadata

    def _relation(self, buf: bytes) -> tuple[Message, int]:
        xid, pos = self._xid(buf)
        (oid,) = U32(buf, pos)
        namespace, pos = read_namespace(buf, pos + 4)
        name, pos = read_cstring(buf, pos, "relation name")
        ident_byte = buf[pos]
        identity = REPLICA_IDENTITIES.get(ident_byte)
        if identity is None:
            raise Malformed(
                f"unknown replica identity {byte_repr(ident_byte)} for relation {namespace}.{name} "
                "(expected 'd', 'n', 'f' or 'i')"
            )
        (count,) = U16(buf, pos + 1)
        pos += 3
        columns = []
        for index in range(count):
            flags = buf[pos]
            if flags & ~RELATION_COLUMN_KEY_FLAG:
                raise Malformed(
                    f"unknown flags 0x{flags:02x} on column {index} of {namespace}.{name}"
                )
            column_name, pos = read_cstring(
                buf, pos + 1, f"name of column {index} of {namespace}.{name}"
            )
            type_oid, type_modifier = U32_I32(buf, pos)
            pos += 8
            columns.append(RelationColumn(column_name, type_oid, type_modifier, bool(flags)))
        return Relation(xid, oid, namespace, name, identity, tuple(columns)), pos

    def _type(self, buf: bytes) -> tuple[Message, int]:
        xid, pos = self._xid(buf)
        (oid,) = U32(buf, pos)
        namespace, pos = read_namespace(buf, pos + 4)
        name, pos = read_cstring(buf, pos, "type name")
        return Type(xid, oid, namespace, name), pos

    # ----------------------------------------------------------------- changes

    def _insert_stream(self, buf: bytes) -> tuple[Message, int]:
        xid, relation_oid, marker = U32_U32_U8(buf, 1)
        if marker != NEW_TUPLE:
            raise Malformed(f"expected new tuple marker 'N', got {byte_repr(marker)}")
        new, pos = read_tuple(buf, 10)
        return make_insert(xid, relation_oid, new), pos

    def _update(self, buf: bytes) -> tuple[Message, int]:
        xid, pos = self._xid(buf)
        relation_oid, marker = U32_U8(buf, pos)
        pos += 5
        old: TupleData | None = None
        old_kind = OLD_KINDS.get(marker)
        if old_kind is not None:
            old, pos = read_tuple(buf, pos)
            marker = buf[pos]
            pos += 1
        if marker != NEW_TUPLE:
            expected = "'N'" if old_kind is not None else "'K', 'O' or 'N'"
            raise Malformed(f"expected tuple marker {expected}, got {byte_repr(marker)}")
        new, pos = read_tuple(buf, pos)
        return make_update(xid, relation_oid, old, old_kind, new), pos

    def _delete(self, buf: bytes) -> tuple[Message, int]:
        xid, pos = self._xid(buf)
        relation_oid, marker = U32_U8(buf, pos)
        old_kind = OLD_KINDS.get(marker)
        if old_kind is None:
            raise Malformed(f"expected old tuple marker 'K' or 'O', got {byte_repr(marker)}")
        old, pos = read_tuple(buf, pos + 5)
        return make_delete(xid, relation_oid, old, old_kind), pos

    def _truncate(self, buf: bytes) -> tuple[Message, int]:
        xid, pos = self._xid(buf)
        count, flags = U32_U8(buf, pos)
        pos += 5
        if flags & ~(TRUNCATE_CASCADE_FLAG | TRUNCATE_RESTART_IDENTITY_FLAG):
            raise Malformed(f"unknown truncate flags 0x{flags:02x}")
        if pos + 4 * count > len(buf):
            raise Malformed(
                f"truncated: {count} relation oids announced, {len(buf) - pos} bytes left"
            )
        oids = struct.unpack_from(f">{count}I", buf, pos)
        return Truncate(
            xid,
            oids,
            bool(flags & TRUNCATE_CASCADE_FLAG),
            bool(flags & TRUNCATE_RESTART_IDENTITY_FLAG),
        ), pos + 4 * count

    def _message(self, buf: bytes) -> tuple[Message, int]:
        xid, pos = self._xid(buf)
        flags = buf[pos]
        if flags & ~MESSAGE_TRANSACTIONAL_FLAG:
            raise Malformed(f"unknown logical message flags 0x{flags:02x}")
        (message_lsn,) = U64(buf, pos + 1)
        prefix, pos = read_cstring(buf, pos + 9, "message prefix")
        (size,) = U32(buf, pos)
        pos += 4
        end = pos + size
        if end > len(buf):
            raise Malformed(f"truncated: content of {size} bytes announced, {len(buf) - pos} left")
        return LogicalMessage(
            xid, bool(flags & MESSAGE_TRANSACTIONAL_FLAG), message_lsn, prefix, buf[pos:end]
        ), end

    # ----------------------------------------------------------------- streaming (v2+)

    def _stream_start(self, buf: bytes) -> tuple[Message, int]:
        xid, first = U32_U8(buf, 1)
        if first > 1:
            raise Malformed(f"first-segment flag must be 0 or 1, got {first}")
        expect_end(buf, 6)
        self._set_stream(True)
        return StreamStart(xid, first == 1), 6

    def _stream_stop(self, buf: bytes) -> tuple[Message, int]:
        expect_end(buf, 1)
        self._set_stream(False)
        return StreamStop(), 1

    def _stream_abort(self, buf: bytes) -> tuple[Message, int]:
        xid, subxid = U32_U32(buf, 1)
        if not self._parallel:
            return StreamAbort(xid, subxid, None, None), 9
        abort_lsn, ts = Q_q(buf, 9)
        return StreamAbort(xid, subxid, abort_lsn, ts + PG_EPOCH_OFFSET_US), 25

    # ----------------------------------------------------------------- two-phase (v3+)

    # ----------------------------------------------------------------- errors

    @staticmethod
    def _length_error(buf: bytes, pos: int, lsn: int) -> DecodeError:
        name = message_name(buf[0])
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


def _unknown(buf: bytes) -> tuple[Message, int]:
    raise Malformed(
        f"unknown pgoutput message type {byte_repr(buf[0])}; "
        "is the server newer than the decoder's protocol version?"
    )


def _rejecter(reason: str) -> _Handler:
    def reject(buf: bytes) -> tuple[Message, int]:
        raise Malformed(f"not allowed here: {reason}")

    return reject
