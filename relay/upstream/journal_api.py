"""Device edits over the device API: journal upload, outcomes, kept conflicts.

Endpoints (mounted by :func:`relay.downstream.api.create_app` when given a :class:`JournalApi`;
same bearer authentication and per-device rate limit as the rest of ``/v1``; the device
is always the token's ``sub``, no parameter can name another one)::

    POST /v1/journal                         upload entries; per-entry accepted / rejected
    GET  /v1/outcomes?after=&limit=&wait=    the device's entry outcomes after a position
    GET  /v1/conflicts                       the device's kept (ask) conflicts, open ones
    POST /v1/conflicts/{id}/resolve          settle one: mine / theirs / given values

docs/relay.md ("Journal upload, outcomes, conflicts") is the reference for clients;
docs/journal.md describes entries, validation, the ordering rule and outcomes.

Data path and choices:

- **Upload.**  The body is read with :func:`relay.upstream.journal.parse_upload` (400
  ``bad_upload`` / 413 ``batch_too_large`` for the upload as a whole).  Entries whose
  ``(device, seq)`` has an *intake record* (table ``fieldsync_relay_journal.intake`` in
  the relay's store database) are answered from it, ``duplicate: true``, and not sent
  again.  The others are validated (:func:`relay.upstream.journal.validate_entry` against the
  token's write scope; an entry whose ``prev_seq`` names an entry rejected at intake is
  ``blocked``: the ordering rule), then *every* one of them, rejected ones included, is
  produced to ``{prefix}._journal`` (key: the device id; idempotent producer, acks=all)
  and the relay waits for Kafka's acknowledgements.  Only then are the intake records
  written (``insert … on conflict do nothing``; two concurrent uploads of a seq both get
  the record that won) and the answer given.  Kafka failing → 503 and no intake record:
  nothing was acknowledged, the device uploads again (what Kafka may have got anyway is
  skipped by the applier, which is idempotent by ``(device, seq)`` too).  The intake
  record failing after Kafka acknowledged → 503 as well, same retry.
- **Outcomes.**  The applier publishes outcomes to ``{prefix}._outcomes`` (keyed by
  device).  :class:`OutcomeFeed` (one leader per store database, a session advisory
  lock; it runs beside the bucket engine) copies them, every field included (the
  applier's ``visible_after`` too: relay/upstream/journal.py's ``Outcome``), into ``outcomes``: the
  latest per ``(device, seq)``, except that a ``resolved`` outcome is final (a late or re-published
  ``conflict`` never replaces it), each change under a new position ``pos`` (a store-wide
  sequence, allocated under a transaction-level advisory lock so positions become
  visible in order), Kafka offsets in the same transaction.  ``GET /v1/outcomes?after=P``
  returns the device's outcomes with ``pos > P``; a later outcome of an old seq
  (``conflict`` → ``resolved``) gets a new position, so a device never misses it.
  Long-poll: a LISTEN connection per process (channel ``fieldsync_relay_outcomes``,
  payload the device ids) wakes waiting requests; the waiter is registered before the
  read, so no wake-up is lost, and re-reads at least every 5 s anyway.
- **Conflicts.**  Listed from the outcome store (the open ones are those whose latest
  outcome is ``conflict``; rows already cut to what the device may see).  A resolution is
  :meth:`relay.upstream.applier.ApplierDb.resolve` on the captured database (a new edit, origin
  ``resolve:<id>``; resolving again returns the first resolution and writes nothing),
  after checking there that the conflict is the device's own (403 otherwise), judged by
  the device's write rules (its token's claims) against the current row like its journal
  entries (403 ``forbidden_row`` / ``forbidden_column`` / ``forbidden_move``).  The
  ``resolved`` outcome is put into the outcome store at once (and comes again through
  ``_outcomes``, which changes nothing).

Concurrency model: the endpoints run on the API's event loop; every database call runs in
a worker thread (``asyncio.to_thread``), Kafka sends in a small executor of their own and
their acknowledgements are awaited without holding a thread, so a Kafka outage cannot
starve the store reads of ``/v1/changes``.  :class:`JournalStore` is thread-safe (a pool of
connections); :class:`ConflictDesk` serializes its one captured-database connection with
a lock; :class:`OutcomeFeed` runs in one thread.  (No ``from __future__ import
annotations``: FastAPI reads the endpoint annotations at runtime.)
"""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import orjson
import psycopg
from fastapi import APIRouter, Body, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, Field

from cdc.kafka_sink import build_client
from core.envelope_schema import ColumnType, column_types_from_schemas
from core.settings_registry import Registry
from relay.api_errors import ApiError, Unavailable
from relay.auth import DeviceIdentity
from relay.downstream.bucket_engine import FETCH_MAX_WAIT_MS
from relay.downstream.pg_bucket_store import ConnectionPool
from relay.downstream.rules import Rules
from relay.errors import ConfigError, JournalStoreError, NotOwnDevice, RelayError
from relay.pg_migrations import run_migrations
from relay.settings import (
    AUTH,
    HTTP,
    RELAY,
    AuthSettings,
    HttpSettings,
    RelayCoreSettings,
    RelaySettings,
)
from relay.upstream.applier import SCHEMA as APPLIER_SCHEMA
from relay.upstream.applier import (
    ApplierDb,
    ApplierError,
    ConflictNotFound,
    ResolveError,
    ResolveForbidden,
    ensure_journal_topics,
)
from relay.upstream.applier_settings import JOURNAL, JournalSettings
from relay.upstream.journal import (
    MAX_BIGINT,
    JournalEntry,
    JournalLimits,
    JournalRecord,
    Outcome,
    OutcomeKind,
    RejectedUpload,
    Rejection,
    UploadError,
    WriteScope,
    blocked_by,
    decode_outcomes,
    dump_json,
    parse_upload,
    validate_entry,
)

__all__ = [
    "ConflictDesk",
    "IntakeDecision",
    "JournalApi",
    "JournalApiConfig",
    "JournalProducer",
    "JournalStore",
    "JournalStoreError",
    "OutcomeFeed",
    "OutcomePage",
    "RelayFileSettings",
    "SchemaTypes",
    "judge_upload",
    "latest_per_entry",
    "load_relay_file",
]

log = logging.getLogger("relay.upstream.journal_api")

SCHEMA: Final = "fieldsync_relay_journal"
NOTIFY_CHANNEL: Final = "fieldsync_relay_outcomes"
_LOCK_CLASS: Final = 0x66730003  # advisory lock namespace ("fs" + 3)
_MIGRATE_LOCK: Final = (_LOCK_CLASS, 0)
_POS_LOCK: Final = (_LOCK_CLASS, 1)
_NOTIFY_MAX: Final = 7000
_REWAIT_S: Final = 5.0
MAX_CONFLICT_ID: Final = 200

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
)

TypesSource = Callable[[], Mapping[str, Mapping[str, ColumnType]]]
"""Column types per table for intake validation (may block; called in a worker thread)."""


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class RelayFileSettings:
    """The relay's configuration file: ``[relay]``, ``[http]``, ``[auth]`` and ``[journal]``."""

    relay: RelayCoreSettings
    http: HttpSettings
    auth: AuthSettings
    journal: JournalSettings

    def relay_settings(self) -> RelaySettings:
        return RelaySettings(self.relay, self.http, self.auth)

    def captured_dsn(self) -> tuple[str, str | None] | None:
        """The captured database (``journal.dsn``, else ``relay.source_dsn``) and its
        password, or None when neither is set."""
        if self.journal.dsn:
            return self.journal.dsn, self.journal.password
        if self.relay.source_dsn:
            return self.relay.source_dsn, self.journal.password or self.relay.source_password
        return None


RELAY_FILE_REGISTRY: Final[Registry[RelayFileSettings]] = Registry(
    "relay", RelayFileSettings, [RELAY, HTTP, AUTH, JOURNAL]
)


def load_relay_file(
    path: str | Path | None, environ: Mapping[str, str] | None = None
) -> RelayFileSettings:
    """The relay's settings with ``[journal]`` (the applier's section: the relay reads the
    upload limits and the captured database from it).  Raises cdc's ConfigError."""
    return RELAY_FILE_REGISTRY.load(path, environ)


@dataclasses.dataclass(frozen=True)
class JournalApiConfig:
    """Tuning of the journal endpoints."""

    prefix: str = "fieldsync"
    limits: JournalLimits = dataclasses.field(default_factory=JournalLimits)
    long_poll_s: float = 30.0
    max_page_outcomes: int = 1000
    kafka_timeout_s: float = 30.0
    topic_partitions: int = 4

    def __post_init__(self) -> None:
        if self.max_page_outcomes < 1 or self.kafka_timeout_s <= 0 or self.long_poll_s < 0:
            raise ValueError("JournalApiConfig: max_page_outcomes >= 1, kafka_timeout_s > 0")

    @property
    def journal_topic(self) -> str:
        return f"{self.prefix}._journal"

    @property
    def outcomes_topic(self) -> str:
        return f"{self.prefix}._outcomes"


# --------------------------------------------------------------------------- pure parts


@dataclasses.dataclass(frozen=True)
class IntakeDecision:
    """The intake's answer for one entry (what the intake record keeps)."""

    status: Literal["accepted", "rejected"]
    reason: str | None = None
    message: str = ""

    @classmethod
    def of(cls, rejection: Rejection | None) -> "IntakeDecision":
        if rejection is None:
            return cls("accepted")
        return cls("rejected", rejection.reason.value, rejection.message)

    def to_json(self, seq: int, duplicate: bool) -> dict[str, Any]:
        return {
            "seq": seq,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "duplicate": duplicate,
        }


def _decision(status: str, reason: str | None, message: str | None) -> IntakeDecision:
    return IntakeDecision("rejected" if status == "rejected" else "accepted", reason, message or "")


def judge_upload(
    items: Sequence[JournalEntry | RejectedUpload],
    scope: WriteScope,
    earlier: Mapping[int, IntakeDecision],
    device_id: str,
    claims: Mapping[str, Any],
    now_us: int,
) -> list[tuple[JournalRecord, IntakeDecision]]:
    """The ``_journal`` record and the answer of each item (in order).

    ``earlier``: intake decisions already recorded for seqs the items may name as
    ``prev_seq``.  The ordering rule: an entry whose ``prev_seq`` was rejected (here or
    earlier, ``blocked`` included) is rejected as ``blocked``; nothing else blocks."""
    decided: dict[int, IntakeDecision] = dict(earlier)

    def outcome_of(seq: int) -> tuple[str, str | None] | None:
        found = decided.get(seq)
        if found is None:
            return None
        return ("rejected", found.reason) if found.status == "rejected" else ("accepted", None)

    out: list[tuple[JournalRecord, IntakeDecision]] = []
    for item in items:
        if isinstance(item, RejectedUpload):
            record = JournalRecord(device_id, item.seq, None, claims, item.rejection, now_us)
            rejection: Rejection | None = item.rejection
        else:
            rejection = blocked_by(item, outcome_of)
            entry = item
            if rejection is None:
                entry, rejection = validate_entry(item, scope)
            record = JournalRecord(device_id, item.seq, entry, claims, rejection, now_us)
        decision = IntakeDecision.of(rejection)
        decided[item.seq] = decision
        out.append((record, decision))
    return out


def latest_per_entry(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """One outcome per ``(device_id, seq)``: the latest, except that a ``resolved`` one is
    never replaced by another kind (the first ``resolved`` is replaced only by a later
    ``resolved``).  In the order each key was first seen."""
    latest: dict[tuple[str, int], Outcome] = {}
    for o in outcomes:
        key = (o.device_id, o.seq)
        old = latest.get(key)
        if (
            old is not None
            and old.kind is OutcomeKind.RESOLVED
            and o.kind is not OutcomeKind.RESOLVED
        ):
            continue
        latest[key] = o
    return list(latest.values())


def _notify_payload(devices: Sequence[str]) -> str:
    text = "\n".join(sorted(set(devices)))
    return text if len(text.encode("utf-8")) <= _NOTIFY_MAX and "*" not in devices else "*"


def _parse_notify(payload: str) -> frozenset[str] | None:
    return None if payload == "*" else frozenset(payload.split("\n"))


# --------------------------------------------------------------------------- the store


@dataclasses.dataclass(frozen=True)
class OutcomePage:
    """Outcome payloads (JSON texts) of one device after a position."""

    payloads: list[str]
    cursor: int
    has_more: bool


class _Listener:
    """A LISTEN connection in a daemon thread, waking waiting requests by device."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="journal-outcome-listener", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

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
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(_resolve, future)

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    conn.autocommit = True
                    conn.execute(f"listen {NOTIFY_CHANNEL}")
                    self.deliver(None)  # anything may have been missed meanwhile
                    backoff = 0.2
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=0.5):
                            self.deliver(_parse_notify(n.payload))
            except (psycopg.Error, JournalStoreError) as exc:
                log.warning("outcome listener: %s; reconnecting in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


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


# --------------------------------------------------------------------------- Kafka: uploads


class JournalProducer:
    """Writes journal records to ``{prefix}._journal`` (key: device id) and waits for Kafka.

    Idempotent producer, ``acks=all``.  ``send`` raises :class:`~relay.api_errors.Unavailable`
    (503) when Kafka does not acknowledge every record within the timeout; the producer is
    then dropped and made again by the next upload (so a stuck client never lingers).
    Blocking work (making the producer, ``send()`` waiting for metadata) runs in an
    executor of its own; acknowledgements are awaited on the event loop."""

    def __init__(
        self,
        kafka: Mapping[str, Any],
        config: JournalApiConfig,
        factory: Callable[..., Any] | None = None,
    ) -> None:
        self.kafka = dict(kafka)
        self.config = config
        self._factory = factory
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="journal-producer"
        )
        self._lock = threading.Lock()
        self._producer: Any = None
        self._topics_ok = False

    def _make(self) -> Any:
        from kafka import KafkaProducer

        t_ms = int(self.config.kafka_timeout_s * 1000)
        kw = {
            **self.kafka,
            "request_timeout_ms": min(int(self.kafka.get("request_timeout_ms", t_ms)), t_ms),
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 2,
            "max_block_ms": t_ms,
            "bootstrap_timeout_ms": t_ms,
            "delivery_timeout_ms": t_ms + 1000,
        }
        if self._factory is not None:
            return self._factory(**kw)
        return build_client(KafkaProducer, **kw)

    def _ensure_topics(self) -> None:
        """Create ``_journal`` and ``_outcomes`` if missing (as the applier does), once."""
        if self._topics_ok or self._factory is not None:
            return
        t_ms = int(self.config.kafka_timeout_s * 1000)
        ensure_journal_topics(
            {**self.kafka, "bootstrap_timeout_ms": t_ms},
            (self.config.journal_topic, self.config.outcomes_topic),
            self.config.topic_partitions,
        )
        self._topics_ok = True

    def _send_sync(self, records: Sequence[JournalRecord]) -> tuple[Any, list[Any]]:
        with self._lock:
            if self._producer is None:
                # the producer first: a KafkaAdminClient that cannot bootstrap leaves its IO
                # thread running (kafka-python 3.0.12), a producer does not
                producer = self._make()
                try:
                    self._ensure_topics()
                except BaseException:
                    producer.close(timeout=0)
                    raise
                self._producer = producer
            producer = self._producer
        topic = self.config.journal_topic
        futures = [producer.send(topic, key=r.kafka_key, value=r.to_bytes()) for r in records]
        return producer, futures

    def _drop(self, producer: Any) -> None:
        with self._lock:
            if self._producer is producer:
                self._producer = None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.close(timeout=0)

    async def send(self, records: Sequence[JournalRecord]) -> None:
        """Produce ``records`` in order and wait until Kafka holds every one."""
        if not records:
            return
        loop = asyncio.get_running_loop()
        producer: Any = None
        try:
            producer, futures = await loop.run_in_executor(self._executor, self._send_sync, records)
            waits = [_kafka_future(f, loop) for f in futures]
            await asyncio.wait_for(asyncio.gather(*waits), self.config.kafka_timeout_s + 2.0)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:
            log.warning("journal upload: Kafka did not take %d record(s): %s", len(records), exc)
            await loop.run_in_executor(self._executor, self._drop, producer)
            raise Unavailable(
                f"Kafka did not acknowledge the upload ({type(exc).__name__}); nothing was "
                "acknowledged, upload again",
                retry_after_s=2,
            ) from exc

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.close(timeout=5)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _kafka_future(future: Any, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
    """An asyncio future settled by a kafka-python future's callbacks (sender thread)."""
    out: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, failed: bool) -> None:
        if out.done():
            return
        if failed:
            out.set_exception(value)
        else:
            out.set_result(value)

    future.add_callback(lambda value: loop.call_soon_threadsafe(settle, value, False))
    future.add_errback(lambda exc: loop.call_soon_threadsafe(settle, exc, True))
    return out


# --------------------------------------------------------------------------- Kafka: outcomes


class OutcomeFeed:
    """Copies ``{prefix}._outcomes`` into the outcome store (see the module docstring).

    :meth:`run` leads or stands by until :meth:`request_stop`; one thread."""

    def __init__(
        self,
        store: JournalStore,
        kafka: Mapping[str, Any],
        prefix: str,
        *,
        refresh_s: float = 5.0,
        standby_s: float = 2.0,
        poll_max: int = 2000,
        retention_days: float = 0.0,
        prune_interval_s: float = 3600.0,
    ) -> None:
        self.store = store
        self.retention_days = retention_days
        self.prune_interval_s = prune_interval_s
        self._pruned = -math.inf
        self.kafka = dict(kafka)
        self.topic = f"{prefix}._outcomes"
        self.refresh_s = refresh_s
        self.standby_s = standby_s
        self.poll_max = poll_max
        self.leading = threading.Event()
        self._stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._consumer: Any = None
        self._partitions: set[int] = set()
        self._refreshed = -math.inf
        self.stored = 0

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                if self._conn is None:
                    self._conn = self.store.lead(self.topic)
                    if self._conn is None:
                        self._stop.wait(self.standby_s)
                        continue
                    log.info("outcome feed: leading (%s)", self.topic)
                    self.leading.set()
                while not self._stop.is_set():
                    self.step()
                    self._maybe_prune()
                backoff = 0.5
            except Exception as exc:
                if not isinstance(exc, psycopg.Error | RelayError) and not _is_kafka_error(exc):
                    raise
                log.error("outcome feed: %s; retrying in %.1fs", exc, backoff)
                self.close()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        self.close()

    def _maybe_prune(self) -> None:
        """The leader applies ``journal.retention_days`` every ``prune_interval_s``."""
        if not self.retention_days or time.monotonic() - self._pruned < self.prune_interval_s:
            return
        self._pruned = time.monotonic()
        intake, outcomes = self.store.prune(self.retention_days)
        if intake or outcomes:
            log.info(
                "journal retention (%g days): deleted %d intake records and %d outcomes",
                self.retention_days,
                intake,
                outcomes,
            )

    def _assign(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self._refreshed = time.monotonic()
        if self._consumer is None:
            self._consumer = build_client(
                KafkaConsumer,
                **self.kafka,
                enable_auto_commit=False,
                isolation_level="read_committed",
                auto_offset_reset="earliest",
                fetch_max_wait_ms=FETCH_MAX_WAIT_MS,  # outcomes reach devices within 50 ms
            )
            self._partitions = set()
        parts = set(self._consumer.partitions_for_topic(self.topic) or ())
        new = sorted(parts - self._partitions)
        if not new:
            return
        assert self._conn is not None
        offsets = self.store.feed_offsets(self._conn, self.topic)
        self._partitions |= set(new)
        self._consumer.assign([TopicPartition(self.topic, p) for p in sorted(self._partitions)])
        for p in new:
            tp = TopicPartition(self.topic, p)
            if p in offsets:
                self._consumer.seek(tp, offsets[p])
            else:
                self._consumer.seek_to_beginning(tp)

    def step(self, timeout_ms: int = 200) -> int:
        """One poll into the store (needs the lead); returns the number of records read."""
        if self._conn is None:
            raise JournalStoreError("the outcome feed is not leading")
        if time.monotonic() - self._refreshed > self.refresh_s or self._consumer is None:
            self._assign()
        if not self._partitions:
            self._stop.wait(timeout_ms / 1000)
            return 0
        batch = self._consumer.poll(timeout_ms=timeout_ms, max_records=self.poll_max)
        outcomes: list[Outcome] = []
        offsets: dict[tuple[str, int], int] = {}
        n = 0
        for tp in sorted(batch, key=lambda t: t.partition):
            for r in batch[tp]:
                n += 1
                offsets[(self.topic, tp.partition)] = r.offset + 1
                try:
                    outcomes.extend(decode_outcomes(r.value or b""))
                except RelayError as exc:  # JournalFormatError: skip, say where
                    log.error(
                        "outcome record %s/%d@%d unreadable: %s",
                        tp.topic,
                        tp.partition,
                        r.offset,
                        exc,
                    )
        if n:
            self.stored += self.store.put_outcomes(outcomes, conn=self._conn, offsets=offsets)
        return n

    def close(self) -> None:
        self.leading.clear()
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.close()
            self._consumer = None
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()  # releases the lock
            self._conn = None
        self._partitions = set()
        self._refreshed = -math.inf

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Run in a daemon thread for the duration of the block."""
        thread = threading.Thread(target=self._guarded, name="journal-outcome-feed", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self.request_stop()
            thread.join(30)
            if thread.is_alive():
                log.warning("outcome feed did not stop within 30 s")

    def _guarded(self) -> None:
        try:
            self.run()
        except Exception:
            log.exception("outcome feed stopped with an error")


def _is_kafka_error(exc: BaseException) -> bool:
    from kafka.errors import KafkaError

    return isinstance(exc, KafkaError | OSError)


# --------------------------------------------------------------------------- column types


class SchemaTypes:
    """Column types from cdc's value schemas in ``{prefix}._schemas``, re-read at most every
    ``refresh_s`` (for relays without access to the captured database).  Thread-safe."""

    def __init__(self, kafka: Mapping[str, Any], prefix: str, refresh_s: float = 30.0) -> None:
        self.kafka = dict(kafka)
        self.prefix = prefix
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._log: Any = None
        self._types: Mapping[str, Mapping[str, ColumnType]] = {}
        self._at = -math.inf

    def __call__(self) -> Mapping[str, Mapping[str, ColumnType]]:
        from relay.downstream.bucket_engine import SchemaLog

        with self._lock:
            if time.monotonic() - self._at < self.refresh_s:
                return self._types
            self._at = time.monotonic()
            try:
                if self._log is None:
                    self._log = SchemaLog(self.kafka, self.prefix)
                if self._log.refresh(timeout=5.0):
                    self._types = column_types_from_schemas(self._log.texts)
            except Exception as exc:
                if not _is_kafka_error(exc):
                    raise
                log.warning("journal intake: schemas not read (%s); types unchecked here", exc)
            return self._types

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None


# --------------------------------------------------------------------------- conflicts


class ConflictDesk:
    """Kept conflicts in the captured database: who owns one, and resolving it through
    :meth:`relay.upstream.applier.ApplierDb.resolve`.  One connection, serialized by a lock;
    (re)connected on demand."""

    def __init__(self, db: ApplierDb, retry_s: float = 30.0) -> None:
        self.db = db
        self.retry_s = retry_s
        self._lock = threading.Lock()
        self._types: Mapping[str, Mapping[str, ColumnType]] = {}
        self._failed_at = -math.inf

    def _ensure(self) -> psycopg.Connection[Any]:
        conn = self.db.conn
        if conn is None or conn.closed:
            self.db.connect()
            self._types = {t: m.types for t, m in self.db.tables.items()}
            conn = self.db.conn
        assert conn is not None
        return conn

    def types(self) -> Mapping[str, Mapping[str, ColumnType]]:
        """Column types of the captured tables, as last read (after a failure to connect,
        the next attempt waits ``retry_s``; until then, or if none ever worked, the last
        types, maybe none: the applier checks types anyway)."""
        with self._lock:
            if time.monotonic() - self._failed_at < self.retry_s:
                return self._types
            try:
                self._ensure()
            except (ApplierError, ConfigError, psycopg.Error) as exc:
                self._failed_at = time.monotonic()
                log.warning("journal intake: captured database unavailable (%s)", exc)
            return self._types

    def resolve(
        self,
        device_id: str,
        conflict_id: str,
        choice: str,
        values: Mapping[str, Any] | None,
        claims: Mapping[str, Any],
    ) -> tuple[Outcome, bool]:
        """Settle the device's conflict as that device (its token's ``claims``: judged by
        its write rules against the row as it is now); returns the ``resolved`` outcome and
        whether it had been resolved before (then nothing was written).  Raises
        ConflictNotFound, NotOwnDevice, ResolveForbidden, ResolveError, or Unavailable."""
        if not _is_conflict_id(conflict_id):
            raise ConflictNotFound(f"no kept conflict has id {conflict_id!r:.80}")
        with self._lock:
            try:
                conn = self._ensure()
                try:
                    found = conn.execute(
                        f"select device_id, status from {APPLIER_SCHEMA}.conflicts where id = %s",
                        (conflict_id,),
                    ).fetchone()
                except psycopg.errors.UndefinedTable:
                    found = None  # the applier never ran here: no conflict at all
                if found is None:
                    raise ConflictNotFound(f"no kept conflict has id {conflict_id!r}")
                owner, status = str(found[0]), str(found[1])
                if owner != device_id:
                    raise NotOwnDevice(
                        f"conflict {conflict_id} belongs to another device; device "
                        f"{device_id!r} may resolve only its own"
                    )
                outcome = self.db.resolve(
                    conflict_id, choice, values, by=f"device:{device_id}", claims=claims
                )
                return outcome, status == "resolved"
            except (ConflictNotFound, ResolveError, NotOwnDevice):
                raise
            except (ApplierError, ConfigError, psycopg.Error) as exc:
                log.warning("conflict %s not resolved: %s", conflict_id, exc)
                self.db.close()
                raise Unavailable(
                    "the captured database cannot be used to resolve the conflict now (the "
                    "relay's log says why); retry later"
                ) from exc

    def close(self) -> None:
        with self._lock:
            self.db.close()


def _is_conflict_id(text: str) -> bool:
    """Conflict ids are UUIDs (the applier makes them); anything else names none."""
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


# --------------------------------------------------------------------------- the endpoints


class UploadResultModel(BaseModel):
    seq: int
    status: Literal["accepted", "rejected"] = Field(
        description="accepted: Kafka holds the entry and the applier will decide its outcome"
    )
    reason: str | None = Field(description="rejected: stable code (docs/journal.md)")
    message: str = Field(description="rejected: what is wrong, naming the entry and column")
    duplicate: bool = Field(description="answered from the intake record of an earlier upload")


class UploadAnswer(BaseModel):
    results: list[UploadResultModel] = Field(description="one per uploaded entry, in order")


class OutcomesMessage(BaseModel):
    outcomes: list[dict[str, Any]] = Field(
        description="Outcome objects (docs/journal.md), oldest position first; keep the "
        "latest per seq"
    )
    cursor: int = Field(description="send it back as ?after= to continue")
    has_more: bool


class ConflictsMessage(BaseModel):
    conflicts: list[dict[str, Any]] = Field(
        description="the latest outcome (kind conflict) of each open conflict; "
        "conflict.id is what to resolve"
    )
    has_more: bool


class ResolveRequest(BaseModel):
    choice: Literal["mine", "theirs", "values"] = Field(
        description="mine: the device's values; theirs: the server's; values: the given ones"
    )
    values: dict[str, Any] | None = Field(
        default=None, description="with choice 'values' only: column → value (wire form)"
    )


class ResolveAnswer(BaseModel):
    outcome: dict[str, Any] = Field(description="the entry's resolved outcome")
    already_resolved: bool = Field(description="it was resolved before; nothing was written")


_CHOICES: Final = {"mine": "device", "theirs": "server", "values": "values"}


_NO_TYPES: Final[Mapping[str, Mapping[str, ColumnType]]] = {}


def _no_types() -> Mapping[str, Mapping[str, ColumnType]]:
    return _NO_TYPES


def _error_docs() -> dict[int | str, dict[str, Any]]:
    from relay.api_errors import ErrorMessage

    return {s: {"model": ErrorMessage} for s in (400, 401, 403, 404, 413, 422, 429, 500, 503)}


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


class JournalApi:
    """The journal endpoints and what they share (see the module docstring).  The caller
    owns the parts; :meth:`close` closes them."""

    def __init__(
        self,
        rules: Rules,
        store: JournalStore,
        producer: JournalProducer,
        config: JournalApiConfig,
        *,
        desk: ConflictDesk | None = None,
        types: TypesSource | None = None,
        feed: OutcomeFeed | None = None,
    ) -> None:
        self.rules = rules
        self.store = store
        self.producer = producer
        self.config = config
        self.desk = desk
        self.feed = feed
        self.types: TypesSource = types or (desk.types if desk is not None else _no_types)
        self._scopes: dict[tuple[frozenset[str], int], WriteScope] = {}

    @classmethod
    def from_settings(cls, settings: RelayFileSettings, rules: Rules) -> "JournalApi":
        """The parts for ``fieldsync relay run``: the store database, Kafka, and the
        captured database (if configured) for conflicts and column types."""
        r, j = settings.relay, settings.journal
        kafka = settings.relay_settings().kafka_client_kwargs()
        config = JournalApiConfig(
            prefix=r.topic_prefix,
            limits=j.limits(),
            long_poll_s=settings.http.long_poll_s,
            kafka_timeout_s=r.kafka_timeout_s,
            topic_partitions=j.topic_partitions,
        )
        store = JournalStore(r.store_dsn, password=r.store_password)
        store.migrate()
        desk = None
        types: TypesSource | None = None
        captured = settings.captured_dsn()
        if captured is not None:
            desk = ConflictDesk(
                ApplierDb(
                    captured[0],
                    r.rules,
                    j.conflicts,
                    password=captured[1],
                    consumer=j.consumer,
                    max_skew_ms=int(j.max_clock_skew_s * 1000),
                )
            )
        else:
            bootstrap = {"bootstrap_timeout_ms": int(r.kafka_timeout_s * 1000)}
            types = SchemaTypes({**kafka, **bootstrap}, r.topic_prefix)
        feed = OutcomeFeed(store, kafka, r.topic_prefix, retention_days=j.retention_days)
        return cls(
            rules,
            store,
            JournalProducer(kafka, config),
            config,
            desk=desk,
            types=types,
            feed=feed,
        )

    def close(self) -> None:
        if self.feed is not None:
            self.feed.request_stop()
        self.producer.close()
        if self.desk is not None:
            self.desk.close()
        if isinstance(self.types, SchemaTypes):
            self.types.close()
        self.store.close()

    # ---- upload

    def _scope(self, claims: Mapping[str, Any]) -> WriteScope:
        """The write scope of the buckets ``claims`` grant (shared by devices granted the
        same buckets, remade when the column types change)."""
        types = self.types()
        granted = frozenset(self.rules.buckets_for_claims(claims))
        key = (granted, id(types))
        found = self._scopes.get(key)
        if found is None:
            if len(self._scopes) > 10_000:
                self._scopes.clear()
            found = self._scopes[key] = WriteScope(self.rules, granted, types)
        return found

    def _judge(
        self,
        who: DeviceIdentity,
        items: Sequence[JournalEntry | RejectedUpload],
        earlier: Mapping[int, IntakeDecision],
    ) -> list[tuple[JournalRecord, IntakeDecision]]:
        scope = self._scope(who.claims)
        now_us = time.time_ns() // 1000
        return judge_upload(items, scope, earlier, who.device_id, dict(who.claims), now_us)

    async def upload(self, who: DeviceIdentity, raw: bytes) -> dict[str, Any]:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "bad_upload", f"the upload is not JSON: {exc}") from exc
        try:
            items = parse_upload(body, who.device_id, self.config.limits)
        except UploadError as exc:
            raise ApiError(exc.status, exc.code, str(exc)) from exc
        wanted = {i.seq for i in items}
        wanted |= {i.prev_seq for i in items if isinstance(i, JournalEntry) and i.prev_seq}
        known = await self._in_store(self.store.intake_lookup, who.device_id, sorted(wanted))
        fresh = [i for i in items if i.seq not in known]
        judged = await asyncio.to_thread(self._judge, who, fresh, known) if fresh else []
        await self.producer.send([record for record, _ in judged])
        recorded = await self._in_store(
            self.store.record_intake, who.device_id, [(r.seq, d) for r, d in judged]
        )
        results = []
        for item in items:
            if item.seq in recorded:
                decision, mine = recorded[item.seq]
                results.append(decision.to_json(item.seq, not mine))
            else:
                results.append(known[item.seq].to_json(item.seq, True))
        return {"results": results}

    async def _in_store(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except JournalStoreError as exc:
            log.warning("journal: %s", exc)
            raise Unavailable("the relay's store cannot be used right now; retry shortly") from exc

    # ---- outcomes and conflicts

    async def outcomes(
        self, who: DeviceIdentity, after: int, limit: int, wait: float
    ) -> dict[str, Any]:
        def read() -> OutcomePage | None:
            page = self.store.read_outcomes(who.device_id, after, limit)
            return page if page.payloads else None

        if wait > 0:
            try:
                page = await self.store.wait_async(who.device_id, read, wait)
            except JournalStoreError as exc:
                log.warning("journal: %s", exc)
                raise Unavailable("the relay's store cannot be read right now; retry") from exc
        else:
            page = await self._in_store(read)
        if page is None:
            page = OutcomePage([], after, False)
        return {
            "outcomes": [orjson.Fragment(p) for p in page.payloads],
            "cursor": page.cursor,
            "has_more": page.has_more,
        }

    async def conflicts(self, who: DeviceIdentity, limit: int) -> dict[str, Any]:
        payloads, more = await self._in_store(self.store.open_conflicts, who.device_id, limit)
        return {"conflicts": [orjson.Fragment(p) for p in payloads], "has_more": more}

    async def resolve(
        self, who: DeviceIdentity, conflict_id: str, request: ResolveRequest
    ) -> dict[str, Any]:
        if self.desk is None:
            raise Unavailable(
                "this relay has no access to the captured database (set journal.dsn or "
                "relay.source_dsn), so it cannot resolve conflicts",
                retry_after_s=60,
            )
        try:
            outcome, already = await asyncio.to_thread(
                self.desk.resolve,
                who.device_id,
                conflict_id,
                _CHOICES[request.choice],
                request.values,
                dict(who.claims),
            )
        except ConflictNotFound as exc:
            raise ApiError(404, "conflict_not_found", str(exc)) from exc
        except ResolveForbidden as exc:
            raise ApiError(403, exc.code, str(exc)) from exc
        except ResolveError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from exc
        try:
            await asyncio.to_thread(self.store.put_outcomes, [outcome])
        except JournalStoreError as exc:  # it comes through _outcomes anyway
            log.warning("resolved outcome of conflict %s not stored yet: %s", conflict_id, exc)
        return {"outcome": outcome.to_json(), "already_resolved": already}

    # ---- routing

    def router(self, identity: Callable[..., Any]) -> APIRouter:
        """The endpoints, authenticated (and rate-limited) by the API's ``identity``."""
        cfg = self.config
        errors = _error_docs()
        router = APIRouter(prefix="/v1", tags=["journal"])
        Device = Annotated[DeviceIdentity, Security(identity)]

        @router.post(
            "/journal",
            response_model=UploadAnswer,
            responses=errors,
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["entries"],
                                "properties": {
                                    "entries": {
                                        "type": "array",
                                        "maxItems": cfg.limits.max_entries,
                                        "items": {"type": "object"},
                                    }
                                },
                            }
                        }
                    },
                }
            },
        )
        async def upload(device: Device, request: Request) -> Response:
            """Upload journal entries (docs/journal.md); answered once Kafka holds them."""
            return _json(await self.upload(device, await request.body()))

        @router.get("/outcomes", response_model=OutcomesMessage, responses=errors)
        async def outcomes(
            device: Device,
            after: Annotated[
                int,
                Query(
                    ge=0,
                    le=MAX_BIGINT,
                    description="the cursor of the previous answer; 0: from the start",
                ),
            ] = 0,
            limit: Annotated[
                int | None,
                Query(ge=1, description=f"most outcomes (at most {cfg.max_page_outcomes})"),
            ] = None,
            wait: Annotated[
                float,
                Query(
                    ge=0,
                    description=f"seconds to wait when nothing is new (at most {cfg.long_poll_s})",
                ),
            ] = 0.0,
        ) -> Response:
            """The device's entry outcomes after the cursor (long-poll up to ``wait`` s)."""
            size = min(limit or cfg.max_page_outcomes, cfg.max_page_outcomes)
            return _json(await self.outcomes(device, after, size, min(wait, cfg.long_poll_s)))

        @router.get("/conflicts", response_model=ConflictsMessage, responses=errors)
        async def conflicts(
            device: Device,
            limit: Annotated[
                int | None, Query(ge=1, description=f"most (at most {cfg.max_page_outcomes})")
            ] = None,
        ) -> Response:
            """The device's open kept conflicts (ask policy), oldest first."""
            size = min(limit or cfg.max_page_outcomes, cfg.max_page_outcomes)
            return _json(await self.conflicts(device, size))

        @router.post(
            "/conflicts/{conflict_id}/resolve", response_model=ResolveAnswer, responses=errors
        )
        async def resolve(
            device: Device,
            conflict_id: Annotated[str, PathParam(max_length=MAX_CONFLICT_ID)],
            request: Annotated[ResolveRequest, Body()],
        ) -> Response:
            """Settle one of the device's conflicts; a new edit. Resolving twice is harmless."""
            return _json(await self.resolve(device, conflict_id, request))

        return router
