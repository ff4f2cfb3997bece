"""Running the relay: ``fieldsync relay run --config FILE``.

One process serves the device API (:mod:`relay.api`, under uvicorn, with the
journal endpoints of :mod:`relay.journal_api`) and runs the bucket engine
(:mod:`relay.bucket_engine`) and the outcome feed (``{prefix}._outcomes`` into the
store) in threads; of several relay processes sharing a store, one engine and one
feed lead and the others stand by, while all of them serve devices.
``--no-engine`` serves the API only.  The settings file may carry ``[journal]``
(upload limits, the captured database for conflict resolutions).

Start-up, in order: settings (relay/settings.py), the key store and revocation
list, the bucket store (migrated), the tables the rules are checked against
(the captured database's catalog when ``relay.source_dsn`` is set, else the
schemas published in ``{prefix}._schemas``, waited for up to
``schema_wait_s``), the rules, then the engine thread and the HTTP server.
Every configuration problem raises :class:`relay.errors.ConfigError` naming
the file or setting at fault.

Threads: the main thread runs uvicorn's event loop; the engine runs in one
thread; a small watcher thread re-reads ``auth.revoked_file`` when it changes
and swaps the authenticator's list (an atomic reference assignment).  SIGINT /
SIGTERM stop uvicorn (open long-polls and streams are closed), then the engine
is stopped and the store closed.  Under systemd (``Type=notify``) READY=1 is
sent once the socket listens.

Access logs never contain tokens: a ``token=`` query parameter (WebSocket
authentication) is masked by :class:`TokenRedactingFilter`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from cdc.errors import ConfigError as CdcConfigError
from cdc.systemd_notify import Notifier
from relay.api import ApiConfig, create_app
from relay.applier_settings import JournalSettings
from relay.auth import Authenticator, KeyStore, RevocationList
from relay.bucket_engine import (
    BucketEngine,
    SchemaLog,
    table_infos_from_catalog,
    table_infos_from_registry,
)
from relay.errors import ConfigError, RelayError
from relay.journal_api import RELAY_FILE_REGISTRY, JournalApi, RelayFileSettings, load_relay_file
from relay.merge import Policy, load_conflicts
from relay.pg_bucket_store import PgBucketStore
from relay.rules import Rules, TableInfo, check_rules_file, load_rules
from relay.settings import RelaySettings

log = logging.getLogger("relay.server")

REVOKED_POLL_S = 5.0
SCHEMA_WAIT_S = 60.0

_TOKEN_QUERY = re.compile(r"(?i)(\btoken=)[^&\s\"]*")


class TokenRedactingFilter(logging.Filter):
    """Masks ``token=...`` in log records (uvicorn's access log prints query strings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_QUERY.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args
            )
        if isinstance(record.msg, str) and "token=" in record.msg.lower():
            record.msg = _TOKEN_QUERY.sub(r"\1***", record.msg)
        return True


def api_config(settings: RelaySettings, conflicts: str | None = None) -> ApiConfig:
    """The device API's limits from ``[http]``; the counter columns from the conflicts
    file (``[journal] conflicts``), which ``/v1/schema`` tells devices."""
    h = settings.http
    return ApiConfig(
        counters=counter_columns(conflicts),
        max_body_bytes=h.max_body_bytes,
        max_page_ops=h.max_page_ops,
        default_page_ops=min(1000, h.max_page_ops),
        long_poll_s=h.long_poll_s,
        rate_per_s=h.rate_per_s,
        rate_burst=h.rate_burst,
        max_connections=h.max_connections,
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


def load_settings(path: str | Path | None) -> RelayFileSettings:
    """The relay's settings file: ``[relay]``, ``[http]``, ``[auth]`` and ``[journal]``."""
    try:
        return load_relay_file(path)
    except CdcConfigError as exc:
        raise ConfigError(str(exc)) from exc


def build_authenticator(settings: RelaySettings) -> Authenticator:
    a = settings.auth
    keys = KeyStore.from_file(a.keys_file)
    revoked = RevocationList.from_file(a.revoked_file) if a.revoked_file else None
    return Authenticator(
        keys, audience=a.audience, issuer=a.issuer, leeway_s=a.leeway_s, revoked=revoked
    )


def rule_tables(rules_path: str) -> set[str]:
    """The tables a rules file names (structure check only)."""
    return {t for b in check_rules_file(rules_path) for t in b.tables}


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


def load_bound_rules(settings: RelaySettings) -> Rules:
    infos = load_table_infos(settings, rule_tables(settings.relay.rules))
    return load_rules(settings.relay.rules, infos)


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
            except RelayError as exc:
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
    journal: JournalSettings | None = None

    def run(self, on_ready: Callable[[str, int], None] | None = None) -> None:
        s = self.settings
        journal_settings = self.journal or RELAY_FILE_REGISTRY.defaults().journal
        authenticator = build_authenticator(s)
        store = PgBucketStore(
            s.relay.store_dsn, group=s.relay.consumer_group, password=s.relay.store_password
        )
        journal: JournalApi | None = None
        try:
            store.migrate()
            rules = load_bound_rules(s)
            journal = JournalApi.from_settings(
                RelayFileSettings(s.relay, s.http, s.auth, journal_settings), rules
            )
            app = create_app(
                store, rules, authenticator, api_config(s, journal_settings.conflicts), journal
            )
            with (
                self._engine(store, rules),
                journal.feed.running() if journal.feed and self.run_engine else nullcontext(),
                revocation_watcher(authenticator, s.auth.revoked_file),
            ):
                self._serve(app, on_ready)
        finally:
            if journal is not None:
                journal.close()
            store.close()

    @contextlib.contextmanager
    def _engine(self, store: PgBucketStore, rules: Rules) -> Iterator[None]:
        if not self.run_engine:
            yield
            return
        r = self.settings.relay
        engine = BucketEngine(
            store,
            rules,
            kafka=self.settings.kafka_client_kwargs(),
            prefix=r.topic_prefix,
            batch_max_events=r.batch_max_events,
            batch_max_ms=r.batch_max_ms,
            compact_interval_s=r.compact_interval_s,
        )

        def target() -> None:
            try:
                engine.run()
            except Exception:
                log.exception("bucket engine stopped with an error")

        thread = threading.Thread(target=target, name="relay-engine", daemon=True)
        thread.start()
        try:
            yield
        finally:
            engine.request_stop()
            thread.join(30)
            if thread.is_alive():
                log.warning("bucket engine did not stop within 30 s")
            engine.close()

    def _serve(self, app: Any, on_ready: Callable[[str, int], None] | None) -> None:
        h = self.settings.http
        config = uvicorn.Config(
            app,
            host=h.host,
            port=h.port,
            log_level=self.settings.relay.log_level.lower(),
            ws_ping_interval=h.ws_ping_s or None,
            ws_ping_timeout=h.ws_ping_s or None,
            ws_max_size=h.max_body_bytes,
            backlog=min(4096, max(128, h.max_connections)),
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        server = _Server(config, on_ready)
        logging.getLogger("uvicorn.access").addFilter(TokenRedactingFilter())
        server.run()


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
    loaded = load_settings(config_path)
    settings = loaded.relay_settings()
    logging.basicConfig(
        level=settings.relay.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log.info("relay settings: %s", RELAY_FILE_REGISTRY.redact(loaded))
    RelayServer(settings, run_engine, loaded.journal).run()
