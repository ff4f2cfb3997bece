"""The relay's table follower (relay/downstream/table_follower.py): which definitions count
as changed, the rules bound again from the rules file's content as read at start, and a
change the rules no longer fit (logged once, the rules in use kept), with a list of
definitions as the reader; and the catalog reader against PostgreSQL."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import psycopg
import pytest

from relay.downstream.rules import Rules, TableInfo
from relay.downstream.rules_parser import rules_from_mapping
from relay.downstream.table_follower import (
    CatalogReader,
    TableFollower,
    changed_tables,
    describe_change,
)
from relay.errors import EngineError
from relay.metrics import REGISTRY

DOCUMENT: dict[str, Any] = {
    "token_claims": ["crew"],
    "bucket": [
        {
            "name": "crew",
            "parameters": ["crew"],
            "claims": {"crew": "crew"},
            "table": [{"table": "public.jobs", "match": {"crew": "crew"}, "columns": ["state"]}],
        },
        {"name": "all", "table": [{"table": "public.sites"}]},
    ],
}
JOBS = TableInfo(("id", "crew", "state", "notes"), ("id",))
SITES = TableInfo(("code", "name"), ("code",))
START = {"public.jobs": JOBS, "public.sites": SITES, "public.other": TableInfo(("x",), ("x",))}


def bound(infos: Mapping[str, TableInfo]) -> Rules:
    return rules_from_mapping(DOCUMENT, infos, "rules.toml")


class Reads:
    """A reader returning each of ``results`` in turn (the last one again and again)."""

    def __init__(self, *results: Mapping[str, TableInfo]) -> None:
        self.results = list(results)
        self.calls = 0

    def __call__(self) -> Mapping[str, TableInfo]:
        self.calls += 1
        return self.results.pop(0) if len(self.results) > 1 else self.results[0]


def follower(reads: Reads, seen: list[Rules], interval_s: float = 0) -> TableFollower:
    return TableFollower(bound(START), DOCUMENT, reads, seen.append, interval_s)


def counted(result: str) -> float:
    """``fieldsync_relay_table_definitions_total{result}`` now."""
    found = REGISTRY.get_sample_value("fieldsync_relay_table_definitions_total", {"result": result})
    return found or 0.0


def test_changed_tables_are_the_rules_tables_with_other_columns_or_keys() -> None:
    rules = bound(START)
    assert changed_tables(rules, START) == {}
    assert changed_tables(rules, {}) == {}, "a table not read yet is no change"
    rekeyed = TableInfo(JOBS.columns, ("id", "crew"))
    other = {**START, "public.jobs": rekeyed, "public.other": TableInfo(("y",), ("y",))}
    assert changed_tables(rules, other) == {"public.jobs": (JOBS, rekeyed)}
    dated = TableInfo(SITES.columns, SITES.key, (("name", "date"),))
    assert list(changed_tables(rules, {**START, "public.sites": dated})) == ["public.sites"]


def test_describe_change_names_key_and_columns() -> None:
    now = TableInfo(("id", "crew", "state", "priority"), ("crew", "id"))
    assert describe_change("public.jobs", JOBS, now) == (
        "public.jobs: key (id) → (crew, id), columns +priority -notes"
    )
    assert describe_change("public.jobs", JOBS, TableInfo(JOBS.columns[::-1], JOBS.key)) == (
        "public.jobs: column order or types"
    )


def test_a_changed_key_rebinds_the_rules_and_a_column_list_follows_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rekeyed = {**START, "public.jobs": TableInfo((*JOBS.columns, "site"), ("id", "site"))}
    seen: list[Rules] = []
    f = follower(Reads(START, rekeyed), seen)
    before = counted("rebound")
    with caplog.at_level(logging.WARNING, logger="relay.downstream.table_follower"):
        assert f.check() is False
        assert f.check() is True
        assert f.check() is False, "bound to the definitions read: nothing new"
    assert len(seen) == 1 and f.rules is seen[0] and f.changes == 1
    assert counted("rebound") == before + 1
    new = seen[0]
    assert new.table_info("public.jobs").key == ("id", "site")
    # the rule's column list (state) always carries the key columns: now site as well
    row = {"id": 1, "crew": "c1", "state": "open", "notes": "n", "site": "s2"}
    assert new.project("public.jobs", "crew", row) == {"id": 1, "state": "open", "site": "s2"}
    assert bound(START).project("public.jobs", "crew", row) == {"id": 1, "state": "open"}
    assert new.buckets_for_row("public.jobs", row) == bound(START).buckets_for_row(
        "public.jobs", row
    )
    assert [r.getMessage() for r in caplog.records] == [
        "the captured tables changed; /v1/schema and the journal follow: "
        "public.jobs: key (id) → (id, site), columns +site"
    ]


def test_definitions_the_rules_no_longer_fit_are_logged_once_and_the_rules_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    no_crew = {**START, "public.jobs": TableInfo(("id", "state", "notes"), ("id",))}
    seen: list[Rules] = []
    f = follower(Reads(no_crew), seen)
    rules = f.rules
    before = counted("unfit")
    with caplog.at_level(logging.WARNING, logger="relay.downstream.table_follower"):
        assert f.check() is False
        assert f.check() is False
    assert seen == [] and f.rules is rules
    assert counted("unfit") == before + 1, "counted once per definition, as logged"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert "public.jobs: columns -crew" in errors[0] and "crew" in errors[0].split("rules")[-1]


def test_the_thread_checks_every_interval_and_survives_a_failed_read() -> None:
    rekeyed = {**START, "public.sites": TableInfo(SITES.columns, ("code", "name"))}
    failed = threading.Event()
    results: list[Mapping[str, TableInfo] | None] = [None, rekeyed]

    def read() -> Mapping[str, TableInfo]:
        found = results.pop(0) if len(results) > 1 else results[0]
        if found is None:
            failed.set()
            raise OSError("catalog unreachable")
        return found

    changed = threading.Event()
    seen: list[Rules] = []

    def on_change(rules: Rules) -> None:
        seen.append(rules)
        changed.set()

    f = TableFollower(bound(START), DOCUMENT, read, on_change, interval_s=0.01)
    with f.running():
        assert not f.idle
        assert changed.wait(60), "the follower did not rebind after a failed read"
    assert failed.is_set() and f.idle
    assert seen[0].table_info("public.sites").key == ("code", "name")


def test_an_interval_of_zero_starts_no_thread() -> None:
    reads = Reads(START)
    f = TableFollower(bound(START), DOCUMENT, reads, lambda _: None, interval_s=0)
    with f.running():
        assert f.idle
    assert reads.calls == 0


def test_the_catalog_reader_reads_the_catalog_again_only_when_the_mark_changed(
    pg_dsn: str,
) -> None:
    """Against PostgreSQL: one connection; the full read at the start and after a change
    of the rules' tables, not on every interval; an unreachable database is an error
    naming it, and the reader connects again afterwards."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table jobs (id int primary key, crew text, state text)")
        reader = CatalogReader(pg_dsn, None, ["public.jobs"])
        try:
            kinds = (("id", "int"), ("crew", "text"), ("state", "text"))
            assert reader()["public.jobs"] == TableInfo(("id", "crew", "state"), ("id",), (), kinds)
            assert reader()["public.jobs"].key == ("id",)
            assert reader.reads == 1
            conn.execute("alter table jobs drop constraint jobs_pkey, add primary key (id, crew)")
            assert reader()["public.jobs"].key == ("id", "crew")
            assert reader.reads == 2
            conn.execute("alter table jobs alter column state type boolean using state = 'done'")
            assert reader()["public.jobs"].kinds == (*kinds[:2], ("state", "bool"))
            assert reader.reads == 3
            conn.execute("create table unrelated (x int)")  # not a rules table
            reader()
            assert reader.reads == 3
            reader.dsn = pg_dsn + " port=1"  # what a database gone away looks like
            reader.close()
            with pytest.raises(EngineError, match="cannot read the captured database's catalog"):
                reader()
            reader.dsn = pg_dsn
            assert reader()["public.jobs"].key == ("id", "crew")
        finally:
            reader.close()
