"""What the ``device-agent`` commands share: consoles, options, output, errors, opening.

- :func:`emit`: a command's result, as JSON on stdout with ``--json`` (machine-readable,
  nothing else on stdout) or as text;
- :func:`errors`: a :class:`~device_agent.errors.DeviceAgentError` becomes ``error: …``
  on stderr (and an ``{"error": …}`` object with ``--json``) and the error's exit code
  (device_agent/cli.py lists them);
- :func:`db_key`: the key of an encrypted database (device_agent/crypto.py), None for a
  plain one;
- :func:`open_agent`: a sync :class:`~device_agent.sync.Agent` on an existing database.

Each command runs in the calling thread and closes what it opened.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.console import Console

from device_agent import crypto
from device_agent.errors import DeviceAgentError, EncryptionError, StateError
from device_agent.sync import Agent

EXIT_OK = 0
EXIT_USAGE = 2

err = Console(stderr=True)
out = Console()

DbOpt = Annotated[
    str,
    typer.Option("--db", envvar="DEVICE_AGENT_DB", help="the device database file"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output on stdout")]
KeyFileOpt = Annotated[
    str | None,
    typer.Option("--key-file", envvar=crypto.KEY_FILE_ENV, help="file holding the encryption key"),
]


def emit(as_json: bool, data: Any, text: str | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, default=str, ensure_ascii=False) + "\n")
    elif text is not None:
        out.print(text, highlight=False, markup=False)


def db_key(db: str, key_file: str | None, create: bool = False) -> str | None:
    if not create and not crypto.is_encrypted(db):
        return None
    key = crypto.find_key(db, key_file)
    if key is None and not create:
        raise EncryptionError(
            f"{db} is encrypted: give its key in ${crypto.KEY_ENV}, a key file "
            f"(--key-file or ${crypto.KEY_FILE_ENV}) or the OS keyring"
        )
    return key


@contextlib.contextmanager
def errors(as_json: bool) -> Iterator[None]:
    try:
        yield
    except DeviceAgentError as exc:
        if as_json:
            emit(
                True,
                {
                    "error": {
                        "type": type(exc).__name__,
                        "message": str(exc),
                        "exit_code": exc.exit_code,
                    }
                },
            )
        err.print(f"error: {exc}", highlight=False, markup=False)
        raise typer.Exit(exc.exit_code) from None


def open_agent(db: str, key_file: str | None, progress: Any = None) -> Agent:
    if not os.path.exists(db):
        raise StateError(
            f"{db} does not exist; run device-agent init --relay URL --token TOKEN --db {db}"
        )
    return Agent(
        db,
        key=db_key(db, key_file),
        progress=progress,
        on_event=lambda m: err.print(m, highlight=False, markup=False),
    )


def when(value: str | None) -> str:
    if not value:
        return "never"
    return dt.datetime.fromtimestamp(float(value), dt.UTC).isoformat(timespec="seconds")
