"""The applier follows changes of the captured tables' definitions while it runs, against
real PostgreSQL and the broker: a column added, a key redefined over other columns of the
same arity (entries name their key columns, so values of one key are never taken as
values of the other), and a change the rules no longer fit (logged, the earlier
definitions kept)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import psycopg
import pytest

from core.journal_format import JournalRecord
from core.values import Kind
from relay.downstream.table_follower import catalog_mark
from relay.upstream.applier_db import ApplierDb
from relay.upstream.conflict_desk import ConflictDesk
from tests.relay.upstream.test_applier import Env, insert_base, seen
from tests.relay.upstream.test_applier import env as env  # the fixture: the tables, rules, topics


def named(record: JournalRecord, *columns: str) -> JournalRecord:
    """``record`` with its entry naming its key columns, as devices send them."""
    assert record.entry is not None
    return dataclasses.replace(
        record, entry=dataclasses.replace(record.entry, key_columns=tuple(columns))
    )


def kinds(env: Env, device: str, seqs: range) -> dict[int, tuple[str, Any]]:
    outs = env.outcomes(expect=len(seqs))
    return {s: (outs[(device, s)].kind.value, outs[(device, s)].reason) for s in seqs}


def test_a_column_added_while_the_applier_runs_is_written_without_a_restart(env: Env) -> None:
    base = insert_base(env)
    env.produce(named(env.record("d1", "update", [1], seen(base), {"notes": "n1"}), "id"))
    applier = env.run()  # the applier has read the catalog
    env.sql("alter table work_orders add column priority int")
    env.produce(
        named(env.record("d1", "update", [1], {"priority": None}, {"priority": 2}), "id"),
        # a column the table does not have stays unknown
        named(env.record("d1", "update", [1], {"colour": None}, {"colour": "red"}), "id"),
    )
    env.run(applier)
    assert kinds(env, "d1", range(1, 4)) == {
        1: ("applied", None),
        2: ("applied", None),
        3: ("rejected", "unknown_column"),
    }
    row = env.row("work_orders", 1)
    assert row is not None and (row["notes"], row["priority"]) == ("n1", 2)


def test_a_column_dropped_while_the_applier_runs_is_ignored_unless_an_entry_changes_it(
    env: Env,
) -> None:
    base = insert_base(env)
    applier = env.run()  # the applier has read the catalog
    env.sql("alter table work_orders drop column site")
    # it compares the catalog within a second, at once for an entry naming an unknown column
    probe = env.record("d2", "update", [1], {"colour": None}, {"colour": "red"}).entry
    assert probe is not None and applier.db.follow_catalog([probe]) is True
    env.produce(
        # made before the drop: old (and an insert's null) still name the column
        named(env.record("d1", "update", [1], seen(base), {"notes": "n1"}), "id"),
        named(
            env.record("d1", "insert", [2], None, {"id": 2, "technician": "t42", "site": None}),
            "id",
        ),
        named(env.record("d1", "update", [1], {**seen(base), "notes": "n1"}, {"site": "s2"}), "id"),
        named(
            env.record("d1", "delete", [2], {"id": 2, "technician": "t42", "site": None}, None),
            "id",
        ),
    )
    env.run(applier)
    assert kinds(env, "d1", range(1, 5)) == {
        1: ("applied", None),
        2: ("applied", None),
        3: ("rejected", "unknown_column"),
        4: ("applied", None),
    }
    message = env.outcomes(expect=4)[("d1", 3)].message
    assert message == (
        "entry 3 (public.work_orders): new changes 'site', which the table does not have "
        "(dropped or renamed on the server): the edit cannot be applied"
    )
    assert env.sql("select id, notes from work_orders order by id") == [(1, "n1")]


def test_a_key_redefined_while_the_applier_runs_names_the_right_row(env: Env) -> None:
    env.sql("insert into parts (id, name, stock) values ('p1', 'valve', 1), ('valve', 'gasket', 2)")
    env.produce(
        named(
            env.record("d1", "update", ["p1"], {"stock": 1}, {"stock": 10}, table="public.parts"),
            "id",
        )
    )
    applier = env.run()
    assert env.sql("select stock from parts where id = 'p1'") == [(10,)]
    # the same arity, the same type: 'valve' is an id of one row and a name of another
    env.sql("alter table parts drop constraint parts_pkey, add primary key (name)")
    # a device that synced the new schema names its rows by name
    env.produce(
        named(
            env.record(
                "d1", "update", ["valve"], {"stock": 10}, {"stock": 11}, table="public.parts"
            ),
            "name",
        )
    )
    env.run(applier)  # it re-read the table's key to judge that entry
    # an entry still named by the old key is refused, whatever row its values match (before
    # the applier knew the new key it would have named the row by id, as the device meant)
    env.produce(
        named(
            env.record(
                "d2", "update", ["valve"], {"stock": 2}, {"stock": 99}, table="public.parts"
            ),
            "id",
        )
    )
    env.run(applier)
    outs = env.outcomes(expect=3)
    assert (outs[("d1", 2)].kind.value, outs[("d1", 2)].reason) == ("applied", None)
    rejected = outs[("d2", 1)]
    assert (rejected.kind.value, rejected.reason) == ("rejected", "bad_key")
    assert "names the row by (id)" in rejected.message and "key is (name)" in rejected.message
    assert env.sql("select id, name, stock from parts order by id") == [
        ("p1", "valve", 11),
        ("valve", "gasket", 2),
    ]


def test_entries_naming_unknown_columns_do_not_reread_an_unchanged_catalog(env: Env) -> None:
    base = insert_base(env)
    applier = env.run()
    db = applier.db
    bogus = env.record("d1", "update", [1], {**seen(base), "colour": None}, {"colour": "red"})
    assert bogus.entry is not None
    tables = db.tables
    assert db.follow_catalog([bogus.entry]) is False
    assert db.tables is tables
    env.sql("alter table work_orders add column colour text")
    assert db.follow_catalog([bogus.entry]) is True
    assert "colour" in db.tables["public.work_orders"].columns
    # known now: nothing to re-read
    assert db.follow_catalog([bogus.entry]) is False


def test_a_change_the_rules_no_longer_fit_keeps_the_earlier_definitions(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    base = insert_base(env)
    applier = env.run()
    db = applier.db
    # the rules match work orders on technician: without it they cannot be bound
    env.sql("alter table work_orders drop column technician, add column colour text")
    entry = env.record("d1", "update", [1], {**seen(base), "colour": None}, {"colour": "red"}).entry
    assert entry is not None
    with caplog.at_level(logging.ERROR, logger="relay.upstream.applier"):
        assert db.follow_catalog([entry]) is False
        assert db.follow_catalog([entry]) is False
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors  # once per change
    assert "keeps their earlier definitions" in errors[0] and "technician" in errors[0]
    assert "technician" in db.tables["public.work_orders"].columns


def test_a_changed_catalog_is_noticed_without_an_entry_naming_the_change(env: Env) -> None:
    """Entries that name nothing new still let the applier compare the catalog mark, at
    most every CATALOG_CHECK_S: an entry under the old key that arrives after that is
    judged by the new key."""
    applier = env.run()
    db = applier.db
    env.sql("alter table parts drop constraint parts_pkey, add primary key (name)")
    deadline = time.monotonic() + 60
    while not db.follow_catalog([]):
        assert time.monotonic() < deadline, "the changed key was never noticed"
        time.sleep(0.05)
    assert db.tables["public.parts"].key == ("name",)


def test_the_conflict_desk_and_the_intake_types_follow_a_column_added(env: Env) -> None:
    """The relay's conflict desk (resolutions, and the column types the journal intake
    checks uploads against) re-reads the tables too: a new column's type is known."""
    desk = ConflictDesk(ApplierDb(env.dsn, env.rules, env.conflicts))
    try:
        assert "priority" not in desk.types()["public.work_orders"]
        env.sql("alter table work_orders add column priority int")
        deadline = time.monotonic() + 60
        while "priority" not in desk.types()["public.work_orders"]:
            assert time.monotonic() < deadline, "the desk never read the new column"
            time.sleep(0.05)
        assert desk.types()["public.work_orders"]["priority"].kind is Kind.INT
    finally:
        desk.close()


def test_the_catalog_mark_names_tables_as_the_catalog_does(env: Env) -> None:
    """Names are matched by schema and table name, not parsed as SQL: upper case and
    quotes work, a table that does not exist marks as absent, and a change shows."""
    env.sql('create table "Odd ""Name""" (id int primary key)')
    odd = 'public.Odd "Name"'
    with psycopg.connect(env.dsn, autocommit=True) as conn:
        first = catalog_mark(conn, [odd, "public.missing"])
        assert first.startswith(odd + ":") and first.endswith(";public.missing"), first
        assert catalog_mark(conn, [odd, "public.missing"]) == first
        env.sql('alter table "Odd ""Name""" add column x int')
        assert catalog_mark(conn, [odd, "public.missing"]) != first


def test_a_key_changed_while_the_catalog_is_read_leaves_a_consistent_view(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rules' view of a table and its metadata come from several catalog queries.  A
    key redefined between two of them (here: just before the metadata's query) must not
    leave the rules naming one key and the metadata another, which no mark compare would
    notice: both come from one snapshot, with the mark, and the change is taken at the
    next compare."""
    from relay.upstream import applier_catalog

    read_tables = applier_catalog.read_tables
    altered = []

    def alter_first(conn: psycopg.Connection[Any], tables: Any) -> Any:
        if not altered:
            altered.append(True)
            env.sql("alter table parts drop constraint parts_pkey, add primary key (name)")
        return read_tables(conn, tables)

    monkeypatch.setattr(applier_catalog, "read_tables", alter_first)
    db = ApplierDb(env.dsn, env.rules, env.conflicts)
    db.connect()
    try:
        assert altered
        assert db.rules is not None
        assert db.rules.table_info("public.parts").key == db.tables["public.parts"].key == ("id",)
        assert db.follow_catalog([]) is False  # compared at most once a second
        db._marked_at -= 60
        assert db.follow_catalog([]) is True  # the mark of the read's snapshot is behind
        assert db.rules.table_info("public.parts").key == ("name",)
        assert db.tables["public.parts"].key == ("name",)
    finally:
        db.close()
