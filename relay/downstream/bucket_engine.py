"""The bucket engine: change topics in Kafka → per-bucket op logs in the bucket store.

Data path::

    {prefix}.{schema}.{table} ──poll──▶ position header ──▶ Avro decode ──▶ RowChange
        ──batch──▶ store.apply(rules, changes, progress)   (one PostgreSQL transaction)

Choices:

- **Offsets live in the store, not in Kafka.**  The engine assigns itself every partition of
  the change topics of the tables the rules place (manual assignment, no consumer-group
  coordination) and records, in the same transaction as the ops, each partition's next
  offset and highest applied position (``consumer_progress``).  A crash anywhere therefore
  neither loses nor doubles anything: at start-up the engine seeks to the offsets the store
  committed.  (Kafka consumer groups would add rebalancing, and offsets committed to Kafka
  could only be committed *after* the store's commit, leaving a window for re-delivery;
  with tansu, groups also form slowly.)  Kafka's own committed offsets are not used.
- **Shares: one engine per share of the partitions.**  With ``shares`` = N, share ``s``
  consumes partition ``p`` of every change topic when ``p mod N = s`` (N = 1: one share,
  every partition).  Several relay processes may run the engine; for each share the first
  to take its PostgreSQL advisory lock (:meth:`PgBucketStore.acquire_leadership`, keyed by
  group and share) leads it, the others stand by and retry every few seconds; a process
  leads one share at a time, a fixed one (``share``) or the first free one (``share`` None).
  The lock is tied to the connection the leader writes with, so a leader that lost it
  cannot write any more.  All the events of one row key are in one partition, so one share
  applies them in order; a key change or a truncate involves rows of other partitions, which
  the store's per-row positions, tombstones and truncate positions keep right whatever the
  shares' relative progress (see relay/downstream/pg_bucket_store.py).  Only the leader of
  share 0 runs the maintenance (compaction; tombstones are purged only below the applied
  position of every partition that still holds events to apply).
- **Dedup.**  Events at or below their partition's applied position are skipped from the
  Kafka header alone, without decoding (re-sent duplicates, see docs/cdc.md); the store
  additionally ignores events at or below their row's or table's last applied position.
- **Order.**  Records of one partition arrive in position order; a batch gathered from
  several partitions is sorted by position before it is applied.  Across partitions the
  store's per-row positions, tombstones and per-table truncate positions keep the result
  right when one partition runs ahead of another (key changes, truncates).
- **Schemas** come from ``{prefix}._schemas`` (read at start, re-read when an unknown
  fingerprint shows up; the cdc daemon commits a schema in the same Kafka transaction as
  the first event using it).  Avro field names are mapped back to column names
  (``pg.name``), so rules always see PostgreSQL column names.
- **Unchanged TOAST values** the store holds no copy of (a row entering a bucket) are read
  by key from the captured database, ``source_rows`` (relay/downstream/unchanged_fill.py),
  in one read per table and batch; without it such changes are skipped with an error.

Threading: :meth:`BucketEngine.run` runs in one thread and starts one reader thread
(relay/downstream/engine_reader.py), the only user of the Kafka consumers, which polls,
dedups by header, decodes (relay/downstream/event_decoder.py) and hands batches over a
queue of two; the calling thread applies them to the store.  So reading and
decoding batch *n+1* overlaps with the store's transaction for batch *n* (the GIL is
released while PostgreSQL works).  :meth:`BucketEngine.request_stop` may be called from
any thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

from core.avro_envelope import SchemaRegistry
from core.kafka_options import build_client, is_kafka_error
from core.topic_names import change_topic_of
from relay.downstream.bucket_store import PartitionProgress, Position, RowChange
from relay.downstream.columns_guard import ColumnsGuard
from relay.downstream.engine_reader import ChangeReader, EngineStats, Idle
from relay.downstream.event_decoder import EventDecoder, schema_key, stale_keys
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.rules import Rules
from relay.downstream.unchanged_fill import SourceRows
from relay.errors import BrokerUnavailable, EngineError, LeadershipLost, StoreError
from relay.kafka_offsets import partition_lag
from relay.metrics import OPS_WRITTEN, ConsumerLag

__all__ = ["BucketEngine", "SchemaLog"]

log = logging.getLogger(__name__)

FETCH_MAX_WAIT_MS = 50
"""How long the broker may hold an empty fetch (engine, applier, outcome feed)."""


# --------------------------------------------------------------------------- schemas


class SchemaLog:
    """The schemas of ``{prefix}._schemas``, read incrementally into a SchemaRegistry.

    ``keys``: each table's latest key columns (its last key schema in the log).  With
    ``rules``, a table whose latest key differs from the key the rules were loaded with (its
    primary key changed while this relay runs) is logged as a warning, once per key."""

    def __init__(self, kafka: Mapping[str, Any], prefix: str, rules: Rules | None = None) -> None:
        from kafka import KafkaConsumer

        self.topic = f"{prefix}._schemas"
        self.registry = SchemaRegistry()
        self.texts: list[str] = []
        self.keys: dict[str, tuple[str, ...]] = {}
        self._rules = rules
        self._warned: set[tuple[str, tuple[str, ...]]] = set()
        self._consumer = build_client(
            KafkaConsumer, **kafka, enable_auto_commit=False, isolation_level="read_committed"
        )
        self._assigned = False

    def refresh(self, timeout: float = 10.0) -> int:
        """Read every schema committed so far; returns how many were new."""
        from kafka import TopicPartition

        deadline = time.monotonic() + timeout
        if not self._assigned:
            parts = self._consumer.partitions_for_topic(self.topic)
            if not parts:
                return 0
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            self._consumer.assign(tps)
            self._consumer.seek_to_beginning(*tps)
            self._assigned = True
        tps = list(self._consumer.assignment())
        ends = self._consumer.end_offsets(tps)
        added = 0
        while time.monotonic() < deadline and any(
            self._consumer.position(tp) < ends[tp] for tp in tps
        ):
            for records in self._consumer.poll(timeout_ms=200).values():
                for r in records:
                    if r.value:
                        text = r.value.decode("utf-8")
                        fp = self.registry.add(text)
                        self.texts.append(text)
                        found = schema_key(json.loads(text))
                        if found is not None:
                            self.keys[found[0]] = found[1]
                        added += 1 if fp else 0
        if added and self._rules is not None:
            self._warn_stale_keys(self._rules)
        return added

    def _warn_stale_keys(self, rules: Rules) -> None:
        for table, (loaded, latest) in stale_keys(self.keys, rules).items():
            if (table, latest) not in self._warned:
                self._warned.add((table, latest))
                log.warning(
                    "bucket engine: %s's primary key is now (%s), this relay loaded (%s): "
                    "its rows are named by the new key while /v1/schema lists the old one, "
                    "and devices refuse them (KeyMismatch) until /v1/schema follows (within "
                    "relay.schema_check_interval_s; with 0, when the relay restarts)",
                    table,
                    ", ".join(latest),
                    ", ".join(loaded),
                )

    def close(self) -> None:
        self._consumer.close()


# --------------------------------------------------------------------------- the engine


def change_topics(prefix: str, tables: Iterable[str]) -> dict[str, str]:
    """The change topic of each of ``tables`` (``schema.table``) → the table: what the
    engine consumes for the tables the rules place."""
    return {change_topic_of(prefix, table): table for table in sorted(tables)}


class BucketEngine:
    """Consumes the change topics of the tables ``rules`` places into ``store``.

    ``kafka``: kafka-python client arguments (bootstrap servers, security), e.g.
    :meth:`relay.settings.RelaySettings.kafka_client_kwargs`.
    """

    def __init__(
        self,
        store: PgBucketStore,
        rules: Rules,
        *,
        kafka: Mapping[str, Any],
        prefix: str,
        batch_max_events: int = 5000,
        batch_max_ms: int = 50,
        topic_refresh_s: float = 10.0,
        compact_interval_s: float = 300.0,
        standby_retry_s: float = 2.0,
        schema_wait_s: float = 30.0,
        shares: int = 1,
        share: int | None = None,
        source_rows: SourceRows | None = None,
    ) -> None:
        if shares < 1 or (share is not None and not 0 <= share < shares):
            raise EngineError(f"engine share {share} is not one of 0..{shares - 1}")
        self.store = store
        self.rules = rules
        self.kafka = dict(kafka)
        self.prefix = prefix
        self.batch_max_events = batch_max_events
        self.batch_max_ms = batch_max_ms
        self.topic_refresh_s = topic_refresh_s
        self.compact_interval_s = compact_interval_s
        self.standby_retry_s = standby_retry_s
        self.schema_wait_s = schema_wait_s
        self.shares = shares
        self.share = share
        self.source_rows = source_rows  # unchanged TOAST values the store has no copy of
        self.led_share: int | None = None
        self.stats = EngineStats()
        self.lag = ConsumerLag()
        self.leading = threading.Event()
        self._stop = threading.Event()
        self._consumer: Any = None
        self._schemas: SchemaLog | None = None
        self._reader: ChangeReader | None = None
        self._progress: dict[tuple[str, int], PartitionProgress] = {}
        self._topics = change_topics(prefix, rules.tables)
        self._caught_up: Position | None = None
        self._idle_at_end = False
        self.columns_guard = ColumnsGuard(None)  # relay/server.py gives it its question

    # ---- lifecycle

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Migrate the store, then lead (consume and apply) or stand by, until stopped.

        A lost store connection (PostgreSQL restarted or unreachable: psycopg's
        ``OperationalError``, e.g. ``AdminShutdown``), a store or engine error and a Kafka
        error end the current term; the engine retries with a backoff, migration included,
        so a PostgreSQL restart never stops the relay's engine for good."""
        import psycopg

        backoff = 0.5
        migrated = False
        while not self._stop.is_set():
            try:
                if not migrated:
                    self.store.migrate()
                    migrated = True
                if not self.acquire():
                    self._stop.wait(self.standby_retry_s)
                    continue
                log.info(
                    "bucket engine: leading (group %s, share %s of %d)",
                    self.store.group,
                    self.led_share,
                    self.shares,
                )
                self.leading.set()
                self._lead()
                backoff = 0.5
            except (StoreError, EngineError, LeadershipLost, psycopg.OperationalError) as exc:
                log.error("bucket engine: %s; retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception as exc:
                if not is_kafka_error(exc):
                    raise
                log.error("bucket engine: Kafka: %s; retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                self.leading.clear()
                self._close_consumers()
                if self._stop.is_set():
                    with contextlib.suppress(StoreError, psycopg.OperationalError):
                        self.store.release_leadership()

    def acquire(self) -> bool:
        """Take the lock of this engine's share, or of the first free share (``share`` None);
        True when this engine leads one (:attr:`led_share`)."""
        candidates = range(self.shares) if self.share is None else (self.share,)
        if self.led_share is not None and self.store.is_leader:
            candidates = (self.led_share,)  # still held: keep it
        for share in candidates:
            if self.store.acquire_leadership(share):
                self.led_share = share
                return True
        self.led_share = None
        return False

    def _owns(self, partition: int) -> bool:
        return partition % self.shares == (self.led_share or 0)

    def _lead(self) -> None:
        self._open()
        last_compact = time.monotonic()
        while not self._stop.is_set():
            self.step()
            if (
                self.compact_interval_s
                and not self.led_share
                and time.monotonic() - last_compact > self.compact_interval_s
            ):
                self.maintain()
                last_compact = time.monotonic()

    def open(self) -> None:
        """Connect to Kafka, load the offsets from the store and start the reader thread
        (done by :meth:`step` when needed)."""
        self._open()

    def _open(self) -> None:
        from kafka import KafkaConsumer

        self._close_consumers()
        self._progress = {tp: p for tp, p in self.store.load_offsets().items() if self._owns(tp[1])}
        self.lag.start({tp: p.next_offset for tp, p in self._progress.items()})
        self._schemas = SchemaLog(self.kafka, self.prefix, self.rules)
        self._schemas.refresh()
        self._consumer = build_client(
            KafkaConsumer,
            **self.kafka,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            max_poll_records=self.batch_max_events,
            # the broker answers an empty fetch after this long: it bounds how late a change
            # that arrives on an idle topic is seen (kafka-python's default is 500 ms)
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        self._reader = ChangeReader(
            self._consumer,
            self._schemas,
            EventDecoder(self._schemas.registry, self.rules),
            topics=self._topics,
            committed=self._progress,
            stats=self.stats,
            batch_max_events=self.batch_max_events,
            batch_max_ms=self.batch_max_ms,
            topic_refresh_s=self.topic_refresh_s,
            schema_wait_s=self.schema_wait_s,
            owns=self._owns,
        )
        self._reader.start()

    def _close_consumers(self) -> None:
        self.lag.stop()
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception as exc:  # closing must not hide the original problem
                log.debug("closing the Kafka consumer: %s", exc)
            self._consumer = None
        if self._schemas is not None:
            try:
                self._schemas.close()
            except Exception as exc:
                log.debug("closing the schema consumer: %s", exc)
            self._schemas = None

    def close(self) -> None:
        self._close_consumers()

    # ---- work

    def step(self, timeout: float = 1.0) -> int:
        """Apply the next batch the reader thread has prepared (waiting up to ``timeout``
        seconds); returns the number of records it covered (0 when the reader found nothing
        new).  Reading, decoding and the next batch's preparation overlap with the store's
        transaction."""
        if self._reader is None:
            self._open()
        assert self._reader is not None
        item = self._reader.next(timeout)
        if item is None:
            return 0
        if isinstance(item, Idle):
            self._idle_at_end = item.at_end
            if item.at_end:
                self._caught_up = item.position
                self.lag.at_end(item.ends)
            return 0
        self._idle_at_end = False
        changes = item.changes
        self.columns_guard.check(changes)
        self.lag.received(_commit_s(changes[0]) if changes else None)
        t0 = time.perf_counter()
        result = self.store.apply(self.rules, changes, item.progress, self.source_rows)
        self.stats.applied(item, result, time.perf_counter() - t0)
        self._progress.update(item.progress)
        OPS_WRITTEN.inc(result.ops)
        self.lag.saw_ends(self._reader.ends)
        self.lag.applied(
            {tp: p.next_offset for tp, p in item.progress.items()},
            _commit_s(changes[-1]) if changes else None,
        )
        return item.records

    def maintain(self) -> None:
        """Compact the bucket logs and purge old tombstones (run by the leader)."""
        t0 = time.monotonic()
        result = self.store.compact()
        purged = 0
        below = self._purge_bound()
        if below is not None and below > (0, 0):
            purged = self.store.purge_tombstones(below)
        log.info(
            "bucket engine: compacted %d buckets (%d ops), purged %d tombstones in %.1fs",
            result.buckets,
            result.ops_deleted,
            purged,
            time.monotonic() - t0,
        )

    def _purge_bound(self) -> Position | None:
        """Below which position no event can still arrive for a tombstoned row: with one
        share, where every partition was last seen at its end; with several, also no
        higher than any other share's partition was applied (every partition of every
        consumed topic must have applied something)."""
        if self._caught_up is None or self.shares == 1:
            return self._caught_up
        if self._reader is None:
            return None
        applied = self.store.load_offsets()
        partitions = dict(self._reader.partitions)
        return purge_bound(self._caught_up, applied, partitions, self._settled(applied, partitions))

    def _settled(
        self, applied: Mapping[tuple[str, int], PartitionProgress], partitions: Mapping[str, int]
    ) -> frozenset[tuple[str, int]]:
        """The partitions holding no committed event beyond what was applied of them (the
        empty ones included), by a probe of the broker (relay/kafka_offsets.py); none when
        the broker cannot be read.  Such a partition's next events come in Kafka
        transactions not committed yet, at positions above every one read so far."""
        try:
            lag = partition_lag(
                self.kafka,
                sorted(partitions),
                {tp: p.next_offset for tp, p in applied.items()},
                timeout_s=10.0,
            )
        except BrokerUnavailable as exc:
            log.warning("bucket engine: no tombstone purge past idle partitions: %s", exc)
            return frozenset()
        return frozenset((p.topic, p.partition) for p in lag.partitions if p.records == 0)

    def run_until_idle(self, timeout: float = 60.0, idle_polls: int = 2) -> EngineStats:
        """Lead (without waiting) and consume until every partition is at its end (seen
        ``idle_polls`` times in a row) or ``timeout``; for tests, benchmarks and batch runs."""
        self.store.migrate()
        if not self.acquire():
            raise EngineError(
                f"another engine of group {self.store.group!r} leads "
                + ("every share" if self.share is None else f"share {self.share}")
            )
        if self._reader is None:
            self._open()
        deadline = time.monotonic() + timeout
        quiet = 0
        while time.monotonic() < deadline and quiet < idle_polls:
            if self.step(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                quiet = 0
            elif self._idle_at_end:
                quiet += 1
        return self.stats


def purge_bound(
    caught_up: Position,
    applied: Mapping[tuple[str, int], PartitionProgress],
    partitions: Mapping[str, int],
    settled: AbstractSet[tuple[str, int]] = frozenset(),
) -> Position | None:
    """The tombstone purge bound of a share caught up to ``caught_up`` when the other
    shares have ``applied`` (per partition) of the topics' ``partitions`` (topic → count):
    the lowest of them, None while some partition has applied nothing yet.  A ``settled``
    partition (nothing committed in it waits to be applied: empty, or applied to its end)
    does not count: its next events are committed later, above every position read."""
    bound = caught_up
    for topic, count in partitions.items():
        for part in range(count):
            if (topic, part) in settled:
                continue
            done = applied.get((topic, part))
            if done is None or done.position <= (0, 0):
                return None
            bound = min(bound, done.position)
    return bound


def _commit_s(change: RowChange) -> float | None:
    """The commit time of a change in seconds since the epoch (None when not sent)."""
    return change.commit_ts_us / 1e6 if change.commit_ts_us is not None else None
