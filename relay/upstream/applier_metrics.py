"""The upstream applier's Prometheus metrics (``fieldsync relay applier``).

Served on ``[journal] applier_metrics_listen`` (shard N on port + N: :func:`shard_listen`)
from :data:`REGISTRY`, the applier process's own registry (docs/operations.md):

- ``fieldsync_applier_entries_total{outcome}``: journal entries by what the applier made
  of them, counted when their transaction commits (relay/upstream/applier_runs.py):
  ``applied``, ``merged``, ``conflict``, ``rejected``; ``dead_letter`` counts the records
  kept aside for an operator and not retried: an entry that failed on its own (its
  ``rejected`` outcome is counted too) or an unreadable record (no outcome);
- ``fieldsync_applier_entries_waiting``: entries set aside because a lock another session
  holds kept their run waiting past ``journal.lock_timeout_ms``
  (relay/upstream/applier_lock_waits.py); they are tried again until they apply;
- ``fieldsync_applier_lag_records{partition}`` and ``fieldsync_applier_lag_seconds``
  (now minus the intake time of the last applied entry; 0 at the end): read from the
  leading applier's :class:`relay.metrics.ConsumerLag` at each scrape.

Concurrency: prometheus-client's metrics are thread-safe; see relay/metrics.py.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge

from core.errors import ConfigError
from core.metrics import new_registry, parse_listen
from relay.metrics import LagCollector

__all__ = [
    "APPLIER_LAG",
    "ENTRIES",
    "OUTCOMES",
    "REGISTRY",
    "SETTING",
    "WAITING",
    "shard_listen",
]

SETTING: Final = "journal.applier_metrics_listen"

REGISTRY: Final = new_registry()

OUTCOMES: Final = ("applied", "merged", "conflict", "rejected", "dead_letter")
ENTRIES: Final = Counter(
    "fieldsync_applier_entries_total",
    "Journal entries the applier settled, by outcome (dead_letter: kept aside for an "
    "operator, not retried; such an entry's rejection is counted under rejected too).",
    ["outcome"],
    registry=REGISTRY,
)
for _outcome in OUTCOMES:
    ENTRIES.labels(_outcome)

WAITING: Final = Gauge(
    "fieldsync_applier_entries_waiting",
    "Journal entries set aside because a lock another PostgreSQL session holds made their "
    "run wait past journal.lock_timeout_ms; tried again until they apply (the device's "
    "later entries wait behind them, other devices go on).",
    registry=REGISTRY,
)

APPLIER_LAG: Final = LagCollector(
    "fieldsync_applier", "the applier (its shard's journal partitions)", with_topic=False
)
REGISTRY.register(APPLIER_LAG)


def shard_listen(listen: str, shard: int) -> str:
    """The metrics address of ``shard``: ``listen``'s port + shard (port 0, any free port,
    stays 0; ``""`` stays off).  Raises :class:`ConfigError` naming the setting when the
    port would pass 65535."""
    try:
        address = parse_listen(listen, SETTING)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if address is None:
        return ""
    port = address[1]
    if port == 0:
        return listen
    if port + shard > 65535:
        raise ConfigError(
            f"{SETTING}: {listen!r} gives shard {shard} port {port + shard}, past 65535"
        )
    return f"{listen.rpartition(':')[0]}:{port + shard}"
