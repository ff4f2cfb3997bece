"""cdc.pg_source.preflight warns about replica identities whose deletes lack the key."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import pytest

from cdc.pg_source import preflight


def test_identity_index_without_the_primary_key_is_warned_about(
    pg_conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    pg_conn.execute("create table wo_code (id int primary key, code text not null unique)")
    pg_conn.execute("create table wo_both (id int primary key, code text not null)")
    pg_conn.execute("create unique index wo_both_idx on wo_both (code, id)")
    for table, index in (("wo_code", "wo_code_code_key"), ("wo_both", "wo_both_idx")):
        pg_conn.execute(f"alter table {table} replica identity using index {index}")
    caplog.set_level(logging.WARNING, logger="fieldsync")
    caplog.set_level(logging.WARNING, logger="cdc")
    preflight(pg_conn, [])
    warned = [
        r.getMessage() for r in caplog.records if "REPLICA IDENTITY USING INDEX" in r.getMessage()
    ]
    assert len(warned) == 1, warned
    assert "public.wo_code" in warned[0] and "wo_code_code_key" in warned[0]
    assert "REPLICA IDENTITY DEFAULT" in warned[0]
    caplog.clear()
    preflight(pg_conn, ["public.wo_both"])  # only the listed tables are checked
    assert not [r for r in caplog.records if "USING INDEX" in r.getMessage()]
