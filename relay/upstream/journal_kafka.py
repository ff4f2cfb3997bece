"""The journal intake's Kafka clients: the ``_journal`` producer, column types from ``_schemas``.

:class:`JournalProducer` writes the records of an upload to ``{prefix}._journal`` (key:
the device id; idempotent producer, ``acks=all``) and waits until Kafka holds every one;
only then does the intake write its intake records and answer.  Kafka failing → 503
(:class:`~relay.api_errors.Unavailable`) and no intake record: nothing was
acknowledged, the device uploads again (what Kafka may have got anyway is skipped by the
applier, which is idempotent by ``(device, seq)``).

:class:`SchemaTypes` is a :data:`TypesSource` for relays without access to the captured
database: column types from cdc's value schemas in ``{prefix}._schemas``
(:func:`core.value_schemas.column_types_from_schemas`), re-read at most every
``refresh_s``.

Concurrency: :class:`JournalProducer`'s blocking work (making the producer, ``send()``
waiting for metadata) runs in an executor of its own and acknowledgements are awaited on
the event loop without holding a thread, so a Kafka outage cannot starve the API's
other work.  :class:`SchemaTypes` is thread-safe (a lock).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from core.journal_format import JournalRecord
from core.kafka_options import build_client, is_kafka_error, within_timeout
from core.value_schemas import column_types_from_schemas
from core.values import ColumnType
from relay.api_errors import Unavailable
from relay.upstream.applier import ensure_journal_topics
from relay.upstream.intake import JournalApiConfig

__all__ = ["JournalProducer", "SchemaTypes", "TypesSource"]

log = logging.getLogger("relay.upstream.journal_api")

TypesSource = Callable[[], Mapping[str, Mapping[str, ColumnType]]]
"""Column types per table for intake validation (may block; called in a worker thread)."""


class JournalProducer:
    """Writes journal records to ``{prefix}._journal`` (key: device id) and waits for Kafka.

    Idempotent producer, ``acks=all``.  ``send`` raises :class:`~relay.api_errors.Unavailable`
    (503) when Kafka does not acknowledge every record within the timeout; the producer is
    then dropped and made again by the next upload (so a stuck client never lingers).
    Blocking work (making the producer, ``send()`` waiting for metadata) runs in an
    executor of its own; acknowledgements are awaited on the event loop."""

    def __init__(
        self,
        kafka: Mapping[str, Any],
        config: JournalApiConfig,
        factory: Callable[..., Any] | None = None,
    ) -> None:
        self.kafka = dict(kafka)
        self.config = config
        self._factory = factory
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="journal-producer"
        )
        self._lock = threading.Lock()
        self._producer: Any = None
        self._topics_ok = False

    def _make(self) -> Any:
        from kafka import KafkaProducer

        t_ms = int(self.config.kafka_timeout_s * 1000)
        kw = {
            **within_timeout(self.kafka, self.config.kafka_timeout_s),
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 2,
            "max_block_ms": t_ms,
            "delivery_timeout_ms": t_ms + 1000,
        }
        if self._factory is not None:
            return self._factory(**kw)
        return build_client(KafkaProducer, **kw)

    def _ensure_topics(self) -> None:
        """Create ``_journal`` and ``_outcomes`` if missing (as the applier does), once."""
        if self._topics_ok or self._factory is not None:
            return
        ensure_journal_topics(
            within_timeout(self.kafka, self.config.kafka_timeout_s),
            (self.config.journal_topic, self.config.outcomes_topic),
            self.config.topic_partitions,
        )
        self._topics_ok = True

    def _send_sync(self, records: Sequence[JournalRecord]) -> tuple[Any, list[Any]]:
        with self._lock:
            if self._producer is None:
                # the producer first: a KafkaAdminClient that cannot bootstrap leaves its IO
                # thread running (kafka-python 3.0.12), a producer does not
                producer = self._make()
                try:
                    self._ensure_topics()
                except BaseException:
                    producer.close(timeout=0)
                    raise
                self._producer = producer
            producer = self._producer
        topic = self.config.journal_topic
        futures = [producer.send(topic, key=r.kafka_key, value=r.to_bytes()) for r in records]
        return producer, futures

    def _drop(self, producer: Any) -> None:
        with self._lock:
            if self._producer is producer:
                self._producer = None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.close(timeout=0)

    async def send(self, records: Sequence[JournalRecord]) -> None:
        """Produce ``records`` in order and wait until Kafka holds every one."""
        if not records:
            return
        loop = asyncio.get_running_loop()
        producer: Any = None
        try:
            producer, futures = await loop.run_in_executor(self._executor, self._send_sync, records)
            waits = [_kafka_future(f, loop) for f in futures]
            await asyncio.wait_for(asyncio.gather(*waits), self.config.kafka_timeout_s + 2.0)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:
            log.warning("journal upload: Kafka did not take %d record(s): %s", len(records), exc)
            await loop.run_in_executor(self._executor, self._drop, producer)
            raise Unavailable(
                f"Kafka did not acknowledge the upload ({type(exc).__name__}); nothing was "
                "acknowledged, upload again",
                retry_after_s=2,
            ) from exc

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.close(timeout=5)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _kafka_future(future: Any, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
    """An asyncio future settled by a kafka-python future's callbacks (sender thread)."""
    out: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, failed: bool) -> None:
        if out.done():
            return
        if failed:
            out.set_exception(value)
        else:
            out.set_result(value)

    future.add_callback(lambda value: loop.call_soon_threadsafe(settle, value, False))
    future.add_errback(lambda exc: loop.call_soon_threadsafe(settle, exc, True))
    return out


class SchemaTypes:
    """Column types from cdc's value schemas in ``{prefix}._schemas``, re-read at most every
    ``refresh_s`` (for relays without access to the captured database).  Thread-safe."""

    def __init__(self, kafka: Mapping[str, Any], prefix: str, refresh_s: float = 30.0) -> None:
        self.kafka = dict(kafka)
        self.prefix = prefix
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._log: Any = None
        self._types: Mapping[str, Mapping[str, ColumnType]] = {}
        self._at = -math.inf

    def __call__(self) -> Mapping[str, Mapping[str, ColumnType]]:
        from relay.downstream.bucket_engine import SchemaLog

        with self._lock:
            if time.monotonic() - self._at < self.refresh_s:
                return self._types
            self._at = time.monotonic()
            try:
                if self._log is None:
                    self._log = SchemaLog(self.kafka, self.prefix)
                if self._log.refresh(timeout=5.0):
                    self._types = column_types_from_schemas(self._log.texts)
            except Exception as exc:
                if not isinstance(exc, OSError) and not is_kafka_error(exc):
                    raise
                log.warning("journal intake: schemas not read (%s); types unchecked here", exc)
            return self._types

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
