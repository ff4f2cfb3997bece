"""Tests for cdc.pgoutput_decoder (and the messages of cdc.pgoutput_messages).

The hand-written byte literals follow PostgreSQL's "Logical Replication Message
Formats" field by field.  The round-trip property uses a small test-only
encoder (below) that writes wire bytes the way ``proto.c`` does.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc.errors import DecodeError
from cdc.pgoutput_decoder import PgOutputDecoder
from cdc.pgoutput_messages import (
    PG_EPOCH_OFFSET_US,
    UNCHANGED_TOAST,
    Begin,
    BeginPrepare,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    MessageType,
    OldTupleKind,
    Origin,
    Prepare,
    Relation,
    RelationColumn,
    ReplicaIdentity,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    Unchanged,
    Update,
)

LSN = 0x16_B374D848
LSN_TEXT = "16/B374D848"


def h(text: str) -> bytes:
    """Hex with spaces and '|' as field separators, for readable wire literals."""
    return bytes.fromhex(text.replace("|", " "))


def in_stream_decoder(
    proto: int = 2, *, parallel: bool = False, xid: int = 0x2EA
) -> PgOutputDecoder:
    decoder = PgOutputDecoder(proto, parallel_streaming=parallel)
    assert decoder.decode(h("53 | 00 00 02 ea | 01"), LSN) == StreamStart(xid, True)
    assert decoder.in_stream
    return decoder


# ----------------------------------------------------------------------------- literals

# The PostgreSQL epoch (2000-01-01) on the wire: 1000 us after it.
WIRE_TS = "00 00 00 00 00 00 03 e8"
TS_US = PG_EPOCH_OFFSET_US + 1000


def test_begin() -> None:
    wire = h(f"42 | 00 00 00 16 b3 74 d8 48 | {WIRE_TS} | 00 00 02 ea")
    assert PgOutputDecoder(1).decode(wire, LSN) == Begin(LSN, TS_US, 746)


def test_commit() -> None:
    wire = h(f"43 | 00 | 00 00 00 16 b3 74 d8 48 | 00 00 00 16 b3 74 d8 80 | {WIRE_TS}")
    assert PgOutputDecoder(1).decode(wire, LSN) == Commit(0, LSN, LSN + 0x38, TS_US)


def test_timestamps_before_the_postgres_epoch_are_negative_on_the_wire() -> None:
    wire = h("42 | 00 00 00 00 00 00 00 01 | ff ff ff ff ff ff ff ff | 00 00 00 01")
    assert PgOutputDecoder(1).decode(wire, LSN) == Begin(1, PG_EPOCH_OFFSET_US - 1, 1)


def test_origin() -> None:
    wire = h("4f | 00 00 00 00 00 00 00 10 | 6e 6f 64 65 31 00")  # "node1"
    assert PgOutputDecoder(1).decode(wire, LSN) == Origin(0x10, "node1")


RELATION_BODY = (
    "00 00 40 00 | 70 75 62 6c 69 63 00 | 6f 72 64 65 72 73 00 | 64 | 00 02"  # public.orders, 'd', 2 cols
    "| 01 | 69 64 00 | 00 00 00 17 | ff ff ff ff"  # key column "id" int4, typmod -1
    "| 00 | 6e 6f 74 65 00 | 00 00 04 13 | 00 00 00 2c"  # "note" varchar(40): typmod 44
)
RELATION = Relation(
    None,
    0x4000,
    "public",
    "orders",
    ReplicaIdentity.DEFAULT,
    (RelationColumn("id", 23, -1, True), RelationColumn("note", 1043, 44, False)),
)


def test_relation() -> None:
    assert PgOutputDecoder(1).decode(h("52 |" + RELATION_BODY), LSN) == RELATION


def test_relation_in_stream_carries_xid() -> None:
    decoder = in_stream_decoder()
    wire = h("52 | 00 00 02 ea |" + RELATION_BODY)
    assert decoder.decode(wire, LSN) == dataclasses.replace(RELATION, xid=746)


@pytest.mark.parametrize(
    ("byte", "identity"),
    [
        ("64", ReplicaIdentity.DEFAULT),
        ("6e", ReplicaIdentity.NOTHING),
        ("66", ReplicaIdentity.FULL),
        ("69", ReplicaIdentity.INDEX),
    ],
)
def test_relation_replica_identities(byte: str, identity: ReplicaIdentity) -> None:
    wire = h(f"52 | 00 00 00 01 | 73 00 | 74 00 | {byte} | 00 00")
    message = PgOutputDecoder(1).decode(wire, LSN)
    assert isinstance(message, Relation)
    assert message.replica_identity is identity
    assert message.columns == ()


def test_relation_and_type_empty_namespace_is_pg_catalog() -> None:
    decoder = PgOutputDecoder(1)
    relation = decoder.decode(h("52 | 00 00 00 01 | 00 | 74 00 | 64 | 00 00"), LSN)
    assert isinstance(relation, Relation)
    assert relation.namespace == "pg_catalog"
    assert decoder.decode(h("59 | 00 00 00 19 | 00 | 74 65 78 74 00"), LSN) == Type(
        None, 25, "pg_catalog", "text"
    )


def test_type() -> None:
    wire = h("59 | 00 00 41 00 | 70 75 62 6c 69 63 00 | 6d 6f 6f 64 00")
    assert PgOutputDecoder(1).decode(wire, LSN) == Type(None, 0x4100, "public", "mood")


def test_type_in_stream() -> None:
    wire = h("59 | 00 00 02 ea | 00 00 41 00 | 70 75 62 6c 69 63 00 | 6d 6f 6f 64 00")
    assert in_stream_decoder().decode(wire, LSN) == Type(746, 0x4100, "public", "mood")


# Three columns: text "42", NULL, unchanged TOAST; then a binary and an empty text.
TUPLE_5 = "00 05 | 74 00 00 00 02 34 32 | 6e | 75 | 62 00 00 00 03 01 02 03 | 74 00 00 00 00"
TUPLE_5_VALUES: TupleData = ("42", None, UNCHANGED_TOAST, b"\x01\x02\x03", "")
KEY_TUPLE = "00 01 | 74 00 00 00 01 37"  # ("7",)


def test_insert() -> None:
    message = PgOutputDecoder(1).decode(h("49 | 00 00 40 00 | 4e |" + TUPLE_5), LSN)
    assert message == Insert(None, 0x4000, TUPLE_5_VALUES)
    assert isinstance(message, Insert)
    assert message.new[2] is UNCHANGED_TOAST
    assert message.new[1] is None


def test_insert_in_stream() -> None:
    wire = h("49 | 00 00 02 eb | 00 00 40 00 | 4e |" + TUPLE_5)  # a subtransaction's xid
    assert in_stream_decoder().decode(wire, LSN) == Insert(747, 0x4000, TUPLE_5_VALUES)


def test_insert_text_is_utf8() -> None:
    wire = h("49 | 00 00 40 00 | 4e | 00 01 | 74 00 00 00 03 e2 82 ac")
    assert PgOutputDecoder(1).decode(wire, LSN) == Insert(None, 0x4000, ("\u20ac",))


def test_update_without_old_tuple() -> None:
    wire = h("55 | 00 00 40 00 | 4e |" + TUPLE_5)
    assert PgOutputDecoder(1).decode(wire, LSN) == Update(None, 0x4000, None, None, TUPLE_5_VALUES)


def test_update_with_old_key() -> None:
    wire = h("55 | 00 00 40 00 | 4b |" + KEY_TUPLE + "| 4e |" + TUPLE_5)
    expected = Update(None, 0x4000, ("7",), OldTupleKind.KEY, TUPLE_5_VALUES)
    assert PgOutputDecoder(1).decode(wire, LSN) == expected


def test_update_with_old_full_row_in_stream() -> None:
    wire = h("55 | 00 00 02 ea | 00 00 40 00 | 4f |" + TUPLE_5 + "| 4e |" + KEY_TUPLE)
    expected = Update(746, 0x4000, TUPLE_5_VALUES, OldTupleKind.FULL, ("7",))
    assert in_stream_decoder().decode(wire, LSN) == expected


@pytest.mark.parametrize(("marker", "kind"), [("4b", OldTupleKind.KEY), ("4f", OldTupleKind.FULL)])
def test_delete(marker: str, kind: OldTupleKind) -> None:
    wire = h(f"44 | 00 00 40 00 | {marker} |" + KEY_TUPLE)
    assert PgOutputDecoder(1).decode(wire, LSN) == Delete(None, 0x4000, ("7",), kind)


def test_delete_in_stream() -> None:
    wire = h("44 | 00 00 02 ea | 00 00 40 00 | 4b |" + KEY_TUPLE)
    assert in_stream_decoder().decode(wire, LSN) == Delete(746, 0x4000, ("7",), OldTupleKind.KEY)


@pytest.mark.parametrize(
    ("flags", "cascade", "restart"),
    [("00", False, False), ("01", True, False), ("02", False, True), ("03", True, True)],
)
def test_truncate(flags: str, cascade: bool, restart: bool) -> None:
    wire = h(f"54 | 00 00 00 02 | {flags} | 00 00 40 00 | 00 00 40 01")
    assert PgOutputDecoder(1).decode(wire, LSN) == Truncate(
        None, (0x4000, 0x4001), cascade, restart
    )


def test_truncate_in_stream() -> None:
    wire = h("54 | 00 00 02 ea | 00 00 00 01 | 00 | 00 00 40 00")
    assert in_stream_decoder().decode(wire, LSN) == Truncate(746, (0x4000,), False, False)


def test_logical_message_transactional() -> None:
    wire = h(
        "4d | 01 | 00 00 00 16 b3 74 d8 48 | 66 73 00 | 00 00 00 03 | 61 00 62"
    )  # "fs", b"a\0b"
    assert PgOutputDecoder(1).decode(wire, LSN) == LogicalMessage(None, True, LSN, "fs", b"a\x00b")


def test_logical_message_non_transactional_empty() -> None:
    wire = h("4d | 00 | 00 00 00 00 00 00 00 05 | 00 | 00 00 00 00")
    assert PgOutputDecoder(1).decode(wire, LSN) == LogicalMessage(None, False, 5, "", b"")


def test_logical_message_in_stream() -> None:
    wire = h("4d | 00 00 02 ea | 01 | 00 00 00 16 b3 74 d8 48 | 66 73 00 | 00 00 00 01 | 7a")
    assert in_stream_decoder().decode(wire, LSN) == LogicalMessage(746, True, LSN, "fs", b"z")


def test_stream_block_start_stop() -> None:
    decoder = PgOutputDecoder(2)
    assert not decoder.in_stream
    assert decoder.decode(h("53 | 00 00 02 ea | 00"), LSN) == StreamStart(746, False)
    assert decoder.in_stream
    assert decoder.decode(h("45"), LSN) == StreamStop()
    assert not decoder.in_stream
    # after the block, change messages are back to the form without xid
    assert decoder.decode(h("49 | 00 00 40 00 | 4e | 00 00"), LSN) == Insert(None, 0x4000, ())


def test_stream_commit() -> None:
    wire = h(
        f"63 | 00 00 02 ea | 00 | 00 00 00 16 b3 74 d8 48 | 00 00 00 16 b3 74 d8 80 | {WIRE_TS}"
    )
    assert PgOutputDecoder(2).decode(wire, LSN) == StreamCommit(746, 0, LSN, LSN + 0x38, TS_US)


@pytest.mark.parametrize("proto", [2, 3, 4])
def test_stream_abort_without_parallel_streaming(proto: int) -> None:
    wire = h("41 | 00 00 02 ea | 00 00 02 eb")
    assert PgOutputDecoder(proto).decode(wire, LSN) == StreamAbort(746, 747, None, None)


def test_stream_abort_with_parallel_streaming() -> None:
    wire = h(f"41 | 00 00 02 ea | 00 00 02 ea | 00 00 00 16 b3 74 d8 48 | {WIRE_TS}")
    decoder = PgOutputDecoder(4, parallel_streaming=True)
    assert decoder.decode(wire, LSN) == StreamAbort(746, 746, LSN, TS_US)


def test_stream_abort_parallel_requires_abort_info() -> None:
    decoder = PgOutputDecoder(4, parallel_streaming=True)
    with pytest.raises(DecodeError, match="truncated Stream Abort"):
        decoder.decode(h("41 | 00 00 02 ea | 00 00 02 ea"), LSN)


GID = "67 69 64 31 00"  # "gid1"


def test_begin_prepare() -> None:
    wire = h(
        f"62 | 00 00 00 16 b3 74 d8 48 | 00 00 00 16 b3 74 d8 80 | {WIRE_TS} | 00 00 02 ea | {GID}"
    )
    assert PgOutputDecoder(3).decode(wire, LSN) == BeginPrepare(LSN, LSN + 0x38, TS_US, 746, "gid1")


def test_prepare() -> None:
    wire = h(
        f"50 | 00 | 00 00 00 16 b3 74 d8 48 | 00 00 00 16 b3 74 d8 80 | {WIRE_TS} | 00 00 02 ea | {GID}"
    )
    assert PgOutputDecoder(3).decode(wire, LSN) == Prepare(0, LSN, LSN + 0x38, TS_US, 746, "gid1")


def test_commit_prepared() -> None:
    wire = h(
        f"4b | 00 | 00 00 00 16 b3 74 d8 48 | 00 00 00 16 b3 74 d8 80 | {WIRE_TS} | 00 00 02 ea | {GID}"
    )
    assert PgOutputDecoder(4).decode(wire, LSN) == CommitPrepared(
        0, LSN, LSN + 0x38, TS_US, 746, "gid1"
    )


def test_rollback_prepared() -> None:
    wire = h(
        "72 | 00 | 00 00 00 16 b3 74 d8 48 | 00 00 00 16 b3 74 d8 80"
        f"| {WIRE_TS} | 00 00 00 00 00 00 07 d0 | 00 00 02 ea | {GID}"
    )
    expected = RollbackPrepared(0, LSN, LSN + 0x38, TS_US, TS_US + 1000, 746, "gid1")
    assert PgOutputDecoder(3).decode(wire, LSN) == expected


def test_stream_prepare() -> None:
    wire = h(
        f"70 | 00 | 00 00 00 16 b3 74 d8 48 | 00 00 00 16 b3 74 d8 80 | {WIRE_TS} | 00 00 02 ea | {GID}"
    )
    assert PgOutputDecoder(3).decode(wire, LSN) == StreamPrepare(
        0, LSN, LSN + 0x38, TS_US, 746, "gid1"
    )


def test_memoryview_input() -> None:
    frame = h("77 | 00 00 00 00 00 00 00 00" + "| 49 | 00 00 40 00 | 4e |" + TUPLE_5)
    payload = memoryview(frame)[9:]
    assert PgOutputDecoder(1).decode(payload, LSN) == Insert(None, 0x4000, TUPLE_5_VALUES)


def test_messages_are_frozen_and_hashable() -> None:
    message = PgOutputDecoder(1).decode(h("49 | 00 00 40 00 | 4e |" + TUPLE_5), LSN)
    assert message == Insert(None, 0x4000, TUPLE_5_VALUES)
    assert hash(message) == hash(Insert(None, 0x4000, TUPLE_5_VALUES))
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.relation_oid = 1  # type: ignore[misc]
    assert message.message_type is MessageType.INSERT


def test_unchanged_toast_is_its_own_sentinel() -> None:
    assert UNCHANGED_TOAST is Unchanged.TOAST
    assert UNCHANGED_TOAST is not None
    assert not isinstance(UNCHANGED_TOAST, str | bytes)
    assert repr(UNCHANGED_TOAST) == "UNCHANGED_TOAST"


def test_every_message_class_has_its_type_byte() -> None:
    classes = typing.get_args(Message)
    assert len(classes) == len(MessageType)
    assert sorted(cls.message_type for cls in classes) == sorted(MessageType)


# ----------------------------------------------------------------------------- errors


def test_unknown_message_byte_names_byte_and_lsn() -> None:
    with pytest.raises(DecodeError) as info:
        PgOutputDecoder(4).decode(b"x\x00\x00", LSN)
    assert info.value.byte == ord("x")
    assert info.value.lsn == LSN
    assert "0x78 ('x')" in str(info.value)
    assert LSN_TEXT in str(info.value)
    assert "unknown pgoutput message type" in str(info.value)


def test_empty_payload() -> None:
    with pytest.raises(DecodeError, match=f"empty pgoutput message.*{LSN_TEXT}"):
        PgOutputDecoder(1).decode(b"", LSN)


def test_truncated_message_names_byte_and_lsn() -> None:
    with pytest.raises(DecodeError) as info:
        PgOutputDecoder(1).decode(h("42 | 00 00 00 16 b3 74"), LSN)
    assert info.value.byte == ord("B")
    assert "truncated Begin" in str(info.value)
    assert LSN_TEXT in str(info.value)


def test_truncated_text_value() -> None:
    wire = h("49 | 00 00 40 00 | 4e | 00 01 | 74 00 00 00 05 61 62")
    with pytest.raises(DecodeError, match=f"truncated Insert.*{LSN_TEXT}"):
        PgOutputDecoder(1).decode(wire, LSN)


def test_truncated_inside_multibyte_character() -> None:
    wire = h("49 | 00 00 40 00 | 4e | 00 01 | 74 00 00 00 03 e2 82")
    with pytest.raises(DecodeError, match="truncated"):
        PgOutputDecoder(1).decode(wire, LSN)


def test_trailing_garbage() -> None:
    with pytest.raises(DecodeError, match="1 unexpected trailing bytes after Insert") as info:
        PgOutputDecoder(1).decode(h("49 | 00 00 40 00 | 4e | 00 00 | ff"), LSN)
    assert info.value.lsn == LSN


def test_trailing_garbage_after_stream_start_keeps_state() -> None:
    decoder = PgOutputDecoder(2)
    with pytest.raises(DecodeError, match="trailing"):
        decoder.decode(h("53 | 00 00 02 ea | 01 | 00"), LSN)
    assert not decoder.in_stream


def test_bad_tuple_kind() -> None:
    wire = h("49 | 00 00 40 00 | 4e | 00 02 | 6e | 78")
    with pytest.raises(DecodeError) as info:
        PgOutputDecoder(1).decode(wire, LSN)
    message = str(info.value)
    assert "unknown tuple column kind 0x78 ('x') in column 1" in message
    assert info.value.byte == ord("I")
    assert LSN_TEXT in message


def test_non_utf8_text_value_names_lsn() -> None:
    wire = h("49 | 00 00 40 00 | 4e | 00 01 | 74 00 00 00 02 ff fe")
    with pytest.raises(DecodeError, match=f"column 0 is not valid UTF-8.*{LSN_TEXT}"):
        PgOutputDecoder(1).decode(wire, LSN)


def test_non_utf8_name() -> None:
    with pytest.raises(DecodeError, match="type name is not valid UTF-8"):
        PgOutputDecoder(1).decode(h("59 | 00 00 00 01 | 73 00 | ff 00"), LSN)


def test_unterminated_string() -> None:
    with pytest.raises(DecodeError, match="origin name has no terminating NUL"):
        PgOutputDecoder(1).decode(h("4f | 00 00 00 00 00 00 00 10 | 6e 6f"), LSN)


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        ("49 | 00 00 40 00 | 4b | 00 00", "expected new tuple marker 'N', got 0x4b"),
        ("55 | 00 00 40 00 | 58 | 00 00", "expected tuple marker 'K', 'O' or 'N', got 0x58"),
        ("55 | 00 00 40 00 | 4b | 00 00 | 4f | 00 00", "expected tuple marker 'N', got 0x4f"),
        ("44 | 00 00 40 00 | 4e | 00 00", "expected old tuple marker 'K' or 'O', got 0x4e"),
        ("52 | 00 00 00 01 | 73 00 | 74 00 | 78 | 00 00", "unknown replica identity 0x78"),
        (
            "52 | 00 00 00 01 | 73 00 | 74 00 | 64 | 00 01 | 02 | 63 00 | 00 00 00 17 | ff ff ff ff",
            "unknown flags 0x02 on column 0",
        ),
        ("54 | 00 00 00 00 | 04", "unknown truncate flags 0x04"),
        ("54 | 00 00 00 09 | 00 | 00 00 40 00", "9 relation oids announced"),
        (
            "4d | 02 | 00 00 00 00 00 00 00 05 | 00 | 00 00 00 00",
            "unknown logical message flags 0x02",
        ),
        (
            "4d | 00 | 00 00 00 00 00 00 00 05 | 00 | 00 00 00 09 | 61",
            "content of 9 bytes announced",
        ),
    ],
)
def test_malformed_fields(wire: str, match: str) -> None:
    with pytest.raises(DecodeError, match=match) as info:
        PgOutputDecoder(1).decode(h(wire), LSN)
    assert info.value.lsn == LSN
    assert info.value.byte == h(wire)[0]


def test_stream_start_flag_must_be_boolean() -> None:
    with pytest.raises(DecodeError, match="first-segment flag must be 0 or 1"):
        PgOutputDecoder(2).decode(h("53 | 00 00 02 ea | 02"), LSN)


def test_stream_stop_outside_stream_block() -> None:
    with pytest.raises(DecodeError, match="Stream Stop message outside a stream block") as info:
        PgOutputDecoder(2).decode(b"E", LSN)
    assert info.value.byte == ord("E")
    assert LSN_TEXT in str(info.value)


@pytest.mark.parametrize("byte", [b"B", b"C", b"S", b"c", b"A", b"b", b"P", b"K", b"r", b"p"])
def test_transaction_messages_not_allowed_inside_stream_block(byte: bytes) -> None:
    decoder = in_stream_decoder(proto=4)
    with pytest.raises(DecodeError, match="inside a stream block") as info:
        decoder.decode(byte + bytes(40), LSN)
    assert info.value.byte == byte[0]
    assert decoder.in_stream


@pytest.mark.parametrize(
    ("proto", "wire"),
    [
        (1, "53 | 00 00 02 ea | 01"),
        (1, "45"),
        (
            1,
            "63 | 00 00 02 ea | 00 | 00 00 00 16 b3 74 d8 48 | 00 00 00 16 b3 74 d8 80 | 00 00 00 00 00 00 03 e8",
        ),
        (1, "41 | 00 00 02 ea | 00 00 02 eb"),
        (
            2,
            f"62 | 00 00 00 16 b3 74 d8 48 | 00 00 00 16 b3 74 d8 80 | {WIRE_TS} | 00 00 02 ea | {GID}",
        ),
        (
            2,
            f"50 | 00 | 00 00 00 16 b3 74 d8 48 | 00 00 00 16 b3 74 d8 80 | {WIRE_TS} | 00 00 02 ea | {GID}",
        ),
        (
            2,
            f"4b | 00 | 00 00 00 16 b3 74 d8 48 | 00 00 00 16 b3 74 d8 80 | {WIRE_TS} | 00 00 02 ea | {GID}",
        ),
        (2, f"72 | 00 | {'00 ' * 32} | 00 00 02 ea | {GID}"),
        (
            2,
            f"70 | 00 | 00 00 00 16 b3 74 d8 48 | 00 00 00 16 b3 74 d8 80 | {WIRE_TS} | 00 00 02 ea | {GID}",
        ),
    ],
)
def test_messages_need_their_protocol_version(proto: int, wire: str) -> None:
    with pytest.raises(
        DecodeError, match=f"needs pgoutput protocol version .* set up for version {proto}"
    ) as info:
        PgOutputDecoder(proto).decode(h(wire), LSN)
    assert info.value.byte == h(wire)[0]


def test_stream_form_of_change_with_protocol_1_is_trailing_garbage() -> None:
    # A protocol-1 decoder never expects an xid: the extra 4 bytes do not fit.
    with pytest.raises(DecodeError):
        PgOutputDecoder(1).decode(h("49 | 00 00 02 ea | 00 00 40 00 | 4e | 00 00"), LSN)


@pytest.mark.parametrize(("proto", "parallel"), [(0, False), (5, False), (2, True), (3, True)])
def test_constructor_rejects_bad_settings(proto: int, parallel: bool) -> None:
    with pytest.raises(ValueError, match="proto_version"):
        PgOutputDecoder(proto, parallel_streaming=parallel)


# ----------------------------------------------------------------------------- test-only encoder


def _ts(us: int) -> bytes:
    return struct.pack(">q", us - PG_EPOCH_OFFSET_US)


def _cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def _xid(xid: int | None) -> bytes:
    return b"" if xid is None else struct.pack(">I", xid)


def _tuple(values: TupleData) -> bytes:
    out = [struct.pack(">H", len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        elif value is UNCHANGED_TOAST:
            out.append(b"u")
        elif isinstance(value, str):
            raw = value.encode()
            out.append(b"t" + struct.pack(">I", len(raw)) + raw)
        elif isinstance(value, bytes):
            out.append(b"b" + struct.pack(">I", len(value)) + value)
        else:
            raise AssertionError(value)
    return b"".join(out)


def _prepared(
    byte: bytes, flags: int | None, lsn: int, end: int, ts: int, xid: int, gid: str
) -> bytes:
    head = byte if flags is None else byte + bytes([flags])
    return head + struct.pack(">QQ", lsn, end) + _ts(ts) + struct.pack(">I", xid) + _cstr(gid)


def encode(message: Message) -> bytes:
    """Wire bytes for ``message`` as pgoutput writes them (xid/abort info iff set)."""
    match message:
        case Begin(final_lsn, ts, xid):
            return b"B" + struct.pack(">Q", final_lsn) + _ts(ts) + struct.pack(">I", xid)
        case Commit(flags, commit_lsn, end_lsn, ts):
            return b"C" + struct.pack(">BQQ", flags, commit_lsn, end_lsn) + _ts(ts)
        case Origin(origin_lsn, name):
            return b"O" + struct.pack(">Q", origin_lsn) + _cstr(name)
        case Relation(xid, oid, namespace, name, identity, columns):
            out = [b"R", _xid(xid), struct.pack(">I", oid), _cstr(namespace), _cstr(name)]
            out.append(identity.value.encode() + struct.pack(">H", len(columns)))
            for column in columns:
                out.append(bytes([int(column.is_key)]) + _cstr(column.name))
                out.append(struct.pack(">Ii", column.type_oid, column.type_modifier))
            return b"".join(out)
        case Type(xid, oid, namespace, name):
            return b"Y" + _xid(xid) + struct.pack(">I", oid) + _cstr(namespace) + _cstr(name)
        case Insert(xid, relation_oid, new):
            return b"I" + _xid(xid) + struct.pack(">I", relation_oid) + b"N" + _tuple(new)
        case Update(xid, relation_oid, old, old_kind, new):
            old_part = (
                b"" if old is None or old_kind is None else old_kind.value.encode() + _tuple(old)
            )
            return (
                b"U" + _xid(xid) + struct.pack(">I", relation_oid) + old_part + b"N" + _tuple(new)
            )
        case Delete(xid, relation_oid, old, old_kind):
            return (
                b"D"
                + _xid(xid)
                + struct.pack(">I", relation_oid)
                + old_kind.value.encode()
                + _tuple(old)
            )
        case Truncate(xid, oids, cascade, restart):
            flags = int(cascade) | (int(restart) << 1)
            return b"T" + _xid(xid) + struct.pack(f">IB{len(oids)}I", len(oids), flags, *oids)
        case LogicalMessage(xid, transactional, lsn, prefix, content):
            head = b"M" + _xid(xid) + struct.pack(">BQ", int(transactional), lsn) + _cstr(prefix)
            return head + struct.pack(">I", len(content)) + content
        case StreamStart(xid, first_segment):
            return b"S" + struct.pack(">IB", xid, int(first_segment))
        case StreamStop():
            return b"E"
        case StreamCommit(xid, flags, commit_lsn, end_lsn, ts):
            return b"c" + struct.pack(">IBQQ", xid, flags, commit_lsn, end_lsn) + _ts(ts)
        case StreamAbort(xid, subxid, abort_lsn, abort_ts):
            out_abort = b"A" + struct.pack(">II", xid, subxid)
            if abort_lsn is not None and abort_ts is not None:
                out_abort += struct.pack(">Q", abort_lsn) + _ts(abort_ts)
            return out_abort
        case BeginPrepare(lsn, end, ts, xid, gid):
            return _prepared(b"b", None, lsn, end, ts, xid, gid)
        case Prepare(flags, lsn, end, ts, xid, gid):
            return _prepared(b"P", flags, lsn, end, ts, xid, gid)
        case CommitPrepared(flags, lsn, end, ts, xid, gid):
            return _prepared(b"K", flags, lsn, end, ts, xid, gid)
        case RollbackPrepared(flags, prepare_end, rollback_end, prepare_ts, rollback_ts, xid, gid):
            return (
                b"r"
                + struct.pack(">BQQ", flags, prepare_end, rollback_end)
                + _ts(prepare_ts)
                + _ts(rollback_ts)
                + struct.pack(">I", xid)
                + _cstr(gid)
            )
        case StreamPrepare(flags, lsn, end, ts, xid, gid):
            return _prepared(b"p", flags, lsn, end, ts, xid, gid)
    raise AssertionError(f"no encoder for {message!r}")


def test_encoder_agrees_with_hand_written_literals() -> None:
    assert encode(RELATION) == h("52 |" + RELATION_BODY)
    assert encode(Insert(747, 0x4000, TUPLE_5_VALUES)) == h(
        "49 | 00 00 02 eb | 00 00 40 00 | 4e |" + TUPLE_5
    )
    assert encode(StreamAbort(746, 746, LSN, TS_US)) == h(
        f"41 | 00 00 02 ea | 00 00 02 ea | 00 00 00 16 b3 74 d8 48 | {WIRE_TS}"
    )


# ----------------------------------------------------------------------------- properties

U8 = st.integers(0, 0xFF)
U32 = st.integers(0, 0xFFFF_FFFF)
U64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
I32 = st.integers(-(2**31), 2**31 - 1)
TS = st.integers(-(2**63) + PG_EPOCH_OFFSET_US, 2**63 - 1 + PG_EPOCH_OFFSET_US)
NAME = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
NON_EMPTY_NAME = NAME.filter(bool)
VALUE = st.one_of(st.none(), st.just(UNCHANGED_TOAST), st.text(max_size=20), st.binary(max_size=20))
TUPLE: st.SearchStrategy[TupleData] = st.lists(VALUE, max_size=6).map(tuple)
OLD_KIND = st.sampled_from(OldTupleKind)


def change_messages(xid: st.SearchStrategy[int | None]) -> list[st.SearchStrategy[Message]]:
    column = st.builds(RelationColumn, NAME, U32, I32, st.booleans())
    return [
        st.builds(Origin, U64, NAME),
        st.builds(
            Relation, xid, U32, NON_EMPTY_NAME, NAME, st.sampled_from(ReplicaIdentity),
            st.lists(column, max_size=5).map(tuple),
        ),
        st.builds(Type, xid, U32, NON_EMPTY_NAME, NAME),
        st.builds(Insert, xid, U32, TUPLE),
        st.builds(Update, xid, U32, st.none(), st.none(), TUPLE),
        st.builds(Update, xid, U32, TUPLE, OLD_KIND, TUPLE),
        st.builds(Delete, xid, U32, TUPLE, OLD_KIND),
        st.builds(Truncate, xid, st.lists(U32, max_size=5).map(tuple), st.booleans(), st.booleans()),
        st.builds(LogicalMessage, xid, st.booleans(), U64, NAME, st.binary(max_size=30)),
    ]  # fmt: skip


@functools.cache
def messages_allowed(proto: int, parallel: bool, in_stream: bool) -> st.SearchStrategy[Message]:
    if in_stream:
        return st.one_of([*change_messages(U32), st.just(StreamStop())])
    options = [
        *change_messages(st.none()),
        st.builds(Begin, U64, TS, U32),
        st.builds(Commit, U8, U64, U64, TS),
    ]
    if proto >= 2:
        abort = (
            st.builds(StreamAbort, U32, U32, U64, TS)
            if parallel
            else st.builds(StreamAbort, U32, U32, st.none(), st.none())
        )
        options += [
            st.builds(StreamStart, U32, st.booleans()),
            st.builds(StreamCommit, U32, U8, U64, U64, TS),
            abort,
        ]
    if proto >= 3:
        options += [
            st.builds(BeginPrepare, U64, U64, TS, U32, NAME),
            st.builds(Prepare, U8, U64, U64, TS, U32, NAME),
            st.builds(CommitPrepared, U8, U64, U64, TS, U32, NAME),
            st.builds(RollbackPrepared, U8, U64, U64, TS, TS, U32, NAME),
            st.builds(StreamPrepare, U8, U64, U64, TS, U32, NAME),
        ]
    return st.one_of(options)


@st.composite
def sessions(draw: st.DrawFn) -> tuple[int, bool, list[Message]]:
    """A protocol setup and a sequence of messages valid for it, in order."""
    proto = draw(st.integers(1, 4))
    parallel = proto >= 4 and draw(st.booleans())
    in_stream = False
    messages: list[Message] = []
    for _ in range(draw(st.integers(1, 8))):
        message = draw(messages_allowed(proto, parallel, in_stream))
        messages.append(message)
        if isinstance(message, StreamStart):
            in_stream = True
        elif isinstance(message, StreamStop):
            in_stream = False
    return proto, parallel, messages


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
def test_round_trip(session: tuple[int, bool, list[Message]]) -> None:
    proto, parallel, messages = session
    decoder = PgOutputDecoder(proto, parallel_streaming=parallel)
    in_stream = False
    for lsn, message in enumerate(messages):
        wire = encode(message)
        # alternate bytes and memoryview input
        assert decoder.decode(wire if lsn % 2 else memoryview(wire), lsn) == message
        if isinstance(message, StreamStart | StreamStop):
            in_stream = isinstance(message, StreamStart)
        assert decoder.in_stream == in_stream


@settings(max_examples=100)
@given(sessions(), st.data())
def test_every_strict_prefix_is_rejected(
    session: tuple[int, bool, list[Message]], data: st.DataObject
) -> None:
    proto, parallel, messages = session
    decoder = PgOutputDecoder(proto, parallel_streaming=parallel)
    for lsn, message in enumerate(messages):
        wire = encode(message)
        cut = data.draw(st.integers(0, len(wire) - 1), label="cut")
        state = decoder.in_stream
        with pytest.raises(DecodeError) as info:
            decoder.decode(wire[:cut], lsn)
        assert info.value.lsn == lsn
        assert decoder.in_stream == state
        assert decoder.decode(wire, lsn) == message


@settings(max_examples=300)
@given(st.integers(1, 4), st.booleans(), st.binary(min_size=1, max_size=64))
def test_arbitrary_bytes_decode_or_raise_decode_error(
    proto: int, stream: bool, payload: bytes
) -> None:
    decoder = in_stream_decoder(proto=max(proto, 2)) if stream else PgOutputDecoder(proto)
    try:
        message = decoder.decode(payload, LSN)
    except DecodeError as exc:
        assert exc.lsn == LSN
        assert LSN_TEXT in str(exc)
    else:
        assert type(message).message_type == payload[0]
