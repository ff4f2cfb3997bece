"""A lock another PostgreSQL session holds stops only the device whose entry needs it
(relay/upstream/applier_lock_waits.py), against the real database and broker: an office
transaction left open after updating a row; the device editing that row waits (its later
entries behind it, in order), another device's entries apply meanwhile, the stored offsets
stay below the waiting entry (a restart reads it again), and once the lock is released
every entry is applied exactly once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from core.journal_format import JournalRecord
from relay.upstream import applier_metrics
from relay.upstream.applier import Applier
from relay.upstream.applier_lock_waits import LockWait, LockWaits
from relay.upstream.applier_run import Item
from relay.upstream.applier_runs import Watermarks
from relay.upstream.applier_store import Delivery
from tests.relay.upstream.test_applier import BASE_ROW, Env, env, insert_base, seen

__all__ = ["env"]  # the fixture, used by the tests below


def wait_until(what: str, check: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def waiting() -> float:
    value = applier_metrics.REGISTRY.get_sample_value("fieldsync_applier_entries_waiting")
    return -1.0 if value is None else value


@pytest.fixture
def office(env: Env) -> Iterator[psycopg.Connection[Any]]:
    """Rows 1 and 3, and a session that updates row 1 in a transaction it leaves open."""
    insert_base(env)
    insert_base(env, id=3)
    conn = psycopg.connect(env.dsn)
    conn.execute("update work_orders set site = 'office', updated_at = now() where id = 1")
    try:
        yield conn
    finally:
        conn.close()


class Running:
    """An applier leading in a thread of this process."""

    def __init__(self, env: Env, lock_timeout_ms: int = 300) -> None:
        self.applier: Applier = env.applier(lock_timeout_ms=lock_timeout_ms)
        self.thread = threading.Thread(target=self.applier.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.applier.request_stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def applied_seqs(env: Env) -> set[tuple[str, int]]:
    rows = env.sql("select device_id, seq from fieldsync_applier.applied")
    return {(str(d), int(s)) for d, s in rows}


def same_partition(a: str, b: str, partitions: int = 4) -> bool:
    """Whether kafka-python's default partitioner puts keys ``a`` and ``b`` in one of the
    ``_journal`` topic's partitions (the applier creates 4)."""
    from kafka.partitioner.default import murmur2

    def part(key: str) -> int:
        return int((murmur2(key.encode()) & 0x7FFFFFFF) % partitions)

    return part(a) == part(b)


def produce_edits(env: Env) -> None:
    base1, base3 = BASE_ROW, {**BASE_ROW, "id": 3}
    env.produce(
        env.record("d1", "update", [1], seen(base1), {"qty": 6}),  # row 1: locked
        env.record("d1", "update", [3], seen(base3), {"qty": 8}),  # behind it, in order
        env.record("d2", "update", [3], seen(base3), {"qty": 7}),  # another device
    )


def test_a_locked_row_stops_only_its_device_and_applies_once_released(
    env: Env, office: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relay.upstream.applier")
    office_pid = office.info.backend_pid
    produce_edits(env)
    running = Running(env)
    try:
        wait_until("device d2's entry applied", lambda: ("d2", 1) in applied_seqs(env))
        wait_until("d1's two entries waiting", lambda: waiting() == 2)
        assert applied_seqs(env) == {("d2", 1)}
        assert env.sql("select qty from work_orders where id = 3") == [(7,)]  # d1's +3 waits
        warnings = [r.getMessage() for r in caplog.records if "waits for a lock" in r.getMessage()]
        assert warnings and "entry 1 of device 'd1'" in warnings[0]
        assert f"pid {office_pid}" in warnings[0] and "work_orders" in warnings[0]
        office.commit()  # the lock is released
        wait_until(
            "d1's entries applied",
            lambda: applied_seqs(env) == {("d1", 1), ("d1", 2), ("d2", 1)},
        )
        wait_until("nothing waiting", lambda: waiting() == 0)
    finally:
        running.stop()
    assert env.sql("select site, qty from work_orders where id = 1") == [("office", 6)]
    assert env.sql("select qty from work_orders where id = 3") == [(10,)]  # 5 + 2 + 3
    outs = env.outcomes(expect=3)
    assert {k: o.kind.value for k, o in outs.items()} == {
        ("d1", 1): "applied",
        ("d1", 2): "merged",  # on top of d2's change of row 3
        ("d2", 1): "applied",
    }


def test_the_lag_counts_the_entries_waiting_for_a_lock(
    env: Env, office: psycopg.Connection[Any]
) -> None:
    """fieldsync_applier_lag_records / _seconds: an entry waiting is not applied, even once
    the reader is at the end of every partition."""
    produce_edits(env)
    running = Running(env)
    applier = running.applier
    try:
        wait_until("device d2's entry applied", lambda: ("d2", 1) in applied_seqs(env))
        wait_until("d1's two entries waiting", lambda: waiting() == 2)
        wait_until(
            "the lag counting d1's entries with the reader at the end",
            lambda: (
                applier._at_end()
                and sum(applier.lag.records().values()) >= 1
                and applier.lag.seconds() > 0
            ),
            timeout=30,
        )
        office.commit()
        wait_until(
            "no lag once every entry applied",
            lambda: (
                applied_seqs(env) == {("d1", 1), ("d1", 2), ("d2", 1)}
                and applier._at_end()
                and sum(applier.lag.records().values()) == 0
                and applier.lag.seconds() == 0
            ),
        )
    finally:
        running.stop()


def test_entries_waiting_for_a_lock_survive_a_restart(
    env: Env, office: psycopg.Connection[Any]
) -> None:
    produce_edits(env)
    running = Running(env)
    try:
        wait_until("device d2's entry applied", lambda: ("d2", 1) in applied_seqs(env))
        wait_until("d1's two entries waiting", lambda: waiting() == 2)
    finally:
        running.stop()  # d1's entries were only in memory
    assert applied_seqs(env) == {("d2", 1)}
    office.commit()
    restarted = Running(env)
    try:
        wait_until(
            "every entry applied after the restart",
            lambda: applied_seqs(env) == {("d1", 1), ("d1", 2), ("d2", 1)},
        )
    finally:
        restarted.stop()
    # the stored offsets stayed below d1's entries: read again from Kafka after the restart
    assert restarted.applier.stats.records >= 2
    assert env.sql("select site, qty from work_orders where id = 1") == [("office", 6)]
    assert env.sql("select qty from work_orders where id = 3") == [(10,)]
    assert env.sql("select count(*) from fieldsync_applier.applied") == [(3,)]


def test_many_devices_meeting_one_lock_cost_the_others_one_timeout(
    env: Env, office: psycopg.Connection[Any]
) -> None:
    """Eight devices edit the locked row, then one device edits another row: it applies
    after one lock timeout of 10 s (the first device's), not eight (80 s, past the wait's
    deadline); every edit applies once the lock is released."""
    base1, base3 = BASE_ROW, {**BASE_ROW, "id": 3}
    # all in the free device's partition, so their runs come before its run
    blocked = [d for d in (f"w{n}" for n in range(200)) if same_partition(d, "free")][:8]
    env.produce(*(env.record(d, "update", [1], seen(base1), {"qty": 6}) for d in blocked))
    env.produce(env.record("free", "update", [3], seen(base3), {"qty": 7}))
    running = Running(env, lock_timeout_ms=10_000)
    try:
        wait_until(
            "the free device's entry applied",
            lambda: ("free", 1) in applied_seqs(env),
            timeout=60,
        )
        stats = running.applier.stats
        assert stats.applied == 1
        wait_until("every locked device waiting", lambda: waiting() == len(blocked))
        office.commit()
        wait_until(
            "every entry applied",
            lambda: applied_seqs(env) == {(d, 1) for d in [*blocked, "free"]},
        )
    finally:
        running.stop()
    assert env.sql("select qty from work_orders where id = 1") == [(5 + len(blocked),)]


# --------------------------------------------------------------------------- pure


def _item(device: str, offset: int) -> Item:
    record = JournalRecord(device, offset + 1, None, {}, None, 0)
    return Item(Delivery("j", 0, offset), record)


def test_waiting_entries_keep_their_device_order_and_hold_back_its_new_ones() -> None:
    waits = LockWaits(retry_s=3600.0)
    a1, a2, b1 = _item("a", 1), _item("a", 2), _item("b", 3)
    wait = LockWait("a", psycopg.errors.LockNotAvailable("lock timeout"))
    waits.set_aside("a", [a1, a2], wait)
    assert not waits.due() and len(waits) == 2
    a3, b2 = _item("a", 4), _item("b", 5)
    now, released = waits.split([b1, a3, b2])
    assert (now, released) == ([b1, b2], frozenset())  # a's new entry waits behind a1, a2
    assert waits.items() == [a1, a2, a3]
    waits.retry_s = 0.0
    waits._next_retry = 0.0
    assert waits.due()
    now, released = waits.split([_item("a", 6)])
    assert [i.where.offset for i in now] == [1, 2, 4, 6] and released == {"a"}
    assert len(waits) == 0
    assert [d for d, _ in waits.settled(["a", "b"])] == ["a"]  # a waited, b never did
    waits.set_aside("b", [b1], None)
    waits.forget()
    assert len(waits) == 0 and waits.devices() == frozenset()


def test_watermarks_keep_the_offsets_of_waiting_entries_pending() -> None:
    waiting, later = _item("a", 10), _item("b", 11)
    marks = Watermarks([later, waiting])
    assert marks.after([later]) == {("j", 0): 10}  # not past the waiting entry
    marks.done([later])
    assert marks.pending_item(waiting) and not marks.pending_item(later)
