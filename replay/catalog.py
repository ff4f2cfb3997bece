"""The log's schemas: what ``{prefix}._schemas`` says about the tables in the log.

cdc publishes every Avro schema it writes with (key and value schemas, docs/events.md)
to ``{prefix}._schemas`` before the first event that names it.  :class:`LogCatalog` holds
them as read: the :class:`~core.avro_envelope.SchemaRegistry` that decodes events (each
event names its schema by fingerprint), and per value schema a :class:`TableVersion`
(Avro field names, PostgreSQL column names, key columns, column types).  A table's
schema versions are its value schemas in the order they were published; every event is
decoded with the schema it names, so topics that hold several versions (ALTER TABLE)
read correctly.  Schemas published after a read started are picked up by reading the
topic again (:meth:`replay.log_source.LogSource.catalog` with ``refresh``).

No I/O here; a catalog belongs to the one reader (or report) that built it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from core.avro_envelope import SchemaRegistry
from core.topic_names import change_topic_of
from core.value_schemas import column_types_from_value_schema
from replay.errors import UnknownTable

__all__ = ["LogCatalog", "TableVersion"]


@dataclasses.dataclass(frozen=True)
class TableVersion:
    """One value schema of a table: Avro field names and PostgreSQL names, row order."""

    fingerprint: bytes
    table: str  # schema.table
    fields: tuple[str, ...]
    columns: tuple[str, ...]
    key_fields: tuple[str, ...]
    types: Mapping[str, Any]  # PostgreSQL column name -> core.values.ColumnType

    def column_of(self) -> dict[str, str]:
        return dict(zip(self.fields, self.columns, strict=True))


class LogCatalog:
    """Schemas and tables of a log (from ``{prefix}._schemas``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.registry = SchemaRegistry()
        self.versions: dict[bytes, TableVersion] = {}
        self.tables: dict[str, list[TableVersion]] = {}
        self._key_names: dict[bytes, dict[str, str]] = {}
        self._key_columns: dict[str, list[tuple[str, ...]]] = {}  # of key schemas
        self._flagged_keys: dict[str, list[tuple[str, ...]]] = {}  # value schemas' pg.key
        self.schema_texts: list[str] = []  # as read, for decode workers

    def add(self, schema_json: str) -> None:
        known = len(self.registry)
        fp = self.registry.add(schema_json)
        if len(self.registry) > known:
            self.schema_texts.append(schema_json)
        if fp in self.versions:
            return
        parsed = json.loads(schema_json)
        if not isinstance(parsed, dict) or "pg.table" not in parsed:
            return
        name = str(parsed.get("name", ""))
        if name.endswith(".Key"):
            self._key_names[fp] = {
                f["name"]: str(f.get("pg.name", f["name"])) for f in parsed.get("fields", ())
            }
            table = f"{parsed.get('pg.schema', 'public')}.{parsed['pg.table']}"
            _add_last(self._key_columns, table, tuple(self._key_names[fp].values()))
            return
        found = column_types_from_value_schema(parsed)
        row = _row_record(parsed)
        if found is None or row is None:
            return
        fields = tuple(f["name"] for f in row["fields"])
        version = TableVersion(
            fingerprint=fp,
            table=found[0],
            fields=fields,
            columns=tuple(str(f.get("pg.name", f["name"])) for f in row["fields"]),
            key_fields=tuple(f["name"] for f in row["fields"] if f.get("pg.key")),
            types=found[1],
        )
        self.versions[fp] = version
        self.tables.setdefault(version.table, []).append(version)
        names = version.column_of()
        _add_last(self._flagged_keys, version.table, tuple(names[f] for f in version.key_fields))

    def key_columns(self, table: str) -> list[tuple[str, ...]]:
        """The lists of key columns (PostgreSQL names, in key order) the table has had in
        the log, the most recently published last: those of its key schemas (what names
        its rows), or without any, its value schemas' ``pg.key`` flags."""
        return list(self._key_columns.get(table) or self._flagged_keys.get(table) or [])

    def key_names(self, fp: bytes) -> dict[str, str]:
        """Avro field name → PostgreSQL name of a key schema."""
        return self._key_names.get(fp, {})

    def key_fields(self, version: TableVersion, key_fingerprint: bytes | None) -> tuple[str, ...]:
        """The Avro fields that name an event's row: those of its Kafka key's schema (none
        without a Kafka key).  A value schema's ``pg.key`` flags are no help there: a change
        of the key columns alone (the replica identity index replaced) keeps the value
        schema's fingerprint, so ``_schemas`` holds one of its versions only.  The value
        schema's flags serve when the key schema is unknown."""
        if key_fingerprint is None:
            return ()
        names = self._key_names.get(key_fingerprint)
        return tuple(names) if names else version.key_fields

    def topic(self, table: str) -> str:
        return change_topic_of(self.prefix, table)

    def resolve(self, name: str) -> str:
        """``schema.table`` of a table the log holds (``table`` alone: schema public)."""
        table = name if "." in name else f"public.{name}"
        if table not in self.tables:
            known = ", ".join(sorted(self.tables)) or "none"
            raise UnknownTable(
                f"table {name!r} is not in the log with prefix {self.prefix!r} "
                f"(tables in the log: {known})"
            )
        return table

    def latest(self, table: str) -> TableVersion:
        return self.tables[table][-1]


def _add_last(lists: dict[str, list[tuple[str, ...]]], table: str, cols: tuple[str, ...]) -> None:
    """Note ``cols`` as the table's most recent key columns (none: nothing to note)."""
    if not cols:
        return
    known = lists.setdefault(table, [])
    if cols in known:
        known.remove(cols)
    known.append(cols)


def _row_record(schema: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for f in schema.get("fields", ()):
        if f.get("name") == "before":
            for branch in f.get("type", ()):
                if isinstance(branch, dict) and branch.get("type") == "record":
                    return branch
    return None
