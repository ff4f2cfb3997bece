"""Unchanged TOASTed values of rows that enter a bucket reach the device, against the real
processes (cdc, relay, applier; a device agent).

PostgreSQL does not send an unchanged TOASTed value in an update's new row (REPLICA
IDENTITY DEFAULT): the relay fills it from the row it stored, and has none for a row that
left every bucket or never was in one.  It reads such values from the captured database
(``relay.source_dsn``) instead, and the device's table must equal PostgreSQL's value by
value:

- a row that leaves every bucket (``state = 'done'``) and comes back;
- a row inserted outside every bucket and moved into one by an update of ``state`` only;
- a row that comes back and is at once updated again, in another column and then in the
  TOASTed column itself (the engine sees the three updates in one batch or in several);
- a row that comes back in the same transaction as an update of its TOASTed value;
- a row that comes back while another transaction deletes it right after (the value
  read later is gone: the row is placed nowhere, and its delete follows).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import psycopg

from tests.pipeline.local_device import LocalDevice
from tests.pipeline.pipeline_stack import services
from tests.pipeline.test_ops_metrics import scrape, value

# doc: 6,400 characters of md5 text, stored out of line (TOAST): an update that does not
# touch it sends it as unchanged
DDL = """
create table big (id int primary key, state text, doc text, note text);
insert into big select g, 'open',
    (select string_agg(md5(g::text || '-' || i::text), '') from generate_series(1, 200) i), 'n'
from generate_series(1, 4) g;
"""
RULES = """
[[bucket]]
name = "open"

[[bucket.table]]
table = "public.big"
filters = [ { column = "state", op = "!=", value = "done" } ]
"""
PG_ROWS = "select id, state, doc, note from big where state <> 'done' order by id"
DEVICE_ROWS = "select id, state, doc, note from big order by id"


def _brief(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows with ``doc`` shown as its length and md5 (for readable failures)."""
    return [
        (i, s, None if d is None else (len(d), hashlib.md5(d.encode()).hexdigest()[:8]), n)
        for i, s, d, n in rows
    ]


def test_rows_entering_a_bucket_carry_their_unchanged_toasted_values(
    pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        pg.execute(DDL)
        toast = pg.execute(
            "select reltoastrelid::regclass::text from pg_class where oid = 'big'::regclass"
        ).fetchone()
        assert toast is not None
        chunks = pg.execute(f"select count(*) from {toast[0]}").fetchone()
        assert chunks is not None and chunks[0] > 0, "doc must be stored out of line (TOAST)"
        with services(
            tmp_path,
            pg_dsn,
            store_dsn,
            kafka_bootstrap,
            topic_prefix,
            rules=RULES,
            conflicts='[default]\npolicy = "server_wins"\n',
            tables=["public.big"],
        ) as stack:
            dev = LocalDevice(stack.url, stack.keys, tmp_path)
            last: dict[str, list[tuple[Any, ...]]] = {}

            def same() -> bool:
                last["device"] = [tuple(r) for r in dev.app.execute(DEVICE_ROWS)]
                last["pg"] = [tuple(r) for r in pg.execute(PG_ROWS)]
                return last["device"] == last["pg"]

            def converge(what: str) -> None:
                try:
                    dev.sync_until(same, what, rounds=120)
                except AssertionError:
                    raise AssertionError(
                        f"{what}: device {_brief(last['device'])} != "
                        f"PostgreSQL {_brief(last['pg'])}"
                    ) from None

            try:
                converge("the initial rows")
                # 1: leaves every bucket, then comes back
                pg.execute("update big set state = 'done' where id = 1")
                converge("row 1 gone")
                pg.execute("update big set state = 'open' where id = 1")
                converge("row 1 back with its doc")

                # 2: inserted outside every bucket, moved in by an update of state only
                pg.execute(
                    "insert into big select 5, 'done', string_agg(md5('five' || i::text), ''), "
                    "'n' from generate_series(1, 200) i"
                )
                pg.execute("update big set note = 'n5' where id = 5")
                pg.execute("update big set state = 'open' where id = 5")
                converge("row 5 moved in with its doc")

                # 3: back, then at once another column, then the TOASTed column itself
                pg.execute("update big set state = 'done' where id = 3")
                converge("row 3 gone")
                pg.execute("update big set state = 'open' where id = 3")
                pg.execute("update big set note = 'n3' where id = 3")
                pg.execute("update big set doc = doc || 'tail' where id = 3")
                converge("row 3 back, its note and doc changed")

                # 4: back in the same transaction as an update of its TOASTed value; then
                # back again, its note changed in the same transaction
                pg.execute("update big set state = 'done' where id = 4")
                converge("row 4 gone")
                with pg.transaction():
                    pg.execute("update big set state = 'open' where id = 4")
                    pg.execute("update big set doc = upper(doc) where id = 4")
                converge("row 4 back with its new doc")
                pg.execute("update big set state = 'done' where id = 4")
                converge("row 4 gone again")
                with pg.transaction():
                    pg.execute("update big set state = 'open' where id = 4")
                    pg.execute("update big set note = 'n4' where id = 4")
                converge("row 4 back again with its note")

                # 2 again: back, then deleted at once (the value may be gone when read)
                pg.execute("update big set state = 'done' where id = 2")
                converge("row 2 gone")
                pg.execute("update big set state = 'open' where id = 2")
                pg.execute("delete from big where id = 2")
                converge("row 2 deleted")

                relay = "".join(stack.procs["relay"].lines)
                assert "change skipped" not in relay, relay[-3000:]
                # rows 1, 5, 3 and 4 (twice) were completed from PostgreSQL; none went unfilled
                samples = scrape(stack.metrics_url("relay"))
                fills = "fieldsync_relay_toast_fills_total"
                assert (value(samples, fills, result="source") or 0) >= 5, samples
                assert value(samples, fills, result="unfilled") == 0
            finally:
                dev.close()
