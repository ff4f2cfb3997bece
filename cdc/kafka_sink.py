"""Kafka side of cdc: the transactional sink, its topics, and the resume position it writes.

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
resume position past missing events.  (The state topic's partition joins the Kafka
transaction together with the events' partitions, in one AddPartitionsToTxn request, so
the state record costs one round trip to the broker after their acknowledgement, not two;
a partition added to a transaction holds nothing of it until a record is written there.)

Schemas go to the compacted ``{prefix}._schemas`` topic keyed by fingerprint,
inside the same transaction as the first event that uses them.

Records: change events are not given to ``KafkaProducer.send`` one by one; the sink
appends them to record batches of its own and hands those to kafka-python whole
(:mod:`cdc.kafka_bulk`), where kafka-python's internals allow it.  Schemas and the resume
position always use ``send()``.  Both paths put a record in the partition
:func:`cdc.kafka_bulk.partition_of` names (:class:`ChangePartitioner` for ``send()``).  The resume position is read back by
:func:`cdc.kafka_state.read_resume_position`.

Concurrency: one thread (the pipeline's) calls the sink; kafka-python's sender
thread does the network I/O.  ``start_commit()`` hands the commit's steps (wait for
every record's acknowledgement, the resume position, the commit marker) to the sink's
committer thread and returns; ``wait_commit()`` waits for it and takes its outcome,
``commit()`` does both.  While a commit is in flight, ``send()`` only appends to the
record buffers (:mod:`cdc.kafka_bulk`); every call that needs the producer (a full
buffer, a schema, the next commit, abort, close) first waits for the commit in flight,
so the producer is used by one of the two threads at a time and the next Kafka
transaction begins only after the previous one was acknowledged.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Final, Protocol

from cdc.errors import SinkError, SinkUnavailable
from cdc.fault_points import FAULTS
from cdc.kafka_acks import acknowledgement_error, send_one
from cdc.kafka_bulk import MAX_REQUEST_SIZE, BulkRecords, bulk_path_available, partition_of
from cdc.metrics import BYTES
from cdc.record_size import too_large
from cdc.resume_position import ResumePosition
from core.kafka_options import build_client, client_config, kafka_errors

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes]]


class Sink(Protocol):
    """Where events go.  Calls come from one thread."""

    def begin(self) -> None: ...
    def send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers
    ) -> None: ...
    def publish_schema(self, fingerprint: bytes, schema_json: str) -> None: ...
    def commit(self, position: ResumePosition) -> None: ...
    def start_commit(self, position: ResumePosition) -> None: ...
    def commit_done(self) -> bool: ...
    def wait_commit(self, timeout_s: float | None) -> float | None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


def state_topic(prefix: str) -> str:
    return f"{prefix}._cdc_state"


def schemas_topic(prefix: str) -> str:
    return f"{prefix}._schemas"


class ChangePartitioner:
    """kafka-python's ``partitioner`` of the sink's producer: the partition
    :func:`cdc.kafka_bulk.partition_of` names, as the bulk path chooses it (Kafka's default
    would hash the whole key, fingerprint included, and put keyless records anywhere)."""

    def partition(
        self,
        topic: str,
        key: Any,
        serialized_key: bytes | None,
        value: Any,
        serialized_value: bytes | None,
        cluster: Any,
    ) -> int:
        parts = sorted(cluster.partitions_for_topic(topic) or (0,))
        return int(parts[partition_of(serialized_key, len(parts))])


TOPIC_SLACK: Final = 1024
"""Bytes of a change topic's ``max.message.bytes`` above ``kafka.max_message_bytes``: the
record batch's header and the record's framing."""


def _partitioner() -> Any:
    """A :class:`ChangePartitioner`, registered as kafka-python's ``Partitioner`` (which
    kafka-python checks to call it with the key and value)."""
    from kafka.partitioner import Partitioner

    Partitioner.register(ChangePartitioner)
    return ChangePartitioner()


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
    max_message_bytes: int = MAX_REQUEST_SIZE  # the largest record sent (kafka.max_message_bytes)
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
                # change topics take the records the producer sends (kafka.max_message_bytes;
                # a broker's default message.max.bytes is 1 MiB), a batch header above it
                configs = (
                    {"cleanup.policy": "compact"}
                    if compacted
                    else {"max.message.bytes": str(self.opts.max_message_bytes + TOPIC_SLACK)}
                )
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
        except kafka_errors() as exc:
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
        self._schema_json: dict[bytes, str] = {}  # every schema seen: names a record too large
        self._too_large = functools.partial(too_large, opts.max_message_bytes, self._schema_json)
        self._pending_schemas: set[bytes] = set()
        self._in_txn = False
        self._broken = False  # a Kafka call failed: the broker is gone or the producer unusable
        self._bulk: BulkRecords | None = None  # None: every record through send()
        self._futures: list[Any] = []  # of the open transaction's records, checked at commit
        self._txn_bytes = 0  # record bytes of the open transaction sent through send()
        self._tracked: set[str] = set()
        self._committing: Future[float] | None = None  # the commit in flight
        self._committing_schemas: set[bytes] = set()  # published in the commit in flight
        self._committing_bytes = 0
        self._committed_at = 0.0  # wall-clock time the last settled commit completed
        self._committer: ThreadPoolExecutor | None = None
        self.producer: Any = None
        try:
            self.producer = build_client(
                KafkaProducer,
                **opts.client_kwargs(),
                transactional_id=opts.transactional_id,
                partitioner=_partitioner(),
                enable_idempotence=True,
                acks="all",
                compression_type=None if opts.compression == "none" else opts.compression,
                linger_ms=5,
                batch_size=256 * 1024,
                max_request_size=opts.max_message_bytes,
                max_block_ms=int(opts.timeout_s * 1000),
                transaction_timeout_ms=max(60000, int(opts.timeout_s * 2000)),
            )
            self.producer.init_transactions()
            if opts.bulk_records and bulk_path_available(self.producer):
                self._bulk = BulkRecords(
                    self.producer,
                    opts.timeout_s,
                    track=self._track,
                    unavailable=self._unavailable,
                    futures=lambda: self._futures,
                    ready=self._producer_ready,
                    max_record=opts.max_message_bytes,
                    too_large=self._too_large,
                )
            for topic in (state_topic(opts.topic_prefix), schemas_topic(opts.topic_prefix)):
                self._track(topic)
        except kafka_errors() as exc:
            self._broken = True
            self.close()
            raise SinkUnavailable(
                f"cannot start a transactional producer on {opts.bootstrap_servers}: {exc}"
            ) from exc

    def begin(self) -> None:
        if self._in_txn or self._committing is not None:
            return  # (while a commit is in flight, begun when the producer is next needed)
        self._begin_transaction()

    def _producer_ready(self) -> None:
        """Settle the commit in flight (raising its error), then have a transaction open."""
        if self._committing is not None:
            self._settle()
        if not self._in_txn:
            self._begin_transaction()

    def _begin_transaction(self) -> None:
        try:
            self.producer.begin_transaction()
        except kafka_errors() as exc:
            raise self._unavailable(f"begin transaction failed: {exc}") from exc
        self._in_txn = True
        self._pending_schemas = set()
        self._futures = []
        self._txn_bytes = 0

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
        if topic not in self.topics.known:
            self.ensure_topic(topic)
        bulk = self._bulk
        if bulk is not None:
            # buffered (also while a commit is in flight); a full batch is handed over
            # after _producer_ready()
            bulk.append(topic, key, value, headers)  # RecordTooLarge from self._too_large
            return
        self._producer_ready()
        if topic not in self._tracked:
            self._track(topic)
        try:
            self._futures.append(
                send_one(self.producer, topic, key, value, headers, self._too_large)
            )
        except kafka_errors() as exc:
            raise self._unavailable(f"send to {topic} failed: {exc}") from exc
        self._txn_bytes += len(key or b"") + len(value or b"")

    def publish_schema(self, fingerprint: bytes, schema_json: str) -> None:
        self._schema_json.setdefault(fingerprint, schema_json)
        if (
            fingerprint in self._published
            or fingerprint in self._pending_schemas
            or fingerprint in self._committing_schemas
        ):
            return
        self._producer_ready()
        try:
            self._futures.append(
                self.producer.send(
                    schemas_topic(self.opts.topic_prefix),
                    key=fingerprint.hex().encode(),
                    value=schema_json.encode(),
                )
            )
        except kafka_errors() as exc:
            raise self._unavailable(f"publishing schema {fingerprint.hex()} failed: {exc}") from exc
        self._pending_schemas.add(fingerprint)
        self._txn_bytes += len(schema_json)

    def commit(self, position: ResumePosition) -> None:
        """Commit the Kafka transaction with ``position`` as its resume position, and wait."""
        self.start_commit(position)
        self.wait_commit(None)

    def start_commit(self, position: ResumePosition) -> None:
        """Start committing the open transaction with ``position`` as its resume position
        (after the commit in flight, if any, is settled); the steps run on the sink's
        committer thread (:meth:`_finish_commit`).  Until :meth:`wait_commit` has
        returned it, :meth:`send` only buffers records; any call that needs the producer
        waits for the commit first."""
        self._producer_ready()
        try:
            if self._bulk is not None:
                self._bulk.hand_over_all(
                    then=(state_topic(self.opts.topic_prefix), self.slot.encode())
                )
        except kafka_errors() as exc:
            raise self._unavailable(
                f"commit of the Kafka transaction failed (position {position}): {exc}"
            ) from exc
        self._committing_schemas, self._pending_schemas = self._pending_schemas, set()
        bulk_bytes = self._bulk.take_bytes() if self._bulk is not None else 0
        self._committing_bytes = self._txn_bytes + bulk_bytes
        if self._committer is None:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="fieldsync-cdc-commit")
        self._committing = self._committer.submit(self._finish_commit, position)

    def commit_done(self) -> bool:
        """Whether the commit in flight finished (or none is in flight)."""
        committing = self._committing
        return committing is None or committing.done()

    def wait_commit(self, timeout_s: float | None) -> float | None:
        """Wait up to ``timeout_s`` (None: as long as it takes) for the commit in flight and
        settle it: the wall-clock time it completed, None while it is still in flight.
        Raises its error (SinkUnavailable).  Without a commit in flight, the time of the
        last one."""
        committing = self._committing
        if committing is not None:
            try:
                committing.exception(timeout_s)
            except FutureTimeout:
                return None
            self._settle()
        return self._committed_at

    def _settle(self) -> None:
        """Wait for the commit in flight and take its outcome (raising its error)."""
        committing, self._committing = self._committing, None
        if committing is None:
            return
        schemas, self._committing_schemas = self._committing_schemas, set()
        self._committed_at = committing.result()  # raises the commit's error
        self._published |= schemas
        BYTES.inc(self._committing_bytes)

    def _finish_commit(self, position: ResumePosition) -> float:
        """The commit's steps, on the committer thread, each acknowledged before the next
        starts: the events and schemas; the resume-position record; the commit marker.  A
        broker that commits an abandoned transaction (tansu) can then hold events without
        their resume position (written again, same positions, by the next daemon), never
        the reverse.  Returns the wall-clock time the broker acknowledged the commit."""
        # one deadline for the whole commit (records, then the transaction marker), so a
        # dead broker is given up after timeout_s, not after one timeout per step
        deadline = time.monotonic() + self.opts.timeout_s
        try:
            self.producer.flush(timeout=_remaining(deadline))
            self._check_acknowledged(position)
            if FAULTS.armed:
                FAULTS.hit("after_events_sent")
            state = position.to_json()
            self.producer.send(
                state_topic(self.opts.topic_prefix), key=self.slot.encode(), value=state
            )
            self.producer.flush(timeout=_remaining(deadline))
            if FAULTS.armed:
                FAULTS.hit("before_kafka_commit")
            _end_transaction(self.producer, True, _remaining(deadline))
        except kafka_errors() as exc:
            raise self._unavailable(
                f"commit of the Kafka transaction failed (position {position}): {exc}"
            ) from exc
        self._in_txn = False
        self._committing_bytes += len(state)
        return time.time()

    def _check_acknowledged(self, position: ResumePosition) -> None:
        """Every record of the open transaction is acknowledged, or SinkUnavailable
        (RecordTooLarge: the broker refused them as too large)."""
        futures, self._futures = self._futures, []
        error = acknowledgement_error(
            futures, position, self.opts.timeout_s, self.opts.max_message_bytes
        )
        if error is not None:
            self._broken = True
            raise error

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

    def _settle_quietly(self) -> None:
        """Wait for the commit in flight, if any, ignoring its error (abort, close)."""
        try:
            self._settle()
        except SinkError as exc:  # a RecordTooLarge is met again at the next start
            level = logging.DEBUG if isinstance(exc, SinkUnavailable) else logging.WARNING
            log.log(level, "the commit in flight failed: %s", exc)

    def abort(self) -> None:
        self._settle_quietly()
        if self._bulk is not None:
            self._bulk.discard()
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
            _end_transaction(self.producer, False, self.opts.timeout_s)
        except Exception as exc:
            log.warning(
                "abort of the Kafka transaction failed (it will be aborted at the next start): %s",
                exc,
            )

    def close(self) -> None:
        self._settle_quietly()
        if self._committer is not None:
            self._committer.shutdown(wait=False)
            self._committer = None
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


def _end_transaction(producer: Any, commit: bool, timeout_s: float) -> None:
    """Commit or abort ``producer``'s transaction, waiting at most ``timeout_s`` for the broker.

    kafka-python's ``commit_transaction()``/``abort_transaction()`` wait
    without a timeout: with the broker gone they block forever (seen with
    3.0.x).  Its transaction manager returns a result that can be waited on
    with a timeout, so use that when it is there.
    """
    from kafka.errors import KafkaTimeoutError

    manager = getattr(producer, "_transaction_manager", None)
    sender = getattr(producer, "_sender", None)
    if manager is None or sender is None or not hasattr(manager, "begin_commit"):
        (producer.commit_transaction if commit else producer.abort_transaction)()
        return
    result = manager.begin_commit() if commit else manager.begin_abort()
    sender.wakeup()
    if not result.wait(timeout_ms=int(timeout_s * 1000)):
        what = "commit" if commit else "abort"
        raise KafkaTimeoutError(
            f"the broker did not complete the transaction {what} within {timeout_s:g}s"
        )


def new_transactional_id(slot: str) -> str:
    return f"fieldsync-cdc.{slot}"


__all__ = [
    "KafkaOptions",
    "KafkaTransactionalSink",
    "Sink",
    "SinkError",
    "TopicManager",
    "new_transactional_id",
    "schemas_topic",
    "state_topic",
]
