"""Prometheus metrics: one exposition endpoint per long-running process.

Every server process (``fieldsync cdc run``, ``fieldsync relay run``, ``fieldsync relay
applier``) defines its metrics with :mod:`prometheus_client` in its own module
(``cdc/metrics.py``, ``relay/metrics.py``, ``relay/upstream/applier_metrics.py``) and
serves them with :func:`serve_metrics` on the address its settings name
(``metrics_listen``; docs/operations.md lists every metric).

Conventions (Prometheus'): names start with ``fieldsync_<component>_``; counters end in
``_total``, durations are ``_seconds``, sizes ``_bytes``; labels have bounded values
(table names, partitions, reasons, statuses; never a device id or a key).

The endpoint is a small threaded HTTP server in a daemon thread:

- ``GET /metrics``: the text exposition format of the process's registry;
- ``GET /readyz`` (when the process gives a ``ready`` check): 200 with
  ``{"ready": true, ...}`` or 503 with the reasons, as JSON.

A port that cannot be bound is a :class:`core.errors.ConfigError` naming the setting; the
caller decides whether to go on without metrics (the data path never depends on them):
:func:`serve_or_log` logs it as an ERROR and goes on, as every server process does.
:func:`new_registry` makes a process's registry with the standard collectors.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from core.errors import ConfigError

log = logging.getLogger("fieldsync.metrics")

ReadyCheck = Callable[[], tuple[bool, Mapping[str, Any]]]
"""Returns (ready, details); details are shown as JSON (reasons when not ready)."""


def parse_listen(value: str, setting: str = "metrics_listen") -> tuple[str, int] | None:
    """``"host:port"`` as a bind address; ``""`` means off (None).  Raises ValueError."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{setting}: {value!r} is not host:port (e.g. 127.0.0.1:9187)")
    return host.strip("[]") or "0.0.0.0", int(port)


def check_listen(value: str) -> None:
    """A settings-registry check for a ``metrics_listen`` value."""
    parse_listen(value)


class MetricsServer:
    """The exposition endpoint of one process; :meth:`close` stops it."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: CollectorRegistry = REGISTRY,
        ready: ReadyCheck | None = None,
        setting: str = "metrics_listen",
    ) -> None:
        handler = _handler(registry, ready)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot listen on {host}:{port}: {exc}") from exc
        self._server.daemon_threads = True
        self.address: tuple[str, int] = self._server.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_metrics(
    listen: str,
    *,
    registry: CollectorRegistry = REGISTRY,
    ready: ReadyCheck | None = None,
    setting: str = "metrics_listen",
) -> MetricsServer | None:
    """Serve ``/metrics`` (and ``/readyz``) on ``listen`` (``host:port``); None when ``""``."""
    try:
        address = parse_listen(listen, setting)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if address is None:
        return None
    server = MetricsServer(*address, registry=registry, ready=ready, setting=setting)
    log.info("metrics on %s/metrics", server.url)
    return server


def serve_or_log(
    listen: str,
    *,
    registry: CollectorRegistry,
    setting: str,
    ready: ReadyCheck | None = None,
) -> MetricsServer | None:
    """:func:`serve_metrics`, except that an address that cannot be bound (or is not
    ``host:port``) is logged as an ERROR naming ``setting`` and the process goes on without
    metrics (None)."""
    try:
        return serve_metrics(listen, registry=registry, ready=ready, setting=setting)
    except ConfigError as exc:
        log.error("%s; going on without metrics", exc)
        return None


def new_registry() -> CollectorRegistry:
    """A process's registry with the standard process, platform and GC collectors."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _handler(registry: CollectorRegistry, ready: ReadyCheck | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/readyz" and ready is not None:
                ok, details = _run_check(ready)
                body = json.dumps({"ready": ok, **details}, default=str).encode()
                self._send(200 if ok else 503, "application/json", body)
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


def _run_check(ready: ReadyCheck) -> tuple[bool, Mapping[str, Any]]:
    try:
        return ready()
    except Exception as exc:  # a failing check is "not ready", with its reason
        return False, {"error": f"{type(exc).__name__}: {exc}"}
