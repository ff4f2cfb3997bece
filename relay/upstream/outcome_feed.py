"""The outcome feed: ``{prefix}._outcomes`` into the relay's outcome store.

The applier publishes each entry's outcome to ``{prefix}._outcomes`` (keyed by device).
:class:`OutcomeFeed` (one leader per store database: a session advisory lock held on its
connection; it runs beside the bucket engine) copies them, every field included (the
applier's ``visible_after`` too: :class:`core.journal_outcomes.Outcome`), into the outcome
store (:meth:`relay.upstream.journal_store.JournalStore.put_outcomes`), with its Kafka
offsets in the same transaction, so a restart neither loses nor repeats a change.
Partitions are assigned as they appear and start at the stored offsets (else at the
beginning).  An unreadable record is logged with its position and skipped.  The leader
also applies ``journal.retention_days`` every ``prune_interval_s``.

Failures of the store or Kafka drop the lead and retry after a back-off (0.5 s doubling
to 30 s).  :meth:`OutcomeFeed.run` runs in one thread (:meth:`OutcomeFeed.running`
starts a daemon thread for a block); :meth:`OutcomeFeed.request_stop` from any.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg

from core.errors import JournalFormatError
from core.journal_outcomes import Outcome, decode_outcomes
from core.kafka_options import build_client, is_kafka_error
from relay.downstream.bucket_engine import FETCH_MAX_WAIT_MS
from relay.errors import JournalStoreError, RelayError
from relay.upstream.intake import outcomes_topic
from relay.upstream.journal_store import JournalStore

__all__ = ["OutcomeFeed"]

log = logging.getLogger("relay.upstream.journal_api")


class OutcomeFeed:
    """Copies ``{prefix}._outcomes`` into the outcome store (see the module docstring).

    :meth:`run` leads or stands by until :meth:`request_stop`; one thread."""

    def __init__(
        self,
        store: JournalStore,
        kafka: Mapping[str, Any],
        prefix: str,
        *,
        refresh_s: float = 5.0,
        standby_s: float = 2.0,
        poll_max: int = 2000,
        retention_days: float = 0.0,
        prune_interval_s: float = 3600.0,
    ) -> None:
        self.store = store
        self.retention_days = retention_days
        self.prune_interval_s = prune_interval_s
        self._pruned = -math.inf
        self.kafka = dict(kafka)
        self.topic = outcomes_topic(prefix)
        self.refresh_s = refresh_s
        self.standby_s = standby_s
        self.poll_max = poll_max
        self.leading = threading.Event()
        self._stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._consumer: Any = None
        self._partitions: set[int] = set()
        self._refreshed = -math.inf
        self.stored = 0

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                if self._conn is None:
                    self._conn = self.store.lead(self.topic)
                    if self._conn is None:
                        self._stop.wait(self.standby_s)
                        continue
                    log.info("outcome feed: leading (%s)", self.topic)
                    self.leading.set()
                while not self._stop.is_set():
                    self.step()
                    self._maybe_prune()
                backoff = 0.5
            except Exception as exc:
                expected = psycopg.Error | RelayError | OSError
                if not isinstance(exc, expected) and not is_kafka_error(exc):
                    raise
                log.error("outcome feed: %s; retrying in %.1fs", exc, backoff)
                self.close()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        self.close()

    def _maybe_prune(self) -> None:
        """The leader applies ``journal.retention_days`` every ``prune_interval_s``."""
        if not self.retention_days or time.monotonic() - self._pruned < self.prune_interval_s:
            return
        self._pruned = time.monotonic()
        intake, outcomes = self.store.prune(self.retention_days)
        if intake or outcomes:
            log.info(
                "journal retention (%g days): deleted %d intake records and %d outcomes",
                self.retention_days,
                intake,
                outcomes,
            )

    def _assign(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self._refreshed = time.monotonic()
        if self._consumer is None:
            self._consumer = build_client(
                KafkaConsumer,
                **self.kafka,
                enable_auto_commit=False,
                isolation_level="read_committed",
                auto_offset_reset="earliest",
                fetch_max_wait_ms=FETCH_MAX_WAIT_MS,  # outcomes reach devices within 50 ms
            )
            self._partitions = set()
        parts = set(self._consumer.partitions_for_topic(self.topic) or ())
        new = sorted(parts - self._partitions)
        if not new:
            return
        assert self._conn is not None
        offsets = self.store.feed_offsets(self._conn, self.topic)
        self._partitions |= set(new)
        self._consumer.assign([TopicPartition(self.topic, p) for p in sorted(self._partitions)])
        for p in new:
            tp = TopicPartition(self.topic, p)
            if p in offsets:
                self._consumer.seek(tp, offsets[p])
            else:
                self._consumer.seek_to_beginning(tp)

    def step(self, timeout_ms: int = 200) -> int:
        """One poll into the store (needs the lead); returns the number of records read."""
        if self._conn is None:
            raise JournalStoreError("the outcome feed is not leading")
        if time.monotonic() - self._refreshed > self.refresh_s or self._consumer is None:
            self._assign()
        if not self._partitions:
            self._stop.wait(timeout_ms / 1000)
            return 0
        batch = self._consumer.poll(timeout_ms=timeout_ms, max_records=self.poll_max)
        outcomes: list[Outcome] = []
        offsets: dict[tuple[str, int], int] = {}
        n = 0
        for tp in sorted(batch, key=lambda t: t.partition):
            for r in batch[tp]:
                n += 1
                offsets[(self.topic, tp.partition)] = r.offset + 1
                try:
                    outcomes.extend(decode_outcomes(r.value or b""))
                except JournalFormatError as exc:  # skip, say where
                    log.error(
                        "outcome record %s/%d@%d unreadable: %s",
                        tp.topic,
                        tp.partition,
                        r.offset,
                        exc,
                    )
        if n:
            self.stored += self.store.put_outcomes(outcomes, conn=self._conn, offsets=offsets)
        return n

    def close(self) -> None:
        self.leading.clear()
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.close()
            self._consumer = None
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()  # releases the lock
            self._conn = None
        self._partitions = set()
        self._refreshed = -math.inf

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Run in a daemon thread for the duration of the block."""
        thread = threading.Thread(target=self._guarded, name="journal-outcome-feed", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self.request_stop()
            thread.join(30)
            if thread.is_alive():
                log.warning("outcome feed did not stop within 30 s")

    def _guarded(self) -> None:
        try:
            self.run()
        except Exception:
            log.exception("outcome feed stopped with an error")
