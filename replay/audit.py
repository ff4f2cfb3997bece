"""Audit replay: read the change log cdc wrote to Kafka and answer "who changed what, when".

What it reads
-------------
- ``{prefix}._schemas`` (every schema, keyed by fingerprint) into a :class:`LogCatalog`:
  the :class:`~core.avro_envelope.SchemaRegistry` that decodes events, and per value
  schema a :class:`TableVersion` (Avro field names, PostgreSQL column names, key
  columns, column types).  A table's schema versions are its value schemas in the order
  they were published; every event is decoded with the schema it names, so topics that
  hold several versions (ALTER TABLE) read correctly.
- ``{prefix}.{schema}.{table}``: the change events (docs/events.md).
- ``{prefix}._journal`` and ``{prefix}._outcomes``: device edits and what became of
  them (relay.upstream.journal), for row histories.

Order and duplicates
--------------------
Every event's position ``(commit_lsn, seq)`` is in its Kafka header ``fieldsync.pos``,
so ordering and deduplication need no decoding.  :class:`LogReader` reads every
partition of the topics it is given with one consumer (``read_committed``: aborted
Kafka transactions of a crashed cdc are never seen, on brokers that hide them) and
merges the partitions by position (a k-way merge over per-partition buffers).  cdc
writes a partition in position order, and a re-delivered duplicate carries the
position of its original, so a record whose position is not above the last one emitted
is a duplicate: dropped and counted.  Records with a null value (tombstones; cdc writes
none, compaction tools may) are skipped and counted.

Reading to the end
------------------
A read's end is an offset per partition (:func:`_read_ends`): the committed end the
broker reports (the last stable offset), or, when the broker reports none because a
transaction is open there (tansu answers 0), the partition's log end.  Progress is the
consumer's position per partition (:class:`_Fetcher`), which moves past transaction
markers and past records it does not return, so markers and aborted or fenced
transactions in the middle of a partition never look like missing records.  A read is
complete when every position has reached its end (or, with a stop bound, the partitions
not read to their end hold an event past it), never because nothing came for a while:
when no position moves for ``timeout_s`` (:class:`_Watch`), the broker is asked again
and :class:`LogIncomplete` names each partition and the offsets it could not read.
Memory is bounded per partition: a partition whose buffer is full is unassigned, and
assigned again at the offset it reached once its buffer drained (kafka-python's
``pause()`` can leave a paused partition without records for good when several are
read).

Bounds
------
A bound is a position (``LSN[:seq]``) or a time (ISO 8601).  An event's time is its
commit time; snapshot reads (op ``r``) have none and count as older than any time.
Start by position: the reader binary-searches each partition for the first offset at or
after it (positions grow with offsets).  Start by time: ``offsets_for_times`` (Kafka
record timestamps, which are never before the commit time unless clocks disagree, so
the seek goes ``TIME_SLACK_S`` earlier) and events before the time are then skipped.
Stop by position: the merge stops at the first event beyond it (it stays unread).  Stop
by time: events committed after it are skipped, and the read ends at the first event
committed more than ``TIME_SLACK_S`` after it (commit times follow positions except for
clock steps).

State
-----
:class:`LogState` applies events in position order: ``c``/``r`` put the row, ``u`` puts
the new row (removing the old key when the key changed; columns PostgreSQL did not send,
``unchanged``, are taken from the previous version, or marked unknown when the log does
not hold it), ``d`` removes, ``t`` empties the table.  Tables without key columns are
multisets of whole rows.  A restarted initial snapshot (a second generation of ``r``
events at a later consistent point) removes rows the new snapshot did not read once that
snapshot is over (a later event, or the end of the log).

Verify
------
:func:`verify` opens a REPEATABLE READ snapshot of PostgreSQL, notes the WAL insert
position ``L``, waits until the cdc slot has confirmed ``L`` (so Kafka holds every
transaction committed before it), rebuilds the captured tables from the log up to ``L``
(every partition read to its end or past ``L``), and compares them with the snapshot's
rows, every column of the table of now for every row (:class:`_TableCompare`): the
snapshot's values go through cdc's own codec, so the same value is the same datum; a
value the log wrote under an older column type is cast to the type of now by
PostgreSQL first; a column the log holds no value for (the row's last event used a
schema without it, or left it unchanged as TOAST with no earlier value in the log) is a
difference, with the reason.  Rows that differ are checked again against a newer
snapshot (a transaction that committed at the very moment of the first snapshot can be
on one side only); what still differs is reported.

Concurrency: nothing here is shared between threads; one reader owns one consumer.
A large read (``PARALLEL_MIN_RECORDS``) may decode in worker processes
(``ProcessPoolExecutor``, spawn; ``workers``): each gets the schemas when it starts and
batches of value bytes, and the reader takes the results in submission order, so the
order of events does not change; a value a worker cannot decode (a schema published
later) is decoded by the reader itself.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import heapq
import io
import json
import logging
import math
import os
import sqlite3
import struct
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Final, Literal

import orjson

from cdc.errors import (
    DatabaseUnavailable,
    DecodeError,
    LogBehind,
    LogIncomplete,
    LogUnavailable,
    NoEvents,
    ReplayError,
    UnknownTable,
    format_lsn,
    parse_lsn,
)
from core.avro_envelope import POSITION_HEADER, SchemaRegistry, decode
from core.envelope_schema import (
    column_types_from_value_schema,
    key_schema_columns,
    read_value_schema,
)
from core.errors import FieldsyncError

__all__ = [
    "MAX_SEQ",
    "TIME_SLACK_S",
    "Bound",
    "ChangeEvent",
    "ColumnDiff",
    "DatabaseUnavailable",
    "Format",
    "HistoryReport",
    "KeySpec",
    "LogBehind",
    "LogCatalog",
    "LogIncomplete",
    "LogReader",
    "LogSource",
    "LogState",
    "LogUnavailable",
    "NoEvents",
    "PgTarget",
    "ReadStats",
    "ReplayError",
    "RowDiff",
    "RowVersion",
    "TableVersion",
    "UnknownTable",
    "VerifyReport",
    "describe_origin",
    "event_json",
    "export_events",
    "format_position",
    "format_time",
    "parse_bound",
    "parse_position",
    "parse_time",
    "read_csv",
    "render_diff",
    "row_history",
    "state_as_of",
    "verify",
    "write_state",
]

log = logging.getLogger(__name__)

#: Largest ``seq``: ``LSN`` alone as an upper bound means "every event of that transaction".
MAX_SEQ: Final = (1 << 64) - 1
#: How far Kafka record times and commit times may disagree (clocks of two hosts).
TIME_SLACK_S: Final = 60.0
_POS = struct.Struct(">QQ")
_BUFFER_HIGH: Final = 20_000  # records buffered per partition before it is paused
_POLL_MS: Final = 200
Pos = tuple[int, int]
Format = Literal["jsonl", "csv", "sqlite"]


# --------------------------------------------------------------------------- errors


# --------------------------------------------------------------------------- positions, times


def format_position(pos: Pos) -> str:
    """``16/B374D848:3`` (commit LSN as PostgreSQL prints it, then ``seq``)."""
    return f"{format_lsn(pos[0])}:{pos[1]}"


def parse_position(text: str, *, end: bool = False) -> Pos:
    """``LSN:seq`` or ``LSN``; a bare LSN means its first event (``end``: its last)."""
    lsn_text, sep, seq_text = text.strip().partition(":")
    try:
        lsn = parse_lsn(lsn_text)
        seq = int(seq_text) if sep else (MAX_SEQ if end else 0)
    except ValueError as exc:
        raise ValueError(
            f"not a position: {text!r} (expected LSN or LSN:seq, e.g. 0/16B3F28 or 0/16B3F28:3)"
        ) from exc
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"not a position: {text!r} (seq out of range)")
    return lsn, seq


def parse_time(text: str) -> int:
    """ISO 8601 (``2024-05-01T10:00:00Z``, ``2024-05-01 12:00+02:00``; no zone: UTC) → µs."""
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ValueError(
            f"not a time: {text!r} (expected ISO 8601, e.g. 2024-05-01T10:00:00Z)"
        ) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    delta = when - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def format_time(us: int | None) -> str | None:
    """µs since 1970 → ``2024-05-01T10:00:00.123456Z`` (None for None/0: no commit time)."""
    if not us:
        return None
    when = datetime.datetime(1970, 1, 1) + datetime.timedelta(microseconds=us)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclasses.dataclass(frozen=True)
class Bound:
    """One end of a range: a position or a time (µs), as the user wrote it (``text``)."""

    position: Pos | None = None
    time_us: int | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or (
            format_position(self.position)
            if self.position is not None
            else str(format_time(self.time_us))
        )


def parse_bound(text: str, *, end: bool = False) -> Bound:
    """A position if ``text`` holds an LSN (``/``), else a time."""
    if "/" in text:
        return Bound(position=parse_position(text, end=end), text=text)
    return Bound(time_us=parse_time(text), text=text)


# --------------------------------------------------------------------------- catalog


@dataclasses.dataclass(frozen=True)
class TableVersion:
    """One value schema of a table: Avro field names and PostgreSQL names, row order."""

    fingerprint: bytes
    table: str  # schema.table
    fields: tuple[str, ...]
    columns: tuple[str, ...]
    key_fields: tuple[str, ...]
    types: Mapping[str, Any]  # PostgreSQL column name -> core.envelope_schema.ColumnType

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
        key_names = key_schema_columns(parsed)
        if key_names is not None:
            self._key_names[fp] = key_names
            return
        found = read_value_schema(parsed)
        if found is None:
            return
        version = TableVersion(
            fingerprint=fp,
            table=found.qualified,
            fields=found.fields,
            columns=found.names,
            key_fields=found.key_fields,
            types=found.types(),
        )
        self.versions[fp] = version
        self.tables.setdefault(version.table, []).append(version)

    def key_names(self, fp: bytes) -> dict[str, str]:
        """Avro field name → PostgreSQL name of a key schema."""
        return self._key_names.get(fp, {})

    def topic(self, table: str) -> str:
        schema, _, name = table.partition(".")
        return f"{self.prefix}.{schema}.{name}"

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


# --------------------------------------------------------------------------- Kafka access


class LogSource:
    """Where the log is: Kafka client settings (kafka-python keywords) and topic prefix."""

    def __init__(self, kafka: Mapping[str, Any], prefix: str, *, timeout_s: float = 30.0) -> None:
        self.kafka = dict(kafka)
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._catalog: LogCatalog | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> LogSource:
        """From :class:`cdc.settings.CdcSettings` (``[kafka]``: bootstrap, prefix, security)."""
        from cdc.pipeline import kafka_options

        opts = kafka_options(settings)
        return cls(opts.client_kwargs(), opts.topic_prefix, timeout_s=opts.timeout_s)

    @property
    def where(self) -> str:
        servers = self.kafka.get("bootstrap_servers", "?")
        return ",".join(servers) if isinstance(servers, list | tuple) else str(servers)

    def consumer(self, **overrides: Any) -> Any:
        """A consumer without group (manual assignment), read_committed."""
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        from cdc.kafka_sink import build_client

        config: dict[str, Any] = {
            **self.kafka,
            "group_id": None,
            "enable_auto_commit": False,
            "isolation_level": "read_committed",
            "max_poll_records": 10_000,
            "fetch_max_bytes": 64 << 20,
            "max_partition_fetch_bytes": 16 << 20,
            "fetch_max_wait_ms": 100,
            "allow_auto_create_topics": False,
            **overrides,
        }
        try:
            return build_client(KafkaConsumer, **config)
        except KafkaError as exc:
            raise LogUnavailable(f"cannot reach the Kafka broker at {self.where}: {exc}") from exc

    def catalog(self, *, refresh: bool = False) -> LogCatalog:
        """The log's schemas (``{prefix}._schemas`` read from the beginning)."""
        if self._catalog is None or refresh:
            catalog = self._catalog or LogCatalog(self.prefix)
            for record in self.read_all(f"{self.prefix}._schemas"):
                if record.value:
                    catalog.add(record.value.decode("utf-8"))
            self._catalog = catalog
        return self._catalog

    def topics(self) -> set[str]:
        from kafka.errors import KafkaError

        consumer = self.consumer()
        try:
            return set(consumer.topics())
        except KafkaError as exc:
            raise LogUnavailable(f"cannot list topics on {self.where}: {exc}") from exc
        finally:
            consumer.close()

    def read_all(self, topic: str) -> Iterator[Any]:
        """Every committed record of a small topic, partition by partition (no merge), each
        partition read to its end offset (:class:`_Fetcher`)."""
        from kafka import TopicPartition
        from kafka.errors import KafkaError

        consumer = self.consumer()
        try:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                return
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            fetcher = _Fetcher(self, consumer, tps, f"reading {topic}")
            fetcher.start(_beginning_offsets(consumer, tps, self))
            fetcher.refresh_ends()
            records: dict[Any, list[Any]] = {tp: [] for tp in tps}
            watch = _Watch(fetcher)
            while due := {tp for tp in tps if fetcher.due(tp)}:
                for tp, recs in fetcher.poll(due).items():
                    records[tp].extend(recs)
                watch.check(due)
            for tp in tps:
                yield from records[tp]
        except KafkaError as exc:
            raise LogUnavailable(f"reading {topic} from {self.where} failed: {exc}") from exc
        finally:
            consumer.close()


def _tp_text(tp: Any) -> str:
    return f"{tp.topic}[{tp.partition}]"


def _end_offsets(consumer: Any, tps: Sequence[Any], source: LogSource) -> dict[Any, int]:
    """The end offsets the consumer's isolation level sees (read_committed: the last stable
    offset)."""
    from kafka.errors import KafkaError

    try:
        found: dict[Any, int] = consumer.end_offsets(
            list(tps), timeout_ms=int(source.timeout_s * 1000)
        )
        return found
    except KafkaError as exc:
        raise LogUnavailable(
            f"the Kafka broker at {source.where} does not answer ({type(exc).__name__}: {exc})"
        ) from exc


def _beginning_offsets(consumer: Any, tps: Sequence[Any], source: LogSource) -> dict[Any, int]:
    from kafka.errors import KafkaError

    try:
        found: dict[Any, int] = consumer.beginning_offsets(
            list(tps), timeout_ms=int(source.timeout_s * 1000)
        )
        return found
    except KafkaError as exc:
        raise LogUnavailable(
            f"the Kafka broker at {source.where} does not answer ({type(exc).__name__}: {exc})"
        ) from exc


def _read_ends(
    source: LogSource, consumer: Any, tps: Sequence[Any], floor: Mapping[Any, int]
) -> tuple[dict[Any, int], dict[Any, int]]:
    """Where to read each partition to, and the partitions whose committed end the broker
    did not report.

    The end is the committed end (read_committed ListOffsets: the last stable offset; a
    transaction still open beyond it is not part of the log yet).  A broker may answer 0
    instead while a transaction is open in the partition (tansu does): when the answer is
    below what was already read (``floor``) or 0 although the partition holds records, the
    end is the partition's log end (read_uncommitted ListOffsets) and the partition is
    returned in the second map; its records become readable once the transaction ends.
    Positions, not record counts, measure the read, so transaction markers and aborted
    transactions inside the range are no missing records.
    """
    ends = _end_offsets(consumer, tps, source)
    unsure = [tp for tp in tps if ends[tp] <= 0 or ends[tp] < floor.get(tp, 0)]
    if not unsure:
        return dict(ends), {}
    probe = source.consumer(isolation_level="read_uncommitted")
    try:
        logged = _end_offsets(probe, unsure, source)
    finally:
        probe.close()
    out = dict(ends)
    open_: dict[Any, int] = {}
    for tp in unsure:
        if logged[tp] <= 0 and floor.get(tp, 0) <= 0:
            out[tp] = 0  # empty
            continue
        out[tp] = max(logged[tp], floor.get(tp, 0))
        open_[tp] = out[tp]
    return out, open_


class _Fetcher:
    """One consumer reading several partitions, each from its own offset up to its own end
    offset (:func:`_read_ends`).

    Progress is the consumer's position per partition, which moves past transaction
    markers and records it does not return, never a count of records.  The caller says
    which partitions to fetch on each :meth:`poll` (``want``): a partition it does not
    want (its buffer is full) is *unassigned* and assigned again, at the offset it had
    reached, when wanted again.  (kafka-python's ``pause()`` keeps the records it already
    parsed for a paused partition and gives them back only while no other partition's
    records are in hand; with several partitions a paused one could stay silent for
    good, and a read waited for records that never came.)
    """

    def __init__(self, source: LogSource, consumer: Any, tps: Sequence[Any], what: str) -> None:
        self.source = source
        self.consumer = consumer
        self.tps = list(tps)
        self.what = what
        self.next: dict[Any, int] = dict.fromkeys(self.tps, 0)  # next offset to read
        self.ends: dict[Any, int] = dict.fromkeys(self.tps, 0)
        self.open: dict[Any, int] = {}  # committed end not reported (open transaction)
        self.moves = 0  # polls that moved a position or returned records
        self._assigned: set[Any] = set()

    def start(self, offsets: Mapping[Any, int]) -> None:
        """Read each partition from ``offsets[tp]``."""
        for tp, offset in offsets.items():
            self.next[tp] = offset
            if tp in self._assigned:
                self.consumer.seek(tp, offset)

    def refresh_ends(self, tps: Iterable[Any] | None = None) -> None:
        """Take the partitions' current ends as the end of the read."""
        chosen = self.tps if tps is None else list(tps)
        if not chosen:
            return
        ends, open_ = _read_ends(self.source, self.consumer, chosen, self.next)
        self.ends.update(ends)
        for tp in chosen:
            self.open.pop(tp, None)
        self.open.update(open_)

    def due(self, tp: Any) -> bool:
        """Records before the partition's end offset are not read yet."""
        return bool(self.next[tp] < self.ends[tp])

    def poll(self, want: set[Any]) -> dict[Any, list[Any]]:
        """One fetch from the partitions in ``want``; their positions are updated."""
        from kafka.errors import KafkaError

        self._assign(want)
        if not want:
            return {}
        consumer = self.consumer
        try:
            batch: dict[Any, list[Any]] = consumer.poll(timeout_ms=_POLL_MS)
            moved = bool(batch)
            for tp in want:
                position = consumer.position(tp)
                if position != self.next[tp]:
                    moved = True
                    self.next[tp] = position
        except KafkaError as exc:
            raise LogUnavailable(
                f"{self.what}: fetching from {self.source.where} failed: {exc}"
            ) from exc
        if moved:
            self.moves += 1
        return batch

    def _assign(self, want: set[Any]) -> None:
        if want == self._assigned:
            return
        consumer = self.consumer
        if want:
            consumer.assign(sorted(want))
            for tp in want - self._assigned:
                consumer.seek(tp, self.next[tp])
        else:
            consumer.unsubscribe()
        self._assigned = set(want)

    def unread(self, tps: Iterable[Any]) -> list[tuple[str, int, int, int]]:
        """``(topic, partition, first, last)`` offsets not read of each partition."""
        return [
            (tp.topic, tp.partition, self.next[tp], self.ends[tp] - 1)
            for tp in sorted(tps)
            if self.due(tp)
        ]


class _Watch:
    """Gives up on a read whose positions stop moving: when no poll has moved a position
    for ``timeout_s``, the ends are asked again (the broker must answer: else
    LogUnavailable) and, if records are still due, :class:`LogIncomplete` names the
    offsets that could not be read.  A deadline for giving up, never a proof of the end:
    a read is complete only when every partition's position reached its end offset."""

    def __init__(self, fetcher: _Fetcher) -> None:
        self.fetcher = fetcher
        self.moves = fetcher.moves
        self.since = time.monotonic()

    def check(self, due: Iterable[Any]) -> None:
        fetcher = self.fetcher
        now = time.monotonic()
        if fetcher.moves != self.moves:
            self.moves = fetcher.moves
            self.since = now
            return
        timeout = fetcher.source.timeout_s
        if now - self.since < timeout:
            return
        stuck = [tp for tp in due if fetcher.due(tp)]
        before = {tp: fetcher.ends[tp] for tp in stuck}
        fetcher.refresh_ends(stuck)  # raises LogUnavailable when the broker is gone
        if any(fetcher.ends[tp] != end for tp, end in before.items()):
            self.since = now  # a transaction ended meanwhile: the ends moved
            return
        unread = fetcher.unread(stuck)
        if not unread:
            return
        ranges = ", ".join(f"{t}[{p}] offsets {a}-{b}" for t, p, a, b in unread)
        why = (
            " a Kafka transaction is still open there (a producer that neither committed nor "
            "aborted, e.g. a cdc that was killed and not started again); read_committed "
            "readers cannot read past its first record"
            if any(tp in fetcher.open for tp in stuck)
            else " the broker answers but returns none of them"
        )
        raise LogIncomplete(
            f"{fetcher.what}: could not read {ranges} of {fetcher.source.where} "
            f"(position unchanged for {timeout:.0f} s):{why}",
            unread,
        )


# --------------------------------------------------------------------------- events


@dataclasses.dataclass(slots=True)
class ChangeEvent:
    """A decoded change event with where it was read."""

    table: str
    position: Pos
    op: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    before_kind: str | None
    unchanged: list[str]
    source: dict[str, Any]
    fingerprint: bytes
    topic: str
    partition: int
    offset: int
    ts_us: int = 0  # when cdc encoded it

    @property
    def commit_ts_us(self) -> int:
        """Commit time (µs); 0 for snapshot reads."""
        return int(self.source.get("commit_ts_us") or 0)

    @property
    def time_us(self) -> int:
        """The event's time for time bounds: its commit time, or for a snapshot read
        (which has none) the time cdc read it."""
        return int(self.source.get("commit_ts_us") or self.ts_us)

    @property
    def origin(self) -> str | None:
        origin = self.source.get("origin")
        return str(origin) if origin is not None else None


@dataclasses.dataclass
class ReadStats:
    """What a read saw."""

    records: int = 0  # Kafka records fetched (table topics)
    events: int = 0  # events handed out (in range, decoded)
    duplicates: int = 0  # dropped: position not above the last one
    tombstones: int = 0  # null values skipped
    skipped: int = 0  # outside the range or filtered before decoding
    total: int = 0  # records the read expects to fetch (for progress), 0 if unknown
    first_position: Pos | None = None
    last_position: Pos | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("first_position", "last_position"):
            pos = getattr(self, name)
            out[name] = format_position(pos) if pos is not None else None
        return out


Progress = Callable[[int, int], None]  # (records fetched, records expected or 0)
Prefilter = Callable[[Any], bool]  # raw Kafka record -> decode it?


class LogReader:
    """Events of some tables in position order, deduplicated (see the module docstring).

    :meth:`events` may be called again to continue after a stop bound (verify does);
    the record beyond the bound stays buffered.  A read ends when every partition's
    position has reached its end offset (taken at the start, or by :meth:`refresh_ends`)
    or, with a stop bound, when the partitions not read to their end hold an event past
    it; a partition that cannot be read that far raises :class:`LogIncomplete` naming
    the offsets.
    """

    def __init__(
        self,
        source: LogSource,
        tables: Sequence[str],
        *,
        start: Bound | None = None,
        progress: Progress | None = None,
        workers: int | None = None,
    ) -> None:
        from kafka import TopicPartition

        self.source = source
        # decode worker processes for large reads (None: one when there are cores to spare;
        # on two cores shared with other work it was no faster than decoding here)
        self._workers = workers if workers is not None else (1 if (os.cpu_count() or 1) >= 4 else 0)
        self._executor: Any = None
        self.catalog = source.catalog()
        self.stats = ReadStats()
        self._progress = progress
        self._start = start
        self._last: Pos = (-1, -1)
        self._consumer = source.consumer()
        self._topic_table: dict[str, str] = {}
        tps: list[Any] = []
        try:
            for name in tables:
                table = self.catalog.resolve(name)
                topic = self.catalog.topic(table)
                self._topic_table[topic] = table
                parts = self._consumer.partitions_for_topic(topic) or set()
                tps.extend(TopicPartition(topic, p) for p in sorted(parts))
            self._tps = tps
            self._fetcher = _Fetcher(source, self._consumer, tps, "reading the change log")
            self._bufs: dict[Any, deque[tuple[Pos, Any]]] = {tp: deque() for tp in tps}
            self._heap: list[tuple[Pos, int, Any]] = []
            self._tick = 0
            self._waiting: set[Any] = set()
            self._on_idle: Callable[[], None] | None = None
            self._run: deque[tuple[Pos, Any]] = deque()  # taken from the buffers, not read yet
            if tps:
                self._seek_start(start)
                self.refresh_ends()
        except BaseException:
            self._consumer.close()
            raise

    # -- setup -------------------------------------------------------------------------

    def _seek_start(self, start: Bound | None) -> None:
        consumer = self._consumer
        begin = _beginning_offsets(consumer, self._tps, self.source)
        offsets = dict(begin)
        if start is not None and start.time_us is not None:
            from kafka.errors import KafkaError

            at_ms = max(0, int(start.time_us / 1000 - TIME_SLACK_S * 1000))
            try:
                found = consumer.offsets_for_times(dict.fromkeys(self._tps, at_ms))
            except KafkaError as exc:
                raise LogUnavailable(
                    f"offsets_for_times on {self.source.where} failed: {exc}"
                ) from exc
            ends, _ = _read_ends(self.source, consumer, self._tps, begin)
            for tp in self._tps:
                hit = found.get(tp)
                offsets[tp] = hit.offset if hit is not None else ends[tp]
        elif start is not None and start.position is not None:
            for tp in self._tps:
                offsets[tp] = self._offset_of_position(tp, start.position, begin[tp])
        self._fetcher.start(offsets)

    def _offset_of_position(self, tp: Any, position: Pos, begin: int) -> int:
        """The first offset whose record is at or after ``position`` (binary search on
        single-record probes; positions grow with offsets).  Conservative: a few
        thousand records before it, so a stray duplicate cannot make it skip events."""
        end = _read_ends(self.source, self._consumer, [tp], {tp: begin})[0][tp]
        probe = self.source.consumer(max_poll_records=1, max_partition_fetch_bytes=1 << 20)
        try:
            fetcher = _Fetcher(self.source, probe, [tp], f"probing {_tp_text(tp)}")
            fetcher.ends[tp] = end
            low, high = begin, end
            while high - low > 1000:
                mid = (low + high) // 2
                found = _probe(fetcher, tp, mid)
                if found is None or found >= position:
                    high = mid
                else:
                    low = mid
            return int(max(begin, low - 1000))
        finally:
            probe.close()

    def refresh_ends(self) -> None:
        """Take the partitions' current end offsets as the end of the read."""
        fetcher = self._fetcher
        fetcher.refresh_ends()
        self._waiting = {tp for tp in self._tps if not self._bufs[tp] and fetcher.due(tp)}
        total = sum(max(0, fetcher.ends[tp] - fetcher.next[tp]) for tp in self._tps)
        self.stats.total = self.stats.records + total + sum(len(b) for b in self._bufs.values())

    def read_to(self) -> list[dict[str, Any]]:
        """Per partition: the end offset of the read, the offset the read reached, and
        whether it holds everything up to the read's bound (``complete``: read to the
        end, or stopped at a bound with the next record beyond it in hand)."""
        fetcher = self._fetcher
        held = {(r.topic, r.partition) for _, r in self._run}
        return [
            {
                "topic": tp.topic,
                "partition": tp.partition,
                "end": fetcher.ends[tp],
                "read_to": fetcher.next[tp],
                "complete": not fetcher.due(tp)
                or bool(self._bufs[tp])
                or (tp.topic, tp.partition) in held,
            }
            for tp in self._tps
        ]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._consumer.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- merge -------------------------------------------------------------------------

    def _poll(self, follow: bool = False) -> int:
        """One fetch from every partition with room in its buffer and records due
        (following: every partition with room); returns the records it brought."""
        fetcher = self._fetcher
        want = {
            tp
            for tp, buf in self._bufs.items()
            if len(buf) < _BUFFER_HIGH and (follow or fetcher.due(tp))
        }
        batch = fetcher.poll(want)
        n = 0
        stats = self.stats
        for tp, recs in batch.items():
            buf = self._bufs[tp]
            was_empty = not buf
            for r in recs:
                value = r.value
                if value is None:
                    stats.tombstones += 1
                    continue
                buf.append((self._position_of(r), r))
            n += len(recs)
            if was_empty and buf:
                self._tick += 1
                heapq.heappush(self._heap, (buf[0][0], self._tick, tp))
        if n:
            stats.records += n
            if self._progress is not None:
                self._progress(stats.records, stats.total)
        return n

    def _position_of(self, record: Any) -> Pos:
        for name, value in record.headers:
            if name == POSITION_HEADER:
                hi, lo = _POS.unpack(value)
                return hi, lo
        event = self._decode(record)  # a record without header: the position is in source
        return int(event["source"]["commit_lsn"]), int(event["source"]["seq"])

    def _fill(self, follow: bool) -> None:
        """Poll until every partition that still has records due has one buffered (or its
        position reached its end offset); :class:`LogIncomplete` if one cannot be read."""
        fetcher = self._fetcher
        watch = _Watch(fetcher)
        while self._waiting:
            self._poll()
            for tp in list(self._waiting):
                if self._bufs[tp] or not fetcher.due(tp):
                    self._waiting.discard(tp)
            if self._waiting:
                watch.check(self._waiting)
        if follow and self._heap:
            # a partition that looked caught up may have records of the same Kafka
            # transaction as those buffered elsewhere (visible together): look again
            idle = [tp for tp in self._tps if not self._bufs[tp]]
            if idle:
                fetcher.refresh_ends(idle)
                fresh = {tp for tp in idle if fetcher.due(tp)}
                if fresh:
                    self._waiting |= fresh
                    self._fill(False)

    def _next_run(self, follow: bool, stop: Pos | None) -> list[tuple[Pos, Any]] | None:
        """The next records in position order: a run from the partition with the lowest
        head, up to the next-lowest head of another partition (with one partition: all it
        has buffered) and ``stop``.  None: the end of the read, or the head is past stop."""
        while True:
            if self._waiting:
                self._fill(follow)
            heap = self._heap
            if not heap:
                if not follow:
                    return None
                if self._on_idle is not None:
                    self._on_idle()
                self._wait_for_more()
                continue
            pos, _, tp = heap[0]
            if stop is not None and pos > stop:
                return None
            limit = stop
            for i in (1, 2):  # the smallest head of the other partitions is a child of the root
                if i < len(heap) and (limit is None or heap[i][0] < limit):
                    limit = heap[i][0]
            buf = self._bufs[tp]
            if limit is None or buf[-1][0] <= limit:
                run = list(buf)
                buf.clear()
            else:
                run = []
                while buf and buf[0][0] <= limit:
                    run.append(buf.popleft())
            if buf:
                self._tick += 1
                heapq.heapreplace(heap, (buf[0][0], self._tick, tp))
            else:
                heapq.heappop(heap)
                if self._fetcher.due(tp):
                    self._waiting.add(tp)
            return run

    def _wait_for_more(self) -> None:
        """Follow mode with nothing buffered: wait for new records (checks the broker)."""
        fetcher = self._fetcher
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if self._poll(follow=True):
                break
        else:
            fetcher.refresh_ends()
        self._waiting = {tp for tp in self._tps if not self._bufs[tp] and fetcher.due(tp)}

    def at_end(self) -> bool:
        """Nothing buffered and every partition read to the end offsets of the read."""
        return (
            not self._run
            and not self._heap
            and not self._waiting
            and not any(self._fetcher.due(tp) for tp in self._tps)
        )

    # -- events ------------------------------------------------------------------------

    def _decode(self, record: Any) -> dict[str, Any]:
        try:
            return decode(record.value, self.catalog.registry)
        except DecodeError as exc:
            if "unknown Avro schema fingerprint" in str(exc):
                self.catalog = self.source.catalog(refresh=True)  # published after we started
                try:
                    return decode(record.value, self.catalog.registry)
                except DecodeError as again:
                    exc = again
            raise ReplayError(
                f"cannot decode {record.topic}[{record.partition}]@{record.offset}: {exc}"
            ) from exc

    def events(
        self,
        *,
        stop: Bound | None = None,
        follow: bool = False,
        prefilter: Prefilter | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> Iterator[ChangeEvent]:
        """Events in position order within the start bound (given at construction) and
        ``stop``; ``follow``: keep waiting for new events at the end of the log
        (``on_idle`` is called before each wait, e.g. to flush output).

        Records are selected (dedup, start position, ``prefilter``) here; their values are
        decoded here or, for large reads, by a worker process while this one reads on."""
        self._on_idle = on_idle
        stats = self.stats
        start = self._start
        start_pos = start.position if start is not None else None
        start_time = start.time_us if start is not None else None
        stop_pos = stop.position if stop is not None else None
        stop_time = stop.time_us if stop is not None else None
        slack_us = int(TIME_SLACK_S * 1_000_000)
        topic_table = self._topic_table
        selected = self._select(follow, stop_pos, start_pos, prefilter)
        parallel = (
            not follow and self._workers > 0 and stats.total - stats.records >= PARALLEL_MIN_RECORDS
        )
        decoded = self._decoded_parallel(selected) if parallel else self._decoded(selected)
        after_stop: list[_Item] = []
        try:
            for pos, record, last, d in decoded:
                source = d["source"]
                if start_time is not None or stop_time is not None:
                    at = source["commit_ts_us"] or d["ts_us"]
                    if start_time is not None and at < start_time:
                        stats.skipped += 1
                        continue
                    if stop_time is not None and at > stop_time:
                        # after the bound: kept unread, so a later call starts with it
                        after_stop.append((pos, record, last))
                        if at > stop_time + slack_us:
                            return
                        continue
                stats.events += 1
                if stats.first_position is None:
                    stats.first_position = pos
                stats.last_position = pos
                value = record.value
                yield ChangeEvent(
                    topic_table[record.topic],
                    pos,
                    d["op"],
                    d["before"],
                    d["after"],
                    d["before_kind"],
                    d["unchanged"],
                    source,
                    value[2:10],
                    record.topic,
                    record.partition,
                    record.offset,
                    d["ts_us"],
                )
        finally:
            decoded.close()  # what it holds goes back to the run
            if after_stop:
                self._run.extendleft((p, r) for p, r, _ in reversed(after_stop))
                self._last = after_stop[0][2]

    def _select(
        self, follow: bool, stop: Pos | None, start: Pos | None, prefilter: Prefilter | None
    ) -> Iterator[_Item]:
        """Records in position order that are no duplicates, not before ``start`` and
        wanted by ``prefilter``: (position, record, the dedup position before it)."""
        stats = self.stats
        run = self._run
        while True:
            if not run:
                got = self._next_run(follow, stop)
                if not got:
                    if got is None:
                        return
                    continue
                run.extend(got)
            pos, record = run.popleft()
            if pos <= self._last:
                stats.duplicates += 1
                continue
            last, self._last = self._last, pos
            if start is not None and pos < start:
                stats.skipped += 1
                continue
            if prefilter is not None and not prefilter(record):
                stats.skipped += 1
                continue
            yield pos, record, last

    def _decoded(self, items: Iterator[_Item]) -> Generator[_Decoded, None, None]:
        registry = self.catalog.registry
        for pos, record, last in items:
            try:
                d = decode(record.value, registry)
            except DecodeError:
                d = self._decode(record)  # an unknown schema: read _schemas again
                registry = self.catalog.registry
            yield pos, record, last, d

    def _decoded_parallel(self, items: Iterator[_Item]) -> Generator[_Decoded, None, None]:
        """Like :meth:`_decoded`, values decoded by worker processes in batches, in order.
        A worker that cannot start or dies leaves the decoding to this process.  Closed
        early (a time bound was passed), it puts the records it holds back into the run,
        so a later read starts with them."""
        from concurrent.futures.process import BrokenProcessPool

        unusable = (BrokenProcessPool, RuntimeError, OSError)
        pool: Any = self._pool()
        depth = 2 * self._workers
        pending: deque[tuple[list[_Item], Any]] = deque()  # (items, future or None: here)
        batch: list[_Item] = []
        current: list[_Item] = []
        index = 0
        try:
            while True:
                item = next(items, None)
                if item is not None:
                    batch.append(item)
                if batch and (item is None or len(batch) >= _DECODE_BATCH):
                    future = None
                    if pool is not None:
                        try:
                            future = pool.submit(_decode_values, [i[1].value for i in batch])
                        except unusable as exc:
                            log.warning("replay decode worker unusable (%s); decoding here", exc)
                            pool = None
                    pending.append((batch, future))
                    batch = []
                while pending and (item is None or len(pending) > depth):
                    current, future = pending.popleft()
                    index = 0
                    results: list[dict[str, Any] | None] = [None] * len(current)
                    if future is not None:
                        try:
                            results = future.result()
                        except unusable as exc:
                            log.warning("replay decode worker died (%s); decoding here", exc)
                            pool = None
                    while index < len(current):
                        pos, record, last = current[index]
                        d = results[index]
                        index += 1
                        if d is None:
                            d = self._decode(record)
                        yield pos, record, last, d
                    current = []
                if item is None:
                    return
        finally:
            leftover = current[index:]
            for held, waiting in pending:
                if waiting is not None:
                    waiting.cancel()
                leftover += held
            leftover += batch
            self._run.extendleft((pos, record) for pos, record, _ in reversed(leftover))

    def _pool(self) -> Any:
        if self._executor is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._executor = ProcessPoolExecutor(
                max_workers=self._workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(list(self.catalog.schema_texts),),
            )
        return self._executor


_Item = tuple[Pos, Any, Pos]  # (position, Kafka record, dedup position before it)
_Decoded = tuple[Pos, Any, Pos, dict[str, Any]]  # _Item and the decoded value
#: Reads expecting at least this many records decode in a worker process.
PARALLEL_MIN_RECORDS = 50_000
_DECODE_BATCH: Final = 2_000
_worker_registry: SchemaRegistry | None = None


def _init_worker(schemas: list[str]) -> None:
    global _worker_registry
    _worker_registry = SchemaRegistry(schemas)


def _decode_values(values: list[bytes]) -> list[dict[str, Any] | None]:
    """Decode in a worker process; None where the schema is unknown there (the parent
    decodes those itself, after reading ``_schemas`` again)."""
    registry = _worker_registry
    assert registry is not None
    out: list[dict[str, Any] | None] = []
    for value in values:
        try:
            out.append(decode(value, registry))
        except DecodeError:
            out.append(None)
    return out


def _probe(fetcher: _Fetcher, tp: Any, offset: int) -> Pos | None:
    """The position of the first record at or after ``offset`` (None: none before the end)."""
    fetcher.start({tp: offset})
    watch = _Watch(fetcher)
    while fetcher.due(tp):
        for recs in fetcher.poll({tp}).values():
            for r in recs:
                for name, value in r.headers:
                    if name == POSITION_HEADER:
                        hi, lo = _POS.unpack(value)
                        return hi, lo
        watch.check([tp])
    return None


# --------------------------------------------------------------------------- state


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _key_id(row: Mapping[str, Any], key_fields: Sequence[str]) -> tuple[Any, ...]:
    if key_fields:
        return tuple(_hashable(row.get(f)) for f in key_fields)
    return ("\x00row", *sorted((k, _hashable(v)) for k, v in row.items()))


@dataclasses.dataclass(slots=True)
class RowVersion:
    """A row as the log last wrote it."""

    values: dict[str, Any]  # Avro field name -> decoded datum
    fingerprint: bytes  # value schema of the event that wrote it
    position: Pos
    time_us: int  # commit time (0: snapshot read)
    origin: str | None
    txid: int | None
    op: str
    unknown: frozenset[str] | None = None  # unchanged TOAST values the log does not hold
    count: int = 1  # tables without key columns: how many identical rows


class TableState:
    """The rows of one table after the events applied so far."""

    def __init__(self, table: str, catalog: LogCatalog) -> None:
        self.table = table
        self.catalog = catalog
        self.rows: dict[tuple[Any, ...], RowVersion] = {}
        self.events = 0
        self.truncated_at: Pos | None = None
        self._snapshot_point: int | None = None
        self._prune_below: int | None = None

    def apply(self, ev: ChangeEvent) -> None:
        version = self.catalog.versions.get(ev.fingerprint)
        if version is None:  # registered after the catalog was built: refresh by decoding
            raise ReplayError(f"{ev.table}: no table schema for fingerprint {ev.fingerprint.hex()}")
        self.events += 1
        op = ev.op
        pos = ev.position
        if self._prune_below is not None and pos[0] > self._prune_below and op != "r":
            self.prune()
        if op == "t":
            self.rows.clear()
            self.truncated_at = pos
            return
        key_fields = version.key_fields
        if op == "d":
            if ev.before is not None:
                self._remove(_key_id(ev.before, key_fields), bool(key_fields))
            return
        after = ev.after
        if after is None:
            return
        if op == "r":
            point = pos[0]
            if self._snapshot_point is not None and point > self._snapshot_point:
                self._prune_below = point
            self._snapshot_point = (
                point if self._snapshot_point is None else max(point, self._snapshot_point)
            )
        kid = _key_id(after, key_fields)
        prev: RowVersion | None = None
        if op == "u":
            if ev.before is not None:
                old = _key_id(ev.before, key_fields)
                prev = self._remove(old, bool(key_fields)) if old != kid else self.rows.get(kid)
            else:
                prev = self.rows.get(kid)
        values = after
        unknown: frozenset[str] | None = None
        if ev.unchanged:
            values = dict(after)
            source_row = prev.values if prev is not None else None
            if source_row is None and ev.before_kind == "full" and ev.before is not None:
                source_row = ev.before
            missing = []
            for f in ev.unchanged:
                if (
                    source_row is not None
                    and f in source_row
                    and not (prev is not None and prev.unknown and f in prev.unknown)
                ):
                    values[f] = source_row[f]
                else:
                    missing.append(f)
            unknown = frozenset(missing) or None
            kid = _key_id(values, key_fields) if not key_fields else kid
        row = RowVersion(
            values,
            ev.fingerprint,
            pos,
            ev.commit_ts_us,
            ev.origin,
            ev.source.get("txid"),
            op,
            unknown,
        )
        if key_fields:
            self.rows[kid] = row
        else:
            have = self.rows.get(kid)
            row.count = (have.count if have is not None else 0) + 1
            self.rows[kid] = row

    def _remove(self, kid: tuple[Any, ...], keyed: bool) -> RowVersion | None:
        if keyed:
            return self.rows.pop(kid, None)
        have = self.rows.get(kid)
        if have is not None:
            have.count -= 1
            if have.count <= 0:
                del self.rows[kid]
        return have

    def prune(self) -> None:
        """End of a restarted snapshot: drop rows it did not read (deleted before it)."""
        below = self._prune_below
        if below is None:
            return
        self._prune_below = None
        stale = [k for k, r in self.rows.items() if r.position < (below, 0)]
        for k in stale:
            del self.rows[k]
        if stale:
            log.info(
                "%s: %d rows not in the restarted snapshot at %s removed",
                self.table,
                len(stale),
                format_lsn(below),
            )


class LogState:
    """Per table state (:class:`TableState`) of the events applied so far."""

    def __init__(self, catalog: LogCatalog, tables: Iterable[str]) -> None:
        self.catalog = catalog
        self.tables: dict[str, TableState] = {t: TableState(t, catalog) for t in tables}
        self.position: Pos | None = None
        self.time_us = 0

    def apply(self, ev: ChangeEvent) -> None:
        state = self.tables.get(ev.table)
        if state is None:
            state = self.tables[ev.table] = TableState(ev.table, self.catalog)
        if ev.fingerprint not in self.catalog.versions:
            raise ReplayError(
                f"{ev.topic}[{ev.partition}]@{ev.offset}: schema {ev.fingerprint.hex()} "
                "is not a change-event schema of this log"
            )
        state.apply(ev)
        self.position = ev.position
        self.time_us = max(self.time_us, ev.time_us)

    def finish(self) -> None:
        """The log was read to its end: finish restarted snapshots."""
        for state in self.tables.values():
            state.prune()

    @property
    def events(self) -> int:
        return sum(t.events for t in self.tables.values())


# --------------------------------------------------------------------------- rendering


def _json_value(value: Any) -> Any:
    from core.row_wire import json_value

    return json_value(value)


def _named(catalog: LogCatalog, fp: bytes, values: Mapping[str, Any]) -> dict[str, Any]:
    """A row with PostgreSQL column names, values in the JSON form of docs/events.md."""
    version = catalog.versions.get(fp)
    names = version.column_of() if version is not None else {}
    return {names.get(f, f): _json_value(v) for f, v in values.items()}


def _text(catalog: LogCatalog, fp: bytes, column: str, value: Any) -> str | None:
    """A JSON-form value as PostgreSQL prints it (``2024-05-01``, ``12.50``)."""
    from relay.upstream.journal import to_pg_text

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


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def describe_origin(origin: str | None, txid: int | None = None) -> dict[str, Any]:
    """Who made a change: ``{"kind": device|resolve|replication_origin|session|other, …}``."""
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


# --------------------------------------------------------------------------- keys


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """A row key as the user gave it: values in key-column order, or by column name."""

    values: tuple[Any, ...] | None = None
    by_name: Mapping[str, Any] | None = None
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> KeySpec:
        """``42``, ``abc``, ``[1, "x"]`` (key columns in table order) or ``{"id": 42}``."""
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        if isinstance(parsed, dict):
            return cls(by_name=parsed, text=text)
        if isinstance(parsed, list):
            return cls(values=tuple(parsed), text=text)
        return cls(values=(parsed,), text=text)

    def matches(self, key: Mapping[str, Any], types: Mapping[str, Any] | None = None) -> bool:
        """``key``: PostgreSQL column name -> JSON-form value, key columns in table order."""
        if self.by_name is not None:
            if set(self.by_name) != set(key):
                return False
            return all(
                _same_key_value(self.by_name[c], v, (types or {}).get(c)) for c, v in key.items()
            )
        assert self.values is not None
        if len(self.values) != len(key):
            return False
        return all(
            _same_key_value(want, have, (types or {}).get(col))
            for want, (col, have) in zip(self.values, key.items(), strict=True)
        )


def _same_key_value(want: Any, have: Any, ct: Any) -> bool:
    if want == have and type(want) is type(have):
        return True
    if str(want) == str(have):
        return True
    if isinstance(have, str) and isinstance(want, int | float) and not isinstance(want, bool):
        try:
            return Decimal(have) == Decimal(str(want))
        except ArithmeticError:
            return False
    if ct is not None:
        from relay.upstream.journal import to_pg_text

        try:
            return to_pg_text(ct, have) == str(want)
        except (ValueError, TypeError, KeyError, ArithmeticError):
            return False
    return False


def _key_of(version: TableVersion, row: Mapping[str, Any]) -> dict[str, Any]:
    names = version.column_of()
    return {names[f]: _json_value(row.get(f)) for f in version.key_fields}


# --------------------------------------------------------------------------- history


@dataclasses.dataclass
class HistoryReport:
    """Every version of one row, with device edits matched to journal entries."""

    table: str
    key: KeySpec
    versions: list[dict[str, Any]]
    unmatched_edits: list[dict[str, Any]]
    stats: ReadStats

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "key": self.key.text,
            "versions": self.versions,
            "edits_without_version": self.unmatched_edits,
            "read": self.stats.to_json(),
        }


def row_history(
    source: LogSource,
    table: str,
    key: KeySpec,
    *,
    start: Bound | None = None,
    stop: Bound | None = None,
    journal: bool = True,
    progress: Progress | None = None,
    workers: int | None = None,
) -> HistoryReport:
    """Every version of the row with ``key`` in ``table`` (position order).

    Each version: position, commit time, op, origin (:func:`describe_origin`), the row
    after it (None when deleted), the columns changed from the previous version, and for
    device edits the journal entry and its latest outcome (``journal``).  Only events whose
    Kafka key matches (or updates that carry a ``before`` row, and truncates) are decoded.
    """
    catalog = source.catalog()
    table = catalog.resolve(table)
    if not catalog.latest(table).key_fields:
        raise ReplayError(
            f"{table} has no key columns: its rows cannot be told apart, so they have no "
            "history of their own (use export)"
        )
    key_cache: dict[bytes, tuple[bool, tuple[Any, ...]]] = {}
    tracked: set[tuple[Any, ...]] = set()
    registry = catalog.registry
    types = catalog.latest(table).types

    def prefilter(record: Any) -> bool:
        op_bytes = bytes(record.value[10:13])
        if op_bytes[:2] == b"\x02t" or op_bytes == b"\x02u\x02":
            return True  # truncate; update with a before row (key change, FULL)
        raw = record.key
        if raw is None:
            return False
        found = key_cache.get(raw)
        if found is None:
            try:
                decoded = decode(raw, registry)
            except DecodeError:
                return True  # let the value decode say what is wrong
            names = catalog.key_names(bytes(raw[2:10]))
            named = {names.get(f, f): _json_value(v) for f, v in decoded.items()}
            found = (key.matches(named, types), tuple(_hashable(v) for v in decoded.values()))
            key_cache[raw] = found
        return found[0] or found[1] in tracked

    versions: list[dict[str, Any]] = []
    current: RowVersion | None = None
    with LogReader(source, [table], start=start, progress=progress, workers=workers) as reader:
        for ev in reader.events(stop=stop, prefilter=prefilter):
            version = catalog.versions.get(ev.fingerprint)
            if version is None:
                continue
            step = _history_step(catalog, version, ev, key, tracked, current)
            if step is None:
                continue
            current, item = step
            versions.append(item)
        stats = reader.stats
    unmatched: list[dict[str, Any]] = []
    if journal and versions:
        unmatched = _attach_journal(source, table, key, versions)
    if not versions:
        raise NoEvents(
            f"no version of {table} key {key.text} in the log"
            + (f" between {start or 'the start'} and {stop or 'the end'}" if start or stop else "")
            + f" ({stats.records} records read)"
        )
    return HistoryReport(table, key, versions, unmatched, stats)


def _history_step(
    catalog: LogCatalog,
    version: TableVersion,
    ev: ChangeEvent,
    key: KeySpec,
    tracked: set[tuple[Any, ...]],
    current: RowVersion | None,
) -> tuple[RowVersion | None, dict[str, Any]] | None:
    """If ``ev`` concerns the row followed: the row after it and its history item.

    The row is followed through key changes: an update that moves it to another key
    adds that key to ``tracked``; an update that moves another row *onto* the key
    continues the history with that row (the item names the key it came from).
    """
    kf = version.key_fields
    op = ev.op
    if op == "t":
        if current is None:
            return None
        return None, _item(catalog, ev, None, current, "truncate")
    before_id = _key_id(ev.before, kf) if ev.before is not None else None
    after_id = _key_id(ev.after, kf) if ev.after is not None else None

    def is_target(row: Mapping[str, Any] | None, kid: tuple[Any, ...] | None) -> bool:
        if row is None or kid is None:
            return False
        return kid in tracked or key.matches(_key_of(version, row), version.types)

    moved_from: dict[str, Any] | None = None
    if op == "d":
        if not is_target(ev.before, before_id):
            return None
        return None, _item(catalog, ev, None, current, "delete")
    if op == "u" and before_id is not None and before_id != after_id:
        if is_target(ev.before, before_id) or is_target(ev.after, after_id):
            assert ev.before is not None
            moved_from = _key_of(version, ev.before)
        else:
            return None
    elif not is_target(ev.after, after_id):
        return None
    assert after_id is not None
    tracked.add(after_id)
    values = ev.after or {}
    unknown: frozenset[str] | None = None
    if ev.unchanged:
        values = dict(values)
        missing = []
        for f in ev.unchanged:
            if current is not None and f in current.values:
                values[f] = current.values[f]
            else:
                missing.append(f)
        unknown = frozenset(missing) or None
    row = RowVersion(
        values,
        ev.fingerprint,
        ev.position,
        ev.commit_ts_us,
        ev.origin,
        ev.source.get("txid"),
        op,
        unknown,
    )
    kind = {"c": "insert", "u": "update", "r": "snapshot read"}.get(op, op)
    item = _item(catalog, ev, row, current, kind)
    item["key_changed_from"] = moved_from
    return row, item


def _item(
    catalog: LogCatalog,
    ev: ChangeEvent,
    row: RowVersion | None,
    prev: RowVersion | None,
    kind: str,
) -> dict[str, Any]:
    after = _named(catalog, row.fingerprint, row.values) if row is not None else None
    before = _named(catalog, prev.fingerprint, prev.values) if prev is not None else None
    changed: list[str] = []
    if after is not None:
        changed = [c for c, v in after.items() if before is None or before.get(c) != v]
    elif before is not None:
        changed = list(before)
    txid = ev.source.get("txid")
    unknown = []
    if row is not None and row.unknown:
        names = catalog.versions[row.fingerprint].column_of()
        unknown = sorted(names.get(f, f) for f in row.unknown)
    return {
        "position": format_position(ev.position),
        "commit_time": format_time(ev.commit_ts_us),
        "op": ev.op,
        "change": kind,
        "origin": describe_origin(ev.origin, txid),
        "row": after,
        "previous": before,
        "changed": changed,
        "unknown_columns": unknown,
        "key_changed_from": None,
    }


def _attach_journal(
    source: LogSource, table: str, key: KeySpec, versions: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Match device versions to journal entries; returns the entries without a version.

    Candidates are the ``_journal`` entries for this table and key; each has its latest
    ``_outcomes`` record.  A version whose origin is ``device:<id>`` gets the earliest
    unmatched entry of that device whose outcome wrote the row (``applied``/``merged``)
    with a compatible op, preferring one whose outcome row equals the version's row; a
    version whose origin is ``resolve:<conflict>`` gets the entry that conflict was kept
    for.  Entries left over (rejected, kept as conflicts, merged without a change) are
    returned, so an auditor also sees edits that did not change the row.
    """
    from relay.upstream.journal import JournalFormatError, JournalRecord, decode_outcomes

    needle = _dumps({"table": table})[1:-1].encode()  # "table":"public.x"
    entries: dict[tuple[str, int], Any] = {}
    for record in source.read_all(f"{source.prefix}._journal"):
        if not record.value or needle not in record.value:
            continue
        try:
            jr = JournalRecord.from_bytes(record.value)
        except JournalFormatError:
            continue
        if jr.entry is None or jr.entry.table != table or not _entry_key_matches(jr.entry, key):
            continue
        entries[(jr.device_id, jr.seq)] = jr
    outcomes: dict[tuple[str, int], Any] = {}
    by_conflict: dict[str, tuple[str, int]] = {}
    for record in source.read_all(f"{source.prefix}._outcomes"):
        if not record.value:
            continue
        try:
            found = decode_outcomes(record.value)
        except JournalFormatError:
            continue
        for o in found:
            ident = (o.device_id, o.seq)
            if ident in entries:
                outcomes[ident] = o
                if o.conflict and o.conflict.get("id"):
                    by_conflict[str(o.conflict["id"])] = ident
    used: set[tuple[str, int]] = set()
    ordered = sorted(entries)
    for item in versions:
        origin = item["origin"]
        match: tuple[str, int] | None = None
        if origin["kind"] == "device":
            match = _pick_entry(origin["device_id"], item, ordered, entries, outcomes, used)
        elif origin["kind"] == "resolve":
            match = by_conflict.get(origin["conflict_id"])
        if match is None:
            continue
        used.add(match)
        item["journal"] = _journal_json(entries[match])
        item["outcome"] = outcomes[match].to_json() if match in outcomes else None
    return [
        {
            "journal": _journal_json(entries[i]),
            "outcome": outcomes[i].to_json() if i in outcomes else None,
        }
        for i in ordered
        if i not in used
    ]


_OP_OF_ENTRY = {"insert": ("c", "u"), "update": ("u",), "delete": ("d",)}


def _pick_entry(
    device: str,
    item: Mapping[str, Any],
    ordered: Sequence[tuple[str, int]],
    entries: Mapping[tuple[str, int], Any],
    outcomes: Mapping[tuple[str, int], Any],
    used: set[tuple[str, int]],
) -> tuple[str, int] | None:
    fallback: tuple[str, int] | None = None
    for ident in ordered:
        if ident[0] != device or ident in used:
            continue
        entry = entries[ident].entry
        if item["op"] not in _OP_OF_ENTRY.get(entry.op.value, ()):
            continue
        outcome = outcomes.get(ident)
        if outcome is not None and outcome.kind.value not in ("applied", "merged", "resolved"):
            continue
        if outcome is not None and _outcome_row_matches(outcome.row, item["row"]):
            return ident
        if fallback is None:
            fallback = ident
    return fallback


def _outcome_row_matches(seen: Mapping[str, Any] | None, row: Mapping[str, Any] | None) -> bool:
    if seen is None or row is None:
        return seen is None and row is None
    return all(c in row and _same_key_value(v, row[c], None) for c, v in seen.items())


def _entry_key_matches(entry: Any, key: KeySpec) -> bool:
    if key.by_name is not None:
        values = {**(entry.old or {}), **(entry.new or {})}
        if all(c in values for c in key.by_name):
            return all(_same_key_value(w, values[c], None) for c, w in key.by_name.items())
        return sorted(map(str, key.by_name.values())) == sorted(map(str, entry.key))
    assert key.values is not None
    if len(key.values) != len(entry.key):
        return False
    if len(key.values) == 1:
        return _same_key_value(key.values[0], entry.key[0], None)
    return sorted(map(str, key.values)) == sorted(map(str, entry.key))


def _journal_json(record: Any) -> dict[str, Any]:
    entry = record.entry
    out: dict[str, Any] = {
        "device_id": record.device_id,
        "seq": record.seq,
        "received_at": format_time(record.received_at_us),
    }
    if entry is not None:
        out.update(entry.to_json())
        if entry.base is not None:
            out["base"] = format_position((entry.base.commit_lsn, entry.base.seq))
    if record.rejection is not None:
        out["rejection"] = record.rejection.to_json()
    return out


# --------------------------------------------------------------------------- as-of


def _all_tables(catalog: LogCatalog, names: Sequence[str] | None) -> list[str]:
    if names:
        return [catalog.resolve(n) for n in names]
    if not catalog.tables:
        raise NoEvents(f"the log with prefix {catalog.prefix!r} holds no table (no schemas)")
    return sorted(catalog.tables)


def state_as_of(
    source: LogSource,
    tables: Sequence[str] | None,
    bound: Bound | None,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
) -> tuple[LogState, ReadStats]:
    """The tables' rows after every event up to ``bound`` (None: the whole log)."""
    catalog = source.catalog()
    names = _all_tables(catalog, tables)
    state = LogState(catalog, names)
    with LogReader(source, names, progress=progress, workers=workers) as reader:
        for ev in reader.events(stop=bound):
            state.apply(ev)
        if reader.at_end():
            state.finish()
        stats = reader.stats
    if stats.events == 0:
        where = f"at or before {bound}" if bound is not None else "in the log"
        raise NoEvents(
            f"no event of {', '.join(names)} {where} ({stats.records} records read; "
            "the log starts later, or the tables have no events)"
        )
    return state, stats


def _columns(state: TableState) -> list[tuple[str, bytes]]:
    """Output columns of a table: (PostgreSQL name, fingerprint of a version that has it),
    the newest schema version's columns first, then older ones some row still holds."""
    catalog = state.catalog
    versions = catalog.tables.get(state.table, [])
    used = {r.fingerprint for r in state.rows.values()}
    out: dict[str, bytes] = {}
    for v in reversed(versions):
        if v is versions[-1] or v.fingerprint in used:
            for c in v.columns:
                out.setdefault(c, v.fingerprint)
    return list(out.items())


def _row_cells(state: TableState, row: RowVersion) -> dict[str, Any]:
    """PostgreSQL name -> JSON-form value of a row (its own schema version)."""
    return _named(state.catalog, row.fingerprint, row.values)


def write_state(
    state: LogState,
    out: Path | IO[str],
    fmt: Format,
    *,
    meta: Mapping[str, Any] | None = None,
) -> int:
    """Write the state: ``jsonl`` (one row per line, every table), ``csv`` (one table per
    file: ``out`` is a file for one table, a directory for several), ``sqlite`` (one SQLite
    table per table, named ``schema.table``, plus ``_replay`` with ``meta``).  Returns the
    number of rows written."""
    tables = [state.tables[t] for t in sorted(state.tables)]
    if fmt == "jsonl":
        with _open_text(out) as fh:
            return sum(_jsonl_rows(t, fh) for t in tables)
    if fmt == "csv":
        if len(tables) == 1:
            with _open_text(out) as fh:
                return _csv_rows(tables[0], fh)
        if not isinstance(out, Path):
            raise ValueError("csv with several tables needs a directory for --out")
        out.mkdir(parents=True, exist_ok=True)
        n = 0
        for t in tables:
            with (out / f"{t.table}.csv").open("w", encoding="utf-8", newline="") as fh:
                n += _csv_rows(t, fh)
        return n
    if fmt == "sqlite":
        if not isinstance(out, Path):
            raise ValueError("sqlite needs a file for --out")
        return _sqlite_state(tables, out, meta or {})
    raise ValueError(f"unknown format {fmt!r} (jsonl, csv, sqlite)")


class _open_text:
    def __init__(self, out: Path | IO[str]) -> None:
        self.out = out
        self.fh: IO[str] | None = None

    def __enter__(self) -> IO[str]:
        if isinstance(self.out, Path):
            self.fh = self.out.open("w", encoding="utf-8", newline="")
            return self.fh
        return self.out

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            self.fh.close()


def _meta_of(row: RowVersion) -> dict[str, Any]:
    return {
        "position": format_position(row.position),
        "commit_time": format_time(row.time_us),
        "origin": row.origin,
    }


def _jsonl_rows(state: TableState, fh: IO[str]) -> int:
    n = 0
    for row in state.rows.values():
        version = state.catalog.versions[row.fingerprint]
        line: dict[str, Any] = {
            "table": state.table,
            "key": _key_of(version, row.values) if version.key_fields else None,
            "row": _row_cells(state, row),
            **_meta_of(row),
        }
        if row.unknown:
            names = version.column_of()
            line["unknown_columns"] = sorted(names.get(f, f) for f in row.unknown)
        for _ in range(row.count):
            fh.write(_dumps(line))
            fh.write("\n")
            n += 1
    return n


def _csv_field(value: str | None) -> str:
    """PostgreSQL ``COPY … CSV FORCE QUOTE *`` style: NULL is an empty unquoted field."""
    if value is None:
        return ""
    return '"' + value.replace('"', '""') + '"'


def _csv_line(values: Sequence[str | None]) -> str:
    return ",".join(_csv_field(v) for v in values) + "\r\n"


def _csv_rows(state: TableState, fh: IO[str]) -> int:
    columns = _columns(state)
    fh.write(_csv_line([c for c, _ in columns] + ["_position", "_commit_time", "_origin"]))
    n = 0
    for row in state.rows.values():
        cells = _row_cells(state, row)
        values = [_text(state.catalog, row.fingerprint, c, cells.get(c)) for c, _ in columns]
        meta = _meta_of(row)
        line = _csv_line([*values, meta["position"], meta["commit_time"], meta["origin"]])
        for _ in range(row.count):
            fh.write(line)
            n += 1
    return n


_SQLITE_TYPES: Final = {"int": "INTEGER", "bool": "INTEGER", "float": "REAL", "bytes": "BLOB"}


def _sqlite_value(catalog: LogCatalog, fp: bytes, column: str, value: Any) -> Any:
    if value is None:
        return None
    version = catalog.versions.get(fp)
    ct = version.types.get(column) if version is not None else None
    kind = ct.kind.value if ct is not None else ""
    if kind == "int" and isinstance(value, int):
        return value
    if kind == "bool":
        return 1 if value else 0
    if kind == "float" and isinstance(value, float):
        return value
    if kind == "bytes" and isinstance(value, str):
        return base64.b64decode(value)
    return _text(catalog, fp, column, value)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sqlite_state(tables: Sequence[TableState], path: Path, meta: Mapping[str, Any]) -> int:
    if path.exists():
        path.unlink()
    db = sqlite3.connect(path)
    n = 0
    try:
        with db:
            db.execute("create table _replay (name text primary key, value text)")
            db.executemany(
                "insert into _replay values (?, ?)",
                [(k, v if isinstance(v, str) else _dumps(v)) for k, v in meta.items()],
            )
            for state in tables:
                columns = _columns(state)
                decl = []
                for column, fp in columns:
                    ct = state.catalog.versions[fp].types.get(column)
                    decl.append(
                        f"{_quote(column)} {_SQLITE_TYPES.get(ct.kind.value if ct else '', 'TEXT')}"
                    )
                decl += ["_position TEXT", "_commit_time TEXT", "_origin TEXT"]
                db.execute(f"create table {_quote(state.table)} ({', '.join(decl)})")
                marks = ", ".join("?" * (len(columns) + 3))
                insert = f"insert into {_quote(state.table)} values ({marks})"
                batch = []
                for row in state.rows.values():
                    cells = _row_cells(state, row)
                    values = [
                        _sqlite_value(state.catalog, row.fingerprint, c, cells.get(c))
                        for c, _ in columns
                    ]
                    meta_row = _meta_of(row)
                    record = (
                        *values,
                        meta_row["position"],
                        meta_row["commit_time"],
                        meta_row["origin"],
                    )
                    batch.extend([record] * row.count)
                    if len(batch) >= 5000:
                        db.executemany(insert, batch)
                        n += len(batch)
                        batch = []
                db.executemany(insert, batch)
                n += len(batch)
    finally:
        db.close()
    return n


# --------------------------------------------------------------------------- export


_EVENT_COLUMNS: Final = (
    "position",
    "commit_lsn",
    "seq",
    "commit_time",
    "table",
    "op",
    "origin",
    "txid",
    "key",
    "before",
    "after",
    "unchanged",
)


def event_json(catalog: LogCatalog, ev: ChangeEvent) -> dict[str, Any]:
    """An event as plain JSON (PostgreSQL column names, JSON-form values)."""
    version = catalog.versions.get(ev.fingerprint)
    row = ev.after if ev.after is not None else ev.before
    names = version.column_of() if version is not None else {}
    return {
        "position": format_position(ev.position),
        "commit_lsn": format_lsn(ev.position[0]),
        "seq": ev.position[1],
        "commit_time": format_time(ev.commit_ts_us),
        "table": ev.table,
        "op": ev.op,
        "origin": ev.origin,
        "txid": ev.source.get("txid"),
        "key": _key_of(version, row)
        if version is not None and version.key_fields and row
        else None,
        "before": _named(catalog, ev.fingerprint, ev.before) if ev.before is not None else None,
        "before_kind": ev.before_kind,
        "after": _named(catalog, ev.fingerprint, ev.after) if ev.after is not None else None,
        "unchanged": [names.get(f, f) for f in ev.unchanged],
        "snapshot": ev.source.get("snapshot"),
    }


class _EventSink:
    def __init__(self, out: Path | IO[str], fmt: Format) -> None:
        self.fmt = fmt
        self.n = 0
        self._fh: IO[str] | None = None
        self._own = False
        self._db: sqlite3.Connection | None = None
        self._batch: list[tuple[Any, ...]] = []
        self._flushed = time.monotonic()
        if fmt == "sqlite":
            if not isinstance(out, Path):
                raise ValueError("sqlite needs a file for --out")
            if out.exists():
                out.unlink()
            self._db = sqlite3.connect(out)
            cols = ", ".join(
                f"{_quote(c)} {'INTEGER' if c in ('seq', 'txid') else 'TEXT'}"
                for c in _EVENT_COLUMNS
            )
            self._db.execute(f"create table events ({cols})")
            self._db.commit()
        elif isinstance(out, Path):
            self._fh = out.open("w", encoding="utf-8", newline="")
            self._own = True
        else:
            self._fh = out
        if fmt == "csv":
            assert self._fh is not None
            self._fh.write(_csv_line(list(_EVENT_COLUMNS)))

    def write(self, obj: dict[str, Any]) -> None:
        self.n += 1
        if self.fmt == "jsonl":
            assert self._fh is not None
            self._fh.write(_dumps(obj))
            self._fh.write("\n")
        else:
            row = tuple(
                obj[c]
                if c
                in ("position", "commit_lsn", "seq", "commit_time", "table", "op", "origin", "txid")
                else (None if obj[c] is None else _dumps(obj[c]))
                for c in _EVENT_COLUMNS
            )
            if self.fmt == "csv":
                assert self._fh is not None
                self._fh.write(_csv_line([None if v is None else str(v) for v in row]))
            else:
                self._batch.append(row)
                if len(self._batch) >= 5000:
                    self.flush()
        if time.monotonic() - self._flushed > 1.0:
            self.flush()

    def flush(self) -> None:
        self._flushed = time.monotonic()
        if self._db is not None:
            if self._batch:
                marks = ", ".join("?" * len(_EVENT_COLUMNS))
                self._db.executemany(f"insert into events values ({marks})", self._batch)
                self._batch = []
            self._db.commit()
        elif self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        self.flush()
        if self._db is not None:
            self._db.close()
        if self._own and self._fh is not None:
            self._fh.close()


def export_events(
    source: LogSource,
    tables: Sequence[str] | None,
    start: Bound | None,
    stop: Bound | None,
    out: Path | IO[str],
    fmt: Format,
    *,
    follow: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
) -> ReadStats:
    """Write every event of ``tables`` between ``start`` and ``stop`` (both inclusive) in
    position order; ``follow``: then keep writing new events until interrupted (or until
    ``stop``).  Raises :class:`NoEvents` when a bounded range holds nothing."""
    catalog = source.catalog()
    names = _all_tables(catalog, tables)
    _check_range(start, stop)
    sink = _EventSink(out, fmt)
    try:
        with LogReader(source, names, start=start, progress=progress, workers=workers) as reader:
            for ev in reader.events(stop=stop, follow=follow, on_idle=sink.flush):
                sink.write(event_json(catalog, ev))
            stats = reader.stats
    finally:
        sink.close()
    if stats.events == 0 and not follow:
        raise NoEvents(
            f"no event of {', '.join(names)} between {start or 'the start'} and "
            f"{stop or 'the end'} ({stats.records} records read)"
        )
    return stats


def _check_range(start: Bound | None, stop: Bound | None) -> None:
    if start is None or stop is None:
        return
    if start.position is not None and stop.position is not None and start.position > stop.position:
        raise NoEvents(f"empty range: {start} is after {stop}")
    if start.time_us is not None and stop.time_us is not None and start.time_us > stop.time_us:
        raise NoEvents(f"empty range: {start} is after {stop}")


# --------------------------------------------------------------------------- verify


@dataclasses.dataclass(frozen=True)
class ColumnDiff:
    """One column of a row on which the log and PostgreSQL disagree: both values as
    PostgreSQL prints them (None: NULL).  ``in_log`` False: the log holds no value of the
    column for the row at all (``reason`` says why); ``reason`` is also set when the log's
    value cannot be read as the column's type of now."""

    column: str
    log: str | None
    postgres: str | None
    in_log: bool = True
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "log": self.log,
            "postgres": self.postgres,
            "in_log": self.in_log,
            "reason": self.reason,
        }


@dataclasses.dataclass
class RowDiff:
    """One row on which the log and PostgreSQL disagree."""

    table: str
    kind: Literal["missing", "extra", "differs"]  # missing: in PostgreSQL, not in the log
    key: dict[str, Any]
    columns: list[ColumnDiff]
    log_position: str | None = None
    count: int = 1
    bare: frozenset[str] = frozenset()  # columns printed without quotes (numbers, booleans)

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "kind": self.kind,
            "key": self.key,
            "columns": [c.to_json() for c in self.columns],
            "log_position": self.log_position,
            "count": self.count,
        }


@dataclasses.dataclass
class VerifyReport:
    tables: list[str]
    rows_compared: int
    lsn: int
    diffs: list[RowDiff]
    stats: ReadStats
    rechecked: int = 0
    not_carried: int = 0  # values of compared rows the log holds no value for
    not_in_log: list[str] = dataclasses.field(default_factory=list)  # published, no schema yet
    partitions: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # read_to, end

    @property
    def ok(self) -> bool:
        return not self.diffs

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "tables": self.tables,
            "rows_compared": self.rows_compared,
            "up_to_lsn": format_lsn(self.lsn),
            "rechecked": self.rechecked,
            "values_not_in_log": self.not_carried,
            "differences": [d.to_json() for d in self.diffs],
            "read": self.stats.to_json(),
            "partitions": self.partitions,
        }


@dataclasses.dataclass(frozen=True)
class PgTarget:
    """The captured database (``[postgres]`` of the cdc settings)."""

    dsn: str
    password: str | None
    slot: str
    publication: str
    db_label: str = ""

    @classmethod
    def from_settings(cls, settings: Any) -> PgTarget:
        from cdc.settings import redact_dsn

        pg = settings.postgres
        return cls(pg.dsn, pg.password, pg.slot, pg.publication, redact_dsn(pg.dsn))


def _pg_connect(pg: PgTarget) -> Any:
    from cdc.pg_source import connect

    try:
        return connect(pg.dsn, pg.password)
    except FieldsyncError as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL ({pg.db_label}): {exc}") from exc


def _pg_tables(conn: Any, pg: PgTarget, names: Sequence[str] | None) -> list[Any]:
    """Published tables (cdc.snapshot.published_tables), as SnapshotTable."""
    from cdc.pg_catalog import PgCatalog
    from cdc.snapshot import published_tables
    from core.errors import ConfigError

    row = conn.execute(
        "select 1 from pg_publication where pubname = %s", (pg.publication,)
    ).fetchone()
    if row is None:
        raise ConfigError(
            f"publication {pg.publication!r} does not exist in {pg.db_label}: "
            "is this the database cdc captures (postgres.dsn, postgres.publication)?"
        )
    catalog = PgCatalog(pg.dsn, pg.password)
    try:
        found = published_tables(conn, pg.publication, catalog)
    finally:
        catalog.close()
    by_name = {f"{t.schema}.{t.table}": t for t in found}
    if not names:
        return [by_name[n] for n in sorted(by_name)]
    out = []
    for n in names:
        full = n if "." in n else f"public.{n}"
        if full not in by_name:
            raise UnknownTable(
                f"table {n!r} is not in publication {pg.publication!r} "
                f"(published: {', '.join(sorted(by_name)) or 'none'})"
            )
        out.append(by_name[full])
    return out


def _wait_for_slot(conn: Any, pg: PgTarget, lsn: int, wait_s: float) -> None:
    """Until the cdc slot has confirmed ``lsn`` (then Kafka holds every transaction that
    committed before it).  A non-transactional logical message moves the WAL past it, so
    an idle database does not keep the slot short of ``lsn``."""
    import psycopg

    try:
        conn.execute("select pg_logical_emit_message(false, 'fieldsync.verify', '')")
    except psycopg.Error as exc:
        log.debug("pg_logical_emit_message refused: %s", exc)
    deadline = time.monotonic() + wait_s
    confirmed: int | None = None
    while True:
        row = conn.execute(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = %s",
            (pg.slot,),
        ).fetchone()
        if row is None:
            raise LogBehind(
                f"replication slot {pg.slot!r} does not exist in {pg.db_label}: without it "
                "there is no telling how far the log goes (is cdc running? postgres.slot?)"
            )
        confirmed = parse_lsn(row[0]) if row[0] else 0
        if confirmed >= lsn:
            return
        if time.monotonic() > deadline:
            raise LogBehind(
                f"cdc has confirmed {format_lsn(confirmed)} but PostgreSQL is at "
                f"{format_lsn(lsn)} after waiting {wait_s:.0f} s: is `fieldsync cdc run` "
                "running? (raise --wait for a busy database)"
            )
        time.sleep(0.2)


class _PgSide:
    """Rows of the published tables in one REPEATABLE READ snapshot, as cdc encodes them.

    A second connection (autocommit, no snapshot) casts the log's values of columns whose
    type changed since the log wrote them (:meth:`_PgTable.cast`); a cast that fails there
    cannot end the snapshot's transaction."""

    def __init__(self, pg: PgTarget, prefix: str, tables: Sequence[Any]) -> None:
        self.pg = pg
        self.prefix = prefix
        self.tables = {f"{t.schema}.{t.table}": t for t in tables}
        self.conn = _pg_connect(pg)
        self.db = self.conn.info.dbname
        self._cast_conn: Any = None

    def snapshot(self) -> int:
        """Begin a snapshot; the WAL insert position after it (every visible commit is before)."""
        self.conn.autocommit = False
        self.conn.execute("set transaction isolation level repeatable read, read only")
        row = self.conn.execute("select pg_current_wal_insert_lsn()::text").fetchone()
        return parse_lsn(row[0])

    def end(self) -> None:
        self.conn.rollback()
        self.conn.autocommit = True

    def table(self, name: str) -> _PgTable:
        from cdc.pg_catalog import PgCatalog
        from core.avro_envelope import TableCodec

        t = self.tables[name]
        catalog = PgCatalog(self.pg.dsn, self.pg.password)
        try:
            codec = TableCodec(
                db=self.db,
                schema=t.schema,
                table=t.table,
                columns=t.columns,
                catalog=catalog,
                unchanged_sentinel=object(),
                warn=lambda _m: None,
                namespace_prefix=self.prefix,
            )
        finally:
            catalog.close()
        return _PgTable(self, t, codec)

    def cast_conn(self) -> Any:
        if self._cast_conn is None:
            self._cast_conn = _pg_connect(self.pg)
            self._cast_conn.autocommit = True
        return self._cast_conn

    def close(self) -> None:
        if self._cast_conn is not None:
            self._cast_conn.close()
        self.conn.close()


@dataclasses.dataclass(frozen=True)
class _CastFailed:
    """A log value PostgreSQL does not accept as the column's type of now."""

    message: str


class _PgTable:
    """One published table: its rows in the snapshot, and the conversion of PostgreSQL
    text into the datums cdc writes (the table's codec of now)."""

    def __init__(self, side: _PgSide, table: Any, codec: Any) -> None:
        from core.avro_envelope import Source

        self.side = side
        self.t = table
        self.codec = codec
        found = column_types_from_value_schema(json.loads(codec.value_schema_json))
        self.types: dict[str, Any] = found[1] if found is not None else {}
        self.columns: list[str] = [c.name for c in table.columns]
        self.key_columns: list[str] = [c.name for c in table.columns if c.is_key]
        self._registry = SchemaRegistry([codec.value_schema_json])
        self._names = dict(zip(codec.field_names, self.columns, strict=True))
        self._src = Source(side.db, table.schema, table.table, 0, 0, 0, 0, 0, "true")
        self._type_sql: dict[str, str] = {}

    def datums(self, texts: Sequence[str | None]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(key id, {column: datum}) of a row given as PostgreSQL's output texts."""
        _, value = self.codec.encode_change("r", None, list(texts), self._src, 0)
        after = decode(value, self._registry)["after"]
        return _key_id(after, self.codec.key_field_names), {
            self._names[f]: v for f, v in after.items()
        }

    def rows(self) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
        """(key id, {column: datum}) of every row in the snapshot."""
        from psycopg import sql

        from core.pg_types import output_function_text

        t = self.t
        # no ::text casts: the output function's text is what pgoutput sends (bool::text
        # is 'true' where the output function prints 't'; inet::text adds the mask)
        query = sql.SQL("select {} from {}").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)
            if self.columns
            else sql.SQL("null"),
            sql.Identifier(t.schema, t.table),
        )
        with self.side.conn.cursor(name=f"fieldsync_verify_{t.oid}") as cur:
            output_function_text(cur)  # the text pgoutput sends
            cur.itersize = 5000
            cur.execute(query)
            for raw in cur:
                yield self.datums(list(raw) if self.columns else [])

    def pg_text(self, column: str, value: Any) -> str | None:
        """A datum as PostgreSQL prints it."""
        from relay.upstream.journal import to_pg_text

        if value is None:
            return None
        ct = self.types.get(column)
        j = _json_value(value)
        return to_pg_text(ct, j) if ct is not None else _dumps(j)

    def cast(self, column: str, texts: Sequence[str]) -> dict[str, Any]:
        """``text -> datum`` of ``texts`` read as the column's type of now: PostgreSQL
        casts each (``text::type``, printed by the type's output function) and cdc's codec
        turns the result into the datum it would write; a value PostgreSQL or the codec
        does not accept maps to :class:`_CastFailed`."""
        import psycopg

        from cdc.errors import SchemaError
        from core.pg_types import output_function_text

        conn = self.side.cast_conn()
        index = self.columns.index(column)
        type_sql = self._type_sql.get(column)
        if type_sql is None:
            spec = self.t.columns[index]
            row = conn.execute(
                "select format_type(%s, %s)", (spec.type_oid, spec.type_modifier)
            ).fetchone()
            type_sql = self._type_sql[column] = str(row[0])
        query = (
            f"select (u.x)::{type_sql} from unnest(%s::text[]) with ordinality as u(x, n) "
            "order by u.n"
        )
        out: dict[str, Any] = {}

        def put(text: str, printed: str | None) -> None:
            row: list[str | None] = [None] * len(self.columns)
            row[index] = printed
            try:
                out[text] = self.datums(row)[1][column]
            except SchemaError as exc:
                out[text] = _CastFailed(str(exc))

        with conn.cursor() as cur:
            output_function_text(cur)
            try:
                printed = [r[0] for r in cur.execute(query, (list(texts),)).fetchall()]
            except psycopg.Error:
                printed = None
            if printed is not None:
                for text, p in zip(texts, printed, strict=True):
                    put(text, p)
                return out
            for text in texts:  # one failed: find which, one by one
                try:
                    row = cur.execute(f"select (%s::text)::{type_sql}", (text,)).fetchone()
                except psycopg.Error as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                    out[text] = _CastFailed(first)
                    continue
                put(text, row[0] if row is not None else None)
        return out


_CAST_BATCH: Final = 2_000  # rows whose values need a cast, compared together


class _TableCompare:
    """Compares the rows the log holds for one table with PostgreSQL's, every column of
    PostgreSQL's table of now.

    Per log schema version a plan says, per column of now, the field of the version
    that holds it (or none: the column did not exist when the row was last written) and
    whether its type changed since.  A column the log holds no value for — the version
    has no such column, or the row's last event left it unchanged (TOAST) and the log
    holds no earlier value — is a difference, with the reason.  Values of the same type
    are compared as datums (the PostgreSQL side went through the same codec, so the same
    value is the same datum); numbers by value, NaN equal to NaN.  Values whose type
    changed are cast to the type of now in PostgreSQL first (:meth:`_PgTable.cast`),
    batched, so ``numeric(6,2)`` 1.50 equals ``numeric(8,3)`` 1.500 and an ``int`` 5
    equals a ``text`` '5'."""

    def __init__(self, catalog: LogCatalog, name: str, pg: _PgTable) -> None:
        self.catalog = catalog
        self.name = name
        self.pg = pg
        self.bare = frozenset(c for c, ct in pg.types.items() if ct.kind.value in _BARE_KINDS)
        self.diffs: list[RowDiff] = []
        self.not_carried = 0
        self._plans: dict[bytes, list[tuple[str, str | None, Any]]] = {}
        self._pending: list[tuple[dict[str, Any], RowVersion, dict[str, Any]]] = []

    def plan(self, fp: bytes) -> list[tuple[str, str | None, Any]]:
        """Per column of now: (column, the version's field or None, the version's type
        when it differs from the column's type of now, else None)."""
        plan = self._plans.get(fp)
        if plan is None:
            version = self.catalog.versions[fp]
            field_of = {c: f for f, c in version.column_of().items()}
            plan = []
            for c in self.pg.columns:
                f = field_of.get(c)
                old = version.types.get(c) if f is not None else None
                plan.append(
                    (c, f, old if old is not None and old != self.pg.types.get(c) else None)
                )
            self._plans[fp] = plan
        return plan

    def row(self, key: dict[str, Any], have: RowVersion, pg_row: dict[str, Any]) -> None:
        plan = self.plan(have.fingerprint)
        if any(
            t is not None and f is not None and have.values.get(f) is not None for _, f, t in plan
        ):
            self._pending.append((key, have, pg_row))
            if len(self._pending) >= _CAST_BATCH:
                self.flush()
            return
        self._finish(key, have, pg_row, plan, {})

    def flush(self) -> None:
        """Compare the rows waiting for casts: one cast query per column."""
        from relay.upstream.journal import to_pg_text

        pending, self._pending = self._pending, []
        wanted: dict[str, dict[str, None]] = {}
        for _, have, _ in pending:
            for c, f, t in self.plan(have.fingerprint):
                value = have.values.get(f) if f is not None else None
                if t is not None and value is not None and not (have.unknown and f in have.unknown):
                    text = to_pg_text(t, _json_value(value))
                    if text is not None:
                        wanted.setdefault(c, {})[text] = None
        cast = {c: self.pg.cast(c, list(texts)) for c, texts in wanted.items()}
        for key, have, pg_row in pending:
            self._finish(key, have, pg_row, self.plan(have.fingerprint), cast)

    def _finish(
        self,
        key: dict[str, Any],
        have: RowVersion,
        pg_row: dict[str, Any],
        plan: list[tuple[str, str | None, Any]],
        cast: Mapping[str, Mapping[str, Any]],
    ) -> None:
        from relay.upstream.journal import to_pg_text

        pg = self.pg
        at = format_position(have.position)
        delta: list[ColumnDiff] = []
        for c, f, old_type in plan:
            pg_value = pg_row[c]
            if f is None or (have.unknown and f in have.unknown):
                self.not_carried += 1
                why = (
                    f"its last event, at {at}, used a schema without this column"
                    if f is None
                    else f"its last event, at {at}, left it unchanged as a TOASTed value and "
                    "the log holds no earlier value"
                )
                delta.append(ColumnDiff(c, None, pg.pg_text(c, pg_value), False, why))
                continue
            log_value = have.values.get(f)
            log_text = _text(self.catalog, have.fingerprint, c, _json_value(log_value))
            if old_type is not None and log_value is not None:
                got = cast.get(c, {}).get(to_pg_text(old_type, _json_value(log_value)) or "")
                if got is None or isinstance(got, _CastFailed):
                    why = f"the log's value is no {pg.types[c].describe()}"
                    if got is not None:
                        why += f": {got.message}"
                    delta.append(ColumnDiff(c, log_text, pg.pg_text(c, pg_value), True, why))
                    continue
                log_value = got
            if not _same(log_value, pg_value):
                delta.append(ColumnDiff(c, log_text, pg.pg_text(c, pg_value)))
        if delta:
            self.diffs.append(RowDiff(self.name, "differs", key, delta, at, 1, self.bare))


def _same(a: Any, b: Any) -> bool:
    """Two datums of the same type hold the same value: equal, numbers by value (a
    ``Decimal`` or an unconstrained numeric's text), NaN equal to NaN (as PostgreSQL
    has it), lists and records element by element."""
    if a == b and isinstance(a, bool) == isinstance(b, bool):  # True == 1 is no match
        return True
    if isinstance(a, float) and isinstance(b, float):
        return math.isnan(a) and math.isnan(b)
    if isinstance(a, Decimal | str) and isinstance(b, Decimal | str):
        try:
            x, y = Decimal(a), Decimal(b)
        except ArithmeticError:
            return False
        if x.is_nan() or y.is_nan():
            return x.is_nan() and y.is_nan()
        return x == y
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return False


def _compare_table(
    catalog: LogCatalog,
    state: TableState | None,
    name: str,
    pg: _PgTable,
    counters: dict[str, int],
) -> list[RowDiff]:
    """The differences between the log's rows of a table and PostgreSQL's."""
    compare = _TableCompare(catalog, name, pg)
    key_names = pg.key_columns
    log_rows = dict(state.rows) if state is not None else {}
    left = {k: r.count for k, r in log_rows.items()}  # rows of keyless tables not matched yet
    keyed = bool(pg.codec.key_field_names)
    missing: list[RowDiff] = []
    for kid, pg_row in pg.rows():
        counters["rows"] += 1
        key = {c: _json_value(pg_row[c]) for c in key_names}
        have = log_rows.get(kid)
        if have is not None and not keyed:
            left[kid] -= 1
            if left[kid] <= 0:
                del log_rows[kid]
            continue
        if have is None:
            missing.append(
                RowDiff(
                    name,
                    "missing",
                    key or _short(pg_row),
                    [ColumnDiff(c, None, pg.pg_text(c, pg_row[c]), False) for c in pg.columns],
                )
            )
            continue
        del log_rows[kid]
        compare.row(key, have, pg_row)
    compare.flush()
    counters["not_carried"] += compare.not_carried
    extra: list[RowDiff] = []
    for kid, row in log_rows.items():
        version = catalog.versions[row.fingerprint]
        cells = _named(catalog, row.fingerprint, row.values)
        key = _key_of(version, row.values) if version.key_fields else _short(cells)
        extra.append(
            RowDiff(
                name,
                "extra",
                key,
                [
                    ColumnDiff(c, _text(catalog, row.fingerprint, c, v), None)
                    for c, v in cells.items()
                ],
                format_position(row.position),
                left[kid],
            )
        )
    return missing + extra + compare.diffs


def _short(row: Mapping[str, Any]) -> dict[str, Any]:
    return {c: _json_value(v) for c, v in list(row.items())[:4]}


def verify(
    source: LogSource,
    pg: PgTarget,
    tables: Sequence[str] | None = None,
    *,
    wait_s: float = 60.0,
    rechecks: int = 2,
    progress: Progress | None = None,
    workers: int | None = None,
) -> VerifyReport:
    """Rebuild the captured tables from the log and compare them with PostgreSQL."""
    side: _PgSide | None = None
    probe = _pg_connect(pg)
    try:
        pg_tables = _pg_tables(probe, pg, tables)
        names = [f"{t.schema}.{t.table}" for t in pg_tables]
        catalog = source.catalog()
        in_log = [n for n in names if n in catalog.tables]
        side = _PgSide(pg, source.prefix, pg_tables)
        state = LogState(catalog, in_log)
        reader = LogReader(source, in_log, progress=progress, workers=workers)
        todo = names
        diffs: list[RowDiff] = []
        counters = {"rows": 0, "not_carried": 0}
        rows_compared = not_carried = 0
        attempt = 0
        lsn = 0
        try:
            while True:
                lsn = side.snapshot()
                try:
                    _wait_for_slot(probe, pg, lsn, wait_s)
                    reader.refresh_ends()
                    for ev in reader.events(stop=Bound(position=(lsn - 1, MAX_SEQ))):
                        state.apply(ev)
                    if reader.at_end():
                        state.finish()
                    counters["rows"] = counters["not_carried"] = 0
                    found: list[RowDiff] = []
                    for name in todo:
                        found += _compare_table(
                            catalog, state.tables.get(name), name, side.table(name), counters
                        )
                finally:
                    side.end()
                if attempt == 0:
                    rows_compared = counters["rows"]
                    not_carried = counters["not_carried"]
                diffs = [d for d in diffs if d.table not in todo] + found
                if not found or attempt >= rechecks:
                    break
                attempt += 1
                todo = sorted({d.table for d in found})
                log.info("verify: %d differences in %s; checking them again", len(found), todo)
            stats = reader.stats
            partitions = reader.read_to()
        finally:
            reader.close()
        return VerifyReport(
            names,
            rows_compared,
            lsn,
            diffs,
            stats,
            attempt,
            not_carried,
            [n for n in names if n not in catalog.tables],
            partitions,
        )
    finally:
        if side is not None:
            side.close()
        probe.close()


def render_diff(report: VerifyReport, max_rows: int = 20) -> str:
    """The differences, readable: per table a count line, then up to ``max_rows`` rows."""
    out = io.StringIO()
    by_table: dict[str, list[RowDiff]] = {}
    for d in report.diffs:
        by_table.setdefault(d.table, []).append(d)
    for table, diffs in sorted(by_table.items()):
        counts = {
            k: sum(d.count for d in diffs if d.kind == k) for k in ("missing", "extra", "differs")
        }
        out.write(
            f"{table}: {counts['missing']} missing from the log, {counts['extra']} only in the log, "
            f"{counts['differs']} different\n"
        )
        for d in diffs[:max_rows]:
            key = ", ".join(f"{k}={_short_text(v)}" for k, v in d.key.items())
            if d.kind == "missing":
                out.write(f"  missing  {key}: in PostgreSQL, not in the log\n")
            elif d.kind == "extra":
                times = f" ({d.count} rows)" if d.count > 1 else ""
                out.write(
                    f"  extra    {key}: in the log (last written at {d.log_position}), "
                    f"not in PostgreSQL{times}\n"
                )
            else:
                out.write(f"  differs  {key} (log as of {d.log_position}):\n")
                for cd in d.columns:
                    q = cd.column not in d.bare or cd.reason is not None
                    pg_text = f"PostgreSQL {_short_text(cd.postgres, q)}"
                    if not cd.in_log:
                        out.write(
                            f"             {cd.column}: not in the log for this row "
                            f"({cd.reason}); {pg_text}\n"
                        )
                        continue
                    why = f" ({cd.reason})" if cd.reason else ""
                    out.write(
                        f"             {cd.column}: log {_short_text(cd.log, q)}{why}, {pg_text}\n"
                    )
        if len(diffs) > max_rows:
            out.write(f"  … {len(diffs) - max_rows} more\n")
    return out.getvalue()


_BARE_KINDS: Final = frozenset({"bool", "int", "float", "decimal", "numeric"})


def _short_text(value: Any, quote: bool = True, limit: int = 60) -> str:
    if value is None:
        return "NULL"
    text = value if isinstance(value, str) else json.dumps(value)
    text = repr(text) if isinstance(value, str) and quote else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_csv(path: Path) -> list[dict[str, str | None]]:
    """Rows of a CSV file written here; an empty unquoted field is NULL (None)."""
    with path.open(encoding="utf-8", newline="") as fh:
        text = fh.read()
    records: list[list[str | None]] = []
    fields: list[str | None] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == '"':
            j, parts = i + 1, []
            while True:
                k = text.index('"', j)
                parts.append(text[j:k])
                if text.startswith('"', k + 1):
                    parts.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            fields.append("".join(parts))
        else:
            k = i
            while k < n and text[k] not in ",\r\n":
                k += 1
            fields.append(text[i:k] or None)
            i = k
        if text.startswith(",", i):
            i += 1
            continue
        records.append(fields)
        fields = []
        i += 2 if text.startswith("\r\n", i) else 1
    if not records:
        return []
    header = [h or "" for h in records[0]]
    return [dict(zip(header, r, strict=True)) for r in records[1:]]
