"""Settings of journal intake and the upstream applier: the ``[journal]`` section.

The applier reads the relay's configuration file (``[relay]`` for the rules, the topic
prefix and Kafka; ``[http]``/``[auth]`` are accepted and ignored) plus ``[journal]``::

    s = load_applier_settings("/etc/fieldsync/relay.toml")
    s.journal.conflicts, s.applier_dsn(), s.relay.kafka_client_kwargs()

Same TOML + ``FIELDSYNC_<SECTION>_<KEY>`` environment scheme as the other settings
(:mod:`core.settings_registry`).  ``[journal]`` lives in a registry of its own here so
it can be merged into :data:`relay.settings.RELAY_REGISTRY` later (one entry in its
sections list) without changing any key.

Generated artefacts: ``python -m relay.upstream.applier_settings markdown|example``.
The module does no I/O except in :func:`load_applier_settings` and ``__main__``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cdc.settings import _dsn, _non_negative, _positive, redact_dsn
from core.settings_registry import (
    Registry,
    Section,
    Setting,
    render_example_toml,
    render_markdown,
)
from relay.settings import (
    AUTH,
    HTTP,
    RELAY,
    AuthSettings,
    HttpSettings,
    RelayCoreSettings,
    RelaySettings,
)
from relay.upstream.validation import JournalLimits

__all__ = [
    "APPLIER_REGISTRY",
    "JOURNAL",
    "ApplierSettings",
    "JournalSettings",
    "load_applier_settings",
]


def _name(value: str) -> None:
    if not value or len(value) > 200 or any(c.isspace() for c in value):
        raise ValueError("must be 1 to 200 characters without spaces")


@dataclasses.dataclass(frozen=True)
class JournalSettings:
    dsn: str | None
    password: str | None
    conflicts: str | None
    consumer: str
    shards: int
    batch_max_entries: int
    batch_max_ms: int
    max_clock_skew_s: float
    max_upload_entries: int
    max_entry_bytes: int
    topic_partitions: int
    retention_days: float

    def limits(self) -> JournalLimits:
        """Upload limits for the intake endpoint."""
        return JournalLimits(self.max_upload_entries, self.max_entry_bytes)


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
            check=_dsn,
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
            check=_name,
        ),
        Setting(
            "shards",
            int,
            1,
            "Number of applier processes sharing the work: run one per shard (`fieldsync relay "
            "applier --shard N`, N = 0..shards-1); shard N applies the devices of the journal "
            "partitions p with p mod shards = N. At most the number of partitions.",
            check=_positive,
        ),
        Setting(
            "batch_max_entries",
            int,
            500,
            "The applier applies at most this many entries of one device per PostgreSQL "
            "transaction.",
            check=_positive,
        ),
        Setting(
            "batch_max_ms",
            int,
            50,
            "At most this many milliseconds pass between reading an entry and applying it.",
            check=_non_negative,
        ),
        Setting(
            "max_clock_skew_s",
            float,
            60.0,
            "`lww`/`fww`: a device edit time more than this far in the future is clamped "
            "to now + this.",
            check=_non_negative,
        ),
        Setting(
            "max_upload_entries",
            int,
            500,
            "Most entries one journal upload may carry (more: HTTP 413, split the upload).",
            check=_positive,
        ),
        Setting(
            "max_entry_bytes",
            int,
            262_144,
            "Largest JSON size of one journal entry; larger entries are rejected "
            "(`entry_too_large`).",
            check=_positive,
        ),
        Setting(
            "topic_partitions",
            int,
            4,
            "Partitions of `{prefix}._journal` and `{prefix}._outcomes` when the applier "
            "creates them.",
            check=_positive,
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
            check=_non_negative,
        ),
    ),
)


@dataclasses.dataclass(frozen=True)
class ApplierSettings:
    relay: RelayCoreSettings
    http: HttpSettings
    auth: AuthSettings
    journal: JournalSettings

    def relay_settings(self) -> RelaySettings:
        return RelaySettings(self.relay, self.http, self.auth)

    def applier_dsn(self) -> str:
        """The captured database: ``journal.dsn``, else ``relay.source_dsn``."""
        dsn = self.journal.dsn or self.relay.source_dsn
        assert dsn is not None  # _check guarantees it
        return dsn

    def applier_password(self) -> str | None:
        if self.journal.dsn:
            return self.journal.password
        return self.journal.password or self.relay.source_password

    def kafka_client_kwargs(self) -> dict[str, Any]:
        return self.relay_settings().kafka_client_kwargs()

    def redacted(self) -> dict[str, dict[str, Any]]:
        return APPLIER_REGISTRY.redact(self)


def _check(s: ApplierSettings) -> None:
    if not s.journal.dsn and not s.relay.source_dsn:
        raise ValueError(
            "the applier needs the captured database: set journal.dsn (or relay.source_dsn)"
        )


APPLIER_REGISTRY: Registry[ApplierSettings] = Registry(
    "applier", ApplierSettings, [RELAY, HTTP, AUTH, JOURNAL], check=_check
)


def load_applier_settings(
    path: str | Path | None, environ: Mapping[str, str] | None = None
) -> ApplierSettings:
    """Defaults, the TOML file at *path* (if given), then *environ* (default ``os.environ``).

    Raises :class:`cdc.errors.ConfigError` naming the key at fault.
    """
    return APPLIER_REGISTRY.load(path, environ)


def _main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"markdown", "example"}:
        print(
            "usage: python -m relay.upstream.applier_settings {markdown|example}", file=sys.stderr
        )
        return 2
    if argv[0] == "markdown":
        sys.stdout.write(render_markdown(APPLIER_REGISTRY, heading_level=4))
    else:
        sys.stdout.write(render_example_toml(APPLIER_REGISTRY, title="fieldsync applier settings"))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
