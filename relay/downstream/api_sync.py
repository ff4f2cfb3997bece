"""The device API's read path, shared by ``GET /v1/changes`` and the WebSocket stream.

:class:`ApiConfig` holds the API's limits and tuning; :class:`ApiState` what the
endpoints share (store, rules, authenticator, limiter, read-ahead pages, the coalesced
page reads).  A device syncs
the buckets its token's claims grant (:func:`granted`); :func:`read_page` reads the next
page of their ops from the bucket store (503 when it cannot), and :func:`next_changes`
long-polls: when nothing is new, it waits on the store's change listener up to the
request's ``wait`` and reads again (counted while waiting in the gauge
``fieldsync_relay_long_polls``).  A device catching up (``has_more``) gets its next page
read ahead while it processes the current one (:class:`Prefetcher`).

Concurrency model: one asyncio event loop (uvicorn).  Store reads run in worker threads,
coalesced across devices (:class:`relay.downstream.api_reads.PageReads`: requests made at the
same moment are answered from one snapshot); waits share the store's one LISTEN connection
(``wait_for_change_async``), so an idle long-poll holds no thread and no database
connection.  :class:`Prefetcher` is only touched from the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Generic, TypeVar

from relay.api_errors import Unavailable
from relay.auth import Authenticator, DeviceIdentity
from relay.downstream.api_bodies import PreparedChanges, prepare_changes
from relay.downstream.api_cursor import Cursor
from relay.downstream.api_limits import RateLimiter
from relay.downstream.api_reads import PageReads
from relay.downstream.bucket_store import BucketStore, OpsPage
from relay.downstream.rules import Rules
from relay.errors import RelayError
from relay.metrics import LONG_POLLS

log = logging.getLogger("relay.downstream.api")


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    """Limits and tuning of the device API (from ``[http]``, see relay/settings.py)."""

    max_body_bytes: int = 1_048_576
    max_page_ops: int = 5000
    max_page_bytes: int = 16_777_216
    """A changes message ends with the op whose row data reach this many bytes (at least
    one op): a page of large rows stays far below a device's WebSocket message limit
    (64 MiB) and the relay's memory bounded."""
    default_page_ops: int = 1000
    long_poll_s: float = 30.0
    rate_per_s: float = 20.0
    rate_burst: int = 40
    max_connections: int = 10000
    gzip_min_bytes: int = 1024
    gzip_level: int = 1
    counters: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    """Per table, the columns the applier merges as counters (policy ``counter`` in the
    conflicts file): ``/v1/schema`` names them, so devices show an open edit of such a
    column as a delta on top of the server's value."""
    body_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_page_ops",
            "max_page_bytes",
            "default_page_ops",
            "rate_burst",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ApiConfig.{name} must be >= 1")
        if not self.body_timeout_s > 0:
            raise ValueError("ApiConfig.body_timeout_s must be > 0")
        if self.long_poll_s < 0 or self.rate_per_s < 0:
            raise ValueError("ApiConfig.long_poll_s and rate_per_s must be >= 0")
        if not 1 <= self.gzip_level <= 9:
            raise ValueError("ApiConfig.gzip_level must be 1..9")

    @property
    def page_default(self) -> int:
        return min(self.default_page_ops, self.max_page_ops)


# --------------------------------------------------------------------------- state and reads


PrefetchKey = tuple[str, tuple[str, ...], str, int, bool]
"""(device id, its buckets, cursor text, limit, gzip accepted) of a page read ahead."""

_T = TypeVar("_T")


class Prefetcher(Generic[_T]):
    """Pages read ahead for devices that are catching up (``has_more``).

    While a device parses page N, the relay already reads page N+1 from the
    store and prepares its response (relay/downstream/api_bodies.py); the
    device's next request (same device, buckets, cursor, limit and gzip or not)
    takes it.  At most ``size`` pages are held, each for at most ``ttl_s``
    seconds; older ones are dropped.  A page read ahead comes from a slightly
    earlier store snapshot, which is exactly what the device would have got by
    asking a moment sooner.  Event-loop only.
    """

    def __init__(self, size: int = 16, ttl_s: float = 30.0) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._pages: dict[PrefetchKey, tuple[float, asyncio.Task[_T]]] = {}

    def __len__(self) -> int:
        return len(self._pages)

    def start(self, key: PrefetchKey, read: Awaitable[_T]) -> None:
        now = time.monotonic()
        for k, (at, task) in list(self._pages.items()):
            if now - at > self.ttl_s or len(self._pages) >= self.size:
                del self._pages[k]
                task.cancel()
        task = asyncio.ensure_future(read)
        task.add_done_callback(_retrieve)
        self._pages[key] = (now, task)

    def take(self, key: PrefetchKey) -> asyncio.Task[_T] | None:
        entry = self._pages.pop(key, None)
        if entry is None or time.monotonic() - entry[0] > self.ttl_s:
            return None
        return entry[1]


def _retrieve(task: asyncio.Task[_T]) -> None:
    """Mark a read-ahead's exception as seen (it resurfaces when the page is taken)."""
    if not task.cancelled():
        task.exception()


@dataclasses.dataclass
class ApiState:
    """What the endpoints share: set once in :func:`relay.downstream.api.create_app`."""

    store: BucketStore
    rules: Rules
    authenticator: Authenticator
    config: ApiConfig
    limiter: RateLimiter
    prefetch: Prefetcher[PreparedChanges] = dataclasses.field(default_factory=Prefetcher)
    reads: PageReads = dataclasses.field(init=False)
    """Every page read goes through it: reads made at the same moment share one store
    read (relay/downstream/api_reads.py)."""

    def __post_init__(self) -> None:
        self.reads = PageReads(self.store)


def granted(state: ApiState, identity: DeviceIdentity) -> list[str]:
    return sorted(state.rules.buckets_for_claims(identity.claims))


async def read_page(
    state: ApiState, cursors: Mapping[str, int], limit: int, epochs: Mapping[str, int]
) -> OpsPage:
    try:
        return await state.reads.read(cursors, limit, epochs, state.config.max_page_bytes)
    except RelayError as exc:
        log.warning("bucket store read failed: %s", exc)
        raise Unavailable("the bucket store cannot be read right now; retry shortly") from exc


async def prepare(
    state: ApiState, page: OpsPage, dropped: Sequence[str], gzip: bool
) -> PreparedChanges:
    """The response of ``page`` (relay/downstream/api_bodies.py), gzipped when ``gzip``
    and the body reaches ``gzip_min_bytes``."""
    cfg = state.config
    return await prepare_changes(page, dropped, gzip, cfg.gzip_min_bytes, cfg.gzip_level)


async def read_ahead(
    state: ApiState, before: PreparedChanges, limit: int, gzip: bool
) -> PreparedChanges:
    """The response of the page after ``before`` (same buckets and limit), prepared."""
    after = await read_page(state, before.cursors, limit, before.epochs)
    return await prepare(state, after, (), gzip)


async def next_changes(
    state: ApiState,
    buckets: Sequence[str],
    have: Cursor,
    limit: int,
    wait_s: float,
    wait_always: bool,
) -> OpsPage:
    """Read the next page for ``buckets``; if there is nothing new, wait up to ``wait_s``.

    "Nothing new": no ops, no resync and no cursor moved.  Unless ``wait_always``,
    a first read (empty cursor) returns at once so the device gets a checkpoint.
    """
    wanted, epochs = have.for_buckets(buckets)
    deadline = time.monotonic() + wait_s
    while True:
        page = await read_page(state, wanted, limit, epochs)
        nothing_new = not page.op_count and not page.resync and dict(page.cursors) == wanted
        if not nothing_new or (not have.ops and not wait_always):
            return page
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not buckets:
            return page
        try:
            with LONG_POLLS.track_inprogress():
                await state.store.wait_for_change_async(list(buckets), page.head_op_id, remaining)
        except RelayError as exc:
            log.warning("bucket store change wait failed: %s", exc)
            return page
