"""The journal as upload entries: local edits in the relay's journal form (docs/journal.md).

:func:`wire_entries` reads journal entries in seq order (first completing new ones:
their hybrid logical clock and ``prev_seq``, :func:`device_agent.triggers.assign_clocks`)
and writes each as the journal entry form of core/journal_format.py: the relay's table name, the key, the
names of its key columns (``key_columns``: the relay and the applier refuse an entry named
by another key than the table's) and the values in wire form (column kinds of device_agent/local_db.py), an update's ``new`` with
only the columns it changed, an insert without ``old`` (the row an ``INSERT OR REPLACE``
replaced is kept on the device only) and without NULL non-key columns, ``base`` the
position of the server version the edit was made on (:func:`base_position`), ``hlc`` the
encoded clock with the device id.  Entries of tables no longer synced are left out.

Reads only, apart from completing the clocks in their own transaction; the caller's
connection and thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from core.hlc import Hlc
from device_agent import local_db, local_tables, triggers
from device_agent.local_tables import PREFIX

UPLOAD_BATCH: Final = 500
"""Entries per upload request (device_agent/sync.py halves a batch the relay refuses as
too large)."""


def base_position(stored: str | None) -> dict[str, int] | None:
    """A journal entry's stored ``base`` (the row version's ``[commit_lsn, seq]``, or the
    object form) as the upload's ``{"commit_lsn", "seq"}``; None when the row never came
    from the server (an insert) or the relay sent no position."""
    if not stored:
        return None
    value = orjson.loads(stored)
    if isinstance(value, list) and len(value) == 2:
        return {"commit_lsn": int(value[0]), "seq": int(value[1])}
    if isinstance(value, dict) and {"commit_lsn", "seq"} <= set(value):
        return {"commit_lsn": int(value["commit_lsn"]), "seq": int(value["seq"])}
    return None


def wire_entries(
    conn: Any, device_id: str, statuses: tuple[str, ...] = ("pending",), limit: int = UPLOAD_BATCH
) -> list[dict[str, Any]]:
    """Journal rows as upload entries (the journal entry form of core/journal_format.py)."""
    triggers.assign_clocks(conn)
    tables = {t.id: t for t in local_tables.load_tables(conn).values()}
    marks = ",".join("?" * len(statuses))
    rows = conn.execute(
        f"""select seq, tbl, k, op, old, new, base, hlc_l, hlc_c, prev_seq
            from {PREFIX}journal where status in ({marks}) order by seq limit ?""",
        (*statuses, limit),
    ).fetchall()
    out = []
    for seq, tid, k, op, old, new, base, hlc_l, hlc_c, prev in rows:
        table = tables.get(tid)
        if table is None:
            continue
        kinds = table.kinds
        old_v = _wire_row(orjson.loads(old), kinds) if old else None
        new_v = _wire_row(orjson.loads(new), kinds) if new else None
        if op == "update" and old_v is not None and new_v is not None:
            new_v = {
                c: v
                for c, v in new_v.items()
                if c not in old_v or old_v[c] != v or type(old_v[c]) is not type(v)
            }
        if op == "insert":  # ``old`` of an insert is the row it replaced: kept locally only
            old_v = None
            if new_v is not None:
                new_v = {c: v for c, v in new_v.items() if v is not None or c in table.key}
        out.append(
            {
                "seq": seq,
                "table": table.name,
                "op": op,
                "key": local_db.k_key(k, table.key_kinds()),
                "key_columns": list(table.key),
                "old": old_v,
                "new": new_v,
                "base": base_position(base),
                "hlc": Hlc(int(hlc_l), int(hlc_c), device_id).encode(),
                "prev_seq": prev,
            }
        )
    return out


def oversized_rejection(entry: Mapping[str, Any], refusal: str) -> tuple[str, str]:
    """The local rejection (reason, message) of an upload entry the relay refused as too
    large even alone (HTTP 413: its JSON is over the relay's ``http.max_body_bytes``): it
    is kept in the journal as ``failed`` with reason ``entry_too_large``, as the relay
    rejects an entry over ``journal.max_entry_bytes``, so the entries after it go up."""
    size = len(orjson.dumps(entry))
    return (
        "entry_too_large",
        f"entry {entry['seq']} ({entry['op']} of {entry['table']}, key {entry['key']!r:.200}) "
        f"is {size} bytes of JSON, more than the relay takes in one upload: {refusal}",
    )


def pending_dependents(conn: Any, seq: int) -> list[int]:
    """The pending entries made on top of entry ``seq``: their ``prev_seq`` chain leads to
    it (the relay rejects them as ``blocked`` when it rejected ``seq``)."""
    rows = conn.execute(
        f"""with recursive d(seq) as (
                select seq from {PREFIX}journal where prev_seq = ? and status = 'pending'
                union
                select j.seq from {PREFIX}journal j join d on j.prev_seq = d.seq
                    where j.status = 'pending')
            select seq from d order by seq""",
        (seq,),
    ).fetchall()
    return [int(r[0]) for r in rows]


def _wire_row(row: Mapping[str, Any], kinds: Mapping[str, str]) -> dict[str, Any]:
    return {c: local_db.from_sql(v, kinds.get(c)) for c, v in row.items()}
