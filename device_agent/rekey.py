"""Re-keying a table's journal entries when its primary key changes (pure, no I/O).

A row's identity ``k`` in the metadata tables is its key values under the table's key
columns (:func:`device_agent.local_db.key_k`: the value for a one-column key, the JSON
array for a compound one).  When the relay's schema gives a table another key
(``(id)`` → ``(id, site)``), the entries that still act on the table's rows, open ones
(``pending``/``sent``), awaiting ones and kept conflicts, are named again by the new key,
computed from the row the entry holds: ``new`` for an insert, ``old`` for a delete, and for
an update the row as it was before the edit (``old``, which the server still holds: an
update never changes the old key's columns, the triggers journal that as a delete and an
insert, but it may change a column the new key adds).  An entry whose row lacks a new key
column or holds NULL in one, and an update that changes a new key column (under the new
key it would move its row to another key, which the server's row does not have), cannot
be named; the key change is then blocked, naming the entries and why
(device_agent/schema_sync.py), and they stay pending.

Values are the journal's (SQLite form, as the triggers stored them), so the new ``k`` is
what the triggers compute from the table row (``json_array`` of the key columns).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from device_agent.local_db import key_k


@dataclasses.dataclass(frozen=True)
class JournalRow:
    """One journal entry as the re-keying reads it: seq, op and its rows (decoded JSON)."""

    seq: int
    op: str
    old: Mapping[str, Any] | None
    new: Mapping[str, Any] | None


@dataclasses.dataclass
class Rekeyed:
    """The outcome of :func:`rekey_entries`: the new ``k`` per seq, and the seqs that
    cannot be named by the new key (with the missing column)."""

    keys: dict[int, Any] = dataclasses.field(default_factory=dict)
    unnamed: dict[int, str] = dataclasses.field(default_factory=dict)  # seq → why ("lacks site")


def entry_row(entry: JournalRow) -> Mapping[str, Any]:
    """The row an entry acts on as the server holds it, as far as the entry holds it: an
    update's row before the edit (``old``, completed by ``new`` where ``old`` lacks a
    column)."""
    if entry.op == "insert":
        return entry.new or {}
    if entry.op == "delete":
        return entry.old or {}
    return {**(entry.new or {}), **(entry.old or {})}


def _moved(entry: JournalRow, key: Sequence[str]) -> str | None:
    """The first column of ``key`` an update changes, if any."""
    if entry.op != "update" or not entry.new:
        return None
    old = entry.old or {}
    return next(
        (c for c in key if c in entry.new and entry.new[c] != old.get(c, entry.new[c])), None
    )


def rekey_entries(entries: Sequence[JournalRow], key: Sequence[str]) -> Rekeyed:
    """Name each entry's row by the key columns ``key``."""
    out = Rekeyed()
    for entry in entries:
        row = entry_row(entry)
        missing = [c for c in key if row.get(c) is None]
        moved = _moved(entry, key)
        if missing:
            out.unnamed[entry.seq] = f"lacks {missing[0]}"
        elif moved is not None:
            out.unnamed[entry.seq] = f"changes {moved}"
        else:
            out.keys[entry.seq] = key_k([row[c] for c in key])
    return out
