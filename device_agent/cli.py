"""``device-agent``: the command line of the device agent (typer app :data:`app`).

Commands::

    device-agent init --relay URL --token TOKEN --db PATH [--encrypt]
    device-agent sync --once | --watch [--no-ws]
    device-agent status | journal | verify | reset
    device-agent conflicts list | show ID | resolve ID --mine|--theirs|--set col=value

Every command takes ``--db PATH`` (default ``$DEVICE_AGENT_DB`` or ``./fieldsync.db``),
``--json`` (machine-readable output on stdout) and ``--key-file`` (encryption key).

Exit codes (also in docs/device-agent.md):

====  ==============================================================================
0     success
1     other failure (the relay answered an error, an unexpected problem)
2     usage or state error (bad arguments, the database is not initialized)
3     relay unreachable: the agent works offline; local data stays usable
4     the token was refused (expired, revoked, invalid): get a new token
5     the server's schema changed and the local tables cannot follow (says what blocks)
6     verify found buckets that differ from the relay's checksums, or rows that differ
      from the received versions with the open edits on top
7     encryption: key missing or wrong, SQLCipher not installed
====  ==============================================================================

This module holds the app, ``init``, ``sync`` and ``reset``; ``status``, ``journal`` and
``verify`` are in device_agent/cli_inspect.py, ``conflicts`` in
device_agent/cli_conflicts.py, the options, output and error handling they share in
device_agent/cli_common.py.  Every command works on the database in the calling thread
(``sync --watch`` until SIGINT or SIGTERM) and closes it before it returns.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import threading
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from device_agent import crypto, local_db, local_tables, triggers
from device_agent.cli_common import (
    EXIT_USAGE,
    DbOpt,
    JsonOpt,
    KeyFileOpt,
    db_key,
    emit,
    err,
    errors,
    open_agent,
)
from device_agent.cli_conflicts import conflicts_app
from device_agent.cli_inspect import journal, status, verify
from device_agent.errors import StateError
from device_agent.local_db import set_meta
from device_agent.local_tables import PREFIX, transaction
from device_agent.sync import init_database

app = typer.Typer(
    help="fieldsync device agent: offline-first SQLite synced with the relay.",
    no_args_is_help=True,
    add_completion=False,
)


def init(
    relay: Annotated[str, typer.Option("--relay", help="relay base URL, e.g. https://relay:8470")],
    token: Annotated[
        str, typer.Option("--token", envvar="DEVICE_AGENT_TOKEN", help="device token")
    ],
    db: DbOpt = "fieldsync.db",
    encrypt: Annotated[
        bool, typer.Option("--encrypt", help="encrypt the database (SQLCipher)")
    ] = False,
    key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the local database from the relay's schema (or re-point it: new token/URL)."""
    with errors(as_json):
        key = None
        if encrypt or crypto.is_encrypted(db):
            key = db_key(db, key_file, create=True)
            if key is None:
                key = secrets.token_urlsafe(32)
                crypto.store_in_keyring(db, key)
                err.print("generated an encryption key and stored it in the OS keyring")
        result = init_database(db, relay, token, key=key)
        result["encrypted"] = key is not None
        emit(
            as_json,
            result,
            f"initialized {db} for device {result['device_id']}: tables "
            f"{', '.join(result['tables']) or '(none)'}; buckets {', '.join(result['buckets'])}",
        )


def sync(
    once: Annotated[bool, typer.Option("--once", help="one round, then exit")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="follow live changes until stopped")
    ] = False,
    no_ws: Annotated[bool, typer.Option("--no-ws", help="long-poll instead of WebSocket")] = False,
    db: DbOpt = "fieldsync.db",
    key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload local edits, download and apply the server's changes."""
    if once == watch:
        err.print("error: give exactly one of --once or --watch")
        raise typer.Exit(EXIT_USAGE)
    with errors(as_json), _progress(not as_json) as progress:
        agent = open_agent(db, key_file, progress)
        try:
            if once:
                report = agent.sync_once()
                data = report.to_json()
                emit(as_json, data, _sync_text(data))
                return
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            err.print(f"watching {agent.relay_url} (Ctrl-C to stop)")
            agent.watch(stop, use_ws=not no_ws)
        finally:
            agent.close()


def _sync_text(data: dict[str, Any]) -> str:
    parts = [f"applied {data['ops']} op(s) in {data['seconds']} s"]
    if data["uploaded"] or data["rejected"]:
        parts.append(f"uploaded {data['uploaded']} edit(s), {data['rejected']} rejected")
    if data["journal_note"]:
        parts.append(data["journal_note"])
    if data["verified"]:
        parts.append(f"checksums verified: {', '.join(data['verified'])}")
    parts += data["schema_notes"]
    return "; ".join(parts)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled or not err.is_terminal:
        yield None
        return
    bar = Progress(
        TextColumn("downloading"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} ops"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    task = bar.add_task("download", total=None)

    def update(done: int, total: int | None) -> None:
        if total is not None and total >= 1000:
            bar.start()
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        bar.stop()


def reset(
    discard_edits: Annotated[
        bool, typer.Option("--discard-edits", help="also drop edits not synced yet")
    ] = False,
    db: DbOpt = "fieldsync.db",
    key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Forget all synced rows and download everything again on the next sync."""
    with errors(as_json):
        conn = local_db.connect(db, db_key(db, key_file))
        local_db.require_initialized(conn, db)
        pending = conn.execute(
            f"select count(*) from {PREFIX}journal where status in ('pending', 'sent')"
        ).fetchone()[0]
        if pending and not discard_edits:
            raise StateError(
                f"{pending} local edit(s) are not synced yet; sync first, or reset with "
                "--discard-edits to lose them"
            )
        tables = local_tables.load_tables(conn)
        with transaction(conn), triggers.suspended(conn, tables.values()):
            for t in tables.values():
                conn.execute(f"delete from {local_tables.q(t.local)}")
            for name in ("rows", "buckets", "staging", "conflicts"):
                conn.execute(f"delete from {PREFIX}{name}")
            # settled edits awaiting their server version: everything comes down again
            conn.execute(f"update {PREFIX}journal set await_lsn = null where await_lsn is not null")
            if discard_edits:  # kept (seqs must never be reused), marked failed
                conn.execute(
                    f"""update {PREFIX}journal set status = 'failed', reason = 'discarded',
                            message = 'discarded by device-agent reset'
                        where status in ('pending', 'sent')"""
                )
            for key in (
                "cursor",
                "staging_cursor",
                "staging_ops",
                "last_sync_at",
                "outcomes_cursor",
            ):
                set_meta(conn, key, None)
        conn.close()
        emit(
            as_json,
            {"reset": True, "discarded_edits": pending if discard_edits else 0},
            "reset: everything is downloaded again on the next sync",
        )


# the commands, in the order help lists them
app.command()(init)
app.command()(sync)
app.command()(status)
app.command()(journal)
app.command()(verify)
app.command()(reset)
app.add_typer(conflicts_app, name="conflicts")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
