"""Coalesced page reads: many requests answered from one snapshot give every request exactly
the page it would have got alone (store level, API level, and streams woken by one change)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.downstream.api_messages import changes_message, dumps, ops_json
from relay.downstream.api_reads import PageReads
from relay.downstream.api_sync import ApiConfig
from relay.downstream.bucket_store import OpsPage, PageRequest
from relay.downstream.pg_bucket_store import PgBucketStore
from tests.relay.downstream.test_relay_api import Env, ws_next

ODD = 't"\u0001\\é/\u2028'
"""A technician claim whose bucket id needs every kind of JSON escape."""

BUCKETS = (
    'tech_orders["t1"]',
    f"tech_orders[{json.dumps(ODD)}]",
    'tech_orders["t2"]',
    'site["plant-1"]',
    'site["plant-2"]',
    "catalog[]",
    'tech_orders["nobody"]',  # never written
)


@pytest.fixture
def filled(pg_dsn: str) -> Iterator[Env]:
    """A store whose buckets hold PUTs, REMOVEs (deletes, reassignments) and one bucket
    whose old REMOVEs were dropped (a new compaction epoch)."""
    e = Env(pg_dsn)
    try:
        for i in range(1, 13):
            e.order(i, f"t{i % 2 + 1}", site=f"plant-{i % 3 % 2 + 1}")
        for i in range(1, 6):
            e.part(f"p{i}", f"part {i}")
        e.delete(3)
        e.order(4, "t1", site="plant-2")  # reassigned
        e.order(5, "t2", status="closed")  # leaves tech_orders and site
        e.store.compact(bucket='tech_orders["t2"]', drop_removes_below=10**12)
        e.order(13, "t2")
        e.part("p2", "part two")
        e.order(14, ODD, notes='\u0000 is not here, but \t " \\ and é are')
        yield e
    finally:
        e.store.close()


def _op_ids(store: PgBucketStore) -> dict[str, list[int]]:
    ids: dict[str, list[int]] = {b: [] for b in BUCKETS}
    for b in BUCKETS:
        ids[b] = [op.op_id for op in store.read_ops({b: 0}, 10_000).ops]
    return ids


@st.composite
def _requests(draw: Any, ids: Mapping[str, Sequence[int]]) -> list[PageRequest]:
    out = []
    for _ in range(draw(st.integers(1, 10))):
        buckets = draw(st.lists(st.sampled_from(BUCKETS), min_size=1, max_size=4, unique=True))
        cursors = {}
        epochs = {}
        for b in buckets:
            top = max(ids[b], default=0)
            cursors[b] = draw(st.sampled_from([0, *ids[b], top + 7]))  # top + 7: another store
            epoch = draw(st.sampled_from([None, 0, 1]))
            if epoch is not None:
                epochs[b] = epoch
        out.append(
            PageRequest(cursors, draw(st.integers(1, 8)), epochs or None, wire=draw(st.booleans()))
        )
    return out


def test_read_pages_is_read_ops_of_each_request_alone(filled: Env) -> None:
    store = filled.store
    ids = _op_ids(store)
    assert all(ids[b] for b in BUCKETS[:-1]) and not ids[BUCKETS[-1]]

    logs = {b: store.read_ops({b: 0}, 10_000).ops for b in BUCKETS}
    checkpoints = store.bucket_state(BUCKETS)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_requests(ids))
    def check(requests: list[PageRequest]) -> None:
        pages = store.read_pages(requests)
        alone = [store.read_ops(r.cursors, r.limit, r.epochs) for r in requests]
        assert [_as_ops(p, a) for p, a in zip(pages, alone, strict=True)] == alone
        for request, page in zip(requests, alone, strict=True):  # and the obvious way
            epochs = request.epochs or {}
            resync = {
                b for b, c in request.cursors.items()
                if checkpoints[b].needs_resync(c, epochs.get(b))
            }  # fmt: skip
            wanted = sorted(
                (op for b, c in request.cursors.items() if b not in resync
                 for op in logs[b] if op.op_id > c),
                key=lambda op: op.op_id,
            )  # fmt: skip
            assert page.resync == resync
            assert page.ops == tuple(wanted[: request.limit])
            if len(wanted) != request.limit:  # a full page may end just below last_op_id
                assert page.has_more == (len(wanted) > request.limit)

    check()


def _as_ops(page: OpsPage, alone: OpsPage) -> OpsPage:
    """A wire page checked against the page of Op objects read alone (its JSON is what
    ops_json makes of those), then given those ops to compare the rest."""
    if page.wire is None:
        return page
    assert page.ops == () and page.wire.count == len(alone.ops)
    assert page.wire.json == ops_json(alone.ops)
    assert json.loads(page.wire.json) == json.loads(ops_json(alone.ops))
    return dataclasses.replace(page, ops=alone.ops, wire=None)


def test_concurrent_api_reads_share_one_batch_and_get_their_own_pages(filled: Env) -> None:
    store = filled.store
    ids = _op_ids(store)
    catalog = ids["catalog[]"]
    requests = [
        PageRequest({"catalog[]": 0, 'tech_orders["t1"]': 0}, 3),
        PageRequest({"catalog[]": catalog[1], 'tech_orders["t1"]': 0}, 100),
        PageRequest({"catalog[]": catalog[1]}, 2),
        PageRequest({"catalog[]": catalog[1]}, 100),  # same slice, larger limit
        PageRequest({"catalog[]": catalog[-1], 'tech_orders["t2"]': 1}, 50),  # old epoch
        PageRequest({'site["plant-2"]': 0}, 1),
    ]
    reads = PageReads(store)

    async def all_at_once() -> list[OpsPage]:
        return list(
            await asyncio.gather(*(reads.read(r.cursors, r.limit, r.epochs) for r in requests))
        )

    pages = asyncio.run(all_at_once())
    assert reads.batches == 1
    alone = [store.read_ops(r.cursors, r.limit, r.epochs) for r in requests]
    assert all(p.wire is not None for p in pages)
    assert [_as_ops(p, a) for p, a in zip(pages, alone, strict=True)] == alone


def test_streams_woken_by_one_change_are_read_in_one_batch(pg_dsn: str) -> None:
    """Streams of devices at different positions, woken by one commit to the bucket they all
    sync, each get the very bytes a read of their own page gives; one store read for all."""
    e = Env(pg_dsn, ApiConfig(rate_per_s=0, max_page_ops=4))
    try:
        for i in range(1, 7):
            e.order(i, f"t{i % 3}")
            e.part(f"p{i}", f"part {i}")
        devices = [("tab-0", "t0"), ("tab-1", "t1"), ("tab-2", "t2"), ("tab-3", "t1")]
        with TestClient(e.app) as c:
            start: list[str | None] = [None]  # from scratch, then mid-way cursors
            _, mid = sync_all_first_page(c, e.headers("x", technician="t1"))
            start += [mid, mid, None]
            streams = []
            for (device, tech), cursor in zip(devices, start, strict=True):
                query = f"?cursor={cursor}" if cursor else ""
                ws = c.websocket_connect(
                    f"/v1/stream{query}", headers=e.headers(device, technician=tech)
                ).__enter__()
                streams.append(ws)
            try:
                last = [_drain_to_complete(ws) for ws in streams]
                deadline = time.monotonic() + 30
                while e.store.waiting("catalog[]") < len(streams):
                    assert time.monotonic() < deadline, "streams never waited on catalog[]"
                    time.sleep(0.02)
                reads = e.app.state.api.reads
                before = reads.batches
                e.part("p9", "new part")
                for ws, (_device, tech), msg in zip(streams, devices, last, strict=True):
                    text = ws.receive_text()
                    assert text == _alone(e, tech, msg["cursor"])
                assert reads.batches == before + 1
            finally:
                for ws in streams:
                    ws.__exit__(None, None, None)
    finally:
        e.store.close()


def sync_all_first_page(c: TestClient, headers: dict[str, str]) -> tuple[Any, str]:
    r = c.get("/v1/changes", params={"limit": 3}, headers=headers)
    assert r.status_code == 200 and r.json()["has_more"]
    return r.json(), str(r.json()["cursor"])


def _drain_to_complete(ws: Any) -> dict[str, Any]:
    while True:
        msg = ws_next(ws)
        if msg["checkpoint"]["complete"]:
            return msg


def _alone(e: Env, tech: str, cursor: str) -> str:
    """The message a read of this device's page alone gives now."""
    from relay.downstream.api_cursor import decode_cursor

    buckets = sorted(e.rules.buckets_for_claims({"technician": tech}))
    cursors, epochs = decode_cursor(cursor).for_buckets(buckets)
    page = e.store.read_ops(cursors, 4, epochs)
    return dumps(changes_message(page, [])).decode()


# --------------------------------------------------------------------------- unit, fake store


class _CountingStore:
    """read_pages_async answers each request with a page naming it (pure unit fake)."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[list[PageRequest]] = []
        self.fail = fail

    async def read_pages_async(self, requests: Sequence[PageRequest]) -> list[OpsPage]:
        self.calls.append(list(requests))
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        return [
            OpsPage((), {}, dict(r.cursors), frozenset(), False, r.limit, dict(r.epochs or {}))
            for r in requests
        ]


def test_page_reads_batches_routes_and_drops_cancelled() -> None:
    store = _CountingStore()
    reads = PageReads(store, max_in_flight=1)  # type: ignore[arg-type]

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(reads.read({"a": 1}, 1))
        gone = asyncio.ensure_future(reads.read({"b": 2}, 2))
        third = asyncio.ensure_future(reads.read({"c": 3}, 3))
        await asyncio.sleep(0)  # all three queued
        await asyncio.sleep(0)  # the batch of three started
        gone.cancel()
        later = asyncio.ensure_future(reads.read({"d": 4}, 4))  # waits for the next batch
        return [await first, await third, await later, gone.cancelled()]

    a, c, d, cancelled = asyncio.run(scenario())
    assert (a.head_op_id, c.head_op_id, d.head_op_id, cancelled) == (1, 3, 4, True)
    assert [[dict(r.cursors) for r in call] for call in store.calls] == [
        [{"a": 1}, {"b": 2}, {"c": 3}],
        [{"d": 4}],
    ]


def test_page_reads_raise_a_failed_read_to_every_caller() -> None:
    reads = PageReads(_CountingStore(fail=RuntimeError("store down")))  # type: ignore[arg-type]

    async def scenario() -> list[BaseException | OpsPage]:
        return list(
            await asyncio.gather(
                reads.read({"a": 1}, 1), reads.read({"b": 1}, 1), return_exceptions=True
            )
        )

    results = asyncio.run(scenario())
    assert [str(r) for r in results] == ["store down", "store down"]
