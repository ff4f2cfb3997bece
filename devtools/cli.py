"""Development commands: ``fieldsync up`` and ``fieldsync demo`` (mounted by :mod:`fieldsync.cli`).

Both run on embedded services (:mod:`devtools.local_services`): a throw-away PostgreSQL with
``wal_level=logical`` and a Kafka-protocol broker, bound to loopback.  Nothing here is part
of a production deployment.
"""

from __future__ import annotations

import threading
from typing import Annotated

import typer

from core.errors import FieldsyncError
from core.logs import setup_logging

EXIT_RUNTIME = 1


def _fail(exc: Exception, code: int) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code)


def up(
    seconds: Annotated[
        float, typer.Option(help="stop after this many seconds (0 = until Ctrl-C)")
    ] = 0.0,
) -> None:
    """Start an embedded PostgreSQL (wal_level=logical) and broker for development; print how to reach them."""
    import signal

    from devtools.local_services import EmbeddedBroker, EmbeddedPostgres

    setup_logging("WARNING")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with EmbeddedPostgres() as pg, EmbeddedBroker() as broker:
            typer.echo(f"postgres  {pg.dsn}")
            typer.echo(f"kafka     {broker.bootstrap}")
            typer.echo(
                "env       "
                + f"FIELDSYNC_POSTGRES_DSN={pg.dsn} FIELDSYNC_KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap}"
            )
            typer.echo("running; Ctrl-C to stop (data is thrown away)")
            try:
                stop.wait(seconds or None)
            except KeyboardInterrupt:
                pass
    except FieldsyncError as exc:
        raise _fail(exc, EXIT_RUNTIME) from None


def demo(
    seconds: Annotated[
        float, typer.Option(help="stop after this many seconds (0 = until Ctrl-C)")
    ] = 0.0,
    rate: Annotated[float, typer.Option(help="--cdc-only: demo writes per second")] = 2.0,
    cdc_only: Annotated[
        bool,
        typer.Option("--cdc-only", help="only cdc, printing events as Kafka acknowledges them"),
    ] = False,
    check: Annotated[
        bool, typer.Option("--check", help="stop once every step is checked (exit 0) or failed")
    ] = False,
) -> None:
    """The whole pipeline on an embedded PostgreSQL and broker: cdc, relay and applier as
    processes, a device synced with device-agent, each step checked (see devtools/demo.py)."""
    setup_logging("WARNING")
    if cdc_only:
        from devtools.cdc_demo import run_demo

        try:
            run_demo(seconds=seconds, rate=rate)
        except FieldsyncError as exc:
            raise _fail(exc, EXIT_RUNTIME) from None
        return
    from devtools.demo import run_full_demo

    try:
        run_full_demo(None if check else seconds)
    except FieldsyncError as exc:
        raise _fail(exc, EXIT_RUNTIME) from None
