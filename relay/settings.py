"""Settings of the relay: ``[relay]`` (bucket store, rules, Kafka), ``[http]`` and ``[auth]``.

Declared with :mod:`core.settings_registry` (same TOML + ``FIELDSYNC_<SECTION>_<KEY>``
environment scheme as the cdc daemon); load them with :func:`load_relay_settings`::

    s = load_relay_settings("/etc/fieldsync/relay.toml")
    s.relay.store_dsn, s.relay.rules, s.http.port, s.auth.keys_file

Generated artefacts (the tables in docs/relay.md, an example TOML)::

    python -m relay.settings markdown   # Markdown tables
    python -m relay.settings example    # example TOML with every setting
    python -m relay.settings write      # rewrite the generated block in docs/relay.md

The module does no I/O except in :func:`load_relay_settings` and ``__main__``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cdc.settings import (
    _bootstrap_servers,
    _dsn,
    _non_negative,
    _positive,
    _topic_prefix,
    redact_dsn,
)
from core.settings_registry import (
    Registry,
    Section,
    Setting,
    render_example_toml,
    render_markdown,
    replace_generated_block,
)

__all__ = [
    "RELAY_REGISTRY",
    "AuthSettings",
    "HttpSettings",
    "RelayCoreSettings",
    "RelaySettings",
    "load_relay_settings",
]


def _port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port, 0 to 65535 (0: any free port)")


def _group(value: str) -> None:
    if not value or len(value) > 200 or any(c.isspace() for c in value):
        raise ValueError("must be 1 to 200 characters without spaces")


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
    batch_max_events: int
    batch_max_ms: int
    compact_interval_s: float
    log_level: str


@dataclasses.dataclass(frozen=True)
class HttpSettings:
    host: str
    port: int
    max_body_bytes: int
    max_page_ops: int
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

    def redacted(self) -> dict[str, dict[str, Any]]:
        """Every setting as plain data for logging; secrets are ``***``, DSN passwords masked."""
        return RELAY_REGISTRY.redact(self)

    def store_connect_kwargs(self) -> dict[str, Any]:
        """Extra psycopg connect arguments for the bucket store (the password, if set)."""
        return {"password": self.relay.store_password} if self.relay.store_password else {}

    def kafka_client_kwargs(self) -> dict[str, Any]:
        """kafka-python client arguments (bootstrap servers, security) from ``[relay]``."""
        r = self.relay
        kw: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in r.kafka_bootstrap_servers.split(",")],
            "security_protocol": r.kafka_security_protocol,
            "request_timeout_ms": int(r.kafka_timeout_s * 1000),
        }
        if r.kafka_security_protocol.startswith("SASL_"):
            kw.update(
                sasl_mechanism=r.kafka_sasl_mechanism,
                sasl_plain_username=r.kafka_sasl_username,
                sasl_plain_password=r.kafka_sasl_password,
            )
        if r.kafka_ssl_cafile:
            kw["ssl_cafile"] = r.kafka_ssl_cafile
        return kw


def _check_relay(r: RelayCoreSettings) -> None:
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
            check=_dsn,
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
            "Optional libpq connection string of the captured database, read (catalog only) for "
            "the columns and primary keys the rules are validated against. Unset: taken from the "
            "schemas in `{topic_prefix}._schemas` (tables appear there with their first event).",
            check=_dsn,
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
            check=_topic_prefix,
        ),
        Setting(
            "kafka_bootstrap_servers",
            str,
            "127.0.0.1:9092",
            "Comma-separated host:port list of Kafka brokers.",
            check=_bootstrap_servers,
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
            check=_positive,
        ),
        Setting(
            "consumer_group",
            str,
            "fieldsync-relay",
            "Name of the bucket engine: its consumer offsets are kept under this name in the "
            "bucket store, and of all relay processes sharing a store and this name exactly one "
            "runs the engine at a time (the others stand by).",
            check=_group,
        ),
        Setting(
            "batch_max_events",
            int,
            5000,
            "The engine applies at most this many change events per store transaction.",
            check=_positive,
        ),
        Setting(
            "batch_max_ms",
            int,
            50,
            "At most this many milliseconds pass between reading an event and applying it "
            "(when fewer than batch_max_events are waiting).",
            check=_non_negative,
        ),
        Setting(
            "compact_interval_s",
            float,
            300.0,
            "Seconds between compactions of the bucket logs (latest op per row); 0 disables.",
            check=_non_negative,
        ),
        Setting(
            "log_level",
            str,
            "INFO",
            "Log level.",
            choices=("DEBUG", "INFO", "WARNING", "ERROR"),
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
            check=_positive,
        ),
        Setting(
            "max_page_ops",
            int,
            5000,
            "Most ops returned by one changes request (a client may ask for fewer).",
            check=_positive,
        ),
        Setting(
            "long_poll_s",
            float,
            30.0,
            "Longest time a changes request waits for new ops before answering empty.",
            check=_non_negative,
        ),
        Setting(
            "rate_per_s",
            float,
            20.0,
            "Requests per second allowed per device (token bucket refill rate); 0 disables.",
            check=_non_negative,
        ),
        Setting(
            "rate_burst",
            int,
            40,
            "Requests a device may make in a burst (token bucket size).",
            check=_positive,
        ),
        Setting(
            "max_connections",
            int,
            10000,
            "Most concurrent connections one relay process holds, counting every open socket "
            "(HTTP, WebSocket, and connections that have not sent a whole request yet); "
            "past it a new connection gets 503 and is closed at once.",
            check=_positive,
        ),
        Setting(
            "ws_ping_s",
            float,
            20.0,
            "Seconds between WebSocket pings to idle clients; 0 disables.",
            check=_non_negative,
        ),
        Setting(
            "header_timeout_s",
            float,
            10.0,
            "Seconds a client has to send a request's line and headers, from connecting (or "
            "from the end of the previous response on a kept-alive connection), however "
            "slowly the bytes trickle in; later: 408 and the connection is closed.",
            check=_positive,
        ),
        Setting(
            "body_timeout_s",
            float,
            60.0,
            "Seconds a client has to send a request's whole body once its headers are in; "
            "later: 408 request_timeout and the connection is closed.",
            check=_positive,
        ),
        Setting(
            "keep_alive_s",
            float,
            5.0,
            "Seconds an idle kept-alive HTTP connection stays open waiting for the next request.",
            check=_positive,
        ),
        Setting(
            "max_header_bytes",
            int,
            98_304,
            "Largest request line plus headers, in bytes (a cursor of up to 64 KiB and a token "
            "of up to 16 KiB must fit); larger: 400 and the connection is closed.",
            check=_positive,
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
            check=_non_negative,
        ),
    ),
)

RELAY_REGISTRY: Registry[RelaySettings] = Registry("relay", RelaySettings, [RELAY, HTTP, AUTH])

DOCS_BLOCK = "relay settings"
EXAMPLE_TITLE = "fieldsync relay configuration (generated by `python -m relay.settings example`)"


def load_relay_settings(
    path: str | Path | None, environ: Mapping[str, str] | None = None
) -> RelaySettings:
    """Load the relay settings: defaults, the TOML file at *path* (if given), then *environ*.

    *environ* defaults to ``os.environ``.  Raises :class:`cdc.errors.ConfigError`.
    """
    if path is None:
        return RELAY_REGISTRY.load(None, environ)
    # One file serves `relay run` and `relay applier`: the applier's [journal] section is
    # validated by relay.upstream.applier_settings, so it is set aside here (everything else is checked).
    from core.settings_registry import _read_toml

    data = {k: v for k, v in _read_toml(Path(path)).items() if k != "journal"}
    return RELAY_REGISTRY.load_data(data, source=str(path), environ=environ)


def render_docs_block() -> str:
    """The Markdown tables of the relay settings (generated block in docs/relay.md)."""
    return render_markdown(RELAY_REGISTRY, heading_level=4)


def render_example() -> str:
    """An example TOML file with every relay setting and its default."""
    return render_example_toml(RELAY_REGISTRY, title=EXAMPLE_TITLE)


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
        root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
        doc = root / "docs" / "relay.md"
        doc.write_text(replace_generated_block(doc.read_text(), DOCS_BLOCK, render_docs_block()))
        print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
