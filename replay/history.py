"""Row history: every version of one row, who made it, and what became of device edits.

:func:`row_history` reads one table's topic and keeps the events of one row, followed
through key changes (an update that moves the row to another key, or another row onto
its key).  Only events whose Kafka key matches are decoded (the key is decoded once per
distinct key bytes), besides updates that carry a ``before`` row and truncates; the
others are skipped by a prefilter on the raw record.  Each version says its position,
commit time, op, origin (replay.render), the row after it, the columns changed from the
version before, and the columns the log does not hold (unchanged TOAST values).

Device edits: ``{prefix}._journal`` holds every edit the relay accepted and
``{prefix}._outcomes`` what became of it (core.journal_format).  A version made by a
device (origin ``device:<id>``) or by resolving a conflict (``resolve:<conflict>``) is
matched to its journal entry and latest outcome; entries of the row that produced no
version (rejected, kept as conflicts, merged without a change) are reported apart, so an
auditor also sees edits that did not change the row.

Concurrency: none; one reader, then two whole-topic reads, in the caller's thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from core.avro_envelope import decode
from core.errors import DecodeError, JournalFormatError
from core.journal_format import JournalRecord
from core.journal_outcomes import decode_outcomes
from core.row_wire import json_value
from replay.bounds import Bound, format_position, format_time
from replay.catalog import LogCatalog, TableVersion
from replay.errors import NoEvents, ReplayError
from replay.events import ChangeEvent, Progress, ReadStats
from replay.keys import KeySpec, key_of, same_key_value
from replay.log_reader import LogReader
from replay.log_source import LogSource
from replay.render import describe_origin, dumps, named_row
from replay.state import RowVersion, hashable, key_id

__all__ = ["HistoryReport", "row_history"]


@dataclasses.dataclass
class HistoryReport:
    """Every version of one row, with device edits matched to journal entries."""

    table: str
    key: KeySpec
    versions: list[dict[str, Any]]
    unmatched_edits: list[dict[str, Any]]
    stats: ReadStats

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "key": self.key.text,
            "versions": self.versions,
            "edits_without_version": self.unmatched_edits,
            "read": self.stats.to_json(),
        }


def row_history(
    source: LogSource,
    table: str,
    key: KeySpec,
    *,
    start: Bound | None = None,
    stop: Bound | None = None,
    journal: bool = True,
    progress: Progress | None = None,
    workers: int | None = None,
) -> HistoryReport:
    """Every version of the row with ``key`` in ``table`` (position order).

    Each version: position, commit time, op, origin (:func:`describe_origin`), the row
    after it (None when deleted), the columns changed from the previous version, and for
    device edits the journal entry and its latest outcome (``journal``).  Only events whose
    Kafka key matches (or updates that carry a ``before`` row, and truncates) are decoded.
    """
    catalog = source.catalog()
    table = catalog.resolve(table)
    if not catalog.latest(table).key_fields:
        raise ReplayError(
            f"{table} has no key columns: its rows cannot be told apart, so they have no "
            "history of their own (use export)"
        )
    key_cache: dict[bytes, tuple[bool, tuple[Any, ...]]] = {}
    tracked: set[tuple[Any, ...]] = set()
    registry = catalog.registry
    types = catalog.latest(table).types

    def prefilter(record: Any) -> bool:
        op_bytes = bytes(record.value[10:13])
        if op_bytes[:2] == b"\x02t" or op_bytes == b"\x02u\x02":
            return True  # truncate; update with a before row (key change, FULL)
        raw = record.key
        if raw is None:
            return False
        found = key_cache.get(raw)
        if found is None:
            try:
                decoded = decode(raw, registry)
            except DecodeError:
                return True  # let the value decode say what is wrong
            names = catalog.key_names(bytes(raw[2:10]))
            named = {names.get(f, f): json_value(v) for f, v in decoded.items()}
            found = (key.matches(named, types), tuple(hashable(v) for v in decoded.values()))
            key_cache[raw] = found
        return found[0] or found[1] in tracked

    versions: list[dict[str, Any]] = []
    current: RowVersion | None = None
    with LogReader(source, [table], start=start, progress=progress, workers=workers) as reader:
        for ev in reader.events(stop=stop, prefilter=prefilter):
            version = catalog.versions.get(ev.fingerprint)
            if version is None:
                continue
            step = _history_step(catalog, version, ev, key, tracked, current)
            if step is None:
                continue
            current, item = step
            versions.append(item)
        stats = reader.stats
    unmatched: list[dict[str, Any]] = []
    if journal and versions:
        unmatched = _attach_journal(source, table, key, versions)
    if not versions:
        raise NoEvents(
            f"no version of {table} key {key.text} in the log"
            + (f" between {start or 'the start'} and {stop or 'the end'}" if start or stop else "")
            + f" ({stats.records} records read)"
        )
    return HistoryReport(table, key, versions, unmatched, stats)


def _history_step(
    catalog: LogCatalog,
    version: TableVersion,
    ev: ChangeEvent,
    key: KeySpec,
    tracked: set[tuple[Any, ...]],
    current: RowVersion | None,
) -> tuple[RowVersion | None, dict[str, Any]] | None:
    """If ``ev`` concerns the row followed: the row after it and its history item.

    The row is followed through key changes: an update that moves it to another key
    adds that key to ``tracked``; an update that moves another row *onto* the key
    continues the history with that row (the item names the key it came from).
    """
    kf = version.key_fields
    op = ev.op
    if op == "t":
        if current is None:
            return None
        return None, _item(catalog, ev, None, current, "truncate")
    before_id = key_id(ev.before, kf) if ev.before is not None else None
    after_id = key_id(ev.after, kf) if ev.after is not None else None

    def is_target(row: Mapping[str, Any] | None, kid: tuple[Any, ...] | None) -> bool:
        if row is None or kid is None:
            return False
        return kid in tracked or key.matches(key_of(version, row), version.types)

    moved_from: dict[str, Any] | None = None
    if op == "d":
        if not is_target(ev.before, before_id):
            return None
        return None, _item(catalog, ev, None, current, "delete")
    if op == "u" and before_id is not None and before_id != after_id:
        if is_target(ev.before, before_id) or is_target(ev.after, after_id):
            assert ev.before is not None
            moved_from = key_of(version, ev.before)
        else:
            return None
    elif not is_target(ev.after, after_id):
        return None
    assert after_id is not None
    tracked.add(after_id)
    values = ev.after or {}
    unknown: frozenset[str] | None = None
    if ev.unchanged:
        values = dict(values)
        missing = []
        for f in ev.unchanged:
            if current is not None and f in current.values:
                values[f] = current.values[f]
            else:
                missing.append(f)
        unknown = frozenset(missing) or None
    row = RowVersion(
        values,
        ev.fingerprint,
        ev.position,
        ev.commit_ts_us,
        ev.origin,
        ev.source.get("txid"),
        op,
        unknown,
    )
    kind = {"c": "insert", "u": "update", "r": "snapshot read"}.get(op, op)
    item = _item(catalog, ev, row, current, kind)
    item["key_changed_from"] = moved_from
    return row, item


def _item(
    catalog: LogCatalog,
    ev: ChangeEvent,
    row: RowVersion | None,
    prev: RowVersion | None,
    kind: str,
) -> dict[str, Any]:
    after = named_row(catalog, row.fingerprint, row.values) if row is not None else None
    before = named_row(catalog, prev.fingerprint, prev.values) if prev is not None else None
    changed: list[str] = []
    if after is not None:
        changed = [c for c, v in after.items() if before is None or before.get(c) != v]
    elif before is not None:
        changed = list(before)
    txid = ev.source.get("txid")
    unknown = []
    if row is not None and row.unknown:
        names = catalog.versions[row.fingerprint].column_of()
        unknown = sorted(names.get(f, f) for f in row.unknown)
    return {
        "position": format_position(ev.position),
        "commit_time": format_time(ev.commit_ts_us),
        "op": ev.op,
        "change": kind,
        "origin": describe_origin(ev.origin, txid),
        "row": after,
        "previous": before,
        "changed": changed,
        "unknown_columns": unknown,
        "key_changed_from": None,
    }


def _attach_journal(
    source: LogSource, table: str, key: KeySpec, versions: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Match device versions to journal entries; returns the entries without a version.

    Candidates are the ``_journal`` entries for this table and key; each has its latest
    ``_outcomes`` record.  A version whose origin is ``device:<id>`` gets the earliest
    unmatched entry of that device whose outcome wrote the row (``applied``/``merged``)
    with a compatible op, preferring one whose outcome row equals the version's row; a
    version whose origin is ``resolve:<conflict>`` gets the entry that conflict was kept
    for.  Entries left over (rejected, kept as conflicts, merged without a change) are
    returned, so an auditor also sees edits that did not change the row.
    """
    needle = dumps({"table": table})[1:-1].encode()  # "table":"public.x"
    entries: dict[tuple[str, int], Any] = {}
    for record in source.read_all(f"{source.prefix}._journal"):
        if not record.value or needle not in record.value:
            continue
        try:
            jr = JournalRecord.from_bytes(record.value)
        except JournalFormatError:
            continue
        if jr.entry is None or jr.entry.table != table or not _entry_key_matches(jr.entry, key):
            continue
        entries[(jr.device_id, jr.seq)] = jr
    outcomes: dict[tuple[str, int], Any] = {}
    by_conflict: dict[str, tuple[str, int]] = {}
    for record in source.read_all(f"{source.prefix}._outcomes"):
        if not record.value:
            continue
        try:
            found = decode_outcomes(record.value)
        except JournalFormatError:
            continue
        for o in found:
            ident = (o.device_id, o.seq)
            if ident in entries:
                outcomes[ident] = o
                if o.conflict and o.conflict.get("id"):
                    by_conflict[str(o.conflict["id"])] = ident
    used: set[tuple[str, int]] = set()
    ordered = sorted(entries)
    for item in versions:
        origin = item["origin"]
        match: tuple[str, int] | None = None
        if origin["kind"] == "device":
            match = _pick_entry(origin["device_id"], item, ordered, entries, outcomes, used)
        elif origin["kind"] == "resolve":
            match = by_conflict.get(origin["conflict_id"])
        if match is None:
            continue
        used.add(match)
        item["journal"] = _journal_json(entries[match])
        item["outcome"] = outcomes[match].to_json() if match in outcomes else None
    return [
        {
            "journal": _journal_json(entries[i]),
            "outcome": outcomes[i].to_json() if i in outcomes else None,
        }
        for i in ordered
        if i not in used
    ]


_OP_OF_ENTRY = {"insert": ("c", "u"), "update": ("u",), "delete": ("d",)}


def _pick_entry(
    device: str,
    item: Mapping[str, Any],
    ordered: Sequence[tuple[str, int]],
    entries: Mapping[tuple[str, int], Any],
    outcomes: Mapping[tuple[str, int], Any],
    used: set[tuple[str, int]],
) -> tuple[str, int] | None:
    fallback: tuple[str, int] | None = None
    for ident in ordered:
        if ident[0] != device or ident in used:
            continue
        entry = entries[ident].entry
        if item["op"] not in _OP_OF_ENTRY.get(entry.op.value, ()):
            continue
        outcome = outcomes.get(ident)
        if outcome is not None and outcome.kind.value not in ("applied", "merged", "resolved"):
            continue
        if outcome is not None and _outcome_row_matches(outcome.row, item["row"]):
            return ident
        if fallback is None:
            fallback = ident
    return fallback


def _outcome_row_matches(seen: Mapping[str, Any] | None, row: Mapping[str, Any] | None) -> bool:
    if seen is None or row is None:
        return seen is None and row is None
    return all(c in row and same_key_value(v, row[c], None) for c, v in seen.items())


def _entry_key_matches(entry: Any, key: KeySpec) -> bool:
    if key.by_name is not None:
        values = {**(entry.old or {}), **(entry.new or {})}
        if all(c in values for c in key.by_name):
            return all(same_key_value(w, values[c], None) for c, w in key.by_name.items())
        return sorted(map(str, key.by_name.values())) == sorted(map(str, entry.key))
    assert key.values is not None
    if len(key.values) != len(entry.key):
        return False
    if len(key.values) == 1:
        return same_key_value(key.values[0], entry.key[0], None)
    return sorted(map(str, key.values)) == sorted(map(str, entry.key))


def _journal_json(record: Any) -> dict[str, Any]:
    entry = record.entry
    out: dict[str, Any] = {
        "device_id": record.device_id,
        "seq": record.seq,
        "received_at": format_time(record.received_at_us),
    }
    if entry is not None:
        out.update(entry.to_json())
        if entry.base is not None:
            out["base"] = format_position((entry.base.commit_lsn, entry.base.seq))
    if record.rejection is not None:
        out["rejection"] = record.rejection.to_json()
    return out
