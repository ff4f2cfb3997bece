"""Planning bucket ops (pure): which ops a batch of row changes makes, and what follows.

:func:`plan_changes` turns changes into the ops to write, in order, with the row states
and bucket checkpoint deltas they lead to; the store (relay/downstream/pg_store_writes.py)
loads what it needs first (:func:`lookup_refs` names the rows whose remembered state it
must read), allocates the op ids and writes the plan in one transaction.

- A row's remembered state (:class:`RowState`) lists the buckets it is in, with the op id
  of its latest PUT there and its checksum term (:class:`BucketEntry`), and the position of
  the last change applied to it.  A change at or below that position, or at or below its
  table's last truncate, is a duplicate and changes nothing.
- A change REMOVEs the row from each remembered bucket it left, then PUTs the projected row
  into each bucket it is in (each in bucket order); a key change first empties the old
  key's state (a tombstone, which keeps older events of that key from coming back, also
  when the old key was never seen: its events are in another Kafka partition, which may be
  applied later).  The two halves of a key change are applied independently, each unless
  its key already saw a later change.  These
  are the operations of tests/relay/bucket_oracle.py, computed directly for speed; a test
  pins the equality.
- Checksum terms are :func:`core.row_wire.row_checksum` of ``[table, key, data]``; a
  bucket's checksum is their sum modulo 2**64 (:class:`BucketDelta` is a plan's net effect
  on one bucket).

Pure: no I/O.  The memo of row placements per rule set (:func:`buckets_for_row`) is a
cache with no visible state; plans are built by one thread each.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import operator
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final, NamedTuple

from core.row_wire import CHECKSUM_MODULUS, PLAIN_TYPES, canonical_json, json_value, row_key_text
from relay.downstream.bucket_store import ChangeKind, OpKind, Position, RowChange
from relay.downstream.rules import Rules, parse_bucket_id
from relay.downstream.unchanged_fill import Fills, Wanted
from relay.errors import RowError

RowRef = tuple[str, str]
"""A row's identity in the store: ``(table, row_key)`` with :func:`row_key_text`."""


class BucketEntry(NamedTuple):
    """A row's membership of one bucket: the id of its latest PUT and its checksum term.

    (This and :class:`RowState` and :class:`PlannedOp` are named tuples, not frozen
    dataclasses: the store builds one per row and op, and tuples are several times cheaper
    to make.)"""

    bucket: str
    op_id: int
    checksum: int


class RowState(NamedTuple):
    """What the store remembers of a row: the buckets it is in and the last applied position.

    A state with no entries is a *tombstone*: the row was deleted, moved to another key or
    left every bucket at ``position``; it keeps older events of that key from coming back.
    """

    entries: tuple[BucketEntry, ...]
    position: Position

    @property
    def buckets(self) -> frozenset[str]:
        return frozenset(e.bucket for e in self.entries)


class PlannedOp(NamedTuple):
    """An op to write.  ``op_id`` is ``first_op_id + index`` once ids are allocated."""

    bucket: str
    table: str
    row_key: str
    kind: OpKind
    data_json: str | None
    checksum: int  # the row's checksum term for PUT; for REMOVE the term removed
    position: Position


@dataclasses.dataclass
class BucketDelta:
    """The net effect of a plan on one bucket."""

    count: int = 0
    checksum: int = 0  # to add, modulo 2**64
    last_index: int = -1  # index of the bucket's last op in the plan
    ops: int = 0  # ops of the plan in the bucket (its log grows by as many)


@dataclasses.dataclass
class Plan:
    """The outcome of :func:`plan_changes`: ops in order, new row states, bucket deltas.

    Row states refer to ops by plan index (``BucketEntry.op_id`` is ``-1 - index`` for ops of
    this plan) until the store knows the first op id ``first``: such an entry's op id is
    then ``first - 1 - op_id`` (``first + index``; :meth:`resolve`, which the store's write
    of the states does inline); entries of earlier ops keep theirs.
    """

    ops: list[PlannedOp] = dataclasses.field(default_factory=list)
    states: dict[RowRef, RowState] = dataclasses.field(default_factory=dict)
    deltas: dict[str, BucketDelta] = dataclasses.field(default_factory=dict)
    duplicates: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    wanted: list[Wanted] = dataclasses.field(default_factory=list)
    """Rows whose missing unchanged TOAST values are to be read from the source (see
    relay/downstream/unchanged_fill.py); their changes are among :attr:`errors` until
    the batch is planned again with what the source gave."""
    source_filled: int = 0  # changes completed with values the source gave
    source_gone: int = 0  # changes whose row the source no longer has: placed nowhere
    unfilled: int = 0  # changes skipped for a value that could not be had

    def resolve(self, first_op_id: int) -> dict[RowRef, RowState]:
        """The row states with real op ids, given the id of the plan's first op."""
        out: dict[RowRef, RowState] = {}
        for ref, state in self.states.items():
            entries = tuple(
                BucketEntry(e.bucket, first_op_id - 1 - e.op_id, e.checksum) if e.op_id < 0 else e
                for e in state.entries
            )
            out[ref] = RowState(entries, state.position)
        return out


class _Placer:
    """``rules.buckets_for_row`` memoized on the columns the rules read (match and filter
    columns): a row's buckets depend on nothing else.  Bounded; rows lacking one of those
    columns (``rules.buckets_for_row`` says why) or with unhashable values in them are not
    cached."""

    _LIMIT: Final = 1 << 17

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        columns: dict[str, set[str]] = {}
        for rule in rules.buckets.values():
            for table, entry in rule.tables.items():
                wanted = columns.setdefault(table, set())
                wanted.update(column for column, _ in entry.match)
                wanted.update(f.column for f in entry.filters)
        self.columns = {t: tuple(sorted(c)) for t, c in columns.items()}
        # the placement values of a row, one getter per table (KeyError: a column missing)
        self.getters: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            t: operator.itemgetter(*c) for t, c in self.columns.items() if c
        }
        self.cache: dict[tuple[str, Any], frozenset[str]] = {}
        self.projectors: dict[tuple[str, str], Callable[[Mapping[str, Any]], dict[str, Any]]] = {}

    def buckets(self, table: str, row: Mapping[str, Any]) -> frozenset[str]:
        getter = self.getters.get(table)
        try:
            key = (table, getter(row) if getter is not None else None)
            found = self.cache.get(key)
        except (KeyError, TypeError):  # a placement column missing, or an unhashable value
            return self.rules.buckets_for_row(table, row)
        if found is None:
            found = self.rules.buckets_for_row(table, row)
            if len(self.cache) >= self._LIMIT:
                self.cache.clear()
            self.cache[key] = found
        return found

    def data_json(self, table: str, rule: str, row: Mapping[str, Any]) -> str:
        """``canonical_json(json_value(rules.project(table, rule, row)))``."""
        return canonical_json(_json_row(self._projector(table, rule)(row)))

    def keeps(self, table: str, rule: str, columns: Sequence[str]) -> bool:
        """Whether ``rule``'s projection of ``table`` keeps one of ``columns``."""
        return bool(self._projector(table, rule)(dict.fromkeys(columns)))

    def _projector(self, table: str, rule: str) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
        project = self.projectors.get((table, rule))
        if project is None:
            project = self.projectors[table, rule] = self.rules.projector(table, rule)
        return project


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """:func:`json_value` of a projected row (a fresh dict, converted in place)."""
    for column, value in row.items():
        kind = type(value)
        if kind in PLAIN_TYPES:
            continue
        row[column] = str(value) if kind is Decimal else json_value(value)
    return row


_PLACERS: weakref.WeakKeyDictionary[Rules, _Placer] = weakref.WeakKeyDictionary()


def _placer(rules: Rules) -> _Placer:
    placer = _PLACERS.get(rules)
    if placer is None:
        placer = _PLACERS[rules] = _Placer(rules)
    return placer


def placement_columns(rules: Rules, table: str) -> tuple[str, ...]:
    """The columns of ``table`` a row's buckets depend on (match and filter columns)."""
    return _placer(rules).columns.get(table, ())


def buckets_for_row(rules: Rules, table: str, row: Mapping[str, Any]) -> frozenset[str]:
    """``rules.buckets_for_row(table, row)``, memoized per rule set (see :class:`_Placer`)."""
    return _placer(rules).buckets(table, row)


def row_placer(rules: Rules) -> Callable[[str, Mapping[str, Any]], frozenset[str]]:
    """:func:`buckets_for_row` of ``rules`` as one function (table, row → bucket ids),
    without looking the rule set's memo up at each call."""
    return _placer(rules).buckets


def lookup_refs(rules: Rules, changes: Sequence[RowChange]) -> set[RowRef]:
    """The rows whose remembered state :func:`plan_changes` needs for ``changes``.

    Every row touched, except inserted rows that land in no bucket (see
    :attr:`RowChange.insert`) and changes of tables no rule places.
    """
    refs: set[RowRef] = set()
    ruled = rules.tables
    placer = _placer(rules)
    for c in changes:
        if c.table not in ruled or c.key is None:
            continue
        if c.insert and c.row is not None and not c.unchanged and c.old_key is None:
            try:
                if not placer.buckets(c.table, c.row):
                    continue
            except RowError:
                pass
        refs.add((c.table, row_key_text(c.key)))
        if c.old_key is not None:
            refs.add((c.table, row_key_text(c.old_key)))
    return refs


def plan_changes(
    rules: Rules,
    changes: Sequence[RowChange],
    states: Mapping[RowRef, RowState],
    truncated: Mapping[str, Position],
    stored_data: Mapping[RowRef, Mapping[str, Any]] | None = None,
    *,
    fills: Fills | None = None,
) -> Plan:
    """Turn changes (no truncates among them) into bucket ops, in order.  Pure.

    ``states``: the remembered state of (at least) the rows :func:`lookup_refs` names;
    ``truncated``: per table, the position of its last truncate (events at or below it are
    stale); ``stored_data``: the last known data of rows whose change carries unchanged
    (TOAST) columns, to fill those in; ``fills``: what the captured database gave of the
    values still missing (None: it cannot be asked; else a key change is never filled from
    the old key's data, which may be a read made after another row took that key).  A
    change at or below the row's
    remembered position is a duplicate and changes nothing.  A change whose row cannot be
    placed (a column a rule needs is missing) is skipped and described in
    :attr:`Plan.errors`, and so is one whose row lacks an unchanged TOAST value a rule
    reads or a bucket it goes to keeps, which neither ``stored_data`` nor ``fills`` hold
    (such a row is never sent without it; :attr:`Plan.wanted` names what to read, see
    relay/downstream/unchanged_fill.py); the old key of such a key change is still retired
    (PostgreSQL no longer has it).  A row ``fills`` says the database has no more under
    its key is placed in no bucket.
    """
    plan = Plan()
    current: dict[RowRef, RowState] = dict(states)
    known = dict(stored_data or {})
    ruled = rules.tables
    placer = _placer(rules)
    place = placer.buckets
    truncated_at = truncated.get
    upsert = ChangeKind.UPSERT
    for c in changes:
        kind = c.kind
        if kind is ChangeKind.TRUNCATE:
            raise ValueError("plan_changes: truncates are applied by the store, not planned")
        table = c.table
        if table not in ruled or c.key is None:
            continue
        position = c.position
        cut = truncated_at(table)
        if cut is not None and position <= cut:
            plan.duplicates += 1
            continue
        ref = (table, row_key_text(c.key))
        state = current.get(ref)
        # a key change has two halves, each applied unless its key has seen a later change
        # (partitions applied out of step: the old key's events are in another partition)
        retire: RowRef | None = None
        if c.old_key is not None:
            old_ref = (table, row_key_text(c.old_key))
            old = current.get(old_ref)
            if old_ref != ref and (old is None or position > old.position):
                retire = old_ref
        if state is not None and position <= state.position:
            if retire is not None:
                _retire(plan, placer, c, retire, current, known)
            else:
                plan.duplicates += 1
            continue
        row = c.row
        if row is not None and c.unchanged:
            if fills is not None and c.old_key is not None and c.old_key != c.key:
                # a key change: the old key's data may hold values read from the source
                # after the key was taken by another row, so the new key is read instead
                row = _filled_row(c, None, None)
            else:
                row = _filled_row(c, known.get(retire or ref), known.get(ref))
            lacking = _lacking(placer, c, row)
            if lacking:
                got = _from_source(plan, placer, c, ref, row, lacking, fills)
                if got is _UNFILLED:
                    if retire is not None:  # the old key is gone all the same
                        _retire(plan, placer, c, retire, current, known)
                    continue
                row = None if got is None else {**row, **got}  # None: gone from the source
        try:
            new_buckets = place(table, row) if row is not None else _NONE
        except RowError as exc:
            plan.errors.append(f"{table} key {ref[1]} at position {position}: {exc}")
            if retire is not None:  # the old key is gone whether or not its new row is placed
                _retire(plan, placer, c, retire, current, known)
            continue
        if retire is not None:
            _retire(plan, placer, c, retire, current, known)
        if state is None and not new_buckets:
            continue  # never in a bucket and still in none: nothing to remember
        entries = _place(plan, placer, c, ref, state, row, new_buckets)
        current[ref] = plan.states[ref] = _new(RowState, (entries, position))
        if row is not None and entries and kind is upsert:
            known[ref] = row
        else:
            known.pop(ref, None)
    return plan


_NONE: Final[frozenset[str]] = frozenset()
_UNFILLED: Final[Mapping[str, Any]] = {}
_new: Final = tuple.__new__
"""Builds a named tuple from a tuple of its fields: several times cheaper than calling the
class (whose ``__new__`` is a Python function)."""


def _retire(
    plan: Plan,
    placer: _Placer,
    c: RowChange,
    old_ref: RowRef,
    current: dict[RowRef, RowState],
    known: dict[RowRef, Mapping[str, Any]],
) -> None:
    """The old key of a key change: REMOVEd from its buckets, and a tombstone at the
    change's position, even when it was never seen (its older events, in another partition,
    may still come and must stay out)."""
    old = current.get(old_ref)
    if old is not None:
        _place(plan, placer, c, old_ref, old, None, _NONE)
    current[old_ref] = plan.states[old_ref] = _new(RowState, ((), c.position))
    known.pop(old_ref, None)


def _filled_row(
    c: RowChange, old_data: Mapping[str, Any] | None, data: Mapping[str, Any] | None
) -> dict[str, Any]:
    row = dict(c.row or {})
    for column in c.unchanged:
        row.pop(column, None)
        for source in (c.before, old_data, data):
            if source is not None and column in source:
                row[column] = source[column]
                break
    return row


def _lacking(placer: _Placer, c: RowChange, row: Mapping[str, Any]) -> tuple[str, ...]:
    """The unchanged columns ``row`` lacks, when one of them is read to place it or kept
    by a bucket it goes to (else none: the row is placed and stored without them)."""
    missing = tuple(column for column in c.unchanged if column not in row)
    if not missing:
        return ()
    table = c.table
    if any(column in missing for column in placer.columns.get(table, ())):
        return missing
    try:
        buckets = placer.buckets(table, row)
    except RowError:
        return ()  # the placement reports it
    rules = {_rule_name(bucket) for bucket in buckets}
    return missing if any(placer.keeps(table, rule, missing) for rule in rules) else ()


def _from_source(
    plan: Plan,
    placer: _Placer,
    c: RowChange,
    ref: RowRef,
    row: Mapping[str, Any],
    lacking: tuple[str, ...],
    fills: Fills | None,
) -> Mapping[str, Any] | None:
    """The values of ``lacking`` the source gave; None when it has no such row now;
    :data:`_UNFILLED` (the change described in :attr:`Plan.errors`, or its row added to
    :attr:`Plan.wanted`) when they are not known."""
    if fills is None:
        why = "relay.source_dsn is not set, so they cannot be read from the captured database"
    elif ref in fills.failed:
        why = f"reading them from the captured database failed: {fills.failed[ref]}"
    elif ref in fills.rows:
        found = fills.rows[ref]
        if found is None:
            plan.source_gone += 1
            return None
        if all(column in found for column in lacking):
            plan.source_filled += 1
            return {column: found[column] for column in lacking}
        why = "the captured database did not give them"
    else:
        key_columns = placer.rules.table_info(c.table).key
        if key_columns and all(k in row and k not in c.unchanged for k in key_columns):
            plan.wanted.append(Wanted(ref, tuple((k, row[k]) for k in key_columns), lacking))
            why = "not read from the captured database yet"
        else:
            why = "the event's row lacks the key columns to read them by"
    plan.unfilled += 1
    plan.errors.append(
        f"{c.table} key {ref[1]} at position {c.position}: the value of column(s) "
        f"{', '.join(lacking)} is unknown (unchanged TOAST, not in the event, no copy in the "
        f"relay): {why}; the row is not sent without it"
    )
    return _UNFILLED


def _add_op(plan: Plan, op: PlannedOp) -> int:
    index = len(plan.ops)
    plan.ops.append(op)
    delta = plan.deltas.get(op.bucket)
    if delta is None:
        delta = plan.deltas[op.bucket] = BucketDelta()
    delta.last_index = index
    delta.ops += 1
    if op.kind is OpKind.PUT:
        delta.count += 1
        delta.checksum = (delta.checksum + op.checksum) % CHECKSUM_MODULUS
    else:
        delta.count -= 1
        delta.checksum = (delta.checksum - op.checksum) % CHECKSUM_MODULUS
    return index


@functools.lru_cache(maxsize=1 << 16)
def _rule_name(bucket: str) -> str:
    return parse_bucket_id(bucket)[0]


@functools.lru_cache(maxsize=1024)
def _table_json(table: str) -> str:
    return canonical_json(table)


def _place(
    plan: Plan,
    placer: _Placer,
    c: RowChange,
    ref: RowRef,
    state: RowState | None,
    row: Mapping[str, Any] | None,
    new_buckets: frozenset[str],
) -> tuple[BucketEntry, ...]:
    """Add the row's ops to the plan; its entries afterwards.

    The same operations as :func:`tests.relay.bucket_oracle.bucket_ops` (REMOVE from each remembered
    bucket the row left, then PUT of the projected row into each bucket it is in, each in
    bucket order), computed directly for speed; a test pins the equality.
    """
    table, key = ref
    position = c.position
    old: dict[str, BucketEntry] = {}
    if state is not None and state.entries:
        remembered = state.entries
        if len(remembered) == 1:  # the common case: one bucket, no sets to build
            e = remembered[0]
            old = {e.bucket: e}
            gone: Iterable[str] = () if e.bucket in new_buckets else (e.bucket,)
        else:
            old = {e.bucket: e for e in remembered}
            gone = sorted(old.keys() - new_buckets)
        for bucket in gone:
            e = old[bucket]
            op = (bucket, table, key, OpKind.REMOVE, None, e.checksum, position)
            _add_op(plan, _new(PlannedOp, op))
    if not new_buckets:
        return ()
    assert row is not None
    prefix = "[" + _table_json(table) + "," + canonical_json(key) + ","
    entries: list[BucketEntry] = []
    projected: dict[str, str] = {}  # per rule
    put = OpKind.PUT
    deltas = plan.deltas
    for bucket in sorted(new_buckets) if len(new_buckets) > 1 else new_buckets:
        rule = _rule_name(bucket)
        data_json = projected.get(rule)
        if data_json is None:
            data_json = projected[rule] = placer.data_json(table, rule, row)
        digest = hashlib.sha256((prefix + data_json + "]").encode("utf-8")).digest()
        term = int.from_bytes(digest[:8], "big")
        previous = old.get(bucket)
        if previous is not None:  # replace: the old term leaves, the row count stays
            delta = deltas.get(bucket)
            if delta is None:
                delta = deltas[bucket] = BucketDelta()
            delta.count -= 1
            delta.checksum = (delta.checksum - previous.checksum) % CHECKSUM_MODULUS
        index = _add_op(plan, _new(PlannedOp, (bucket, table, key, put, data_json, term, position)))
        entries.append(_new(BucketEntry, (bucket, -1 - index, term)))
    return tuple(entries)
