"""Kafka side of cdc: a transactional sink and the resume position.

Protocol
--------
Events are written inside Kafka transactions (``transactional_id`` derived from
the slot, so a restarted daemon fences its predecessor and Kafka aborts whatever
that one left open).  Each Kafka transaction ends with one record in the
compacted state topic ``{prefix}._cdc_state``, keyed by the slot name, holding
the last position written: ``{"commit_lsn", "seq", "complete"}``.  Because that
record commits atomically with the events, reading it back at start-up tells
exactly which events Kafka already holds, so nothing is written twice even when
the replication slot (which is confirmed only after the Kafka commit) replays
transactions Kafka already has.

The state record is sent only once the broker has acknowledged every event
(and schema) of its Kafka transaction.  So whatever a broker makes of a
transaction its producer left open (Apache Kafka aborts it; tansu commits it,
records and all), the resume position never claims an event the broker does not
hold: the worst case is events without their resume position, which the next
daemon writes again at the same positions (duplicates consumers drop), never a
resume position past missing events.

Schemas go to the compacted ``{prefix}._schemas`` topic keyed by fingerprint,
inside the same transaction as the first event that uses them.

Records: change events are not given to ``KafkaProducer.send`` one by one
(tens of microseconds each); the sink appends them to one
:class:`cdc.kafka_records.RecordBuffer` per partition (kafka's default
partitioner: murmur2 of the key) and hands each buffer to kafka-python's
accumulator as one finished batch when it reaches ``BATCH_BYTES`` and at
commit.  kafka-python's sender still stamps producer id, epoch and sequence,
compresses, checksums, adds the partition to the transaction and retries.  This
uses kafka-python internals, checked once at start-up
(:func:`_bulk_path_available`); where they differ, every record goes through
``send()`` as before.  Schemas and the resume position always use ``send()``.

Concurrency: one thread (the pipeline's) calls the sink; kafka-python's sender
thread does the network I/O.  ``commit()`` blocks until the broker has
acknowledged every record and the transaction marker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from kafka import TopicPartition
from kafka.partitioner.default import murmur2

from cdc.errors import SinkError, SinkUnavailable
from cdc.fault_points import FAULTS
from cdc.kafka_records import HEADER_SIZE, RecordBuffer, encode_headers
from core.kafka_options import build_client, client_config

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class ResumePosition:
    """The last event position Kafka holds for a slot."""

    commit_lsn: int
    seq: int
    complete: bool  # the whole transaction at commit_lsn is in Kafka
    snapshot_done: bool = True
    commit_ts_us: int = 0  # commit time of the transaction at commit_lsn (0 = snapshot)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "commit_lsn": self.commit_lsn,
                "seq": self.seq,
                "complete": self.complete,
                "snapshot_done": self.snapshot_done,
                "commit_ts_us": self.commit_ts_us,
                "written_at_us": int(time.time() * 1_000_000),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ResumePosition:
        d = json.loads(data)
        return cls(
            int(d["commit_lsn"]),
            int(d["seq"]),
            bool(d["complete"]),
            bool(d.get("snapshot_done", True)),
            int(d.get("commit_ts_us", 0)),
        )


class Sink(Protocol):
    """Where events go.  Calls come from one thread."""

    def begin(self) -> None: ...
    def send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers
    ) -> None: ...
    def publish_schema(self, fingerprint: bytes, schema_json: str) -> None: ...
    def commit(self, position: ResumePosition) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


MAX_REQUEST_SIZE: Final = 8 * 1024 * 1024
BATCH_BYTES: Final = 256 * 1024
"""Size at which a partition's records are handed to kafka-python as one batch."""
MAX_IN_FLIGHT_BATCHES: Final = 64
"""At most this many handed-over batches (~16 MB) wait for the broker at a time."""


def _bulk_path_available(producer: Any) -> bool:
    """Whether this kafka-python has the internals :meth:`KafkaTransactionalSink._hand_over`
    uses (checked once; without them every record goes through ``KafkaProducer.send``)."""
    try:
        from kafka.producer.producer_batch import ProducerBatch  # noqa: F401
        from kafka.record.memory_records import MemoryRecordsBuilder

        acc = producer._accumulator
        probe = MemoryRecordsBuilder(
            acc.config["message_version"], acc.config["compression_attrs"], 1024
        )
        needed = ("_buffer", "_num_records", "_last_offset", "_first_timestamp", "_max_timestamp")
        ok = (
            acc.config["message_version"] == 2
            and all(hasattr(probe._builder, a) for a in needed)
            and hasattr(probe, "_next_offset")
            and hasattr(acc, "_tp_lock")
            and hasattr(acc, "_batches")
            and hasattr(getattr(acc, "_incomplete", None), "all")
            and hasattr(producer._transaction_manager, "maybe_add_partition_to_transaction")
            and hasattr(producer._sender, "wakeup")
            and len(probe._builder._buffer) == HEADER_SIZE
        )
    except (ImportError, AttributeError, KeyError, TypeError) as exc:
        log.warning("kafka-python internals differ (%s): records go through send()", exc)
        return False
    if not ok:
        log.warning("kafka-python internals differ: records go through KafkaProducer.send()")
    return ok


def state_topic(prefix: str) -> str:
    return f"{prefix}._cdc_state"


def schemas_topic(prefix: str) -> str:
    return f"{prefix}._schemas"


def _kafka_errors() -> tuple[type[BaseException], ...]:
    from kafka.errors import KafkaError

    return (KafkaError,)


def _remaining(deadline: float, floor_s: float = 0.5) -> float:
    """Seconds left until ``deadline`` (monotonic), but at least ``floor_s``."""
    return max(floor_s, deadline - time.monotonic())


@dataclass
class KafkaOptions:
    bootstrap_servers: str
    topic_prefix: str
    transactional_id: str
    compression: str = "gzip"
    timeout_s: float = 30.0
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    topic_partitions: int = 1
    bulk_records: bool = True  # build record batches ourselves (cdc.kafka_records)

    def client_kwargs(self) -> dict[str, Any]:
        return client_config(
            self.bootstrap_servers,
            timeout_s=self.timeout_s,
            security_protocol=self.security_protocol,
            sasl_mechanism=self.sasl_mechanism,
            sasl_username=self.sasl_username,
            sasl_password=self.sasl_password,
            ssl_cafile=self.ssl_cafile,
        )


class TopicManager:
    """Creates topics before first use (Apache Kafka may have auto-creation off)."""

    def __init__(self, opts: KafkaOptions) -> None:
        self.opts = opts
        self._known: set[str] = set()
        self.known = self._known  # read-only view for the per-event fast path
        self._admin: Any = None

    def _client(self) -> Any:
        if self._admin is None:
            from kafka import KafkaAdminClient

            self._admin = build_client(KafkaAdminClient, **self.opts.client_kwargs())
        return self._admin

    def ensure(self, topics: Sequence[str], compacted: bool = False) -> None:
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        missing = [t for t in topics if t not in self._known]
        if not missing:
            return
        try:
            admin = self._client()
            existing = set(admin.list_topics())
            to_create = [t for t in missing if t not in existing]
            if to_create:
                configs = {"cleanup.policy": "compact"} if compacted else {}
                try:
                    admin.create_topics(
                        [
                            NewTopic(
                                t,
                                1 if compacted else self.opts.topic_partitions,
                                1,
                                topic_configs=configs,
                            )
                            for t in to_create
                        ]
                    )
                except TopicAlreadyExistsError:
                    pass
        except _kafka_errors() as exc:
            self.close()
            raise SinkUnavailable(
                f"cannot create topics {missing} on {self.opts.bootstrap_servers}: {exc}"
            ) from exc
        self._known.update(missing)

    def close(self) -> None:
        if self._admin is not None:
            try:
                self._admin.close()
            except Exception:
                pass
            self._admin = None


class KafkaTransactionalSink:
    """A :class:`Sink` over kafka-python's transactional, idempotent producer."""

    def __init__(self, opts: KafkaOptions, slot: str) -> None:
        from kafka import KafkaProducer

        self.opts = opts
        self.slot = slot
        self.topics = TopicManager(opts)
        self.topics.ensure(
            [state_topic(opts.topic_prefix), schemas_topic(opts.topic_prefix)], compacted=True
        )
        self._published: set[bytes] = set()
        self._pending_schemas: set[bytes] = set()
        self._in_txn = False
        self._broken = False  # a Kafka call failed: the broker is gone or the producer unusable
        self._fast = False
        self._buffers: dict[Any, RecordBuffer] = {}
        self._futures: list[Any] = []  # of the open transaction's records, checked at commit
        self._partition_counts: dict[str, int] = {}
        self._tracked: set[str] = set()
        self._tps: dict[tuple[str, int], Any] = {}
        self._max_record = MAX_REQUEST_SIZE
        self.producer: Any = None
        try:
            self.producer = build_client(
                KafkaProducer,
                **opts.client_kwargs(),
                transactional_id=opts.transactional_id,
                enable_idempotence=True,
                acks="all",
                compression_type=None if opts.compression == "none" else opts.compression,
                linger_ms=5,
                batch_size=256 * 1024,
                max_request_size=MAX_REQUEST_SIZE,
                max_block_ms=int(opts.timeout_s * 1000),
                transaction_timeout_ms=max(60000, int(opts.timeout_s * 2000)),
            )
            self.producer.init_transactions()
            self._fast = opts.bulk_records and _bulk_path_available(self.producer)
            for topic in (state_topic(opts.topic_prefix), schemas_topic(opts.topic_prefix)):
                self._track(topic)
        except _kafka_errors() as exc:
            self._broken = True
            self.close()
            raise SinkUnavailable(
                f"cannot start a transactional producer on {opts.bootstrap_servers}: {exc}"
            ) from exc

    def begin(self) -> None:
        if self._in_txn:
            return
        try:
            self.producer.begin_transaction()
        except _kafka_errors() as exc:
            raise self._unavailable(f"begin transaction failed: {exc}") from exc
        self._in_txn = True
        self._pending_schemas = set()
        self._futures = []

    def _unavailable(self, message: str) -> SinkUnavailable:
        self._broken = True
        return SinkUnavailable(message)

    def ensure_topic(self, topic: str) -> None:
        if topic in self.topics.known:
            return
        try:
            self.topics.ensure([topic])
        except SinkUnavailable:
            self._broken = True
            raise

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        if not self._in_txn:
            self.begin()
        self.ensure_topic(topic)
        if self._fast:
            self._append(topic, key, value, headers)
            return
        if topic not in self._tracked:
            self._track(topic)
        try:
            self._futures.append(
                self.producer.send(topic, key=key, value=value, headers=list(headers))
            )
        except _kafka_errors() as exc:
            raise self._unavailable(f"send to {topic} failed: {exc}") from exc

    # -- the bulk path: records appended to our own batches, handed over whole ----------

    def _append(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        tp = self._partition(topic, key)
        buffer = self._buffers.get(tp)
        if buffer is None:
            buffer = self._buffers[tp] = RecordBuffer()
        size = buffer.append(int(time.time() * 1000), key, value, encode_headers(headers))
        if size > self._max_record:
            del self._buffers[tp]  # the transaction is aborted by the caller: nothing is lost
            raise SinkError(
                f"a record for {topic} (key {key!r:.80}) is {size} bytes, more than the "
                f"producer's max_request_size ({self._max_record}); raise the broker's "
                "message.max.bytes and the topic's max.message.bytes, or leave the column out "
                "of the publication"
            )
        if len(buffer.buf) >= BATCH_BYTES:
            del self._buffers[tp]
            self._hand_over(tp, buffer)
            self._bound_in_flight()

    def _bound_in_flight(self) -> None:
        """Handed-over batches bypass kafka-python's buffer_memory limit: when more than
        ``MAX_IN_FLIGHT_BATCHES`` wait for the broker, wait for them (memory stays bounded
        in a huge transaction against a slow broker)."""
        if len(self.producer._accumulator._incomplete.all()) <= MAX_IN_FLIGHT_BATCHES:
            return
        try:
            self.producer.flush(timeout=self.opts.timeout_s)
        except _kafka_errors() as exc:
            raise self._unavailable(f"the broker did not take the records in time: {exc}") from exc

    def _partition(self, topic: str, key: bytes | None) -> Any:
        """The record's TopicPartition: kafka's default partitioner (murmur2 of the key),
        partition 0 for records without a key (tables without a primary key)."""
        count = self._partition_counts.get(topic)
        if count is None:
            try:
                count = len(self.producer.partitions_for(topic) or ())
            except _kafka_errors() as exc:
                raise self._unavailable(f"no metadata for topic {topic}: {exc}") from exc
            if count == 0:
                raise self._unavailable(f"the broker reports no partitions for topic {topic}")
            self._track(topic)
            self._partition_counts[topic] = count
        partition = 0 if key is None or count == 1 else (murmur2(key) & 0x7FFFFFFF) % count
        tp = self._tps.get((topic, partition))
        if tp is None:
            tp = self._tps[(topic, partition)] = TopicPartition(topic, partition)
        return tp

    def _hand_over(self, tp: Any, buffer: RecordBuffer, at_commit: bool = False) -> None:
        """Give kafka-python's accumulator one finished batch for ``tp`` (see
        :mod:`cdc.kafka_records`); its sender fills the header (producer id, epoch,
        sequence, CRC), compresses and sends it within the open transaction.

        A batch handed over mid-transaction (it filled up) is sent at once; at commit
        the last batches are handed over not "full" and ``flush()`` sends them."""
        from kafka.producer.producer_batch import ProducerBatch
        from kafka.record.memory_records import MemoryRecordsBuilder

        producer = self.producer
        acc = producer._accumulator
        try:
            producer._transaction_manager.maybe_add_partition_to_transaction(tp)
        except _kafka_errors() as exc:
            raise self._unavailable(
                f"adding {tp.topic} to the Kafka transaction failed: {exc}"
            ) from exc
        records = MemoryRecordsBuilder(
            acc.config["message_version"],
            acc.config["compression_attrs"],
            len(buffer.buf) + 1 if at_commit else len(buffer.buf),  # full: ready to send
        )
        inner = records._builder
        inner._buffer = buffer.buf
        inner._num_records = buffer.count
        inner._last_offset = buffer.count - 1
        inner._first_timestamp = buffer.first_ts
        inner._max_timestamp = buffer.max_ts
        records._next_offset = buffer.count
        batch = ProducerBatch(tp, records)
        batch.max_record_size = buffer.max_record
        with acc._tp_lock(tp):
            acc._batches[tp].append(batch)
        acc._incomplete.add(batch)
        self._futures.append(batch.produce_future)
        if not at_commit:
            producer._sender.wakeup()

    def _hand_over_all(self) -> None:
        buffers, self._buffers = self._buffers, {}
        for tp, buffer in buffers.items():
            self._hand_over(tp, buffer, at_commit=True)

    def publish_schema(self, fingerprint: bytes, schema_json: str) -> None:
        if fingerprint in self._published or fingerprint in self._pending_schemas:
            return
        if not self._in_txn:
            self.begin()
        try:
            self._futures.append(
                self.producer.send(
                    schemas_topic(self.opts.topic_prefix),
                    key=fingerprint.hex().encode(),
                    value=schema_json.encode(),
                )
            )
        except _kafka_errors() as exc:
            raise self._unavailable(f"publishing schema {fingerprint.hex()} failed: {exc}") from exc
        self._pending_schemas.add(fingerprint)

    def commit(self, position: ResumePosition) -> None:
        """Commit the Kafka transaction with ``position`` as its resume position.

        Three steps, each acknowledged before the next starts: the events and schemas;
        the resume-position record; the commit marker.  A broker that commits an
        abandoned transaction (tansu) can then hold events without their resume
        position (written again, same positions, by the next daemon), never the
        reverse."""
        if not self._in_txn:
            self.begin()
        # one deadline for the whole commit (records, then the transaction marker), so a
        # dead broker is given up after timeout_s, not after one timeout per step
        deadline = time.monotonic() + self.opts.timeout_s
        try:
            self._hand_over_all()
            self.producer.flush(timeout=_remaining(deadline))
            self._check_acknowledged(position)
            if FAULTS.armed:
                FAULTS.hit("after_events_sent")
            self.producer.send(
                state_topic(self.opts.topic_prefix),
                key=self.slot.encode(),
                value=position.to_json(),
            )
            self.producer.flush(timeout=_remaining(deadline))
            if FAULTS.armed:
                FAULTS.hit("before_kafka_commit")
            self._end_transaction(commit=True, timeout_s=_remaining(deadline))
        except _kafka_errors() as exc:
            raise self._unavailable(
                f"commit of the Kafka transaction failed (position {position}): {exc}"
            ) from exc
        self._in_txn = False
        self._published |= self._pending_schemas
        self._pending_schemas = set()

    def _check_acknowledged(self, position: ResumePosition) -> None:
        """Every record of the open transaction is acknowledged, or SinkUnavailable."""
        futures, self._futures = self._futures, []
        for future in futures:
            if not future.is_done:
                raise self._unavailable(
                    f"records of the Kafka transaction ending at {position} were not "
                    f"acknowledged within {self.opts.timeout_s:g}s"
                )
            if future.failed():
                raise self._unavailable(
                    f"records of the Kafka transaction ending at {position} were "
                    f"refused: {future.exception}"
                )

    def _track(self, topic: str) -> None:
        """Make kafka-python keep ``topic`` in its metadata.

        kafka-python refreshes metadata only for the topics it tracks, and it tracks a
        topic only when it had no metadata for it at first use; a topic known from the
        start-up metadata is left untracked, so the first refresh for another (new)
        topic forgets its partition leaders and its batches wait for a leader forever:
        the commit times out with part of the transaction on the broker.  Tracking
        every topic this sink writes keeps them all in every refresh."""
        self._tracked.add(topic)
        sender = getattr(self.producer, "_sender", None)
        if sender is not None and hasattr(sender, "add_topic"):
            sender.add_topic(topic)

    def _end_transaction(self, commit: bool, timeout_s: float | None = None) -> None:
        """Commit or abort, waiting at most ``timeout_s`` (default kafka.timeout_s) for the broker.

        kafka-python's ``commit_transaction()``/``abort_transaction()`` wait
        without a timeout: with the broker gone they block forever (seen with
        3.0.x).  Its transaction manager returns a result that can be waited on
        with a timeout, so use that when it is there.
        """
        from kafka.errors import KafkaTimeoutError

        manager = getattr(self.producer, "_transaction_manager", None)
        sender = getattr(self.producer, "_sender", None)
        if manager is None or sender is None or not hasattr(manager, "begin_commit"):
            (self.producer.commit_transaction if commit else self.producer.abort_transaction)()
            return
        result = manager.begin_commit() if commit else manager.begin_abort()
        sender.wakeup()
        timeout_s = self.opts.timeout_s if timeout_s is None else timeout_s
        if not result.wait(timeout_ms=int(timeout_s * 1000)):
            what = "commit" if commit else "abort"
            raise KafkaTimeoutError(
                f"the broker did not complete the transaction {what} within {timeout_s:g}s"
            )

    def abort(self) -> None:
        self._buffers = {}
        self._futures = []
        if not self._in_txn:
            return
        self._in_txn = False
        if self._broken:
            # the broker is unreachable: waiting for it helps nobody.  The next
            # producer with this transactional id aborts the transaction when it starts.
            log.info("Kafka transaction left open (broker unavailable); the next start aborts it")
            return
        try:
            self._end_transaction(commit=False)
        except Exception as exc:
            log.warning(
                "abort of the Kafka transaction failed (it will be aborted at the next start): %s",
                exc,
            )

    def close(self) -> None:
        if self.producer is not None:
            if self._broken:
                # kafka-python's close() first flushes and, when that times out, raises
                # before stopping its network thread, which then retries forever: stop it first.
                sender = getattr(self.producer, "_sender", None)
                if sender is not None:
                    sender.force_close()
                    sender.join(1.0)
            try:
                self.producer.close(timeout=0 if self._broken else 5)
            except Exception as exc:
                log.debug("producer close: %s", exc)
        self.topics.close()


def read_resume_position(
    opts: KafkaOptions, slot: str, timeout_s: float = 30.0
) -> ResumePosition | None:
    """Read the last committed state record for ``slot`` (None if there is none)."""
    from kafka import KafkaConsumer, TopicPartition

    topic = state_topic(opts.topic_prefix)
    topics = TopicManager(opts)
    try:
        topics.ensure([topic], compacted=True)
    finally:
        topics.close()
    try:
        consumer = build_client(
            KafkaConsumer,
            **opts.client_kwargs(),
            isolation_level="read_committed",
            enable_auto_commit=False,
            group_id=None,
            consumer_timeout_ms=1000,
            # kafka-python insists on request_timeout_ms > fetch_max_wait_ms (default 500)
            fetch_max_wait_ms=min(500, int(opts.timeout_s * 500)),
        )
    except _kafka_errors() as exc:
        raise SinkUnavailable(f"cannot read {topic} from {opts.bootstrap_servers}: {exc}") from exc
    try:
        deadline = time.monotonic() + timeout_s
        parts = consumer.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise SinkUnavailable(f"no partitions for {topic} on {opts.bootstrap_servers}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = _settled_end_offsets(consumer, opts, tps, deadline)
        last: ResumePosition | None = None
        key = slot.encode()
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise SinkUnavailable(
                    f"timed out reading {topic} (at {[consumer.position(tp) for tp in tps]} of {ends})"
                )
            for _tp, records in consumer.poll(timeout_ms=500).items():
                for r in records:
                    if r.key == key and r.value:
                        last = ResumePosition.from_json(r.value)
        return last
    except _kafka_errors() as exc:
        raise SinkUnavailable(f"reading {topic} failed: {exc}") from exc
    finally:
        consumer.close()


def _settled_end_offsets(
    consumer: Any, opts: KafkaOptions, tps: list[Any], deadline: float
) -> dict[Any, int]:
    """The state topic's end offsets once no transaction that was open when we looked is
    still open: its last stable offset (what a read_committed reader can reach) has reached
    the high watermark seen at the start.  A predecessor killed in the middle of committing
    is settled by our producer's init_transactions(); should the broker write its commit
    markers a moment later, reading before them would miss its last resume position and
    replay events Kafka already holds.

    Waits until ``deadline`` at most, then raises :class:`SinkUnavailable` (retried):
    reading only what is stable could return an older position, or none at all, which
    would make the daemon drop its slot and start over as if no snapshot had been taken."""
    from kafka import KafkaConsumer

    try:
        probe = build_client(
            KafkaConsumer,
            **opts.client_kwargs(),
            isolation_level="read_uncommitted",
            fetch_max_wait_ms=min(500, int(opts.timeout_s * 500)),  # < request_timeout_ms
        )
    except _kafka_errors() as exc:
        raise SinkUnavailable(f"cannot read {tps[0].topic}: {exc}") from exc
    try:
        high = probe.end_offsets(tps)
        stable = consumer.end_offsets(tps)
        while any(stable[tp] < high[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise SinkUnavailable(
                    f"{tps[0].topic}: a Kafka transaction is still open (last stable offsets "
                    f"{ {tp.partition: stable[tp] for tp in tps} }, written "
                    f"{ {tp.partition: high[tp] for tp in tps} }); the resume position "
                    "cannot be read until the broker ends it"
                )
            time.sleep(0.05)
            stable = consumer.end_offsets(tps)
        return dict(stable)
    finally:
        probe.close()


def new_transactional_id(slot: str) -> str:
    return f"fieldsync-cdc.{slot}"


__all__ = [
    "KafkaOptions",
    "KafkaTransactionalSink",
    "ResumePosition",
    "Sink",
    "SinkError",
    "TopicManager",
    "new_transactional_id",
    "read_resume_position",
    "schemas_topic",
    "state_topic",
]
