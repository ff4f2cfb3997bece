"""The upstream applier's Kafka side: consume ``{prefix}._journal``, publish outcomes.

:class:`Applier` leads or stands by (the session advisory lock of its
:class:`~relay.upstream.applier_db.ApplierDb`: one applier per database, consumer name
and shard), and while leading:

- a reader thread (:class:`_Reader`) owns the Kafka consumer of ``_journal``: the
  shard's partitions (*p* mod K = *i*), assigned as they appear and started at the
  offsets stored in PostgreSQL (manual assignment; Kafka's committed offsets are never
  used), polling ahead into a bounded queue so fetching overlaps with database work;
- :meth:`Applier.step` hands what was fetched to :meth:`ApplierDb.apply` (runs of one
  device per transaction, exactly once: :mod:`relay.upstream.applier_runs`), then
  publishes the outbox;
- **outcomes** are put in ``fieldsync_applier.outbox`` in each run's transaction; after
  the commit the leader publishes the outbox to ``{prefix}._outcomes`` (keyed by
  device; in id order) and deletes what Kafka acknowledged.  A crash in between
  publishes those outcomes again: consumers keep the latest outcome per
  ``(device_id, seq)``.

Failures: the database's or Kafka's make the applier back off (0.5 s doubling to 30 s)
and start over from the stored offsets, rejecting nothing; an invalid configuration
(:class:`~relay.errors.ConfigError`) ends :meth:`Applier.run`.

Lag: while leading, :attr:`Applier.lag` (:class:`relay.metrics.ConsumerLag`) follows the
offsets applied, the partitions' end offsets the reader fetched and the Kafka timestamp
(intake time) of the last applied record; entries set aside for a lock are not applied (the
lag counts from the first of each partition and the intake time of the oldest);
``fieldsync_applier_lag_*`` read it when scraped.

Threading: :meth:`Applier.run` in one thread; :meth:`Applier.request_stop` from any.
The reader thread hands records and its error to the applier thread through a queue.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from core.kafka_options import build_client, is_kafka_error
from relay.downstream.bucket_engine import FETCH_MAX_WAIT_MS
from relay.errors import ApplierError, ConfigError
from relay.metrics import ConsumerLag, Partition
from relay.upstream.applier_db import ApplierDb
from relay.upstream.applier_run import ApplyStats
from relay.upstream.applier_store import Delivery
from relay.upstream.intake import journal_topic, outcomes_topic
from relay.upstream.outcome_records import fit_outcome_records

__all__ = ["Applier", "ensure_journal_topics"]

log = logging.getLogger(__name__)

ENDS_REFRESH_S = 5.0
"""While busy, the reader fetches the partitions' end offsets this often (for the lag)."""


def _event_s(where: Delivery) -> float | None:
    """A journal record's Kafka timestamp (the intake's send time) in epoch seconds."""
    return where.timestamp_ms / 1000 if where.timestamp_ms is not None else None


def _next_offsets(deliveries: Sequence[tuple[Delivery, bytes | None]]) -> dict[Partition, int]:
    """Per partition, the offset after the last of ``deliveries``."""
    out: dict[Partition, int] = {}
    for where, _ in deliveries:
        tp = (where.topic, where.partition)
        out[tp] = max(out.get(tp, 0), where.offset + 1)
    return out


def ensure_journal_topics(kafka: Mapping[str, Any], topics: Sequence[str], partitions: int) -> None:
    """Create ``topics`` (``_journal`` and ``_outcomes``) with ``partitions`` partitions if
    missing; another process creating them at the same moment is fine."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = build_client(KafkaAdminClient, **kafka)
    try:
        missing = [t for t in topics if t not in set(admin.list_topics())]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([NewTopic(t, partitions, 1) for t in missing])
    finally:
        admin.close()


class Applier:
    """Consumes ``{prefix}._journal`` into ``db`` and publishes outcomes to
    ``{prefix}._outcomes``.  ``kafka``: kafka-python client arguments (e.g.
    :meth:`relay.settings.RelaySettings.kafka_client_kwargs`)."""

    def __init__(
        self,
        db: ApplierDb,
        *,
        kafka: Mapping[str, Any],
        prefix: str,
        batch_max_entries: int = 500,
        batch_max_ms: int = 50,
        topic_partitions: int = 4,
        standby_retry_s: float = 2.0,
        topic_refresh_s: float = 10.0,
    ) -> None:
        self.db = db
        self.kafka = dict(kafka)
        self.journal_topic = journal_topic(prefix)
        self.outcomes_topic = outcomes_topic(prefix)
        self.batch_max_entries = batch_max_entries
        self.poll_max = 4 * batch_max_entries  # several devices' runs per poll
        self.batch_max_ms = batch_max_ms
        self.topic_partitions = topic_partitions
        self.standby_retry_s = standby_retry_s
        self.topic_refresh_s = topic_refresh_s
        self.leading = threading.Event()
        self.lag = ConsumerLag()
        self._stop = threading.Event()
        self._reader: _Reader | None = None
        self._producer: Any = None
        self._last_take = 0.0

    @property
    def stats(self) -> ApplyStats:
        return self.db.stats

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Lead (consume, apply, publish) or stand by, until :meth:`request_stop`."""
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._start()
                if not self.db.acquire_leadership():
                    self.db.close()
                    self._stop.wait(self.standby_retry_s)
                    continue
                log.info("applier: leading (consumer %s)", self.db.consumer)
                self.leading.set()
                self._open()
                while not self._stop.is_set():
                    self.step()
                backoff = 0.5
            except ConfigError:
                raise
            except (ApplierError, psycopg.Error) as exc:
                self.db.stats.failures += 1
                log.error("applier: %s; retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception as exc:
                if not is_kafka_error(exc):
                    raise
                self.db.stats.failures += 1
                log.error("applier: Kafka: %s; retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                self.leading.clear()
                self._close_clients()
                if self._stop.is_set():
                    self.db.release_leadership()
                self.db.close()

    def _start(self) -> None:
        self.db.connect()
        self.db.migrate()

    def ensure_topics(self) -> None:
        ensure_journal_topics(
            self.kafka, (self.journal_topic, self.outcomes_topic), self.topic_partitions
        )

    def _open(self) -> None:
        from kafka import KafkaProducer

        self._close_clients()
        self.ensure_topics()
        self._producer = build_client(KafkaProducer, **self.kafka, acks="all", linger_ms=5)
        offsets = self.db.load_offsets(self.journal_topic)
        self.db.runs.waits.forget()  # read again from the stored offsets, below them
        self.lag.start({(self.journal_topic, p): o for p, o in offsets.items()})
        self._reader = _Reader(
            self.kafka,
            self.journal_topic,
            self.db.shard,
            self.db.shards,
            offsets,
            self.poll_max,
            self.topic_refresh_s,
        )
        self._reader.start()
        self._last_take = time.monotonic()
        self.publish_outbox()

    @property
    def partitions(self) -> frozenset[int]:
        """The ``_journal`` partitions this applier consumes (its shard's)."""
        return frozenset(self._reader.partitions) if self._reader is not None else frozenset()

    def _close_clients(self) -> None:
        self.lag.stop()
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        if self._producer is not None:
            try:
                self._producer.close()
            except Exception as exc:  # closing must not hide the original problem
                log.debug("closing the Kafka producer: %s", exc)
            self._producer = None

    def step(self) -> int:
        """Apply what the reader fetched (up to ``4 * batch_max_entries`` records, waiting
        at most ``batch_max_ms`` for the first), publish the outbox; returns the number of
        records applied."""
        assert self._reader is not None
        deliveries = self._reader.take(max(self.batch_max_ms, 1) / 1000)
        if deliveries:
            self._last_take = time.monotonic()
            self.lag.received(_event_s(deliveries[0][0]))
            self.db.apply(deliveries, self.batch_max_entries)
            self.lag.saw_ends(self._reader.ends)
            self.lag.applied(_next_offsets(deliveries), _event_s(deliveries[-1][0]))
        elif self.db.runs.waiting_due():  # entries set aside for a lock, nothing new
            self.db.apply([], self.batch_max_entries)
        elif self._at_end():
            self.lag.at_end(self._reader.idle_ends)
        self._lag_of_waiting()
        self.publish_outbox()
        return len(deliveries)

    def _lag_of_waiting(self) -> None:
        """Entries set aside for a lock are not applied: the lag counts from the first of
        each partition, and from the intake time of the oldest."""
        waiting = self.db.runs.waits.items()
        if not waiting:
            return
        first: dict[Partition, int] = {}
        oldest: float | None = None
        for item in waiting:
            tp = (item.where.topic, item.where.partition)
            first[tp] = min(first.get(tp, item.where.offset), item.where.offset)
            at = _event_s(item.where)
            if at is not None and (oldest is None or at < oldest):
                oldest = at
        self.lag.held_back(first, oldest)

    def publish_outbox(self) -> int:
        """Send the outbox to ``_outcomes`` in id order; delete what Kafka acknowledged."""
        total = 0
        while True:
            rows = self.db.pending_outbox()
            if not rows:
                return total
            for _id, device, payload in rows:
                # a record too large for Kafka would be refused at every try: split, in order
                for record in fit_outcome_records(payload):
                    self._producer.send(
                        self.outcomes_topic, key=device.encode("utf-8"), value=record
                    )
            self._producer.flush(timeout=60)
            self.db.delete_outbox([i for i, _, _ in rows])
            total += len(rows)
            self.db.stats.published += len(rows)

    def run_until_idle(self, timeout: float = 60.0, idle_polls: int = 2) -> ApplyStats:
        """Lead and consume until every partition is at its end ``idle_polls`` times in a
        row, or ``timeout``; for tests, benchmarks and batch runs."""
        if self.db.conn is None:
            self._start()
        if not self.db.acquire_leadership():
            raise ApplierError(f"another applier of consumer {self.db.consumer!r} is running")
        if self._reader is None:
            self._open()
        self._last_take = time.monotonic()  # only an end seen from now on counts
        deadline = time.monotonic() + timeout
        quiet = 0
        while time.monotonic() < deadline and quiet < idle_polls:
            if self.step():
                quiet = 0
            elif self._at_end():
                quiet += 1
        return self.stats

    def _at_end(self) -> bool:
        """Nothing queued, and the reader found every partition at its end after the
        last batch was taken."""
        reader = self._reader
        return reader is not None and reader.empty() and reader.idle_since > self._last_take

    def close(self) -> None:
        self._close_clients()
        self.db.release_leadership()
        self.db.close()


class _Reader(threading.Thread):
    """Owns the Kafka consumer of ``_journal`` and polls ahead into a bounded queue, so
    fetching overlaps with the applier's database work.

    Partitions of the shard are assigned as they appear (checked every ``refresh_s``)
    and start at ``offsets`` (the stored ones; else at the beginning).  An error ends
    the thread and is raised by the next :meth:`take`.  ``idle_since`` is the time of
    the latest poll that found nothing and every partition at its end, ``idle_ends``
    the end offsets then; ``ends`` the end offsets last fetched (when idle, and every
    :data:`ENDS_REFRESH_S` while busy).
    """

    def __init__(
        self,
        kafka: Mapping[str, Any],
        topic: str,
        shard: int,
        shards: int,
        offsets: Mapping[int, int],
        poll_max: int,
        refresh_s: float,
    ) -> None:
        super().__init__(name=f"applier-reader-{topic}", daemon=True)
        self.kafka = dict(kafka)
        self.topic = topic
        self.shard, self.shards = shard, shards
        self.offsets = dict(offsets)
        self.poll_max = poll_max
        self.refresh_s = refresh_s
        self.partitions: set[int] = set()
        self.idle_since = 0.0
        self.ends: Mapping[Partition, int] = {}
        self.idle_ends: Mapping[Partition, int] = {}
        self._ends_at = 0.0
        self.error: BaseException | None = None
        self._queue: queue.Queue[list[tuple[Delivery, bytes | None]]] = queue.Queue(maxsize=4)
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)

    def empty(self) -> bool:
        return self._queue.empty()

    def take(self, wait_s: float) -> list[tuple[Delivery, bytes | None]]:
        """Queued records, oldest first, at most about ``poll_max`` (waiting up to
        ``wait_s`` for the first batch)."""
        try:
            out = self._queue.get(timeout=wait_s)
        except queue.Empty:
            out = []
        if not out:
            if self.error is not None:
                raise self.error
            if not self.is_alive() and not self._stopping.is_set():
                raise ApplierError("the Kafka reader thread stopped")
            return out
        while len(out) < self.poll_max:
            try:
                out.extend(self._queue.get_nowait())
            except queue.Empty:
                break
        return out

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # handed to the applier thread
            self.error = exc

    def _loop(self) -> None:
        from kafka import KafkaConsumer

        consumer = build_client(
            KafkaConsumer,
            **self.kafka,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            max_poll_records=self.poll_max,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,  # an idle journal is seen within 50 ms
        )
        try:
            refreshed = 0.0
            while not self._stopping.is_set():
                if time.monotonic() - refreshed > self.refresh_s or not self.partitions:
                    self._assign(consumer)
                    refreshed = time.monotonic()
                polled = consumer.poll(timeout_ms=100, max_records=self.poll_max)
                batch = [
                    (Delivery(r.topic, r.partition, r.offset, r.timestamp), r.value)
                    for tp in sorted(polled, key=lambda t: t.partition)
                    for r in polled[tp]
                ]
                if batch:
                    self._put(batch)
                    if time.monotonic() - self._ends_at > ENDS_REFRESH_S:
                        self._end_offsets(consumer)
                elif self._at_end(consumer):
                    self.idle_ends = self.ends
                    self.idle_since = time.monotonic()
        finally:
            consumer.close()

    def _put(self, batch: list[tuple[Delivery, bytes | None]]) -> None:
        while not self._stopping.is_set():
            try:
                self._queue.put(batch, timeout=0.1)
                return
            except queue.Full:
                continue

    def _assign(self, consumer: Any) -> None:
        from kafka import TopicPartition

        parts = {
            p
            for p in consumer.partitions_for_topic(self.topic) or ()
            if p % self.shards == self.shard
        }
        new = sorted(parts - self.partitions)
        if not new:
            return
        consumer.assign([TopicPartition(self.topic, p) for p in sorted(self.partitions | set(new))])
        for p in new:
            tp = TopicPartition(self.topic, p)
            if p in self.offsets:
                consumer.seek(tp, self.offsets[p])
            else:
                consumer.seek_to_beginning(tp)
        self.partitions.update(new)

    def _at_end(self, consumer: Any) -> bool:
        tps = list(consumer.assignment())
        if not tps:
            return True
        ends = self._end_offsets(consumer)
        return all(consumer.position(tp) >= ends[(tp.topic, tp.partition)] for tp in tps)

    def _end_offsets(self, consumer: Any) -> Mapping[Partition, int]:
        """Fetch the assigned partitions' end offsets into :attr:`ends` (a new dict)."""
        ends = consumer.end_offsets(list(consumer.assignment()))
        self.ends = {(tp.topic, tp.partition): end for tp, end in ends.items()}
        self._ends_at = time.monotonic()
        return self.ends
