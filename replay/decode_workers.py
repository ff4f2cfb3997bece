"""Decoding a large read in worker processes, in order.

Decoding (fastavro, through :func:`core.avro_envelope.decode`) is most of a read's work.
A read that expects many records (``PARALLEL_MIN_RECORDS`` in replay.log_reader) may
hand it to worker processes: :func:`start_pool` makes a ``ProcessPoolExecutor`` (spawn),
each worker gets the log's schemas when it starts, and :func:`decode_in_workers` sends
batches of value bytes and takes the results back in submission order, so the order of
events does not change.  A value a worker cannot decode (a schema published after the
pool started) comes back as None and is decoded by the reader itself, which reads
``_schemas`` again; a worker that cannot start or dies leaves the decoding to the reader.

Concurrency: the reader's thread submits and waits; at most ``2 * workers`` batches are
in flight.  Workers share nothing with the reader but the schemas they were given and
the bytes of each batch.  A generator closed early (a time bound ended the read) cancels
what is in flight and gives every record it holds back (``put_back``), in order, so a
later read starts with them.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Final

from core.avro_envelope import SchemaRegistry, decode
from core.errors import DecodeError
from replay.bounds import Pos

__all__ = ["Decoded", "Item", "decode_in_workers", "start_pool"]

log = logging.getLogger(__name__)

Item = tuple[Pos, Any, Pos]  # (position, Kafka record, dedup position before it)
Decoded = tuple[Pos, Any, Pos, dict[str, Any]]  # an Item and the decoded value
_DECODE_BATCH: Final = 2_000
_UNUSABLE: Final = (BrokenProcessPool, RuntimeError, OSError)
_worker_registry: SchemaRegistry | None = None


def start_pool(workers: int, schemas: list[str]) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes that know ``schemas``."""
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(schemas,),
    )


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


def decode_in_workers(
    items: Iterator[Item],
    pool_of: Callable[[], Any],
    workers: int,
    decode_here: Callable[[Any], dict[str, Any]],
    put_back: Callable[[list[Item]], None],
) -> Generator[Decoded, None, None]:
    """``items`` with their values decoded by the pool ``pool_of()`` in batches, in order;
    ``decode_here`` decodes what the workers could not.  Closed early, it gives the items
    it holds to ``put_back``."""
    pool: Any = pool_of()
    depth = 2 * workers
    pending: deque[tuple[list[Item], Any]] = deque()  # (items, future or None: here)
    batch: list[Item] = []
    current: list[Item] = []
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
                    except _UNUSABLE as exc:
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
                    except _UNUSABLE as exc:
                        log.warning("replay decode worker died (%s); decoding here", exc)
                        pool = None
                while index < len(current):
                    pos, record, last = current[index]
                    d = results[index]
                    index += 1
                    if d is None:
                        d = decode_here(record)
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
        put_back(leftover)
