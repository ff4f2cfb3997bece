"""The pure change assembler: positions, resume-skipping, streams, relations (value literals)."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc import pgoutput_messages as m
from cdc.change_assembler import ChangeAssembler, OutEvent, OutSchema, TxnEnd
from cdc.errors import CdcError, DecodeError
from cdc.pgoutput_decoder import PgOutputDecoder
from cdc.resume_position import ResumePosition
from cdc.spill_store import FileSpillStore
from core.avro_envelope import SchemaRegistry, decode, parse_position_header
from core.pg_types import BUILTIN_TYPES, TypeInfo

INT4, TEXT = 23, 25


class FakeCatalog:
    def __init__(self, pks: dict[int, tuple[str, ...] | None]) -> None:
        self.pks = pks

    def lookup(self, oid: int) -> TypeInfo | None:
        return BUILTIN_TYPES.get(oid)

    def primary_key(self, relation_oid: int) -> tuple[str, ...] | None:
        return self.pks.get(relation_oid)


class MemorySpill:
    """In-memory SpillStore for pure tests (truncation semantics as the file store)."""

    def __init__(self) -> None:
        self.data: dict[int, list[m.Message]] = {}

    def append(self, xid: int, message: m.Message) -> None:
        self.data.setdefault(xid, []).append(message)

    def append_raw(self, xid: int, sub: int, payload: bytes | memoryview, lsn: int) -> None:
        raise AssertionError("row changes are fed decoded here")

    def abort(self, xid: int, subxid: int) -> None:
        if xid == subxid:
            self.data.pop(xid, None)
            return
        msgs = self.data.get(xid, [])
        for i, msg in enumerate(msgs):
            if getattr(msg, "xid", None) == subxid:
                del msgs[i:]
                return

    def replay(self, xid: int) -> Iterator[m.Message]:
        yield from self.data.get(xid, [])

    def discard(self, xid: int) -> None:
        self.data.pop(xid, None)

    def open_xids(self) -> Sequence[int]:
        return list(self.data)


REL = m.Relation(
    None,
    16384,
    "public",
    "t",
    m.ReplicaIdentity.DEFAULT,
    (m.RelationColumn("id", INT4, -1, True), m.RelationColumn("v", TEXT, -1, False)),
)


def make(resume: ResumePosition | None = None, spill: Any = None) -> ChangeAssembler:
    return ChangeAssembler(
        db="db",
        topic_prefix="fs",
        catalog=FakeCatalog({16384: ("id",)}),
        spill=spill or MemorySpill(),
        resume=resume,
        clock_us=lambda: 1,
    )


def run(asm: ChangeAssembler, msgs: list[m.Message]) -> list[Any]:
    out: list[Any] = []
    for i, msg in enumerate(msgs):
        out.extend(asm.feed(msg, 1000 + i))
    return out


def txn(xid: int, lsn: int, *changes: m.Message) -> list[m.Message]:
    return [m.Begin(lsn, 5_000_000, xid), *changes, m.Commit(0, lsn, lsn + 8, 5_000_000)]


def ins(i: int, xid: int | None = None) -> m.Insert:
    return m.Insert(xid, 16384, (str(i), f"v{i}"))


def events(out: list[Any]) -> list[OutEvent]:
    return [o for o in out if isinstance(o, OutEvent)]


def decoded(out: list[Any]) -> list[dict[str, Any]]:
    reg = SchemaRegistry()
    for o in out:
        if isinstance(o, OutSchema):
            reg.add(o.schema_json)
    return [decode(e.value, reg) for e in events(out)]


def test_positions_topics_and_schemas_first() -> None:
    out = run(
        make(),
        [
            REL,
            *txn(7, 100, ins(1), ins(2)),
            *txn(8, 200, m.Delete(None, 16384, ("1", None), m.OldTupleKind.KEY)),
        ],
    )
    assert isinstance(out[0], OutSchema) and isinstance(out[1], OutSchema)
    ev = events(out)
    assert [(e.topic, e.commit_lsn, e.seq) for e in ev] == [
        ("fs.public.t", 100, 0),
        ("fs.public.t", 100, 1),
        ("fs.public.t", 200, 0),
    ]
    assert [parse_position_header(dict(e.headers)["fieldsync.pos"]) for e in ev] == [
        (100, 0),
        (100, 1),
        (200, 0),
    ]
    ends = [o for o in out if isinstance(o, TxnEnd)]
    assert [(t.commit_lsn, t.end_lsn, t.events) for t in ends] == [(100, 108, 2), (200, 208, 1)]
    vals = decoded(out)
    assert [v["op"] for v in vals] == ["c", "c", "d"]
    assert (
        vals[2]["before"]["id"] == 1
        and vals[0]["source"]["txid"] == 7
        and vals[0]["source"]["commit_ts_us"] == 5_000_000
    )


def test_resume_skips_complete_and_partial_transactions() -> None:
    msgs = [
        REL,
        *txn(7, 100, ins(1), ins(2)),
        *txn(8, 200, ins(3), ins(4), ins(5)),
        *txn(9, 300, ins(6)),
    ]
    # Kafka holds all of txn 100 and seq 0..1 of txn 200
    out = run(make(ResumePosition(200, 1, False)), msgs)
    assert [(e.commit_lsn, e.seq) for e in events(out)] == [(200, 2), (300, 0)]
    # every transaction still ends, so the slot can be confirmed past skipped ones
    assert [t.commit_lsn for t in out if isinstance(t, TxnEnd)] == [100, 200, 300]
    out = run(make(ResumePosition(200, 2, True)), msgs)
    assert [(e.commit_lsn, e.seq) for e in events(out)] == [(300, 0)]


def test_origin_from_message_and_replication_origin() -> None:
    out = run(
        make(),
        [
            REL,
            *txn(
                7, 100, m.LogicalMessage(None, True, 90, "fieldsync.origin", b"device:d9"), ins(1)
            ),
            *txn(8, 200, m.Origin(5, "node-b"), ins(2)),
            *txn(9, 300, ins(3)),
        ],
    )
    assert [v["source"]["origin"] for v in decoded(out)] == ["device:d9", "pg-origin:node-b", None]


def test_streamed_transaction_with_subtransaction_abort() -> None:
    spill = MemorySpill()
    asm = make(spill=spill)
    msgs: list[m.Message] = [
        REL,
        m.StreamStart(50, True),
        ins(1, 50),
        ins(2, 51),
        m.StreamStop(),
        *txn(60, 150, ins(100)),  # interleaved small transaction commits first
        m.StreamStart(50, False),
        ins(3, 52),
        m.StreamStop(),
        m.StreamAbort(
            50, 51, None, None
        ),  # savepoint 51 rolled back: drops 2 and everything after it
        m.StreamStart(50, False),
        ins(4, 50),
        m.StreamStop(),
        m.StreamCommit(50, 0, 400, 408, 9),
        m.StreamStart(70, True),
        ins(9, 70),
        m.StreamStop(),
        m.StreamAbort(70, 70, None, None),
    ]
    out = run(asm, msgs)
    ev = events(out)
    assert [(e.commit_lsn, e.seq) for e in ev] == [(150, 0), (400, 0), (400, 1)]
    assert [v["after"]["id"] for v in decoded(out)] == [100, 1, 4]
    assert spill.open_xids() == []


def test_unknown_relation_and_orphan_commit_raise_with_lsn() -> None:
    with pytest.raises(DecodeError, match="relation oid 99"):
        run(make(), [m.Begin(10, 0, 1), m.Insert(None, 99, ("1",))])
    with pytest.raises(DecodeError, match="Commit without Begin"):
        run(make(), [m.Commit(0, 10, 18, 0)])


def test_relation_change_makes_a_new_schema() -> None:
    rel2 = m.Relation(
        None,
        16384,
        "public",
        "t",
        m.ReplicaIdentity.DEFAULT,
        (*REL.columns, m.RelationColumn("w", INT4, -1, False)),
    )
    out = run(
        make(),
        [REL, *txn(1, 100, ins(1)), rel2, *txn(2, 200, m.Insert(None, 16384, ("2", "x", "3")))],
    )
    schemas = [o for o in out if isinstance(o, OutSchema)]
    assert len({s.fingerprint for s in schemas}) == 3  # key + two value versions (key unchanged)
    assert decoded(out)[1]["after"] == {"id": 2, "v": "x", "w": 3}


def test_the_key_is_the_primary_key_as_of_the_relation_message() -> None:
    """Under REPLICA IDENTITY DEFAULT the Relation message flags the primary key as of its
    WAL position; the catalog of now may hold a redefined one (the daemon decodes changes
    made before ``ADD PRIMARY KEY (v, id)`` after it): the changes before it keep the old
    key, those after it get the new one."""
    asm = ChangeAssembler(
        db="db",
        topic_prefix="fs",
        catalog=FakeCatalog({16384: ("v", "id")}),  # the catalog of now
        spill=MemorySpill(),
        resume=None,
        clock_us=lambda: 1,
    )
    rekeyed = m.Relation(
        None,
        16384,
        "public",
        "t",
        m.ReplicaIdentity.DEFAULT,
        (m.RelationColumn("id", INT4, -1, True), m.RelationColumn("v", TEXT, -1, True)),
    )
    out = run(asm, [REL, *txn(1, 100, ins(1)), rekeyed, *txn(2, 200, ins(2))])
    reg = SchemaRegistry()
    for o in out:
        if isinstance(o, OutSchema):
            reg.add(o.schema_json)
    keys = [decode(e.key, reg) for e in events(out) if e.key is not None]
    assert keys == [{"id": 1}, {"id": 2, "v": "v2"}]


def test_the_key_is_the_replica_identity() -> None:
    """The key is what a delete carries: the identity index under USING INDEX (also with a
    primary key on other columns), the primary key under FULL and NOTHING (looked up in the
    catalog: FULL flags every column), none without one.  A Relation message with the same
    columns and flags gives the table a new key when the catalog's primary key changed
    (ADD PRIMARY KEY under FULL)."""
    pks: dict[int, tuple[str, ...] | None] = {16384: ("id",)}
    asm = ChangeAssembler(
        db="db",
        topic_prefix="fs",
        catalog=FakeCatalog(pks),
        spill=MemorySpill(),
        resume=None,
        clock_us=lambda: 1,
    )

    def rel(identity: m.ReplicaIdentity, *flagged: str) -> m.Relation:
        columns = tuple(
            m.RelationColumn(n, t, -1, n in flagged) for n, t in (("id", INT4), ("v", TEXT))
        )
        return m.Relation(None, 16384, "public", "t", identity, columns)

    index_v = rel(m.ReplicaIdentity.INDEX, "v")
    full = rel(m.ReplicaIdentity.FULL, "id", "v")
    delete = m.Delete(None, 16384, (None, "v9"), m.OldTupleKind.KEY)
    out = run(asm, [index_v, *txn(1, 100, ins(1), delete)])
    pks[16384] = None  # the primary key dropped, REPLICA IDENTITY FULL
    out += run(asm, [full, *txn(2, 200, ins(2))])
    pks[16384] = ("id",)  # ADD PRIMARY KEY (id): the same Relation message again
    out += run(asm, [full, *txn(3, 300, ins(3))])
    reg = SchemaRegistry()
    for o in out:
        if isinstance(o, OutSchema):
            reg.add(o.schema_json)
    keys = [None if e.key is None else decode(e.key, reg) for e in events(out)]
    assert keys == [{"v": "v1"}, {"v": "v9"}, None, {"id": 3}]


def test_file_spill_store_truncates_subtransactions(tmp_path: Path) -> None:
    store = FileSpillStore(tmp_path)
    for msg in (ins(1, 5), ins(2, 6), ins(3, 7), ins(4, 5)):
        store.append(5, msg)
    store.abort(5, 7)
    assert [x.new[0] for x in store.replay(5) if isinstance(x, m.Insert)] == ["1", "2"]
    store.append(5, ins(8, 5))
    store.abort(5, 6)
    assert [x.new[0] for x in store.replay(5) if isinstance(x, m.Insert)] == ["1"]
    store.discard(5)
    assert list(tmp_path.iterdir()) == []


# pgoutput bytes of a streamed transaction (protocol 2): in-stream messages carry their
# (sub)transaction's xid after the type byte
def _text_tuple(*values: str | None) -> bytes:
    out = struct.pack(">H", len(values))
    for v in values:
        out += b"n" if v is None else b"t" + struct.pack(">I", len(v.encode())) + v.encode()
    return out


def _stream_rel(xid: int) -> bytes:
    cols = (
        b"\x01id\x00" + struct.pack(">Ii", INT4, -1) + b"\x00v\x00" + struct.pack(">Ii", TEXT, -1)
    )
    return b"R" + struct.pack(">II", xid, 16384) + b"public\x00t\x00d" + struct.pack(">H", 2) + cols


def _s_ins(xid: int, i: int) -> bytes:
    return b"I" + struct.pack(">II", xid, 16384) + b"N" + _text_tuple(str(i), f"v{i}")


def _s_upd(xid: int, i: int) -> bytes:
    old = b"K" + _text_tuple(str(i), None)
    return b"U" + struct.pack(">II", xid, 16384) + old + b"N" + _text_tuple(str(i), f"w{i}")


def _s_del(xid: int, i: int) -> bytes:
    return b"D" + struct.pack(">II", xid, 16384) + b"K" + _text_tuple(str(i), None)


def _streamed_txn(lsn: int) -> list[bytes]:
    """Top-level xid 900 in three stream blocks; subtransaction 901 aborts, 902 commits."""
    return [
        b"S" + struct.pack(">IB", 900, 1),
        _stream_rel(900),
        _s_ins(900, 1),
        _s_ins(901, 2),
        _s_upd(901, 1),
        b"E",
        b"A" + struct.pack(">II", 900, 901),
        b"S" + struct.pack(">IB", 900, 0),
        _s_ins(902, 3),
        _s_upd(902, 3),
        b"E",
        b"S" + struct.pack(">IB", 900, 0),
        _s_del(900, 1),
        _s_ins(900, 4),
        b"E",
        b"c" + struct.pack(">IBQQq", 900, 0, lsn, lsn + 40, 817_000_000_000_002),
    ]


def _feed_bytes(
    asm: ChangeAssembler, dec: PgOutputDecoder, msgs: list[bytes], raw: bool
) -> list[Any]:
    """Feed pgoutput bytes as cdc's streaming loop does (``raw``: row changes inside a
    stream block spilled undecoded) or with every message decoded first."""
    out: list[Any] = []
    for i, data in enumerate(msgs):
        lsn = 0x7000 + i
        if raw and asm.spill_change(memoryview(data), lsn):
            continue
        out.extend(asm.feed(dec.decode(data, lsn), lsn))
    return out


def test_undecoded_streamed_row_changes_replay_as_the_decoded_ones(tmp_path: Path) -> None:
    """Spilling a stream block's row changes undecoded and decoding them at Stream Commit
    gives the same events, byte for byte, as decoding every message as it comes; an
    aborted subtransaction's raw records are cut like pickled ones."""
    results = []
    for raw in (False, True):
        dec = PgOutputDecoder(2)
        store = FileSpillStore(tmp_path / str(raw))
        store.use_decoder(dec.decode_streamed)
        asm = make(spill=store)
        out = _feed_bytes(asm, dec, _streamed_txn(0x9_0000), raw)
        assert not dec.in_stream and store.pending_bytes == 0
        assert list((tmp_path / str(raw)).iterdir()) == []
        results.append(
            [(e.topic, e.key, e.value, e.commit_lsn, e.seq, e.headers) for e in events(out)]
        )
    assert results[0] == results[1]
    ends = [o for o in out if isinstance(o, TxnEnd)]
    assert [(e.commit_lsn, e.events, e.streamed) for e in ends] == [(0x9_0000, 5, True)]
    assert [(d["op"], d["after"]) for d in decoded(out)] == [
        ("c", {"id": 1, "v": "v1"}),
        ("c", {"id": 3, "v": "v3"}),
        ("u", {"id": 3, "v": "w3"}),
        ("d", None),
        ("c", {"id": 4, "v": "v4"}),
    ]


def test_a_malformed_undecoded_row_change_is_named_with_its_own_lsn(tmp_path: Path) -> None:
    dec = PgOutputDecoder(2)
    store = FileSpillStore(tmp_path)
    store.use_decoder(dec.decode_streamed)
    asm = make(spill=store)
    msgs = _streamed_txn(0x9_0000)
    msgs[2] = msgs[2][:-3]  # the first insert, truncated (received at 0x7002)
    with pytest.raises(DecodeError, match="truncated Insert") as info:
        _feed_bytes(asm, dec, msgs, raw=True)
    assert info.value.lsn == 0x7002
    assert not dec.in_stream


def test_undecoded_records_need_a_decoder(tmp_path: Path) -> None:
    store = FileSpillStore(tmp_path)
    store.append_raw(5, 5, _s_ins(5, 1), 0x10)
    assert store.pending_bytes == len(_s_ins(5, 1)) + 13
    with pytest.raises(CdcError, match="no decoder"):
        list(store.replay(5))
    store.discard(5)
    assert store.pending_bytes == 0


def test_only_row_changes_inside_a_stream_block_are_spilled_undecoded(tmp_path: Path) -> None:
    store = FileSpillStore(tmp_path)
    asm = make(spill=store)
    assert not asm.spill_change(_s_ins(5, 1), 0x10)  # no stream block open
    list(asm.feed(m.StreamStart(5, True), 0x11))
    assert not asm.spill_change(_stream_rel(5), 0x12)  # decoded by the caller
    assert not asm.spill_change(b"I\x00\x00", 0x13)  # too short: the decoder names it
    assert not asm.spill_change(b"", 0x14)
    assert store.open_xids() == []
    assert asm.spill_change(_s_ins(6, 1), 0x15)
    assert store.open_xids() == [5]
    store.abort(5, 6)  # its subtransaction's record is cut
    assert store.pending_bytes == 0
    store.close()


_VALUES = st.one_of(
    st.none(), st.text(max_size=8), st.binary(max_size=8), st.just(m.UNCHANGED_TOAST)
)
_TUPLES = st.lists(_VALUES, max_size=4).map(tuple)
_XIDS = st.one_of(st.none(), st.integers(min_value=0, max_value=2**32 - 1))
_OIDS = st.integers(min_value=0, max_value=2**32 - 1)
_SPILLED = st.one_of(
    st.builds(m.Insert, _XIDS, _OIDS, _TUPLES),
    st.builds(
        m.Update,
        _XIDS,
        _OIDS,
        st.one_of(st.none(), _TUPLES),
        st.one_of(st.none(), st.sampled_from(m.OldTupleKind)),
        _TUPLES,
    ),
    st.builds(m.Delete, _XIDS, _OIDS, _TUPLES, st.sampled_from(m.OldTupleKind)),
    st.builds(
        m.Truncate, _XIDS, st.lists(_OIDS, max_size=3).map(tuple), st.booleans(), st.booleans()
    ),
    st.builds(m.Type, _XIDS, _OIDS, st.text(max_size=5), st.text(max_size=5)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_SPILLED, max_size=12))
def test_file_spill_store_replays_what_it_was_given(msgs: list[m.Message]) -> None:
    """Property: the spill store gives back equal messages of the same classes, in order
    (row changes take a compact record form on disk)."""
    store = FileSpillStore()
    try:
        for msg in msgs:
            store.append(7, msg)
        back = list(store.replay(7))
        assert back == msgs
        assert [type(x) for x in back] == [type(x) for x in msgs]
    finally:
        store.close()
        store.dir.rmdir()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=8), st.data())
def test_resume_never_duplicates_or_loses(sizes: list[int], data: st.DataObject) -> None:
    """Property: for any resume point, skipped + emitted events == all events, no overlap."""
    msgs: list[m.Message] = [REL]
    all_pos = []
    n = 0
    for t, size in enumerate(sizes):
        lsn = 100 * (t + 1)
        changes = []
        for s in range(size):
            changes.append(ins(n))
            all_pos.append((lsn, s))
            n += 1
        msgs += txn(t + 1, lsn, *changes)
    cut = data.draw(st.integers(min_value=0, max_value=len(all_pos)))
    if cut == 0:
        resume = None
    else:
        lsn, seq = all_pos[cut - 1]
        complete = cut == len(all_pos) or all_pos[cut][0] != lsn
        resume = ResumePosition(lsn, seq, complete)
    got = [(e.commit_lsn, e.seq) for e in events(run(make(resume), msgs))]
    assert got == all_pos[cut:]
