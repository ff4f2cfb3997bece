"""Settings of the relay (``relay.toml``): ``[relay]``, ``[http]``, ``[auth]`` and ``[journal]``.

One registry, :data:`RELAY_REGISTRY`, declared with :mod:`core.settings_registry` (same
TOML + ``FIELDSYNC_<SECTION>_<KEY>`` environment scheme as the cdc daemon), is loaded by
every relay process: ``fieldsync relay run`` with :func:`load_relay_settings`, the
upstream applier with :func:`load_applier_settings` (the same, plus its need for the
captured database)::

    s = load_relay_settings("/etc/fieldsync/relay.toml")
    s.relay.store_dsn, s.relay.rules, s.http.port, s.auth.keys_file, s.journal.conflicts

``[relay]`` (bucket store, rules, Kafka), ``[http]`` and ``[auth]`` are declared here;
``[journal]`` (journal intake and the applier) in :mod:`relay.journal_settings`.

Generated artefacts (the tables in docs/relay.md and docs/journal.md, an example TOML)::

    python -m relay.settings markdown   # Markdown tables ([relay], [http], [auth])
    python -m relay.settings example    # example TOML with every setting
    python -m relay.settings write      # rewrite the generated blocks in docs/

The module does no I/O except in the ``load_*`` functions and ``__main__``.
Concurrency: the registry and loaded settings are immutable.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.kafka_options import client_config
from core.logs import LOG_FORMATS
from core.metrics import check_listen
from core.settings_checks import (
    check_bootstrap_servers,
    check_consumer_name,
    check_dsn,
    check_non_negative,
    check_positive,
    check_topic_prefix,
    redact_dsn,
)
from core.settings_docs import render_example_toml, render_markdown, replace_generated_block
from core.settings_registry import Registry, Section, Setting
from relay.journal_settings import JOURNAL, JournalSettings

__all__ = [
    "RELAY_REGISTRY",
    "AuthSettings",
    "HttpSettings",
    "RelayCoreSettings",
    "RelaySettings",
    "load_applier_settings",
    "load_relay_settings",
]


def _port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port, 0 to 65535 (0: any free port)")


def _share_choice(value: str) -> None:
    if value != "any" and not (value.isdigit() and value.isascii()):
        raise ValueError(f"must be `any` or a share number (0, 1, ...), not {value!r}")


@dataclasses.dataclass(frozen=True)
class RelayCoreSettings:
    store_dsn: str
    store_password: str | None
    rules: str
    source_dsn: str | None
    source_password: str | None
    topic_prefix: str
    kafka_bootstrap_servers: str
    kafka_security_protocol: str
    kafka_sasl_mechanism: str
    kafka_sasl_username: str | None
    kafka_sasl_password: str | None
    kafka_ssl_cafile: str | None
    kafka_timeout_s: float
    consumer_group: str
    engine_shares: int
    engine_share: str
    batch_max_events: int
    batch_max_ms: int
    compact_interval_s: float
    schema_check_interval_s: float
    log_level: str
    metrics_listen: str
    ready_max_lag_s: float
    log_format: str


@dataclasses.dataclass(frozen=True)
class HttpSettings:
    host: str
    port: int
    max_body_bytes: int
    max_page_ops: int
    max_page_bytes: int
    long_poll_s: float
    rate_per_s: float
    rate_burst: int
    max_connections: int
    ws_ping_s: float
    header_timeout_s: float
    body_timeout_s: float
    keep_alive_s: float
    max_header_bytes: int


@dataclasses.dataclass(frozen=True)
class AuthSettings:
    keys_file: str
    audience: str
    issuer: str
    revoked_file: str | None
    leeway_s: float


@dataclasses.dataclass(frozen=True)
class RelaySettings:
    relay: RelayCoreSettings
    http: HttpSettings
    auth: AuthSettings
    journal: JournalSettings

    def redacted(self) -> dict[str, dict[str, Any]]:
        """Every setting as plain data for logging; secrets are ``***``, DSN passwords masked."""
        return RELAY_REGISTRY.redact(self)

    def secrets(self) -> list[str]:
        """The values of the secret settings (passwords), masked in every log line."""
        return RELAY_REGISTRY.secrets(self)

    def store_connect_kwargs(self) -> dict[str, Any]:
        """Extra psycopg connect arguments for the bucket store (the password, if set)."""
        return {"password": self.relay.store_password} if self.relay.store_password else {}

    def kafka_client_kwargs(self) -> dict[str, Any]:
        """kafka-python client arguments (bootstrap servers, security, timeouts) from ``[relay]``."""
        r = self.relay
        return client_config(
            r.kafka_bootstrap_servers,
            timeout_s=r.kafka_timeout_s,
            security_protocol=r.kafka_security_protocol,
            sasl_mechanism=r.kafka_sasl_mechanism,
            sasl_username=r.kafka_sasl_username,
            sasl_password=r.kafka_sasl_password,
            ssl_cafile=r.kafka_ssl_cafile,
        )

    def engine_share(self) -> int | None:
        """The share this process's engine leads (``relay.engine_share``), None for any."""
        share = self.relay.engine_share
        return None if share == "any" else int(share)

    def captured_dsn(self) -> tuple[str, str | None] | None:
        """The captured database (``journal.dsn``, else ``relay.source_dsn``) and its
        password, or None when neither is set."""
        if self.journal.dsn:
            return self.journal.dsn, self.journal.password
        if self.relay.source_dsn:
            return self.relay.source_dsn, self.journal.password or self.relay.source_password
        return None


def _check_relay(r: RelayCoreSettings) -> None:
    if r.engine_share != "any" and int(r.engine_share) >= r.engine_shares:
        raise ValueError(
            f"relay.engine_share = {r.engine_share!r} is not one of 0..{r.engine_shares - 1} "
            f"(relay.engine_shares = {r.engine_shares})"
        )
    if r.kafka_security_protocol.startswith("SASL_"):
        missing = [
            f"relay.{name}"
            for name in ("kafka_sasl_username", "kafka_sasl_password")
            if getattr(r, name) is None
        ]
        if missing:
            raise ValueError(
                f"relay.kafka_security_protocol = {r.kafka_security_protocol!r} needs "
                f"{' and '.join(missing)} (set secrets as FIELDSYNC_RELAY_KAFKA_SASL_PASSWORD)"
            )


RELAY = Section(
    "relay",
    RelayCoreSettings,
    help="The bucket store, the authorization rules and the change topics the relay consumes.",
    check=_check_relay,
    settings=(
        Setting(
            "store_dsn",
            str,
            "postgresql://postgres@127.0.0.1:5432/fieldsync_relay",
            "libpq connection string of the relay's own database (the bucket store, schema "
            "`fieldsync_relay`, created and migrated at start-up). Must NOT be the captured "
            "database. Keep the password out of it: use `store_password`.",
            check=check_dsn,
            redact=redact_dsn,
        ),
        Setting("store_password", str, None, "Password for `store_dsn`.", secret=True, example=""),
        Setting(
            "rules",
            str,
            "/etc/fieldsync/rules.toml",
            "Path of the authorization rules file (see docs/relay-rules.md).",
        ),
        Setting(
            "source_dsn",
            str,
            None,
            "Optional libpq connection string of the captured database, read for the columns and "
            "key columns (row identity) the rules are validated against, and by the bucket engine "
            "for unchanged TOAST values it holds no copy of (rows read by key: the role needs "
            "SELECT on the captured tables). Unset: definitions taken from the schemas in "
            "`{topic_prefix}._schemas` (tables appear there with their first event; after a change "
            "of a table's key columns alone they may list the other key, so set it where keys "
            "change), and a change lacking such a TOAST value is skipped with an error.",
            check=check_dsn,
            redact=redact_dsn,
            example="postgresql://fieldsync@127.0.0.1:5432/app",
        ),
        Setting(
            "source_password", str, None, "Password for `source_dsn`.", secret=True, example=""
        ),
        Setting(
            "topic_prefix",
            str,
            "fieldsync",
            "Prefix of the change topics ('{prefix}.{schema}.{table}'), as configured for cdc.",
            check=check_topic_prefix,
        ),
        Setting(
            "kafka_bootstrap_servers",
            str,
            "127.0.0.1:9092",
            "Comma-separated host:port list of Kafka brokers.",
            check=check_bootstrap_servers,
        ),
        Setting(
            "kafka_security_protocol",
            str,
            "PLAINTEXT",
            "How to connect to the brokers.",
            choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
        ),
        Setting(
            "kafka_sasl_mechanism",
            str,
            "PLAIN",
            "SASL mechanism, used with the SASL_* security protocols.",
            choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
        ),
        Setting(
            "kafka_sasl_username",
            str,
            None,
            "SASL user name (required with SASL_*).",
            example="fieldsync-relay",
        ),
        Setting(
            "kafka_sasl_password",
            str,
            None,
            "SASL password (required with SASL_*).",
            secret=True,
            example="",
        ),
        Setting(
            "kafka_ssl_cafile",
            str,
            None,
            "PEM file of the CA that signed the brokers' certificates.",
            example="/etc/fieldsync/kafka-ca.pem",
        ),
        Setting(
            "kafka_timeout_s",
            float,
            30.0,
            "Seconds to wait for the brokers before giving up a request.",
            check=check_positive,
        ),
        Setting(
            "consumer_group",
            str,
            "fieldsync-relay",
            "Name of the bucket engine: its consumer offsets are kept under this name in the "
            "bucket store, and of all relay processes sharing a store and this name exactly one "
            "runs the engine of each share (engine_shares) at a time (the others stand by).",
            check=check_consumer_name,
        ),
        Setting(
            "engine_shares",
            int,
            1,
            "Number of shares the bucket engine's work is divided into: share s applies "
            "partition p of every change topic when p mod engine_shares = s, and each share is "
            "led by one relay process at a time (a process leads at most one share; the others "
            "stand by). Run at least this many relay processes with the engine, on as many "
            "cores; every process of one consumer_group must use the same value. Useful up to "
            "the change topics' partition count.",
            check=check_positive,
        ),
        Setting(
            "engine_share",
            str,
            "any",
            "Which share this process's engine leads: `any` (the first share no other process "
            "leads; standing by while every share is led) or a share number, 0 to "
            "engine_shares - 1 (standing by while another process leads it).",
            check=_share_choice,
        ),
        Setting(
            "batch_max_events",
            int,
            5000,
            "The engine applies at most this many change events per store transaction.",
            check=check_positive,
        ),
        Setting(
            "batch_max_ms",
            int,
            50,
            "At most this many milliseconds pass between reading an event and applying it "
            "(when fewer than batch_max_events are waiting).",
            check=check_non_negative,
        ),
        Setting(
            "compact_interval_s",
            float,
            300.0,
            "Seconds between compactions of the bucket logs (latest op per row); 0 disables.",
            check=check_non_negative,
        ),
        Setting(
            "schema_check_interval_s",
            float,
            10.0,
            "Seconds between reads of the captured tables' definitions (from source_dsn's "
            "catalog, else from the schemas in {topic_prefix}._schemas, where cdc publishes a "
            "table's new schema with its first event after the change): a column added or a "
            "key redefined reaches /v1/schema and the journal intake within this time, "
            "without a restart; 0 disables (a restart then takes changed definitions).",
            check=check_non_negative,
        ),
        Setting(
            "log_level",
            str,
            "INFO",
            "Log level.",
            choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        ),
        Setting(
            "metrics_listen",
            str,
            "127.0.0.1:9188",
            'host:port of the Prometheus endpoint (`/metrics`; docs/operations.md); `""` '
            "turns it off. A port that cannot be bound is logged as an error and the relay "
            "runs on without metrics.",
            check=check_listen,
        ),
        Setting(
            "ready_max_lag_s",
            float,
            30.0,
            "`GET /readyz` answers 503 while this process's bucket engine leads and is more "
            "than this many seconds behind the change topics (docs/relay.md).",
            check=check_positive,
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
    ),
)

HTTP = Section(
    "http",
    HttpSettings,
    help="The device API (HTTP + WebSocket).",
    settings=(
        Setting("host", str, "127.0.0.1", "Address to listen on ('0.0.0.0' for all IPv4)."),
        Setting("port", int, 8470, "TCP port to listen on (0: any free port).", check=_port),
        Setting(
            "max_body_bytes",
            int,
            1_048_576,
            "Largest accepted request body, in bytes (after gzip decompression); larger: 413.",
            check=check_positive,
        ),
        Setting(
            "max_page_ops",
            int,
            5000,
            "Most ops returned by one changes request (a client may ask for fewer).",
            check=check_positive,
        ),
        Setting(
            "max_page_bytes",
            int,
            16_777_216,
            "A changes message ends with the op whose row data and keys reach this many "
            "bytes (at least one op per message).",
            check=check_positive,
        ),
        Setting(
            "long_poll_s",
            float,
            30.0,
            "Longest time a changes request waits for new ops before answering empty.",
            check=check_non_negative,
        ),
        Setting(
            "rate_per_s",
            float,
            20.0,
            "Requests per second allowed per device (token bucket refill rate); 0 disables.",
            check=check_non_negative,
        ),
        Setting(
            "rate_burst",
            int,
            40,
            "Requests a device may make in a burst (token bucket size).",
            check=check_positive,
        ),
        Setting(
            "max_connections",
            int,
            10000,
            "Most concurrent connections one relay process holds, counting every open socket "
            "(HTTP, WebSocket, and connections that have not sent a whole request yet); "
            "past it a new connection gets 503 and is closed at once.",
            check=check_positive,
        ),
        Setting(
            "ws_ping_s",
            float,
            20.0,
            "Seconds between WebSocket pings to idle clients; 0 disables.",
            check=check_non_negative,
        ),
        Setting(
            "header_timeout_s",
            float,
            10.0,
            "Seconds a client has to send a request's line and headers, from connecting (or "
            "from the end of the previous response on a kept-alive connection), however "
            "slowly the bytes trickle in; later: 408 and the connection is closed.",
            check=check_positive,
        ),
        Setting(
            "body_timeout_s",
            float,
            60.0,
            "Seconds a client has to send a request's whole body once its headers are in; "
            "later: 408 request_timeout and the connection is closed.",
            check=check_positive,
        ),
        Setting(
            "keep_alive_s",
            float,
            5.0,
            "Seconds an idle kept-alive HTTP connection stays open waiting for the next request.",
            check=check_positive,
        ),
        Setting(
            "max_header_bytes",
            int,
            98_304,
            "Largest request line plus headers, in bytes (a cursor of up to 64 KiB and a token "
            "of up to 16 KiB must fit); larger: 400 and the connection is closed.",
            check=check_positive,
        ),
    ),
)

AUTH = Section(
    "auth",
    AuthSettings,
    help="Bearer-token (JWT) authentication of devices.",
    settings=(
        Setting(
            "keys_file",
            str,
            "/etc/fieldsync/relay-keys.toml",
            "TOML file of token keys by kid (see config/relay-keys.example.toml).",
        ),
        Setting("audience", str, "fieldsync-relay", "Required `aud` claim of device tokens."),
        Setting("issuer", str, "fieldsync", "Required `iss` claim of device tokens."),
        Setting(
            "revoked_file",
            str,
            None,
            "Optional TOML file of revoked devices (re-read when it changes).",
            example="/etc/fieldsync/revoked.toml",
        ),
        Setting(
            "leeway_s",
            float,
            30.0,
            "Clock skew allowed when checking exp, nbf and iat, in seconds.",
            check=check_non_negative,
        ),
    ),
)

RELAY_REGISTRY: Registry[RelaySettings] = Registry(
    "relay", RelaySettings, [RELAY, HTTP, AUTH, JOURNAL]
)

DOCS_BLOCK = "relay settings"
DOCS_SECTIONS = ("relay", "http", "auth")
JOURNAL_DOCS_BLOCK = "journal settings"
EXAMPLE_TITLE = "fieldsync relay configuration (generated by `python -m relay.settings example`)"


def load_relay_settings(
    path: str | Path | None, environ: Mapping[str, str] | None = None
) -> RelaySettings:
    """Load the relay settings: defaults, the TOML file at *path* (if given), then *environ*.

    *environ* defaults to ``os.environ``.  Raises :class:`core.errors.ConfigError`.
    """
    return RELAY_REGISTRY.load(path, environ)


def _needs_captured_database(settings: RelaySettings) -> None:
    if settings.captured_dsn() is None:
        raise ValueError(
            "the applier needs the captured database: set journal.dsn (or relay.source_dsn)"
        )


def load_applier_settings(
    path: str | Path | None, environ: Mapping[str, str] | None = None
) -> RelaySettings:
    """:func:`load_relay_settings` for the upstream applier, which also needs the captured
    database (``journal.dsn`` or ``relay.source_dsn``).  Raises
    :class:`core.errors.ConfigError` naming the key at fault."""
    return RELAY_REGISTRY.load(path, environ, check=_needs_captured_database)


def render_docs_block() -> str:
    """The Markdown tables of ``[relay]``, ``[http]`` and ``[auth]`` (docs/relay.md)."""
    return render_markdown(RELAY_REGISTRY, heading_level=4, sections=DOCS_SECTIONS)


def render_journal_docs_block() -> str:
    """The Markdown table of ``[journal]`` (docs/journal.md)."""
    return render_markdown(RELAY_REGISTRY, heading_level=4, sections=("journal",))


def render_example() -> str:
    """An example TOML file with every relay setting and its default."""
    return render_example_toml(RELAY_REGISTRY, title=EXAMPLE_TITLE)


def _write_docs(root: Path) -> None:
    blocks = (
        ("relay.md", DOCS_BLOCK, render_docs_block()),
        ("journal.md", JOURNAL_DOCS_BLOCK, render_journal_docs_block()),
    )
    for name, block, content in blocks:
        doc = root / "docs" / name
        doc.write_text(replace_generated_block(doc.read_text(), block, content))
        print(f"wrote {doc}")


def _main(argv: list[str]) -> int:
    usage = "usage: python -m relay.settings {markdown|example|write [PROJECT_ROOT]}"
    if not argv or argv[0] not in {"markdown", "example", "write"}:
        print(usage, file=sys.stderr)
        return 2
    if argv[0] == "markdown":
        sys.stdout.write(render_docs_block())
    elif argv[0] == "example":
        sys.stdout.write(render_example())
    else:
        _write_docs(Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
