"""What the stream puts on the wire, cheaply: short messages in plain frames under
permessage-deflate (relay/ws_protocol.py), cursors in a stored zlib block when short
(relay/downstream/api_cursor.py), and the stream's direct path through the app
(relay/downstream/api.py ``DeviceApi``) still counting against the connection limit."""

from __future__ import annotations

import base64
import time
import zlib

import orjson
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from relay.downstream.api_cursor import (
    CURSOR_PREFIX,
    STORED_MAX_BYTES,
    decode_cursor,
    encode_cursor,
)
from relay.downstream.api_sync import ApiConfig
from relay.ws_protocol import MIN_COMPRESS_BYTES, WINDOW_BITS, SmallPlainDeflate
from tests.relay.downstream.test_relay_api import Env


def _server_side() -> SmallPlainDeflate:
    return SmallPlainDeflate(True, True, WINDOW_BITS, WINDOW_BITS, {"memLevel": 5})


def _client_side() -> PerMessageDeflate:
    return PerMessageDeflate(True, True, WINDOW_BITS, WINDOW_BITS)


@settings(max_examples=60, deadline=None)
@given(
    st.binary(min_size=0, max_size=3 * MIN_COMPRESS_BYTES),
    st.sampled_from([Opcode.TEXT, Opcode.BINARY]),
)
def test_short_messages_go_plain_long_ones_deflated_and_both_read_back(
    data: bytes, opcode: Opcode
) -> None:
    """Under :data:`MIN_COMPRESS_BYTES` a message is sent as it is (RSV1 unset, which RFC
    7692 allows); from there on compressed (RSV1 set); a client's permessage-deflate reads
    both back to the same bytes, message after message."""
    sender, receiver = _server_side(), _client_side()
    for _ in range(2):  # no state carried from one message to the next
        frame = Frame(opcode, data)
        sent = sender.encode(frame)
        if len(data) < MIN_COMPRESS_BYTES:
            assert sent is frame and not sent.rsv1
        else:
            assert sent.rsv1 and sent.data != data
        assert bytes(receiver.decode(sent).data) == data


def test_control_frames_and_fragments_are_left_to_deflate() -> None:
    sender = _server_side()
    ping = Frame(Opcode.PING, b"x")
    assert sender.encode(ping) is ping
    first = Frame(Opcode.TEXT, b"short", fin=False)  # a fragmented message is compressed whole
    assert sender.encode(first).rsv1


_buckets = st.text(min_size=1, max_size=40)
_positions = st.integers(min_value=0, max_value=(1 << 63) - 1)


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(_buckets, st.tuples(_positions, _positions), max_size=30))
def test_cursor_round_trips_stored_or_compressed(entries: dict[str, tuple[int, int]]) -> None:
    """Short cursors are a stored zlib block, long ones compressed; both decode to what
    was encoded (op 0 left out), and both are zlib streams any zlib reads (devices parse
    the cursor's positions: device_agent/client.py)."""
    ops = {b: n for b, (n, _) in entries.items()}
    epochs = {b: e for b, (_, e) in entries.items()}
    text = encode_cursor(ops, epochs)
    assert text.startswith(CURSOR_PREFIX)
    body = text[len(CURSOR_PREFIX) :]
    raw = zlib.decompress(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    kept = sorted([b, n, epochs[b]] for b, n in ops.items() if n > 0)
    assert orjson.loads(raw) == kept
    if len(raw) > STORED_MAX_BYTES:
        assert len(body) < len(base64.urlsafe_b64encode(raw))  # compressed
    back = decode_cursor(text)
    assert dict(back.ops) == {b: n for b, n in ops.items() if n > 0}
    assert dict(back.epochs) == {b: epochs[b] for b in back.ops}


def test_a_stream_counts_against_the_connection_limit(pg_dsn: str) -> None:
    """The stream's direct path shares the app's connection count: with one allowed, an open
    stream makes any other request a 503, and its close frees the slot."""
    e = Env(pg_dsn, ApiConfig(rate_per_s=0, max_connections=1))
    try:
        e.order(1, "t1")
        with TestClient(e.app) as c:
            with c.websocket_connect(
                "/v1/stream", headers=e.headers("tab-1", technician="t1")
            ) as ws:
                assert orjson.loads(ws.receive_text())["checkpoint"]["complete"]
                r = c.get("/healthz")
                assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
                assert r.headers["x-request-id"]
            deadline = time.monotonic() + 30
            while (r := c.get("/healthz")).status_code != 200:
                assert time.monotonic() < deadline, "the stream's slot was never freed"
                time.sleep(0.05)
    finally:
        e.store.close()
