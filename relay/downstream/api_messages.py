"""The device API's messages: the JSON bodies of ``/v1/changes`` (and the stream),
``/v1/checkpoint`` and ``/v1/schema``, and their OpenAPI description.

A *changes message* (:func:`changes_message`) carries ``ops`` (each ``op_id``,
``bucket``, ``op`` ``PUT``/``REMOVE``, ``table``, ``key``, ``data``, ``position``
``[commit_lsn, seq]``), the next ``cursor``, a ``checkpoint`` (per bucket ``last_op_id``,
``count``, ``checksum`` as a decimal string, ``complete``; and ``complete`` overall),
``resync``, ``dropped`` and ``has_more``.  The store's canonical ``row_key`` and
``data_json`` texts are embedded verbatim (:func:`ops_json`, or the same text rendered by
the store: :attr:`relay.downstream.bucket_store.OpsPage.wire`): the bytes a device
receives are the bytes the checksum was computed from.  :func:`visible_schema` tells a device the
tables and columns its buckets' rules show it.

The pydantic models only document these shapes in OpenAPI; responses are built by hand
(orjson).  Pure: safe from any thread or coroutine.  (No ``from __future__ import
annotations``: pydantic reads the model annotations at runtime.)
"""

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import orjson
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from relay.api_errors import ErrorMessage
from relay.downstream.api_cursor import encode_cursor
from relay.downstream.bucket_store import BucketCheckpoint, Op, OpsPage
from relay.downstream.rules import Rules


def visible_schema(
    rules: Rules, buckets: Sequence[str], counters: Mapping[str, Sequence[str]] | None = None
) -> dict[str, Any]:
    """The tables and columns a device syncing ``buckets`` receives (schema endpoint body).

    Per table: its columns in table order (the union over the device's bucket
    rules of each rule's projection; key columns always), each column's ``kinds``
    (how its values look on the wire, :mod:`core.column_kinds`; left out when the
    rules were bound to definitions without kinds), its primary key, the rules through
    which the device gets rows of it, and which of its columns are ``counters`` (merged
    by adding deltas).
    """
    rule_names = sorted({rules.rule_of_bucket(b).name for b in buckets})
    columns: dict[str, set[str]] = {}
    via: dict[str, list[str]] = {}
    for name in rule_names:
        for table in rules.buckets[name].tables:
            info = rules.table_info(table)
            probe = dict.fromkeys(info.columns)
            columns.setdefault(table, set()).update(rules.project(table, name, probe))
            via.setdefault(table, []).append(name)
    tables = []
    for table in sorted(columns):
        info = rules.table_info(table)
        shown = [c for c in info.columns if c in columns[table]]
        entry: dict[str, Any] = {
            "name": table,
            "columns": shown,
            "key": list(info.key),
            "rules": via[table],
            "counters": [c for c in shown if c in (counters or {}).get(table, ())],
        }
        if info.kinds:
            kinds = dict(info.kinds)
            entry["kinds"] = {c: kinds[c] for c in shown if c in kinds}
        tables.append(entry)
    return {"tables": tables, "buckets": sorted(buckets)}


# --------------------------------------------------------------------------- messages


def checkpoint_json(checkpoints: Mapping[str, BucketCheckpoint]) -> dict[str, Any]:
    return {
        "buckets": {
            b: {"last_op_id": cp.last_op_id, "count": cp.count, "checksum": str(cp.checksum)}
            for b, cp in sorted(checkpoints.items())
        }
    }


def ops_json(ops: Sequence[Op]) -> str:
    """The ``ops`` array as JSON text; the store's canonical ``row_key`` and ``data_json``
    texts are embedded verbatim (no parse and re-serialize per row)."""
    names: dict[str, str] = {}
    parts = []
    for op in ops:
        bucket = names.get(op.bucket)
        if bucket is None:
            bucket = names[op.bucket] = orjson.dumps(op.bucket).decode()
        table = names.get(op.table)
        if table is None:
            table = names[op.table] = orjson.dumps(op.table).decode()
        data = op.data_json if op.data_json is not None else "null"
        parts.append(
            f'{{"op_id":{op.op_id:d},"bucket":{bucket},"op":"{op.kind.value}",'
            f'"table":{table},"key":{op.row_key},"data":{data},'
            f'"position":[{op.position[0]:d},{op.position[1]:d}]}}'
        )
    return "[" + ",".join(parts) + "]"


def changes_message(page: OpsPage, dropped: Sequence[str]) -> dict[str, Any]:
    """The changes message for a page read from the store (serialize with :func:`dumps`)."""
    ops = orjson.Fragment(page.wire.json if page.wire is not None else ops_json(page.ops))
    buckets: dict[str, Any] = {}
    complete = True
    for b, cp in sorted(page.checkpoints.items()):
        done = b not in page.resync and page.cursors.get(b, 0) >= cp.last_op_id
        complete = complete and done
        buckets[b] = {
            "last_op_id": cp.last_op_id,
            "count": cp.count,
            "checksum": str(cp.checksum),
            "complete": done,
        }
    return {
        "type": "changes",
        "ops": ops,
        "cursor": encode_cursor(page.cursors, page.epochs),
        "checkpoint": {"complete": complete and not page.has_more, "buckets": buckets},
        "resync": sorted(page.resync),
        "dropped": list(dropped),
        "has_more": page.has_more,
    }


def dumps(message: Mapping[str, Any]) -> bytes:
    return orjson.dumps(message)


class OrjsonResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


# ---- OpenAPI models (documentation of the shapes above; responses are built by hand)


class OpModel(BaseModel):
    op_id: int = Field(description="store-wide op id; ordered within a bucket")
    bucket: str
    op: Literal["PUT", "REMOVE"]
    table: str = Field(description="schema.table")
    key: list[Any] = Field(description="primary-key values in key-column order")
    data: dict[str, Any] | None = Field(
        description="PUT: the row as the bucket's rule projects it (canonical JSON); REMOVE: null"
    )
    position: list[int] = Field(
        description="[commit_lsn, seq] of the change event behind the op; a device edit "
        "of this row version sends it as the journal entry's base"
    )


class BucketCheckpointModel(BaseModel):
    last_op_id: int
    count: int = Field(description="rows in the bucket")
    checksum: str = Field(
        description="sum mod 2**64 of row_checksum over the bucket's rows, decimal text"
    )
    complete: bool = Field(
        default=True, description="the message's ops bring the bucket up to last_op_id"
    )


class CheckpointModel(BaseModel):
    complete: bool = Field(
        default=True, description="every bucket is complete: apply the buffered ops now"
    )
    buckets: dict[str, BucketCheckpointModel]


class ChangesMessage(BaseModel):
    type: Literal["changes"] = "changes"
    ops: list[OpModel]
    cursor: str = Field(description="opaque; send it back as ?cursor= to continue")
    checkpoint: CheckpointModel
    resync: list[str] = Field(description="buckets to empty and read again from scratch")
    dropped: list[str] = Field(description="buckets the token no longer grants: delete their rows")
    has_more: bool = Field(description="more ops are waiting: ask again at once")


class TableModel(BaseModel):
    name: str
    columns: list[str]
    kinds: dict[str, Literal["bool", "int", "float", "text", "json"]] | None = Field(
        default=None,
        description="column → how its values look as JSON: bool (true/false), int "
        "(integers; dates, times and timestamps as days and µs), float, text (strings: "
        "text, numeric, uuid, bytea as base64, json as its text, ...), json (arrays and "
        "objects: arrays, intervals); absent when the relay does not know them",
    )
    key: list[str]
    rules: list[str]
    counters: list[str] = Field(
        default_factory=list,
        description="columns merged by adding deltas (conflict policy counter): a device "
        "shows an open edit of one as its delta on top of the server's value",
    )


class SchemaMessage(BaseModel):
    tables: list[TableModel]
    buckets: list[str]


class HealthMessage(BaseModel):
    status: Literal["ok", "degraded"]
    store: Literal["ok", "unreachable"]


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorMessage} for s in (400, 401, 403, 413, 422, 429, 500, 503)
}
