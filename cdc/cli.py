"""``fieldsync cdc``: thin typer CLI over the cdc library (mounted by :mod:`fieldsync.cli`).

Commands parse arguments, call the library, and turn domain errors into exit
codes and one-line messages:

- 0 success; 1 runtime failure; 2 configuration or preflight error (names the fix);
  3 the replication slot is lost (or gone while Kafka holds a resume position, or a
  recovery did not finish): ``fieldsync cdc recover`` is the way on (docs/cdc.md).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cdc.errors import CdcError, ConfigError, PreflightError, SlotLost
from core.errors import FieldsyncError
from core.logs import hold_early_records, setup_logging
from core.redaction import hide_secrets

app = typer.Typer(
    help="PostgreSQL logical replication (pgoutput) into Kafka.", no_args_is_help=True
)

EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_SLOT_LOST = 3

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
    """Run the CDC daemon until SIGTERM (systemd Type=notify aware).

    Serves Prometheus metrics on cdc.metrics_listen. Exits 3 when the replication slot is
    lost: `fieldsync cdc recover` then makes a new one and sends every table again."""
    from cdc import metrics
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
    server = metrics.serve(settings.cdc.metrics_listen)
    try:
        code = daemon.run()
    except (PreflightError, ConfigError) as exc:
        raise _fail(exc, EXIT_CONFIG) from None
    except SlotLost as exc:
        raise _fail(exc, EXIT_SLOT_LOST) from None
    except FieldsyncError as exc:
        raise _fail(exc, EXIT_RUNTIME) from None
    finally:
        if server is not None:
            server.close()
    raise typer.Exit(code)


@app.command("recover")
def cdc_recover(
    config: ConfigOpt = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="do not ask before changing anything")
    ] = False,
) -> None:
    """Recover from a lost replication slot: drop it, create a new one and send every
    published table again, so Kafka and its consumers miss nothing.

    Run it with `fieldsync cdc run` stopped, when the daemon exited with code 3. It marks
    the recovery in Kafka, makes the new slot, asks for a re-snapshot of every table with a
    primary key (signal table), writes delete events for rows deleted meanwhile, and says
    what to check. Safe to run again if it was interrupted (docs/cdc.md, "Lost slot")."""
    import psycopg

    from cdc.slot_recovery import assess, recover

    try:
        settings = _load(config)
    except ConfigError as exc:
        raise _fail(exc, EXIT_CONFIG) from None
    setup_logging("WARNING")
    try:
        found = assess(settings)
        if not found.needed:
            typer.echo(found.reason)
            return
        typer.echo(found.reason, err=True)
        pg = settings.postgres
        if not yes:
            typer.confirm(
                f"Drop and re-create slot {pg.slot!r} and send every table of publication "
                f"{pg.publication!r} again?",
                abort=True,
            )
        done = recover(settings, found, echo=typer.echo)
    except (PreflightError, ConfigError) as exc:
        raise _fail(exc, EXIT_CONFIG) from None
    except FieldsyncError as exc:
        raise _fail(exc, EXIT_RUNTIME) from None
    except psycopg.Error as exc:
        raise _fail(CdcError(f"PostgreSQL: {str(exc).strip()}"), EXIT_RUNTIME) from None
    _report_recovery(settings, done, config)


def _report_recovery(settings: Any, done: Any, config: Path | None) -> None:
    pg = settings.postgres
    deleted = sum(done.deletes.values())
    typer.echo(f"{deleted} delete event(s) written for rows that are gone from PostgreSQL")
    for table in done.keyless:
        typer.echo(
            f"warning: {table} has no primary key and is NOT sent again: consumers may miss "
            "its changes while the slot was lost (give it a primary key, then "
            f"`fieldsync cdc snapshot --table {table}`)",
            err=True,
        )
    ids = ", ".join(str(i) for _, i in done.signals) or "none"
    where = f" --config {config}" if config is not None else ""
    typer.echo(
        "next:\n"
        f"  1. start the daemon: `fieldsync cdc run{where}` (or systemctl start fieldsync-cdc)\n"
        f"  2. watch the re-snapshots finish: `fieldsync cdc status{where}` lists them until "
        f"none is left, and `select id, table_name, status from {pg.signal_table} where id in "
        f"({ids})` shows 'done: N row(s)' for each\n"
        f"  3. check the log against PostgreSQL: `fieldsync replay verify{where}`"
    )


@app.command("status")
def cdc_status(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show the slot, its confirmed position, lag in bytes, its WAL status, the last event
    time and the re-snapshots queued or running."""
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
    resume = out.get("kafka_position")
    if not out["exists"]:
        typer.echo(
            f"error: replication slot {pg.slot!r} does not exist in {redact_dsn(pg.dsn)}; "
            + (
                "Kafka holds a resume position for it, so it was lost: run `fieldsync cdc "
                "recover` (docs/cdc.md, Lost slot)"
                if resume is not None
                else "`fieldsync cdc run` creates it when it first starts (check "
                "postgres.slot and postgres.dsn)"
            ),
            err=True,
        )
        raise typer.Exit(EXIT_RUNTIME if resume is None else EXIT_SLOT_LOST)
    if out.get("slot_lost"):
        typer.echo(f"error: {out['slot_lost']}", err=True)
        raise typer.Exit(EXIT_SLOT_LOST)


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
