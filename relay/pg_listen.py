"""PostgreSQL LISTEN in a daemon thread: the relay's one way to hear NOTIFY wake-ups.

Both directions of the relay wake waiting requests with NOTIFY: the bucket store on
``fieldsync_relay_ops`` (new ops, payload the head op id and the buckets written:
relay/downstream/pg_bucket_store.py) and the journal tables on ``fieldsync_relay_outcomes``
(new outcomes, payload the device ids: relay/upstream/journal_api.py).  Each owns a
:class:`PgListener` for its channel and keeps its own waiters; the listener only moves
payloads from PostgreSQL to the owner's ``on_notify``.

Protocol of one listener:

- :meth:`PgListener.start` starts the thread once (later calls only wait, when asked, for
  the first connection); it opens a connection with the owner's ``connect``, runs
  ``LISTEN <channel>``, then calls ``on_connect(conn)`` and only then hands on payloads.
  ``on_connect`` runs after *every* (re)connection: notifications sent while no connection
  listened are lost, so the owner wakes everyone there (spurious wake-ups are harmless,
  waiters re-read), and may read what it needs on the fresh connection.
- A failed connection or query (``psycopg.Error``, or a :class:`relay.errors.RelayError`
  from ``connect``) is logged and retried with a backoff from 0.2 s doubling to 5 s; the
  thread never gives up until :meth:`PgListener.stop`.
- ``connected`` is set after the first successful ``on_connect``.

Concurrency model: one daemon thread per listener calls ``on_connect`` and ``on_notify``;
the owner's callbacks must be thread-safe.  Asyncio waiters are woken from that thread
with :func:`wake_future` (``call_soon_threadsafe``); ``start`` and ``stop`` may be called
from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

import psycopg

from relay.errors import RelayError

_CHANNEL = re.compile(r"[a-z_][a-z0-9_]*\Z")
_FIRST_BACKOFF_S: Final = 0.2
_MAX_BACKOFF_S: Final = 5.0
_POLL_S: Final = 0.5
"""How long one wait for notifications lasts before the stop flag is checked again."""


class PgListener:
    """A LISTEN connection on ``channel`` in a daemon thread named ``thread_name``.

    ``what`` names the listener in log messages (``log``, the owner's logger)."""

    def __init__(
        self,
        channel: str,
        connect: Callable[[], psycopg.Connection[Any]],
        on_notify: Callable[[str], None],
        on_connect: Callable[[psycopg.Connection[Any]], None],
        *,
        thread_name: str,
        what: str,
        log: logging.Logger,
    ) -> None:
        if not _CHANNEL.match(channel):
            raise ValueError(f"not a plain channel name: {channel!r}")
        self.channel = channel
        self._connect = connect
        self._on_notify = on_notify
        self._on_connect = on_connect
        self._thread_name = thread_name
        self._what = what
        self._log = log
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.connected = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout: float | None = None) -> None:
        """Start the thread (once); with ``timeout``, wait up to that long for the first
        connection (returns either way: waiters fall back on their own timeouts)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=self._thread_name, daemon=True
                )
                self._thread.start()
        if timeout is not None:
            self.connected.wait(timeout)

    def stop(self) -> None:
        """Stop the thread (it closes its connection within about half a second)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        backoff = _FIRST_BACKOFF_S
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    conn.autocommit = True
                    conn.execute(f"listen {self.channel}")
                    self._on_connect(conn)
                    self.connected.set()
                    backoff = _FIRST_BACKOFF_S
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=_POLL_S):
                            self._on_notify(n.payload)
            except (psycopg.Error, RelayError) as exc:
                self._log.warning("%s: %s; reconnecting in %.1fs", self._what, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)


def wake_future(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    """Resolve ``future`` on its ``loop`` from any thread (nothing if the loop is closed or
    the future already done)."""
    wake_futures(loop, [future])


def wake_futures(loop: asyncio.AbstractEventLoop, futures: Sequence[asyncio.Future[None]]) -> None:
    """Resolve all ``futures`` (of one ``loop``) from any thread, in one callback of the
    loop: every waiter woken by one notification resumes in the same round of the loop."""
    with contextlib.suppress(RuntimeError):  # loop closed
        loop.call_soon_threadsafe(_resolve, futures)


def _resolve(futures: Sequence[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)
