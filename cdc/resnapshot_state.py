"""The re-snapshot state in Kafka: the progress record and the recorded catalog.

Both are records of the compacted topic ``{prefix}._cdc_resnapshot``, keyed
``{slot}.resnapshot`` (:class:`cdc.incremental_snapshot.Progress`: queued requests, jobs,
the last key each reached) and ``{slot}.catalog`` (the catalog signatures of the published
tables, :mod:`cdc.ddl_detection`).  A topic of their own: the sink writes them like events,
and ``_cdc_state`` takes the resume position through another path.

:class:`ProgressSink` wraps the Kafka sink: every Kafka transaction that commits while the
progress or the recorded catalog changed also carries them, so they commit atomically with
the rows they describe; a daemon killed in between finds the previous record and reads that
chunk again.  :func:`read_state_records` reads them back (:func:`cdc.kafka_state.read_compacted`:
a tombstone deletes a record; an operator writes one to forget a slot's queued re-snapshots).

Concurrency: used from the daemon's one thread (and by ``fieldsync cdc status``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from cdc.kafka_sink import Headers, KafkaOptions, Sink
from cdc.kafka_state import read_compacted
from cdc.resume_position import ResumePosition

__all__ = [
    "ProgressSink",
    "StateRecords",
    "catalog_key",
    "progress_key",
    "read_state_records",
    "resnapshot_topic",
]


def resnapshot_topic(prefix: str) -> str:
    return f"{prefix}._cdc_resnapshot"


def progress_key(slot: str) -> bytes:
    return f"{slot}.resnapshot".encode()


def catalog_key(slot: str) -> bytes:
    return f"{slot}.catalog".encode()


def read_state_records(
    opts: KafkaOptions, keys: Collection[bytes], timeout_s: float = 30.0
) -> dict[bytes, bytes]:
    """The last committed value of each of ``keys`` in ``{prefix}._cdc_resnapshot``
    (read_committed; the topic is created, compacted, if missing; a key whose last record
    is a tombstone is absent)."""
    return read_compacted(opts, resnapshot_topic(opts.topic_prefix), keys, timeout_s)


class StateRecords(Protocol):
    """Who owns the state records: which changed since the last commit, and the news that
    they were written."""

    def dirty_records(self) -> dict[bytes, bytes]: ...
    def records_written(self) -> None: ...


class ProgressSink:
    """A :class:`~cdc.kafka_sink.Sink` that adds the re-snapshot state records to every
    Kafka transaction it commits while they changed (see the module docstring)."""

    def __init__(self, inner: Sink, owner: StateRecords, topic: str) -> None:
        self.inner = inner
        self.owner = owner
        self.topic = topic

    def begin(self) -> None:
        self.inner.begin()

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        self.inner.send(topic, key, value, headers)

    def publish_schema(self, fingerprint: bytes, schema_json: str) -> None:
        self.inner.publish_schema(fingerprint, schema_json)

    def commit(self, position: ResumePosition) -> None:
        self.start_commit(position)
        self.inner.wait_commit(None)

    def start_commit(self, position: ResumePosition) -> None:
        # the records are taken now: a commit that fails ends the session, and the next
        # one reads the state back from Kafka
        records = self.owner.dirty_records()
        for key, value in records.items():
            self.inner.send(self.topic, key, value, ())
        self.inner.start_commit(position)
        self.owner.records_written()

    def commit_done(self) -> bool:
        return self.inner.commit_done()

    def wait_commit(self, timeout_s: float | None) -> float | None:
        return self.inner.wait_commit(timeout_s)

    def abort(self) -> None:
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()
