"""How the log's values are shown: rows with PostgreSQL column names, values in the JSON
form of docs/events.md (:func:`core.row_wire.json_value`) or as PostgreSQL prints them,
and who made a change (:func:`describe_origin`, from the event's ``source.origin``).

A row's values are decoded with the schema version that wrote it, so a row is named
and typed by that version (``fp``, its fingerprint), not by the table's newest schema.

Pure functions: no I/O, nothing shared.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping
from typing import Any

import orjson

from core.row_wire import json_value
from core.values import to_pg_text
from replay.catalog import LogCatalog

__all__ = ["describe_origin", "dumps", "named_row", "text_of"]


def named_row(catalog: LogCatalog, fp: bytes, values: Mapping[str, Any]) -> dict[str, Any]:
    """A row with PostgreSQL column names, values in the JSON form of docs/events.md."""
    version = catalog.versions.get(fp)
    names = version.column_of() if version is not None else {}
    return {names.get(f, f): json_value(v) for f, v in values.items()}


def text_of(catalog: LogCatalog, fp: bytes, column: str, value: Any) -> str | None:
    """A JSON-form value as PostgreSQL prints it (``2024-05-01``, ``12.50``)."""
    if value is None:
        return None
    version = catalog.versions.get(fp)
    ct = version.types.get(column) if version is not None else None
    if ct is None:
        return value if isinstance(value, str) else json.dumps(value)
    try:
        return to_pg_text(ct, value)
    except (ValueError, TypeError, KeyError, ArithmeticError, binascii.Error):
        return json.dumps(value)


def dumps(value: Any) -> str:
    """Compact JSON (orjson; what it cannot serialise, as ``str``)."""
    return orjson.dumps(value, default=str).decode()


def describe_origin(
    origin: str | None, txid: int | None = None, *, snapshot: str | None = None
) -> dict[str, Any]:
    """Who made a change: ``{"kind": snapshot|device|resolve|replication_origin|session|
    other, …}``.

    ``snapshot``: ``source.snapshot`` of a snapshot read (op ``r``), None for a change.  A
    snapshot read is no change: cdc read the row (``"incremental"``: sent again by a
    re-snapshot, whose ``txid`` is cdc's own high-watermark transaction; otherwise by the
    initial snapshot), so it is never credited to a database session."""
    if snapshot is not None:
        if snapshot == "incremental":
            return {
                "kind": "snapshot",
                "snapshot": "re-snapshot",
                "txid": txid,
                "text": "read again by a cdc re-snapshot"
                + (f" (cdc's watermark txid {txid})" if txid is not None else ""),
            }
        return {
            "kind": "snapshot",
            "snapshot": "initial",
            "txid": txid,
            "text": "read by cdc's initial snapshot",
        }
    if origin is None:
        return {"kind": "session", "txid": txid, "text": f"database session (txid {txid})"}
    kind, _, name = origin.partition(":")
    if kind == "device" and name:
        return {"kind": "device", "device_id": name, "txid": txid, "text": f"device {name}"}
    if kind == "resolve" and name:
        return {
            "kind": "resolve",
            "conflict_id": name,
            "txid": txid,
            "text": f"resolution of conflict {name}",
        }
    if kind == "pg-origin" and name:
        return {
            "kind": "replication_origin",
            "name": name,
            "txid": txid,
            "text": f"replication origin {name}",
        }
    return {"kind": "other", "origin": origin, "txid": txid, "text": origin}
