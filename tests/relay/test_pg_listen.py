"""relay/pg_listen.py: the one LISTEN thread the bucket store and the journal tables share.

Against the real PostgreSQL: payloads reach the owner after ``on_connect``; a killed
listening connection is replaced (``on_connect`` runs again, later notifications arrive);
a failing ``connect`` is retried; asyncio futures are woken from the thread."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from relay.errors import StoreError
from relay.pg_listen import PgListener, wake_future

CHANNEL = "fieldsync_test_listen"
log = logging.getLogger("tests.relay.test_pg_listen")


class Owner:
    """What a listener's owner sees: payloads, and one entry per (re)connection."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.payloads: list[str] = []
        self.connects: list[int] = []  # backend pid of each listening connection

    def on_notify(self, payload: str) -> None:
        with self.lock:
            self.payloads.append(payload)

    def on_connect(self, conn: psycopg.Connection[Any]) -> None:
        with self.lock:
            self.connects.append(conn.info.backend_pid)


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def notify(dsn: str, payload: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select pg_notify(%s, %s)", (CHANNEL, payload))


def listener(connect: Callable[[], psycopg.Connection[Any]], owner: Owner) -> PgListener:
    return PgListener(
        CHANNEL,
        connect,
        owner.on_notify,
        owner.on_connect,
        thread_name="test-listener",
        what="test listener",
        log=log,
    )


def test_payloads_arrive_and_a_killed_connection_is_replaced(pg_dsn: str) -> None:
    owner = Owner()
    pg = listener(lambda: psycopg.connect(pg_dsn), owner)
    pg.start(timeout=30)
    try:
        assert pg.connected.is_set() and len(owner.connects) == 1
        notify(pg_dsn, "one")
        wait_until("the first payload", lambda: owner.payloads == ["one"])

        first = owner.connects[0]
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", (first,))
        wait_until("a new listening connection", lambda: len(owner.connects) >= 2)
        assert owner.connects[-1] != first
        notify(pg_dsn, "two")
        wait_until("the payload after the reconnect", lambda: owner.payloads[-1:] == ["two"])
        assert owner.payloads == ["one", "two"]
    finally:
        pg.stop()


def test_a_failing_connect_is_retried(pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    owner = Owner()
    failures = 2
    attempts: list[int] = []

    def connect() -> psycopg.Connection[Any]:
        attempts.append(1)
        if len(attempts) <= failures:
            raise StoreError("cannot connect (test)")
        return psycopg.connect(pg_dsn)

    pg = listener(connect, owner)
    with caplog.at_level(logging.WARNING, logger=log.name):
        pg.start()
        try:
            wait_until("the listener to connect", pg.connected.is_set)
            assert len(attempts) == failures + 1 and len(owner.connects) == 1
            notify(pg_dsn, "after retries")
            wait_until("the payload", lambda: owner.payloads == ["after retries"])
        finally:
            pg.stop()
    warned = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert len(warned) == failures and all("test listener: cannot connect" in m for m in warned)


def test_only_plain_channel_names_are_listened_to() -> None:
    owner = Owner()
    for bad in ("Ops", "ops; drop table x", "", "1ops"):
        with pytest.raises(ValueError, match="channel"):
            PgListener(
                bad,
                lambda: psycopg.connect(""),
                owner.on_notify,
                owner.on_connect,
                thread_name="t",
                what="t",
                log=log,
            )


def test_wake_future_resolves_from_another_thread_and_ignores_done_ones() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        threading.Thread(target=wake_future, args=(loop, future)).start()
        await asyncio.wait_for(future, 30)
        wake_future(loop, future)  # already done: nothing happens
        await asyncio.sleep(0)
        assert future.done() and future.result() is None

    asyncio.run(main())
    closed = asyncio.new_event_loop()
    orphan: asyncio.Future[None] = closed.create_future()
    closed.close()
    wake_future(closed, orphan)  # a closed loop is not an error
    assert not orphan.done()
