"""``device-agent conflicts``: the conflicts the server kept for a person (policy ``ask``).

``list`` and ``show`` read ``_fieldsync_conflicts`` (no network).  ``resolve`` settles
one with the device's values (``--mine``), the server's (``--theirs``) or given ones
(``--set col=JSON``): a conflict the server keeps (its detail has an ``id``) is resolved
on the relay, which makes the new edit there; if the relay cannot be reached nothing
changes and the command exits 3 (resolving only on the device would leave the server's
conflict, and the entry's final outcome, open for good).  A relay without the journal
API, or a conflict only the device knows, is resolved here: chosen values become a new
local edit, journaled by the triggers and uploaded by the next sync.  ``--theirs``
derives the row again from its received version (device_agent/apply.py).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import orjson
import typer

from device_agent import local_db, local_tables
from device_agent.apply import refresh_rows
from device_agent.cli_common import (
    EXIT_USAGE,
    DbOpt,
    JsonOpt,
    KeyFileOpt,
    db_key,
    emit,
    err,
    errors,
)
from device_agent.client import JournalUnsupported
from device_agent.errors import RelayUnreachable, StateError
from device_agent.journal_wire import wire_entries
from device_agent.local_db import get_meta
from device_agent.local_tables import PREFIX, transaction
from device_agent.sync import Agent

conflicts_app = typer.Typer(help="Conflicts kept for a person to resolve.", no_args_is_help=True)


def _conflict_rows(conn: Any, cid: int | None = None) -> list[dict[str, Any]]:
    tables = {t.id: t for t in local_tables.load_tables(conn).values()}
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
    with errors(as_json):
        conn = local_db.connect(db, db_key(db, key_file))
        local_db.require_initialized(conn, db)
        rows = _conflict_rows(conn)
        conn.close()
        emit(
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
    with errors(as_json):
        conn = local_db.connect(db, db_key(db, key_file))
        rows = _conflict_rows(conn, cid)
        conn.close()
        if not rows:
            raise StateError(f"no conflict #{cid}")
        emit(as_json, rows[0], json.dumps(rows[0], indent=2, ensure_ascii=False, default=str))


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
    with errors(as_json):
        conn = local_db.connect(db, db_key(db, key_file))
        rows = _conflict_rows(conn, cid)
        if not rows:
            raise StateError(f"no conflict #{cid}")
        c = rows[0]
        t = local_tables.load_tables(conn)[c["table"]]
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
                agent = Agent(db, key=db_key(db, key_file))
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
                sets = ", ".join(f"{local_tables.q(col)} = ?" for col in chosen)
                where = " and ".join(f"{local_tables.q(col)} is ?" for col in t.key)
                conn.execute(
                    f"update {local_tables.q(t.local)} set {sets} where {where}",
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
        emit(
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
