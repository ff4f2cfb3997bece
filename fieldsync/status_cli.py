"""``fieldsync status``: thin typer command over fieldsync/status.py (registered by
fieldsync/cli.py).

Exit codes (docs/operations.md, "fieldsync status"):

- 0 every part given is reachable and within bounds;
- 1 a part is down, behind or past a bound (:data:`fieldsync.status.EXIT_ATTENTION`);
- 2 usage or configuration error (no settings given, a file that does not load);
- 3 a part could not be read (:data:`fieldsync.status.EXIT_UNREACHABLE`; wins over 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cdc.settings import CdcSettings, load_cdc_settings
from core.errors import ConfigError
from core.logs import setup_logging
from core.redaction import hide_secrets
from fieldsync.status import Bounds, read_pipeline_status
from fieldsync.status_view import render
from relay.downstream.engine_status import ruled_topics
from relay.settings import RelaySettings, load_relay_settings

__all__ = ["EXIT_USAGE", "status"]

EXIT_USAGE = 2
_DEFAULTS = Bounds()


def _settings(
    cdc: Path | None, relay: Path | None
) -> tuple[CdcSettings | None, RelaySettings | None]:
    for flag, path in (("--cdc", cdc), ("--relay", relay)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag}: settings file {path} does not exist")
    cdc_settings = load_cdc_settings(cdc) if cdc is not None else None
    relay_settings = load_relay_settings(relay) if relay is not None else None
    if relay_settings is not None:  # the engine's topics come from it: a broken file is ours
        ruled_topics(relay_settings.relay.rules, relay_settings.relay.topic_prefix)
    for s in (cdc_settings, relay_settings):
        if s is not None:
            hide_secrets(s.secrets())
    return cdc_settings, relay_settings


def status(
    cdc: Annotated[
        Path | None,
        typer.Option("--cdc", help="cdc settings file (the one `fieldsync cdc run` reads)"),
    ] = None,
    relay: Annotated[
        Path | None,
        typer.Option(
            "--relay",
            help="relay settings file (the one `fieldsync relay run` and the applier read)",
        ),
    ] = None,
    relay_metrics: Annotated[
        list[str] | None,
        typer.Option(
            "--relay-metrics",
            help="a relay's metrics URL (http://host:port), repeatable, one per relay process; "
            "default: the address of the relay.metrics_listen setting",
        ),
    ] = None,
    max_wal_lag_bytes: Annotated[
        int, typer.Option(help="bound on WAL the slot has not confirmed, in bytes")
    ] = _DEFAULTS.max_wal_lag_bytes,
    max_engine_lag: Annotated[
        int, typer.Option(help="bound on change records the bucket engine has not applied")
    ] = _DEFAULTS.max_engine_lag,
    max_applier_lag: Annotated[
        int, typer.Option(help="bound on journal records the applier has not applied")
    ] = _DEFAULTS.max_applier_lag,
    max_dead_letters: Annotated[
        int | None,
        typer.Option(help="bound on entries the applier kept aside (default: none)"),
    ] = None,
    max_open_conflicts: Annotated[
        int | None,
        typer.Option(help="bound on conflicts waiting for a resolution (default: none)"),
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds each service has to answer")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """One view of the whole pipeline: cdc's slot and lag, the bucket engine's and the
    applier's lag, connected devices, open conflicts, dead letters.

    Give the cdc settings, the relay settings or both; each part is read from what it
    keeps (PostgreSQL, Kafka, the bucket store, the relays' metrics). Exit 0: all
    reachable and within bounds; 1: a part is down, behind or past a bound; 2: usage;
    3: a part could not be read (docs/operations.md)."""
    if cdc is None and relay is None:
        typer.echo("error: give --cdc FILE, --relay FILE or both", err=True)
        raise typer.Exit(EXIT_USAGE)
    try:
        cdc_settings, relay_settings = _settings(cdc, relay)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    setup_logging("WARNING")
    bounds = Bounds(
        max_wal_lag_bytes=max_wal_lag_bytes,
        max_engine_lag=max_engine_lag,
        max_applier_lag=max_applier_lag,
        max_dead_letters=max_dead_letters,
        max_open_conflicts=max_open_conflicts,
    )
    report = read_pipeline_status(
        cdc_settings,
        relay_settings,
        bounds=bounds,
        relay_metrics=relay_metrics or (),
        timeout_s=timeout,
    )
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2, default=str))
    else:
        render(report)
    raise typer.Exit(report.exit_code)
