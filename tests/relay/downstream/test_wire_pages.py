"""The pull path's page rendering: pages rendered and joined by PostgreSQL (the wire form)
are the pages of :class:`Op` objects rendered by ``ops_json``, for random rows (unicode and
every JSON escape, NULLs, big and exact numbers, bytea, TOAST-sized texts), any page size
and one or several buckets; and a changes response prepared ahead and gzip-compressed by
the relay inflates to the very body sent without compression."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.downstream.api_bodies import gzip_bytes, prepare_changes
from relay.downstream.api_messages import changes_message, dumps, ops_json
from relay.downstream.api_sync import ApiConfig
from relay.downstream.bucket_store import ChangeKind, OpKind, OpsPage, PageRequest, RowChange
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.rules import TableInfo, bucket_id
from relay.downstream.rules_parser import rules_from_mapping
from tests.relay.downstream.test_relay_api import Env

T = "public.wide"
COLUMNS = ("id", "tech", "label", "amount", "blob", "ratio", "big", "doc")
RULES = rules_from_mapping(
    {
        "token_claims": ["tech"],
        "bucket": [
            {
                "name": "tech",
                "parameters": ["t"],
                "claims": {"t": "tech"},
                "table": [{"table": T, "match": {"tech": "t"}}],
            },
            {"name": "all", "table": [{"table": T, "columns": ["label", "amount"]}]},
        ],
    },
    {T: TableInfo(COLUMNS, ("id",))},
)

_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
_TECH = st.sampled_from(["t1", 'q"\\/\u2028é', "\u0001\t\u00ff", "日本"])
_ROW = st.fixed_dictionaries(
    {
        "label": st.none() | _TEXT,
        "amount": st.none()
        | st.decimals(allow_nan=False, allow_infinity=False, places=4)
        | st.just(Decimal("123456789012345678901234567890.123456789")),
        "blob": st.none() | st.binary(max_size=64),
        "ratio": st.none() | st.floats(allow_nan=True, allow_infinity=True),
        "big": st.none() | st.integers(-(2**63), 2**63 - 1),
        # TOAST, one uncompressible: 3,000 characters or bytes drawn from a seed, not one
        # by one (eight such rows drawn one by one exceed Hypothesis' data budget at random)
        "doc": st.none()
        | st.integers(0, 2**32).map(
            lambda seed: "".join(random.Random(seed).choices('abc\u00e9\u65e5"\\\n', k=3000))
        )
        | st.integers(0, 2**32).map(lambda seed: random.Random(seed).randbytes(3000).hex()),
    }
)


@pytest.fixture
def store(pg_dsn: str) -> Iterator[PgBucketStore]:
    s = PgBucketStore(pg_dsn)
    s.migrate()
    try:
        yield s
    finally:
        s.close()


def _page_pairs(
    store: PgBucketStore, cursors: dict[str, int], limit: int
) -> Iterator[tuple[OpsPage, OpsPage]]:
    """Every page from ``cursors`` to the end, read in both forms."""
    while True:
        wire = store.read_pages([PageRequest(cursors, limit, wire=True)])[0]
        plain = store.read_ops(cursors, limit)
        yield wire, plain
        if not plain.has_more:
            return
        cursors = dict(plain.cursors)


def test_wire_pages_are_the_op_pages_rendered(store: PgBucketStore) -> None:
    next_id = iter(range(1, 10**6))

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.lists(st.tuples(_TECH, _ROW, st.booleans()), min_size=1, max_size=8),
        st.integers(1, 6),
        st.booleans(),
    )
    def check(rows: list[tuple[str, dict[str, Any], bool]], limit: int, several: bool) -> None:
        head = store.stats()["head_op_id"]
        puts, deletes = [], []
        for n, (tech, values, delete) in enumerate(rows):
            i = next(next_id)
            row = {"id": i, "tech": tech, **values}
            puts.append(RowChange(T, ChangeKind.UPSERT, (head + 1, n), (i,), row))
            if delete:  # a later change: the row leaves its buckets (REMOVE ops)
                deletes.append(RowChange(T, ChangeKind.DELETE, (head + 1, 100 + n), (i,)))
        store.apply(RULES, puts)
        store.apply(RULES, deletes)
        first = bucket_id("tech", [rows[0][0]])
        buckets = sorted({bucket_id("tech", [t]) for t, _, _ in rows})
        wanted = {b: head for b in ([*buckets, "all[]"] if several else [first])}
        seen = removes = 0
        for wire, plain in _page_pairs(store, wanted, limit):
            assert wire.wire is not None and wire.ops == ()
            assert wire.wire.count == len(plain.ops) and wire.op_count == plain.op_count
            assert wire.wire.json == ops_json(plain.ops)  # the same text, byte for byte
            assert json.loads(wire.wire.json) == json.loads(ops_json(plain.ops))
            assert (wire.cursors, wire.has_more, wire.resync) == (
                plain.cursors,
                plain.has_more,
                plain.resync,
            )
            assert dumps(changes_message(wire, [])) == dumps(changes_message(plain, []))
            seen += len(plain.ops)
            removes += sum(op.kind is OpKind.REMOVE for op in plain.ops)
        assert seen >= (len(rows) if several else 1)
        assert removes >= (len(deletes) if several else 0)

    check()


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=300_000), st.integers(1, 9))
def test_gzip_bytes_inflate_to_the_body(body: bytes, level: int) -> None:
    packed = gzip_bytes(body, level)
    assert gzip.decompress(packed) == body
    assert zlib.decompress(packed, 16 + zlib.MAX_WBITS) == body


def test_prepared_body_is_the_message(store: PgBucketStore) -> None:
    import asyncio

    rows = [
        RowChange(T, ChangeKind.UPSERT, (1, i), (i,), {"id": i, "tech": "t1", "doc": "x" * 900})
        for i in range(1, 400)
    ]
    store.apply(RULES, rows)
    page = store.read_pages([PageRequest({'tech["t1"]': 0}, 300, wire=True)])[0]
    plain = dumps(changes_message(page, ["gone[]"]))
    big = asyncio.run(prepare_changes(page, ["gone[]"], True, 1024, 1))
    assert big.gzipped and len(big.body) < len(plain) and gzip.decompress(big.body) == plain
    assert big.cursor == json.loads(plain)["cursor"]
    assert big.response().headers["content-encoding"] == "gzip"
    as_is = asyncio.run(prepare_changes(page, ["gone[]"], False, 1024, 1))
    assert not as_is.gzipped and as_is.body == plain
    assert "content-encoding" not in as_is.response().headers
    small = asyncio.run(prepare_changes(page, ["gone[]"], True, len(plain) + 1, 1))
    assert not small.gzipped and small.body == plain


def test_gzip_and_plain_pulls_get_the_same_bodies(pg_dsn: str) -> None:
    """Page after page (the later ones read ahead and prepared before they are asked
    for), a device taking gzip receives the bytes a device that does not take it gets."""
    e = Env(pg_dsn, ApiConfig(rate_per_s=0, max_page_ops=40))
    try:
        for i in range(1, 120):
            e.order(i, "t1", notes=f"order {i} " + "é" * (i % 50))
        with TestClient(e.app) as c:
            bodies: dict[str, list[bytes]] = {}
            for encoding in ("gzip", "identity"):
                headers = {**e.headers("tab-1", technician="t1"), "Accept-Encoding": encoding}
                cursor: str | None = None
                got = bodies.setdefault(encoding, [])
                while True:
                    params = {"limit": 40, **({"cursor": cursor} if cursor else {})}
                    r = c.get("/v1/changes", params=params, headers=headers)
                    assert r.status_code == 200
                    assert r.headers.get("content-encoding") == (
                        "gzip" if encoding == "gzip" else None
                    )
                    got.append(r.content)  # decoded by the client
                    msg = r.json()
                    cursor = msg["cursor"]
                    if msg["checkpoint"]["complete"]:
                        break
            assert len(bodies["gzip"]) == 3 and bodies["gzip"] == bodies["identity"]
            ops = [op for b in bodies["gzip"] for op in json.loads(b)["ops"]]
            assert [op["key"][0] for op in ops] == list(range(1, 120))
    finally:
        e.store.close()
