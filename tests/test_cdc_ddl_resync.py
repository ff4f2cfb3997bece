"""Values that change without row events reach Kafka: re-snapshots against the real
PostgreSQL and broker (cdc/incremental_snapshot_io.py, docs/cdc.md "Re-snapshots").

After each DDL that gives existing rows new values without writing row changes (ADD COLUMN
with a default, a volatile default, ALTER COLUMN TYPE … USING, enum RENAME VALUE), the
table rebuilt from its Kafka topic alone equals the table in PostgreSQL.  Also: changes
committed between a chunk's watermarks win over the chunk; a killed daemon resumes a
re-snapshot at its last finished chunk; ``fieldsync cdc snapshot`` and the signal table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from cdc import incremental_snapshot_io
from cdc.errors import parse_lsn
from cdc.pipeline import kafka_options
from cdc.settings import CdcSettings
from tests import test_cdc_cli
from tests.cdc_support import make_settings, running_daemon, table_events, wait_for

daemon_process = test_cdc_cli.daemon_process  # the fixture, shared with the CLI tests

Rows = dict[Any, dict[str, Any]]


def settings_for(pg_dsn: str, bootstrap: str, prefix: str, **env: str) -> CdcSettings:
    return make_settings(
        pg_dsn,
        bootstrap,
        prefix,
        postgres_slot="s_" + prefix[-10:],
        cdc_ddl_check_interval_s="0.3",
        cdc_resnapshot_chunk_rows="7",
        **env,
    )


def rebuild(events: list[dict[str, Any]], key: str = "id") -> Rows:
    """The table as a consumer that applies every event in position order holds it."""
    rows: Rows = {}
    for e in sorted(events, key=lambda e: e["_pos"]):
        if e["op"] == "t":
            rows.clear()
        elif e["op"] == "d":
            rows.pop(e["before"][key], None)
        else:
            rows[e["after"][key]] = dict(e["after"])
    return rows


def pg_rows(conn: psycopg.Connection[Any], table: str, key: str = "id") -> Rows:
    cur = conn.execute(f"select * from {table}")
    names = [d.name for d in cur.description or ()]
    return {r[names.index(key)]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}


def wait_converged(
    bootstrap: str, prefix: str, conn: psycopg.Connection[Any], table: str, timeout: float = 60
) -> list[dict[str, Any]]:
    """Wait until the table rebuilt from Kafka equals PostgreSQL; return the events."""
    last: dict[str, Any] = {}

    def same() -> bool:
        events = table_events(bootstrap, prefix, table, timeout=5)
        built, want = rebuild(events), pg_rows(conn, table)
        last["diff"] = {
            k: (built.get(k), want.get(k))
            for k in sorted(set(built) | set(want), key=str)
            if built.get(k) != want.get(k)
        }
        last["events"] = events
        return not last["diff"]

    try:
        wait_for(same, timeout=timeout, interval=0.5, what=f"{table} in Kafka to equal PostgreSQL")
    except AssertionError as exc:
        shown = dict(list(last.get("diff", {}).items())[:5])
        raise AssertionError(f"{exc}; first differences (kafka, postgres): {shown}") from None
    events: list[dict[str, Any]] = last["events"]
    return events


def incremental(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["op"] == "r" and e["source"]["snapshot"] == "incremental"]


def state_record(settings: CdcSettings, suffix: str) -> bytes | None:
    key = f"{settings.postgres.slot}.{suffix}".encode()
    found = incremental_snapshot_io.read_state_records(kafka_options(settings), [key], 20)
    return found.get(key)


@pytest.fixture
def items(pg_conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    pg_conn.execute("create type mood as enum ('sad', 'ok', 'happy')")
    pg_conn.execute("create table items (id int primary key, qty int not null, m mood)")
    pg_conn.execute(
        "insert into items select g, g * 10, (array['sad','ok','happy'])[1 + g % 3]::mood "
        "from generate_series(1, 40) g"
    )
    yield pg_conn


# --------------------------------------------------------------------------- each DDL

DDLS: dict[str, list[str]] = {
    "add column with default": ["alter table items add column note text default 'dflt'"],
    "volatile default": ["alter table items add column r float8 default random()"],
    "alter type using": ["alter table items alter column qty type bigint using qty * 3 + 1"],
    "enum rename value": ["alter type mood rename value 'ok' to 'fine'"],
}


@pytest.mark.parametrize("ddl", list(DDLS), ids=list(DDLS))
def test_each_ddl_reaches_kafka_as_r_events(
    ddl: str, items: psycopg.Connection[Any], pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = settings_for(pg_dsn, kafka_bootstrap, topic_prefix)
    with running_daemon(settings):
        wait_converged(kafka_bootstrap, topic_prefix, items, "items")
        before = parse_lsn(items.execute("select pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]
        for statement in DDLS[ddl]:
            items.execute(statement)
        events = wait_converged(kafka_bootstrap, topic_prefix, items, "items")
    again = incremental(events)
    assert Counter(e["after"]["id"] for e in again) == Counter(range(1, 41)), (
        "every row is re-sent once"
    )
    assert all(e["_pos"][0] > before for e in again), "re-sent rows come after the DDL"
    positions = [e["_pos"] for e in events]
    assert len(positions) == len(set(positions)), "positions are unique"
    chunks = {e["_pos"][0] for e in again}
    assert len(chunks) == 6, f"40 rows in chunks of 7 rows: 6 chunks, got {len(chunks)}"
    for e in again:
        assert e["_pos"] == (e["source"]["commit_lsn"], e["source"]["seq"])
