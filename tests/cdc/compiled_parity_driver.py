"""Driver of tests/cdc/test_compiled_parity.py: one fixed pgoutput byte stream through the
hot path, every output printed as a JSON line.

Run as ``python -m tests.cdc.compiled_parity_driver SEED`` (with the compiled modules, or
with PYTHONPATH on a copy of the pure sources).  The stream, made from a seeded random
generator, covers every message kind the assembler handles (Begin/Commit, Relation and a
changed Relation, Type, Origin, logical messages, Insert, Update with and without old
tuples, unchanged TOAST values, Delete, Truncate, a streamed transaction with a
subtransaction abort), the builtin types with their special values, and inputs that must
fail (malformed messages, bad values).  Output: the modules that were compiled, then per
message the decoded message's repr and what the assembler returned (events as hex, schemas,
transaction ends, error texts), then the Kafka record batch of every event.
"""

from __future__ import annotations

import json
import random
import struct
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from cdc import pgoutput_messages as m
from cdc.change_assembler import ChangeAssembler, OutEvent, OutSchema, TxnEnd
from cdc.errors import DecodeError
from cdc.kafka_records import RecordBuffer, encode_headers
from cdc.spill_store import FileSpillStore
from core.errors import FieldsyncError
from core.pg_types import BUILTIN_TYPES, TypeInfo
from devtools.compiled import loaded_compiled

# (name, type oid, typmod, text-value maker); the first column is the key
REL_OID = 16384


class Catalog:
    def lookup(self, oid: int) -> TypeInfo | None:
        return BUILTIN_TYPES.get(oid)

    def primary_key(self, relation_oid: int) -> tuple[str, ...] | None:
        return ("id",) if relation_oid == REL_OID else None


class MemorySpill:
    def __init__(self) -> None:
        self.data: dict[int, list[m.Message]] = {}

    def append(self, xid: int, message: m.Message) -> None:
        self.data.setdefault(xid, []).append(message)

    def append_raw(self, xid: int, sub: int, payload: bytes | memoryview, lsn: int) -> None:
        raise AssertionError("row changes are fed decoded here")

    def abort(self, xid: int, subxid: int) -> None:
        if xid == subxid:
            self.data.pop(xid, None)
            return
        msgs = self.data.get(xid, [])
        for i, msg in enumerate(msgs):
            if getattr(msg, "xid", None) == subxid:
                del msgs[i:]
                return

    def replay(self, xid: int) -> Iterator[m.Message]:
        yield from list(self.data.get(xid, []))

    def discard(self, xid: int) -> None:
        self.data.pop(xid, None)

    def open_xids(self) -> Sequence[int]:
        return list(self.data)


def _pick(rng: random.Random, *choices: str) -> str:
    return rng.choice(choices)


def _values(rng: random.Random) -> dict[str, Any]:
    big = rng.randrange(-(2**63), 2**63)
    return {
        "b": lambda: _pick(rng, "t", "f"),
        "i2": lambda: str(rng.randrange(-32768, 32768)),
        "i4": lambda: str(rng.randrange(-(2**31), 2**31)),
        "i8": lambda: str(rng.choice([big, 0, -1, 2**62, rng.randrange(-1000, 1000)])),
        "f4": lambda: _pick(rng, "1.5", "-0", "NaN", "Infinity", "-Infinity", "3.4028235e+38"),
        "f8": lambda: rng.choice(["1e+300", "-2.5e-300", "NaN", repr(rng.uniform(-1e9, 1e9))]),
        "num": lambda: rng.choice(
            ["NaN", f"{rng.randrange(-(10**9), 10**9)}.{rng.randrange(1000):03d}"]
        ),
        "numany": lambda: rng.choice(["NaN", "Infinity", "-Infinity", "0", "-123.000456", "1e-5"]),
        "t": lambda: rng.choice(["", "plain", "ünïcødé ✓", "tab\there", "x" * rng.randrange(300)]),
        "by": lambda: "\\x" + bytes(rng.randrange(256) for _ in range(rng.randrange(8))).hex(),
        "d": lambda: rng.choice(
            ["2026-11-29", "0044-03-15 BC", "infinity", "-infinity", "5874897-12-31"]
        ),
        "tm": lambda: rng.choice(["00:00:00", "23:59:59.999999", "24:00:00", "12:34:56.5"]),
        "ts": lambda: rng.choice(
            [
                "2026-11-29 23:28:01.123456",
                "infinity",
                "1999-01-08 04:05:06",
                "0010-01-01 00:00:00 BC",
            ]
        ),
        "tstz": lambda: rng.choice(
            [
                "2026-11-29 23:28:01.123456+00",
                "-infinity",
                "2000-01-01 00:00:00+05:30",
                "1900-06-30 12:00:00-08",
            ]
        ),
        "iv": lambda: rng.choice(
            ["1 year 2 mons 3 days 04:05:06.789", "-00:00:01", "infinity", "00:00:00"]
        ),
        "u": lambda: f"{rng.getrandbits(128):032x}",
        "j": lambda: rng.choice(['{"a": [1, 2, {"b": null}]}', "[]", '"s"']),
        "ai4": lambda: rng.choice(["{}", "{1,2,NULL,-4}", "{{1,2},{3,4}}"]),
        "atext": lambda: rng.choice(['{"a b",NULL,"\\"q\\"",c}', "{}", '{"NULL",x}']),
        "vc": lambda: rng.choice(["short", "ten chars!"]),
    }


COLUMNS = [
    ("id", 20, -1),
    ("b", 16, -1),
    ("i2", 21, -1),
    ("i4", 23, -1),
    ("f4", 700, -1),
    ("f8", 701, -1),
    ("num", 1700, ((12 << 16) | 3) + 4),
    ("numany", 1700, -1),
    ("t", 25, -1),
    ("by", 17, -1),
    ("d", 1082, -1),
    ("tm", 1083, -1),
    ("ts", 1114, -1),
    ("tstz", 1184, -1),
    ("iv", 1186, -1),
    ("u", 2950, -1),
    ("j", 3802, -1),
    ("ai4", 1007, -1),
    ("atext", 1009, -1),
    ("vc", 1043, 14),
]


def _cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def relation(columns: Sequence[tuple[str, int, int]], xid: int | None = None) -> bytes:
    out = b"R" + (b"" if xid is None else struct.pack(">I", xid))
    out += struct.pack(">I", REL_OID) + _cstr("public") + _cstr("t") + b"d"
    out += struct.pack(">H", len(columns))
    for name, oid, typmod in columns:
        out += bytes([1 if name == "id" else 0]) + _cstr(name) + struct.pack(">Ii", oid, typmod)
    return out


def tuple_data(values: Sequence[str | bytes | None]) -> bytes:
    out = struct.pack(">H", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v == b"u":
            out += b"u"
        else:
            raw = v if isinstance(v, bytes) else v.encode()
            out += b"t" + struct.pack(">I", len(raw)) + raw
    return out


def begin(xid: int, lsn: int) -> bytes:
    return b"B" + struct.pack(">QqI", lsn, 817_000_000_000_000 + xid, xid)


def commit(lsn: int) -> bytes:
    return b"C" + struct.pack(">BQQq", 0, lsn, lsn + 40, 817_000_000_000_001)


def stream(rng: random.Random) -> list[bytes]:
    makers = _values(rng)
    ncols = len(COLUMNS)

    def row(i: int, nulls: bool = True) -> list[str | bytes | None]:
        vals: list[str | bytes | None] = [str(i)]
        for name, _oid, _t in COLUMNS[1:]:
            vals.append(None if nulls and rng.random() < 0.1 else makers[name]())
        return vals

    msgs: list[bytes] = []
    lsn = 0x1_0000_0000
    for xid in range(700, 760):
        lsn += 0x1000
        msgs += [begin(xid, lsn), relation(COLUMNS)]
        if xid % 7 == 0:
            msgs.append(b"O" + struct.pack(">Q", lsn - 5) + _cstr("node_b"))
        if xid % 5 == 0:
            msgs.append(
                b"M\x01"
                + struct.pack(">Q", lsn)
                + _cstr("fieldsync.origin")
                + struct.pack(">I", 10)
                + b"device:d42"
            )
        if xid % 11 == 0:
            msgs.append(b"Y" + struct.pack(">I", 99999) + _cstr("public") + _cstr("mood"))
        for i in range(rng.randrange(1, 12)):
            key = str(xid * 100 + i)
            kind = rng.random()
            if kind < 0.5:
                msgs.append(
                    b"I" + struct.pack(">I", REL_OID) + b"N" + tuple_data(row(xid * 100 + i))
                )
            elif kind < 0.65:
                new = row(xid * 100 + i)
                new[8] = b"u"  # unchanged TOAST text
                msgs.append(b"U" + struct.pack(">I", REL_OID) + b"N" + tuple_data(new))
            elif kind < 0.8:
                old = [key] + [None] * (ncols - 1)
                msgs.append(
                    b"U"
                    + struct.pack(">I", REL_OID)
                    + b"K"
                    + tuple_data(old)
                    + b"N"
                    + tuple_data(row(xid * 100 + i))
                )
            elif kind < 0.9:
                msgs.append(
                    b"U"
                    + struct.pack(">I", REL_OID)
                    + b"O"
                    + tuple_data(row(1))
                    + b"N"
                    + tuple_data(row(2))
                )
            else:
                msgs.append(
                    b"D"
                    + struct.pack(">I", REL_OID)
                    + b"K"
                    + tuple_data([key] + [None] * (ncols - 1))
                )
        if xid % 13 == 0:
            msgs.append(b"T" + struct.pack(">IB", 1, 3) + struct.pack(">I", REL_OID))
        msgs.append(commit(lsn))
    # a changed relation (a column added) in the next transaction
    lsn += 0x1000
    wider = [*COLUMNS, ("extra", 25, -1)]
    msgs += [begin(800, lsn), relation(wider)]
    msgs.append(b"I" + struct.pack(">I", REL_OID) + b"N" + tuple_data([*row(1), "more"]))
    msgs.append(commit(lsn))
    return msgs


def streamed(rng: random.Random, lsn: int) -> list[bytes]:
    """Protocol 2: a streamed transaction with a subtransaction that aborts."""
    makers = _values(rng)
    xid, sub = 900, 901

    def ins(x: int, i: int) -> bytes:
        vals: list[str | bytes | None] = [str(i), *[makers[n]() for n, _o, _t in COLUMNS[1:]]]
        return b"I" + struct.pack(">II", x, REL_OID) + b"N" + tuple_data(vals)

    return [
        b"S" + struct.pack(">IB", xid, 1),
        relation(COLUMNS, xid),
        ins(xid, 1),
        ins(sub, 2),
        b"E",
        b"A" + struct.pack(">II", xid, sub),
        b"S" + struct.pack(">IB", xid, 0),
        ins(xid, 3),
        b"E",
        b"c" + struct.pack(">IBQQq", xid, 0, lsn, lsn + 40, 817_000_000_000_002),
    ]


BAD = [
    b"",
    b"Z",
    b"B\x00\x01",
    b"I" + struct.pack(">I", REL_OID) + b"X",
    b"R" + struct.pack(">I", 1) + b"public",
]


def _out(o: object) -> dict[str, Any]:
    if isinstance(o, OutEvent):
        return {
            "event": [
                o.topic,
                None if o.key is None else o.key.hex(),
                o.value.hex(),
                o.commit_lsn,
                o.seq,
            ],
            "headers": [[n, v.hex()] for n, v in o.headers],
            "ts": o.commit_ts_us,
        }
    if isinstance(o, OutSchema):
        return {"schema": [o.fingerprint.hex(), o.schema_json]}
    assert isinstance(o, TxnEnd)
    return {"end": [o.commit_lsn, o.end_lsn, o.events, o.commit_ts_us, o.streamed]}


def run(seed: int) -> Iterator[str]:
    from cdc.pgoutput_decoder import PgOutputDecoder

    yield json.dumps({"compiled": sorted(loaded_compiled())})
    rng = random.Random(seed)
    buf = RecordBuffer()
    cases = (
        (1, stream(rng), False),
        (2, streamed(rng, 0x9_0000_0000), False),
        (2, streamed(rng, 0xA_0000_0000), True),  # row changes spilled undecoded, as cdc does
    )
    for proto, raw_msgs, undecoded in cases:
        dec = PgOutputDecoder(proto)
        spill: Any = MemorySpill()
        if undecoded:
            spill = FileSpillStore()
            spill.use_decoder(dec.decode_streamed)
        asm = ChangeAssembler(
            db="db", topic_prefix="fs", catalog=Catalog(), spill=spill, clock_us=lambda: 7
        )
        for i, raw in enumerate(raw_msgs):
            lsn = 0x5000 + i
            try:
                if undecoded and asm.spill_change(raw, lsn):
                    yield json.dumps({"spilled": lsn})
                    continue
                msg = dec.decode(raw, lsn)
                line: dict[str, Any] = {"msg": repr(msg), "out": []}
                for o in asm.feed(msg, lsn):
                    line["out"].append(_out(o))
                    if isinstance(o, OutEvent):
                        buf.append(o.seq, o.key, o.value, encode_headers(o.headers))
            except (DecodeError, FieldsyncError) as exc:
                line = {"error": [type(exc).__name__, str(exc)]}
            yield json.dumps(line)
        if undecoded:
            spill.close()
            spill.dir.rmdir()
    yield from _bad_inputs()
    yield json.dumps({"records": bytes(buf.buf).hex(), "count": buf.count})


def _bad_inputs() -> Iterator[str]:
    from cdc.pgoutput_decoder import PgOutputDecoder

    dec = PgOutputDecoder(1)
    for raw in BAD:
        try:
            yield json.dumps({"bad": repr(dec.decode(raw, 77))})
        except DecodeError as exc:
            yield json.dumps({"bad_error": str(exc)})
    asm = ChangeAssembler(db="db", topic_prefix="fs", catalog=Catalog(), spill=MemorySpill())
    asm.feed(dec.decode(begin(1, 0x100), 1), 1)
    asm.feed(dec.decode(relation(COLUMNS), 2), 2)
    for column, text in (("i4", "abc"), ("d", "not a date"), ("by", "\\xzz"), ("i2", "99999")):
        vals: list[str | bytes | None] = ["1", *[None] * (len(COLUMNS) - 1)]
        vals[[c[0] for c in COLUMNS].index(column)] = text
        raw = b"I" + struct.pack(">I", REL_OID) + b"N" + tuple_data(vals)
        try:
            list(asm.feed(dec.decode(raw, 3), 3))
            yield json.dumps({"bad_value": column})
        except FieldsyncError as exc:
            yield json.dumps({"bad_value_error": [type(exc).__name__, str(exc)]})


if __name__ == "__main__":
    for out_line in run(int(sys.argv[1])):
        print(out_line)
