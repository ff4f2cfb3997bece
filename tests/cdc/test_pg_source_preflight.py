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


class _Res:
    def __init__(self, sqlstate: str | None) -> None:
        self.sqlstate = sqlstate

    def error_field(self, _field: object) -> bytes | None:
        return self.sqlstate.encode() if self.sqlstate else None


class _Conn:
    def __init__(self, ok: bool = True) -> None:
        import psycopg

        self.status = psycopg.pq.ConnStatus.OK if ok else psycopg.pq.ConnStatus.BAD


@pytest.mark.parametrize(
    ("res", "ok", "transient"),
    [
        (None, True, True),  # no result at all
        (_Res("57P01"), True, True),  # admin shutdown: PostgreSQL restarting
        (_Res("57P03"), True, True),  # cannot connect now: starting up
        (_Res("08006"), True, True),  # connection failure
        (_Res("55006"), True, True),  # slot still active (an old walsender)
        (_Res("42704"), False, True),  # whatever the error, the connection is gone
        (_Res("42704"), True, False),  # the slot does not exist: not cured by retrying
        (_Res("42501"), True, False),  # insufficient privilege
        (_Res(None), True, False),
    ],
)
def test_start_replication_failures_that_a_new_session_cures(
    res: object, ok: bool, transient: bool
) -> None:
    from cdc.pg_source import _transient_start_failure

    assert _transient_start_failure(res, _Conn(ok)) is transient
