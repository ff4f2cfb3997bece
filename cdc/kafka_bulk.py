"""The Kafka sink's bulk path: change events appended to record batches of our own and
handed to kafka-python whole.

``KafkaProducer.send`` costs tens of microseconds per record.  :class:`BulkRecords` appends
each event to one :class:`cdc.kafka_records.RecordBuffer` per partition (:func:`partition_of`:
murmur2 of the key's Avro datum) and hands each buffer to kafka-python's accumulator as one
finished batch when it reaches :data:`BATCH_BYTES` and at commit.  kafka-python's sender
still stamps producer id, epoch and sequence, compresses, checksums, adds the partition to
the transaction and retries.  Compression of these batches: gzip at level
:data:`GZIP_LEVEL` (kafka-python always uses level 9, about six times the CPU for the same
ratio on change events; any gzip level decodes the same).  This uses kafka-python internals, checked once at start-up
(:func:`bulk_path_available`); where they differ, the sink sends every record through
``send()``.  Handed-over batches bypass kafka-python's ``buffer_memory`` limit, so at most
:data:`MAX_IN_FLIGHT_BATCHES` wait for the broker at a time.

Concurrency: called from the sink's one thread; kafka-python's sender thread takes the
batches from the accumulator (under its per-partition lock).
"""

from __future__ import annotations

import functools
import gzip
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from kafka import TopicPartition
from kafka.partitioner.default import murmur2

from cdc.errors import RecordTooLarge, SinkUnavailable
from cdc.kafka_records import HEADER_SIZE, RecordBuffer, encode_headers
from core.avro_envelope import HEADER_LEN, MAGIC
from core.kafka_options import kafka_errors

log = logging.getLogger(__name__)


MAX_REQUEST_SIZE: Final = 8 * 1024 * 1024
"""The default of ``kafka.max_message_bytes``: the largest record the producer sends."""
TooLarge = Callable[
    [str, bytes | None, bytes | None, Sequence[tuple[str, bytes]], int], RecordTooLarge
]
"""Makes the error of a record too large: ``(topic, key, value, headers, size)``."""
BATCH_BYTES: Final = 256 * 1024
"""Size at which a partition's records are handed to kafka-python as one batch."""
MAX_IN_FLIGHT_BATCHES: Final = 64
"""At most this many handed-over batches (~16 MB) wait for the broker at a time."""
GZIP_LEVEL: Final = 1
"""zlib level of the gzip-compressed batches (level 1: ~6x faster than 9, ratio within 3 %)."""


def partition_of(key: bytes | None, count: int) -> int:
    """The partition, of ``count``, of a change event with Kafka key ``key``: murmur2 (Kafka's
    hash) of the key's Avro datum, the key without its single-object header (a key that is
    no single-object datum, as those of the state topics, is hashed whole); 0 without a
    key.  Not of the whole key: its header holds the key schema's fingerprint, which a
    change of the key columns' schema (``int`` → ``bigint``, a renamed key column) changes
    while the datum stays the same, and a row's later events must stay in the partition of
    its earlier ones (each partition is applied in order; partitions are not, by the relay's
    engine shares)."""
    if key is None or count <= 1:
        return 0
    datum = key[HEADER_LEN:] if key[:2] == MAGIC else key  # else: not Avro
    return (int(murmur2(datum)) & 0x7FFFFFFF) % count


def bulk_path_available(producer: Any) -> bool:
    """Whether this kafka-python has the internals :class:`BulkRecords`
    uses (checked once; without them every record goes through ``KafkaProducer.send``)."""
    try:
        from kafka.producer.producer_batch import ProducerBatch  # noqa: F401
        from kafka.record.memory_records import MemoryRecordsBuilder

        acc = producer._accumulator
        probe = MemoryRecordsBuilder(
            acc.config["message_version"], acc.config["compression_attrs"], 1024
        )
        needed = ("_buffer", "_num_records", "_last_offset", "_first_timestamp", "_max_timestamp")
        builder_class = type(probe._builder)
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
            and callable(getattr(builder_class, "_maybe_compress", None))
            and getattr(builder_class, "CODEC_GZIP", None) == 1
            and hasattr(builder_class, "CODEC_NONE")
            and "_compression_type" in getattr(builder_class, "__slots__", ())
        )
    except (ImportError, AttributeError, KeyError, TypeError) as exc:
        log.warning("kafka-python internals differ (%s): records go through send()", exc)
        return False
    if not ok:
        log.warning("kafka-python internals differ: records go through KafkaProducer.send()")
    return ok


def _fast_gzip_builder_class() -> Any:
    """kafka-python's record batch builder, gzip-compressing at :data:`GZIP_LEVEL` (made once,
    when first needed; a subclass overriding only ``_maybe_compress``)."""
    global _FAST_GZIP_BUILDER
    if _FAST_GZIP_BUILDER is None:
        from kafka.record.default_records import DefaultRecordBatchBuilder

        # partialmethod binds the builder whether this module is compiled or not
        _FAST_GZIP_BUILDER = type(
            "FastGzipRecordBatchBuilder",
            (DefaultRecordBatchBuilder,),
            {"__slots__": (), "_maybe_compress": functools.partialmethod(_maybe_compress_fast)},
        )
    return _FAST_GZIP_BUILDER


_FAST_GZIP_BUILDER: Any = None


def _maybe_compress_fast(builder: Any) -> bool:
    """``DefaultRecordBatchBuilder._maybe_compress`` with gzip at :data:`GZIP_LEVEL`: the
    records after the header are replaced by their compressed form when that is smaller."""
    if builder._compression_type != builder.CODEC_GZIP:
        from kafka.record.default_records import DefaultRecordBatchBuilder

        return bool(DefaultRecordBatchBuilder._maybe_compress(builder))
    buf: bytearray = builder._buffer
    data = memoryview(buf)[HEADER_SIZE:]
    compressed = gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)
    size = len(data)
    data.release()
    if size <= len(compressed):
        return False  # no gain: sent uncompressed, as kafka-python does
    needed = HEADER_SIZE + len(compressed)
    del buf[needed:]
    buf[HEADER_SIZE:needed] = compressed
    return True


class BulkRecords:
    """The open Kafka transaction's change events, in one record batch per partition.

    ``track`` makes kafka-python keep a topic in its metadata; ``unavailable`` turns a
    message into the sink's :class:`SinkUnavailable` (marking the sink broken);
    ``futures`` gives the open transaction's list of futures, checked at commit; ``ready``
    is called before a full batch is handed over mid-transaction: the sink settles the
    commit in flight, if any, and opens its transaction (records are only buffered here
    until then)."""

    def __init__(
        self,
        producer: Any,
        timeout_s: float,
        *,
        track: Callable[[str], None],
        unavailable: Callable[[str], SinkUnavailable],
        futures: Callable[[], list[Any]],
        ready: Callable[[], None] = lambda: None,
        max_record: int = MAX_REQUEST_SIZE,
        too_large: TooLarge | None = None,
    ) -> None:
        self.producer = producer
        self._ready = ready
        self.timeout_s = timeout_s
        self._track = track
        self._unavailable = unavailable
        self._futures = futures
        self._buffers: dict[Any, RecordBuffer] = {}
        self._partition_counts: dict[str, int] = {}
        self._tps: dict[tuple[str, int], Any] = {}
        # topics of one partition (the default): their TopicPartition, without a key hash
        self._single_partition: dict[str, Any] = {}
        self._max_record = max_record
        self._too_large = too_large
        self.handed_bytes = 0  # of the batches handed over since take_bytes()

    def discard(self) -> None:
        """Forget the records not handed over yet (the transaction is aborted)."""
        self._buffers = {}
        self.handed_bytes = 0

    def take_bytes(self) -> int:
        """The bytes of the batches handed over since the last call (then 0)."""
        n, self.handed_bytes = self.handed_bytes, 0
        return n

    def append(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> None:
        """Append one record to its partition's batch; a full batch is handed over (a record
        larger than ``max_record`` is a :class:`RecordTooLarge`, made by ``too_large``
        when given: the sink's names its row)."""
        tp = self._single_partition.get(topic)
        if tp is None:
            tp = self._partition(topic, key)
        buffer = self._buffers.get(tp)
        if buffer is None:
            buffer = self._buffers[tp] = RecordBuffer()
        elif len(buffer.buf) + len(key or b"") + len(value or b"") > self._max_record:
            # the batch would pass the record limit (the topic's max.message.bytes): the
            # records so far go as one batch, this one starts the next
            del self._buffers[tp]
            self._ready()
            self._hand_over(tp, buffer)
            self._bound_in_flight()
            buffer = self._buffers[tp] = RecordBuffer()
        size = buffer.append(int(time.time() * 1000), key, value, encode_headers(headers))
        if size > self._max_record:
            del self._buffers[tp]  # the transaction is aborted by the caller: nothing is lost
            if self._too_large is not None:
                raise self._too_large(topic, key, value, headers, size)
            raise RecordTooLarge(
                f"a record for {topic} is {size} bytes, more than kafka.max_message_bytes "
                f"({self._max_record})",
                topic,
                size,
                self._max_record,
            )
        if len(buffer.buf) >= BATCH_BYTES:
            del self._buffers[tp]
            self._ready()
            self._hand_over(tp, buffer)
            self._bound_in_flight()

    def _bound_in_flight(self) -> None:
        """Handed-over batches bypass kafka-python's buffer_memory limit: when more than
        ``MAX_IN_FLIGHT_BATCHES`` wait for the broker, wait for them (memory stays bounded
        in a huge transaction against a slow broker)."""
        if len(self.producer._accumulator._incomplete.all()) <= MAX_IN_FLIGHT_BATCHES:
            return
        try:
            self.producer.flush(timeout=self.timeout_s)
        except kafka_errors() as exc:
            raise self._unavailable(f"the broker did not take the records in time: {exc}") from exc

    def _partition(self, topic: str, key: bytes | None) -> Any:
        """The record's TopicPartition (:func:`partition_of`; partition 0 for records without
        a key: tables without a primary key, truncates)."""
        count = self._partition_counts.get(topic)
        if count is None:
            try:
                count = len(self.producer.partitions_for(topic) or ())
            except kafka_errors() as exc:
                raise self._unavailable(f"no metadata for topic {topic}: {exc}") from exc
            if count == 0:
                raise self._unavailable(f"the broker reports no partitions for topic {topic}")
            self._track(topic)
            self._partition_counts[topic] = count
            if count == 1:
                self._single_partition[topic] = self._tps.setdefault(
                    (topic, 0), TopicPartition(topic, 0)
                )
        partition = partition_of(key, count)
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
        except kafka_errors() as exc:
            raise self._unavailable(
                f"adding {tp.topic} to the Kafka transaction failed: {exc}"
            ) from exc
        records = MemoryRecordsBuilder(
            acc.config["message_version"],
            acc.config["compression_attrs"],
            len(buffer.buf) + 1 if at_commit else len(buffer.buf),  # full: ready to send
        )
        inner = records._builder
        if inner._compression_type == inner.CODEC_GZIP:
            inner = records._builder = _fast_gzip_builder_class()(
                magic=acc.config["message_version"],
                compression_type=acc.config["compression_attrs"],
                is_transactional=False,
                producer_id=-1,
                producer_epoch=-1,
                base_sequence=-1,
                batch_size=inner._batch_size,
            )
        inner._buffer = buffer.buf
        inner._num_records = buffer.count
        inner._last_offset = buffer.count - 1
        inner._first_timestamp = buffer.first_ts
        inner._max_timestamp = buffer.max_ts
        records._next_offset = buffer.count
        batch = ProducerBatch(tp, records)
        self.handed_bytes += len(buffer.buf)
        batch.max_record_size = buffer.max_record
        with acc._tp_lock(tp):
            acc._batches[tp].append(batch)
        acc._incomplete.add(batch)
        self._futures().append(batch.produce_future)
        if not at_commit:
            producer._sender.wakeup()

    def hand_over_all(self, then: tuple[str, bytes] | None = None) -> None:
        """Hand every partition's last batch over (at commit; ``flush()`` sends them).

        ``then``: the topic and key of the record the commit sends once these are
        acknowledged (the resume position).  Its partition joins the Kafka transaction now,
        so one AddPartitionsToTxn request adds it with theirs, instead of one more round trip
        to the broker between their acknowledgement and its send (the record itself still
        waits for the acknowledgement)."""
        if then is not None:
            tp = self._partition(*then)
            try:
                self.producer._transaction_manager.maybe_add_partition_to_transaction(tp)
            except kafka_errors() as exc:
                raise self._unavailable(
                    f"adding {tp.topic} to the Kafka transaction failed: {exc}"
                ) from exc
        buffers, self._buffers = self._buffers, {}
        for tp, buffer in buffers.items():
            self._hand_over(tp, buffer, at_commit=True)
