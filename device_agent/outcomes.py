"""Settling journal entries: outcomes from the relay, rejections at upload.

An outcome (``Outcome`` JSON of core/journal_outcomes.py, docs/journal.md "Outcomes") gives its
entry a final status (:data:`OUTCOME_STATUS`): ``synced`` for applied, merged and
resolved edits, ``failed`` for rejected ones, ``conflict`` for an edit the server kept
for a person (a ``_fieldsync_conflicts`` row, settled later by a ``resolved`` outcome or
``device-agent conflicts resolve``).  An outcome that wrote the row upstream carries
``visible_after`` (:func:`visible_after`): the entry then keeps its edit on top
(``await_lsn``) until a server version at or above that position arrives
(device_agent/visible.py).  The same outcome read again changes nothing (the relay may
send it again), and a ``resolved`` entry stays resolved whatever older outcome comes
again (as in the relay's outcome store); a rejection at upload makes its entry ``failed``.  Every entry that
settles has its row derived again (:class:`device_agent.derive.RowDeriver`).

Runs inside the caller's open transaction (device_agent/apply.py), on its connection and
thread; no network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import orjson

from device_agent.derive import RowDeriver
from device_agent.local_tables import PREFIX

MAX_LSN: Final = (1 << 63) - 1

OUTCOME_STATUS: Final = {
    "applied": "synced",
    "merged": "synced",
    "resolved": "synced",
    "rejected": "failed",
    "conflict": "conflict",
}
"""The journal status an outcome gives its entry (docs/journal.md, "Outcomes")."""


def visible_after(outcome: Mapping[str, Any]) -> int | None:
    """An outcome's ``visible_after`` (docs/journal.md): an integer 0 … 2**63-1 or its
    decimal text; None when absent.  A malformed one counts as absent: the entry then
    settles at once, as with an outcome of a relay that sends none (nothing is lost)."""
    value = outcome.get("visible_after")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if type(value) is int and 0 <= value <= MAX_LSN:
        return value
    return None


def _kind(outcome: Mapping[str, Any]) -> str:
    """An outcome's kind (``outcome``, or ``kind`` in older records), "" when absent."""
    return str(outcome.get("outcome") or outcome.get("kind") or "")


def _recorded(stored: str | None) -> Mapping[str, Any] | None:
    """An entry's recorded outcome JSON, parsed; None when none or unreadable."""
    if not stored:
        return None
    try:
        before = orjson.loads(stored)
    except orjson.JSONDecodeError:
        return None
    return before if isinstance(before, dict) else None


def record_outcomes(rows: RowDeriver, outcomes: Iterable[Mapping[str, Any]]) -> int:
    """Record outcomes (``Outcome`` JSON of core/journal_outcomes.py; the latest per seq): final
    statuses, kept conflicts; their rows are re-derived at
    :meth:`~device_agent.derive.RowDeriver.flush_dirty`.  Returns how many entries
    changed."""
    conn = rows.conn
    changed = 0
    for o in outcomes:
        seq = int(o["seq"])
        kind = _kind(o)
        status = OUTCOME_STATUS.get(kind)
        found = conn.execute(
            f"select tbl, k, outcome, await_lsn from {PREFIX}journal where seq = ?", (seq,)
        ).fetchone()
        if found is None or status is None:
            continue
        tid, k, before, awaiting = found
        was = _recorded(before)
        if kind != "resolved" and was is not None and _kind(was) == "resolved":
            continue  # resolved is final: an older outcome sent again must not reopen it
        bound = visible_after(o)
        repeated = was is not None and _kind(was) == kind and visible_after(was) == bound
        if not repeated:  # a repeated one changes nothing
            awaiting = bound if status != "failed" and tid in rows.by_id else None
        conn.execute(
            f"""update {PREFIX}journal set status = ?, outcome = ?, reason = ?, message = ?,
                    await_lsn = ?, settled_at = julianday('now') where seq = ?""",
            (
                status,
                orjson.dumps(o).decode(),
                o.get("reason"),
                o.get("message"),
                awaiting,
                seq,
            ),
        )
        if awaiting is not None:
            rows.held.add((tid, k))
        known = conn.execute(f"select id from {PREFIX}conflicts where seq = ?", (seq,)).fetchone()
        if status == "conflict" and o.get("conflict") is not None and known is None:
            conn.execute(
                f"insert into {PREFIX}conflicts (seq, tbl, k, detail) values (?, ?, ?, ?)",
                (seq, tid, k, orjson.dumps(o["conflict"]).decode()),
            )
        if kind == "resolved" and known is not None:
            conn.execute(
                f"""update {PREFIX}conflicts set status = 'resolved',
                        resolution = coalesce(resolution, 'on the server'),
                        resolved_at = coalesce(resolved_at, julianday('now'))
                    where seq = ?""",
                (seq,),
            )
        if tid in rows.by_id:
            rows.dirty.add((tid, k))
        rows.result.released += 1
        changed += 1
    return changed


def record_rejections(
    rows: RowDeriver, rejected: Mapping[int, tuple[str | None, str | None]]
) -> None:
    """Entries the relay refused at upload: ``failed``; their rows are re-derived."""
    for seq, (reason, message) in rejected.items():
        found = rows.conn.execute(
            f"select tbl, k from {PREFIX}journal where seq = ?", (seq,)
        ).fetchone()
        rows.conn.execute(
            f"""update {PREFIX}journal set status = 'failed', reason = ?, message = ?,
                    settled_at = julianday('now') where seq = ?""",
            (reason, message, seq),
        )
        if found is not None and found[0] in rows.by_id:
            rows.dirty.add((found[0], found[1]))
            rows.result.released += 1
