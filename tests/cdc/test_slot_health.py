"""Slot health and recovery, the pure parts: what a session does with its slot at start, how
a slot reading is judged, and which keys a table topic leaves present."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.errors import SlotLost
from cdc.metrics import OP_OFFSET
from cdc.recovery_deletes import LiveKeys
from cdc.resume_position import ResumePosition
from cdc.slot_health import Level, SlotHealth, StartAction, assess, start_action

MB = 1024 * 1024


def health(**kw: object) -> SlotHealth:
    base = SlotHealth(
        slot="s",
        wal_status="reserved",
        invalidation=None,
        active_pid=None,
        restart_lsn=100,
        confirmed_flush_lsn=200,
        current_wal_lsn=300,
        retained_bytes=200,
        safe_wal_size=10 * MB,
        keep_limit_bytes=None,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


DONE = ResumePosition(0x5000, 3, True)
MID_SNAPSHOT = ResumePosition(0x5000, 3, False, snapshot_done=False)


@pytest.mark.parametrize(
    ("slot", "resume", "initial", "expected"),
    [
        (None, None, True, StartAction.CREATE_WITH_SNAPSHOT),  # first start
        (None, None, False, StartAction.CREATE),  # first start, snapshot = never
        (None, MID_SNAPSHOT, True, StartAction.CREATE_WITH_SNAPSHOT),
        (health(), None, True, StartAction.RECREATE_WITH_SNAPSHOT),
        (health(), MID_SNAPSHOT, True, StartAction.RECREATE_WITH_SNAPSHOT),
        # a lost slot whose snapshot never finished: every row is read again anyway
        (health(wal_status="lost"), MID_SNAPSHOT, True, StartAction.RECREATE_WITH_SNAPSHOT),
        (health(), DONE, True, StartAction.STREAM),
        (health(), DONE, False, StartAction.STREAM),
        (health(wal_status="unreserved"), DONE, True, StartAction.STREAM),
    ],
)
def test_start_action(
    slot: SlotHealth | None, resume: ResumePosition | None, initial: bool, expected: StartAction
) -> None:
    assert start_action("s", slot, resume, initial_snapshot=initial) is expected


@pytest.mark.parametrize(
    ("slot", "resume", "initial", "message"),
    [
        (health(wal_status="lost", restart_lsn=None), DONE, True, "is lost (wal_status 'lost'"),
        (health(invalidation="rows_removed"), DONE, True, "invalidated it (rows_removed)"),
        (None, DONE, True, "does not exist, but Kafka holds a resume position"),
        (None, DONE, False, "does not exist, but Kafka holds a resume position"),
        (None, MID_SNAPSHOT, False, "does not exist, but Kafka holds"),
        (health(), dataclasses.replace(DONE, recovering=True), True, "did not finish"),
        (None, dataclasses.replace(DONE, recovering=True), True, "did not finish"),
    ],
)
def test_start_refuses_when_changes_would_be_skipped(
    slot: SlotHealth | None, resume: ResumePosition, initial: bool, message: str
) -> None:
    with pytest.raises(SlotLost, match=r"fieldsync cdc recover --config FILE") as err:
        start_action("s", slot, resume, initial_snapshot=initial)
    assert message in str(err.value)


def test_assess_warns_past_the_share_of_max_slot_wal_keep_size() -> None:
    limit = 100 * MB
    assert assess(health(retained_bytes=79 * MB, keep_limit_bytes=limit), 0.8)[0] is Level.OK
    level, message = assess(health(retained_bytes=81 * MB, keep_limit_bytes=limit), 0.8)
    assert level is Level.WARN
    assert "81.0 MB of WAL, 81% of max_slot_wal_keep_size (100.0 MB; warning at 80%)" in message
    # unlimited: nothing to compare with (PostgreSQL does not tell the free disk space)
    assert assess(health(retained_bytes=10_000 * MB), 0.8)[0] is Level.OK
    level, message = assess(health(wal_status="unreserved", keep_limit_bytes=limit), 0.8)
    assert level is Level.WARN and "'unreserved'" in message
    level, message = assess(health(wal_status="lost", keep_limit_bytes=limit), 0.8)
    assert level is Level.LOST and "max_slot_wal_keep_size 100.0 MB" in message


def test_slot_health_from_the_rows_json() -> None:
    row = {
        "slot_name": "s",
        "wal_status": "extended",
        "active_pid": 42,
        "restart_lsn": "0/100",
        "confirmed_flush_lsn": "0/200",
        "safe_wal_size": 1234,
        "conflicting": False,
    }
    h = SlotHealth.from_row("s", json.dumps(row), "0/300", 512, -1)
    assert (h.wal_status, h.active_pid, h.restart_lsn, h.confirmed_flush_lsn) == (
        "extended",
        42,
        0x100,
        0x200,
    )
    assert (h.retained_bytes, h.safe_wal_size, h.keep_limit_bytes, h.lost) == (
        512,
        1234,
        None,
        False,
    )
    assert h.share_of_limit is None
    gone = SlotHealth.from_row("s", json.dumps({**row, "conflicting": True}), "0/300", None, MB)
    assert gone.lost and gone.invalidation == "conflicting" and gone.keep_limit_bytes == MB


# --------------------------------------------------------------------------- live keys


def event(op: str, fp: bytes = b"F" * 8) -> bytes:
    value = b"\xc3\x01" + fp + b"\x02" + op.encode() + b"rest"
    assert value[OP_OFFSET] == ord(op)
    return value


Record = tuple[bytes | None, str | None, int]  # key, op (None: tombstone), position


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"k1", b"k2", b"k3", None]),
            st.sampled_from(["c", "u", "d", "r", "t", None]),
        ),
        max_size=30,
    )
)
def test_live_keys_are_those_whose_last_event_leaves_the_row(
    ops: list[tuple[bytes | None, str | None]],
) -> None:
    """Folding a topic's records in position order gives the keys a consumer applying them
    would hold (a truncate, keyless, empties the table; a tombstone removes its key)."""
    folded = LiveKeys()
    model: dict[bytes, int] = {}
    for position, (key, op) in enumerate(ops):
        if op == "t":
            folded.add(None, event("t"), (position, 0))
            model.clear()
            continue
        if key is None:
            if op is not None:
                folded.add(None, event(op), (position, 0))
            continue
        folded.add(key, event(op) if op is not None else None, (position, 0))
        if op in ("c", "u", "r"):
            model[key] = position
        else:
            model.pop(key, None)
    assert set(folded.live()) == set(model)
    assert all(fp == b"F" * 8 for fp in folded.live().values())
