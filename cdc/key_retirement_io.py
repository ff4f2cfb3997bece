"""Retiring the old keys of a table whose key schema changed: the daemon's side (SQL and
Kafka reads).  The protocol is :mod:`cdc.key_retirement`.

:class:`Retirement` takes a job whose table's key schema changed (``job.retiring``), before
it sends any row, through:

1. a marker: a non-transactional logical decoding message (``fieldsync.heartbeat``),
   written after the DDL (the catalog check that queued the job saw it committed);
2. waiting until the daemon's Kafka-acknowledged position (the slot's flush position) has
   passed the marker, with the stream's open batch committed (:class:`StreamState`), so
   every event under the old key schema is in the topic and no Kafka transaction of ours
   is open while the topic is read;
3. the candidates: the topic's live keys whose last event precedes the marker
   (:func:`cdc.recovery_deletes.scan_live_keys`), and the schemas of their last events
   (``{prefix}._schemas``);
4. the key columns of every row (the table's Kafka key columns now, ``KEY_QUERY``; none
   when it has none: then no row has a key text), in a REPEATABLE READ snapshot between two
   watermarks; the candidates whose key text no row has become the rows of a chunk window
   (:class:`~cdc.resnapshot_stream.InFlightChunk` with a :class:`~cdc.key_retirement.RetireSet`),
   which the stream side writes as deletes at the high watermark's commit.

Memory: the candidates (Kafka keys) and the key text of every row of the table.

Concurrency: runs on the daemon's thread, on the re-snapshot driver's connection; steps 3
and 4 block it for a topic read and a table read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import psycopg
from psycopg import sql

from cdc.change_assembler import topic_for
from cdc.errors import format_lsn, parse_lsn
from cdc.incremental_snapshot import WATERMARK_PREFIX, ChunkWindow, Job, Visibility, Watermark
from cdc.kafka_sink import KafkaOptions
from cdc.key_retirement import KEYLESS_DONE, KeyTexts, RetireSet, old_schema
from cdc.pg_catalog import table_key_columns
from cdc.recovery_deletes import scan_live_keys, schema_registry
from cdc.resnapshot_stream import ChunkTracker, InFlightChunk, Jobs
from cdc.snapshot import COLUMNS_QUERY
from core.avro_envelope import TableCodec
from core.pg_types import output_function_text

__all__ = ["MARKER_PREFIX", "Retirement", "StreamState", "take_step"]

log = logging.getLogger("fieldsync.cdc")

MARKER_PREFIX = "fieldsync.heartbeat"
"""Prefix of the marker message (what the idle heartbeat writes: consumers skip it)."""

CodecFor = Callable[[int, str, str, tuple[tuple[str, int, int], ...], tuple[str, ...]], TableCodec]


class StreamState(Protocol):
    """What the retirement needs of the streaming loop."""

    def flushed_lsn(self) -> int:
        """The position up to which Kafka acknowledged everything the stream read."""
        ...

    def drain(self) -> bool:
        """Commit the open batch and wait for it; True when nothing waits for Kafka."""
        ...


class Retirement:
    """One job's retirement at a time (see the module docstring)."""

    def __init__(self, opts: KafkaOptions, db: str, codec_for: CodecFor, timeout_s: float) -> None:
        self.opts = opts
        self.db = db
        self.codec_for = codec_for
        self.timeout_s = timeout_s
        self._marker: tuple[Job, int] | None = None

    def step(
        self,
        conn: psycopg.Connection[Any],
        job: Job,
        stream: StreamState,
        chunk_id: str,
        generation: int,
    ) -> InFlightChunk | int | str | None:
        """The next step of ``job``'s retirement: a chunk window of deletes to register, 0
        (nothing to delete: the retirement is over), a status that ends the job (the table
        is gone), or None (waiting for the stream)."""
        if self._marker is None or self._marker[0] is not job:
            row = conn.execute(
                "select pg_logical_emit_message(false, %s, '')::text", (MARKER_PREFIX,)
            ).fetchone()
            assert row is not None
            self._marker = (job, parse_lsn(str(row[0])))
            log.info(
                "re-snapshot of %s: old keys are read once Kafka holds the stream up to %s",
                job.table,
                format_lsn(self._marker[1]),
            )
        marker = self._marker[1]
        if stream.flushed_lsn() < marker or not stream.drain():
            return None
        self._marker = None
        return self._read(conn, job, chunk_id, generation, marker)

    def _read(
        self, conn: psycopg.Connection[Any], job: Job, chunk_id: str, generation: int, marker: int
    ) -> InFlightChunk | int | str | None:
        with conn.transaction():
            names = conn.execute(
                "select n.nspname, c.relname from pg_class c "
                "join pg_namespace n on n.oid = c.relnamespace where c.oid = %s",
                (job.oid,),
            ).fetchone()
            if names is None:
                return "done: the table no longer exists"
            key_names = table_key_columns(conn, job.oid)
            columns = tuple(
                (str(n), int(t), int(mod))
                for n, t, mod in conn.execute(COLUMNS_QUERY, (job.oid,)).fetchall()
            )
        schema, table = str(names[0]), str(names[1])
        codec = self.codec_for(job.oid, schema, table, columns, key_names)
        topic = topic_for(self.opts.topic_prefix, schema, table)
        old = scan_live_keys(self.opts, topic, self.timeout_s).live(before=(marker, 0))
        if not old:
            return 0 if key_names else KEYLESS_DONE.format(0)
        registry = schema_registry(self.opts, old, self.timeout_s)
        texts = KeyTexts(codec) if key_names else None
        ordered = tuple(c.name for c in codec.columns if c.is_key)  # the key schema's order
        retire = RetireSet.build(old, registry, texts, ordered)
        present, visibility = self._present(conn, job, schema, table, ordered, texts, chunk_id)
        gone = retire.gone(present)
        log.info(
            "re-snapshot of %s: %d key(s) in %s last written before %s (%d of an old key "
            "schema), %d with no row of now",
            job.table,
            len(old),
            topic,
            format_lsn(marker),
            old_schema(old, codec.key_fingerprint),
            sum(len(retire.by_text[t]) for (t,), _ in gone),
        )
        if not gone:
            return 0 if key_names else KEYLESS_DONE.format(0)
        return InFlightChunk(
            chunk_id=chunk_id,
            job=job,
            generation=generation,
            window=ChunkWindow(chunk_id, gone, visibility),
            codec=codec,
            topic=topic,
            key_names=ordered,
            last_key=None,
            complete=True,
            retire=retire,
        )

    def _present(
        self,
        conn: psycopg.Connection[Any],
        job: Job,
        schema: str,
        table: str,
        key: tuple[str, ...],
        texts: KeyTexts | None,
        chunk_id: str,
    ) -> tuple[set[str], Visibility]:
        """Low watermark; the key text of every row in a REPEATABLE READ snapshot (none
        without key columns); high watermark."""
        emit = "select pg_logical_emit_message(true, %s, %s)"
        conn.execute(emit, (WATERMARK_PREFIX, Watermark(chunk_id, "low", job.table).to_json()))
        present: set[str] = set()
        with conn.transaction():
            conn.execute("set transaction isolation level repeatable read, read only")
            snap = conn.execute("select pg_current_snapshot()::text").fetchone()
            assert snap is not None
            if texts is not None:
                query = sql.SQL("select {} from {}").format(
                    sql.SQL(", ").join(sql.Identifier(k) for k in key),
                    sql.Identifier(schema, table),
                )
                with conn.cursor(name=f"fieldsync_retire_{chunk_id}") as cur:
                    output_function_text(cur)
                    cur.itersize = 10_000
                    cur.execute(query)
                    for row in cur:
                        present.add(texts.of(row))
        conn.execute(emit, (WATERMARK_PREFIX, Watermark(chunk_id, "high", job.table).to_json()))
        return present, Visibility.parse(str(snap[0]))


def take_step(step: InFlightChunk | int | str, job: Job, jobs: Jobs, tracker: ChunkTracker) -> None:
    """Act on a :meth:`Retirement.step` that did not wait: end the job (a status), end the
    retirement (nothing to delete), or register the window of deletes with the stream
    side (unless a transaction the stream already read is invisible to its snapshot: then
    the keys are read again at a later tick)."""
    if isinstance(step, str):
        log.warning("re-snapshot of %s ends: %s", job.table, step, extra={"table": job.table})
        jobs.finish(job, step)
        return
    if isinstance(step, int):
        jobs.retired(job, step)
        return
    unseen = step.window.registered_after(tracker.recent)
    if unseen is not None:
        log.info(
            "re-snapshot of %s: transaction %d, already read from the stream, is not visible "
            "to the read of the keys; reading them again",
            job.table,
            unseen,
        )
        return
    tracker.chunk = step
