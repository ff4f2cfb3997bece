"""``device-agent status``, ``journal`` and ``verify``: what the device holds, what its
edits became, and whether it matches the relay.

``status`` and ``journal`` only read the database (no network).  ``verify`` syncs first
(unless ``--no-sync`` or ``--local``), then compares every bucket's row count and
checksum with the relay's checkpoint (``--local``: the checkpoints last received) and
every table row with its received version and the edits on top
(device_agent/consistency.py); a difference exits 6 (:class:`~device_agent.errors.VerifyFailed`).
Registered on the ``device-agent`` app by device_agent/cli.py.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated

import typer
from rich.table import Table

from device_agent import crypto, local_db, local_tables
from device_agent.bucket_ops import local_checksums
from device_agent.cli_common import (
    DbOpt,
    JsonOpt,
    KeyFileOpt,
    db_key,
    emit,
    err,
    errors,
    open_agent,
    out,
    when,
)
from device_agent.consistency import check_tables
from device_agent.errors import VerifyFailed
from device_agent.local_db import get_meta
from device_agent.local_tables import PREFIX


def status(
    db: DbOpt = "fieldsync.db", key_file: KeyFileOpt = None, as_json: JsonOpt = False
) -> None:
    """Pending edits, last sync, lag and bucket states (no network)."""
    with errors(as_json):
        conn = local_db.connect(db, db_key(db, key_file))
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
                "verified_at": when(str(verified) if verified else None),
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
            "last_sync": when(last_sync),
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
            emit(True, data)
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
    with errors(as_json):
        conn = local_db.connect(db, db_key(db, key_file))
        local_db.require_initialized(conn, db)
        tables = {t.id: t for t in local_tables.load_tables(conn).values()}
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
            emit(True, rows)
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
    with errors(as_json):
        agent = open_agent(db, key_file)
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
        emit(
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
