"""replay's table state with re-snapshots: rows a re-snapshot chunk sends again (op ``r``,
``source.snapshot = "incremental"``) are upserts; only a restarted *initial* snapshot (a
later generation of ``snapshot = "true"`` reads) removes the rows it did not read."""

from __future__ import annotations

from core.avro_envelope import Source, TableCodec, decode
from core.pg_types import ColumnSpec, MappingCatalog
from replay.catalog import LogCatalog
from replay.events import ChangeEvent
from replay.state import LogState

UNCHANGED = object()


def codec(key: str) -> TableCodec:
    """The table ``(id, v)`` keyed by ``key``."""
    return TableCodec(
        db="app",
        schema="public",
        table="t",
        columns=[ColumnSpec("id", 20, -1, key == "id"), ColumnSpec("v", 25, -1, key == "v")],
        catalog=MappingCatalog(),
        unchanged_sentinel=UNCHANGED,
        warn=lambda _m: None,
        namespace_prefix="p",
    )


CODEC = codec("id")


def apply(
    state: LogState,
    catalog: LogCatalog,
    op: str,
    lsn: int,
    seq: int,
    row: list[str],
    snapshot: str,
    codec: TableCodec = CODEC,
) -> None:
    source = Source("app", "public", "t", lsn, lsn, 1, seq, lsn, snapshot, None)
    before, after = (row, None) if op == "d" else (None, row)
    key, value = codec.encode_change(op, before, after, source, 0)
    d = decode(value, catalog.registry)
    state.apply(
        ChangeEvent(
            "public.t",
            (lsn, seq),
            d["op"],
            d["before"],
            d["after"],
            d["before_kind"],
            d["unchanged"],
            d["source"],
            value[2:10],
            "p.public.t",
            0,
            lsn,
            key_fingerprint=None if key is None else key[2:10],
        )
    )


def new_state() -> tuple[LogState, LogCatalog]:
    catalog = LogCatalog("p")
    catalog.add(CODEC.value_schema_json)
    assert CODEC.key_schema_json is not None
    catalog.add(CODEC.key_schema_json)
    return LogState(catalog, ["public.t"]), catalog


def rows(state: LogState) -> dict[int, str]:
    return {r.values["id"]: r.values["v"] for r in state.tables["public.t"].rows.values()}


def test_a_resnapshot_chunk_keeps_the_rows_it_did_not_send() -> None:
    state, catalog = new_state()
    for seq, k in enumerate((1, 2, 3)):  # the initial snapshot
        apply(state, catalog, "r", 100, seq, [str(k), "a"], "true")
    apply(state, catalog, "r", 200, 0, ["1", "b"], "incremental")  # first chunk: key 1
    apply(state, catalog, "u", 300, 0, ["2", "c"], "false")  # a change after the chunk
    apply(state, catalog, "r", 400, 0, ["3", "d"], "incremental")  # next chunk: key 3
    state.finish()
    assert rows(state) == {1: "b", 2: "c", 3: "d"}


def test_a_restarted_initial_snapshot_removes_rows_it_did_not_read() -> None:
    state, catalog = new_state()
    for seq, k in enumerate((1, 2, 3)):
        apply(state, catalog, "r", 100, seq, [str(k), "a"], "true")
    for seq, k in enumerate((1, 3)):  # key 2 was deleted before the new snapshot
        apply(state, catalog, "r", 200, seq, [str(k), "a"], "true")
    apply(state, catalog, "c", 300, 0, ["4", "x"], "false")
    assert rows(state) == {1: "a", 3: "a", 4: "x"}


def test_rows_are_named_by_their_kafka_key_when_only_the_key_columns_changed() -> None:
    """``REPLICA IDENTITY USING INDEX`` on another column keeps the value schema's
    fingerprint (``pg.key`` is a property, outside it), so ``_schemas`` holds one of the two
    versions: rows are named by the schema of their Kafka key.  The old key's delete (cdc's
    retirement) and the row sent again under the new key leave one row."""
    by_v = codec("v")
    assert by_v.value_fingerprint == CODEC.value_fingerprint
    state, catalog = new_state()  # the value schema of the (id) key is the one recorded
    assert by_v.key_schema_json is not None
    catalog.add(by_v.key_schema_json)
    apply(state, catalog, "c", 10, 0, ["1", "a"], "false")
    apply(state, catalog, "c", 11, 0, ["2", "b"], "false", by_v)  # after the DDL
    apply(state, catalog, "d", 20, 0, ["1", None], "false")  # the retirement
    apply(state, catalog, "r", 20, 1, ["1", "a"], "incremental", by_v)
    apply(state, catalog, "u", 21, 0, ["1", "a"], "false", by_v)
    table = state.tables["public.t"]
    assert sorted(table.rows) == [("a",), ("b",)]
    assert rows(state) == {1: "a", 2: "b"}


def test_a_table_given_key_columns_drops_its_keyless_rows() -> None:
    """A table without key columns (a multiset of rows) given some (``ADD PRIMARY KEY``,
    ``REPLICA IDENTITY USING INDEX``): from its first keyed event on, its rows are those sent
    under a key (cdc sends every row again), not the keyless ones as well."""
    keyless = codec("")
    state, catalog = new_state()
    catalog.add(keyless.value_schema_json)
    apply(state, catalog, "c", 10, 0, ["1", "a"], "false", keyless)
    apply(state, catalog, "c", 11, 0, ["2", "b"], "false", keyless)
    apply(state, catalog, "c", 12, 0, ["4", "d"], "false", keyless)
    apply(state, catalog, "c", 20, 0, ["3", "c"], "false")  # keyed by id from here on
    apply(state, catalog, "d", 21, 0, ["2", None], "false")  # 2 deleted after the change
    apply(state, catalog, "r", 22, 0, ["1", "a"], "incremental")
    apply(state, catalog, "r", 22, 1, ["3", "c"], "incremental")
    apply(state, catalog, "r", 22, 2, ["4", "d"], "incremental")
    assert rows(state) == {1: "a", 3: "c", 4: "d"}
    assert sorted(state.tables["public.t"].rows) == [(1,), (3,), (4,)]
