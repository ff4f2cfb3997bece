"""cdc.kafka_records: our record bodies are byte for byte what kafka-python's own batch
builder writes, and a batch finished by kafka-python's header code reads back intact."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from cdc.kafka_records import HEADER_SIZE, RecordBuffer, encode_headers

Rec = tuple[int, bytes | None, bytes | None, list[tuple[str, bytes]]]

records = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2**41),
        st.none() | st.binary(max_size=300),
        st.none() | st.binary(max_size=20000),
        st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=40)), max_size=3),
    ),
    min_size=1,
    max_size=40,
)


def theirs(recs: list[Rec]) -> DefaultRecordBatchBuilder:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=True,
        producer_id=7,
        producer_epoch=1,
        base_sequence=100,
        batch_size=2**31,
    )
    for i, (ts, key, value, headers) in enumerate(recs):
        assert builder.append(i, ts, key, value, headers) is not None
    return builder


def ours(recs: list[Rec]) -> RecordBuffer:
    buffer = RecordBuffer()
    for ts, key, value, headers in recs:
        buffer.append(ts, key, value, encode_headers(headers))
    return buffer


def test_one_record_as_bytes() -> None:
    buffer = RecordBuffer()
    size = buffer.append(1000, b"k", b"value", encode_headers([("h", b"\x01")]))
    # length 17, attrs 0, ts delta 0, offset 0, key len 1 'k', value len 5, 1 header 'h' -> 01
    body = b"\x00\x00\x00" + b"\x02k" + b"\x0avalue" + b"\x02" + b"\x02h" + b"\x02\x01"
    assert bytes(buffer.buf) == bytes(HEADER_SIZE) + bytes([len(body) * 2]) + body
    assert size == 1 + len(body) and buffer.count == 1
    # a tombstone with a null key, 100 ms earlier: length 7, attrs 0, ts delta -100 (zigzag
    # 199), offset 1, key and value lengths -1 (zigzag 1), no headers
    buffer.append(900, None, None, encode_headers([]))
    assert bytes(buffer.buf).endswith(b"\x0e" + b"\x00" + b"\xc7\x01" + b"\x02\x01\x01\x00")
    assert (buffer.first_ts, buffer.max_ts, buffer.count) == (1000, 1000, 2)


@settings(max_examples=150, deadline=None)
@given(records)
def test_bodies_equal_kafka_pythons(recs: list[Rec]) -> None:
    mine, reference = ours(recs), theirs(recs)
    assert bytes(mine.buf[HEADER_SIZE:]) == bytes(reference._buffer[HEADER_SIZE:])
    assert mine.count == len(recs)
    assert mine.first_ts == recs[0][0]
    assert mine.max_ts == max(r[0] for r in recs)


@settings(max_examples=60, deadline=None)
@given(records)
def test_batch_finished_by_kafka_python_reads_back(recs: list[Rec]) -> None:
    mine = ours(recs)
    builder = theirs([recs[0]])  # kafka-python's header code over our buffer
    builder._buffer = mine.buf
    builder._num_records = mine.count
    builder._last_offset = mine.count - 1
    builder._first_timestamp = mine.first_ts
    builder._max_timestamp = mine.max_ts
    batch = DefaultRecordBatch(bytes(builder.build()))
    assert batch.validate_crc()
    got = [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in batch]
    assert got == [(i, ts, k, v, h) for i, (ts, k, v, h) in enumerate(recs)]
