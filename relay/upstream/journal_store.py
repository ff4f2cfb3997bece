"""The journal tables in the relay's store database: intake records, the outcome store.

Schema ``fieldsync_relay_journal`` (created by :data:`MIGRATIONS` under an advisory
lock):

- ``intake``: one record per ``(device_id, seq)`` the intake answered, written only
  after Kafka acknowledged the entry (``insert … on conflict do nothing``: of two
  concurrent uploads of a seq both get the record that won);
- ``outcomes``: the latest outcome per ``(device_id, seq)`` (:func:`relay.upstream.intake.latest_per_entry`:
  a ``resolved`` outcome is final), each change under a new position ``pos`` from a
  store-wide sequence, allocated under a transaction-level advisory lock so positions
  become visible in order; a device reads its outcomes after a position.  The sequence
  starts at the store's creation time in microseconds: a store rebuilt from Kafka hands
  out positions above every position of the store it replaced (unless that one gave out
  more than one position per microsecond of its life), so a device's outcome cursor
  from the old store misses none of the new one's outcomes;
- ``feed_offsets``: the outcome feed's Kafka offsets, written in the same transaction as
  the outcomes they carried.

Wake-ups: storing outcomes notifies channel :data:`NOTIFY_CHANNEL` with the device ids
(or ``*`` when too many); a LISTEN connection per process wakes the long-polls waiting
for those devices (:meth:`JournalStore.wait_async`; a waiter is registered before its
read, so no wake-up is lost, and reads again at least every :data:`_REWAIT_S` s).

Thread-safe: each call takes a connection from a small pool; the listener runs in a
daemon thread and resolves waiters on their event loops.  Errors are
:class:`~relay.errors.JournalStoreError` naming what failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import psycopg

from core.journal_outcomes import Outcome
from core.values import dump_json
from relay.downstream.pg_bucket_store import ConnectionPool
from relay.errors import JournalStoreError
from relay.pg_listen import PgListener, wake_future
from relay.pg_migrations import run_migrations
from relay.upstream.intake import IntakeDecision, latest_per_entry

__all__ = ["MIGRATIONS", "NOTIFY_CHANNEL", "SCHEMA", "JournalStore", "OutcomePage"]

log = logging.getLogger("relay.upstream.journal_api")

SCHEMA: Final = "fieldsync_relay_journal"
NOTIFY_CHANNEL: Final = "fieldsync_relay_outcomes"
_LOCK_CLASS: Final = 0x66730003  # advisory lock namespace ("fs" + 3)
_MIGRATE_LOCK: Final = (_LOCK_CLASS, 0)
_POS_LOCK: Final = (_LOCK_CLASS, 1)
_NOTIFY_MAX: Final = 7000
_REWAIT_S: Final = 5.0

MIGRATIONS: Final[tuple[str, ...]] = (
    f"""
    create table {SCHEMA}.intake (
        device_id text not null,
        seq bigint not null,
        status text not null check (status in ('accepted', 'rejected')),
        reason text,
        message text not null default '',
        received_at timestamptz not null default now(),
        primary key (device_id, seq)
    );
    create index intake_received_idx on {SCHEMA}.intake (received_at);
    create sequence {SCHEMA}.outcome_pos;
    create table {SCHEMA}.outcomes (
        device_id text not null,
        seq bigint not null,
        pos bigint not null,
        outcome text not null,
        payload text not null,
        updated_at timestamptz not null default now(),
        primary key (device_id, seq)
    );
    create unique index outcomes_pos_idx on {SCHEMA}.outcomes (device_id, pos);
    create index outcomes_open_idx on {SCHEMA}.outcomes (device_id, pos)
        where outcome = 'conflict';
    create table {SCHEMA}.feed_offsets (
        topic text not null,
        partition int not null,
        next_offset bigint not null,
        primary key (topic, partition)
    );
    """,
    # positions start at the store's creation time in microseconds, so the positions of a
    # rebuilt store are above every position a device holds from the store it replaces
    f"""
    select setval('{SCHEMA}.outcome_pos', greatest(
        (select last_value from {SCHEMA}.outcome_pos),
        (extract(epoch from clock_timestamp()) * 1000000)::bigint
    ));
    """,
)


def _decision(status: str, reason: str | None, message: str | None) -> IntakeDecision:
    return IntakeDecision("rejected" if status == "rejected" else "accepted", reason, message or "")


def _notify_payload(devices: Sequence[str]) -> str:
    text = "\n".join(sorted(set(devices)))
    return text if len(text.encode("utf-8")) <= _NOTIFY_MAX and "*" not in devices else "*"


def _parse_notify(payload: str) -> frozenset[str] | None:
    return None if payload == "*" else frozenset(payload.split("\n"))


@dataclasses.dataclass(frozen=True)
class OutcomePage:
    """Outcome payloads (JSON texts) of one device after a position."""

    payloads: list[str]
    cursor: int
    has_more: bool


class _Listener:
    """Waiting requests by device, woken by the outcome channel's LISTEN connection
    (:class:`relay.pg_listen.PgListener`)."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self._pg = PgListener(
            NOTIFY_CHANNEL,
            connect,
            lambda payload: self.deliver(_parse_notify(payload)),
            lambda conn: self.deliver(None),  # anything may have been missed meanwhile
            thread_name="journal-outcome-listener",
            what="outcome listener",
            log=log,
        )

    def start(self) -> None:
        self._pg.start()

    def stop(self) -> None:
        self._pg.stop()

    def register(self, device_id: str) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._waiters.setdefault(device_id, set()).add((loop, future))
        return future

    def unregister(self, device_id: str, future: asyncio.Future[None]) -> None:
        with self._lock:
            group = self._waiters.get(device_id)
            if group is None:
                return
            for item in [i for i in group if i[1] is future]:
                group.discard(item)
            if not group:
                del self._waiters[device_id]

    def deliver(self, devices: frozenset[str] | None) -> None:
        with self._lock:
            if devices is None:
                woken = [w for group in self._waiters.values() for w in group]
            else:
                woken = [w for d in devices for w in self._waiters.get(d, ())]
        for loop, future in woken:
            wake_future(loop, future)


class JournalStore:
    """The journal tables in the relay's store database (schema ``fieldsync_relay_journal``):
    intake records, the outcome store, the feed's Kafka offsets; and the wake-ups.

    Thread-safe: each call takes a connection from a small pool.  Errors are
    :class:`JournalStoreError` naming what failed."""

    def __init__(
        self,
        dsn: str,
        *,
        password: str | None = None,
        pool_size: int = 4,
        connect_timeout: float = 10.0,
    ) -> None:
        self.dsn = dsn
        self._kw: dict[str, Any] = {"connect_timeout": max(1, int(connect_timeout))}
        if password:
            self._kw["password"] = password
        self._pool = ConnectionPool(self.connect, pool_size)
        self.listener = _Listener(lambda: self.connect(autocommit=True))

    def connect(self, autocommit: bool = True) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.dsn, autocommit=autocommit, **self._kw)
        except psycopg.Error as exc:
            raise JournalStoreError(f"cannot connect to the relay's store database: {exc}") from exc

    @contextlib.contextmanager
    def _conn(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; psycopg errors become :class:`JournalStoreError`."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise JournalStoreError(f"{what} failed in the relay's store database: {exc}") from exc

    def close(self) -> None:
        self._pool.close()
        self.listener.stop()

    def migrate(self) -> None:
        """Create the schema and apply pending migrations (safe concurrently)."""
        with self._conn("migrating the journal tables") as conn:
            run_migrations(conn, SCHEMA, MIGRATIONS, _MIGRATE_LOCK, JournalStoreError)

    # ---- intake records

    def intake_lookup(self, device_id: str, seqs: Sequence[int]) -> dict[int, IntakeDecision]:
        """The recorded decisions of ``seqs`` (those that have one)."""
        if not seqs:
            return {}
        with self._conn("reading intake records") as conn:
            rows = conn.execute(
                f"select i.seq, i.status, i.reason, i.message from unnest(%s::bigint[]) as u(seq) "
                f"join {SCHEMA}.intake as i on i.device_id = %s and i.seq = u.seq",
                (sorted(set(seqs)), device_id),
            ).fetchall()
            conn.rollback()
        return {int(s): _decision(st, r, m) for s, st, r, m in rows}

    def record_intake(
        self, device_id: str, decisions: Sequence[tuple[int, IntakeDecision]]
    ) -> dict[int, tuple[IntakeDecision, bool]]:
        """Record decisions (a seq recorded before keeps its record); returns every given
        seq's recorded decision and whether this call recorded it."""
        if not decisions:
            return {}
        seqs = [s for s, _ in decisions]
        with self._conn("writing intake records") as conn, conn.transaction():
            inserted = {
                int(r[0])
                for r in conn.execute(
                    f"insert into {SCHEMA}.intake (device_id, seq, status, reason, message) "
                    "select %s, u.seq, u.status, u.reason, u.message "
                    "from unnest(%s::bigint[], %s::text[], %s::text[], %s::text[]) "
                    "as u(seq, status, reason, message) "
                    "on conflict (device_id, seq) do nothing returning seq",
                    (
                        device_id,
                        seqs,
                        [d.status for _, d in decisions],
                        [d.reason for _, d in decisions],
                        [d.message for _, d in decisions],
                    ),
                ).fetchall()
            }
            rows = conn.execute(
                f"select i.seq, i.status, i.reason, i.message from unnest(%s::bigint[]) as u(seq) "
                f"join {SCHEMA}.intake as i on i.device_id = %s and i.seq = u.seq",
                (seqs, device_id),
            ).fetchall()
        return {int(s): (_decision(st, r, m), int(s) in inserted) for s, st, r, m in rows}

    # ---- retention

    def prune(self, older_than_days: float, batch: int = 10_000) -> tuple[int, int]:
        """Delete intake records and outcomes (except open conflicts) last changed more than
        ``older_than_days`` ago, ``batch`` rows per transaction; returns (intake, outcomes)
        deleted.  Safe: a device re-sending a pruned seq is validated and produced again, and
        the applier's idempotency record (never pruned) skips it."""
        counts = [0, 0]
        statements = (
            f"delete from {SCHEMA}.intake where ctid = any(array(select ctid from "
            f"{SCHEMA}.intake where received_at < now() - make_interval(secs => %s) limit %s))",
            f"delete from {SCHEMA}.outcomes where ctid = any(array(select ctid from "
            f"{SCHEMA}.outcomes where updated_at < now() - make_interval(secs => %s) "
            "and outcome <> 'conflict' limit %s))",
        )
        with self._conn("pruning the journal tables") as conn:
            for i, statement in enumerate(statements):
                while True:
                    with conn.transaction():
                        deleted = conn.execute(statement, (older_than_days * 86400, batch)).rowcount
                    counts[i] += deleted
                    if deleted < batch:
                        break
        return counts[0], counts[1]

    # ---- outcomes

    def read_outcomes(self, device_id: str, after: int, limit: int) -> OutcomePage:
        """The device's outcomes with a position above ``after``, in position order."""
        with self._conn("reading outcomes") as conn:
            rows = conn.execute(
                f"select pos, payload from {SCHEMA}.outcomes where device_id = %s and pos > %s "
                "order by pos limit %s",
                (device_id, after, limit + 1),
            ).fetchall()
            conn.rollback()
        page = rows[:limit]
        return OutcomePage(
            [str(p) for _, p in page], int(page[-1][0]) if page else after, len(rows) > limit
        )

    def open_conflicts(self, device_id: str, limit: int) -> tuple[list[str], bool]:
        """Payloads of the device's outcomes that are (still) ``conflict``, oldest first."""
        with self._conn("reading conflicts") as conn:
            rows = conn.execute(
                f"select payload from {SCHEMA}.outcomes where device_id = %s "
                "and outcome = 'conflict' order by pos limit %s",
                (device_id, limit + 1),
            ).fetchall()
            conn.rollback()
        return [str(p) for (p,) in rows[:limit]], len(rows) > limit

    def put_outcomes(
        self,
        outcomes: Sequence[Outcome],
        *,
        conn: psycopg.Connection[Any] | None = None,
        offsets: Mapping[tuple[str, int], int] | None = None,
    ) -> int:
        """Store outcomes (:func:`latest_per_entry` rules; an identical payload changes
        nothing) and, in the same transaction, feed offsets; wakes the devices' waiters.
        Returns how many outcomes changed.  ``conn``: the feed leader's connection."""
        if conn is None:
            with self._conn("storing outcomes") as own:
                return self._put(own, outcomes, offsets or {})
        try:
            return self._put(conn, outcomes, offsets or {})
        except psycopg.Error as exc:
            raise JournalStoreError(f"storing outcomes failed: {exc}") from exc

    def _put(
        self,
        conn: psycopg.Connection[Any],
        outcomes: Sequence[Outcome],
        offsets: Mapping[tuple[str, int], int],
    ) -> int:
        latest = latest_per_entry(outcomes)
        changed: list[str] = []
        with conn.transaction(), conn.cursor() as cur:
            if latest:
                # positions must become visible in order: allocate them under a lock that is
                # released only once this transaction's commit is visible
                cur.execute("select pg_advisory_xact_lock(%s, %s)", _POS_LOCK)
                cur.execute(
                    f"insert into {SCHEMA}.outcomes (device_id, seq, pos, outcome, payload) "
                    f"select u.d, u.s, nextval('{SCHEMA}.outcome_pos'), u.o, u.p "
                    "from unnest(%s::text[], %s::bigint[], %s::text[], %s::text[]) "
                    "with ordinality as u(d, s, o, p, n) order by u.n "
                    "on conflict (device_id, seq) do update set pos = excluded.pos, "
                    "outcome = excluded.outcome, payload = excluded.payload, updated_at = now() "
                    "where outcomes.payload <> excluded.payload "
                    "and (outcomes.outcome <> 'resolved' or excluded.outcome = 'resolved') "
                    "returning device_id",
                    (
                        [o.device_id for o in latest],
                        [o.seq for o in latest],
                        [o.kind.value for o in latest],
                        [dump_json(o.to_json()).decode("utf-8") for o in latest],
                    ),
                )
                changed = [str(r[0]) for r in cur.fetchall()]
            if offsets:
                cur.executemany(
                    f"insert into {SCHEMA}.feed_offsets (topic, partition, next_offset) "
                    "values (%s, %s, %s) on conflict (topic, partition) do update "
                    "set next_offset = greatest(feed_offsets.next_offset, excluded.next_offset)",
                    [(t, p, o) for (t, p), o in offsets.items()],
                )
            if changed:
                cur.execute("select pg_notify(%s, %s)", (NOTIFY_CHANNEL, _notify_payload(changed)))
        return len(changed)

    def feed_offsets(self, conn: psycopg.Connection[Any], topic: str) -> dict[int, int]:
        rows = conn.execute(
            f"select partition, next_offset from {SCHEMA}.feed_offsets where topic = %s",
            (topic,),
        ).fetchall()
        return {int(p): int(o) for p, o in rows}

    def lead(self, name: str) -> psycopg.Connection[Any] | None:
        """A connection holding the session advisory lock of feed ``name``, or None when
        another process holds it.  Writes made on it stop with the lock."""
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big", signed=True)
        conn = self.connect(autocommit=True)
        try:
            row = conn.execute(
                "select pg_try_advisory_lock(%s, %s)", (_LOCK_CLASS + 1, key)
            ).fetchone()
        except psycopg.Error as exc:
            conn.close()
            raise JournalStoreError(f"taking the outcome feed's lock failed: {exc}") from exc
        if row and row[0]:
            return conn
        conn.close()
        return None

    async def wait_async(self, device_id: str, read: Callable[[], Any], timeout: float) -> Any:
        """``read()`` (in a thread) until it returns something truthy or ``timeout`` passes;
        between reads, wait for an outcome notification of the device (at most
        :data:`_REWAIT_S`, in case one was lost)."""
        deadline = time.monotonic() + timeout
        self.listener.start()
        while True:
            future = self.listener.register(device_id)
            try:
                result = await asyncio.to_thread(read)
                remaining = deadline - time.monotonic()
                if result or remaining <= 0:
                    return result
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(future), min(remaining, _REWAIT_S))
            finally:
                self.listener.unregister(device_id, future)
