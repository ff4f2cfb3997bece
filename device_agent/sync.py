"""Synchronisation: journal upload, schema follow-up, downloads, ``--once`` and ``--watch``.

One sync round (:meth:`Agent.sync_once`):

1. read ``/v1/schema`` and migrate the local tables (device_agent/schema_sync.py): a
   table whose key changed names its journal entries by the new key before they go up.
   When the migration is blocked (:class:`~device_agent.errors.SchemaBlocked`), which
   open edits may cause (a column removed while edits of its table are ``pending`` or
   ``sent``: :class:`~device_agent.errors.MigrationWaits`), the journal is uploaded and
   the outcomes of sent entries are read and recorded at once, and the migration is
   tried again: once every edit it waits for has its outcome it goes on, in this round
   or a later one (nothing else is downloaded while it is blocked);
2. upload the journal's ``pending`` entries (oldest first, in the relay's form:
   device_agent/journal_wire.py; at most :data:`UPLOAD_BATCH` per request; each becomes
   ``sent``, or ``failed`` with the relay's reason); a relay without the journal
   endpoint leaves them pending;
3. download changes messages from the stored cursor until one carries a complete
   checkpoint, then apply them in one transaction (device_agent/apply.py), together with
   the outcomes of sent entries read just before the download (so an outcome and the
   server version including its edit, when both are there, show at once; outcomes are
   only read while an entry is ``sent`` or waits for the resolution of its conflict).
   Messages before the complete one are *staged* in ``_fieldsync_staging``
   (device_agent/staging.py: each with the cursor it leads to, committed per message),
   so a connection cut at any byte resumes from the last whole message: nothing is
   downloaded twice more than one message, nothing is applied twice (apply and cursor
   commit together), nothing is lost;
4. if a bucket's checksum differed, its cursor went back to 0: download again (at most
   :data:`MAX_REPAIRS` times per round).

``--watch`` (:meth:`Agent.watch`) keeps a WebSocket (``/v1/stream``) open and handles its
messages the same way; if the WebSocket cannot be opened it long-polls ``/v1/changes``
(``wait``) and tries the WebSocket again later.  When the relay is unreachable it keeps
trying with exponential backoff and jitter while the app goes on reading and writing
the local database (edits wait in the journal); so it does while a migration waits for
local edits to be synced (:class:`~device_agent.errors.MigrationWaits`), each try
reading their outcomes.  Local edits are uploaded as they appear (checked every
second); while outcomes are awaited they are read every second and recorded with the
next changes message, or on their own a second later.

Threads: an :class:`Agent` belongs to one thread (its SQLite connection and HTTP
client); :meth:`Agent.watch` stops when the given event is set.  While a download stages
a message, a helper thread reads the next one (:meth:`Agent.download`): the HTTP client
passes to it for that one request and back, the database stays with the agent's thread,
and messages are handled in order, each after the one before it is staged, so what a
cut or a crash leaves behind is the same as without it.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, Final

from device_agent import local_db, relay_schema, schema_sync, staging
from device_agent.apply import apply_messages, refresh_open_rows, settle
from device_agent.client import (
    JournalUnsupported,
    RelayClient,
    RetryPolicy,
    reset_cursor,
    token_subject,
)
from device_agent.derive import ApplyResult
from device_agent.errors import (
    AuthFailed,
    DeviceAgentError,
    KeyMismatch,
    MigrationWaits,
    RelayRefused,
    RelayUnreachable,
    SchemaBlocked,
    StateError,
)
from device_agent.journal_wire import (
    UPLOAD_BATCH,
    oversized_rejection,
    pending_dependents,
    wire_entries,
)
from device_agent.local_db import get_meta, set_meta
from device_agent.local_tables import PREFIX, transaction

MAX_REPAIRS: Final = 3
PAGE_OPS: Final = 5000
WATCH_POLL_S: Final = 25.0

Progress = Callable[[int, int | None], None]


@dataclasses.dataclass
class SyncReport:
    uploaded: int = 0
    rejected: int = 0
    journal_note: str = ""
    schema_notes: list[str] = dataclasses.field(default_factory=list)
    applied: list[ApplyResult] = dataclasses.field(default_factory=list)
    messages: int = 0
    ops: int = 0
    bytes: int = 0
    retries: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "uploaded": self.uploaded,
            "rejected": self.rejected,
            "journal_note": self.journal_note,
            "schema_notes": self.schema_notes,
            "messages": self.messages,
            "ops": self.ops,
            "bytes": self.bytes,
            "retries": self.retries,
            "seconds": round(self.seconds, 3),
            "verified": sorted({b for a in self.applied for b in a.verified}),
            "mismatched": sorted({b for a in self.applied for b in a.mismatched}),
            "released": sum(a.released for a in self.applied),
        }


def apply_outcomes(conn: Any, outcomes: list[dict[str, Any]]) -> int:
    """Record outcomes (``Outcome`` JSON of core/journal_outcomes.py): statuses, kept conflicts; rows
    whose edits settled are re-derived.  Returns how many entries changed."""
    return settle(conn, outcomes=outcomes)


# --------------------------------------------------------------------------- the agent


class Agent:
    """The device agent on one database (see the module docstring)."""

    def __init__(
        self,
        db_path: str,
        *,
        key: str | None = None,
        retry: RetryPolicy | None = None,
        page_ops: int | None = PAGE_OPS,
        progress: Progress | None = None,
        on_event: Callable[[str], None] | None = None,
        client_factory: Callable[[str, str], RelayClient] | None = None,
    ) -> None:
        self.db_path = db_path
        self.conn = local_db.connect(db_path, key)
        local_db.require_initialized(self.conn, db_path)
        self.retry = retry
        self.page_ops = page_ops
        self.progress = progress
        self.on_event = on_event or (lambda _m: None)
        self._client_factory = client_factory
        self._client: RelayClient | None = None
        self._rng = random.Random()
        # outcomes read before a download, recorded with its apply: (outcomes, cursor)
        self._due: tuple[list[dict[str, Any]], str | None] | None = None
        self._outcomes_read_at = 0.0

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self.conn.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def relay_url(self) -> str:
        return get_meta(self.conn, "relay_url") or ""

    @property
    def device_id(self) -> str:
        return get_meta(self.conn, "device_id") or ""

    @property
    def client(self) -> RelayClient:
        if self._client is None:
            token = get_meta(self.conn, "token") or ""
            if self._client_factory is not None:
                self._client = self._client_factory(self.relay_url, token)
            else:
                self._client = RelayClient(self.relay_url, token, retry=self.retry)
        return self._client

    # ---- pieces

    def upload(self, report: SyncReport) -> None:
        limit = UPLOAD_BATCH
        while True:
            entries = wire_entries(self.conn, self.device_id, limit=limit)
            if not entries:
                return
            try:
                result = self.client.upload_journal(entries)
            except JournalUnsupported as exc:
                report.journal_note = str(exc)
                return
            except RelayRefused as exc:  # 413: the batch is over a relay limit: halve it
                if exc.status != 413:
                    raise
                if len(entries) > 1:
                    limit = max(1, min(limit, len(entries)) // 2)
                else:
                    report.rejected += _reject_alone(self.conn, entries[0], str(exc))
                continue
            with transaction(self.conn):
                self.conn.executemany(
                    f"""update {PREFIX}journal set status = 'sent', sent_at = julianday('now')
                        where seq = ? and status = 'pending'""",
                    [(seq,) for seq in result.accepted],
                )
            if result.rejected:
                settle(self.conn, rejected=result.rejected)
            report.uploaded += len(result.accepted)
            report.rejected += len(result.rejected)
            if not result.accepted and not result.rejected:
                return

    def awaiting_outcomes(self) -> bool:
        """Whether an entry waits for its outcome (``sent``) or for the resolution of its
        kept conflict (``conflict``): only then are outcomes read."""
        row = self.conn.execute(
            f"""select exists (select 1 from {PREFIX}journal
                where status in ('sent', 'conflict'))"""
        ).fetchone()
        return bool(row[0])

    def read_outcomes(self) -> tuple[list[dict[str, Any]], str | None] | None:
        """New outcomes (the latest per seq) and the cursor after them; None when the
        relay has no outcomes endpoint."""
        self._outcomes_read_at = time.monotonic()
        try:
            items, cursor = self.client.outcomes(get_meta(self.conn, "outcomes_cursor"))
        except JournalUnsupported:
            return None
        return _latest_per_seq(items), cursor

    def fetch_outcomes(self) -> int:
        """Read and record outcomes now (their rows re-derived); returns how many entries
        changed."""
        due = self.read_outcomes()
        return 0 if due is None else self._record(due)

    def _record(self, due: tuple[list[dict[str, Any]], str | None]) -> int:
        items, cursor = due
        n = apply_outcomes(self.conn, items) if items else 0
        if cursor is not None:
            with transaction(self.conn):
                set_meta(self.conn, "outcomes_cursor", cursor)
        return n

    def _tick(self) -> None:
        """Between messages while watching: outcomes read a second ago that no changes
        message took along are recorded now; new ones are read at most every second,
        while some are awaited."""
        if time.monotonic() - self._outcomes_read_at < 1.0:
            return
        if self._due is not None:
            due, self._due = self._due, None
            self._record(due)
        elif self.awaiting_outcomes():
            self._due = self.read_outcomes()

    def refresh_schema(self, report: SyncReport) -> None:
        """Read the relay's schema and migrate to it; when blocked, upload the journal,
        record the outcomes awaited (its edits may settle) and try again, else raise."""
        schema = relay_schema.parse_schema(self.client.schema())
        try:
            _migrate(self.conn, schema, report)
        except SchemaBlocked:
            self.upload(report)
            if self.awaiting_outcomes():
                self._due = None  # read again, from the recorded cursor, and recorded now
                self.fetch_outcomes()
            _migrate(self.conn, schema, report)

    def cursor(self) -> str | None:
        return staging.download_cursor(self.conn)

    def handle(self, msg: Mapping[str, Any], report: SyncReport) -> ApplyResult | None:
        """Stage or apply one changes message (device_agent/staging.py); the apply result
        when a checkpoint was applied."""
        report.messages += 1
        report.ops += len(msg.get("ops") or ())
        complete = bool((msg.get("checkpoint") or {}).get("complete"))
        n_staged = staging.staged_count(self.conn)
        if not complete:
            staging.stage(self.conn, msg)
            return None
        total = staging.staged_ops(self.conn) + len(msg.get("ops") or ())
        due, self._due = self._due, None
        if due is None and self.awaiting_outcomes():
            due = self.read_outcomes()

        def finish(conn: Any) -> None:
            staging.clear(conn)
            set_meta(conn, "last_sync_at", str(time.time()))
            if due is not None and due[1] is not None:
                set_meta(conn, "outcomes_cursor", due[1])

        try:
            result = apply_messages(
                self.conn,
                staging.staged_messages(self.conn, n_staged, msg),
                str(msg["cursor"]),
                reset_cursor,
                total_ops=total,
                finish=finish,
                outcomes=due[0] if due is not None else (),
            )
        except KeyMismatch:
            # the staged messages hold rows the local table cannot take: the next sync
            # reads the schema again and downloads from the last applied cursor
            with transaction(self.conn):
                staging.clear(self.conn)
            raise
        report.applied.append(result)
        if result.mismatched:
            self.on_event(
                "checksum mismatch in " + ", ".join(result.mismatched) + ": downloading again"
            )
        return result

    def download(self, report: SyncReport, wait_s: float = 0.0) -> ApplyResult | None:
        """Download until a complete checkpoint is applied (and nothing more is waiting);
        the next message is read ahead while one is staged (:func:`_download`)."""
        if self._due is None and self.awaiting_outcomes():
            # read before the changes: an outcome and the server version that includes
            # its edit (when already there) are then recorded in one transaction
            self._due = self.read_outcomes()
        return _download(self, report, wait_s)

    def sync_once(self, wait_s: float = 0.0) -> SyncReport:
        """One round: schema, upload, download and apply (repairing mismatched buckets)."""
        started = time.perf_counter()
        report = SyncReport()
        set_meta(self.conn, "last_attempt_at", str(time.time()))
        try:
            self.refresh_schema(report)
            self.upload(report)
            for _ in range(MAX_REPAIRS + 1):
                result = self.download(report, wait_s)
                if result is None or not result.mismatched:
                    break
            else:
                raise StateError(
                    "buckets still differ from the relay's checksums after "
                    f"{MAX_REPAIRS} downloads; run device-agent verify and report it"
                )
            with transaction(self.conn):
                set_meta(self.conn, "last_error", None)
        except DeviceAgentError as exc:
            with transaction(self.conn):
                set_meta(self.conn, "last_error", str(exc))
            raise
        finally:
            report.seconds = time.perf_counter() - started
            if self._client is not None:
                report.bytes = self._client.bytes_received
                report.retries = self._client.retries
        return report

    # ---- watch

    def watch(
        self,
        stop: threading.Event,
        use_ws: bool = True,
        poll_s: float = WATCH_POLL_S,
        ws_retry_s: float = 60.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        """Follow the relay until ``stop`` is set (see the module docstring)."""
        failures = 0
        ws_broken_until = 0.0
        while not stop.is_set():
            report = SyncReport()
            try:
                self.sync_once()
                if failures:
                    self.on_event("relay reachable again: caught up")
                failures = 0
                if use_ws and time.monotonic() >= ws_broken_until:
                    try:
                        self._watch_ws(stop, report)
                    except RelayUnreachable as exc:
                        self.on_event(f"WebSocket unavailable ({exc}); long-polling")
                        ws_broken_until = time.monotonic() + ws_retry_s
                    continue
                self._watch_poll(stop, report, poll_s, ws_broken_until if use_ws else None)
            except AuthFailed:
                raise
            except (RelayUnreachable, KeyMismatch, MigrationWaits) as exc:
                failures += 1
                delay = self._rng.uniform(0, min(max_backoff_s, 0.5 * 2**failures))
                self.on_event(f"{_waiting_for(exc)} ({exc}); retrying in {delay:.1f} s")
                stop.wait(delay)

    def _journal_head(self) -> int:
        row = self.conn.execute(f"select coalesce(max(seq), 0) from {PREFIX}journal").fetchone()
        return int(row[0])

    def _watch_ws(self, stop: threading.Event, report: SyncReport) -> None:
        head = self._journal_head()
        with self.client.stream(self.cursor()) as messages:
            for msg in messages:
                if stop.is_set():
                    return
                if msg is not None:
                    self.handle(msg, report)
                self._tick()
                now_head = self._journal_head()
                if now_head != head:
                    head = now_head
                    self.upload(report)

    def _watch_poll(
        self, stop: threading.Event, report: SyncReport, poll_s: float, until: float | None
    ) -> None:
        while not stop.is_set():
            if until is not None and time.monotonic() >= until:
                return
            self.upload(report)
            wait = 1.0 if self.awaiting_outcomes() else poll_s
            msg = self.client.changes(self.cursor(), self.page_ops, wait)
            self.handle(msg, report)
            self._tick()


def _reject_alone(conn: Any, entry: Mapping[str, Any], refusal: str) -> int:
    """Entry ``entry``, refused as too large alone, and the pending entries made on top of
    it (as the relay would: ``blocked``) become ``failed``, kept in the journal; else it
    would stop every later edit from going up.  Returns how many."""
    seq = int(entry["seq"])
    rejected = {seq: oversized_rejection(entry, refusal)}
    for later in pending_dependents(conn, seq):
        rejected[later] = ("blocked", f"made on top of entry {seq}: entry_too_large")
    settle(conn, rejected=rejected)
    return len(rejected)


def _migrate(conn: Any, schema: relay_schema.RelaySchema, report: SyncReport) -> None:
    """Bring the local tables to ``schema`` (device_agent/schema_sync.py); raises
    :class:`SchemaBlocked` when something blocks it."""
    plan = schema_sync.apply_schema(conn, schema)
    report.schema_notes += plan.notes
    if plan.counters_changed:
        refresh_open_rows(conn, plan.counters_changed)


def _waiting_for(exc: DeviceAgentError) -> str:
    """What a watch retrying after ``exc`` waits for (the words of its event)."""
    if isinstance(exc, RelayUnreachable):
        return "offline"
    if isinstance(exc, MigrationWaits):
        return "waiting for local edits to be synced"
    return "waiting for the relay"


def _download(agent: Agent, report: SyncReport, wait_s: float) -> ApplyResult | None:
    """:meth:`Agent.download`.  While a message is staged, the next one is read by a
    helper thread (its cursor is the staged message's), so the relay's work and the
    network overlap the staging; the client is used by one thread at a time, and a
    message is only handled after the one before it is staged (module docstring)."""
    last: ApplyResult | None = None
    expected: int | None = None
    received = 0
    client = agent.client
    ahead = ThreadPoolExecutor(1, thread_name_prefix="fieldsync-read-ahead")
    try:
        msg = client.changes(agent.cursor(), agent.page_ops, wait_s)
        while True:
            if expected is None:
                expected = _expected_ops(msg)
            received += len(msg.get("ops") or ())
            if agent.progress is not None:
                agent.progress(received, expected)
            following: Future[dict[str, Any]] | None = None
            if not (msg.get("checkpoint") or {}).get("complete"):  # staged: read on
                following = ahead.submit(client.changes, str(msg["cursor"]), agent.page_ops, 0.0)
            try:
                result = agent.handle(msg, report)
            finally:
                if following is not None and not following.done():
                    wait_futures([following])  # the client is free again when this ends
            if result is not None:
                last = result
                if not msg.get("has_more"):
                    return last
            if following is not None:
                msg = following.result()
            else:
                msg = client.changes(agent.cursor(), agent.page_ops, 0.0)
    finally:
        ahead.shutdown(wait=True)


def _latest_per_seq(outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest outcome of each seq, in order (a page may hold conflict then resolved)."""
    latest: dict[int, dict[str, Any]] = {}
    for o in outcomes:
        if "seq" in o:
            latest.pop(int(o["seq"]), None)
            latest[int(o["seq"])] = o
    return list(latest.values())


def _expected_ops(msg: Mapping[str, Any]) -> int | None:
    """Rough number of ops a download from this message's cursor will bring (progress)."""
    buckets = (msg.get("checkpoint") or {}).get("buckets") or {}
    if not buckets:
        return None
    return sum(int(b.get("count", 0)) for b in buckets.values()) or None


# --------------------------------------------------------------------------- init


def init_database(
    db_path: str,
    relay_url: str,
    token: str,
    *,
    key: str | None = None,
    client: RelayClient | None = None,
) -> dict[str, Any]:
    """Create (or re-point) the device database: metadata, relay URL, token, schema."""
    device_id = token_subject(token)
    conn = local_db.connect(db_path, key)
    try:
        local_db.ensure_metadata(conn)
        previous = get_meta(conn, "device_id")
        if previous is not None and previous != device_id:
            raise StateError(
                f"{db_path} belongs to device {previous!r}, the token is for {device_id!r}; "
                "use another database file or device-agent reset"
            )
        own = client is None
        api = client or RelayClient(relay_url, token)
        try:
            schema = relay_schema.parse_schema(api.schema())
        finally:
            if own:
                api.close()
        with transaction(conn):
            set_meta(conn, "relay_url", relay_url.rstrip("/"))
            set_meta(conn, "token", token)
            set_meta(conn, "device_id", device_id)
        plan = schema_sync.apply_schema(conn, schema)
        return {
            "db": db_path,
            "relay": relay_url,
            "device_id": device_id,
            "tables": [t.local for t in schema.tables],
            "buckets": list(schema.buckets),
            "notes": plan.notes,
        }
    finally:
        conn.close()
