"""Tables dropped and created again, renamed away, or no longer published: the recorded
catalog against the catalog of now by oid and by name (cdc/ddl_detection.py
``compare_catalogs``, the recorded catalog's ``unpublished`` tables), and the catalog
checks acting on it (cdc/resnapshot_catalog.py, with the catalog reads replaced)."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import psycopg
import pytest

from cdc import pgoutput_messages as m
from cdc import resnapshot_catalog
from cdc.ddl_detection import (
    ColumnFacts,
    TableSignature,
    compare_catalogs,
    recorded_catalog_from_bytes,
    signatures_from_bytes,
    signatures_to_bytes,
    unpublished_warning,
)
from cdc.resnapshot_catalog import CatalogChecks
from cdc.resnapshot_stream import ChunkTracker, Jobs
from tests.cdc.cdc_support import make_settings

INT4, TEXT = 23, 25
DONE = "its old rows are deleted and its rows sent again"


def col(attnum: int, name: str, type_oid: int = INT4, version: str = "700") -> ColumnFacts:
    return ColumnFacts(
        attnum, name, type_oid, -1, {INT4: "integer", TEXT: "text"}[type_oid], False, version
    )


def sig(oid: int, table: str = "t", key: tuple[str, ...] = ("id",), **kw: Any) -> TableSignature:
    columns = kw.pop("columns", (col(1, "id"), col(2, "v", TEXT)))
    return TableSignature(
        oid, "public", table, 5000 + oid, columns, key=key, identity=m.ReplicaIdentity.DEFAULT, **kw
    )


T1, U3 = sig(1), sig(3, "u")


def test_a_name_back_under_a_new_oid_is_a_replaced_table() -> None:
    got = compare_catalogs({1: T1, 3: U3}, {}, {2: sig(2), 3: U3})
    t, u = got.tables
    assert (t.new.oid, t.old, t.replaced) == (2, None, T1)
    assert t.retire_keys and t.reasons() == [f"dropped and created again (oid 1 → 2): {DONE}"]
    assert (u.old, u.replaced, u.retire_keys, u.reasons()) == (U3, None, False, [])
    assert got.unpublished == () and got.remembered == {}, "the name is published: not gone"


def test_other_key_columns_after_the_drop_still_retire_the_old_keys() -> None:
    other = sig(2, key=("code",), columns=(col(1, "code", TEXT), col(2, "v", TEXT)))
    (t,) = compare_catalogs({1: T1}, {}, {2: other}).tables
    assert t.replaced == T1 and t.retire_keys
    assert t.before == T1, "identity warnings compare with the table it replaced"


def test_renamed_away_and_created_again() -> None:
    """ALTER TABLE t RENAME TO t_old; CREATE TABLE t …: t_old is a rename (its rows go to a
    new topic), t replaces the table recorded under its name."""
    got = compare_catalogs({1: T1}, {}, {1: sig(1, "t_old"), 2: sig(2)})
    old, new = got.tables
    assert old.replaced is None and not old.retire_keys
    assert old.reasons() == ["table renamed from public.t (its rows go to a new topic)"]
    assert new.replaced == T1 and new.replaced_now == "public.t_old" and new.retire_keys
    assert new.reasons() == [
        "replaced by another table of the same name (oid 1 → 2; oid 1 is public.t_old now): " + DONE
    ]
    assert got.unpublished == ()


def test_renamed_away_alone_leaves_the_name_unpublished() -> None:
    got = compare_catalogs({1: T1}, {}, {1: sig(1, "t_old")})
    assert got.unpublished == (T1,) and got.remembered == {"public.t": T1}
    (renamed,) = got.tables
    assert renamed.replaced is None and renamed.old == T1


def test_a_dropped_table_is_remembered_until_its_name_comes_back() -> None:
    dropped = compare_catalogs({1: T1, 3: U3}, {}, {3: U3})
    assert dropped.unpublished == (T1,) and dropped.remembered == {"public.t": T1}
    assert [c.new.oid for c in dropped.tables] == [3]
    # later checks: still gone (no new warning), then created again
    still = compare_catalogs({3: U3}, dropped.remembered, {3: U3})
    assert still.unpublished == () and still.remembered == {"public.t": T1}
    back = compare_catalogs({3: U3}, still.remembered, {3: U3, 4: sig(4)})
    t = back.tables[1]
    assert t.replaced == T1 and t.retire_keys
    assert t.reasons() == [f"dropped and created again (oid 1 → 4): {DONE}"]
    assert back.remembered == {} and back.unpublished == ()


def test_published_again_under_the_same_oid() -> None:
    """ALTER PUBLICATION … DROP TABLE t, later ADD TABLE t (or SET UNLOGGED, SET LOGGED):
    changes in between were not sent."""
    (t,) = compare_catalogs({}, {"public.t": T1}, {1: T1}).tables
    assert t.replaced == T1 and t.old is None and t.retire_keys
    assert t.reasons() == [
        "published under this name again (changes made while it was not did not reach its "
        f"topic): {DONE}"
    ]


def test_a_listed_table_added_back_is_published_again() -> None:
    (same,) = compare_catalogs({1: T1}, {}, {1: T1}).tables
    assert same.reasons() == [] and not same.retire_keys
    (back,) = compare_catalogs({1: T1}, {}, {1: T1}, republished={"public.t"}).tables
    assert back.replaced == T1 and back.retire_keys
    (new,) = compare_catalogs({}, {}, {5: sig(5, "n")}, republished={"public.n"}).tables
    assert (new.old, new.replaced, new.reasons()) == (None, None, []), (
        "never recorded: judged as a table added to the publication"
    )


def test_a_changed_signature_under_a_replaced_name_gives_both_reasons() -> None:
    """Renamed into a name another recorded table had: both topics are read again, the old
    keys of the name's topic deleted first."""
    got = compare_catalogs({1: T1, 3: U3}, {}, {3: sig(3, "t")})
    (t,) = got.tables
    assert t.old == U3 and t.replaced == T1 and t.retire_keys
    assert t.reasons()[1] == "table renamed from public.u (its rows go to a new topic)"
    assert got.unpublished == (U3,)


def test_recorded_catalog_round_trips_and_old_records_read() -> None:
    gone = {"public.t": T1}
    data = signatures_to_bytes({3: U3}, gone)
    assert recorded_catalog_from_bytes(data) == ({3: U3}, gone)
    assert signatures_from_bytes(data) == {3: U3}
    old = json.loads(data)
    del old["unpublished"]
    assert recorded_catalog_from_bytes(json.dumps(old).encode()) == ({3: U3}, {})
    assert json.loads(signatures_to_bytes({3: U3}))["unpublished"] == []


def test_unpublished_warning_names_the_table_the_topic_and_the_way_out() -> None:
    text = unpublished_warning(T1, "fieldsync", "fs.public.t")
    assert text.startswith("public.t (oid 1) is no longer published")
    assert "publication fieldsync" in text and "stay in Kafka (fs.public.t)" in text
    assert "create public.t again, empty" in text and "TRUNCATE" in text


# --------------------------------------------------------------------------- the checks


class FakeConn:
    def __init__(self, all_tables: bool) -> None:
        self.all_tables = all_tables

    def execute(self, query: str, params: Any = None) -> FakeConn:
        assert "puballtables" in query, query
        return self

    def fetchone(self) -> tuple[bool]:
        return (self.all_tables,)


class Catalog:
    """What the checks read, set by the test: the signatures, the listed tables' state."""

    def __init__(self) -> None:
        self.now: dict[int, TableSignature] = {}
        self.added: list[str] = []
        self.missing: list[str] = []
        self.listed_calls = 0
        self.refused = False

    def read_signatures(self, conn: Any, publication: str) -> dict[int, TableSignature]:
        return dict(self.now)

    def add_listed_tables(self, conn: Any, name: str, tables: Any) -> tuple[list[str], list[str]]:
        self.listed_calls += 1
        if self.refused:
            raise psycopg.errors.InsufficientPrivilege("must be owner of table t")
        added, self.added = self.added, []
        return added, list(self.missing)


def checks_with(
    monkeypatch: pytest.MonkeyPatch, catalog: Catalog, *, tables: str = "", **env: str
) -> tuple[CatalogChecks, Jobs]:
    monkeypatch.setattr(resnapshot_catalog, "read_signatures", catalog.read_signatures)
    monkeypatch.setattr(resnapshot_catalog, "add_listed_tables", catalog.add_listed_tables)
    settings = make_settings(
        "postgresql://x@localhost/db", "localhost:9092", "fs", postgres_tables=tables, **env
    )
    jobs = Jobs(signals=False)
    tracker = ChunkTracker(jobs, db="db", signal_name=None, clock_us=lambda: 0)
    conn = FakeConn(all_tables=not tables)
    return CatalogChecks(settings, jobs, tracker, lambda: conn), jobs  # type: ignore[arg-type,return-value]


def test_checks_queue_a_retiring_job_for_a_table_dropped_and_created_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = Catalog()
    checks, jobs = checks_with(monkeypatch, catalog)
    checks.signatures = {1: T1, 3: U3}  # as read back from Kafka at start
    catalog.now = {2: sig(2), 3: U3}
    checks.check()
    (job,) = jobs.progress.jobs
    assert (job.oid, job.table, job.retire_keys, job.retiring) == (2, "public.t", True, True)
    assert job.reason == f"dropped and created again (oid 1 → 2): {DONE}"
    assert checks.signatures == catalog.now and checks.dirty and checks.unpublished == {}
    # dropped for good: a warning, remembered in the recorded catalog
    checks.dirty = False
    catalog.now = {3: U3}
    with caplog.at_level(logging.WARNING, logger="fieldsync.cdc"):
        checks.check()
        checks.check()
    warned = [r.getMessage() for r in caplog.records if "no longer published" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("public.t (oid 2)")
    assert "fs.public.t" in warned[0]
    assert checks.dirty and checks.unpublished == {"public.t": sig(2)}
    _, unpublished = recorded_catalog_from_bytes(
        signatures_to_bytes(checks.signatures, checks.unpublished)
    )
    assert unpublished == {"public.t": sig(2)}
    # created again: the old rows go
    catalog.now = {3: U3, 9: sig(9)}
    checks.check()
    assert [(j.oid, j.retire_keys) for j in jobs.progress.jobs] == [(2, True), (9, True)]
    assert checks.unpublished == {}


def test_checks_of_a_listed_table_added_back_or_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = Catalog()
    checks, jobs = checks_with(monkeypatch, catalog, tables="public.t,public.u")
    checks.signatures = {1: T1, 3: U3}
    catalog.now = {1: T1, 3: U3}
    catalog.added = ["public.t"]  # taken out of the publication, added back by the check
    with caplog.at_level(logging.WARNING, logger="fieldsync.cdc"):
        checks.check()
    (job,) = jobs.progress.jobs
    assert (job.oid, job.retire_keys) == (1, True) and job.reason.startswith("published under")
    assert any("added it back" in r.getMessage() for r in caplog.records)
    caplog.clear()
    catalog.now, catalog.missing = {3: U3}, ["public.t"]
    with caplog.at_level(logging.WARNING, logger="fieldsync.cdc"):
        checks.check()
        checks.check()
    missing = [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()]
    assert len(missing) == 1 and missing[0].startswith("public.t is listed in postgres.tables")
    assert catalog.listed_calls == 3
    # adding back refused (the daemon's role does not own the new table): warned once, the
    # other tables are still checked
    caplog.clear()
    catalog.refused = True
    catalog.now = {3: dataclasses.replace(U3, columns=(*U3.columns, col(3, "c", TEXT)), filenode=1)}
    with caplog.at_level(logging.WARNING, logger="fieldsync.cdc"):
        checks.check()
        checks.check()
    refused = [r.getMessage() for r in caplog.records if "cannot add" in r.getMessage()]
    assert len(refused) == 1 and "must be owner of table t" in refused[0]
    assert [j.oid for j in jobs.progress.jobs] == [1, 3]


def test_checks_with_resnapshots_off_say_the_old_rows_stay(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = Catalog()
    checks, jobs = checks_with(monkeypatch, catalog, cdc_resnapshot_on_ddl="false")
    checks.signatures = {1: T1}
    catalog.now = {2: dataclasses.replace(sig(2))}
    with caplog.at_level(logging.WARNING, logger="fieldsync.cdc"):
        checks.check()
    assert jobs.progress.jobs == []
    (text,) = [r.getMessage() for r in caplog.records]
    assert "dropped and created again" in text and "the table it replaced stay in Kafka" in text


def test_a_relation_of_a_table_not_recorded_makes_a_check_due(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    catalog = Catalog()
    checks, _ = checks_with(monkeypatch, catalog, cdc_ddl_check_interval_s="0")
    checks.signatures = {1: T1}
    catalog.now = {1: T1}
    checks.check()
    assert not checks.due()
    rel = m.Relation(None, 1, "public", "t", m.ReplicaIdentity.DEFAULT, ())
    checks.stream.message(rel, None)
    assert not checks.due(), "a table the catalog has"
    checks.stream.message(dataclasses.replace(rel, oid=2), None)
    assert checks.due(), "a table new since the recorded catalog"
