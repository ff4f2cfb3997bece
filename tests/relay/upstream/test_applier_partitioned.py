"""The applier writes device edits into a partitioned table: inserts (PostgreSQL refuses
``RETURNING xmin`` of an insert into a partitioned table, "cannot retrieve a system column
in this context": every batch holding a device's insert into such a table failed and was
retried for ever, stalling the applier for every device), an update of the inserted row in
the same batch (guarded by the xmin the insert gave), a row moved to another partition
(delete and insert), updates and deletes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from core.hlc import Hlc
from core.journal_format import JournalRecord, entry_from_json
from relay.upstream.applier_db import ApplierDb
from relay.upstream.applier_store import Delivery

DDL = """
create table m (id int, region text, note text, primary key (id, region)) partition by list (region);
create table m_n partition of m for values in ('n');
create table m_s partition of m for values in ('s');
insert into m values (1, 'n', 'a'), (2, 'n', 'b'), (3, 's', 'c');
"""


def record(seq: int, op: str, key: list[Any], old: Any, new: Any, prev: int | None = None) -> bytes:
    raw = {
        "seq": seq,
        "table": "public.m",
        "op": op,
        "key": key,
        "old": old,
        "new": new,
        "hlc": Hlc(1_700_000_000_000 + seq, 0, "d1").encode(),
        "prev_seq": prev,
    }
    return JournalRecord("d1", seq, entry_from_json(raw, "d1"), {"sub": "d1"}).to_bytes()


def test_device_edits_of_a_partitioned_table_are_applied(pg_dsn: str, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[bucket]]\nname = "all"\n\n[[bucket.table]]\ntable = "public.m"\n')
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(DDL)
        db = ApplierDb(pg_dsn, rules)
        db.connect()
        try:
            db.migrate()
            entries = [
                record(1, "insert", [5, "n"], None, {"id": 5, "region": "n", "note": "new"}),
                record(2, "update", [5, "n"], {"note": "new"}, {"note": "new2"}, prev=1),
                record(3, "delete", [3, "s"], {"id": 3, "region": "s", "note": "c"}, None),
                record(4, "insert", [3, "n"], None, {"id": 3, "region": "n", "note": "c"}),
                record(5, "update", [1, "n"], {"note": "a"}, {"note": "a2"}),
                record(6, "delete", [2, "n"], {"id": 2, "region": "n", "note": "b"}, None),
            ]
            outcomes = db.apply([(Delivery("t", 0, i), e) for i, e in enumerate(entries)])
            assert [(o.seq, o.kind.value) for o in outcomes] == [
                (s, "applied") for s in range(1, 7)
            ], [o.message for o in outcomes]
            rows = conn.execute("select tableoid::regclass::text, * from m order by id").fetchall()
            assert rows == [("m_n", 1, "n", "a2"), ("m_n", 3, "n", "c"), ("m_n", 5, "n", "new2")]
        finally:
            db.close()
