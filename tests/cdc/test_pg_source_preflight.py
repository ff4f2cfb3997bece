"""cdc.pg_source: which connection errors are transient."""

from __future__ import annotations

import psycopg
import pytest


class _Res:
    def __init__(self, sqlstate: str | None) -> None:
        self.sqlstate = sqlstate

    def error_field(self, _field: object) -> bytes | None:
        return self.sqlstate.encode() if self.sqlstate else None


class _Conn:
    def __init__(self, ok: bool = True) -> None:
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
