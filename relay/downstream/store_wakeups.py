"""Wake-ups of the bucket store's waiters: the ops channel's notifications → the long-polls
and streams waiting on the buckets they name.

Each writing transaction of the store ends with ``pg_notify('fieldsync_relay_ops',
'<head op id>\n<bucket>…')`` (relay/downstream/pg_store_schema.py).  :class:`OpsListener`
holds one LISTEN connection (:class:`relay.pg_listen.PgListener`) and the waiters by
bucket; a notification wakes only the waiters of the buckets it names (every waiter when
it names none, ``*``).  The last notifications are remembered, so a waiter that registers
with an older ``since`` op id is woken at once if one of them concerned it; after a
reconnection everything may have been missed and everyone is woken.  Spurious wake-ups
are harmless: callers re-read.

Concurrency model: the listener thread delivers; waiters are threads (an event) or
coroutines (a future on their event loop).  All the coroutines one notification wakes on
a loop are resumed by one callback of that loop, so their page reads start in the same
round and go to the store as one batch (relay/downstream/api_reads.py).  The waiter
sets are guarded by one lock.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final

import psycopg

from relay.downstream.pg_store_schema import NOTIFY_CHANNEL, SCHEMA, parse_notify_payload
from relay.pg_listen import PgListener, wake_future, wake_futures

log = logging.getLogger("relay.downstream.pg_bucket_store")

_HISTORY: Final = 2048  # notifications remembered for waiters that register late


class Waiter:
    """One waiter: a thread (``event``) or a coroutine (``future`` on ``loop``)."""

    __slots__ = ("buckets", "event", "future", "loop")

    def __init__(
        self,
        buckets: frozenset[str] | None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.buckets = buckets
        self.loop = loop
        self.event = threading.Event() if loop is None else None
        self.future: asyncio.Future[None] | None = loop.create_future() if loop else None

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()
        elif self.loop is not None and self.future is not None:
            wake_future(self.loop, self.future)


class OpsListener:
    """Waiters by bucket, woken by the ops channel's LISTEN connection
    (:class:`relay.pg_listen.PgListener`); remembers the last notifications for waiters
    that register late."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._lock = threading.Lock()
        self.head = 0
        self._floor = 0  # waiters with since < floor cannot be checked against the history
        self._history: collections.deque[tuple[int, frozenset[str] | None]] = collections.deque(
            maxlen=_HISTORY
        )
        self._by_bucket: dict[str, set[Waiter]] = {}
        self._any: set[Waiter] = set()
        self._pg = PgListener(
            NOTIFY_CHANNEL,
            connect,
            lambda payload: self._deliver(*parse_notify_payload(payload)),
            self._connected,
            thread_name="bucket-store-listener",
            what="bucket store listener",
            log=log,
        )

    @property
    def ready(self) -> bool:
        """The LISTEN connection was established (at least once)."""
        return self._pg.connected.is_set()

    def start(self, timeout: float = 10.0) -> None:
        self._pg.start(timeout)

    def stop(self) -> None:
        self._pg.stop()

    def register(self, waiter: Waiter, since: int) -> None:
        with self._lock:
            if since < self._floor or self._missed(waiter, since):
                waiter.wake()
                return
            if waiter.buckets is None:
                self._any.add(waiter)
            else:
                for b in waiter.buckets:
                    self._by_bucket.setdefault(b, set()).add(waiter)

    def waiting(self, bucket: str) -> int:
        """How many waiters wait on ``bucket`` (those waiting on any bucket included)."""
        with self._lock:
            return len(self._by_bucket.get(bucket, ())) + len(self._any)

    def unregister(self, waiter: Waiter) -> None:
        with self._lock:
            self._any.discard(waiter)
            for b in waiter.buckets or ():
                group = self._by_bucket.get(b)
                if group is not None:
                    group.discard(waiter)
                    if not group:
                        del self._by_bucket[b]

    def _missed(self, waiter: Waiter, since: int) -> bool:
        for head, buckets in reversed(self._history):
            if head <= since:
                return False
            if buckets is None or waiter.buckets is None or buckets & waiter.buckets:
                return True
        # every remembered notification is newer than ``since``: if the history is full,
        # older ones were dropped and may have named the waiter's buckets, so wake it
        return len(self._history) == self._history.maxlen

    def _deliver(self, head: int, buckets: frozenset[str] | None) -> None:
        with self._lock:
            self.head = max(self.head, head)
            self._history.append((head, buckets))
            if buckets is None:
                woken = set(self._any).union(*self._by_bucket.values())
            else:
                woken = set(self._any)
                for b in buckets:
                    woken |= self._by_bucket.get(b, set())
        _wake(woken)

    def _connected(self, conn: psycopg.Connection[Any]) -> None:
        """After each (re)connection: anything may have been missed, wake everyone."""
        row = conn.execute(f"select head_op_id from {SCHEMA}.meta").fetchone()
        self._wake_all(int(row[0]) if row else 0)

    def _wake_all(self, head: int) -> None:
        with self._lock:
            self.head = max(self.head, head)
            self._floor = self.head
            self._history.clear()
            woken = set(self._any).union(*self._by_bucket.values())
        _wake(woken)


def settle(future: asyncio.Future[None]) -> None:
    """Resolve ``future`` unless it is done (a waiter's timeout or its ``until``)."""
    if not future.done():
        future.set_result(None)


def _wake(waiters: Iterable[Waiter]) -> None:
    """Wake ``waiters``: threads one by one, coroutines in one callback per event loop (so
    every stream a notification wakes resumes in the same round of its loop, and their
    page reads go in one batch: relay/downstream/api_reads.py)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for w in waiters:
        if w.loop is not None and w.future is not None:
            by_loop.setdefault(w.loop, []).append(w.future)
        else:
            w.wake()
    for loop, futures in by_loop.items():
        wake_futures(loop, futures)
