"""Hybrid logical clock: encoding, ordering, send/recv rules, drift bound, overflow."""

from __future__ import annotations

import dataclasses
import re
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.hlc import MAX_LOGICAL, ClockDriftError, Hlc, HybridClock, valid_node

nodes = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="\x7f"),
    min_size=1,
    max_size=20,
).filter(valid_node)
stamps = st.builds(Hlc, st.integers(0, 0xFFFF_FFFF_FFFF), st.integers(0, MAX_LOGICAL), nodes)


class FakeWall:
    def __init__(self, ms: int = 1_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@given(stamps)
def test_encode_decode_round_trip(ts: Hlc) -> None:
    assert Hlc.decode(ts.encode()) == ts
    assert Hlc.from_int(ts.to_int(), ts.node) == ts


@given(stamps, stamps)
def test_string_order_is_timestamp_order(a: Hlc, b: Hlc) -> None:
    assert (a.encode() < b.encode()) == (a < b)
    if a.node == b.node:
        assert (a.to_int() < b.to_int()) == (a < b)


def test_encoding_is_fixed_width_hex() -> None:
    assert Hlc(0x189F3C2A1B0, 3, "tablet-7").encode() == "0189f3c2a1b0.0003.tablet-7"
    assert Hlc.decode("0189f3c2a1b0.0003.node.with.dots").node == "node.with.dots"


@pytest.mark.parametrize(
    "text",
    ["", "0189f3c2a1b0.0003", "0189F3C2A1B0.0003.n", "189f3c2a1b0.0003.n", "0189f3c2a1b0.0003.a b"],
)
def test_decode_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="HLC"):
        Hlc.decode(text)


def test_decode_checks_every_node_and_gives_an_ordinary_frozen_timestamp() -> None:
    """decode skips the dataclass __init__: its result must still equal, hash and refuse
    changes like a constructed one, and a node it has not seen is checked every time."""
    from core import hlc as hlc_module

    decoded = Hlc.decode("0189f3c2a1b0.ffff.tablet-7")
    assert decoded == Hlc(0x189F3C2A1B0, 0xFFFF, "tablet-7")
    assert hash(decoded) == hash(Hlc(0x189F3C2A1B0, 0xFFFF, "tablet-7"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoded.node = "other"  # type: ignore[misc]
    for _ in range(2):  # the second time after a valid node filled the cache
        with pytest.raises(ValueError, match=re.escape(r"node 'a\x00b'")):
            Hlc.decode("0189f3c2a1b0.0003.a\x00b")
        with pytest.raises(ValueError, match="node"):
            Hlc.decode("0189f3c2a1b0.0003." + "n" * 129)
    for i in range(hlc_module._VALID_NODES_MAX + 10):  # the cache stays bounded
        assert Hlc.decode(f"0189f3c2a1b0.0003.dev-{i}").node == f"dev-{i}"
    assert 0 < len(hlc_module._VALID_NODES) <= hlc_module._VALID_NODES_MAX


def test_invalid_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="logical"):
        Hlc(1, MAX_LOGICAL + 1, "n")
    with pytest.raises(ValueError, match="physical"):
        Hlc(-1, 0, "n")
    with pytest.raises(ValueError, match="node"):
        Hlc(1, 0, "")


@given(st.lists(st.integers(-50, 50), min_size=1, max_size=60))
def test_local_events_strictly_increase_even_when_the_wall_clock_goes_back(
    steps: list[int],
) -> None:
    wall = FakeWall(10_000)
    clock = HybridClock("a", wall_ms=wall)
    previous = clock.now()
    for step in steps:
        wall.ms += step
        ts = clock.now()
        assert ts > previous
        assert ts.physical_ms >= wall.ms or ts.physical_ms == previous.physical_ms
        previous = ts


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]), st.sampled_from(["a", "b", "c"]), st.integers(0, 30)
        ),
        min_size=1,
        max_size=40,
    )
)
def test_receive_orders_after_the_sent_timestamp(msgs: list[tuple[str, str, int]]) -> None:
    """Happened-before is kept: a receive is later than the send and than all local events."""
    walls = {n: FakeWall(5_000 + i * 700) for i, n in enumerate("abc")}
    clocks = {n: HybridClock(n, wall_ms=walls[n]) for n in "abc"}
    for sender, receiver, advance in msgs:
        walls[sender].ms += advance
        sent = clocks[sender].send()
        before = clocks[receiver].last
        got = clocks[receiver].recv(sent)
        assert got > sent and got > before
        assert got.physical_ms <= max(w.ms for w in walls.values())


def test_recv_rule_cases() -> None:
    wall = FakeWall(100)
    clock = HybridClock("a", wall_ms=wall, last=Hlc(100, 4, "a"))
    # l' == l == lm: max(c, cm) + 1
    assert clock.recv(Hlc(100, 9, "b")) == Hlc(100, 10, "a")
    # remote ahead: cm + 1
    assert clock.recv(Hlc(150, 2, "b")) == Hlc(150, 3, "a")
    # local ahead of remote and wall: c + 1
    assert clock.recv(Hlc(120, 50, "b")) == Hlc(150, 4, "a")
    # wall ahead of both: counter restarts
    wall.ms = 200
    assert clock.recv(Hlc(120, 50, "b")) == Hlc(200, 0, "a")


def test_drift_bound_refuses_far_future_timestamps_and_keeps_the_clock() -> None:
    clock = HybridClock("a", wall_ms=FakeWall(1_000), max_drift_ms=500)
    before = clock.now()
    with pytest.raises(ClockDriftError, match="ahead"):
        clock.recv(Hlc(1_501, 0, "b"))
    assert clock.last == before
    assert clock.recv(Hlc(1_500, 0, "b")) == Hlc(1_500, 1, "a")


def test_counter_overflow_moves_physical_time_on() -> None:
    clock = HybridClock("a", wall_ms=FakeWall(7), last=Hlc(7, MAX_LOGICAL, "a"))
    assert clock.now() == Hlc(8, 0, "a")


def test_restored_clock_continues_after_last() -> None:
    last = Hlc(9_999, 3, "dev")
    clock = HybridClock("dev", wall_ms=FakeWall(1_000), last=last)
    assert clock.now() == Hlc(9_999, 4, "dev")


def test_threads_never_get_the_same_timestamp() -> None:
    clock = HybridClock("a", wall_ms=FakeWall(42))
    seen: list[Hlc] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [clock.now() for _ in range(2000)]
        with lock:
            seen.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == len(seen) == 8000
