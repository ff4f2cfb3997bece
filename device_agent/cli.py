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
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from device_agent import crypto, local_db
from device_agent.apply import local_checksums, refresh_rows
from device_agent.client import JournalUnsupported
from device_agent.consistency import check_tables
from device_agent.errors import (
    DeviceAgentError,
    EncryptionError,
    RelayUnreachable,
    StateError,
    VerifyFailed,
)
from device_agent.local_db import PREFIX, get_meta, set_meta, transaction
from device_agent.sync import Agent, init_database, wire_entries

EXIT_OK = 0
EXIT_USAGE = 2

app = typer.Typer(
    help="fieldsync device agent: offline-first SQLite synced with the relay.",
    no_args_is_help=True,
    add_completion=False,
)
conflicts_app = typer.Typer(help="Conflicts kept for a person to resolve.", no_args_is_help=True)
app.add_typer(conflicts_app, name="conflicts")

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


def _emit(as_json: bool, data: Any, text: str | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, default=str, ensure_ascii=False) + "\n")
    elif text is not None:
        out.print(text, highlight=False, markup=False)


def _key(db: str, key_file: str | None, create: bool = False) -> str | None:
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
def _errors(as_json: bool) -> Iterator[None]:
    try:
        yield
    except DeviceAgentError as exc:
        if as_json:
            _emit(
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


def _agent(db: str, key_file: str | None, progress: Any = None) -> Agent:
    if not os.path.exists(db):
        raise StateError(
            f"{db} does not exist; run device-agent init --relay URL --token TOKEN --db {db}"
        )
    return Agent(
        db,
        key=_key(db, key_file),
        progress=progress,
        on_event=lambda m: err.print(m, highlight=False, markup=False),
    )


def _when(value: str | None) -> str:
    if not value:
        return "never"
    return dt.datetime.fromtimestamp(float(value), dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- commands


@app.command()
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
    with _errors(as_json):
        key = None
        if encrypt or crypto.is_encrypted(db):
            key = _key(db, key_file, create=True)
            if key is None:
                key = secrets.token_urlsafe(32)
                crypto.store_in_keyring(db, key)
                err.print("generated an encryption key and stored it in the OS keyring")
        result = init_database(db, relay, token, key=key)
        result["encrypted"] = key is not None
        _emit(
            as_json,
            result,
            f"initialized {db} for device {result['device_id']}: tables "
            f"{', '.join(result['tables']) or '(none)'}; buckets {', '.join(result['buckets'])}",
        )


@app.command()
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
    with _errors(as_json), _progress(not as_json) as progress:
        agent = _agent(db, key_file, progress)
        try:
            if once:
                report = agent.sync_once()
                data = report.to_json()
                _emit(as_json, data, _sync_text(data))
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


@app.command()
def status(
    db: DbOpt = "fieldsync.db", key_file: KeyFileOpt = None, as_json: JsonOpt = False
) -> None:
    """Pending edits, last sync, lag and bucket states (no network)."""
    with _errors(as_json):
        conn = local_db.connect(db, _key(db, key_file))
        local_db.require_initialized(conn, db)
        counts = dict(
            conn.execute(f"select status, count(*) from {PREFIX}journal group by status").fetchall()
        )
        buckets = [
            {
                "bucket": name,
                "rows": count,
                "last_op_id": last,
                "state": state,
                "reset_pending": bool(reset),
                "verified_at": _when(str(verified) if verified else None),
            }
            for name, count, last, state, reset, verified in conn.execute(
                f"""select name, count, last_op_id, state, reset_pending, verified_at
                    from {PREFIX}buckets order by name"""
            )
        ]
        last_sync = get_meta(conn, "last_sync_at")
        data = {
            "db": db,
            "device_id": get_meta(conn, "device_id"),
            "relay": get_meta(conn, "relay_url"),
            "encrypted": crypto.is_encrypted(db),
            "journal": counts,
            "pending_edits": counts.get("pending", 0) + counts.get("sent", 0),
            "last_sync": _when(last_sync),
            "lag_s": round(dt.datetime.now(dt.UTC).timestamp() - float(last_sync), 1)
            if last_sync
            else None,
            "last_error": get_meta(conn, "last_error"),
            "download_in_progress": get_meta(conn, "staging_cursor") is not None,
            "open_conflicts": conn.execute(
                f"select count(*) from {PREFIX}conflicts where status = 'open'"
            ).fetchone()[0],
            "buckets": buckets,
        }
        conn.close()
        if as_json:
            _emit(True, data)
            return
        out.print(
            f"device {data['device_id']} · relay {data['relay']} · last sync {data['last_sync']}"
            f" · pending edits {data['pending_edits']} · open conflicts {data['open_conflicts']}",
            highlight=False,
            markup=False,
        )
        if data["last_error"]:
            out.print(f"last error: {data['last_error']}", highlight=False, markup=False)
        table = Table("bucket", "rows", "last op", "state", "verified")
        for b in buckets:
            table.add_row(
                b["bucket"],
                str(b["rows"]),
                str(b["last_op_id"]),
                b["state"] + (" (re-download)" if b["reset_pending"] else ""),
                b["verified_at"],
            )
        out.print(table)


@app.command()
def journal(
    status_filter: Annotated[
        str | None, typer.Option("--status", help="pending, sent, synced, failed or conflict")
    ] = None,
    limit: Annotated[int, typer.Option("--limit")] = 50,
    db: DbOpt = "fieldsync.db",
    key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Local edits and their outcomes (newest first)."""
    with _errors(as_json):
        conn = local_db.connect(db, _key(db, key_file))
        local_db.require_initialized(conn, db)
        tables = {t.id: t for t in local_db.load_tables(conn).values()}
        where, args = ("where status = ?", [status_filter]) if status_filter else ("", [])
        rows = []
        for seq, tid, k, op, st, reason, message, at_ms in conn.execute(
            f"""select seq, tbl, k, op, status, reason, message, at_ms from {PREFIX}journal
                {where} order by seq desc limit ?""",
            [*args, limit],
        ):
            t = tables.get(tid)
            rows.append(
                {
                    "seq": seq,
                    "table": t.name if t else tid,
                    "key": local_db.k_key(k, t.key_kinds()) if t else k,
                    "op": op,
                    "status": st,
                    "reason": reason,
                    "message": message,
                    "at": dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC).isoformat(
                        timespec="seconds"
                    ),
                }
            )
        conn.close()
        if as_json:
            _emit(True, rows)
            return
        table = Table("seq", "table", "key", "op", "status", "at", "reason / message")
        for r in rows:
            table.add_row(
                str(r["seq"]),
                str(r["table"]),
                json.dumps(r["key"]),
                r["op"],
                r["status"],
                r["at"],
                " ".join(x for x in (r["reason"], r["message"]) if x),
            )
        out.print(table)


@app.command()
def verify(
    no_sync: Annotated[bool, typer.Option("--no-sync", help="do not sync first")] = False,
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="no relay: compare with the checkpoints last received (implies --no-sync)",
        ),
    ] = False,
    db: DbOpt = "fieldsync.db",
    key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare every bucket's rows and checksum with the relay's checkpoint, and every
    table row with the received version and the open edits on top (exit 6 on a difference)."""
    with _errors(as_json):
        agent = _agent(db, key_file)
        try:
            if not (no_sync or local):
                agent.sync_once()
            server = (
                agent.client.checkpoint()["buckets"]
                if not local
                else {
                    name: {"last_op_id": last, "count": count, "checksum": checksum}
                    for name, last, count, checksum in agent.conn.execute(
                        f"""select name, last_op_id, server_count, server_checksum
                            from {PREFIX}buckets where server_count is not null"""
                    )
                }
            )
            mine = local_checksums(agent.conn)
            last_ops = dict(agent.conn.execute(f"select name, last_op_id from {PREFIX}buckets"))
            rows_bad = [p.to_json() for p in check_tables(agent.conn)]
        finally:
            agent.close()
        results = []
        bad = 0
        for name in sorted(set(server) | set(mine)):
            cp = server.get(name)
            count, total = mine.get(name, (0, 0))
            if cp is None:
                state = "not granted any more"
            elif int(cp["last_op_id"]) != int(last_ops.get(name, 0)):
                state = "changed on the server since the last sync"
            elif (count, total) == (int(cp["count"]), int(cp["checksum"])):
                state = "ok"
            else:
                state = "MISMATCH"
                bad += 1
            results.append(
                {
                    "bucket": name,
                    "rows": count,
                    "checksum": str(total),
                    "server_rows": cp["count"] if cp else None,
                    "server_checksum": cp["checksum"] if cp else None,
                    "state": state,
                }
            )
        data = {"buckets": results, "rows": rows_bad}
        _emit(
            as_json,
            data,
            "\n".join(f"{r['bucket']}: {r['state']} ({r['rows']} rows)" for r in results)
            + "".join(
                f"\n{r['table']} {json.dumps(r['key'])}: {r['message']}"
                + "".join(
                    f"\n    {c}: expected {json.dumps(v['expected'], default=str)}, "
                    f"found {json.dumps(v['found'], default=str)}"
                    for c, v in r["columns"].items()
                )
                for r in rows_bad
            ),
        )
        if bad or rows_bad:
            raise_exit = VerifyFailed(
                f"{bad} bucket(s) differ from the relay's checksums, {len(rows_bad)} row(s) "
                "differ from the received versions with the open edits on top; "
                "device-agent reset re-downloads everything"
            )
            err.print(f"error: {raise_exit}", highlight=False, markup=False)
            raise typer.Exit(raise_exit.exit_code)


@app.command()
def reset(
    discard_edits: Annotated[
        bool, typer.Option("--discard-edits", help="also drop edits not synced yet")
    ] = False,
    db: DbOpt = "fieldsync.db",
    key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Forget all synced rows and download everything again on the next sync."""
    from device_agent import triggers

    with _errors(as_json):
        conn = local_db.connect(db, _key(db, key_file))
        local_db.require_initialized(conn, db)
        pending = conn.execute(
            f"select count(*) from {PREFIX}journal where status in ('pending', 'sent')"
        ).fetchone()[0]
        if pending and not discard_edits:
            raise StateError(
                f"{pending} local edit(s) are not synced yet; sync first, or reset with "
                "--discard-edits to lose them"
            )
        tables = local_db.load_tables(conn)
        with transaction(conn), triggers.suspended(conn, tables.values()):
            for t in tables.values():
                conn.execute(f"delete from {local_db.q(t.local)}")
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
        _emit(
            as_json,
            {"reset": True, "discarded_edits": pending if discard_edits else 0},
            "reset: everything is downloaded again on the next sync",
        )


# --------------------------------------------------------------------------- conflicts


def _conflict_rows(conn: Any, cid: int | None = None) -> list[dict[str, Any]]:
    tables = {t.id: t for t in local_db.load_tables(conn).values()}
    where, args = ("where id = ?", [cid]) if cid is not None else ("", [])
    out_rows = []
    for id_, seq, tid, k, detail, st, resolution in conn.execute(
        f"select id, seq, tbl, k, detail, status, resolution from {PREFIX}conflicts {where} order by id",
        args,
    ):
        t = tables[tid]
        out_rows.append(
            {
                "id": id_,
                "seq": seq,
                "table": t.name,
                "key": local_db.k_key(k, t.key_kinds()),
                "detail": orjson.loads(detail),
                "status": st,
                "resolution": resolution,
            }
        )
    return out_rows


@conflicts_app.command("list")
def conflicts_list(
    db: DbOpt = "fieldsync.db", key_file: KeyFileOpt = None, as_json: JsonOpt = False
) -> None:
    """Conflicts the server kept for a person (policy ``ask``)."""
    with _errors(as_json):
        conn = local_db.connect(db, _key(db, key_file))
        local_db.require_initialized(conn, db)
        rows = _conflict_rows(conn)
        conn.close()
        _emit(
            as_json,
            rows,
            "\n".join(
                f"#{r['id']} {r['table']} {json.dumps(r['key'])} entry {r['seq']}: {r['status']}"
                for r in rows
            )
            or "no conflicts",
        )


@conflicts_app.command("show")
def conflicts_show(
    cid: int, db: DbOpt = "fieldsync.db", key_file: KeyFileOpt = None, as_json: JsonOpt = False
) -> None:
    """Both versions of one conflict."""
    with _errors(as_json):
        conn = local_db.connect(db, _key(db, key_file))
        rows = _conflict_rows(conn, cid)
        conn.close()
        if not rows:
            raise StateError(f"no conflict #{cid}")
        _emit(as_json, rows[0], json.dumps(rows[0], indent=2, ensure_ascii=False, default=str))


@conflicts_app.command("resolve")
def conflicts_resolve(
    cid: int,
    mine: Annotated[bool, typer.Option("--mine", help="take the device's values")] = False,
    theirs: Annotated[bool, typer.Option("--theirs", help="take the server's values")] = False,
    values: Annotated[list[str] | None, typer.Option("--set", help="column=JSON value")] = None,
    db: DbOpt = "fieldsync.db",
    key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Settle a conflict: the device's values, the server's, or given ones (a new edit)."""
    if sum([mine, theirs, bool(values)]) != 1:
        err.print("error: give exactly one of --mine, --theirs or --set col=value")
        raise typer.Exit(EXIT_USAGE)
    with _errors(as_json):
        conn = local_db.connect(db, _key(db, key_file))
        rows = _conflict_rows(conn, cid)
        if not rows:
            raise StateError(f"no conflict #{cid}")
        c = rows[0]
        t = local_db.load_tables(conn)[c["table"]]
        chosen: dict[str, Any] = {}
        columns = (c["detail"] or {}).get("columns") or {}
        if mine:
            chosen = {col: v.get("device") for col, v in columns.items()}
        elif values:
            for item in values:
                col, _, raw = item.partition("=")
                try:
                    chosen[col] = json.loads(raw)
                except ValueError:
                    chosen[col] = raw
        unknown = [col for col in chosen if col not in t.columns]
        if unknown:
            raise StateError(f"{t.name} has no column(s) {', '.join(unknown)}")
        resolution = "mine" if mine else "theirs" if theirs else "values"
        server_id = (c["detail"] or {}).get("id")
        on_server = False
        if server_id is not None:  # the relay settles it (a new edit made there)
            try:
                agent = Agent(db, key=_key(db, key_file))
                try:
                    agent.client.resolve_conflict(
                        str(server_id), resolution, chosen if values else None
                    )
                    on_server = True
                finally:
                    agent.close()
            except JournalUnsupported:
                pass  # a relay without the journal API: resolved here, uploaded as an edit
            except RelayUnreachable as exc:
                # resolving only here would leave the server's conflict (and the entry's
                # final outcome) open for good: change nothing, the person tries again online
                raise RelayUnreachable(
                    f"conflict #{cid} is kept on the server and the relay cannot be reached "
                    f"({exc}); nothing was changed: resolve it again once online"
                ) from exc
        with transaction(conn):
            if chosen and not on_server:  # a new edit, journaled by the triggers
                sets = ", ".join(f"{local_db.q(col)} = ?" for col in chosen)
                where = " and ".join(f"{local_db.q(col)} is ?" for col in t.key)
                conn.execute(
                    f"update {local_db.q(t.local)} set {sets} where {where}",
                    [local_db.to_sql(v) for v in chosen.values()]
                    + [local_db.to_sql(v) for v in c["key"]],
                )
            conn.execute(
                f"""update {PREFIX}conflicts set status = 'resolved', resolution = ?,
                        resolved_at = julianday('now') where id = ?""",
                (resolution, cid),
            )
        if theirs and c["seq"] is not None:
            refresh_rows(conn, [int(c["seq"])])
        new_entries = len(wire_entries(conn, get_meta(conn, "device_id") or "x"))
        conn.close()
        _emit(
            as_json,
            {
                "id": cid,
                "resolution": resolution,
                "on_server": on_server,
                "pending_entries": new_entries,
            },
            f"conflict #{cid} resolved ({resolution}) "
            + ("on the relay" if on_server else "locally; the next sync uploads it"),
        )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
