"""The ``[journal]`` section of the relay's settings: journal intake and the upstream applier.

Declared here and loaded as part of :data:`relay.settings.RELAY_REGISTRY` (the one
registry of ``relay.toml``), so ``fieldsync relay run`` (upload limits, the captured
database for conflict resolutions, retention) and ``fieldsync relay applier`` (the
captured database, conflict policies, sharding, batching) read the same keys::

    s = load_relay_settings("/etc/fieldsync/relay.toml")
    s.journal.conflicts, s.journal.max_upload_entries, s.captured_dsn()

Pure declarations; no I/O.  Concurrency: the section and loaded settings are immutable.
"""

from __future__ import annotations

import dataclasses

from core.metrics import check_listen
from core.settings_checks import (
    check_consumer_name,
    check_dsn,
    check_non_negative,
    check_positive,
    redact_dsn,
)
from core.settings_registry import Section, Setting

__all__ = ["JOURNAL", "MAX_ENTRY_BYTES_CAP", "JournalSettings"]

MAX_ENTRY_BYTES_CAP = 1_000_000
"""Most ``max_entry_bytes`` may be: an accepted entry goes to ``_journal`` as one Kafka
record (with the device's claims), and the relay's producer (kafka-python) and a broker
take at most 1 MiB by default; a larger one was answered 503 at every upload, so the
device uploaded it again for ever."""


def _check_entry_bytes(value: int) -> None:
    check_positive(value)
    if value > MAX_ENTRY_BYTES_CAP:
        raise ValueError(
            f"must be at most {MAX_ENTRY_BYTES_CAP}: an entry goes to Kafka as one record, "
            "and the relay's producer and a broker's default take at most 1 MiB"
        )


@dataclasses.dataclass(frozen=True)
class JournalSettings:
    dsn: str | None
    password: str | None
    conflicts: str | None
    consumer: str
    shards: int
    batch_max_entries: int
    batch_max_ms: int
    lock_timeout_ms: int
    max_clock_skew_s: float
    max_upload_entries: int
    max_entry_bytes: int
    topic_partitions: int
    retention_days: float
    applier_metrics_listen: str


JOURNAL = Section(
    "journal",
    JournalSettings,
    help="Device edits: upload limits of the journal intake and the upstream applier "
    "(topic `{prefix}._journal` into the captured database, outcomes to `{prefix}._outcomes`).",
    settings=(
        Setting(
            "dsn",
            str,
            None,
            "libpq connection string of the captured database the applier writes device edits "
            "to (its bookkeeping lives there too, schema `fieldsync_applier`). Unset: "
            "`relay.source_dsn`. Keep the password out of it: use `password`.",
            check=check_dsn,
            redact=redact_dsn,
            example="postgresql://fieldsync_applier@127.0.0.1:5432/app",
        ),
        Setting("password", str, None, "Password for `dsn`.", secret=True, example=""),
        Setting(
            "conflicts",
            str,
            None,
            "Conflict policies file (see config/conflicts.example.toml). Unset: every conflict "
            "is settled `server_wins`.",
            example="/etc/fieldsync/conflicts.toml",
        ),
        Setting(
            "consumer",
            str,
            "fieldsync-applier",
            "Name of the applier: its Kafka offsets are kept under this name in the captured "
            "database, and of all processes sharing a database and this name exactly one "
            "applies at a time (the others stand by).",
            check=check_consumer_name,
        ),
        Setting(
            "shards",
            int,
            1,
            "Number of applier processes sharing the work: run one per shard (`fieldsync relay "
            "applier --shard N`, N = 0..shards-1); shard N applies the devices of the journal "
            "partitions p with p mod shards = N. At most the number of partitions.",
            check=check_positive,
        ),
        Setting(
            "batch_max_entries",
            int,
            500,
            "The applier applies at most this many entries of one device per PostgreSQL "
            "transaction.",
            check=check_positive,
        ),
        Setting(
            "batch_max_ms",
            int,
            50,
            "At most this many milliseconds pass between reading an entry and applying it.",
            check=check_non_negative,
        ),
        Setting(
            "lock_timeout_ms",
            int,
            2000,
            "How long the applier waits for a row or table lock another PostgreSQL session "
            "holds (a transaction left open after updating the row, DDL) before it sets that "
            "device's entries aside: they wait in order and are tried again every 0.5 s, while "
            "the other devices' entries go on; a warning names the sessions holding locks. 0: "
            "wait as long as the lock is held (every device of the shard waits behind it).",
            check=check_non_negative,
        ),
        Setting(
            "max_clock_skew_s",
            float,
            60.0,
            "`lww`/`fww`: a device edit time more than this far in the future is clamped "
            "to now + this.",
            check=check_non_negative,
        ),
        Setting(
            "max_upload_entries",
            int,
            500,
            "Most entries one journal upload may carry (more: HTTP 413, split the upload).",
            check=check_positive,
        ),
        Setting(
            "max_entry_bytes",
            int,
            262_144,
            "Largest JSON size of one journal entry; larger entries are rejected "
            "(`entry_too_large`). At most 1000000: an entry goes to Kafka as one record.",
            check=_check_entry_bytes,
        ),
        Setting(
            "topic_partitions",
            int,
            4,
            "Partitions of `{prefix}._journal` and `{prefix}._outcomes` when the applier "
            "creates them.",
            check=check_positive,
        ),
        Setting(
            "retention_days",
            float,
            90.0,
            "The relay deletes intake records and settled outcomes older than this from its "
            "store (hourly; open conflicts are kept). Must exceed the longest time a device "
            "stays offline: a device away longer misses the outcomes of its entries. The "
            "applier's audit table in the captured database is never pruned. 0 keeps "
            "everything.",
            check=check_non_negative,
        ),
        Setting(
            "applier_metrics_listen",
            str,
            "127.0.0.1:9189",
            "host:port of the applier's Prometheus endpoint (`/metrics`; "
            "docs/operations.md): shard N listens on port + N (port 0: any free port for "
            'every shard); `""` turns it off. A port that cannot be bound is logged as an '
            "error and the applier runs on without metrics.",
            check=check_listen,
        ),
    ),
)
