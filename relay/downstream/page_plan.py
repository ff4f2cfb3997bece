"""Reading many pages in one snapshot: which op slices to read, and each page made of them.

A *page request* (:class:`relay.downstream.bucket_store.PageRequest`) asks for the ops of
some buckets above their cursors, at most ``limit``, in op-id order.  When many requests
are answered from one store snapshot (a wake-up of every stream syncing one bucket, see
relay/downstream/api_reads.py), most of them need the same thing: the ops of the same
bucket above the same cursor.  :func:`plan_reads` groups them:

- per request, the buckets to re-sync (:meth:`BucketCheckpoint.needs_resync`) and the
  *pending* ones (cursor below the bucket's ``last_op_id``);
- a request with one pending bucket needs one *slice*: that bucket's ops above the cursor,
  read once per ``(bucket, cursor)`` with the largest limit any request asks of it;
- a request with several pending buckets needs their merged ops; identical sets of
  ``(bucket, cursor)`` pairs are read once (with the largest limit asked).

A request for the wire form (:attr:`PageRequest.wire`: the ops as the device API's JSON)
is answered by the store with each slice rendered whole, as one text; its slice is keyed
by its own limit as well (devices at the same position asking the same page size still
share one read).

:func:`compose` then makes each page from the slices: its first ``limit`` ops, each
cursor moved as far as the page reaches, exactly the page :meth:`BucketStore.read_ops`
would have answered for that request alone in the same snapshot (the first ``limit`` ops
of a read with a larger limit are the ops of the read with the smaller one).  A slice is
anything that gives its first ops (:class:`Slice`): :class:`OpRows` holds ``(op_id,
Op)`` pairs and cuts them at any limit; a wire slice (:class:`WireRun`) holds its ops'
count, last op id and text, read for exactly its request's limit.

Pure: values in, values out; safe from any thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Generic, Protocol, TypeVar

from relay.downstream.bucket_store import BucketCheckpoint, Op, PageRequest

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)

Pairs = tuple[tuple[str, int], ...]
"""The ``(bucket, cursor)`` pairs a slice covers, in bucket order (one pair for most)."""
SliceKey = tuple[bool, Pairs, int, int]
"""A slice: whether its ops are rendered for the wire (:attr:`PageRequest.wire`), its
pairs, and for the wire its requests' limit and byte bound (0, 0 otherwise: the largest
limit asked, no bound)."""


class Slice(Protocol[_T_co]):
    """The ops a slice read gives, as the reader made them."""

    def head(self, limit: int) -> tuple[int, int, _T_co]:
        """The first ``limit`` ops: ``(how many, the last one's op id or 0, the items)``."""
        ...

    @property
    def cut(self) -> bool:
        """Whether the read ended at its byte bound with ops above it left out (then a
        page of fewer ops than its limit has not reached the buckets' ends)."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class OpRows:
    """A slice of :class:`Op` objects, ``(op_id, op)`` in op-id order."""

    rows: Sequence[tuple[int, Op]]
    cut: bool = False

    def head(self, limit: int) -> tuple[int, int, tuple[Op, ...]]:
        taken = self.rows[:limit]
        return len(taken), taken[-1][0] if taken else 0, tuple(op for _, op in taken)


@dataclasses.dataclass(frozen=True, slots=True)
class WireRun:
    """A slice rendered for the wire by the store, whole: its ops' count, the last op
    id, and the ops' JSON texts joined by commas (read for its requests' limit)."""

    count: int
    last_op_id: int
    text: str
    cut: bool = False
    """Ops above ``last_op_id`` were left out: the read reached its byte bound."""

    def head(self, limit: int) -> tuple[int, int, str]:
        if limit < self.count:
            raise ValueError(f"a wire slice of {self.count} ops cannot be cut at {limit}")
        return self.count, self.last_op_id, self.text


@dataclasses.dataclass(frozen=True, slots=True)
class RequestPlan:
    """What one request needs: buckets to re-sync, and the slice (``None``: no ops)."""

    resync: frozenset[str]
    key: SliceKey | None


@dataclasses.dataclass(frozen=True, slots=True)
class ReadPlan:
    """Per request its :class:`RequestPlan`; per slice key the largest limit asked of it."""

    requests: tuple[RequestPlan, ...]
    limits: Mapping[SliceKey, int]

    @property
    def single(self) -> dict[SliceKey, int]:
        """The one-pair slices: key → limit."""
        return {key: n for key, n in self.limits.items() if len(key[1]) == 1}

    @property
    def merged(self) -> dict[SliceKey, int]:
        """The slices over several buckets: key → limit."""
        return {key: n for key, n in self.limits.items() if len(key[1]) > 1}


@dataclasses.dataclass(frozen=True, slots=True)
class PageFrame(Generic[_T]):
    """A composed page: its ops (``count``, ``limit`` at most, op-id order, as the
    slice's :meth:`Slice.head` gives them), the cursors after them, the buckets to
    re-sync, ``has_more`` and the buckets' epochs."""

    count: int
    items: _T
    cursors: Mapping[str, int]
    resync: frozenset[str]
    has_more: bool
    epochs: Mapping[str, int]


def plan_reads(
    requests: Sequence[PageRequest], checkpoints: Mapping[str, BucketCheckpoint]
) -> ReadPlan:
    """The slices ``requests`` need, given every requested bucket's checkpoint."""
    plans: list[RequestPlan] = []
    limits: dict[SliceKey, int] = {}
    for req in requests:
        epochs = req.epochs or {}
        resync = frozenset(
            b for b, c in req.cursors.items() if checkpoints[b].needs_resync(c, epochs.get(b))
        )
        pending = tuple(
            sorted(
                (b, c)
                for b, c in req.cursors.items()
                if b not in resync and c < checkpoints[b].last_op_id
            )
        )
        key = (
            (req.wire, pending, req.limit if req.wire else 0, req.max_bytes if req.wire else 0)
            if pending
            else None
        )
        if key is not None:
            limits[key] = max(limits.get(key, 0), req.limit)
        plans.append(RequestPlan(resync, key))
    return ReadPlan(tuple(plans), limits)


def compose(
    request: PageRequest,
    plan: RequestPlan,
    checkpoints: Mapping[str, BucketCheckpoint],
    slices: Mapping[SliceKey, Slice[_T]],
    empty: _T,
) -> PageFrame[_T]:
    """The page of ``request``: the first ``limit`` ops of its slice (``empty``: the
    items of no ops), each cursor moved as far as the page reaches (to the bucket's last
    op when the page holds every op above the cursors; 0 for a bucket to re-sync)."""
    found = slices.get(plan.key) if plan.key is not None else None
    count, upto, items = found.head(request.limit) if found is not None else (0, 0, empty)
    # every op above the cursors is in the page (not when the read stopped at its bytes)
    full = count < request.limit and not (found is not None and found.cut)
    cursors: dict[str, int] = {}
    for b, have in request.cursors.items():
        cp = checkpoints[b]
        if b in plan.resync:
            cursors[b] = 0
        elif full:
            cursors[b] = max(have, cp.last_op_id)
        else:
            cursors[b] = max(have, min(upto, cp.last_op_id))
    has_more = any(
        cursors[b] < checkpoints[b].last_op_id for b in request.cursors if b not in plan.resync
    )
    epochs = {b: checkpoints[b].epoch for b in request.cursors}
    return PageFrame(count, items, cursors, plan.resync, has_more, epochs)
