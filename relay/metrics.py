"""The relay's Prometheus metrics (``fieldsync relay run``), and the consumer-lag bookkeeping
the relay's engine and the upstream applier share.

Every metric lives in :data:`REGISTRY` (the relay process's own registry, with the
standard ``process_*`` and ``python_*`` collectors: :func:`core.metrics.new_registry`),
served on ``[relay] metrics_listen`` by :func:`core.metrics.serve_or_log`.  docs/operations.md lists them:

- ``fieldsync_relay_streams`` / ``fieldsync_relay_long_polls`` (gauges): open WebSocket
  streams, long-polls waiting for a change (relay/downstream/api_stream.py, api_sync.py);
- ``fieldsync_relay_ops_written_total`` (engine → store) and
  ``fieldsync_relay_ops_served_total`` (ops sent to devices);
- ``fieldsync_relay_engine_lag_records{topic,partition}`` and
  ``fieldsync_relay_engine_lag_seconds``: read from the leading engine's
  :class:`ConsumerLag` when scraped (:class:`LagCollector`);
- ``fieldsync_relay_store_seconds{operation}``: bucket store calls (:data:`STORE_OPERATIONS`);
- ``fieldsync_relay_auth_failures_total{reason}`` (the AuthError code),
  ``fieldsync_relay_rate_limited_total``, ``fieldsync_relay_journal_entries_total{status}``;
- ``fieldsync_relay_table_definitions_total{result}``: changed table definitions the table
  follower read (relay/downstream/table_follower.py);
- ``fieldsync_relay_toast_fills_total{result}``: changes lacking unchanged TOAST values
  the store held no copy of, by how they were filled (relay/downstream/unchanged_fill.py).

Instrumentation stays thin: a counter increment or a timer context where the thing
happens; nothing is measured per change except by the batch.

:class:`ConsumerLag` is how far a consumer of Kafka partitions (the bucket engine, the
applier) is behind: its loop tells it what it took, applied and found at the end; a
scrape reads it.  Lag in records is each partition's end offset minus the next offset to
apply (end offsets are fetched by the consumer's reader while it polls anyway: when idle,
and every few seconds while busy).  Lag in seconds is now minus the event time (commit
time of a change, intake time of a journal entry) of the last applied record, or of the
first waiting one right after the consumer was at the end; 0 at the end of every
partition.

:func:`read_connections` is the other side, for ``fieldsync status``: it scrapes a relay's
endpoint for its open streams and waiting long-polls (the relay knows its devices'
connections in memory only).

Concurrency: prometheus-client's metrics are thread-safe; a :class:`ConsumerLag` is
updated by its consumer's threads and read by the scrape thread under one lock (every
call touches only the partitions it names).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Final

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.metrics import new_registry, parse_listen
from relay.errors import MetricsUnavailable

__all__ = [
    "AUTH_FAILURES",
    "ENGINE_LAG",
    "JOURNAL_ENTRIES",
    "LONG_POLLS",
    "OPS_SERVED",
    "OPS_WRITTEN",
    "RATE_LIMITED",
    "REGISTRY",
    "STORE_OPERATIONS",
    "STORE_SECONDS",
    "STREAMS",
    "TOAST_FILLS",
    "TOAST_FILL_RESULTS",
    "Connections",
    "ConsumerLag",
    "LagCollector",
    "Partition",
    "local_metrics_url",
    "read_connections",
]

Partition = tuple[str, int]
"""A Kafka partition: (topic, partition number)."""


# --------------------------------------------------------------------------- reading an endpoint


@dataclasses.dataclass(frozen=True, slots=True)
class Connections:
    """What one relay process serves now: open WebSocket streams, waiting long-polls."""

    url: str
    streams: int
    long_polls: int


def local_metrics_url(listen: str) -> str | None:
    """The URL to scrape, from this machine, a process that listens on ``listen``
    (``metrics_listen``); None when metrics are off or the port is chosen at start (0).
    An any-address (``0.0.0.0``, ``::``) is reached on the loopback address."""
    address = parse_listen(listen)
    if address is None or address[1] == 0:
        return None
    host, port = address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def read_connections(url: str, timeout_s: float = 10.0) -> Connections:
    """Scrape ``url`` (a relay's metrics endpoint: ``http://host:port`` or its
    ``/metrics``) for ``fieldsync_relay_streams`` and ``fieldsync_relay_long_polls``.
    Raises :class:`MetricsUnavailable` naming the URL."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    base = url.rstrip("/")
    target = base if base.endswith("/metrics") else base + "/metrics"
    try:
        with urllib.request.urlopen(target, timeout=timeout_s) as answer:
            text = answer.read().decode("utf-8")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MetricsUnavailable(f"cannot read the relay's metrics at {target}: {exc}") from exc
    found: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in ("fieldsync_relay_streams", "fieldsync_relay_long_polls"):
                    found[sample.name] = sample.value
    except ValueError as exc:
        raise MetricsUnavailable(f"{target} is not a Prometheus exposition: {exc}") from exc
    if len(found) < 2:
        raise MetricsUnavailable(
            f"{target} has no fieldsync_relay_streams / fieldsync_relay_long_polls: "
            "is it a relay's metrics endpoint ([relay] metrics_listen)?"
        )
    return Connections(
        target,
        int(found["fieldsync_relay_streams"]),
        int(found["fieldsync_relay_long_polls"]),
    )


# --------------------------------------------------------------------------- consumer lag


class ConsumerLag:
    """How far a consumer of Kafka partitions is behind (see the module docstring).

    Samples exist only while :attr:`active` (the consumer leads): a standby process
    reports none."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ends: dict[Partition, int] = {}
        self._applied: dict[Partition, int] = {}
        self._since: float | None = None  # event time (epoch s) the lag is counted from
        self.active = False

    def start(self, applied: Mapping[Partition, int]) -> None:
        """The consumer leads, from these next offsets (stored ones)."""
        with self._lock:
            self._ends, self._applied, self._since = {}, dict(applied), None
            self.active = True

    def stop(self) -> None:
        """The consumer no longer leads: no samples until :meth:`start`."""
        self.active = False

    def saw_ends(self, ends: Mapping[Partition, int]) -> None:
        """End offsets its reader fetched."""
        with self._lock:
            self._ends.update(ends)

    def received(self, first_event_s: float | None) -> None:
        """Records were taken to be applied; ``first_event_s`` is the oldest one's event
        time (None: unknown, counted from now)."""
        with self._lock:
            if self._since is None:
                self._since = first_event_s if first_event_s is not None else time.time()

    def applied(self, offsets: Mapping[Partition, int], last_event_s: float | None) -> None:
        """Records up to these next offsets are applied; ``last_event_s``: the event time
        of the newest one (None: unknown, keep the previous)."""
        with self._lock:
            self._applied.update(offsets)
            if last_event_s is not None:
                self._since = last_event_s

    def held_back(self, first: Mapping[Partition, int], oldest_event_s: float | None) -> None:
        """Records from these offsets on are not all applied (some wait, the first at
        ``first``; ``oldest_event_s``: the event time of the oldest waiting, None: unknown):
        the lag counts from them whatever was applied after them."""
        with self._lock:
            for p, offset in first.items():
                self._applied[p] = min(self._applied.get(p, offset), offset)
            if oldest_event_s is not None:
                since = self._since
                self._since = oldest_event_s if since is None else min(since, oldest_event_s)

    def at_end(self, ends: Mapping[Partition, int]) -> None:
        """Everything up to ``ends`` (fetched when the reader was at the end) is applied."""
        with self._lock:
            self._ends.update(ends)
            self._applied.update(ends)
            self._since = None

    def records(self) -> dict[Partition, int]:
        """Per partition: end offset minus the next offset to apply (at least 0)."""
        with self._lock:
            return {p: max(0, end - self._applied.get(p, 0)) for p, end in self._ends.items()}

    def seconds(self, now: float | None = None) -> float:
        with self._lock:
            since = self._since
        if since is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - since)


class LagCollector(Collector):
    """``{prefix}_lag_records`` and ``{prefix}_lag_seconds`` read from :attr:`source` (the
    leading consumer's :class:`ConsumerLag`; None: no samples) at each scrape.
    ``with_topic``: label the records by topic and partition (else partition only)."""

    def __init__(self, prefix: str, what: str, *, with_topic: bool) -> None:
        self.prefix = prefix
        self.what = what
        self.with_topic = with_topic
        self.source: ConsumerLag | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        records, seconds = self._families()
        lag = self.source
        if lag is not None and lag.active:
            for (topic, partition), n in sorted(lag.records().items()):
                labels = [topic, str(partition)] if self.with_topic else [str(partition)]
                records.add_metric(labels, n)
            seconds.add_metric([], lag.seconds())
        yield records
        yield seconds

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        labels = ["topic", "partition"] if self.with_topic else ["partition"]
        return (
            GaugeMetricFamily(
                f"{self.prefix}_lag_records",
                f"Records of {self.what} not applied yet: end offset minus the next offset "
                "to apply, per partition (only while leading).",
                labels=labels,
            ),
            GaugeMetricFamily(
                f"{self.prefix}_lag_seconds",
                f"How far {self.what} is behind: now minus the event time of the last "
                "applied record; 0 at the end of every partition (only while leading).",
            ),
        )


# --------------------------------------------------------------------------- the relay's metrics

REGISTRY: Final = new_registry()

STREAMS: Final = Gauge(
    "fieldsync_relay_streams", "Open WebSocket streams (/v1/stream).", registry=REGISTRY
)
LONG_POLLS: Final = Gauge(
    "fieldsync_relay_long_polls",
    "Long-polls (/v1/changes?wait=) waiting for a change now.",
    registry=REGISTRY,
)
OPS_WRITTEN: Final = Counter(
    "fieldsync_relay_ops_written_total",
    "Bucket ops the engine wrote to the bucket store.",
    registry=REGISTRY,
)
OPS_SERVED: Final = Counter(
    "fieldsync_relay_ops_served_total",
    "Bucket ops sent to devices (/v1/changes answers and stream messages).",
    registry=REGISTRY,
)
STORE_OPERATIONS: Final = (
    "apply",
    "read_ops",
    "bucket_state",
    "load_offsets",
    "compact",
    "purge_tombstones",
)
STORE_SECONDS: Final = Histogram(
    "fieldsync_relay_store_seconds",
    "Time of bucket store calls, by operation.",
    ["operation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
AUTH_FAILURES: Final = Counter(
    "fieldsync_relay_auth_failures_total",
    "Requests and streams refused for their token or device (reason: the error code, "
    "e.g. token_expired, token_bad_signature, token_revoked, forbidden_device).",
    ["reason"],
    registry=REGISTRY,
)
RATE_LIMITED: Final = Counter(
    "fieldsync_relay_rate_limited_total",
    "Requests and stream messages refused by the per-device rate limit (429).",
    registry=REGISTRY,
)
JOURNAL_STATUSES: Final = ("accepted", "rejected")
JOURNAL_ENTRIES: Final = Counter(
    "fieldsync_relay_journal_entries_total",
    "Journal entries taken in by POST /v1/journal (duplicates not counted again), by the "
    "intake's answer.",
    ["status"],
    registry=REGISTRY,
)
TABLE_DEFINITION_RESULTS: Final = ("rebound", "unfit")
TABLE_DEFINITIONS: Final = Counter(
    "fieldsync_relay_table_definitions_total",
    "Changed definitions of the rules' tables the table follower read: rebound (the rules "
    "follow them), unfit (the rules no longer fit them; the earlier ones stay in use).",
    ["result"],
    registry=REGISTRY,
)
TOAST_FILL_RESULTS: Final = ("source", "gone", "unfilled")
TOAST_FILLS: Final = Counter(
    "fieldsync_relay_toast_fills_total",
    "Changes lacking unchanged TOAST values the bucket store held no copy of: source (read "
    "from the captured database), gone (the database has no such row now: placed nowhere), "
    "unfilled (the value could not be had: the change was skipped, the row not sent).",
    ["result"],
    registry=REGISTRY,
)
ENGINE_LAG: Final = LagCollector("fieldsync_relay_engine", "the bucket engine", with_topic=True)
REGISTRY.register(ENGINE_LAG)

for _operation in STORE_OPERATIONS:
    STORE_SECONDS.labels(_operation)
for _status in JOURNAL_STATUSES:
    JOURNAL_ENTRIES.labels(_status)
for _result in TOAST_FILL_RESULTS:
    TOAST_FILLS.labels(_result)
