"""cdc.kafka_bulk: the gzip level of handed-over batches changes their size on the wire, never
their records: a batch compressed by the fast builder reads back as the records appended."""

from __future__ import annotations

import gzip

from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.record.default_records import DefaultRecordBatch

from cdc.kafka_bulk import GZIP_LEVEL, _fast_gzip_builder_class
from cdc.kafka_records import HEADER_SIZE, RecordBuffer, encode_headers

GZIP = 1  # kafka's compression attribute for gzip


def _build(buffer: RecordBuffer, compression: int) -> bytes:
    builder = _fast_gzip_builder_class()(
        magic=2,
        compression_type=compression,
        is_transactional=True,
        producer_id=7,
        producer_epoch=1,
        base_sequence=0,
        batch_size=len(buffer.buf),
    )
    builder._buffer = buffer.buf
    builder._num_records = buffer.count
    builder._last_offset = buffer.count - 1
    builder._first_timestamp = buffer.first_ts
    builder._max_timestamp = buffer.max_ts
    return bytes(builder.build())


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.none() | st.binary(max_size=40), st.binary(max_size=600)),
        min_size=1,
        max_size=60,
    ),
    st.sampled_from([0, GZIP]),
)
def test_a_built_batch_reads_back_as_its_records(
    recs: list[tuple[bytes | None, bytes]], compression: int
) -> None:
    buffer = RecordBuffer()
    for i, (key, value) in enumerate(recs):
        buffer.append(1_700_000_000_000 + i, key, value, encode_headers([("fieldsync.pos", b"p")]))
    plain = bytes(buffer.buf[HEADER_SIZE:])
    built = _build(buffer, compression)
    batch = DefaultRecordBatch(built)
    assert batch.validate_crc()
    got = [(r.key, r.value, r.headers) for r in batch]
    assert got == [(k, v, [("fieldsync.pos", b"p")]) for k, v in recs]
    if batch.compression_type:  # compressed only when asked, and only when smaller
        assert compression == GZIP
        assert gzip.decompress(built[HEADER_SIZE:]) == plain
    else:
        assert built[HEADER_SIZE:] == plain


def test_change_events_are_compressed_at_the_fast_level() -> None:
    buffer = RecordBuffer()
    for i in range(2000):
        value = b"\xc3\x01" + bytes(8) + f"row {i} {i * 7919:x} public.t bulk".encode() * 3
        buffer.append(1_700_000_000_000, str(i).encode(), value, encode_headers([]))
    plain = bytes(buffer.buf[HEADER_SIZE:])
    built = _build(buffer, GZIP)
    assert DefaultRecordBatch(built).compression_type == GZIP
    assert built[HEADER_SIZE:] == gzip.compress(plain, compresslevel=GZIP_LEVEL, mtime=0)
    assert len(built) < len(plain) // 2
