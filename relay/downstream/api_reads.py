"""Coalesced page reads for the device API: many streams woken at once, one store read.

A commit to a bucket that many devices sync wakes every stream and long-poll waiting on
it, all in the same moment, and each needs the next page of its buckets.  Read one by
one, that is one store transaction per device, one after the other.  :class:`PageReads`
gathers the requests made while the event loop runs one round (and those made while the
reads in flight are busy) and answers them with one
:meth:`relay.downstream.bucket_store.BucketStore.read_pages` call: one snapshot, one read
per ``(bucket, cursor)`` slice however many devices wait at that position
(relay/downstream/page_plan.py).

What a device receives does not change: each page is exactly what a read of that
request alone would have answered in the batch's snapshot, and that snapshot is taken
after the request was made (a request only joins a batch that has not started yet), so it
sees every op the wake-up announced.

Concurrency model: event-loop only.  At most ``max_in_flight`` batches are read at once,
each in a worker thread (``read_pages_async``); requests made meanwhile queue and go in the
next batch when one finishes.  A request whose caller went away (cancelled) is dropped
from its batch's answers; an error of a batch's read is raised to each of its callers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Final

from relay.downstream.bucket_store import BucketStore, OpsPage, PageRequest

MAX_IN_FLIGHT: Final = 4
"""Batches read at once (each holds one pooled store connection while it reads)."""
MAX_BATCH: Final = 20_000
"""Most requests in one batch (one snapshot); more go in the next one."""

_Pending = tuple[PageRequest, "asyncio.Future[OpsPage]"]


class PageReads:
    """Page reads of the device API, coalesced into batches (see the module docstring)."""

    def __init__(
        self, store: BucketStore, max_in_flight: int = MAX_IN_FLIGHT, max_batch: int = MAX_BATCH
    ) -> None:
        if max_in_flight < 1 or max_batch < 1:
            raise ValueError("PageReads: max_in_flight and max_batch must be >= 1")
        self.store = store
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self.batches = 0
        """Batches read so far (for tests and monitoring)."""
        self._queue: list[_Pending] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def read(
        self,
        cursors: Mapping[str, int],
        limit: int,
        epochs: Mapping[str, int] | None = None,
        max_bytes: int = 0,
    ) -> OpsPage:
        """The page :meth:`BucketStore.read_ops` answers for these arguments, read in the
        next batch, its ops rendered for the wire (:attr:`OpsPage.wire`), ending at
        ``max_bytes`` of row data (:attr:`PageRequest.max_bytes`)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[OpsPage] = loop.create_future()
        request = PageRequest(dict(cursors), limit, dict(epochs or {}), True, max_bytes)
        self._queue.append((request, future))
        self._schedule(loop)
        return await future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start batches from the queue while fewer than ``max_in_flight`` are read."""
        self._scheduled = False
        while self._queue and self._in_flight < self.max_in_flight:
            batch = [p for p in self._queue[: self.max_batch] if not p[1].done()]
            del self._queue[: self.max_batch]
            if not batch:
                continue
            self._in_flight += 1
            self.batches += 1
            task = loop.create_task(self._read(batch, loop))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        try:
            pages = await self.store.read_pages_async([request for request, _ in batch])
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        else:
            for (_, future), page in zip(batch, pages, strict=True):
                if not future.done():
                    future.set_result(page)
        finally:
            self._in_flight -= 1
            if self._queue:
                self._schedule(loop)
