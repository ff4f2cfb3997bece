"""Applying one journal entry inside a run: validate, merge, write, and its outcome.

For each record of a run (:class:`~relay.upstream.applier_run.Item`):

1. :func:`prepare`: the record's own rejection (unreadable at intake), else the
   device's write scope from the record's claims (the applier's rules), and
   :func:`relay.upstream.validation.validate_entry` against the captured tables' column
   types (without the row check: writes are judged against the server's row below);
2. :func:`apply_entry`: the ordering rule first (``blocked`` when ``prev_seq`` was
   rejected); then the server's row (:meth:`RunState.row`), the edit times, and
   :func:`relay.upstream.merge.merge`.  An insert is written at once (and rolled back if
   the stored row is out of the device's reach); an update or delete is judged by
   :func:`relay.upstream.write_rules.check_write` with the server's row as the row
   before, then queued;
3. the :class:`~core.journal_outcomes.Outcome`: the row afterwards cut to what the device
   may see (:func:`visible`), per-column decisions, and a kept conflict (``ask``) with
   both versions.  A rejected entry's outcome shows the server's row too, so the device
   can put its copy right.

Runs in the applying thread, on the run's transaction (:class:`RunState`).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from typing import Any

from core.journal_format import Reason, Rejection
from core.journal_outcomes import Outcome, OutcomeKind
from core.values import coerce_value
from relay.errors import ApplierError
from relay.upstream.applier_failures import Failed, Undo
from relay.upstream.applier_run import ApplyContext, Item, RunState
from relay.upstream.applier_tables import TableMeta
from relay.upstream.merge import Action, EditTimes, MergeResult, merge
from relay.upstream.validation import blocked_by, validate_entry
from relay.upstream.write_rules import WriteScope, check_write

__all__ = ["apply_entry", "prepare", "rejected", "visible"]


def prepare(db: ApplyContext, item: Item, failed: Failed | None) -> None:
    """Validate the item's entry (or take the record's rejection); ``failed``: the entry
    failed alone before and is rejected for that."""
    record = item.record
    assert record is not None
    if record.rejection is not None or record.entry is None:
        item.rejection = record.rejection
        return
    item.scope = db.scope(record.claims)
    if record.entry.table not in db.tables:
        item.rejection = Rejection(
            Reason.UNKNOWN_TABLE,
            f"entry {record.seq}: {record.entry.table!r} is not a table this device syncs",
        )
        return
    item.entry, item.rejection = validate_entry(record.entry, item.scope, check_rows=False)
    if item.rejection is not None:
        item.entry = None
        meta = db.tables[record.entry.table]
        if len(record.entry.key) == len(meta.key):
            try:
                item.show_key = tuple(
                    coerce_value(meta.types[c], v)
                    for c, v in zip(meta.key, record.entry.key, strict=True)
                )
            except ValueError:
                pass
    elif failed is not None:
        item.rejection = Rejection(failed.reason, f"entry {record.seq}: {failed.message}")


def apply_entry(db: ApplyContext, state: RunState, item: Item) -> Outcome:
    """Merge and write a prepared item's entry in the run's transaction; its outcome."""
    record = item.record
    assert record is not None
    entry, scope = item.entry, item.scope
    rejection = item.rejection
    if record.entry is not None and record.rejection is None:
        # made on top of a rejected entry: that is the reason, whatever else is wrong
        rejection = blocked_by(record.entry, state.known_outcome) or rejection
    if rejection is not None or entry is None or scope is None:
        return rejected(db, state, item, rejection)
    meta = db.tables[entry.table]
    policy = db.policies.table(entry.table)
    current = state.row(meta, entry.key)
    times = EditTimes(
        entry.hlc,
        state.server_time(meta, policy, entry.key, current),
        state.now_ms,
        db.max_skew_ms,
    )
    result = merge(entry.op, policy, meta.types, meta.key, entry.old, current.row, entry.new, times)
    if result.action is Action.INSERT:
        try:
            inserted = state.insert(meta, result.values, scope, entry)
        except Undo as undo:
            return rejected(db, state, item, undo.rejection)
        if inserted is None:  # the key appeared meanwhile: merge again with that row
            current = state.row(meta, entry.key, reread=True)
            result = merge(
                entry.op, policy, meta.types, meta.key, entry.old, current.row, entry.new, times
            )
            if result.action is Action.INSERT:
                raise ApplierError(f"{meta.name}: a row appeared and vanished during an insert")
        else:
            result = dataclasses.replace(result, row=inserted[0])
            state.wrote.add(record.seq)
            if policy.timed:
                state.clock_written(meta, entry.key, entry.hlc, inserted[1], deleted=False)
    if result.action is not Action.INSERT:
        problem = _permission(scope, meta.name, current.row, result)
        if problem is not None:
            return rejected(
                db, state, item, Rejection(problem.reason, f"entry {record.seq}: {problem.message}")
            )
        state.write(meta, entry, result, policy)
        if result.action is not Action.NONE:
            state.wrote.add(record.seq)
    return _outcome(state, item, meta, result)


def _outcome(state: RunState, item: Item, meta: TableMeta, result: MergeResult) -> Outcome:
    record, entry, scope = item.record, item.entry, item.scope
    assert record is not None and entry is not None and scope is not None
    conflict: dict[str, Any] | None = None
    if result.held or result.held_row is not None:
        conflict_id = str(uuid.uuid4())
        state.conflict(conflict_id, record, meta, entry, result)
        if result.held:
            conflict = {"id": conflict_id, "columns": dict(result.held)}
        else:
            held = result.held_row or {}
            conflict = {
                "id": conflict_id,
                "row": {
                    "server": visible(scope, meta.name, held.get("server")),
                    "device": held.get("device"),
                },
            }
    return Outcome(
        device_id=record.device_id,
        seq=record.seq,
        kind=result.outcome,
        table=meta.name,
        key=tuple(entry.key),
        message=result.message,
        row=visible(scope, meta.name, result.row),
        columns=dict(result.columns),
        conflict=conflict,
        hlc=entry.hlc.encode(),
        at_us=state.now_ms * 1000,
    )


def rejected(db: ApplyContext, state: RunState, item: Item, rejection: Rejection | None) -> Outcome:
    """The ``rejected`` outcome of an item, showing the server's row as the device may see it."""
    record = item.record
    assert record is not None
    if rejection is None:
        rejection = Rejection(Reason.MALFORMED, f"entry {record.seq}: not a readable entry")
    raw_entry = record.entry
    key = item.entry.key if item.entry is not None else item.show_key
    row = None
    if raw_entry is not None and key is not None and item.scope is not None:
        meta = db.tables[raw_entry.table]
        row = visible(item.scope, meta.name, state.row(meta, key).row)
    return Outcome(
        device_id=record.device_id,
        seq=record.seq,
        kind=OutcomeKind.REJECTED,
        table=raw_entry.table if raw_entry is not None else None,
        key=tuple(raw_entry.key) if raw_entry is not None else None,
        reason=rejection.reason.value,
        message=rejection.message,
        row=row,
        hlc=raw_entry.hlc.encode() if raw_entry is not None else None,
        at_us=state.now_ms * 1000,
    )


def visible(scope: WriteScope, table: str, row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The row as the device may see it (its buckets' columns), None if it may not."""
    if row is None:
        return None
    buckets = scope.row_buckets(table, row)
    if not buckets:
        return None
    return dict(scope.project(table, row, buckets))


def _permission(
    scope: WriteScope, table: str, before: Mapping[str, Any] | None, result: MergeResult
) -> Rejection | None:
    if result.action is Action.UPDATE:
        return check_write(scope, table, before, result.row, list(result.values))
    if result.action is Action.DELETE:
        return check_write(scope, table, before, None, [])
    if before is not None:  # nothing written, but the outcome shows the row
        return check_write(scope, table, before, before, [])
    return None
