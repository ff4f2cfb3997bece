"""The relay's description of the synced tables (``/v1/schema``) and their local names.

:func:`parse_schema` reads a ``/v1/schema`` body into a :class:`RelaySchema` (tables with
their columns, the columns' kinds, key, rules, indexes and counter columns; the device's
buckets) and refuses anything the device cannot hold, naming it
(:class:`~device_agent.errors.StateError`): a table without a name, columns or a valid
key, a column or table name SQLite cannot use, two tables with the same local name or two
columns of a table with the same name as SQLite compares names (ASCII letters
case-insensitively: PostgreSQL's ``"Items"`` and ``items`` are one SQLite table, whose rows
and triggers both would share), ``kinds`` that are not an object of the table's columns
and texts.  A kind the device does not know (not in :data:`core.column_kinds.COLUMN_KINDS`:
a newer relay's) is left out, so that column's kind is learned from its values, as from a
relay that sends no kinds.  :func:`local_name` maps ``public.t`` to ``t`` and ``s.t`` to
``s__t``.  :func:`schema_json` is the form the device stores (``schema`` in
``_fieldsync_meta``).

Pure: no I/O.  device_agent/schema_sync.py brings the local tables to a schema.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from core.column_kinds import COLUMN_KINDS
from device_agent.errors import StateError
from device_agent.local_tables import PREFIX


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One synced table as the relay describes it (``/v1/schema``)."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    rules: tuple[str, ...] = ()
    indexes: tuple[tuple[str, ...], ...] = ()
    counters: tuple[str, ...] = ()
    kinds: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Column → kind, for the columns the relay gives one (none from an older relay)."""

    @property
    def local(self) -> str:
        return local_name(self.name)


@dataclasses.dataclass(frozen=True)
class RelaySchema:
    tables: tuple[TableSpec, ...]
    buckets: tuple[str, ...]

    def table(self, name: str) -> TableSpec | None:
        return next((t for t in self.tables if t.name == name), None)


def parse_schema(body: Any) -> RelaySchema:
    """Read a ``/v1/schema`` body; :class:`StateError` names what is wrong.

    ``columns`` may be names or objects ``{"name": …}``; ``kinds`` (optional) maps
    columns to their kinds; ``indexes`` (optional) lists column lists or objects
    ``{"columns": [...]}``; ``counters`` (optional) names the columns the server merges as
    counters (deltas add).
    """
    if not isinstance(body, dict) or not isinstance(body.get("tables"), list):
        raise StateError("the relay's schema is not an object with a 'tables' list")
    tables = []
    for raw in body["tables"]:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise StateError(f"the relay's schema has a table without a name: {raw!r:.120}")
        name = raw["name"]
        columns = tuple(
            c["name"] if isinstance(c, dict) else str(c) for c in raw.get("columns") or ()
        )
        key = tuple(str(c) for c in raw.get("key") or ())
        if not columns or not key or not set(key) <= set(columns):
            raise StateError(f"the relay's schema of {name} has no columns or an invalid key")
        for col in columns:
            check_identifier(col, f"column of {name}")
        _refuse_same_names(columns, f"columns of {name}")
        indexes = []
        for ix in raw.get("indexes") or ():
            cols = ix.get("columns") if isinstance(ix, dict) else ix
            if isinstance(cols, list) and cols and all(c in columns for c in cols):
                indexes.append(tuple(str(c) for c in cols))
        counters = tuple(str(c) for c in raw.get("counters") or () if c in columns)
        tables.append(
            TableSpec(
                name,
                columns,
                key,
                tuple(raw.get("rules") or ()),
                tuple(indexes),
                counters,
                parse_kinds(name, columns, raw.get("kinds")),
            )
        )
    _refuse_same_names([t.name for t in tables], "synced tables", local_name)
    return RelaySchema(tuple(tables), tuple(str(b) for b in body.get("buckets") or ()))


def parse_kinds(table: str, columns: tuple[str, ...], raw: Any) -> dict[str, str]:
    """A table's ``kinds`` (absent or null: none); :class:`StateError` names what is wrong."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise StateError(
            f"the relay's schema of {table} has kinds that are not an object: {raw!r:.120}"
        )
    out = {}
    for column, kind in raw.items():
        if column not in columns:
            raise StateError(
                f"the relay's schema of {table} gives a kind of {column!r}, not one of its columns"
            )
        if not isinstance(kind, str):
            raise StateError(
                f"the relay's schema of {table} gives column {column!r} the kind {kind!r:.60}, not a text"
            )
        if kind in COLUMN_KINDS:
            out[column] = kind
    return out


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def sqlite_name_key(name: str) -> str:
    """``name`` as SQLite compares identifiers: ASCII letters fold to lower case, nothing
    else does (``"Items"`` and ``"items"`` are one table, ``"Ä"`` and ``"ä"`` are two)."""
    return name.translate(_ASCII_LOWER)


def _refuse_same_names(names: Sequence[str], what: str, local: Callable[[str], str] = str) -> None:
    """StateError naming two of ``names`` whose local forms SQLite takes for one name."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(sqlite_name_key(local(name)), name)
        if other is not name:
            raise StateError(
                f"two {what}, {other!r} and {name!r}, map to the same SQLite name "
                f"{local(name)!r} (SQLite does not tell upper from lower case in names); "
                "rename one on the server or leave one out of the device's rules"
            )


def check_identifier(name: str, what: str) -> None:
    if not name or '"' in name or "\x00" in name or name.lower().startswith(PREFIX):
        raise StateError(f"{what} {name!r} cannot be used as a SQLite name")


def local_name(table: str) -> str:
    """``public.t`` → ``t``; ``s.t`` → ``s__t``."""
    schema, _, name = table.rpartition(".")
    local = name if schema in ("", "public") else f"{schema}__{name}"
    check_identifier(local, "table")
    return local


def schema_json(schema: RelaySchema) -> dict[str, Any]:
    return {
        "tables": [
            {
                "name": t.name,
                "columns": list(t.columns),
                "key": list(t.key),
                "rules": list(t.rules),
                "indexes": [list(i) for i in t.indexes],
                "counters": list(t.counters),
                "kinds": dict(t.kinds),
            }
            for t in schema.tables
        ],
        "buckets": list(schema.buckets),
    }
