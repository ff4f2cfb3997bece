"""The bucket store contract: per-bucket op logs, checkpoints with checksums, change wake-ups.

The bucket engine (:mod:`relay.downstream.bucket_engine`) writes into a store; the device API reads
from it.  :class:`BucketStore` is the protocol both sides program against; the PostgreSQL
implementation is :class:`relay.downstream.pg_bucket_store.PgBucketStore`.  Everything in this module
is pure (no I/O): the protocol, its value types, and the functions both the relay and the
device agent must compute identically (:func:`row_key_text`, :func:`canonical_json`,
:func:`row_checksum`).

Model
-----
- A *bucket* (id ``rule["v1",...]``, see :mod:`relay.downstream.rules`) holds rows of one or more
  tables.  A row inside a bucket is identified by ``(table, row_key)``; ``row_key`` is the
  canonical JSON text of the primary-key values (:func:`row_key_text`), e.g. ``[42]``.
- Every change to a bucket is an :class:`Op` with an ``op_id`` from one store-wide
  sequence: ``PUT`` (the row, projected for that bucket's rule, is now this) or
  ``REMOVE`` (the row left the bucket).  Within one bucket ops are ordered by ``op_id``.
- A device keeps one cursor per bucket: the highest ``op_id`` it has applied.  Reading the
  ops of a bucket with ``op_id > cursor`` and applying them in order brings it up to date.
  Op ids become visible in increasing order (the store guarantees that no op with a lower
  id commits after a reader has seen a higher one), so a cursor never skips anything.
- Compaction keeps only the latest op per ``(bucket, table, row_key)`` — REMOVEs
  included — which is correct for every cursor.  Dropping old REMOVEs as well (to reclaim
  space) raises the bucket's ``compacted_below`` and ``epoch``: a device whose cursor
  ``> 0`` predates the drop may have missed a REMOVE and must re-sync that bucket from
  cursor 0 (:attr:`OpsPage.resync`; see :class:`BucketCheckpoint`).
- Each bucket has a checkpoint (:class:`BucketCheckpoint`): its last op id, the number of
  rows currently in it and a checksum, the sum modulo 2**64 of :func:`row_checksum` over
  those rows.  A device that has applied every op up to ``last_op_id`` holds exactly the
  bucket iff its own sum over the rows it holds for that bucket equals ``checksum``.

Row data is stored and served as canonical JSON text (:func:`canonical_json` of
:func:`json_value` of the projected row): the bytes a device receives are the bytes the
checksum was computed from, and a device re-serializing what it parsed with
:func:`canonical_json` gets them back.

Concurrency: a store object may be shared between threads; read methods may run in
several threads at once, and the async methods may be awaited from one event loop.
Several relay processes may open stores on the same database: readers see the same ops
and checkpoints; writers serialize their transactions (see the implementation).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import weakref
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final, NamedTuple, Protocol, runtime_checkable

from core.row_wire import (
    CHECKSUM_MODULUS,
    PLAIN_TYPES,
    canonical_json,
    checksum_add,
    json_value,
    row_checksum,
    row_key_text,
)
from relay.downstream.rules import Rules, parse_bucket_id
from relay.errors import RowError

__all__ = [
    "CHECKSUM_MODULUS",
    "ApplyResult",
    "BucketCheckpoint",
    "BucketStore",
    "ChangeKind",
    "CompactResult",
    "Op",
    "OpKind",
    "OpsPage",
    "PartitionProgress",
    "Position",
    "RowChange",
    "canonical_json",
    "checksum_add",
    "json_value",
    "row_checksum",
    "row_key_text",
]

Position = tuple[int, int]
"""An event's position ``(commit_lsn, seq)``; positions are unique and totally ordered."""


# --------------------------------------------------------------------------- value types


class OpKind(enum.StrEnum):
    PUT = "PUT"
    REMOVE = "REMOVE"


class ChangeKind(enum.StrEnum):
    """What happened to a row (from the envelope's ``op``)."""

    UPSERT = "upsert"  # c insert, u update, r snapshot read: the row now is ``row``
    DELETE = "delete"  # d
    TRUNCATE = "truncate"  # t: every row of the table is gone


@dataclasses.dataclass(frozen=True, slots=True)
class RowChange:
    """One decoded change event, as the engine hands it to the store.

    - UPSERT: ``key`` is the row's (new) key, ``row`` the full new row (decoded Avro
      values), ``old_key`` the key before the change when an update changed it (else
      ``None``), ``unchanged`` the columns PostgreSQL did not send (unchanged TOAST; their
      value in ``row`` is meaningless), ``before`` the old row when the event carried all of
      it (REPLICA IDENTITY FULL), used to fill ``unchanged`` columns.
    - DELETE: ``key`` is the deleted row's key; ``row`` is ``None``.
    - TRUNCATE: ``key`` and ``row`` are ``None``.

    ``insert`` is true for an insert (op ``c``): a store need not look up the remembered
    state of an inserted row that lands in no bucket (a live row with that key cannot be
    remembered, and a re-delivered insert changes nothing either way).  ``origin`` is the
    envelope's ``source.origin`` (not interpreted).
    """

    table: str
    kind: ChangeKind
    position: Position
    key: tuple[Any, ...] | None = None
    row: Mapping[str, Any] | None = None
    old_key: tuple[Any, ...] | None = None
    unchanged: tuple[str, ...] = ()
    before: Mapping[str, Any] | None = None
    insert: bool = False
    origin: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class PartitionProgress:
    """How far the engine got in one Kafka partition: the next offset to read and the
    highest position applied from it (events at or below it are duplicates)."""

    next_offset: int
    position: Position = (0, 0)


@dataclasses.dataclass(frozen=True, slots=True)
class Op:
    """One entry of a bucket's op log.

    ``data_json`` is the projected row as canonical JSON text for ``PUT`` (``None`` for
    ``REMOVE``); the HTTP layer may embed it verbatim.  ``position`` is the position of the
    change event that produced the op.
    """

    op_id: int
    bucket: str
    table: str
    row_key: str
    kind: OpKind
    data_json: str | None
    position: Position

    @property
    def data(self) -> dict[str, Any] | None:
        """The projected row, parsed (``None`` for REMOVE)."""
        if self.data_json is None:
            return None
        parsed: dict[str, Any] = json.loads(self.data_json)
        return parsed

    @property
    def key(self) -> list[Any]:
        """The primary-key values, parsed from ``row_key``."""
        parsed: list[Any] = json.loads(self.row_key)
        return parsed


@dataclasses.dataclass(frozen=True, slots=True)
class BucketCheckpoint:
    """A bucket's state: its last op id, row count and checksum (see the module docstring).

    A bucket that never had an op has ``last_op_id == 0``, ``count == 0``, ``checksum == 0``.
    ``compacted_below``: REMOVE ops with lower ids may have been dropped.  ``epoch``
    counts those drops.  A reader holding cursor ``c > 0`` obtained under epoch ``e``
    must re-sync the bucket from 0 when ``e != epoch`` (it may have missed a REMOVE); a
    reader that does not know its epoch must when ``c < compacted_below`` (safe, but it
    flags a reader that started from 0 *after* the drop and is paging through the bucket,
    so readers that page should pass their epochs back: :meth:`BucketStore.read_ops`).
    """

    bucket: str
    last_op_id: int
    count: int
    checksum: int
    compacted_below: int = 0
    epoch: int = 0

    def needs_resync(self, cursor: int, epoch: int | None = None) -> bool:
        if cursor > self.last_op_id:
            return True  # a cursor from another store (rebuilt from scratch)
        if cursor <= 0:
            return False
        if epoch is None:
            return cursor < self.compacted_below
        return epoch != self.epoch


@dataclasses.dataclass(frozen=True, slots=True)
class OpsPage:
    """The answer to :meth:`BucketStore.read_ops`, read from one consistent snapshot.

    ``ops``: ops of the requested buckets with ``op_id`` above the bucket's cursor, in
    ``op_id`` order, at most ``limit``.  ``checkpoints``: every requested bucket's
    checkpoint.  ``cursors``: each requested bucket's cursor after applying ``ops`` (for a
    bucket in ``resync``, 0 — the device drops its rows of that bucket and reads again).
    A bucket is complete in this page when ``cursors[b] == checkpoints[b].last_op_id``;
    only then may its checksum be compared.  ``has_more``: some bucket is not complete
    because of ``limit``.  ``head_op_id``: the highest op id (of any bucket) visible in
    the snapshot; pass it to :meth:`BucketStore.wait_for_change` as ``since_op_id``.
    ``epochs``: each bucket's compaction epoch, to keep with ``cursors`` and pass back.
    """

    ops: tuple[Op, ...]
    checkpoints: Mapping[str, BucketCheckpoint]
    cursors: Mapping[str, int]
    resync: frozenset[str]
    has_more: bool
    head_op_id: int
    epochs: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one :meth:`BucketStore.apply` did.

    ``changes``: changes handed in; ``skipped_duplicates``: changes at or below the row's
    (or table's) last applied position, which changed nothing; ``skipped_errors``: changes
    that could not be placed (logged with table, key and position); ``ops``: ops written;
    ``first_op_id``/``last_op_id``: their ids (0 when none); ``buckets``: buckets touched.
    """

    changes: int
    skipped_duplicates: int
    skipped_errors: int
    ops: int
    first_op_id: int
    last_op_id: int
    buckets: frozenset[str]


@dataclasses.dataclass(frozen=True, slots=True)
class CompactResult:
    """What one :meth:`BucketStore.compact` did: ops deleted, tombstones dropped, buckets."""

    ops_deleted: int
    removes_dropped: int
    buckets: int


# --------------------------------------------------------------------------- planning (pure)

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


@dataclasses.dataclass
class Plan:
    """The outcome of :func:`plan_changes`: ops in order, new row states, bucket deltas.

    Row states refer to ops by plan index (``BucketEntry.op_id`` is ``-1 - index`` for ops of
    this plan) until the store knows the first op id: :meth:`resolve` fixes them.
    """

    ops: list[PlannedOp] = dataclasses.field(default_factory=list)
    states: dict[RowRef, RowState] = dataclasses.field(default_factory=dict)
    deltas: dict[str, BucketDelta] = dataclasses.field(default_factory=dict)
    duplicates: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)

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
    columns): a row's buckets depend on nothing else.  Bounded; rows with unhashable values
    in those columns are not cached."""

    _MISSING: Final = object()
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
        self.cache: dict[tuple[Any, ...], frozenset[str]] = {}
        self.projectors: dict[tuple[str, str], Callable[[Mapping[str, Any]], dict[str, Any]]] = {}

    def buckets(self, table: str, row: Mapping[str, Any]) -> frozenset[str]:
        missing = self._MISSING
        get = row.get
        key = (table, *[get(c, missing) for c in self.columns.get(table, ())])
        try:
            found = self.cache.get(key)
        except TypeError:  # an unhashable value
            return self.rules.buckets_for_row(table, row)
        if found is None:
            found = self.rules.buckets_for_row(table, row)
            if len(self.cache) >= self._LIMIT:
                self.cache.clear()
            self.cache[key] = found
        return found

    def data_json(self, table: str, rule: str, row: Mapping[str, Any]) -> str:
        """``canonical_json(json_value(rules.project(table, rule, row)))``."""
        project = self.projectors.get((table, rule))
        if project is None:
            project = self.projectors[table, rule] = self.rules.projector(table, rule)
        return canonical_json(_json_row(project(row)))


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


def buckets_for_row(rules: Rules, table: str, row: Mapping[str, Any]) -> frozenset[str]:
    """``rules.buckets_for_row(table, row)``, memoized per rule set (see :class:`_Placer`)."""
    return _placer(rules).buckets(table, row)


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
) -> Plan:
    """Turn changes (no truncates among them) into bucket ops, in order.  Pure.

    ``states``: the remembered state of (at least) the rows :func:`lookup_refs` names;
    ``truncated``: per table, the position of its last truncate (events at or below it are
    stale); ``stored_data``: the last known data of rows whose change carries unchanged
    (TOAST) columns, to fill those in.  A change at or below the row's remembered position
    is a duplicate and changes nothing.  A change whose row cannot be placed (a column a
    rule needs is missing) is skipped and described in :attr:`Plan.errors`.
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
        if state is not None and position <= state.position:
            plan.duplicates += 1
            continue
        old_ref = ref
        if c.old_key is not None:
            old_ref = (table, row_key_text(c.old_key))
            old = current.get(old_ref)
            if old is not None and position <= old.position:
                plan.duplicates += 1
                continue
        row = c.row
        if row is not None and c.unchanged:
            row = _filled_row(c, known.get(old_ref), known.get(ref))
        try:
            new_buckets = place(table, row) if row is not None else _NONE
        except RowError as exc:
            plan.errors.append(f"{table} key {ref[1]} at position {position}: {exc}")
            continue
        if old_ref is not ref and old_ref != ref:
            old = current.get(old_ref)
            if old is not None:
                _place(plan, placer, c, old_ref, old, None, _NONE)
                current[old_ref] = plan.states[old_ref] = RowState((), position)
            known.pop(old_ref, None)
        if state is None and not new_buckets:
            continue  # never in a bucket and still in none: nothing to remember
        entries = _place(plan, placer, c, ref, state, row, new_buckets)
        current[ref] = plan.states[ref] = RowState(entries, position)
        if row is not None and entries and kind is upsert:
            known[ref] = row
        else:
            known.pop(ref, None)
    return plan


_NONE: Final[frozenset[str]] = frozenset()


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


def _add_op(plan: Plan, op: PlannedOp) -> int:
    index = len(plan.ops)
    plan.ops.append(op)
    delta = plan.deltas.get(op.bucket)
    if delta is None:
        delta = plan.deltas[op.bucket] = BucketDelta()
    delta.last_index = index
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
        old = {e.bucket: e for e in state.entries}
        gone = old.keys() - new_buckets
        for bucket in sorted(gone) if len(gone) > 1 else gone:
            e = old[bucket]
            _add_op(plan, PlannedOp(bucket, table, key, OpKind.REMOVE, None, e.checksum, position))
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
        index = _add_op(plan, PlannedOp(bucket, table, key, put, data_json, term, position))
        entries.append(BucketEntry(bucket, -1 - index, term))
    return tuple(entries)


# --------------------------------------------------------------------------- protocol


@runtime_checkable
class BucketStore(Protocol):
    """Per-bucket op logs with checkpoints.  See the module docstring for the model.

    Reading side (device API): :meth:`read_ops`, :meth:`bucket_state`,
    :meth:`wait_for_change` and their async variants.  Writing side (bucket engine):
    :meth:`migrate`, :meth:`apply`, :meth:`compact`, offsets.
    """

    def migrate(self) -> int:
        """Create or upgrade the store's schema (idempotent); returns the schema version."""
        ...

    # ---- reading

    def read_ops(
        self,
        bucket_cursors: Mapping[str, int],
        limit: int,
        epochs: Mapping[str, int] | None = None,
    ) -> OpsPage:
        """Ops of the given buckets after their cursors, ordered by op id, at most ``limit``.

        ``epochs``: the :attr:`OpsPage.epochs` the cursors came with (see
        :class:`BucketCheckpoint`); a bucket missing from it is judged by its cursor alone.
        """
        ...

    async def read_ops_async(
        self,
        bucket_cursors: Mapping[str, int],
        limit: int,
        epochs: Mapping[str, int] | None = None,
    ) -> OpsPage:
        """:meth:`read_ops` without blocking the event loop."""
        ...

    def bucket_state(self, buckets: Sequence[str]) -> dict[str, BucketCheckpoint]:
        """The checkpoint of each bucket (a bucket never written: zeros)."""
        ...

    async def bucket_state_async(self, buckets: Sequence[str]) -> dict[str, BucketCheckpoint]:
        """:meth:`bucket_state` without blocking the event loop."""
        ...

    def wait_for_change(
        self, buckets: Sequence[str] | None, since_op_id: int, timeout: float
    ) -> int:
        """Block until an op with id > ``since_op_id`` in one of ``buckets`` (``None``: any
        bucket) may have committed, or ``timeout`` seconds passed.  Returns the highest op id
        known to be committed.  Wake-ups may be spurious; re-read to find out.  Works across
        relay processes (PostgreSQL LISTEN/NOTIFY)."""
        ...

    async def wait_for_change_async(
        self, buckets: Sequence[str] | None, since_op_id: int, timeout: float
    ) -> int:
        """:meth:`wait_for_change` for asyncio; many waiters share one listening connection."""
        ...

    # ---- writing

    def apply(
        self,
        rules: Rules,
        changes: Sequence[RowChange],
        offsets: Mapping[tuple[str, int], PartitionProgress] | None = None,
    ) -> ApplyResult:
        """Place ``changes`` into buckets with ``rules`` and write the ops, in order, in one
        transaction, together with the consumer ``offsets`` ((topic, partition) → progress).  Changes at or below a row's last applied position change nothing."""
        ...

    def load_offsets(self) -> dict[tuple[str, int], PartitionProgress]:
        """The consumer progress committed with :meth:`apply`: (topic, partition) → progress."""
        ...

    def compact(
        self, bucket: str | None = None, drop_removes_below: int | None = None
    ) -> CompactResult:
        """Keep only the latest op per row in ``bucket`` (``None``: every bucket); with
        ``drop_removes_below``, also drop REMOVE ops with lower ids and raise the buckets'
        ``compacted_below``.  Checksums and counts do not change."""
        ...

    def close(self) -> None:
        """Release connections and listeners."""
        ...
