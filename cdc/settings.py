"""Settings of the cdc daemon: ``[postgres]``, ``[kafka]`` and ``[cdc]``.

Declared with :mod:`core.settings_registry`; load them with
:func:`load_cdc_settings`, which reads a TOML file and then the environment
(``FIELDSYNC_<SECTION>_<KEY>``) into a frozen :class:`CdcSettings`::

    s = load_cdc_settings("/etc/fieldsync/cdc.toml")
    s.postgres.dsn, s.kafka.batch_max_ms, s.cdc.log_level

Generated artefacts, checked by tests to match this module::

    python -m cdc.settings markdown   # the tables in docs/configuration.md
    python -m cdc.settings example    # config/cdc.example.toml
    python -m cdc.settings write      # rewrite both files in place

The module does no I/O except in :func:`load_cdc_settings` and ``__main__``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.logs import LOG_FORMATS
from core.metrics import check_listen
from core.settings_checks import (
    PG_NAME_MAX_BYTES,
    check_bootstrap_servers,
    check_dsn,
    check_non_negative,
    check_positive,
    check_topic_prefix,
    redact_dsn,
)
from core.settings_docs import render_example_toml, render_markdown, replace_generated_block
from core.settings_registry import Registry, Section, Setting

__all__ = [
    "CDC_REGISTRY",
    "CdcSettings",
    "DaemonSettings",
    "KafkaSettings",
    "PostgresSettings",
    "load_cdc_settings",
]

_SLOT_RE = re.compile(r"[a-z0-9_]{1,63}")

# ---------------------------------------------------------------------------
# Checks (raise ValueError with a short reason; the registry adds key and value)
# ---------------------------------------------------------------------------


def _proto_version(value: int) -> None:
    if not 0 <= value <= 4:
        raise ValueError("must be 0 (the highest the server supports) or 1..4")


def _slot(value: str) -> None:
    if not _SLOT_RE.fullmatch(value):
        raise ValueError(
            "is not a valid replication slot name (1 to 63 of lower-case letters, digits, '_')"
        )


def _pg_name(value: str) -> None:
    if not value:
        raise ValueError("must not be empty")
    if len(value.encode()) > PG_NAME_MAX_BYTES:
        raise ValueError(f"is longer than {PG_NAME_MAX_BYTES} bytes (PostgreSQL would truncate it)")


def _tables(value: list[str]) -> None:
    seen: set[str] = set()
    for entry in value:
        parts = entry.split(".")
        if len(parts) > 2 or any(not p or p != p.strip() for p in parts):
            raise ValueError(f"has an entry {entry!r} that is not 'schema.table' or 'table'")
        if any(len(p.encode()) > PG_NAME_MAX_BYTES for p in parts):
            raise ValueError(
                f"has an entry {entry!r} with a name longer than {PG_NAME_MAX_BYTES} bytes"
            )
        if entry in seen:
            raise ValueError(f"lists {entry!r} twice")
        seen.add(entry)


def _share(value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError("must be a share above 0 and at most 1 (e.g. 0.8)")


def _signal_table(value: str) -> None:
    if value == "":
        return
    parts = value.split(".")
    if len(parts) != 2 or any(not p or p != p.strip() for p in parts):
        raise ValueError("must be 'schema.table' (or empty to turn signals off)")
    if any(len(p.encode()) > PG_NAME_MAX_BYTES for p in parts):
        raise ValueError(f"has a name longer than {PG_NAME_MAX_BYTES} bytes")


# ---------------------------------------------------------------------------
# Typed sections
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PostgresSettings:
    dsn: str
    password: str | None
    slot: str
    publication: str
    tables: list[str]
    snapshot: str
    proto_version: int
    streaming: bool
    status_interval_s: float
    heartbeat_interval_s: float
    signal_table: str


@dataclasses.dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    topic_prefix: str
    transactional_id: str
    topic_partitions: int
    max_message_bytes: int
    compression: str
    batch_max_events: int
    batch_max_ms: int
    timeout_s: float
    security_protocol: str
    sasl_mechanism: str
    sasl_username: str | None
    sasl_password: str | None
    ssl_cafile: str | None


@dataclasses.dataclass(frozen=True)
class DaemonSettings:
    spill_dir: str
    log_level: str
    log_format: str
    retry_backoff_initial_s: float
    retry_backoff_max_s: float
    state_dir: str
    resnapshot_on_ddl: bool
    resnapshot_chunk_rows: int
    ddl_check_interval_s: float
    metrics_listen: str
    slot_check_interval_s: float
    slot_wal_warn_share: float


@dataclasses.dataclass(frozen=True)
class CdcSettings:
    postgres: PostgresSettings
    kafka: KafkaSettings
    cdc: DaemonSettings

    def redacted(self) -> dict[str, dict[str, Any]]:
        """Every setting as plain data for logging; secrets are ``***``, DSN passwords masked."""
        return CDC_REGISTRY.redact(self)

    def secrets(self) -> list[str]:
        """The values of the secret settings (passwords), masked in every log line."""
        return CDC_REGISTRY.secrets(self)

    @property
    def effective_transactional_id(self) -> str:
        """``kafka.transactional_id``, or when empty ``{topic_prefix}-cdc-{slot}``."""
        return self.kafka.transactional_id or f"{self.kafka.topic_prefix}-cdc-{self.postgres.slot}"


def _check_kafka(k: KafkaSettings) -> None:
    if k.security_protocol.startswith("SASL_"):
        missing = [
            f"kafka.{name}"
            for name in ("sasl_username", "sasl_password")
            if getattr(k, name) is None
        ]
        if missing:
            raise ValueError(
                f"kafka.security_protocol = {k.security_protocol!r} needs {' and '.join(missing)} "
                "(set secrets as FIELDSYNC_KAFKA_SASL_PASSWORD)"
            )


def _check_daemon(c: DaemonSettings) -> None:
    if c.retry_backoff_initial_s > c.retry_backoff_max_s:
        raise ValueError(
            f"cdc.retry_backoff_initial_s ({c.retry_backoff_initial_s}) must not exceed "
            f"cdc.retry_backoff_max_s ({c.retry_backoff_max_s})"
        )


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------

POSTGRES = Section(
    "postgres",
    PostgresSettings,
    help="The PostgreSQL database whose changes are captured (logical replication with pgoutput).",
    settings=(
        Setting(
            "dsn",
            str,
            "postgresql://postgres@127.0.0.1:5432/postgres",
            "libpq connection string of the source database, as a URI (postgresql://user@host:port/db) "
            "or key=value pairs. Keep the password out of it: use `password`.",
            check=check_dsn,
            redact=redact_dsn,
        ),
        Setting(
            "password",
            str,
            None,
            "Password for the connection in `dsn`.",
            secret=True,
            example="",
        ),
        Setting(
            "slot",
            str,
            "fieldsync",
            "Name of the logical replication slot (lower-case letters, digits and '_', at most 63).",
            check=_slot,
        ),
        Setting(
            "publication",
            str,
            "fieldsync",
            "Name of the publication whose tables are captured.",
            check=_pg_name,
        ),
        Setting(
            "tables",
            list[str],
            [],
            "Tables to capture, each 'schema.table' or 'table'; empty means all tables.",
            check=_tables,
            example=["public.orders", "public.customers"],
        ),
        Setting(
            "snapshot",
            str,
            "initial",
            "'initial': when the slot is created, first emit every existing row (op 'r'); "
            "'never': only changes from the slot's creation on.",
            choices=("initial", "never"),
        ),
        Setting(
            "proto_version",
            int,
            0,
            "pgoutput protocol version; 0 means the highest the server supports, else 1 to 4.",
            check=_proto_version,
        ),
        Setting(
            "streaming",
            bool,
            True,
            "Ask the server to stream large in-progress transactions (protocol 2 and up); "
            "their changes are spilled to disk until they commit.",
        ),
        Setting(
            "status_interval_s",
            float,
            10.0,
            "Seconds between standby status updates (flushed position) sent to the server.",
            check=check_positive,
        ),
        Setting(
            "heartbeat_interval_s",
            float,
            30.0,
            "Seconds between heartbeats that move the slot forward on an idle database; 0 disables.",
            check=check_non_negative,
        ),
        Setting(
            "signal_table",
            str,
            "fieldsync.cdc_signals",
            "Table ('schema.table') where operators insert re-snapshot requests; "
            "`fieldsync cdc snapshot` writes there and creates it on first use (or a DBA does, "
            "docs/cdc.md); the daemon adds it to the publication and reads the requests from "
            "the stream. Empty turns signals off.",
            check=_signal_table,
        ),
    ),
)

KAFKA = Section(
    "kafka",
    KafkaSettings,
    help="The Kafka cluster the change events are written to.",
    check=_check_kafka,
    settings=(
        Setting(
            "bootstrap_servers",
            str,
            "127.0.0.1:9092",
            "Comma-separated host:port list of brokers to bootstrap from.",
            check=check_bootstrap_servers,
        ),
        Setting(
            "topic_prefix",
            str,
            "fieldsync",
            "Prefix of every topic: '{prefix}.{schema}.{table}', '{prefix}._schemas', '{prefix}._journal'.",
            check=check_topic_prefix,
        ),
        Setting(
            "transactional_id",
            str,
            "",
            "Kafka transactional id of the producer; empty means derived from the topic prefix "
            "and the slot. Must be stable across restarts and unique per source database.",
        ),
        Setting(
            "topic_partitions",
            int,
            1,
            "Partitions of each change topic the daemon creates; events are spread by primary "
            "key, so a row's events stay in order in one partition. More partitions let several "
            "relay engine processes share a table ([relay] engine_shares). Topics that exist "
            "keep their partitions.",
            check=check_positive,
        ),
        Setting(
            "max_message_bytes",
            int,
            8388608,
            "Largest Kafka record (one change event) the daemon sends, in bytes; the change "
            "topics it creates get max.message.bytes 1 KiB above it. A larger event (a row "
            "with a large value) stops the daemon with an error naming its table, key and "
            "commit LSN; it is never skipped. The broker (message.max.bytes, or an existing "
            "topic's max.message.bytes) and the relay must take records this large.",
            check=check_positive,
        ),
        Setting(
            "compression",
            str,
            "gzip",
            "Compression of produced batches (change events: gzip at zlib level 1, see cdc/kafka_bulk.py).",
            choices=("none", "gzip"),
        ),
        Setting(
            "batch_max_events",
            int,
            5000,
            "At most this many events are buffered before a flush to Kafka.",
            check=check_positive,
        ),
        Setting(
            "batch_max_ms",
            int,
            50,
            "At most this many milliseconds pass between the first buffered event and a flush.",
            check=check_non_negative,
        ),
        Setting(
            "timeout_s",
            float,
            30.0,
            "Seconds to wait for the brokers (connecting, acknowledging a batch) before giving up.",
            check=check_positive,
        ),
        Setting(
            "security_protocol",
            str,
            "PLAINTEXT",
            "How to connect to the brokers.",
            choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
        ),
        Setting(
            "sasl_mechanism",
            str,
            "PLAIN",
            "SASL mechanism, used with the SASL_* security protocols.",
            choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
        ),
        Setting(
            "sasl_username",
            str,
            None,
            "SASL user name (required with SASL_*).",
            example="fieldsync-cdc",
        ),
        Setting(
            "sasl_password",
            str,
            None,
            "SASL password (required with SASL_*).",
            secret=True,
            example="",
        ),
        Setting(
            "ssl_cafile",
            str,
            None,
            "PEM file of the CA that signed the brokers' certificates; unset means the default CAs.",
            example="/etc/fieldsync/kafka-ca.pem",
        ),
    ),
)

DAEMON = Section(
    "cdc",
    DaemonSettings,
    help="The cdc daemon itself.",
    check=_check_daemon,
    settings=(
        Setting(
            "spill_dir",
            str,
            "",
            "Directory where large streamed transactions are spilled until they commit; "
            "empty means a temporary directory. Prefer a disk over a tmpfs /tmp.",
        ),
        Setting(
            "log_level",
            str,
            "INFO",
            "Log level.",
            choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        ),
        Setting(
            "log_format",
            str,
            "text",
            "Log line format on standard error: `text` (time level logger: message) or `json` "
            "(one object per line with time, level, logger, message, component and context "
            "fields; docs/operations.md, Logs).",
            choices=LOG_FORMATS,
        ),
        Setting(
            "retry_backoff_initial_s",
            float,
            0.5,
            "Seconds to wait before the first reconnect after a lost connection; later waits "
            "grow up to retry_backoff_max_s.",
            check=check_positive,
        ),
        Setting(
            "retry_backoff_max_s",
            float,
            30.0,
            "Upper bound of the reconnect wait, in seconds.",
            check=check_positive,
        ),
        Setting(
            "state_dir",
            str,
            "",
            "Directory for state kept between runs (under systemd: /var/lib/fieldsync); "
            "empty means the daemon's default.",
        ),
        Setting(
            "resnapshot_on_ddl",
            bool,
            True,
            "Re-read a table (op 'r' events, while streaming goes on) after a change that gives "
            "existing rows new values without row events: ADD COLUMN with a default, a table "
            "rewrite by ALTER COLUMN TYPE or a volatile default, an enum RENAME VALUE, an "
            "attribute added to or dropped from a composite type, a partition with rows "
            "attached; and a table dropped and created again under its name, or one that lost "
            "a partition's rows (detached, dropped, truncated), after deleting the keys in "
            "Kafka no row of it has now.",
        ),
        Setting(
            "resnapshot_chunk_rows",
            int,
            1024,
            "Rows per chunk of a re-snapshot: at most this many rows are held in memory "
            "between a chunk's watermarks.",
            check=check_positive,
        ),
        Setting(
            "ddl_check_interval_s",
            float,
            10.0,
            "Seconds between catalog checks for such changes (also checked at start, when "
            "a Relation message changes and when the stream shows a table not checked yet); "
            "0 checks only then.",
            check=check_non_negative,
        ),
        Setting(
            "metrics_listen",
            str,
            "127.0.0.1:9187",
            'host:port of the Prometheus endpoint (`/metrics`; docs/operations.md); `""` '
            "turns it off. A port that cannot be bound is logged as an error and the daemon "
            "runs on without metrics.",
            check=check_listen,
        ),
        Setting(
            "slot_check_interval_s",
            float,
            10.0,
            "Seconds between checks of the replication slot (pg_replication_slots: wal_status, "
            "retained WAL, safe_wal_size; the slot and lag metrics). A slot PostgreSQL reports "
            "lost stops the daemon (docs/cdc.md, Slot health).",
            check=check_positive,
        ),
        Setting(
            "slot_wal_warn_share",
            float,
            0.8,
            "Warn (log and fieldsync_cdc_slot_wal_warning) when the WAL the slot retains passes "
            "this share of max_slot_wal_keep_size (when that is set).",
            check=_share,
        ),
    ),
)

CDC_REGISTRY: Registry[CdcSettings] = Registry("cdc", CdcSettings, [POSTGRES, KAFKA, DAEMON])

DOCS_BLOCK = "cdc settings"
EXAMPLE_TITLE = "fieldsync cdc configuration (generated by `python -m cdc.settings example`)"


def load_cdc_settings(
    path: str | Path | None, environ: Mapping[str, str] | None = None
) -> CdcSettings:
    """Load the cdc settings: defaults, the TOML file at *path* (if given), then *environ*.

    *environ* defaults to ``os.environ``.  Raises :class:`core.errors.ConfigError`.
    """
    return CDC_REGISTRY.load(path, environ)


def render_docs_block() -> str:
    """The Markdown tables for docs/configuration.md."""
    return render_markdown(CDC_REGISTRY, heading_level=3)


def render_example() -> str:
    """The text of config/cdc.example.toml."""
    return render_example_toml(CDC_REGISTRY, title=EXAMPLE_TITLE)


def _main(argv: list[str]) -> int:
    usage = "usage: python -m cdc.settings {markdown|example|write [PROJECT_ROOT]}"
    if not argv or argv[0] not in {"markdown", "example", "write"}:
        print(usage, file=sys.stderr)
        return 2
    if argv[0] == "markdown":
        sys.stdout.write(render_docs_block())
    elif argv[0] == "example":
        sys.stdout.write(render_example())
    else:
        root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
        doc = root / "docs" / "configuration.md"
        doc.write_text(replace_generated_block(doc.read_text(), DOCS_BLOCK, render_docs_block()))
        (root / "config" / "cdc.example.toml").write_text(render_example())
        print(f"wrote {doc} and {root / 'config' / 'cdc.example.toml'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
