"""Shared helpers for cdc integration tests (not a plugin: imported by tests)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from cdc.pipeline import CdcDaemon
from cdc.settings import CdcSettings, load_cdc_settings
from core.avro_envelope import POSITION_HEADER, decode, parse_position_header
from devtools.cdc_demo import read_schemas
from tests.fix_kafka import read_topic


def make_settings(pg_dsn: str, bootstrap: str, prefix: str, **env: str) -> CdcSettings:
    environ = {
        "FIELDSYNC_POSTGRES_DSN": pg_dsn,
        "FIELDSYNC_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "FIELDSYNC_KAFKA_TOPIC_PREFIX": prefix,
        "FIELDSYNC_KAFKA_TIMEOUT_S": "10",
        "FIELDSYNC_CDC_RETRY_BACKOFF_INITIAL_S": "0.2",
        "FIELDSYNC_CDC_RETRY_BACKOFF_MAX_S": "2",
        "FIELDSYNC_POSTGRES_STATUS_INTERVAL_S": "1",
    }
    environ.update({f"FIELDSYNC_{k.upper()}": v for k, v in env.items()})
    return load_cdc_settings(None, environ)


@contextlib.contextmanager
def running_daemon(settings: CdcSettings, **kw: Any) -> Iterator[CdcDaemon]:
    daemon = CdcDaemon(settings, **kw)
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(daemon.run())
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    try:
        assert daemon.ready.wait(60), "cdc daemon did not become ready"
        yield daemon
    finally:
        daemon.request_stop()
        t.join(30)
        assert not t.is_alive(), "cdc daemon did not stop within 30 s"
        if result and isinstance(result[0], BaseException):
            raise result[0]


def table_events(
    bootstrap: str,
    prefix: str,
    table: str,
    expect: int | None = None,
    timeout: float = 20.0,
    schema: str = "public",
) -> list[dict[str, Any]]:
    """Decoded events of a table topic, each with ``_pos`` (commit_lsn, seq) from the header."""
    topic = f"{prefix}.{schema}.{table}"
    deadline = time.monotonic() + timeout
    records: list[Any] = []
    while time.monotonic() < deadline:
        records = read_topic(bootstrap, topic, timeout=max(1.0, deadline - time.monotonic()))
        if expect is None or len(records) >= expect:
            break
        time.sleep(0.3)
    registry = read_schemas(bootstrap, prefix)
    # read_schemas gives up after its own deadline: on a busy machine it may return before
    # the schemas the records name; read it again until it holds them (or fail decoding)
    fingerprints = {bytes(r.value[2:10]) for r in records}
    fingerprints |= {bytes(r.key[2:10]) for r in records if r.key}
    schemas_deadline = time.monotonic() + max(30.0, timeout)
    while any(fp not in registry for fp in fingerprints) and time.monotonic() < schemas_deadline:
        time.sleep(0.3)
        registry = read_schemas(bootstrap, prefix)
    out = []
    for r in records:
        value = decode(r.value, registry)
        headers = dict(r.headers)
        value["_pos"] = parse_position_header(headers[POSITION_HEADER])
        value["_key"] = decode(r.key, registry) if r.key else None
        value["_offset"], value["_ts_ms"] = r.offset, r.timestamp
        out.append(value)
    return out


def wait_for(
    predicate: Any, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")
