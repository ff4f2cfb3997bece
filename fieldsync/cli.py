"""The ``fieldsync`` command: every server-side component's CLI under one name.

Sub-commands are registered here explicitly, each from the package that owns it:

- ``fieldsync cdc …``            :mod:`cdc.cli` (capture: PostgreSQL → Kafka)
- ``fieldsync relay …``          :mod:`relay.cli` (device streams), with
  ``fieldsync relay applier …``  :mod:`relay.upstream.applier_cli` (journal → PostgreSQL)
- ``fieldsync token …``          :mod:`relay.cli` (device tokens)
- ``fieldsync replay …``         :mod:`replay.cli` (audit reads of the Kafka log)
- ``fieldsync status``           :mod:`fieldsync.status_cli` (the whole pipeline at a glance)
- ``fieldsync up`` / ``demo``    :mod:`devtools.cli` (embedded services; development only)

Each role is an install extra (``fieldsync[cdc]``, ``[relay]``, ``[replay]``, ``[dev]``).
When a role's third-party libraries are not installed, its sub-command is still listed
and says which extra to install (exit 2).  Any other import error is a bug and is raised.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer

OUR_PACKAGES = frozenset(
    {"core", "cdc", "relay", "replay", "devtools", "device_agent", "fieldsync"}
)
EXIT_MISSING_EXTRA = 2

app = typer.Typer(
    name="fieldsync",
    help="fieldsync server side: cdc, relay, replay, and a local demo.",
    no_args_is_help=True,
    add_completion=False,
)


def _load(module: str, extra: str) -> Any:
    """Import ``module``; ``None`` when a library of the ``extra`` role is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.split(".")[0] in OUR_PACKAGES:
            raise
        return _MissingExtra(extra, exc.name)


class _MissingExtra:
    """Stands in for a module whose role's libraries are not installed."""

    def __init__(self, extra: str, missing: str) -> None:
        self.extra, self.missing = extra, missing

    def typer_app(self, help_text: str) -> typer.Typer:
        sub = typer.Typer(help=f"{help_text} [needs: pip install 'fieldsync[{self.extra}]']")

        @sub.callback(invoke_without_command=True)
        def missing() -> None:
            typer.echo(
                f"error: this command needs the {self.extra!r} extra "
                f"(Python module {self.missing!r} is not installed): "
                f"pip install 'fieldsync[{self.extra}]'",
                err=True,
            )
            raise typer.Exit(EXIT_MISSING_EXTRA)

        return sub


def _sub(module: str, attr: str, extra: str, help_text: str) -> typer.Typer:
    mod = _load(module, extra)
    if isinstance(mod, _MissingExtra):
        return mod.typer_app(help_text)
    sub: typer.Typer = getattr(mod, attr)
    return sub


def _register() -> None:
    app.add_typer(
        _sub("cdc.cli", "app", "cdc", "PostgreSQL logical replication (pgoutput) into Kafka."),
        name="cdc",
    )
    relay_app = _sub("relay.cli", "app", "relay", "The relay: per-device streams.")
    relay_app.add_typer(
        _sub(
            "relay.upstream.applier_cli",
            "app",
            "relay",
            "The applier: device edits into PostgreSQL.",
        ),
        name="applier",
    )
    app.add_typer(relay_app, name="relay")
    app.add_typer(_sub("relay.cli", "token_app", "relay", "Device tokens."), name="token")
    app.add_typer(
        _sub("replay.cli", "app", "replay", "Audit reads of the Kafka log."), name="replay"
    )
    status = _load("fieldsync.status_cli", "server")
    if isinstance(status, _MissingExtra):
        app.add_typer(status.typer_app("The whole pipeline at a glance."), name="status")
    else:
        app.command("status")(status.status)
    dev = _load("devtools.cli", "dev")
    if isinstance(dev, _MissingExtra):
        app.add_typer(dev.typer_app("Embedded services for development."), name="up")
        app.add_typer(dev.typer_app("The whole pipeline on embedded services."), name="demo")
    else:
        app.command("up")(dev.up)
        app.command("demo")(dev.demo)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
