"""Row history: every version of the rows that held one key, who made each, and what
became of device edits.

:func:`row_history` checks the key against the table's key columns
(:meth:`~replay.keys.KeySpec.check`), reads the table's topic and hands its events to a
:class:`RowFollower`, which follows each row that held the key as a thread of its own
through its key changes (an update that moves it to another key), so that each version
is compared with the same row's previous version only; a row that takes the key later
(moved onto it, inserted after a delete) is another thread.  Only events whose Kafka key
matches the key or a key a followed row had are decoded (the key is decoded once per
distinct key bytes), besides updates that carry a ``before`` row and truncates; the
others are skipped by a prefilter on the raw record.  Each version says its position,
commit time, op, origin (replay.render; snapshot reads are cdc's, not a session's), its
thread and key, the row after it, the columns changed from the same row's version before
(``not_in_previous``: those that version had no value for in the log: a column its schema
lacked, or an unknown TOAST value), and the columns the log does not hold (unchanged
TOAST values).

Device edits: ``{prefix}._journal`` holds every edit the relay accepted and
``{prefix}._outcomes`` what became of it (core.journal_format).  A version made by a
device (origin ``device:<id>``) or by resolving a conflict (``resolve:<conflict>``) is
matched to an entry of that device for the key the version changed (entry keys compared
column by column in key order, :func:`entry_key_matches`) and its latest outcome; entries
for the key that produced no version (rejected, kept as conflicts, merged without a
change) are reported apart, so an auditor also sees edits that did not change the row.

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

__all__ = ["HistoryReport", "RowFollower", "entry_key_matches", "row_history", "threads_of"]


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
            "threads": threads_of(self.versions),
            "versions": self.versions,
            "edits_without_version": self.unmatched_edits,
            "read": self.stats.to_json(),
        }


def threads_of(versions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per followed row (``thread``, :class:`RowFollower`): the keys it held in order, its
    number of versions, first and last position, and how it ended (``delete``,
    ``truncate``, or None: present at the end of the read)."""
    out: dict[int, dict[str, Any]] = {}
    for v in versions:
        t = out.get(v["thread"])
        if t is None:
            first = v["key_changed_from"] or v["key"]
            t = out[v["thread"]] = {
                "thread": v["thread"],
                "keys": [first] if first is not None else [],
                "versions": 0,
                "first_position": v["position"],
                "last_position": v["position"],
                "ended": None,
            }
        if v["key"] is not None and (not t["keys"] or t["keys"][-1] != v["key"]):
            t["keys"].append(v["key"])
        t["versions"] += 1
        t["last_position"] = v["position"]
        if v["row"] is None:
            t["ended"] = v["change"]
    return [out[n] for n in sorted(out)]


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
    """Every version of each row that held ``key`` in ``table`` (position order).

    The key is checked against the table's key columns first (:class:`BadKey`).  Each
    version: position, commit time, op, origin (:func:`describe_origin`), the row after
    it (None when deleted), the columns changed from the same row's previous version, the
    row it belongs to (``thread``, :class:`RowFollower`), and for device edits the journal
    entry and its latest outcome (``journal``).  Only events whose Kafka key matches (or
    updates that carry a ``before`` row, and truncates) are decoded.
    """
    catalog = source.catalog()
    table = catalog.resolve(table)
    if not catalog.latest(table).key_fields:
        raise ReplayError(
            f"{table} has no key columns: its rows cannot be told apart, so they have no "
            "history of their own (use export)"
        )
    key.check(table, catalog.key_columns(table))
    key_cache: dict[bytes, tuple[bool, tuple[Any, ...]]] = {}
    follower = RowFollower(catalog, key)
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
        return found[0] or found[1] in follower.keys_held

    with LogReader(source, [table], start=start, progress=progress, workers=workers) as reader:
        for ev in reader.events(stop=stop, prefilter=prefilter):
            follower.apply(ev)
        stats = reader.stats
    versions = follower.versions
    unmatched: list[dict[str, Any]] = []
    if journal and versions:
        unmatched = _attach_journal(source, catalog, table, key, versions)
    if not versions:
        raise NoEvents(
            f"no version of {table} key {key.text} in the log"
            + (f" between {start or 'the start'} and {stop or 'the end'}" if start or stop else "")
            + f" ({stats.records} records read)"
        )
    return HistoryReport(table, key, versions, unmatched, stats)


@dataclasses.dataclass
class _Row:
    """One row followed: its number among the rows that held the key, its last version."""

    thread: int
    current: RowVersion | None


class RowFollower:
    """The rows that held one key, each followed on its own through its key changes.

    Feed it a table's events in position order (:meth:`apply`); ``versions`` collects the
    history items.  A row is followed from the first event that shows it under the key
    (an insert or snapshot read of the key, an update that moves it onto the key or away
    from it, a delete of it) through every later key change until it is deleted or the
    table truncated.  Each followed row is a ``thread`` (numbered 1, 2, … in the order
    they are first seen), and each version is compared with the previous version of the
    same thread only.  A row that takes the key after the first one left it (moved away,
    deleted) is another thread; an insert always starts a new one.  ``keys_held`` holds
    every key a followed row has had (for the prefilter: events under them are decoded).

    Pure (no I/O); belongs to the one reader that feeds it.
    """

    def __init__(self, catalog: LogCatalog, key: KeySpec) -> None:
        self.catalog = catalog
        self.key = key
        self.versions: list[dict[str, Any]] = []
        self.keys_held: set[tuple[Any, ...]] = set()
        self._live: dict[tuple[Any, ...], _Row] = {}  # by the key the row has now
        self._threads = 0

    def apply(self, ev: ChangeEvent) -> None:
        """Add the versions ``ev`` makes of followed rows (none when it concerns none)."""
        version = self.catalog.versions.get(ev.fingerprint)
        if version is None:
            return
        if ev.op == "t":
            for gone in sorted(self._live.values(), key=lambda r: r.thread):
                item = _item(self.catalog, ev, None, gone.current, "truncate")
                item.update(thread=gone.thread, key=self._key(gone.current))
                self.versions.append(item)
            self._live.clear()
            return
        kf = version.key_fields
        before_id = key_id(ev.before, kf) if ev.before is not None else None
        after_id = key_id(ev.after, kf) if ev.after is not None else None
        moved = ev.op == "u" and before_id is not None and before_id != after_id
        src = before_id if ev.op == "d" or moved else after_id
        if src is None:
            return
        row: _Row | None = self._live.pop(src, None)
        if ev.op == "c":
            row = None  # an insert is a new row (whatever held the key is gone)
        prev = row.current if row is not None else None
        if row is None:
            if not self._starts(version, ev, moved):
                return
            self._threads += 1
            row = _Row(self._threads, None)
            if ev.before_kind == "full" and ev.before is not None:
                prev = _row_version(ev, ev.before, None)  # the whole old row is known
        moved_from = key_of(version, ev.before) if moved and ev.before is not None else None
        if ev.op == "d":
            assert ev.before is not None
            item = _item(self.catalog, ev, None, prev, "delete")
            item.update(thread=row.thread, key=key_of(version, ev.before))
            self.versions.append(item)
            return
        assert ev.after is not None and after_id is not None
        new = _row_version(ev, *_fill_unchanged(ev, ev.after, prev))
        kind = {"c": "insert", "u": "update", "r": "snapshot read"}.get(ev.op, ev.op)
        item = _item(self.catalog, ev, new, prev, kind)
        item.update(thread=row.thread, key=key_of(version, ev.after), key_changed_from=moved_from)
        self.versions.append(item)
        row.current = new
        self._live[after_id] = row
        self.keys_held.add(after_id)

    def _starts(self, version: TableVersion, ev: ChangeEvent, moved: bool) -> bool:
        """Whether ``ev`` shows a row not followed yet under the key."""
        rows = [ev.before] if ev.op == "d" else [ev.before, ev.after] if moved else [ev.after]
        return any(
            r is not None and self.key.matches(key_of(version, r), version.types) for r in rows
        )

    def _key(self, row: RowVersion | None) -> dict[str, Any] | None:
        if row is None:
            return None
        version = self.catalog.versions.get(row.fingerprint)
        return key_of(version, row.values) if version is not None else None


def _fill_unchanged(
    ev: ChangeEvent, after: dict[str, Any], prev: RowVersion | None
) -> tuple[dict[str, Any], frozenset[str] | None]:
    """The row after ``ev``: unchanged TOAST values taken from the same row's previous
    version; those it does not hold (or did not know either) are unknown."""
    if not ev.unchanged:
        return after, None
    values = dict(after)
    missing = []
    for f in ev.unchanged:
        if prev is not None and f in prev.values and not (prev.unknown and f in prev.unknown):
            values[f] = prev.values[f]
        else:
            missing.append(f)
    return values, frozenset(missing) or None


def _row_version(
    ev: ChangeEvent, values: dict[str, Any], unknown: frozenset[str] | None
) -> RowVersion:
    return RowVersion(
        values,
        ev.fingerprint,
        ev.position,
        ev.commit_ts_us,
        ev.origin,
        ev.source.get("txid"),
        ev.op,
        unknown,
    )


def _item(
    catalog: LogCatalog,
    ev: ChangeEvent,
    row: RowVersion | None,
    prev: RowVersion | None,
    kind: str,
) -> dict[str, Any]:
    after = named_row(catalog, row.fingerprint, row.values) if row is not None else None
    before = named_row(catalog, prev.fingerprint, prev.values) if prev is not None else None
    unknown = _unknown_names(catalog, row)
    changed: list[str] = []
    not_in_previous: list[str] = []
    if after is not None:
        before_unknown = set(_unknown_names(catalog, prev))
        for c, v in after.items():
            if before is None:
                changed.append(c)
            elif c in unknown:
                continue  # unchanged (TOAST), and the log does not hold the value
            elif c not in before or c in before_unknown:
                changed.append(c)  # the previous version has no value for it in the log
                not_in_previous.append(c)
            elif before[c] != v:
                changed.append(c)
    elif before is not None:
        changed = list(before)
    txid = ev.source.get("txid")
    snapshot = str(ev.source.get("snapshot") or "true") if ev.op == "r" else None
    return {
        "position": format_position(ev.position),
        "commit_time": format_time(ev.commit_ts_us),
        "op": ev.op,
        "change": kind,
        "origin": describe_origin(ev.origin, txid, snapshot=snapshot),
        "thread": 0,
        "key": None,
        "row": after,
        "previous": before,
        "changed": changed,
        "not_in_previous": not_in_previous,
        "unknown_columns": unknown,
        "key_changed_from": None,
    }


def _unknown_names(catalog: LogCatalog, row: RowVersion | None) -> list[str]:
    """The row's columns whose value the log does not hold (unchanged TOAST)."""
    if row is None or not row.unknown:
        return []
    names = catalog.versions[row.fingerprint].column_of()
    return sorted(names.get(f, f) for f in row.unknown)


def _attach_journal(
    source: LogSource,
    catalog: LogCatalog,
    table: str,
    key: KeySpec,
    versions: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Match device versions to journal entries; returns the entries without a version.

    Candidates are the ``_journal`` entries for this table whose key is ``key`` or a key a
    version addressed (a followed row moved to another key); each has its latest
    ``_outcomes`` record.  A version whose origin is ``device:<id>`` gets the earliest
    unmatched entry of that device for the key the version changed (its key before the
    change) whose outcome wrote the row (``applied``/``merged``) with a compatible op,
    preferring one whose outcome row equals the version's row; a version whose origin is
    ``resolve:<conflict>`` gets the entry that conflict was kept for.  Entries for ``key``
    left over (rejected, kept as conflicts, merged without a change) are returned, so an
    auditor also sees edits that did not change the row.
    """
    latest = catalog.latest(table)
    names = latest.column_of()
    columns = tuple(names[f] for f in latest.key_fields)
    types = latest.types
    addressed = [_addressed_key(item) for item in versions]
    specs = {dumps(k): KeySpec(by_name=k, text=dumps(k)) for k in addressed if k is not None}
    needle = dumps({"table": table})[1:-1].encode()  # "table":"public.x"
    entries: dict[tuple[str, int], Any] = {}
    of_key: set[tuple[str, int]] = set()  # entries for ``key`` itself
    for record in source.read_all(f"{source.prefix}._journal"):
        if not record.value or needle not in record.value:
            continue
        try:
            jr = JournalRecord.from_bytes(record.value)
        except JournalFormatError:
            continue
        if jr.entry is None or jr.entry.table != table:
            continue
        ident = (jr.device_id, jr.seq)
        if entry_key_matches(jr.entry.key, jr.entry.key_columns, key, columns, types):
            of_key.add(ident)
        elif not any(
            entry_key_matches(jr.entry.key, jr.entry.key_columns, s, columns, types)
            for s in specs.values()
        ):
            continue
        entries[ident] = jr
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
    for item, target in zip(versions, addressed, strict=True):
        origin = item["origin"]
        match: tuple[str, int] | None = None
        if origin["kind"] == "device":
            spec = specs[dumps(target)] if target is not None else None
            candidates = [
                i
                for i in ordered
                if spec is None
                or entry_key_matches(
                    entries[i].entry.key, entries[i].entry.key_columns, spec, columns, types
                )
            ]
            match = _pick_entry(origin["device_id"], item, candidates, entries, outcomes, used)
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
        if i not in used and i in of_key
    ]


def _addressed_key(item: Mapping[str, Any]) -> dict[str, Any] | None:
    """The key of the row a version changed, as a device's journal entry names it: before
    a key change, the old key."""
    found = item.get("key_changed_from") or item.get("key")
    return dict(found) if found is not None else None


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


def entry_key_matches(
    entry_key: Sequence[Any],
    entry_columns: Sequence[str] | None,
    key: KeySpec,
    columns: Sequence[str],
    types: Mapping[str, Any],
) -> bool:
    """Whether a journal entry's key (``key`` values in the table's key order, named by
    ``key_columns`` when the device sent them) names the row ``key``; ``columns``: the
    table's key columns in key order, ``types``: their types.  Values are compared column
    by column, in key order, each as its column's type (:meth:`KeySpec.matches`)."""
    if len(entry_key) != len(columns):
        return False
    if entry_columns is not None:
        if sorted(entry_columns) != sorted(columns):
            return False
        by_name = dict(zip(entry_columns, entry_key, strict=True))
        named = {c: by_name[c] for c in columns}
    else:
        named = dict(zip(columns, entry_key, strict=True))
    return key.matches(named, types)


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
