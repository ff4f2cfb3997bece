"""Bucket operations for one row change: PUT into the buckets a row is in, REMOVE from those it left.

The change stream does not carry a row's old values (no REPLICA IDENTITY FULL
needed), so the caller remembers, per ``(table, key)``, the set of buckets the
row was last put into, and hands it in as ``old_buckets``.  From that and the
new row the functions here derive the operations:

- insert / update: ``PUT(bucket, key, projected row)`` for *every* bucket the
  new row is in (its content changed), ``REMOVE(bucket, key)`` for every old
  bucket it is no longer in (move-out: a work order reassigned to another
  technician leaves the first technician's bucket and reaches the second's);
- delete (``new_row is None``): ``REMOVE`` from every old bucket;
- key change (:func:`bucket_ops_for_change`): ``REMOVE`` of the old key from
  every old bucket, then ``PUT`` of the new key into the new buckets.

After applying the operations, the caller remembers :func:`buckets_after` for
the row's (new) key, and forgets the old key when it changed or the row was
deleted.  Operations come in a deterministic order: REMOVEs, then PUTs, each
sorted by bucket id.  Everything here is pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from relay.downstream.bucket_store import OpKind
from relay.downstream.rules import RowKey, Rules, parse_bucket_id


@dataclass(frozen=True)
class BucketOp:
    """One bucket-log operation.  ``row`` is the projected row for PUT, ``None`` for REMOVE."""

    kind: OpKind
    bucket: str
    table: str
    key: RowKey
    row: Mapping[str, Any] | None = None


def bucket_ops(
    rules: Rules,
    table: str,
    key: RowKey,
    old_buckets: frozenset[str],
    new_row: Mapping[str, Any] | None,
) -> list[BucketOp]:
    """The operations for a change that keeps the row's key (insert, update or delete)."""
    return bucket_ops_for_change(rules, table, key, key, old_buckets, new_row)


def bucket_ops_for_change(
    rules: Rules,
    table: str,
    old_key: RowKey,
    new_key: RowKey,
    old_buckets: frozenset[str],
    new_row: Mapping[str, Any] | None,
) -> list[BucketOp]:
    """The operations for any change; ``old_key != new_key`` when an update changed the key.

    ``old_buckets`` are the buckets remembered for ``old_key``.  For a delete
    pass ``new_row=None`` (``new_key`` is then ignored).
    """
    new_buckets = rules.buckets_for_row(table, new_row) if new_row is not None else frozenset()
    left = old_buckets if old_key != new_key else old_buckets - new_buckets
    ops = [BucketOp(OpKind.REMOVE, b, table, old_key) for b in sorted(left)]
    if new_row is not None:
        for b in sorted(new_buckets):
            rule, _ = parse_bucket_id(b)
            ops.append(BucketOp(OpKind.PUT, b, table, new_key, rules.project(table, rule, new_row)))
    return ops


def buckets_after(ops: Iterable[BucketOp]) -> frozenset[str]:
    """The buckets to remember for the row's (new) key once ``ops`` are applied."""
    return frozenset(op.bucket for op in ops if op.kind is OpKind.PUT)
