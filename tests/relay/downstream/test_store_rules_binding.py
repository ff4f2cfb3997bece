"""The bucket store remembers the placement of the rules it was built with
(relay/downstream/rules_placement.py, pg_store_schema.bind_placement): what counts as a
change of placement (pure), the store's verdicts against the real PostgreSQL, a relay
process refusing a store built under other rules, and cursors of another store (a
rebuilt one) answered with ``resync`` although their op ids are below the new store's."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay.downstream.bucket_store import ChangeKind, RowChange
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.pg_store_schema import SCHEMA
from relay.downstream.rules import Rules, TableInfo
from relay.downstream.rules_parser import load_rules, rules_from_mapping
from relay.downstream.rules_placement import (
    changed_tables,
    placement_changes,
    placement_of,
    placement_text,
)
from relay.errors import StoreRulesMismatch

ROOT = Path(__file__).resolve().parents[3]
T = "public.orders"
INFO = {
    T: TableInfo(("id", "tech", "status", "due", "notes", "cost"), ("id",), (("due", "date"),)),
}
DOC: dict[str, Any] = {
    "token_claims": ["tech", "team"],
    "bucket": [
        {
            "name": "tech",
            "description": "a technician's orders",
            "parameters": ["t"],
            "claims": {"t": "tech"},
            "table": [
                {
                    "table": T,
                    "match": {"tech": "t"},
                    "filters": [
                        {"column": "status", "op": "not in", "value": ["closed", "cancelled"]},
                        {"column": "due", "op": "!=", "value": "2024-05-01"},
                    ],
                    "exclude": ["cost"],
                }
            ],
        },
        {
            "name": "open",
            "table": [{"table": T, "columns": ["status", "notes"], "writable": False}],
        },
    ],
}


def rules(doc: dict[str, Any]) -> Rules:
    return rules_from_mapping(doc, INFO, "rules.toml")


def edited(**changes: Any) -> dict[str, Any]:
    """DOC with ``changes`` applied: ``path`` (``bucket.0.table.0.filters``) → value."""
    doc = copy.deepcopy(DOC)
    for path, value in changes.items():
        *parents, last = path.split("__")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is None:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return doc


# ----------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    "change",
    [
        {"bucket__0__description": "another text"},
        {"bucket__0__claims": {"t": "team"}},  # which buckets a token gets, not their rows
        {"bucket__1__table__0__writable": True},
        {"bucket__0__table__0__claim": True},
        {"token_claims": ["tech", "team", "site"]},
        {"bucket__0__table__0__filters__0__op": "NOT   IN"},  # spelled differently
        {"bucket__0__table__0__filters__0__value": ["cancelled", "closed"]},  # another order
        {"bucket__1__table__0__columns": ["notes", "status"]},  # listed in another order
    ],
)
def test_what_does_not_change_the_store_is_no_change(change: dict[str, Any]) -> None:
    before, after = rules(DOC), rules(edited(**change))
    assert placement_text(after) == placement_text(before)
    assert placement_changes(placement_of(before), placement_of(after)) == []


def test_rule_order_is_no_change() -> None:
    doc = copy.deepcopy(DOC)
    doc["bucket"].reverse()
    assert placement_text(rules(doc)) == placement_text(rules(DOC))


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (
            {"bucket__0__table__0__filters__0__value": ["closed"]},
            "bucket rule 'tech' table 'public.orders': filters",
        ),
        (  # a date filter compares the events' integers: 2024-05-02 is another value
            {"bucket__0__table__0__filters__1__value": "2024-05-02"},
            "bucket rule 'tech' table 'public.orders': filters",
        ),
        ({"bucket__0__table__0__filters": None}, "table 'public.orders': filters"),
        ({"bucket__0__table__0__match": {"status": "t"}}, "table 'public.orders': match"),
        (
            {"bucket__0__table__0__exclude": ["cost", "notes"]},
            'exclude ["cost"] → ["cost", "notes"]',
        ),
        (
            {"bucket__1__table__0__columns": ["status"]},
            "bucket rule 'open' table 'public.orders': columns",
        ),
        ({"bucket__1__table__0__columns": None}, 'columns ["notes", "status"] → null'),
        ({"bucket__1__name": "open_orders"}, "bucket rule 'open' was removed"),
    ],
)
def test_a_change_of_placement_is_named(change: dict[str, Any], line: str) -> None:
    before, after = rules(DOC), rules(edited(**change))
    assert placement_text(after) != placement_text(before)
    lines = placement_changes(placement_of(before), placement_of(after))
    assert lines and any(line in text for text in lines), lines


def test_changed_tables() -> None:
    base = placement_of(rules(DOC))
    assert changed_tables(base, base) == set()
    assert changed_tables(base, placement_of(rules(edited(bucket__1__table__0__columns=None)))) == {
        T
    }
    removed = copy.deepcopy(DOC)
    del removed["bucket"][1]
    assert changed_tables(base, placement_of(rules(removed))) == set()
    assert changed_tables(placement_of(rules(removed)), base) == {T}


def test_added_rules_and_parameters_are_named() -> None:
    doc = copy.deepcopy(DOC)
    doc["bucket"].append({"name": "all", "table": [{"table": T}]})
    doc["bucket"][0]["parameters"] = ["t", "s"]
    doc["bucket"][0]["claims"] = {"t": "tech", "s": "team"}
    doc["bucket"][0]["table"][0]["match"] = {"tech": "t", "status": "s"}
    lines = placement_changes(placement_of(rules(DOC)), placement_of(rules(doc)))
    assert "bucket rule 'all' was added" in lines
    assert 'bucket rule \'tech\': parameters ["t"] → ["t", "s"]' in lines


# ----------------------------------------------------------------------------- the store


def _row(i: int, tech: str) -> dict[str, Any]:
    return {"id": i, "tech": tech, "status": "open", "due": 0, "notes": "n", "cost": 1}


def _fill(store: PgBucketStore, r: Rules, n: int, lsn: int = 10) -> None:
    store.apply(
        r,
        [
            RowChange(T, ChangeKind.UPSERT, (lsn, i), (i,), _row(i, f"t{i % 2}"), insert=True)
            for i in range(n)
        ],
    )


def test_store_records_checks_and_refuses(pg_dsn: str) -> None:
    store = PgBucketStore(pg_dsn)
    store.migrate()
    old, new = rules(DOC), rules(edited(bucket__0__table__0__exclude=["cost", "notes"]))
    try:
        assert store.bind_rules(placement_text(old), "rules.toml", "fieldsync") == "recorded"
        assert store.bind_rules(placement_text(old), "rules.toml", "fieldsync") == "same"
        # nothing placed yet: other rules just take the store over
        assert store.bind_rules(placement_text(new), "rules.toml", "fieldsync") == "recorded"
        assert store.bind_rules(placement_text(old), "rules.toml", "fieldsync") == "recorded"
        _fill(store, old, 4)
        with pytest.raises(StoreRulesMismatch) as caught:
            store.bind_rules(placement_text(new), "/etc/fieldsync/rules.toml", "fieldsync")
        text = str(caught.value)
        assert text.startswith("/etc/fieldsync/rules.toml: these rules place rows differently")
        assert "in tables it already holds rows or offsets of (public.orders)" in text
        assert (
            'bucket rule \'tech\' table \'public.orders\': exclude ["cost"] → ["cost", "notes"]'
            in text
        )
        assert "Rebuild the bucket store" in text and f"drop schema {SCHEMA}" in text
        assert caught.value.changes == (
            'bucket rule \'tech\' table \'public.orders\': exclude ["cost"] → ["cost", "notes"]',
        )
        # the refusal changed nothing: the old rules still fit, the new ones still do not
        assert store.bind_rules(placement_text(old), "rules.toml", "fieldsync") == "same"
        with pytest.raises(StoreRulesMismatch):
            store.bind_rules(placement_text(new), "rules.toml", "fieldsync")
        # only a placement change is refused: the write rights may change at any time
        writable = rules(edited(bucket__1__table__0__writable=True))
        assert store.bind_rules(placement_text(writable), "rules.toml", "fieldsync") == "same"
    finally:
        store.close()


def test_store_that_kept_only_offsets_is_not_empty(pg_dsn: str) -> None:
    """Events read that placed no row under the old rules may place rows under new ones."""
    store = PgBucketStore(pg_dsn)
    store.migrate()
    try:
        store.bind_rules(placement_text(rules(DOC)), "rules.toml", "fieldsync")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                f"insert into {SCHEMA}.consumer_progress values ('fieldsync-relay', 'fieldsync.public.orders', 0, 5, 1, 0)"
            )
        with pytest.raises(StoreRulesMismatch):
            store.bind_rules(
                placement_text(rules(edited(bucket__1__name="other"))), "r.toml", "fieldsync"
            )
    finally:
        store.close()


def test_tables_the_store_holds_nothing_of_may_change(pg_dsn: str) -> None:
    """A table newly given to devices (its topic never read) is read from its beginning
    under the new rules; a rule removed as a whole is granted to no token any more."""
    info = {**INFO, "public.sites": TableInfo(("id", "name"), ("id",))}
    store = PgBucketStore(pg_dsn)
    store.migrate()
    try:
        store.bind_rules(placement_text(rules(DOC)), "rules.toml", "fieldsync")
        _fill(store, rules(DOC), 3)
        more = copy.deepcopy(DOC)
        more["bucket"].append({"name": "sites", "table": [{"table": "public.sites"}]})
        more["bucket"][0]["table"].append({"table": "public.sites", "match": {"name": "t"}})
        wider = rules_from_mapping(more, info, "rules.toml")
        assert store.bind_rules(placement_text(wider), "rules.toml", "fieldsync") == "recorded"
        fewer = copy.deepcopy(more)
        del fewer["bucket"][1]  # 'open', which places public.orders, removed as a whole
        narrower = rules_from_mapping(fewer, info, "rules.toml")
        assert store.bind_rules(placement_text(narrower), "rules.toml", "fieldsync") == "recorded"
        # but once the store read the new table's topic, its placement is bound too
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                f"insert into {SCHEMA}.consumer_progress "
                "values ('fieldsync-relay', 'fieldsync.public.sites', 0, 1, 1, 0)"
            )
        del fewer["bucket"][0]["table"][1]
        with pytest.raises(StoreRulesMismatch, match=r"offsets of \(public\.sites\)"):
            store.bind_rules(
                placement_text(rules_from_mapping(fewer, info, "r.toml")), "r.toml", "fieldsync"
            )
    finally:
        store.close()


def test_a_store_from_before_the_record_adopts_the_rules(pg_dsn: str) -> None:
    store = PgBucketStore(pg_dsn)
    store.migrate()
    try:
        _fill(store, rules(DOC), 3)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"update {SCHEMA}.meta set rules_placement = null")
        assert store.bind_rules(placement_text(rules(DOC)), "rules.toml", "fieldsync") == "adopted"
        assert store.bind_rules(placement_text(rules(DOC)), "rules.toml", "fieldsync") == "same"
    finally:
        store.close()


def test_a_cursor_of_another_store_resyncs_even_below_its_head(pg_dsn: str, store_dsn: str) -> None:
    """A store rebuilt from the topics may have passed a device's old cursor (more op ids
    for the same rows); the cursor's epochs name the old store, so the device re-syncs the
    bucket at once rather than applying a tail of the new store's log."""
    r = rules(DOC)
    old, rebuilt = PgBucketStore(pg_dsn), PgBucketStore(store_dsn)
    try:
        for s in (old, rebuilt):
            s.migrate()
        _fill(old, r, 6)
        for lsn in (10, 11, 12):  # the rebuilt store saw more history: higher op ids
            _fill(rebuilt, r, 6, lsn)
        bucket = 'tech["t0"]'
        page = old.read_ops({bucket: 0}, 1000)
        cursor, epochs = page.cursors[bucket], dict(page.epochs)
        assert 0 < cursor < rebuilt.bucket_state([bucket])[bucket].last_op_id
        again = rebuilt.read_ops({bucket: cursor}, 1000, epochs)
        assert again.resync == {bucket} and not again.ops
        # the old store still takes its own cursor
        assert not old.read_ops({bucket: cursor}, 1000, epochs).resync
    finally:
        old.close()
        rebuilt.close()


# ----------------------------------------------------------------------------- the process


ORDERS = {"public.orders": TableInfo(("id", "tech", "status"), ("id",))}
RULES_TOML = """
token_claims = ["tech"]

[[bucket]]
name = "tech"
parameters = ["t"]
claims = { t = "tech" }

[[bucket.table]]
table = "public.orders"
match = { tech = "t" }
"""


def hold_one_order(store: PgBucketStore, built: Rules, rules_file: Path) -> None:
    """Bind ``store`` to the rules of ``rules_file`` and place one order by them; closes it."""
    store.bind_rules(placement_text(built), str(rules_file), "fieldsync")
    store.apply(
        built,
        [
            RowChange(
                "public.orders",
                ChangeKind.UPSERT,
                (5, 0),
                (1,),
                {"id": 1, "tech": "t1", "status": "open"},
                insert=True,
            )
        ],
    )
    store.close()


def test_relay_run_refuses_a_store_built_under_other_rules(
    pg_dsn: str, store_dsn: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table orders (id int primary key, tech text, status text)")
    keys = tmp_path / "keys.toml"
    keys.write_text(
        'current = "k1"\n[[key]]\nkid = "k1"\nalg = "HS256"\n'
        'secret = "a-secret-of-at-least-32-bytes-0123456789"\n'
    )
    keys.chmod(0o600)
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(RULES_TOML)
    config = tmp_path / "relay.toml"
    config.write_text(
        f"[relay]\nstore_dsn = {json.dumps(store_dsn)}\nsource_dsn = {json.dumps(pg_dsn)}\n"
        f'rules = "{rules_file}"\n[http]\nport = 0\n[auth]\nkeys_file = "{keys}"\n'
    )
    config.chmod(0o600)
    built = load_rules(rules_file, ORDERS)
    store = PgBucketStore(store_dsn)
    store.migrate()
    hold_one_order(store, built, rules_file)
    # the rules file now leaves closed orders out: the store holds rows by the old rules
    rules_file.write_text(
        RULES_TOML + 'filters = [ { column = "status", op = "!=", value = "closed" } ]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "fieldsync.cli", "relay", "run", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"error: {rules_file}: these rules place rows differently" in done.stderr
    assert (
        "bucket rule 'tech' table 'public.orders': filters [] → "
        '[["status", "!=", ["closed"]]]' in done.stderr
    )


def test_check_rules_tells_whether_a_store_needs_a_rebuild(
    pg_dsn: str, store_dsn: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from relay.cli import app

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table orders (id int primary key, tech text, status text)")
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(RULES_TOML)
    args = ["check-rules", "--rules", str(rules_file), "--schema-from-dsn", pg_dsn]
    runner = CliRunner()

    def check() -> Any:
        return runner.invoke(app, [*args, "--store-dsn", store_dsn])

    assert "no bucket store there yet" in check().stdout
    built = load_rules(rules_file, ORDERS)
    store = PgBucketStore(store_dsn)
    store.migrate()
    assert "hold nothing there yet" in check().stdout
    hold_one_order(store, built, rules_file)
    result = check()
    assert result.exit_code == 0 and "same placement of rows" in result.stdout, result.output
    rules_file.write_text(RULES_TOML.replace('match = { tech = "t" }', 'match = { status = "t" }'))
    result = check()
    assert result.exit_code == 2, result.output
    assert "these rules place rows differently" in result.stderr
    assert 'match [["tech", "t"]] → [["status", "t"]]' in result.stderr
    # nothing was written: the store still records the old placement
    with psycopg.connect(store_dsn) as conn:
        row = conn.execute(f"select rules_placement from {SCHEMA}.meta").fetchone()
    assert row is not None and row[0] == placement_text(built)
    result = runner.invoke(
        app, ["check-rules", "--rules", str(rules_file), "--store-dsn", store_dsn]
    )
    assert result.exit_code == 2 and "--store-dsn needs --schema-from-dsn" in result.stderr
