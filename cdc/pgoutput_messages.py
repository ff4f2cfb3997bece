"""The messages of PostgreSQL's ``pgoutput`` logical replication protocol, as values (pure).

Every message the decoder (:mod:`cdc.pgoutput_decoder`) returns is one of the frozen,
slotted dataclasses here (the :data:`Message` union), named as in PostgreSQL's "Logical
Replication Message Formats"; :class:`MessageType` is the closed set of type bytes.

Values are exposed decoded: text columns (``'t'``) as ``str``, binary columns (``'b'``) as
``bytes``, SQL NULL (``'n'``) as ``None`` and an unchanged TOASTed value that PostgreSQL did
not send (``'u'``) as the sentinel :data:`UNCHANGED_TOAST` -- never ``None``, so NULL stays
distinct from "not sent".  Timestamps are microseconds since the Unix epoch.  An empty
namespace in ``R``/``Y`` means ``pg_catalog`` and is reported as such.

Concurrency: immutable values, no state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

__all__ = [
    "MESSAGE_NAMES",
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
    "message_name",
]

#: Microseconds from 1970-01-01 (Unix epoch) to 2000-01-01 (PostgreSQL epoch).
PG_EPOCH_OFFSET_US = 946_684_800_000_000


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

#: Each message type byte's name, as PostgreSQL's documentation spells it.
MESSAGE_NAMES: dict[int, str] = {
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


def message_name(byte: int) -> str:
    """The name of a message type byte (``unknown`` for any other byte)."""
    return MESSAGE_NAMES.get(byte, "unknown")
