"""Re-keying a table's journal entries when its primary key changes (pure, no I/O).

A row's identity ``k`` in the metadata tables is its key values under the table's key
columns (:func:`device_agent.local_db.key_k`: the value for a one-column key, the JSON
array for a compound one).  When the relay's schema gives a table another key
(``(id)`` → ``(id, site)``), the entries that still act on the table's rows, open ones
(``pending``/``sent``), awaiting ones and kept conflicts, are named again by the new key,
computed from the row the entry holds: ``new`` for an insert, ``old`` for a delete, ``old``
with ``new`` over it for an update (an update never changes key columns: the triggers
journal that as a delete and an insert).  An entry whose row lacks a new key column, or
holds NULL in one, cannot be named; the key change is then blocked, naming the entries
(device_agent/schema_sync.py).

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
    unnamed: dict[int, str] = dataclasses.field(default_factory=dict)


def entry_row(entry: JournalRow) -> Mapping[str, Any]:
    """The row an entry acts on, as far as it holds it."""
    if entry.op == "insert":
        return entry.new or {}
    if entry.op == "delete":
        return entry.old or {}
    return {**(entry.old or {}), **(entry.new or {})}


def rekey_entries(entries: Sequence[JournalRow], key: Sequence[str]) -> Rekeyed:
    """Name each entry's row by the key columns ``key``."""
    out = Rekeyed()
    for entry in entries:
        row = entry_row(entry)
        missing = [c for c in key if row.get(c) is None]
        if missing:
            out.unnamed[entry.seq] = missing[0]
        else:
            out.keys[entry.seq] = key_k([row[c] for c in key])
    return out
