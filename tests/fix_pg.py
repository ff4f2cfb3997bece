"""pytest plugin: a PostgreSQL server with wal_level=logical, once per test session.

``FIELDSYNC_TEST_PG_DSN`` points the tests at an external server (a superuser
DSN to its maintenance database); otherwise a throw-away cluster is started from
the system's binaries (or the pgserver wheel).  A server that fails to start
fails the run with its log; it is never a skip.

Fixtures:
- ``pg_server``: object with ``dsn``, ``dsn_for(db)``, ``restart()`` (embedded only)
- ``pg_dsn``: a fresh, empty database per test (dropped afterwards, with its slots)
- ``store_dsn``: a second one, for the relay's store (logical decoding is per database, so
  the store's writes stay out of the change stream of ``pg_dsn``)

:func:`fresh_database` makes one more where a test needs it.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from devtools.local_services import EmbeddedPostgres


class ExternalPostgres:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.info = psycopg.conninfo.conninfo_to_dict(dsn)

    def dsn_for(self, dbname: str) -> str:
        return psycopg.conninfo.make_conninfo(self.dsn, dbname=dbname)

    def restart(self, mode: str = "fast") -> None:
        pytest.fail(
            "restarting an external PostgreSQL (FIELDSYNC_TEST_PG_DSN) is not supported by this test"
        )


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    external = os.environ.get("FIELDSYNC_TEST_PG_DSN")
    if external:
        yield ExternalPostgres(external)
        return
    # The data directory lives outside pytest's temp tree: pytest resets /tmp/pytest-of-<user> to
    # mode 0700 at every start, which would lock the (non-root) server user out of a running cluster.
    server = EmbeddedPostgres()
    server.start()  # raises ServiceError with the log tail: the run fails
    try:
        yield server
    finally:
        server.cleanup()


def _drop_database(admin_dsn: str, name: str, timeout_s: float = 60.0) -> None:
    """Drop the database ``name`` and its replication slots.  A slot still in use is freed
    by ending its walsender; the slot can be dropped only once that backend has exited
    (pg_terminate_backend only asks it to), and the database only once no slot is left."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        deadline = time.monotonic() + timeout_s
        while slots := conn.execute(
            "select slot_name, active_pid from pg_replication_slots where database = %s",
            (name,),
        ).fetchall():
            assert time.monotonic() < deadline, f"slots of {name} still there: {slots}"
            for slot, pid in slots:
                if pid is not None:
                    conn.execute("select pg_terminate_backend(%s)", (pid,))
                    continue
                # taken again or dropped meanwhile: the next round sees
                with contextlib.suppress(psycopg.Error):
                    conn.execute("select pg_drop_replication_slot(%s)", (slot,))
            time.sleep(0.05)
        conn.execute(f'drop database if exists "{name}" with (force)')


@contextlib.contextmanager
def fresh_database(pg_server: Any, prefix: str = "t_") -> Iterator[str]:
    """DSN of a new, empty database on ``pg_server`` (its name starts with ``prefix``);
    dropped afterwards, with its replication slots."""
    name = prefix + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    try:
        yield pg_server.dsn_for(name)
    finally:
        _drop_database(pg_server.dsn, name)


@pytest.fixture
def pg_dsn(pg_server: Any) -> Iterator[str]:
    """DSN of a fresh database for this test."""
    with fresh_database(pg_server) as dsn:
        yield dsn


@pytest.fixture
def store_dsn(pg_server: Any) -> Iterator[str]:
    """DSN of another fresh database for this test: the relay's store."""
    with fresh_database(pg_server, "store_") as dsn:
        yield dsn


@pytest.fixture
def pg_conn(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn
