"""``fieldsync relay applier --config FILE``: run the upstream applier (typer ``app``).

Mount it with ``relay_app.add_typer(applier_cli.app, name="applier")``; it also runs on
its own (``python -m relay.upstream.applier_cli --config FILE``).  Exit codes: 0 after SIGTERM /
SIGINT (the current run finishes first), 1 runtime failure, 2 invalid configuration
(the message names the file and key).  Metrics are served on
``journal.applier_metrics_listen`` (port + shard; relay/upstream/applier_metrics.py);
a port that cannot be bound is logged and the applier runs on without them.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from core.logs import hold_early_records, setup_logging
from core.metrics import serve_or_log
from core.redaction import hide_secrets
from relay.errors import ApplierError, ConfigError
from relay.settings import load_applier_settings
from relay.upstream import applier_metrics
from relay.upstream.applier import Applier
from relay.upstream.applier_db import ApplierDb

EXIT_RUNTIME = 1
EXIT_CONFIG = 2

app = typer.Typer(
    help="Upstream applier: device journal entries into PostgreSQL.",
    add_completion=False,
)


@app.callback(invoke_without_command=True)
def applier(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="relay TOML config (sections relay and journal); FIELDSYNC_<SECTION>_<KEY> env vars override it.",
        ),
    ] = None,
    shard: Annotated[
        int,
        typer.Option("--shard", help="which shard this process applies (0..journal.shards-1)."),
    ] = 0,
) -> None:
    """Consume {prefix}._journal into the captured database; publish {prefix}._outcomes."""
    try:
        with hold_early_records() as early:  # settings-file warnings, in the chosen format
            settings = load_applier_settings(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    hide_secrets(settings.secrets())
    setup_logging(settings.relay.log_level, settings.relay.log_format, "applier", early=early)
    j = settings.journal
    if not 0 <= shard < j.shards:
        typer.echo(
            f"error: --shard {shard} is not one of 0..{j.shards - 1} (journal.shards)", err=True
        )
        raise typer.Exit(EXIT_CONFIG)
    try:
        listen = applier_metrics.shard_listen(j.applier_metrics_listen, shard)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    captured = settings.captured_dsn()
    assert captured is not None  # load_applier_settings checks it
    db = ApplierDb(
        captured[0],
        settings.relay.rules,
        j.conflicts,
        password=captured[1],
        consumer=j.consumer,
        shard=shard,
        shards=j.shards,
        max_skew_ms=int(j.max_clock_skew_s * 1000),
        lock_timeout_ms=j.lock_timeout_ms,
    )
    runner = Applier(
        db,
        kafka=settings.kafka_client_kwargs(),
        prefix=settings.relay.topic_prefix,
        batch_max_entries=j.batch_max_entries,
        batch_max_ms=j.batch_max_ms,
        topic_partitions=j.topic_partitions,
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("applier: signal %d, stopping", signum)
        runner.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    metrics = serve_or_log(
        listen, registry=applier_metrics.REGISTRY, setting=applier_metrics.SETTING
    )
    applier_metrics.APPLIER_LAG.source = runner.lag
    try:
        runner.run()
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except ApplierError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_RUNTIME) from None
    finally:
        applier_metrics.APPLIER_LAG.source = None
        if metrics is not None:
            metrics.close()


if __name__ == "__main__":
    app()
