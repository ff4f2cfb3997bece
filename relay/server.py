"""Running the relay: ``fieldsync relay run --config FILE``.

One process serves the device API (:mod:`relay.downstream.api`, under uvicorn, with the
journal endpoints of :mod:`relay.upstream.journal_api`) and runs the bucket engine
(:mod:`relay.downstream.bucket_engine`) and the outcome feed (``{prefix}._outcomes`` into the
store) in threads; of several relay processes sharing a store, one engine and one
feed lead and the others stand by, while all of them serve devices.
``--no-engine`` serves the API only.  The settings file may carry ``[journal]``
(upload limits, the captured database for conflict resolutions).

Start-up, in order: settings (relay/settings.py), the key store and revocation
list, the metrics endpoint (``relay.metrics_listen``, relay/metrics.py; a port that
cannot be bound is logged and the relay runs on without it), the bucket store
(migrated), the tables the rules are checked against (the captured database's catalog
when ``relay.source_dsn`` is set, else the schemas published in ``{prefix}._schemas``,
waited for up to ``schema_wait_s``), the rules, then the engine thread and the HTTP
server, which also serves ``GET /readyz`` (relay/readiness.py).
Every configuration problem raises :class:`relay.errors.ConfigError` naming
the file or setting at fault.

Threads: the main thread runs uvicorn's event loop; the engine runs in one
thread; a small watcher thread re-reads ``auth.revoked_file`` when it changes
and swaps the authenticator's list (an atomic reference assignment); the metrics
endpoint answers in a thread of its own (core/metrics.py).  SIGINT /
SIGTERM stop uvicorn (open long-polls and streams are closed), then the engine
is stopped and the store closed.  Under systemd (``Type=notify``) READY=1 is
sent once the socket listens.

Connections are guarded below the app by :class:`GuardedH11Protocol` (uvicorn's HTTP/1.1
protocol): every open socket counts against ``http.max_connections``, request heads have
a deadline (``http.header_timeout_s``) however slowly they trickle in, and malformed or
oversized heads are answered in the error shape (:func:`uvicorn_config`).

Logs: :func:`core.logs.setup_logging` in ``relay.log_format`` (component ``relay``);
uvicorn's own loggers (access lines, WebSocket handshakes) go through the same handler
(:func:`uvicorn_config` installs no logging configuration of its own), so they have the
same format and never contain tokens or passwords (:mod:`core.redaction`; the values of
the secret settings and the HS256 key secrets are masked literally as well).  Each
request has an id and, once authenticated, a device in its log context
(relay/downstream/api_context.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from core.errors import FieldsyncError
from core.logs import hold_early_records, setup_logging
from core.metrics import serve_or_log
from core.redaction import RedactingFilter, hide_secrets
from core.systemd_notify import Notifier
from relay.api_errors import error_body
from relay.auth import Authenticator, RevocationList
from relay.auth_keys import KeyStore
from relay.config_file import read_toml
from relay.downstream.api import create_app
from relay.downstream.api_sync import ApiConfig
from relay.downstream.bucket_engine import BucketEngine, SchemaLog
from relay.downstream.columns_guard import ColumnsGuard, ask_follower
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.rules import Rules, TableInfo
from relay.downstream.rules_parser import rules_from_mapping, rules_tables
from relay.downstream.rules_placement import placement_text
from relay.downstream.source_rows import PgSourceRows
from relay.downstream.table_follower import TableFollower, table_follower
from relay.downstream.table_infos import table_infos_from_catalog, table_infos_from_registry
from relay.errors import ConfigError, RulesError
from relay.metrics import ENGINE_LAG, REGISTRY
from relay.readiness import BrokerProbe, EngineStatus, Readiness
from relay.settings import HttpSettings, RelaySettings, load_relay_settings
from relay.upstream.conflict_policies import Policy, load_conflicts
from relay.upstream.journal_api import JournalApi
from relay.ws_protocol import CompactWebSocketProtocol

log = logging.getLogger("relay.server")

REVOKED_POLL_S = 5.0
SCHEMA_WAIT_S = 60.0


def api_config(settings: RelaySettings, conflicts: str | None = None) -> ApiConfig:
    """The device API's limits from ``[http]``; the counter columns from the conflicts
    file (``[journal] conflicts``), which ``/v1/schema`` tells devices."""
    h = settings.http
    return ApiConfig(
        counters=counter_columns(conflicts),
        max_body_bytes=h.max_body_bytes,
        max_page_ops=h.max_page_ops,
        max_page_bytes=h.max_page_bytes,
        default_page_ops=min(1000, h.max_page_ops),
        long_poll_s=h.long_poll_s,
        rate_per_s=h.rate_per_s,
        rate_burst=h.rate_burst,
        max_connections=h.max_connections,
        body_timeout_s=h.body_timeout_s,
    )


def _raw_error(status: int, code: str, message: str, headers: dict[str, str]) -> bytes:
    """A whole HTTP/1.1 error response in the one error shape, for the protocol level
    (before a request exists, so before the ASGI app and its handlers)."""
    body = orjson.dumps(error_body(status, code, message))
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json"]
    head += [f"{k}: {v}" for k, v in {**headers, "connection": "close"}.items()]
    head.append(f"content-length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the limits a request cannot enforce because it
    does not exist yet:

    - **connections**: at most :attr:`max_connections` open sockets per process, counting
      every one uvicorn holds (requests in progress, idle kept-alive connections,
      WebSockets, and connections that have not sent a whole request head).  Past it, a
      new connection gets 503 ``unavailable`` and is closed before anything is read.
    - **header time**: a request's line and headers must be complete within
      :attr:`header_timeout_s` of connecting (or of the previous response), however
      slowly they trickle in (uvicorn's keep-alive timer restarts on every byte); later:
      408 ``request_timeout`` and the connection is closed (closed quietly if nothing at
      all came).
    - **invalid or oversized heads** (``h11_max_incomplete_event_size``): 400
      ``bad_request`` in the error shape, not uvicorn's plain text.

    The body's deadline is the app's (:class:`relay.downstream.api.LimitsMiddleware`).  Runs on the
    event loop like every uvicorn protocol.  Configure with :meth:`configured`.
    """

    max_connections: int = 10_000
    header_timeout_s: float = 10.0

    @classmethod
    def configured(cls, max_connections: int, header_timeout_s: float) -> type[GuardedH11Protocol]:
        return type(
            "GuardedH11Protocol",
            (cls,),
            {"max_connections": max_connections, "header_timeout_s": header_timeout_s},
        )

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_scope: object = None
        self._head_bytes = 0  # received since the deadline was armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self._refused = True
            self.transport = transport
            log.warning(
                "refusing a connection: %d connections open (http.max_connections)",
                len(self.connections),
            )
            transport.write(
                _raw_error(
                    503,
                    "unavailable",
                    f"the relay holds its maximum of {self.max_connections} connections; "
                    "retry later",
                    {"retry-after": "5"},
                )
            )
            transport.close()
            return
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        if self._refused:
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._head_bytes += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.scope is not self._head_scope:  # a new request's head arrived
            self._head_scope = self.scope
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        answered = self.scope
        super().on_response_complete()  # may start a pipelined request at once
        if not self.transport.is_closing() and self.scope is answered:
            self._arm_head_timer()  # the next request's head has its own deadline

    def send_400_response(self, msg: str) -> None:
        self._disarm_head_timer()
        log.info("invalid HTTP request from %s: %s", self.client, msg)
        if not self.transport.is_closing():
            self.transport.write(
                _raw_error(
                    400,
                    "bad_request",
                    "invalid HTTP request (malformed, or a request line and headers larger "
                    "than the relay accepts)",
                    {},
                )
            )
            self.transport.close()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._head_bytes:  # idle: closed quietly, as by the keep-alive timer
            self.transport.close()
            return
        log.info(
            "closing the connection of %s: no complete request head within %g s",
            self.client,
            self.header_timeout_s,
        )
        self.transport.write(
            _raw_error(
                408,
                "request_timeout",
                f"the request line and headers did not arrive within {self.header_timeout_s:g} s",
                {},
            )
        )
        self.transport.close()


def uvicorn_config(app: Any, http: HttpSettings, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's configuration for the device API under ``[http]``'s limits."""
    return uvicorn.Config(
        app,
        host=http.host,
        port=http.port,
        log_level=log_level,
        log_config=None,  # uvicorn's loggers propagate to the process's one handler
        http=GuardedH11Protocol.configured(http.max_connections, http.header_timeout_s),
        timeout_keep_alive=http.keep_alive_s,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=http.max_header_bytes,
        ws_ping_interval=http.ws_ping_s or None,
        ws_ping_timeout=http.ws_ping_s or None,
        ws_max_size=http.max_body_bytes,
        ws=CompactWebSocketProtocol,
        backlog=min(4096, max(128, http.max_connections)),
        timeout_graceful_shutdown=5,
        server_header=False,
    )


def counter_columns(conflicts: str | None) -> dict[str, tuple[str, ...]]:
    """Per table, the columns with policy ``counter`` in the conflicts file (none unset);
    a bad file raises :class:`ConfigError` naming every problem."""
    if conflicts is None:
        return {}
    policies = load_conflicts(conflicts)  # ConflictsError is a ConfigError
    return {
        t.table: tuple(c for c, p in t.columns.items() if p.policy is Policy.COUNTER)
        for t in policies.tables.values()
    }


def load_settings(path: str | Path | None) -> RelaySettings:
    """The relay's settings file: ``[relay]``, ``[http]``, ``[auth]`` and ``[journal]``."""
    return load_relay_settings(path)


def build_authenticator(settings: RelaySettings) -> Authenticator:
    a = settings.auth
    keys = KeyStore.from_file(a.keys_file)
    hide_secrets(k.verify_key for k in map(keys.get, keys.kids) if k and k.alg == "HS256")
    revoked = RevocationList.from_file(a.revoked_file) if a.revoked_file else None
    return Authenticator(
        keys, audience=a.audience, issuer=a.issuer, leeway_s=a.leeway_s, revoked=revoked
    )


def load_table_infos(
    settings: RelaySettings, wanted: set[str], wait_s: float = SCHEMA_WAIT_S
) -> dict[str, TableInfo]:
    """Columns and keys of the tables: from ``source_dsn``'s catalog, else ``{prefix}._schemas``."""
    r = settings.relay
    if r.source_dsn:
        return table_infos_from_catalog(r.source_dsn, r.source_password)
    schemas = SchemaLog(settings.kafka_client_kwargs(), r.topic_prefix)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            schemas.refresh()
            infos = table_infos_from_registry(schemas.registry)
            missing = wanted - set(infos)
            if not missing:
                return infos
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"{r.rules}: table(s) {', '.join(sorted(missing))} have no schema in "
                    f"{schemas.topic} yet (cdc publishes one with a table's first event); "
                    "start cdc first or set relay.source_dsn to read the catalog instead"
                )
            log.info("waiting for schemas of %s in %s", ", ".join(sorted(missing)), schemas.topic)
            time.sleep(2.0)
    finally:
        schemas.close()


def load_bound_rules(settings: RelaySettings) -> tuple[Rules, dict[str, Any]]:
    """The rules bound to the tables' definitions, and the rules file's content (bound
    again by :func:`~relay.downstream.table_follower.table_follower` when a definition
    changes)."""
    path = settings.relay.rules
    document = read_toml(path, RulesError)
    infos = load_table_infos(settings, rules_tables(document, str(path)))
    return rules_from_mapping(document, infos, str(path)), document


def bind_store_rules(store: PgBucketStore, rules: Rules, topic_prefix: str) -> None:
    """Refuse a store built under rules that place the rows it holds differently
    (StoreRulesMismatch, a ConfigError); else record the rules' placement."""
    verdict = store.bind_rules(placement_text(rules), rules.source, topic_prefix)
    if verdict == "recorded":
        log.info("bucket store: built under the placement of %s from now on", rules.source)
    elif verdict == "adopted":
        log.warning(
            "bucket store: it recorded no rules yet; taking those of %s as the ones it was "
            "built with (rebuild it if they changed since: docs/operations.md)",
            rules.source,
        )


@contextlib.contextmanager
def revocation_watcher(
    authenticator: Authenticator, path: str | None, poll_s: float = REVOKED_POLL_S
) -> Iterator[None]:
    """Re-read the revocation file when its modification time or size changes and then
    stays the same for one poll interval (so a file caught half written is not loaded)."""
    if not path:
        yield
        return
    stop = threading.Event()

    def mtime() -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    # read the starting state before the thread starts: a change made right after start-up
    # must be seen as a change, not taken as the starting state
    seen = mtime()

    def run() -> None:
        nonlocal seen
        settling: tuple[int, int] | None = None
        while not stop.wait(poll_s):
            now = mtime()
            if now == seen:
                settling = None
                continue
            if now != settling:
                # changed since the last poll: it may be half written (an editor or a
                # shell redirect truncates first, and an empty file would revoke nobody);
                # reload once it stays the same for a whole poll interval
                settling = now
                continue
            seen, settling = now, None
            try:
                authenticator.revoked = RevocationList.from_file(path)
                log.info("revocation list reloaded: %d device(s)", len(authenticator.revoked))
            except FieldsyncError as exc:
                log.error("revocation list not reloaded, keeping the old one: %s", exc)

    thread = threading.Thread(target=run, name="relay-revocations", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(poll_s + 1)


@dataclass
class RelayServer:
    """A configured relay process; :meth:`run` blocks until a signal stops it."""

    settings: RelaySettings
    run_engine: bool = True

    def run(self, on_ready: Callable[[str, int], None] | None = None) -> None:
        s = self.settings
        authenticator = build_authenticator(s)
        metrics = serve_or_log(
            s.relay.metrics_listen, registry=REGISTRY, setting="relay.metrics_listen"
        )
        store = PgBucketStore(
            s.relay.store_dsn, group=s.relay.consumer_group, password=s.relay.store_password
        )
        journal: JournalApi | None = None
        probe = BrokerProbe(s.kafka_client_kwargs())
        try:
            store.migrate()
            rules, document = load_bound_rules(s)
            bind_store_rules(store, rules, s.relay.topic_prefix)
            journal = JournalApi.from_settings(s, rules)
            app = create_app(
                store, rules, authenticator, api_config(s, s.journal.conflicts), journal
            )
            api, intake = app.state.api, journal

            def rebind(new: Rules) -> None:  # called once the block below has begun
                api.rules = new
                intake.use_rules(new)
                if engine is not None:  # its next batch projects rows by the new rules
                    engine.rules = new

            followers: list[TableFollower] = []
            guard = ask_follower(followers)

            with (
                self._engine(store, rules, guard) as engine,
                table_follower(s, rules, document, rebind) as follower,
                journal.feed.running() if journal.feed and self.run_engine else nullcontext(),
                revocation_watcher(authenticator, s.auth.revoked_file),
            ):
                followers.append(follower)
                ready = Readiness(
                    store, probe, lambda: engine_status(engine), s.relay.ready_max_lag_s
                )
                app.include_router(ready.router())
                self._serve(app, on_ready)
        finally:
            if journal is not None:
                journal.close()
            probe.close()
            store.close()
            if metrics is not None:
                metrics.close()

    @contextlib.contextmanager
    def _engine(
        self,
        store: PgBucketStore,
        rules: Rules,
        guard: Callable[[str, tuple[str, ...]], str | None],
    ) -> Iterator[BucketEngine | None]:
        """The engine running in a thread (None with ``--no-engine``); its lag is what
        ``fieldsync_relay_engine_lag_*`` report."""
        if not self.run_engine:
            yield None
            return
        r = self.settings.relay
        source = PgSourceRows(r.source_dsn, r.source_password) if r.source_dsn else None
        if source is None:
            log.warning(
                "relay.source_dsn is not set: a change lacking an unchanged TOAST value the "
                "bucket store holds no copy of (a row entering a bucket) cannot be placed "
                'and is skipped with an error (docs/relay.md, "Placing a change")'
            )
        engine = BucketEngine(
            store,
            rules,
            kafka=self.settings.kafka_client_kwargs(),
            prefix=r.topic_prefix,
            batch_max_events=r.batch_max_events,
            batch_max_ms=r.batch_max_ms,
            compact_interval_s=r.compact_interval_s,
            shares=r.engine_shares,
            share=self.settings.engine_share(),
            source_rows=source,
        )
        engine.columns_guard = ColumnsGuard(guard)

        def target() -> None:
            try:
                engine.run()
            except Exception:
                log.exception("bucket engine stopped with an error")

        thread = threading.Thread(target=target, name="relay-engine", daemon=True)
        thread.start()
        ENGINE_LAG.source = engine.lag
        try:
            yield engine
        finally:
            ENGINE_LAG.source = None
            engine.request_stop()
            thread.join(30)
            if thread.is_alive():
                log.warning("bucket engine did not stop within 30 s")
            engine.close()
            if source is not None:
                source.close()

    def _serve(self, app: Any, on_ready: Callable[[str, int], None] | None) -> None:
        config = uvicorn_config(app, self.settings.http, self.settings.relay.log_level.lower())
        server = _Server(config, on_ready)
        for name in ("uvicorn.access", "uvicorn.error"):  # also when embedded, not via run()
            logger = logging.getLogger(name)
            if not any(isinstance(f, RedactingFilter) for f in logger.filters):
                logger.addFilter(RedactingFilter())
        server.run()


def engine_status(engine: BucketEngine | None) -> EngineStatus:
    """What ``/readyz`` says of this process's engine: off, standing by, or leading and
    how far behind."""
    if engine is None:
        return ("off", None)
    if not engine.leading.is_set():
        return ("standby", None)
    return ("leading", engine.lag.seconds())


GC_THRESHOLDS: tuple[int, int, int] = (50_000, 20, 10)
"""The cyclic collector's thresholds in the serving process (Python's: 700, 10, 10)."""


def tune_collector() -> None:
    """Once the server listens: everything built so far (modules, app, rules) lives as long
    as the process, so it is frozen out of the collector's passes; and the youngest
    generation is collected after 50,000 net allocations, not 700.  A fan-out to 10,000
    streams keeps ~20 objects a stream alive while their pages are read and sent: with
    Python's thresholds they were promoted, and the oldest generation (every stream's
    objects, ~2 million at 10,000 streams) was walked about every other commit, ~1 s each
    time; now its passes are rare.  The cost: up to 50,000 more young objects (a few MB)
    before cyclic garbage is found."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class _Server(uvicorn.Server):
    """uvicorn's server, telling systemd (and ``on_ready``) once it listens."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str, int], None] | None) -> None:
        super().__init__(config)
        self._on_ready = on_ready

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured signal after shutting down, which would kill the
        # process before the engine is stopped and the store closed: stop normally instead.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        tune_collector()
        host, port = self.config.host, self.config.port
        for srv in getattr(self, "servers", []):
            for sock in srv.sockets:
                name = sock.getsockname()
                host, port = str(name[0]), int(name[1])
                break
        log.info("device API listening on http://%s:%d", host, port)
        with Notifier.from_env() as notifier:
            notifier.ready(f"device API on {host}:{port}")
        if self._on_ready is not None:
            self._on_ready(host, port)


def run(config_path: str | Path | None, run_engine: bool = True) -> None:
    """Load settings and run the relay until SIGINT/SIGTERM."""
    with hold_early_records() as early:  # settings-file warnings, in the chosen format
        settings = load_settings(config_path)
    hide_secrets(settings.secrets())
    setup_logging(settings.relay.log_level, settings.relay.log_format, "relay", early=early)
    log.info("relay settings: %s", settings.redacted())
    RelayServer(settings, run_engine).run()
