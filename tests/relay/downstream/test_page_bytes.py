"""Pages bounded by bytes (``http.max_page_bytes``, :attr:`PageRequest.max_bytes`): a page
ends with the op whose row data and keys reach the bound, at least one op per page.
Before, a page was bounded by its ops only: a bucket of large rows made pages of
``max_page_ops`` large rows, built whole in the relay's memory and sent as one WebSocket
message over a device's 64 MiB limit (the device dropped the stream).  Page after page,
one bucket or several merged, the ops are those of unbounded pages, none lost or twice,
and the cursors end where theirs do."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from relay.downstream.api_sync import ApiConfig
from relay.downstream.bucket_store import ChangeKind, PageRequest, RowChange
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.rules import bucket_id
from tests.relay.downstream.test_relay_api import Env
from tests.relay.downstream.test_wire_pages import RULES, T

SIZES = [10, 50_000, 200, 120_000, 5, 300_000, 90_000, 10, 10, 10, 70_000, 1, 400_000, 3]


@pytest.fixture
def store(pg_dsn: str) -> Iterator[PgBucketStore]:
    s = PgBucketStore(pg_dsn)
    s.migrate()
    try:
        yield s
    finally:
        s.close()


def _pages(
    store: PgBucketStore, cursors: dict[str, int], limit: int, max_bytes: int
) -> Iterator[list[dict[str, object]]]:
    while True:
        page = store.read_pages([PageRequest(cursors, limit, None, True, max_bytes)])[0]
        assert page.wire is not None
        yield json.loads(page.wire.json)
        cursors = dict(page.cursors)
        if not page.has_more:
            return


@pytest.mark.parametrize("several", [False, True])
def test_pages_end_at_their_bytes_and_lose_no_op(store: PgBucketStore, several: bool) -> None:
    changes = [
        RowChange(T, ChangeKind.UPSERT, (1, i), (i,), {"id": i, "tech": "t1", "doc": "d" * n})
        for i, n in enumerate(SIZES, start=1)
    ]
    store.apply(RULES, changes)
    store.apply(RULES, [RowChange(T, ChangeKind.DELETE, (2, 0), (3,))])  # a REMOVE too
    t1 = bucket_id("tech", ["t1"])
    wanted = {t1: 0, "all[]": 0} if several else {t1: 0}
    everything = [op for page in _pages(store, dict(wanted), 1000, 0) for op in page]
    assert len(everything) == (2 * len(SIZES) + 2 if several else len(SIZES) + 1)
    bound = 150_000
    pages = list(_pages(store, dict(wanted), 1000, bound))
    assert [op for page in pages for op in page] == everything  # in order, each once
    assert len(pages) > 3 and all(pages)
    for page in pages:
        before_last = sum(len(json.dumps(op.get("data") or "")) for op in page[:-1])
        assert before_last < bound + 1000, [op["op_id"] for op in page]
    # the op that reaches the bound ends its page (a row larger than the bound is sent)
    assert any("d" * 400_000 in json.dumps(page[-1]) for page in pages)
    # an op limit still applies within the bound
    small = list(_pages(store, dict(wanted), 2, bound))
    assert [op for page in small for op in page] == everything
    assert all(len(page) <= 2 for page in small)


def test_changes_messages_of_large_rows_are_bounded(pg_dsn: str) -> None:
    e = Env(pg_dsn, ApiConfig(rate_per_s=0, max_page_bytes=100_000))
    try:
        for i in range(1, 41):
            e.order(i, "t1", notes="n" * 20_000)
        with TestClient(e.app) as c:
            headers = e.headers("tab-1", technician="t1")
            cursor: str | None = None
            keys: list[int] = []
            sizes: list[int] = []
            while True:
                params = {"limit": 5000, **({"cursor": cursor} if cursor else {})}
                r = c.get("/v1/changes", params=params, headers=headers)
                assert r.status_code == 200
                msg = r.json()
                sizes.append(len(r.content))
                keys += [op["key"][0] for op in msg["ops"]]
                cursor = msg["cursor"]
                if msg["checkpoint"]["complete"] and not msg["has_more"]:
                    break
        assert keys == list(range(1, 41))
        assert len(sizes) >= 8 and max(sizes) < 150_000, sizes
    finally:
        e.store.close()
