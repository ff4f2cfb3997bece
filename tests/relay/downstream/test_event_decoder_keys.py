"""The bucket engine's decoder names a row by the key schema of the event that carries it
(relay/downstream/event_decoder.py), whatever key the rules were loaded with: after the
primary key of ``public.gauges`` is redefined from ``(id)`` to ``(site, id)``, the events
written under the old key (inserts, cdc's deletes of the old keys) name ``[5]`` and those
under the new key ``[5, "plant-2"]`` (key columns in the table's column order), for a relay
started before the change and for one started after it; applied by the planner, the rows
held in the end are those of the new key wherever the relay restarted (before the change,
between cdc's deletes of the old keys and the rows sent again, never, or a store rebuilt
from the topic)."""

from __future__ import annotations

import json

import pytest

from core.avro_envelope import HEADER_LEN, MAGIC, SchemaRegistry, Source, TableCodec
from core.errors import DecodeError
from core.pg_types import ColumnSpec, MappingCatalog
from relay.downstream.bucket_store import ChangeKind
from relay.downstream.event_decoder import EventDecoder, schema_key, stale_keys
from relay.downstream.planner import RowRef, RowState, plan_changes
from relay.downstream.rules import Rules, TableInfo
from relay.downstream.rules_parser import rules_from_mapping
from relay.errors import RowError

TABLE = "public.gauges"
SOURCE = Source("app", "public", "gauges", 0x3000, 0x3000, 1, 0, 0)
RETIRE = Source("app", "public", "gauges", 0x4000, 0x4000, 2, 0, 0, origin="fieldsync.retire")


def codec(key: set[str]) -> TableCodec:
    return TableCodec(
        db="app",
        schema="public",
        table="gauges",
        columns=[
            ColumnSpec("id", 23, -1, "id" in key),
            ColumnSpec("site", 25, -1, "site" in key),
            ColumnSpec("qty", 23, -1, False),
        ],
        catalog=MappingCatalog(),
        unchanged_sentinel=object(),
        warn=lambda _m: None,
        namespace_prefix="p",
    )


OLD, NEW = codec({"id"}), codec({"site", "id"})


def rules(key: tuple[str, ...]) -> Rules:
    return rules_from_mapping(
        {"bucket": [{"name": "all", "table": [{"table": TABLE}]}]},
        {TABLE: TableInfo(("id", "site", "qty"), key)},
    )


def registry() -> SchemaRegistry:
    reg = SchemaRegistry()
    for c in (OLD, NEW):
        assert c.key_schema_json is not None
        reg.add(c.value_schema_json)
        reg.add(c.key_schema_json)
    return reg


@pytest.mark.parametrize("loaded", [("id",), ("id", "site")], ids=["before", "after"])
def test_rows_are_named_by_their_events_key_schema(loaded: tuple[str, ...]) -> None:
    decoder = EventDecoder(registry(), rules(loaded))
    old_key, insert = OLD.encode_change("c", None, ["5", "plant-2", "50"], SOURCE, 0)
    retire_key, retire = OLD.encode_change("d", ["5", None, None], None, RETIRE, 0)
    new_key, resent = NEW.encode_change("r", None, ["5", "plant-2", "50"], SOURCE, 0)
    assert old_key == retire_key and old_key != new_key

    assert decoder.change(insert, (1, 0), old_key).key == (5,)
    gone = decoder.change(retire, (2, 0), retire_key)
    assert (gone.kind, gone.key) == (ChangeKind.DELETE, (5,))
    again = decoder.change(resent, (3, 0), new_key)
    assert (again.kind, again.key) == (ChangeKind.UPSERT, (5, "plant-2"))
    # no Kafka key (a table without key columns, a caller passing none): the rules' key
    assert decoder.change(resent, (3, 0)).key == tuple(
        {"id": 5, "site": "plant-2"}[c] for c in loaded
    )


def test_an_update_changing_the_key_names_both_keys_by_the_events_schema() -> None:
    decoder = EventDecoder(registry(), rules(("id",)))
    key, moved = NEW.encode_change(
        "u", ["5", "plant-2", None], ["5", "plant-3", "50"], SOURCE, 0, before_kind="key"
    )
    change = decoder.change(moved, (4, 0), key)
    assert (change.key, change.old_key) == ((5, "plant-3"), (5, "plant-2"))


def test_an_unknown_key_schema_is_an_unknown_fingerprint() -> None:
    reg = SchemaRegistry()
    reg.add(NEW.value_schema_json)
    key, value = NEW.encode_change("c", None, ["5", "plant-2", "50"], SOURCE, 0)
    assert key is not None
    with pytest.raises(DecodeError, match="unknown Avro schema fingerprint"):
        EventDecoder(reg, rules(("id",))).change(value, (1, 0), key)
    # a key that is not single-object encoded names nothing: the rules' key
    assert EventDecoder(registry(), rules(("id",))).key_columns(b"plain") is None
    assert EventDecoder(registry(), rules(("id",))).key_columns(MAGIC + key[2:HEADER_LEN]) == (
        "id",
        "site",
    )


def test_a_row_lacking_a_column_of_its_key_schema_is_a_row_error() -> None:
    decoder = EventDecoder(registry(), rules(("id",)))
    key, _ = NEW.encode_change("c", None, ["5", "plant-2", "50"], SOURCE, 0)
    with pytest.raises(RowError, match=r"no column 'site' of its event's key schema \(id, site\)"):
        decoder._key_of(TABLE, {"id": 5}, decoder.key_columns(key))


@pytest.mark.parametrize("restart_at", range(7))
def test_the_store_ends_with_the_rows_of_the_new_key_wherever_the_relay_restarted(
    restart_at: int,
) -> None:
    """Events of ``gauges`` before and after its key changed, applied by the planner with the
    rules of a relay started before the change (``(id)``) up to event ``restart_at`` and
    after it (``(id, site)``) from there on: 0 is a store rebuilt from the topic, 4 a
    restart between cdc's deletes of the old keys and the rows sent again, 6 no restart."""
    events = [
        OLD.encode_change("c", None, ["5", "plant-2", "50"], SOURCE, 0),
        OLD.encode_change("c", None, ["6", "plant-0", "60"], SOURCE, 0),
        OLD.encode_change("d", ["6", None, None], None, SOURCE, 0),  # before the key change
        OLD.encode_change("d", ["5", None, None], None, RETIRE, 0),  # cdc's delete of [5]
        NEW.encode_change("r", None, ["5", "plant-2", "50"], SOURCE, 0),
        NEW.encode_change("c", None, ["7", "plant-1", "70"], SOURCE, 0),
    ]
    states: dict[RowRef, RowState] = {}
    for i, (key, value) in enumerate(events):
        loaded = rules(("id",) if i < restart_at else ("id", "site"))
        change = EventDecoder(registry(), loaded).change(value, (i + 1, 0), key)
        plan = plan_changes(loaded, [change], states, {})
        states.update(plan.resolve(100 * (i + 1)))
    held = sorted(ref[1] for ref, state in states.items() if state.entries)
    assert held == ['[5,"plant-2"]', '[7,"plant-1"]']


def test_tables_whose_latest_key_is_not_the_loaded_one_are_stale() -> None:
    assert OLD.key_schema_json is not None and NEW.key_schema_json is not None
    assert schema_key(json.loads(NEW.key_schema_json)) == (TABLE, ("id", "site"))
    assert schema_key(json.loads(NEW.value_schema_json)) is None
    assert stale_keys({TABLE: ("id", "site")}, rules(("id",))) == {TABLE: (("id",), ("id", "site"))}
    assert stale_keys({TABLE: ("id", "site")}, rules(("id", "site"))) == {}
    assert stale_keys({"public.other": ("x",)}, rules(("id",))) == {}, "not ruled"
