"""``fieldsync cdc``: thin typer CLI over the cdc library (mounted by :mod:`fieldsync.cli`).

Commands parse arguments, call the library, and turn domain errors into exit
codes and one-line messages:

- 0 success; 1 runtime failure; 2 configuration or preflight error (names the fix).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cdc.errors import CdcError, ConfigError, PreflightError
from core.errors import FieldsyncError
from core.logs import hold_early_records, setup_logging
from core.redaction import hide_secrets

app = typer.Typer(
    help="PostgreSQL logical replication (pgoutput) into Kafka.", no_args_is_help=True
)

EXIT_RUNTIME = 1
EXIT_CONFIG = 2

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML config file (see config/cdc.example.toml); FIELDSYNC_<SECTION>_<KEY> env vars override it.",
    ),
]


def _fail(exc: Exception, code: int) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code)


def _load(config: Path | None) -> Any:
    from cdc.settings import load_cdc_settings

    if config is not None and not config.exists():
        raise ConfigError(f"config file {config} does not exist")
    settings = load_cdc_settings(config)
    hide_secrets(settings.secrets())  # never in a log line, whatever logs it
    return settings


@app.command("run")
def cdc_run(config: ConfigOpt = None) -> None:
    """Run the CDC daemon until SIGTERM (systemd Type=notify aware)."""
    from cdc.pipeline import CdcDaemon
    from core.systemd_notify import Notifier

    try:
        with hold_early_records() as early:  # settings-file warnings, in the chosen format
            settings = _load(config)
    except ConfigError as exc:
        raise _fail(exc, EXIT_CONFIG) from None
    setup_logging(
        settings.cdc.log_level,
        settings.cdc.log_format,
        "cdc",
        context={"slot": settings.postgres.slot},
        early=early,
    )
    logging.getLogger("fieldsync.cdc").info("settings: %s", json.dumps(settings.redacted()))
    daemon = CdcDaemon(settings, notifier=Notifier.from_env(unset_environment=True))
    daemon.install_signal_handlers()
    try:
        code = daemon.run()
    except (PreflightError, ConfigError) as exc:
        raise _fail(exc, EXIT_CONFIG) from None
    except FieldsyncError as exc:
        raise _fail(exc, EXIT_RUNTIME) from None
    raise typer.Exit(code)


@app.command("status")
def cdc_status(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show the slot, its confirmed position, lag in bytes, the last event time and the
    re-snapshots queued or running."""
    from cdc.status import read_status
    from core.settings_checks import redact_dsn

    try:
        settings = _load(config)
    except ConfigError as exc:
        raise _fail(exc, EXIT_CONFIG) from None
    setup_logging("WARNING")
    pg = settings.postgres
    try:
        out = read_status(settings)
    except FieldsyncError as exc:
        raise _fail(exc, EXIT_RUNTIME) from None
    if as_json:
        typer.echo(json.dumps(out, indent=2, default=str))
    else:
        for k, v in out.items():
            typer.echo(f"{k:22} {v}")
    if not out["exists"]:
        typer.echo(
            f"error: replication slot {pg.slot!r} does not exist in {redact_dsn(pg.dsn)}; "
            "`fieldsync cdc run` creates it when it first starts (check postgres.slot and postgres.dsn)",
            err=True,
        )
        raise typer.Exit(EXIT_RUNTIME)


@app.command("snapshot")
def cdc_snapshot(
    table: Annotated[
        str,
        typer.Option(
            "--table", "-t", help="the table to re-send: 'schema.table', or 'table' in public"
        ),
    ],
    config: ConfigOpt = None,
    where: Annotated[
        str | None,
        typer.Option(
            "--where",
            help="only the rows this restricted WHERE clause selects: conditions joined by AND, "
            "each `column op value` (=, <>, !=, <, <=, >, >=), `column IS [NOT] NULL`, "
            "`column [NOT] IN (v, …)` or `column BETWEEN v AND v`; values are 'text', "
            "numbers, true or false. Checked against the table; never pasted into SQL.",
        ),
    ] = None,
    wait: Annotated[
        float,
        typer.Option(help="seconds to wait for the running daemon to finish it (0: do not wait)"),
    ] = 0.0,
) -> None:
    """Re-send a table's rows to Kafka as op 'r' events while the daemon streams on.

    Inserts a request into the signal table (postgres.signal_table); the running daemon
    reads it from the stream and re-reads the table in chunks between watermarks, so no
    newer change is overwritten (docs/cdc.md, "Re-snapshots"). No new slot is needed.
    """
    import psycopg

    from cdc.errors import SnapshotRequestError
    from cdc.pg_source import connect
    from cdc.resnapshot_requests import request_snapshot, signal_status

    try:
        settings = _load(config)
    except ConfigError as exc:
        raise _fail(exc, EXIT_CONFIG) from None
    setup_logging("WARNING")
    pg = settings.postgres
    try:
        with connect(pg.dsn, pg.password) as conn:
            signal_id, qualified = request_snapshot(
                conn,
                publication=pg.publication,
                signal_table=pg.signal_table,
                table=table,
                where=where,
            )
            typer.echo(
                f"re-snapshot of {qualified} requested: signal {signal_id} in "
                f"{pg.signal_table}; the running daemon picks it up from the stream"
            )
            if wait <= 0:
                return
            deadline = time.monotonic() + wait
            status = signal_status(conn, pg.signal_table, signal_id)
            while not status.startswith(("done", "rejected")) and time.monotonic() < deadline:
                time.sleep(0.3)
                status = signal_status(conn, pg.signal_table, signal_id)
    except SnapshotRequestError as exc:
        raise _fail(exc, EXIT_CONFIG) from None
    except FieldsyncError as exc:
        raise _fail(exc, EXIT_RUNTIME) from None
    except psycopg.Error as exc:
        raise _fail(CdcError(f"PostgreSQL: {str(exc).strip()}"), EXIT_RUNTIME) from None
    typer.echo(f"signal {signal_id}: {status}")
    if not status.startswith("done"):
        if not status.startswith("rejected"):
            typer.echo(
                f"error: signal {signal_id} is still {status!r} after {wait:g}s: is "
                "`fieldsync cdc run` running?",
                err=True,
            )
        raise typer.Exit(EXIT_RUNTIME)
