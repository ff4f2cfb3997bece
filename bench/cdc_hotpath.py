#!/usr/bin/env python3
"""The cdc hot path alone: pgoutput bytes → decoder → assembler → Avro → Kafka records.

    .venv/bin/python bench/cdc_hotpath.py [--root DIR] [--events N] [--txns]

Helper of ``cdc_bench.py --cases hotpath`` (which runs it once on the checkout as built and
once on a copy of its ``.py`` sources): decodes a generated stream of ``--events`` inserts of
the benchmark's table (one transaction, or one transaction each with ``--txns``), assembles
them into change events and frames each as a Kafka record, in this process, with no I/O.
Prints one JSON line: CPU µs per event (best of 3), a digest of the record bytes (equal for
the compiled and the pure build) and how many modules of the hot path were compiled.

Concurrency: one thread; CPU time (``time.process_time``), so other work on the machine
matters less than for wall-clock figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def _cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def _relation() -> bytes:
    cols = [("id", 20), ("h", 25), ("n", 20), ("ts", 1184), ("note", 25)]
    out = b"R" + struct.pack(">I", 16384) + _cstr("public") + _cstr("t") + b"d"
    out += struct.pack(">H", len(cols))
    for name, oid in cols:
        out += bytes([name == "id"]) + _cstr(name) + struct.pack(">Ii", oid, -1)
    return out


def _insert(i: int) -> bytes:
    values = [str(i), hashlib.md5(str(i).encode()).hexdigest(), str(i)]
    values += ["2026-11-29 23:28:01.123456+00", "bulk"]
    body = struct.pack(">H", len(values))
    for v in values:
        raw = v.encode()
        body += b"t" + struct.pack(">I", len(raw)) + raw
    return b"I" + struct.pack(">I", 16384) + b"N" + body


def stream(events: int, txns: bool) -> list[bytes]:
    """The benchmark table's inserts as pgoutput (protocol 1) messages."""

    def begin(x: int) -> bytes:
        return b"B" + struct.pack(">QqI", 10**9 + x * 100, 817_000_000_000_000, x)

    def commit(x: int) -> bytes:
        return b"C" + struct.pack(">BQQq", 0, 10**9 + x * 100, 10**9 + x * 100 + 8, 0)

    if not txns:
        return [begin(1), _relation(), *(_insert(i) for i in range(events)), commit(1)]
    out: list[bytes] = []
    for i in range(events):
        out += [begin(i + 1), *([_relation()] if i == 0 else []), _insert(i), commit(i + 1)]
    return out


class _Catalog:
    def lookup(self, oid: int) -> Any:
        from core.pg_types import BUILTIN_TYPES

        return BUILTIN_TYPES.get(oid)

    def primary_key(self, relation_oid: int) -> tuple[str, ...] | None:
        return ("id",)


class _NoSpill:
    def append(self, xid: int, message: object) -> None:
        raise AssertionError("nothing is streamed here")

    def append_raw(self, xid: int, sub: int, payload: object, lsn: int) -> None:
        raise AssertionError("nothing is streamed here")

    def abort(self, xid: int, subxid: int) -> None: ...

    def replay(self, xid: int) -> Iterator[Any]:
        return iter(())

    def discard(self, xid: int) -> None: ...

    def open_xids(self) -> Sequence[int]:
        return []


def run(messages: list[bytes]) -> tuple[float, str, int]:
    """(CPU seconds, digest of the record bytes, events)."""
    from cdc.change_assembler import ChangeAssembler, OutEvent
    from cdc.kafka_records import RecordBuffer, encode_headers
    from cdc.pgoutput_decoder import PgOutputDecoder

    decoder = PgOutputDecoder(1)
    asm = ChangeAssembler(
        db="db", topic_prefix="fs", catalog=_Catalog(), spill=_NoSpill(), clock_us=lambda: 1
    )
    buf, events = RecordBuffer(), 0
    t0 = time.process_time()
    for lsn, raw in enumerate(messages):
        for out in asm.feed(decoder.decode(raw, lsn), lsn):
            if type(out) is OutEvent:
                buf.append(1_700_000_000_000, out.key, out.value, encode_headers(out.headers))
                events += 1
    cpu = time.process_time() - t0
    return cpu, hashlib.sha256(bytes(buf.buf)).hexdigest()[:16], events


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--txns", action="store_true", help="one transaction per insert")
    args = p.parse_args(argv)
    sys.path.insert(0, args.root)
    import cdc.pgoutput_decoder

    assert Path(str(cdc.pgoutput_decoder.__file__)).is_relative_to(Path(args.root).resolve())
    messages = stream(args.events, args.txns)
    cpu, digest, events = min(run(messages) for _ in range(3))
    compiled = sum(  # the project's modules this run loaded as extension modules
        not str(getattr(module, "__file__", None) or ".py").endswith(".py")
        for name, module in list(sys.modules.items())
        if name.split(".")[0] in ("cdc", "core")
    )
    print(json.dumps({"us_per_event": cpu / events * 1e6, "digest": digest, "compiled": compiled}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
