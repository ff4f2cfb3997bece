"""Bucket engine shares: several engines, each leading a share of the change topics'
partitions, converge to what the rules place of the captured database, and a killed
share's process neither loses nor doubles an op.

The change topic is created with 4 partitions before the cdc daemon starts (it keeps an
existing topic), so with 2 shares each engine applies 2 partitions; truncates (no key) land
in partition 0, key changes move rows between partitions.  The truth is always recomputed
from the captured database (``expected``) and compared with what a device replaying the
store's op logs holds (``replay``, which also checks every checkpoint's count and checksum:
a doubled or lost op breaks them).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.kafka_bulk import partition_of
from core.avro_envelope import MAGIC
from core.errors import ConfigError
from relay.downstream import pg_store_writes
from relay.downstream.bucket_engine import BucketEngine, purge_bound
from relay.downstream.bucket_store import ChangeKind, PartitionProgress, RowChange
from relay.downstream.engine_status import read_engine_progress
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.pg_store_schema import SCHEMA, WRITE_LOCK
from relay.downstream.rules import Rules
from relay.downstream.rules_parser import rules_from_mapping
from relay.errors import EngineError
from relay.settings import load_relay_settings
from tests.cdc.cdc_support import make_settings, running_daemon, wait_for
from tests.fix_kafka import read_topic as bs_read_topic
from tests.relay.downstream import test_bucket_store as bs
from tests.relay.downstream.test_bucket_engine import (
    DDL,
    RULES_TOML,
    all_buckets,
    expected,
    make_rules,
    replay,
)

REPO = Path(__file__).resolve().parents[3]
PARTITIONS = 4
DELETE = ChangeKind.DELETE
EMPTY_RULES = rules_from_mapping({"bucket": []}, {})


def create_change_topic(bootstrap: str, prefix: str) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(f"{prefix}.public.work_orders", PARTITIONS, 1)])
    finally:
        admin.close()


def workload(conn: psycopg.Connection[Any], rng: random.Random, start: int, n: int) -> None:
    """Inserts of rows ``start``.. plus updates, reassignments, filter moves, key changes
    and deletes among them, in small transactions."""
    ids = list(range(start, start + n))
    for i in ids:
        conn.execute(
            "insert into work_orders values (%s, %s, %s, %s, %s)",
            (i, f"t{i % 5}", rng.choice(["open", "done"]), f"n{i}", i),
        )
    for j in range(n):
        i = rng.choice(ids)
        what = rng.randrange(5)
        if what == 0:
            conn.execute("update work_orders set notes = notes || 'x' where id = %s", (i,))
        elif what == 1:
            conn.execute(
                "update work_orders set technician = %s where id = %s", (f"t{rng.randrange(5)}", i)
            )
        elif what == 2:
            status = rng.choice(["open", "done", "cancelled"])
            conn.execute("update work_orders set status = %s where id = %s", (status, i))
        elif what == 3:  # a key change, to a key never used
            conn.execute(
                "update work_orders set id = %s where id = %s", (10_000_000 + start * 1000 + j, i)
            )
        else:
            conn.execute("delete from work_orders where id = %s", (i,))


def engine(store: PgBucketStore, rules: Rules, bootstrap: str, prefix: str, **kw: Any) -> Any:
    return BucketEngine(
        store,
        rules,
        kafka={"bootstrap_servers": bootstrap},
        prefix=prefix,
        batch_max_events=7,
        standby_retry_s=0.2,
        topic_refresh_s=0.5,
        **kw,
    )


@contextlib.contextmanager
def running(*engines: BucketEngine) -> Iterator[list[threading.Thread]]:
    threads = [threading.Thread(target=e.run, daemon=True) for e in engines]
    for t in threads:
        t.start()
    try:
        yield threads
    finally:
        for e in engines:
            e.request_stop()
        for t in threads:
            t.join(30)
        for e in engines:
            e.close()
            e.store.close()


def converged(reader: PgBucketStore, conn: psycopg.Connection[Any], rules: Rules) -> bool:
    return replay(reader, all_buckets(reader)) == expected(conn, rules)


def test_two_shares_converge_to_the_captured_database(
    tmp_path: Path, pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Two engines (shares 0 and 1 of 2, taken with ``share=None``: the first free one)
    and a third that stands by; every kind of change, a truncate between two rounds."""
    create_change_topic(kafka_bootstrap, topic_prefix)
    rng = random.Random(11)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(DDL)
        rules = make_rules(tmp_path, pg_dsn)
        engines = [
            engine(PgBucketStore(store_dsn), rules, kafka_bootstrap, topic_prefix, shares=2)
            for _ in range(3)
        ]
        reader = PgBucketStore(store_dsn)
        settings_ = make_settings(pg_dsn, kafka_bootstrap, topic_prefix)
        try:
            with running_daemon(settings_), running(*engines[:2]):
                wait_for(lambda: all(e.leading.is_set() for e in engines[:2]), what="two leaders")
                assert {e.led_share for e in engines[:2]} == {0, 1}
                with running(engines[2]):
                    workload(conn, rng, 1, 150)
                    conn.execute("truncate work_orders")
                    workload(conn, rng, 1000, 150)
                    wait_for(
                        lambda: converged(reader, conn, rules),
                        timeout=90,
                        interval=0.2,
                        what="two shares converged",
                    )
                    assert not engines[2].leading.is_set(), "both shares are led: it stands by"
                with psycopg.connect(store_dsn) as store_conn:
                    parts = store_conn.execute(
                        f"select part from {SCHEMA}.consumer_progress order by part"
                    ).fetchall()
                assert [p for (p,) in parts] == list(range(PARTITIONS))
        finally:
            reader.close()


def _proc(
    tmp_path: Path, store_dsn: str, bootstrap: str, prefix: str, pg_dsn: str, share: str
) -> subprocess.Popen[bytes]:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES_TOML)
    args = [store_dsn, bootstrap, prefix, str(rules), pg_dsn, "2", share]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.relay.downstream.engine_proc", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _waits_on_write_lock(store_dsn: str) -> bool:
    with psycopg.connect(store_dsn) as conn:
        row = conn.execute(
            "select count(*) from pg_locks where locktype = 'advisory' and not granted "
            "and classid = %s and objid = %s",
            (WRITE_LOCK[0] & 0xFFFFFFFF, WRITE_LOCK[1] & 0xFFFFFFFF),
        ).fetchone()
    return bool(row and row[0])


def test_a_killed_share_loses_and_doubles_nothing(
    tmp_path: Path, pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Share 1 runs in a process of its own, killed (SIGKILL) once inside an open store
    transaction (held at WRITE_LOCK, which the test takes) and once while running freely;
    a restarted process and a standby of ``share=any`` take the share over."""
    create_change_topic(kafka_bootstrap, topic_prefix)
    rng = random.Random(7)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(DDL)
        rules = make_rules(tmp_path, pg_dsn)
        reader = PgBucketStore(store_dsn)
        reader.migrate()
        gate = psycopg.connect(store_dsn, autocommit=True)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            with running_daemon(make_settings(pg_dsn, kafka_bootstrap, topic_prefix)):
                workload(conn, rng, 1, 100)
                procs.append(_proc(tmp_path, store_dsn, kafka_bootstrap, topic_prefix, pg_dsn, "1"))
                gate.execute("select pg_advisory_lock(%s, %s)", WRITE_LOCK)
                workload(conn, rng, 1000, 100)
                wait_for(
                    lambda: _waits_on_write_lock(store_dsn), timeout=90, what="share 1 at the gate"
                )
                os.kill(procs[0].pid, signal.SIGKILL)
                procs[0].wait()
                gate.execute("select pg_advisory_unlock(%s, %s)", WRITE_LOCK)

                share0 = engine(
                    PgBucketStore(store_dsn),
                    rules,
                    kafka_bootstrap,
                    topic_prefix,
                    shares=2,
                    share=0,
                )
                with running(share0):
                    procs.append(
                        _proc(tmp_path, store_dsn, kafka_bootstrap, topic_prefix, pg_dsn, "1")
                    )
                    wait_for(
                        lambda: converged(reader, conn, rules),
                        timeout=90,
                        interval=0.2,
                        what="converged after the kill at the gate",
                    )
                    procs.append(
                        _proc(tmp_path, store_dsn, kafka_bootstrap, topic_prefix, pg_dsn, "any")
                    )
                    workload(conn, rng, 2000, 100)
                    os.kill(procs[1].pid, signal.SIGKILL)
                    procs[1].wait()
                    workload(conn, rng, 3000, 50)
                    wait_for(
                        lambda: converged(reader, conn, rules),
                        timeout=120,
                        interval=0.2,
                        what="converged after the standby took share 1 over",
                    )
                    assert procs[2].poll() is None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    p.communicate(timeout=30)
            gate.close()
            reader.close()


@given(
    caught_up=st.tuples(st.integers(1, 100), st.integers(0, 5)),
    applied=st.lists(st.tuples(st.integers(0, 100), st.integers(0, 5)), min_size=1, max_size=6),
)
@settings(max_examples=200, deadline=None)
def test_tombstones_are_purged_only_below_every_partition(
    caught_up: tuple[int, int], applied: list[tuple[int, int]]
) -> None:
    """The bound is never above the share's own caught-up position nor above any
    partition's applied position, and is one of them; a partition that applied nothing
    (or is missing) forbids any purge."""
    progress = {("t", p): PartitionProgress(1, pos) for p, pos in enumerate(applied)}
    bound = purge_bound(caught_up, progress, {"t": len(applied)})
    if any(pos <= (0, 0) for pos in applied):
        assert bound is None
        return
    assert bound is not None
    assert bound <= caught_up and all(bound <= pos for pos in applied)
    assert bound in [caught_up, *applied]
    assert purge_bound(caught_up, progress, {"t": len(applied) + 1}) is None
    everything = {("t", p) for p in range(len(applied) + 1)}
    assert purge_bound(caught_up, {}, {"t": len(applied) + 1}, everything) == caught_up


def test_a_batch_planned_before_the_lock_is_planned_again_when_a_row_moved(
    store_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer plans a key change (1 → 2) before taking WRITE_LOCK; just before it takes
    the lock another writer (as another share would) deletes key 1 at a later position and
    commits.  Under the lock the writer sees key 1's state moved and plans again: it does
    not REMOVE key 1 a second time, and counts and checksums stay right."""
    store, other = PgBucketStore(store_dsn), PgBucketStore(store_dsn)
    store.migrate()
    real_lock = pg_store_writes._lock
    interleaved: list[Any] = []

    def lock_after_the_other_writer(conn: Any) -> float:
        if not interleaved:  # once, and not for the other writer's own lock
            interleaved.append(None)
            interleaved[0] = other.apply(bs.RULES, [RowChange(bs.T, DELETE, (9, 0), (1,))])
        return real_lock(conn)

    try:
        store.apply(bs.RULES, [bs.up(1, (1, 0), "t1", insert=True)])
        monkeypatch.setattr(pg_store_writes, "_lock", lock_after_the_other_writer)
        rekey = RowChange(bs.T, ChangeKind.UPSERT, (5, 0), (2,), bs.row(2, "t1"), old_key=(1,))
        result = store.apply(bs.RULES, [rekey])
        assert interleaved[0].ops == 2, "the other writer removed key 1 from its 2 buckets"
        assert result.ops == 2, "only the PUTs of key 2"
        buckets = all_buckets(store)
        page = store.read_ops(dict.fromkeys(buckets, 0), limit=100)
        held: dict[str, dict[str, str]] = {}
        for op in page.ops:
            rows = held.setdefault(op.bucket, {})
            if op.data_json is not None:
                rows[op.row_key] = op.data_json
            else:
                rows.pop(op.row_key, None)
        for b, cp in page.checkpoints.items():
            assert (cp.count, cp.checksum) == (len(held[b]), bs.checksum_of(held[b])), b
        assert {b: r for b, r in held.items() if r} == bs.expected({2: bs.row(2, "t1")})
    finally:
        store.close()
        other.close()


def test_the_recheck_under_the_lock_sees_every_moved_state(store_dsn: str) -> None:
    """The check made under WRITE_LOCK (``_moved``, compared in PostgreSQL) says nothing
    moved while no writer touched the planned rows, and that something moved when a
    planned row's state was written, deleted (as a truncate or a purge deletes it) or
    made where the plan found none."""
    store, other = PgBucketStore(store_dsn), PgBucketStore(store_dsn)
    store.migrate()
    batch = [bs.up(1, (20, 0), "t2"), bs.up(3, (20, 1), "t2")]  # key 1 remembered, key 3 not

    def planned() -> Any:
        with psycopg.connect(store_dsn, autocommit=True) as conn:
            return pg_store_writes._plan_segment(conn, bs.RULES, batch, {})

    def moved(plan: Any) -> bool:
        with psycopg.connect(store_dsn, autocommit=True) as conn:
            return pg_store_writes._moved(conn, plan)

    try:
        store.apply(bs.RULES, [bs.up(1, (1, 0), "t1", insert=True)])
        plan = planned()
        assert set(plan.states) == {(bs.T, "[1]")}
        assert not moved(plan), "nothing written since the plan"
        other.apply(bs.RULES, [bs.up(1, (2, 0), "t3")])
        assert moved(plan), "key 1's state was written"
        plan = planned()
        other.apply(bs.RULES, [bs.up(3, (3, 0), "t1", insert=True)])
        assert moved(plan), "key 3 has a state now, the plan found none"
        plan = planned()
        assert not moved(plan)
        with psycopg.connect(store_dsn, autocommit=True) as conn:
            conn.execute(f"delete from {SCHEMA}.row_state where row_key = '[1]'")
        assert moved(plan), "key 1's state is gone"
        batch = [bs.up(5, (30, 0), "t2")]  # one row, never seen: a single NULL position
        plan = planned()
        assert plan.refs == {(bs.T, "[5]")} and not plan.states
        assert not moved(plan)
        other.apply(bs.RULES, [bs.up(5, (4, 0), "t1", insert=True)])
        assert moved(plan), "key 5 has a state now"
    finally:
        store.close()
        other.close()


STREAM = st.lists(
    st.tuples(
        st.sampled_from(["insert", "update", "delete", "rekey"]),
        st.integers(0, 1000),
        st.sampled_from(["t1", "t2", None]),
        st.sampled_from(["open", "done", "cancelled"]),
        st.booleans(),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(STREAM, st.randoms(use_true_random=False), st.lists(st.integers(1, 6), min_size=1))
def test_partitions_applied_out_of_step_converge(
    actions: list[tuple[str, int, str | None, str, bool]], rng: random.Random, cuts: list[int]
) -> None:
    """Changes of a table whose keys are spread over 3 partitions (a change goes to its new
    key's partition, as the cdc daemon sends it); each partition's changes in order but the
    partitions interleaved at random and applied in random batches, as shares that run out
    of step apply them (keys reused after deletes and key changes, a key change applied
    before its old key's insert): every bucket ends up holding exactly what the rules place
    of the final table, with matching counts and checksums."""
    source: dict[int, dict[str, Any]] = {}
    partitions: list[list[RowChange]] = [[], [], []]
    used: set[int] = set()
    for n, (action, pick, tech, status, reuse) in enumerate(actions):
        pos = (100 + n, 0)
        gone = sorted(used - source.keys())
        fresh = gone[pick % len(gone)] if reuse and gone else 1000 + n
        existing = sorted(source)[pick % len(source)] if source else None
        if action == "insert" or existing is None:
            used.add(fresh)
            source[fresh] = bs.row(fresh, tech, status, f"n{n}")
            row = dict(source[fresh])
            change = RowChange(bs.T, ChangeKind.UPSERT, pos, (fresh,), row, insert=True)
        elif action == "update":
            source[existing] = bs.row(existing, tech, status, f"n{n}")
            change = RowChange(bs.T, ChangeKind.UPSERT, pos, (existing,), dict(source[existing]))
        elif action == "delete":
            del source[existing]
            change = RowChange(bs.T, ChangeKind.DELETE, pos, (existing,))
        else:
            used.add(fresh)
            source[fresh] = {**source.pop(existing), "id": fresh}
            change = RowChange(
                bs.T, ChangeKind.UPSERT, pos, (fresh,), dict(source[fresh]), old_key=(existing,)
            )
        assert change.key is not None
        partitions[change.key[0] % 3].append(change)
    merged: list[RowChange] = []
    while any(partitions):
        p = rng.choice([q for q in range(3) if partitions[q]])
        merged.append(partitions[p].pop(0))
    model = bs.Model()
    start = k = 0
    while start < len(merged):
        size = cuts[k % len(cuts)]
        model.apply(merged[start : start + size])
        start, k = start + size, k + 1
    assert {b: rows for b, rows in model.rows.items() if rows} == bs.expected(source)
    for b, rows in model.rows.items():
        assert model.count.get(b, 0) == len(rows)
        assert model.checksum.get(b, 0) == bs.checksum_of(rows)


def test_a_key_change_applied_before_the_old_keys_insert() -> None:
    """The key change (partition of key 2) comes before the insert of key 1 (another
    partition): the old key's tombstone keeps the late insert out; and a key change whose
    new key already saw a later change still retires the old key."""
    insert = RowChange(bs.T, ChangeKind.UPSERT, (1, 0), (1,), bs.row(1, "t1"), insert=True)
    moved = {**bs.row(1, "t1"), "id": 2}
    rekey = RowChange(bs.T, ChangeKind.UPSERT, (2, 0), (2,), moved, old_key=(1,))
    later = RowChange(bs.T, ChangeKind.UPSERT, (3, 0), (2,), bs.row(2, "t2"))
    model = bs.Model()
    model.apply([rekey])
    model.apply([insert])
    assert {b: r for b, r in model.rows.items() if r} == bs.expected({2: moved})
    model = bs.Model()
    model.apply([insert])
    model.apply([later])
    model.apply([rekey])
    assert {b: r for b, r in model.rows.items() if r} == bs.expected({2: bs.row(2, "t2")})


def test_status_names_the_shares_no_process_leads(store_dsn: str) -> None:
    stores = [PgBucketStore(store_dsn) for _ in range(3)]
    try:
        stores[0].migrate()
        assert stores[0].acquire_leadership(1)
        assert not stores[1].acquire_leadership(1), "one leader per share"
        progress = read_engine_progress(store_dsn, group="fieldsync-relay", shares=3)
        assert (progress.leading, progress.unled) == (False, (0, 2))
        assert stores[1].acquire_leadership(0) and stores[2].acquire_leadership(2)
        progress = read_engine_progress(store_dsn, group="fieldsync-relay", shares=3)
        assert (progress.leading, progress.unled) == (True, ())
        stores[0].release_leadership()
        progress = read_engine_progress(store_dsn, group="fieldsync-relay", shares=3)
        assert progress.unled == (1,)
    finally:
        for store in stores:
            store.close()


def test_share_settings_are_checked(tmp_path: Path) -> None:
    env = {"FIELDSYNC_RELAY_ENGINE_SHARES": "4", "FIELDSYNC_RELAY_ENGINE_SHARE": "3"}
    s = load_relay_settings(None, env)
    assert (s.relay.engine_shares, s.engine_share()) == (4, 3)
    assert load_relay_settings(None, {}).engine_share() is None
    with pytest.raises(ConfigError, match="engine_share"):
        load_relay_settings(None, {**env, "FIELDSYNC_RELAY_ENGINE_SHARE": "4"})
    with pytest.raises(ConfigError, match="engine_share"):
        load_relay_settings(None, {**env, "FIELDSYNC_RELAY_ENGINE_SHARE": "first"})
    with pytest.raises(ConfigError, match="engine_shares"):
        load_relay_settings(None, {"FIELDSYNC_RELAY_ENGINE_SHARES": "0"})
    with pytest.raises(EngineError, match=r"share 2 is not one of 0\.\.1"):
        BucketEngine(
            PgBucketStore("dbname=unused"), EMPTY_RULES, kafka={}, prefix="p", shares=2, share=2
        )


def _ids_in(partition: int, count: int) -> list[int]:
    """Ids of work_orders whose events the cdc daemon sends to ``partition`` (of
    :data:`PARTITIONS`): the key's Avro datum is the id, union branch 1 of ``["null",
    "int"]`` and a zigzag varint."""
    found = []
    for i in range(1, 10_000):
        n = (i << 1) ^ (i >> 63)
        datum = bytearray(b"\x02")
        while n > 0x7F:
            datum.append((n & 0x7F) | 0x80)
            n >>= 7
        datum.append(n)
        if partition_of(MAGIC + bytes(8) + bytes(datum), PARTITIONS) == partition:
            found.append(i)
            if len(found) == count:
                return found
    raise AssertionError(f"no ids in partition {partition}")


def test_tombstones_are_purged_while_some_partition_has_never_held_an_event(
    tmp_path: Path, pg_dsn: str, store_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A table of a few rows leaves partitions of its change topic empty; a partition
    holding no event that is not applied (empty, or applied to its end) cannot bring an
    event older than the share's caught-up position any more, so it must not keep every
    tombstone of the store from being purged for good."""
    create_change_topic(kafka_bootstrap, topic_prefix)
    (a, c), (b,) = _ids_in(0, 2), _ids_in(1, 1)  # partitions 2 and 3 stay empty
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(DDL)
        rules = make_rules(tmp_path, pg_dsn)
        with running_daemon(make_settings(pg_dsn, kafka_bootstrap, topic_prefix)):
            for i in (a, b):
                conn.execute("insert into work_orders values (%s, 't1', 'open', 'n', 1)", (i,))
            for i in (a, b):
                conn.execute("delete from work_orders where id = %s", (i,))
            conn.execute("insert into work_orders values (%s, 't1', 'open', 'n', 1)", (c,))
            topic = f"{topic_prefix}.public.work_orders"
            records = bs_read_topic(kafka_bootstrap, topic, timeout=60, expect=5)
    assert {r.partition for r in records} == {0, 1}
    first, second = (
        engine(PgBucketStore(store_dsn), rules, kafka_bootstrap, topic_prefix, shares=2, share=s)
        for s in (0, 1)
    )
    counts = []
    tombstones = f"select count(*) from {SCHEMA}.row_state where entries = '[]'"
    try:
        with psycopg.connect(store_dsn, autocommit=True) as store_conn:
            first.run_until_idle(timeout=60)
            counts.append(store_conn.execute(tombstones).fetchone())
            first.maintain()  # b's events still wait in partition 1, below c's position
            counts.append(store_conn.execute(tombstones).fetchone())
            second.run_until_idle(timeout=60)
            counts.append(store_conn.execute(tombstones).fetchone())
            first.maintain()  # partitions 1 (applied to its end), 2 and 3 (empty) settled
            counts.append(store_conn.execute(tombstones).fetchone())
        assert counts == [(1,), (1,), (2,), (0,)]
    finally:
        for e in (first, second):
            e.close()
            e.store.close()
