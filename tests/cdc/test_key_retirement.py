"""The pure parts of retiring old keys after a table's key schema changed
(cdc/key_retirement.py, cdc/ddl_detection.py ``key_changed``, the retirement chunk of
cdc/resnapshot_stream.py): which DDL asks for it, which keys are deleted, and that a delete
never follows a streamed change of a row with the same key text."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cdc import pgoutput_messages as m
from cdc.change_assembler import OutEvent, TxnEnd
from cdc.ddl_detection import (
    ColumnFacts,
    TableSignature,
    identity_warnings,
    key_changed,
    resnapshot_reasons,
    signatures_from_bytes,
    signatures_to_bytes,
)
from cdc.incremental_snapshot import ChunkWindow, Job, Progress, Visibility, Watermark
from cdc.key_retirement import (
    KEYLESS_DONE,
    OTHER_COLUMNS,
    RETIRE_ORIGIN,
    KeyTexts,
    RetireSet,
    key_columns,
    key_text,
    old_schema,
)
from cdc.recovery_deletes import LiveKeys
from cdc.relation_diff import compare_relations
from cdc.resnapshot_stream import ChunkTracker, InFlightChunk, Jobs
from core.avro_envelope import SchemaRegistry, Source, TableCodec, decode
from core.pg_types import ColumnSpec, MappingCatalog

INT4, INT8, TEXT = 23, 20, 25


def col(attnum: int, name: str, type_oid: int = INT4, version: str = "700") -> ColumnFacts:
    names = {INT4: "integer", INT8: "bigint", TEXT: "text"}
    return ColumnFacts(attnum, name, type_oid, -1, names[type_oid], False, version)


BASE = TableSignature(
    1, "public", "t", 5000, (col(1, "id"), col(2, "a"), col(3, "v", TEXT)), key=("id",)
)


def with_columns(*cols: ColumnFacts, filenode: int = 5000, **kw: Any) -> TableSignature:
    return dataclasses.replace(BASE, columns=cols, filenode=filenode, **kw)


def test_key_changes_are_told_apart_from_other_ddl() -> None:
    to_text = with_columns(col(1, "id", TEXT, "801"), *BASE.columns[1:], filenode=5001)
    to_bigint = with_columns(col(1, "id", INT8, "801"), *BASE.columns[1:], filenode=5001)
    using = with_columns(col(1, "id", INT4, "801"), *BASE.columns[1:], filenode=5001)
    renamed = with_columns(col(1, "ident", INT4, "801"), *BASE.columns[1:], key=("ident",))
    rekeyed = dataclasses.replace(BASE, key=("a", "id"))
    other = with_columns(BASE.columns[0], col(2, "a", INT8, "801"), BASE.columns[2], filenode=5001)
    for new in (to_text, to_bigint, using, renamed, rekeyed):
        assert key_changed(BASE, new), new
    assert not key_changed(BASE, other), "a column outside the key"
    assert not key_changed(BASE, BASE)
    assert not key_changed(BASE, with_columns(*BASE.columns, filenode=5001)), "VACUUM FULL"
    assert resnapshot_reasons(BASE, rekeyed) == ["key changed from (id) to (a, id)"]
    unknown = dataclasses.replace(BASE, key=None)  # recorded before keys were recorded
    assert resnapshot_reasons(unknown, rekeyed) == [] and not key_changed(unknown, rekeyed)


INDEX, FULL, DEFAULT, NOTHING = (
    m.ReplicaIdentity.INDEX,
    m.ReplicaIdentity.FULL,
    m.ReplicaIdentity.DEFAULT,
    m.ReplicaIdentity.NOTHING,
)


def test_row_identity_changes_are_key_changes() -> None:
    """Without a primary key the Kafka key is the replica identity index, or nothing: a
    replaced index, a switch to or from USING INDEX, a primary key added or dropped, and a
    retyped identity-index column all change the rows' keys."""
    by_id = dataclasses.replace(BASE, key=("id",), identity=INDEX)
    by_a = dataclasses.replace(BASE, key=("a",), identity=INDEX)
    full = dataclasses.replace(BASE, key=(), identity=FULL)
    default = dataclasses.replace(BASE, key=(), identity=DEFAULT)
    nothing = dataclasses.replace(BASE, key=(), identity=NOTHING)
    pk = dataclasses.replace(BASE, key=("id",), identity=INDEX)  # ADD PRIMARY KEY (id) on by_a
    retyped = dataclasses.replace(
        by_id, columns=(col(1, "id", TEXT, "801"), *BASE.columns[1:]), filenode=5001
    )
    for old, new in (
        (by_id, by_a),
        (by_id, full),
        (full, by_id),
        (default, by_a),
        (by_a, pk),
        (BASE, by_a),  # DROP CONSTRAINT t_pkey, the identity index (a) left
        (BASE, default),  # … and no identity index
        (by_id, nothing),
        (by_id, retyped),
    ):
        assert key_changed(old, new), (old.key, old.identity, new.key, new.identity)
    for old, new in ((full, default), (default, nothing), (BASE, pk), (by_id, by_id)):
        assert not key_changed(old, new), "no key before or after, or the same key columns"
    assert resnapshot_reasons(by_id, by_a) == [
        "key changed from (id) (replica identity index) to (a) (replica identity index)"
    ]
    assert resnapshot_reasons(by_id, full) == [
        "key changed from (id) (replica identity index) to none (REPLICA IDENTITY FULL "
        "without a primary key: events have no Kafka key)"
    ]


def test_identity_warnings_name_what_postgresql_refuses_and_what_is_not_keyed() -> None:
    by_id = dataclasses.replace(BASE, key=("id",), identity=INDEX)
    nothing = dataclasses.replace(BASE, key=(), identity=NOTHING)
    pk_nothing = dataclasses.replace(BASE, identity=NOTHING)
    full = dataclasses.replace(BASE, key=(), identity=FULL)
    refused = (
        "public.t has no replica identity (REPLICA IDENTITY NOTHING{}): PostgreSQL refuses its "
        "updates and deletes while the publication publishes them"
    )
    keyless = (
        "public.t has no key columns: its events have no Kafka key, consumers that name rows by "
        "key (the relay) do not sync it, and re-snapshots cannot read it. Fix: ALTER TABLE "
        "public.t ADD PRIMARY KEY (…) or REPLICA IDENTITY USING INDEX …"
    )
    assert identity_warnings(by_id, nothing) == [refused.format(" without a primary key"), keyless]
    assert identity_warnings(BASE, pk_nothing) == [refused.format("")]
    assert identity_warnings(by_id, full) == [keyless]
    assert identity_warnings(full, nothing) == [refused.format(" without a primary key")]
    assert identity_warnings(by_id, by_id) == [] and identity_warnings(nothing, full) == []


def test_signature_keys_round_trip_and_old_records_read() -> None:
    sigs = {1: BASE, 2: dataclasses.replace(BASE, oid=2, key=("a",), identity=INDEX)}
    assert signatures_from_bytes(signatures_to_bytes(sigs)) == sigs
    old = signatures_to_bytes({1: dataclasses.replace(BASE, key=None)}).replace(
        b', "key": null', b""
    )
    assert b'"key"' not in old
    assert signatures_from_bytes(old)[1].key is None
    by_pk = signatures_to_bytes({2: dataclasses.replace(BASE, oid=2, key=())})
    assert b'"identity": null' in by_pk
    assert signatures_from_bytes(by_pk)[2].key is None, (
        "recorded with primary keys only: a table without one may have been keyed by its "
        "identity index"
    )
    full = {3: dataclasses.replace(BASE, oid=3, key=(), identity=FULL)}
    assert signatures_from_bytes(signatures_to_bytes(full)) == full


def test_relation_messages_tell_a_new_key() -> None:
    def rel(*keys: str) -> m.Relation:
        return m.Relation(
            None,
            42,
            "public",
            "t",
            m.ReplicaIdentity.DEFAULT,
            tuple(m.RelationColumn(n, INT4, -1, n in keys) for n in ("id", "a")),
        )

    diff = compare_relations(rel("id"), rel("a", "id"))
    assert diff.changed and diff.rekeyed == (("id",), ("id", "a"))
    assert diff.describe() == "key (id) → (id, a)"
    assert not compare_relations(rel("id"), rel("id")).changed


def test_retiring_jobs_round_trip_and_restart_when_queued_again() -> None:
    progress = Progress()
    job = progress.add(Job(1, "public.t", "column id changed type", retire_keys=True))
    job.retiring, job.retired, job.after = True, 3, ("9",)
    again = Progress.from_bytes(progress.to_bytes())
    assert again.jobs == [job]
    again.jobs[0].retiring = False  # the old keys were deleted, rows are being sent
    merged = again.add(Job(1, "public.t", "column v renamed to w"))
    assert merged.retire_keys and not merged.retiring and merged.after is None, (
        "no new key change: the rows are sent again from the start, no new retirement"
    )
    merged = again.add(Job(1, "public.t", "key", retire_keys=True))
    assert merged.retiring, "a new key change retires again"
    jobs = Jobs(signals=False)
    jobs.progress = again
    jobs.retired(merged, 4)
    assert not merged.retiring and merged.retired == 7 and jobs.progress.jobs == [merged]


def codec(key_type: int, table: str = "t", *, key: bool = True) -> TableCodec:
    return TableCodec(
        db="app",
        schema="public",
        table=table,
        columns=[ColumnSpec("id", key_type, -1, key), ColumnSpec("v", TEXT, -1, False)],
        catalog=MappingCatalog(),
        unchanged_sentinel=object(),
        warn=lambda _m: None,
        namespace_prefix="p",
    )


SOURCE = Source("app", "public", "t", 0x100, 0x100, 1, 0, 0)


def old_events(ids: list[int]) -> tuple[dict[bytes, bytes], SchemaRegistry]:
    """Kafka key → value fingerprint of int-keyed rows, and the registry of their schemas."""
    c = codec(INT4)
    out = {}
    for i in ids:
        key, value = c.encode_change("c", None, [str(i), "x"], SOURCE, 0)
        assert key is not None
        out[key] = bytes(value[2:10])
    assert c.key_schema_json is not None
    return out, SchemaRegistry([c.key_schema_json, c.value_schema_json])


def test_key_texts_of_old_and_new_keys() -> None:
    keys, registry = old_events([5])
    assert [key_text(k, registry) for k in keys] == ["[5]"]
    assert KeyTexts(codec(TEXT)).of(("5",)) == '["5"]'
    assert KeyTexts(codec(INT8)).of(("5",)) == "[5]", "int → bigint keeps the text"
    new = codec(TEXT)
    assert new.key_fingerprint is not None
    assert old_schema(keys, new.key_fingerprint) == 1
    assert old_schema(keys, codec(INT4).key_fingerprint or b"") == 0


def test_keys_of_other_columns_go_whatever_their_text() -> None:
    """(id) → (a), both int (the identity index replaced): an old key ``{id: 5}`` names no
    row of now even when a row has the key ``{a: 5}`` (text ``[5]``), and a streamed change
    of ``[5]`` while the keys are read does not keep it."""
    keys, registry = old_events([5, 6])
    by_a = TableCodec(
        db="app",
        schema="public",
        table="t",
        columns=[ColumnSpec("id", INT4, -1, False), ColumnSpec("a", INT4, -1, True)],
        catalog=MappingCatalog(),
        unchanged_sentinel=object(),
        warn=lambda _m: None,
        namespace_prefix="p",
    )
    texts = KeyTexts(by_a)
    retire = RetireSet.build(keys, registry, texts, ("a",))
    gone = retire.gone({texts.of(("5",)), texts.of(("6",))})
    assert [t.startswith(OTHER_COLUMNS) for (t,), _ in gone] == [True, True]
    window = ChunkWindow("c1", gone, Visibility(90, 100))
    window.watermark("low")
    window.change(100, retire.window_keys([("5",), ("6",)]))
    window.watermark("high")
    assert len(window.remaining()) == 2, "both old keys are deleted"
    assert key_columns(registry.schema_json(next(iter(keys))[2:10])) == ("id",)
    same = RetireSet.build(keys, registry, KeyTexts(codec(INT8)), ("id",))
    assert same.gone({"[5]"}) == [(("[6]",), ())], "the same column: by key text"


@settings(max_examples=60, deadline=None)
@given(
    old=st.sets(st.integers(-50, 50), max_size=25),
    present=st.sets(st.integers(-50, 50), max_size=25),
    as_text=st.booleans(),
)
def test_only_keys_no_row_has_are_deleted(old: set[int], present: set[int], as_text: bool) -> None:
    """int → text: every old key is deleted; int → bigint: those no row has now."""
    keys, registry = old_events(sorted(old))
    new = codec(TEXT if as_text else INT8)
    texts = KeyTexts(new)
    retire = RetireSet.build(keys, registry, texts, ("id",))
    now = {texts.of((str(i),)) for i in present}
    gone = {t for (t,), _ in retire.gone(now)}
    want = {f"[{i}]" for i in old} if as_text else {f"[{i}]" for i in old - present}
    assert gone == want


def test_live_keys_before_a_position() -> None:
    c = codec(INT4)
    live = LiveKeys()
    for i, lsn in ((1, 10), (2, 30), (3, 5)):
        key, value = c.encode_change("c", None, [str(i), "x"], SOURCE, 0)
        live.add(key, value, (lsn, 0))
    key, value = c.encode_change("d", [str(3), None], None, SOURCE, 0)
    live.add(key, value, (15, 0))  # key 3 deleted
    assert len(live.live()) == 2
    _, registry = old_events([])
    assert [decode(k, registry)["id"] for k in live.live(before=(20, 0))] == [1]


# ------------------------------------------------------------------ the retirement chunk


@dataclasses.dataclass
class Txn:
    xid: int
    commit_lsn: int
    commit_ts_us: int = 0


def run_retirement(
    old: list[int], touched: list[int], before_low: bool, *, keyless: bool = False
) -> list[dict[str, Any]]:
    """A retirement chunk for the int keys ``old`` after ``int`` → ``bigint`` (no row has
    any of them now) while a streamed transaction inserts the keys ``touched`` (between
    the watermarks, or before the low one but invisible to the chunk's snapshot): the
    deletes it writes.  ``keyless``: after the table lost its key columns instead (REPLICA
    IDENTITY FULL without a primary key)."""
    keys, registry = old_events(old)
    new = codec(INT8, key=not keyless)
    texts = None if keyless else KeyTexts(new)
    key_names = () if keyless else ("id",)
    retire = RetireSet.build(keys, registry, texts, key_names)
    jobs = Jobs(signals=False)
    jobs.queue(Job(7, "public.t", "column id changed type", retire_keys=True))
    job = jobs.progress.jobs[0]
    job.retiring = True
    tracker = ChunkTracker(jobs, db="app", signal_name=None, clock_us=lambda: 0)
    columns = (m.RelationColumn("id", INT8, -1, True), m.RelationColumn("v", TEXT, -1, keyless))
    identity = FULL if keyless else DEFAULT
    tracker.message(m.Relation(None, 7, "public", "t", identity, columns), None)
    # the writer's xid 95 is running in the chunk's snapshot (before_low), or later (110)
    visibility = Visibility(90, 100, frozenset({95}))
    tracker.chunk = InFlightChunk(
        chunk_id="c1",
        job=job,
        generation=jobs.generations[7],
        window=ChunkWindow("c1", retire.gone(set()), visibility),
        codec=new,
        topic="p.public.t",
        key_names=key_names,
        last_key=None,
        complete=True,
        retire=retire,
    )

    def mark(kind: str, xid: int, lsn: int) -> None:
        content = Watermark("c1", kind).to_json().encode()
        msg = m.LogicalMessage(xid, True, lsn, "fieldsync.snapshot", content)
        tracker.message(msg, Txn(xid, lsn))

    def write() -> None:
        txn = Txn(95 if before_low else 110, 150 if before_low else 250)
        for i in touched:
            tracker.message(m.Insert(txn.xid, 7, (str(i), "w")), txn)

    if before_low:
        write()
    mark("low", 101, 200)
    if not before_low:
        write()
    mark("high", 102, 300)
    outs = list(tracker.emit([TxnEnd(300, 301, 0, 0)]))
    deletes = [decode(o.value, registry) for o in outs if isinstance(o, OutEvent)]
    if keyless:
        assert jobs.progress.jobs == [], "no row is sent again: the job is over"
        assert KEYLESS_DONE.format(len(deletes)).startswith(f"done: {len(old)} old key(s)")
    else:
        assert jobs.progress.jobs == [job] and not job.retiring, "the rows are sent next"
        assert job.retired == len(deletes)
    end = outs[-1]
    assert isinstance(end, TxnEnd) and end.events == len(deletes)
    return deletes


def test_retirement_deletes_are_placed_at_the_high_watermark() -> None:
    deletes = run_retirement([1, 2, 3], [], before_low=False)
    assert sorted(d["before"]["id"] for d in deletes) == [1, 2, 3]
    assert {d["source"]["origin"] for d in deletes} == {RETIRE_ORIGIN}
    positions = [(d["source"]["commit_lsn"], d["source"]["seq"]) for d in deletes]
    assert positions == [(300, 0), (300, 1), (300, 2)]


@settings(max_examples=40, deadline=None)
@given(
    old=st.sets(st.integers(1, 30), min_size=1, max_size=15),
    touched=st.sets(st.integers(1, 40), max_size=10),
    before_low=st.booleans(),
    keyless=st.booleans(),
)
def test_a_delete_never_follows_a_change_of_its_key_text(
    old: set[int], touched: set[int], before_low: bool, keyless: bool
) -> None:
    """A key text a streamed change touched while the keys were read (between the
    watermarks, or before them and invisible to the snapshot) is not deleted: its row may
    exist after the change, which precedes the deletes in the stream.  A table left without
    key columns (REPLICA IDENTITY FULL, DEFAULT or NOTHING without a primary key) has no
    key text now, so no streamed change writes an old key again: every old key is deleted,
    and the job ends (no row is sent again)."""
    deletes = run_retirement(sorted(old), sorted(touched), before_low, keyless=keyless)
    gone = old if keyless else old - touched
    assert sorted(d["before"]["id"] for d in deletes) == sorted(gone)
