"""The cdc daemon's Prometheus metrics (``fieldsync cdc run``).

Every metric lives in :data:`REGISTRY` (the process's own registry, with the standard
``process_*`` and ``python_*`` collectors), served on ``[cdc] metrics_listen`` by
:func:`serve` (:func:`core.metrics.serve_or_log`).  docs/operations.md lists them:

- ``fieldsync_cdc_events_total{table,op}``, ``fieldsync_cdc_transactions_total``,
  ``fieldsync_cdc_snapshot_rows_total{table}`` and the
  ``fieldsync_cdc_commit_to_ack_seconds`` histogram: counted when a Kafka transaction
  commits (:meth:`EventCounts.committed`), from what the batch gathered
  (cdc/streaming.py, the initial snapshot in cdc/pipeline.py);
- ``fieldsync_cdc_bytes_total``: the record bytes of each committed Kafka transaction
  (cdc/kafka_sink.py);
- ``fieldsync_cdc_kafka_errors_total``, ``fieldsync_cdc_session_restarts_total{reason}``:
  counted by the daemon when a session fails (:data:`RESTART_REASONS`);
- gauges read from the daemon when Prometheus scrapes (:class:`LiveCollector`):
  ``fieldsync_cdc_replication_lag_bytes`` and ``_seconds``, ``fieldsync_cdc_spill_bytes``,
  ``fieldsync_cdc_snapshot_tables_pending`` and the slot's (``fieldsync_cdc_slot_*``:
  the last reading of :class:`cdc.slot_health.SlotWatch`).  A gauge has no sample while
  its value is unknown (no slot reading yet; ``safe_wal_size`` without
  ``max_slot_wal_keep_size``).

Instrumentation stays thin: per change event the streaming loop adds one to a dict entry
of its batch (``(topic, op)``: the op is a byte of the encoded value, see
:data:`OP_OFFSET`); the metrics are touched once per Kafka commit.

Concurrency: prometheus-client's metrics are thread-safe; the daemon's thread writes the
values :class:`LiveCollector` reads (plain attributes, read whole under the GIL) from the
scrape thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Final, Protocol

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cdc.slot_health import WAL_STATUSES, SlotHealth
from core.metrics import MetricsServer, new_registry, serve_or_log

__all__ = [
    "BYTES",
    "COMMIT_TO_ACK",
    "EVENTS",
    "KAFKA_ERRORS",
    "LIVE",
    "OPS",
    "OP_OFFSET",
    "REGISTRY",
    "RESTART_REASONS",
    "SESSION_RESTARTS",
    "SETTING",
    "SNAPSHOT_ROWS",
    "TRANSACTIONS",
    "EventCounts",
    "LiveCollector",
    "LiveSource",
    "serve",
]

SETTING: Final = "cdc.metrics_listen"
OPS: Final = ("c", "u", "d", "r", "t")
OP_OFFSET: Final = 11
"""Where an encoded change event's op is: after the 2-byte marker and the 8-byte
fingerprint, the envelope's first field is the op, a one-character Avro string (its
length byte, then the character)."""
RESTART_REASONS: Final = ("postgres", "kafka")
_R: Final = ord("r")

REGISTRY: Final = new_registry()

EVENTS: Final = Counter(
    "fieldsync_cdc_events_total",
    "Change events written to Kafka (committed), by table and op (c, u, d, r, t).",
    ["table", "op"],
    registry=REGISTRY,
)
TRANSACTIONS: Final = Counter(
    "fieldsync_cdc_transactions_total",
    "PostgreSQL transactions with events whose end was written to Kafka.",
    registry=REGISTRY,
)
BYTES: Final = Counter(
    "fieldsync_cdc_bytes_total",
    "Record bytes of the Kafka transactions cdc committed (events, schemas, state).",
    registry=REGISTRY,
)
COMMIT_TO_ACK: Final = Histogram(
    "fieldsync_cdc_commit_to_ack_seconds",
    "From a transaction's commit in PostgreSQL to Kafka's acknowledgement of its Kafka "
    "transaction (PostgreSQL's clock against cdc's).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
    registry=REGISTRY,
)
KAFKA_ERRORS: Final = Counter(
    "fieldsync_cdc_kafka_errors_total",
    "Kafka failures that ended a replication session (the session is started again).",
    registry=REGISTRY,
)
SESSION_RESTARTS: Final = Counter(
    "fieldsync_cdc_session_restarts_total",
    "Replication sessions started again after a failure, by side (postgres, kafka).",
    ["reason"],
    registry=REGISTRY,
)
SNAPSHOT_ROWS: Final = Counter(
    "fieldsync_cdc_snapshot_rows_total",
    "Rows sent by the initial snapshot and by re-snapshots (op r), by table.",
    ["table"],
    registry=REGISTRY,
)
for _reason in RESTART_REASONS:
    SESSION_RESTARTS.labels(_reason)


def serve(listen: str) -> MetricsServer | None:
    """Serve :data:`REGISTRY` on ``listen``; a port that cannot be bound is an ERROR in the
    log naming ``cdc.metrics_listen`` and the daemon goes on without metrics (None)."""
    return serve_or_log(listen, registry=REGISTRY, setting=SETTING)


class EventCounts:
    """Adds what a committed batch held to the counters (one per daemon: it knows the
    topic prefix, which the ``table`` label leaves out)."""

    def __init__(self, topic_prefix: str) -> None:
        self._skip = len(topic_prefix) + 1
        self._children: dict[tuple[str, int], tuple[Counter, Counter | None]] = {}

    def committed(
        self,
        tally: Mapping[tuple[str, int], int],
        transactions: int = 0,
        commit_ts_us: Sequence[int] = (),
        now: float | None = None,
    ) -> None:
        """``tally``: events per (topic, op byte); ``transactions`` ended in the batch;
        ``commit_ts_us``: their commit times (the histogram)."""
        for key, n in tally.items():
            children = self._children.get(key)
            if children is None:
                children = self._children[key] = self._make(*key)
            events, rows = children
            events.inc(n)
            if rows is not None:
                rows.inc(n)
        if transactions:
            TRANSACTIONS.inc(transactions)
        if commit_ts_us:
            at = time.time() if now is None else now
            for ts in commit_ts_us:
                COMMIT_TO_ACK.observe(max(0.0, at - ts / 1e6))

    def _make(self, topic: str, op: int) -> tuple[Counter, Counter | None]:
        table = topic[self._skip :]
        rows = SNAPSHOT_ROWS.labels(table) if op == _R else None
        return EVENTS.labels(table, chr(op)), rows


# --------------------------------------------------------------------------- read at scrape


class LiveSource(Protocol):
    """What the daemon tells :class:`LiveCollector` (None: not known now)."""

    def lag_bytes(self) -> int | None: ...
    def lag_seconds(self, now: float) -> float | None: ...
    def spill_bytes(self) -> int | None: ...
    def tables_pending(self) -> int | None: ...
    def slot_reading(self) -> tuple[SlotHealth, bool] | None:
        """The last slot reading and whether it is worth a warning."""
        ...


class LiveCollector(Collector):
    """The gauges read from :attr:`source` (the running daemon) at each scrape."""

    def __init__(self) -> None:
        self.source: LiveSource | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        source = self.source
        if source is not None:
            lag_b, lag_s, retained, safe, status, warning, spill, pending = families
            _add(lag_b, source.lag_bytes())
            _add(lag_s, source.lag_seconds(time.time()))
            _add(spill, source.spill_bytes())
            _add(pending, source.tables_pending())
            reading = source.slot_reading()
            if reading is not None:
                health, warn = reading
                _add(retained, health.retained_bytes)
                _add(safe, health.safe_wal_size)
                for name in WAL_STATUSES:
                    status.add_metric([name], 1.0 if health.wal_status == name else 0.0)
                warning.add_metric([], 1.0 if warn else 0.0)
        return iter(families)

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"fieldsync_cdc_{name}", doc, labels=list(labels))

        return [
            gauge(
                "replication_lag_bytes",
                "The server's WAL end minus the position cdc confirmed to the slot.",
            ),
            gauge(
                "replication_lag_seconds",
                "Now minus the commit time of the last transaction Kafka acknowledged (of "
                "the first waiting one right after cdc was idle); 0 while nothing waits.",
            ),
            gauge(
                "slot_retained_wal_bytes",
                "WAL the replication slot keeps the server from removing (current WAL "
                "position minus the slot's restart_lsn).",
            ),
            gauge(
                "slot_safe_wal_size_bytes",
                "WAL that can be written before the slot is in danger of losing what it "
                "needs (pg_replication_slots.safe_wal_size; only with max_slot_wal_keep_size).",
            ),
            gauge(
                "slot_wal_status",
                "1 for the slot's current wal_status, 0 for the others.",
                ["status"],
            ),
            gauge(
                "slot_wal_warning",
                "1 while the slot's WAL is worth a warning: wal_status unreserved, or the "
                "retained WAL past cdc.slot_wal_warn_share of max_slot_wal_keep_size.",
            ),
            gauge(
                "spill_bytes",
                "Bytes of large (streamed) transactions spilled to disk, not yet committed.",
            ),
            gauge(
                "snapshot_tables_pending",
                "Tables whose snapshot is still to do: of the initial snapshot, and "
                "re-snapshot jobs queued or running.",
            ),
        ]


def _add(family: GaugeMetricFamily, value: float | None) -> None:
    if value is not None:
        family.add_metric([], float(value))


LIVE: Final = LiveCollector()
REGISTRY.register(LIVE)
