"""Decoding change events for the bucket engine: Avro value bytes → :class:`RowChange`.

:class:`EventDecoder` decodes a change event (core/avro_envelope.py: the schema
fingerprint in the value's header, the writer schema from the registry that
``{prefix}._schemas`` filled) and turns it into what the bucket store plans with: the
table as ``schema.table``, PostgreSQL column names (Avro field names are mapped back
through ``pg.name``), primary-key tuples, the old key when an update changed it, the unchanged TOAST columns, the full old row when the event carries
it (REPLICA IDENTITY FULL), its commit time, and the event's position (from the Kafka
header when given, else from ``source``).  A delete without its old key, an upsert
without its row, or an unknown fingerprint raise :class:`core.errors.DecodeError`.

:meth:`EventDecoder.skim` reads an event's placement and key columns alone
(relay/downstream/event_prefilter.py), without decoding the event, and answers for the
changes that need nothing more: an insert whose row the rules place in no bucket changes
nothing in the store (:attr:`Skimmed.NOWHERE`: the reader drops it); an update whose new
row lands in no bucket and a delete are made into a :class:`RowChange` with the row's key
and no row (the store takes the row out of the buckets it remembers it in, if any);
anything else is decoded in full (:attr:`Skimmed.DECODE`).

Where core/avro_reader.py runs compiled (mypyc), an event is read by the program compiled
from its writer schema (a fraction of fastavro's CPU; the same values fastavro gives); a
schema with a type that module does not read, and every event where it runs as Python
(about as costly as fastavro there), is decoded by fastavro
(:func:`core.avro_envelope.decode`).

A row is named by the key schema of the event that carries it: the columns of its Kafka
key's schema (``….Key``, looked up by the key's fingerprint), in that schema's order (the
table's column order, which the rules' key follows too: relay/downstream/bucket_engine.py),
with their values taken from the event's row (``after``, or ``before`` for a delete).  So after a
table's key changed (``(id)`` → ``(site, id)``, docs/events.md "Re-snapshots") the deletes
of the old keys name the rows the old events put (``[5]``) and the rows sent again are named
by the new key (``["plant-2",5]``), whatever key the relay loaded at start; a relay
rebuilding its store from the beginning of the topics names each historic event by the key
it was written under.  Only an event without a Kafka key (a table without key columns, a
caller passing none) is named by the rules' key columns.

Pure apart from its caches (per fingerprint renames, read programs and prefix readers, per
table key columns); a decoder is used by one thread (the engine's reader).
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Mapping
from typing import Any, Final

from core import avro_reader
from core.avro_envelope import HEADER_LEN, MAGIC, SchemaRegistry, decode
from core.avro_reader import Program, compile_reader, read
from core.avro_schema import strip_logical
from core.errors import DecodeError
from core.value_schemas import key_schema_columns, read_value_schema
from relay.downstream.bucket_store import ChangeKind, Position, RowChange
from relay.downstream.event_prefilter import PrefixReader, compile_prefix_reader
from relay.downstream.planner import placement_columns, row_placer
from relay.downstream.rules import Rules
from relay.errors import RowError

_UNCHANGED: Final = "unchanged"
_UNKNOWN: Final[Any] = object()
_KEEP_LOGICAL: Final = frozenset({"decimal"})


class Skimmed(enum.Enum):
    """What :meth:`EventDecoder.skim` says of an event it made no change of."""

    NOWHERE = "nowhere"
    """An insert whose row no rule places: it changes nothing in the store."""
    DECODE = "decode"
    """The event must be decoded in full (:meth:`EventDecoder.change`)."""


_DECODE: Final = Skimmed.DECODE
_NOWHERE: Final = Skimmed.NOWHERE
_DELETE: Final = ChangeKind.DELETE
_UPSERT: Final = ChangeKind.UPSERT


class EventDecoder:
    """Change-event value bytes → :class:`RowChange` (column names, key tuples)."""

    def __init__(
        self, registry: SchemaRegistry, rules: Rules, by_program: bool | None = None
    ) -> None:
        """``by_program``: read events by the programs of core/avro_reader.py (None: where
        that module is compiled); else every event is decoded by fastavro."""
        self.registry = registry
        self.rules = rules
        self._buckets = row_placer(rules)
        self.by_program = avro_reader.compiled() if by_program is None else by_program
        self._renames: dict[bytes, dict[str, str] | None] = {}
        self._tables: dict[tuple[str, str], str] = {}
        self._keys: dict[str, tuple[str, ...] | None] = {}
        self._key_schemas: dict[bytes, tuple[str, ...] | None] = {}
        self._prefix: dict[tuple[bytes, str, tuple[str, ...] | None], PrefixReader | None] = {}
        self._programs: dict[bytes, Program | None] = {}

    def skim(
        self, value: bytes, table: str, position: Position, kafka_key: bytes | None = None
    ) -> RowChange | Skimmed:
        """The change of the event at ``position`` in ``table`` from its placement and key
        columns alone, where those tell all the store needs: for an update (or snapshot read)
        whose new row no rule places, the change with its key and no row (the row lands in
        no bucket); for a delete, the change with its key.  :attr:`Skimmed.NOWHERE` for an
        insert whose row no rule places; :attr:`Skimmed.DECODE` for anything else (and
        where that cannot be told without decoding the event).  The change is the decoded
        one without its row: same key (by the schema of ``kafka_key``, as :meth:`change`
        names it), origin and commit time."""
        try:
            named = self.key_columns(kafka_key)
        except DecodeError:  # the key's schema is not read yet: the full decode waits for it
            return _DECODE
        cache = (bytes(value[2:HEADER_LEN]), table, named)
        reader = self._prefix.get(cache, _UNKNOWN)
        if reader is _UNKNOWN:
            reader = self._prefix_reader(*cache)
        if reader is None:
            return _DECODE
        try:
            found = reader(value)
        except (IndexError, ValueError, TypeError, struct.error):  # the full decode names it
            return _DECODE
        if found is None:
            return _DECODE
        op, columns, committed, origin = found
        try:
            if op == "d":
                key = self._key_of(table, columns, named)
                return RowChange(
                    table, _DELETE, position, key, None, None, (), None, False, origin, committed
                )
            if self._buckets(table, columns):
                return _DECODE
            if op == "c":
                return _NOWHERE
            key = self._key_of(table, columns, named)
            return RowChange(
                table, _UPSERT, position, key, None, None, (), None, False, origin, committed
            )
        except RowError:
            return _DECODE

    def _prefix_reader(
        self, fp: bytes, table: str, named: tuple[str, ...] | None
    ) -> PrefixReader | None:
        """The prefix reader of schema ``fp`` for ``table``, reading the key columns
        ``named`` (the event's key schema's; None: the rules' key columns)."""
        if fp not in self.registry:
            return None  # not cached: the schema may be read later
        wanted = placement_columns(self.rules, table)
        key = named
        if key is None:
            try:
                key = self.rules.table_info(table).key
            except KeyError:
                key = ()
        schema = json.loads(self.registry.schema_json(fp))
        reader = compile_prefix_reader(schema, wanted, key)
        self._prefix[fp, table, named] = reader
        return reader

    def _table(self, source: Mapping[str, Any]) -> str:
        names = (source["schema"], source["table"])
        table = self._tables.get(names)
        if table is None:
            table = self._tables[names] = f"{names[0]}.{names[1]}"
        return table

    def key_columns(self, key: bytes | None) -> tuple[str, ...] | None:
        """The key columns (PostgreSQL names, in key order) of the schema of a Kafka key;
        None without a key or for a key that is not single-object encoded.  Raises
        DecodeError for a fingerprint not in the registry (yet)."""
        if key is None or key[:2] != MAGIC:
            return None
        fp = bytes(key[2:HEADER_LEN])
        if fp in self._key_schemas:
            return self._key_schemas[fp]
        found = key_schema_columns(json.loads(self.registry.schema_json(fp)))
        columns = self._key_schemas[fp] = None if found is None else tuple(found.values())
        return columns

    def _key_of(
        self, table: str, row: Mapping[str, Any], named: tuple[str, ...] | None
    ) -> tuple[Any, ...]:
        """The row's key by the event's key columns ``named``; without them ``rules.key_of``
        (its lookups skipped for a one-column key present in the row)."""
        if named is not None:
            try:
                return tuple([row[c] for c in named])
            except KeyError as exc:
                raise RowError(
                    f"row of {table} has no column {exc.args[0]!r} of its event's key schema "
                    f"({', '.join(named)})"
                ) from None
        columns = self._keys.get(table, ())
        if columns == ():
            try:
                columns = self._keys[table] = self.rules.table_info(table).key
            except KeyError:
                columns = self._keys[table] = None
        if columns is not None and len(columns) == 1 and columns[0] in row:
            return (row[columns[0]],)
        return self.rules.key_of(table, row)

    def _event(self, value: bytes, fp: bytes) -> dict[str, Any]:
        """The decoded event: by the compiled program of its schema (core/avro_reader.py)
        when there is one, else by :func:`core.avro_envelope.decode` (which also raises
        the errors of a bad header or an unknown fingerprint)."""
        program = self._programs.get(fp, _UNKNOWN)
        if program is _UNKNOWN:
            if fp not in self.registry or not self.by_program:
                return decode(value, self.registry)  # raises; not cached: it may come later
            schema = strip_logical(json.loads(self.registry.schema_json(fp)), _KEEP_LOGICAL)
            program = self._programs[fp] = compile_reader(schema)
        if program is None or value[:2] != MAGIC:
            return decode(value, self.registry)
        try:
            event = read(program, value, HEADER_LEN)
        except DecodeError as exc:
            raise DecodeError(f"cannot decode datum with schema {fp.hex()}: {exc}") from exc
        if not isinstance(event, dict):
            raise DecodeError(f"datum with schema {fp.hex()} is not a record")
        return event

    def _rename(self, fp: bytes) -> dict[str, str] | None:
        if fp not in self._renames:
            found = read_value_schema(json.loads(self.registry.schema_json(fp)))
            mapping = found.renames() if found is not None else {}
            same = all(k == v for k, v in mapping.items())
            self._renames[fp] = None if same else mapping
        return self._renames[fp]

    def change(
        self, value: bytes, position: Position | None = None, kafka_key: bytes | None = None
    ) -> RowChange:
        """Decode one event; raises DecodeError (unknown fingerprint of the value or the
        key included).  Without ``position`` (no header), the event's ``source`` gives it;
        ``kafka_key``: the record's Kafka key, whose schema names the row's key columns."""
        named = self.key_columns(kafka_key)
        fp = bytes(value[2:HEADER_LEN])
        event = self._event(value, fp)
        rename = self._renames[fp] if fp in self._renames else self._rename(fp)
        source = event["source"]
        if position is None:
            position = (int(source["commit_lsn"]), int(source["seq"]))
        table = self._table(source)
        op = event["op"]
        origin = source.get("origin")
        committed = source.get("commit_ts_us")
        if op == "t":
            return RowChange(
                table, ChangeKind.TRUNCATE, position, origin=origin, commit_ts_us=committed
            )
        after = _renamed(event.get("after"), rename)
        before = _renamed(event.get("before"), rename)
        if op == "d":
            if before is None:
                raise DecodeError(f"{table}: delete at {position} carries no old key")
            key = self._key_of(table, before, named)
            return RowChange(
                table, ChangeKind.DELETE, position, key, origin=origin, commit_ts_us=committed
            )
        if after is None:
            raise DecodeError(f"{table}: op {op!r} at {position} carries no row")
        key = self._key_of(table, after, named)
        listed = event.get(_UNCHANGED)
        unchanged = tuple(rename.get(c, c) if rename else c for c in listed) if listed else ()
        old_key = None
        if before is not None:
            previous = self._key_of(table, before, named)
            old_key = previous if previous != key else None
        full_before = before if event.get("before_kind") == "full" else None
        return RowChange(
            table,
            ChangeKind.UPSERT,
            position,
            key,
            after,
            old_key=old_key,
            unchanged=unchanged,
            before=full_before,
            insert=op == "c",
            origin=origin,
            commit_ts_us=committed,
        )


def schema_key(schema: Mapping[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """``("schema.table", key columns)`` of a cdc key schema; None for any other schema."""
    found = key_schema_columns(schema)
    if found is None:
        return None
    return f"{schema['pg.schema']}.{schema['pg.table']}", tuple(found.values())


def stale_keys(
    latest: Mapping[str, tuple[str, ...]], rules: Rules
) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Tables the rules place whose latest key schema (``latest``: table → key columns, in
    the order of ``{prefix}._schemas``) lists other columns than the key the rules were
    loaded with: table → (loaded key, latest key).  Rows of such a table are named by the
    new key while ``/v1/schema`` lists the loaded one, until the relay's table follower
    binds the rules to the new key (relay/downstream/table_follower.py) or it restarts."""
    out = {}
    for table in sorted(rules.tables):
        if table in latest and latest[table] != rules.table_info(table).key:
            out[table] = (rules.table_info(table).key, latest[table])
    return out


def _renamed(row: Any, rename: Mapping[str, str] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    if rename is None:
        return row if type(row) is dict else dict(row)  # decoded afresh: no copy needed
    return {rename.get(k, k): v for k, v in row.items()}
