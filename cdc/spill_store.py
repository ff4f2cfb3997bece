"""On-disk store for streamed (in-progress) transactions.

PostgreSQL streams a large transaction before it commits (``streaming 'on'``),
in blocks between Stream Start and Stream Stop, interleaved with other
transactions.  Its commit position is known only at Stream Commit, so its
messages are appended here, one file per top-level xid, and replayed at Stream
Commit; Stream Abort of the top-level xid deletes the file, Stream Abort of a
subtransaction truncates the file back to where that subtransaction's first
change was written (later changes in the file belong to it or its children;
PostgreSQL sends a subtransaction's abort before any later sibling starts).

Records are length-prefixed.  The row changes the replication stream brings inside a
stream block (nearly every record of a big transaction) are kept as PostgreSQL sent them,
undecoded (:meth:`FileSpillStore.append_raw`: ``R``, the LSN they were received at, the
pgoutput message), and decoded when they are replayed
(:meth:`cdc.pgoutput_decoder.PgOutputDecoder.decode_streamed`, given to the store with
:meth:`FileSpillStore.use_decoder`): a streamed transaction is decoded once, in the replay,
and the reading of the stream (while PostgreSQL is still sending it) does no more than
write bytes.  Any other message (and a row change handed over decoded) is a pickle: row
changes as plain tuples of their fields (tagged by their length and first item), rebuilt
with the decoder's own constructors (:mod:`cdc.pgoutput_wire`); a plain tuple pickles
several times faster than a dataclass, whose pickling goes through ``dataclasses.fields``.
Memory use is bounded by one message.  The files are scratch space: after a
crash, PostgreSQL re-sends every unconfirmed transaction, so :meth:`clear`
deletes whatever an earlier process left behind.  One thread uses a store;
:attr:`FileSpillStore.pending_bytes` (the bytes in its files now, for the
``fieldsync_cdc_spill_bytes`` gauge) may be read from another.
"""

from __future__ import annotations

import os
import pickle
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from cdc import pgoutput_messages as m
from cdc.errors import CdcError
from cdc.fault_points import FAULTS
from cdc.pgoutput_wire import make_delete, make_insert, make_update

_LEN = struct.Struct("!I")
_RAW_HEAD = struct.Struct("!IcQ")  # record length, b"R", the LSN the message came at
_RAW = ord("R")  # a pickle (protocol 2 or later) starts with 0x80
_RAW_LSN = struct.Struct("!Q")
StreamedDecoder = Callable[[bytes, int], m.Message]
SPILL_BUFFER = 4 * 1024 * 1024
_PROTOCOL = pickle.HIGHEST_PROTOCOL

# tags of the row-change tuples (their first item)
_INSERT, _UPDATE, _DELETE = 0, 1, 2
_OLD_KINDS: dict[str, m.OldTupleKind] = {k.value: k for k in m.OldTupleKind}


def _dumps(message: m.Message) -> bytes:
    """One record: a row change as a tuple of its fields, any other message as itself."""
    if isinstance(message, m.Insert):
        return pickle.dumps((_INSERT, message.xid, message.relation_oid, message.new), _PROTOCOL)
    if isinstance(message, m.Update):
        old_kind = None if message.old_kind is None else message.old_kind.value
        update = (_UPDATE, message.xid, message.relation_oid, message.old, old_kind, message.new)
        return pickle.dumps(update, _PROTOCOL)
    if isinstance(message, m.Delete):
        delete = (_DELETE, message.xid, message.relation_oid, message.old, message.old_kind.value)
        return pickle.dumps(delete, _PROTOCOL)
    return pickle.dumps(message, _PROTOCOL)


def _loads(data: bytes) -> m.Message:
    """The message of a record written by :func:`_dumps`."""
    obj = pickle.loads(data)
    if type(obj) is not tuple:
        return obj  # type: ignore[no-any-return]
    tag = obj[0]
    if tag == _INSERT:
        return make_insert(obj[1], obj[2], obj[3])
    if tag == _UPDATE:
        old_kind = None if obj[4] is None else _OLD_KINDS[obj[4]]
        return make_update(obj[1], obj[2], obj[3], old_kind, obj[5])
    return make_delete(obj[1], obj[2], obj[3], _OLD_KINDS[obj[4]])


class FileSpillStore:
    def __init__(self, directory: str | Path | None = None) -> None:
        self.dir = (
            Path(directory) if directory else Path(tempfile.mkdtemp(prefix="fieldsync-spill-"))
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[int, BinaryIO] = {}
        self._sub_offsets: dict[int, dict[int, int]] = {}
        self._sizes: dict[int, int] = {}
        self.bytes_written = 0
        self.pending_bytes = 0  # in the open files now
        self._decode: StreamedDecoder | None = None

    def use_decoder(self, decode: StreamedDecoder) -> None:
        """Decode the records of :meth:`append_raw` with ``decode`` when they are replayed
        (:meth:`cdc.pgoutput_decoder.PgOutputDecoder.decode_streamed` of the stream's
        decoder)."""
        self._decode = decode

    def _path(self, xid: int) -> Path:
        return self.dir / f"xid-{xid}.spill"

    def clear(self) -> None:
        for f in list(self._files):
            self.discard(f)
        for p in self.dir.glob("xid-*.spill"):
            p.unlink(missing_ok=True)

    def _file(self, xid: int, sub: int | None) -> BinaryIO:
        """The file of top-level transaction ``xid``, noting where subtransaction ``sub``'s
        first record goes."""
        f = self._files.get(xid)
        if f is None:
            # a large buffer: every refill of a small one releases the GIL for a read() and may
            # wait up to the switch interval to get it back from kafka-python's network thread
            f = open(self._path(xid), "w+b", buffering=SPILL_BUFFER)
            self._files[xid] = f
            self._sub_offsets[xid] = {}
        if sub is not None and sub != xid:
            self._sub_offsets[xid].setdefault(sub, f.tell())
        return f

    def _wrote(self, xid: int, size: int) -> None:
        self.bytes_written += size
        self.pending_bytes += size
        self._sizes[xid] = self._sizes.get(xid, 0) + size

    def append(self, xid: int, message: m.Message) -> None:
        """Keep a decoded message of top-level transaction ``xid``."""
        f = self._file(xid, getattr(message, "xid", None))
        data = _dumps(message)
        f.write(_LEN.pack(len(data)))
        f.write(data)
        self._wrote(xid, len(data) + 4)

    def append_raw(self, xid: int, sub: int, payload: bytes | memoryview, lsn: int) -> None:
        """Keep an undecoded row change (Insert, Update or Delete as pgoutput sends it inside
        a stream block) of subtransaction ``sub`` of top-level transaction ``xid``, received
        at ``lsn``; it is decoded when replayed."""
        f = self._file(xid, sub)
        n = len(payload)
        f.write(_RAW_HEAD.pack(n + 9, b"R", lsn))
        f.write(payload)
        self._wrote(xid, n + 13)

    def abort(self, xid: int, subxid: int) -> None:
        if subxid == xid:
            self.discard(xid)
            return
        f = self._files.get(xid)
        offsets = self._sub_offsets.get(xid, {})
        if f is None or subxid not in offsets:
            return  # the subtransaction wrote nothing we kept
        cut = offsets[subxid]
        f.truncate(cut)
        f.seek(cut)
        self.pending_bytes -= self._sizes.get(xid, 0) - cut
        self._sizes[xid] = cut
        for s in [s for s, off in offsets.items() if off >= cut]:
            del offsets[s]

    def replay(self, xid: int) -> Iterator[m.Message]:
        f = self._files.get(xid)
        if f is None:
            return
        f.flush()
        f.seek(0)
        armed = FAULTS.armed
        while True:
            head = f.read(4)
            if not head:
                break
            (n,) = _LEN.unpack(head)
            if armed:
                FAULTS.hit("spill_replay")
            data = f.read(n)
            if data[0] == _RAW:
                yield self._decoded(data)
            else:
                yield _loads(data)

    def _decoded(self, record: bytes) -> m.Message:
        decode = self._decode
        if decode is None:
            raise CdcError(
                "the spill store holds undecoded row changes but was given no decoder "
                "(FileSpillStore.use_decoder)"
            )
        return decode(record[9:], _RAW_LSN.unpack_from(record, 1)[0])

    def discard(self, xid: int) -> None:
        f = self._files.pop(xid, None)
        self._sub_offsets.pop(xid, None)
        self.pending_bytes -= self._sizes.pop(xid, 0)
        if f is not None:
            f.close()
        try:
            os.unlink(self._path(xid))
        except FileNotFoundError:
            pass

    def open_xids(self) -> Sequence[int]:
        return list(self._files)

    def close(self) -> None:
        self.clear()
