"""Intake checks every number (and every value) of a journal entry against the range of
the column that holds it: the upload's seq (400 for the whole upload), ``base`` and
``prev_seq`` (``malformed``), and the values of each column type, at each boundary,
which the intake accepts exactly when PostgreSQL accepts them (checked against the real
server)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from core.errors import JournalFormatError
from core.hlc import Hlc
from core.journal_format import (
    MAX_BIGINT,
    MAX_KEY_VALUES,
    MAX_TABLE_CHARS,
    JournalEntry,
    JournalRecord,
    Reason,
)
from core.values import ColumnType, Kind, coerce_value, dump_json, to_pg_text
from relay.errors import UploadError
from relay.upstream.validation import RejectedUpload, parse_upload

DEVICE = "tab-1"


def raw(seq: Any, **fields: Any) -> dict[str, Any]:
    entry = {
        "seq": seq,
        "table": "public.work_orders",
        "op": "update",
        "key": [7],
        "old": {"id": 7, "notes": "a"},
        "new": {"notes": "b"},
        "base": {"commit_lsn": 100, "seq": 0},
        "hlc": Hlc(1_700_000_000_000, 0, DEVICE).encode(),
        "prev_seq": None,
    }
    entry.update(fields)
    return entry


@pytest.mark.parametrize("seq", [1, 2, MAX_BIGINT])
def test_seqs_up_to_bigint_are_accepted(seq: int) -> None:
    (got,) = parse_upload({"entries": [raw(seq)]}, DEVICE)
    assert isinstance(got, JournalEntry) and got.seq == seq


@pytest.mark.parametrize(
    "seq", [0, -1, MAX_BIGINT + 1, (1 << 64) - 1, float(1 << 64), 1.0, "1", True, None, [1]]
)
def test_a_seq_out_of_bigint_range_or_not_an_integer_refuses_the_upload(seq: Any) -> None:
    """400 for the whole upload: the seq identifies the entry, so it cannot even be
    rejected on its own (and a retry would fail again, so it must not be a 503)."""
    with pytest.raises(UploadError, match=r"entries\[1\] has no seq") as caught:
        parse_upload({"entries": [raw(1), raw(seq)]}, DEVICE)
    assert caught.value.status == 400 and caught.value.code == "bad_upload"


@pytest.mark.parametrize("part", ["commit_lsn", "seq"])
@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (0, True),
        (MAX_BIGINT, True),
        (-1, False),
        (MAX_BIGINT + 1, False),
        ((1 << 64) - 1, False),
        (1.0, False),
        ("5", False),
        (True, False),
        (None, False),
    ],
)
def test_base_positions_must_fit_bigint(part: str, value: Any, ok: bool) -> None:
    base = {"commit_lsn": 100, "seq": 0, part: value}
    (got,) = parse_upload({"entries": [raw(5, base=base)]}, DEVICE)
    if ok:
        assert isinstance(got, JournalEntry) and got.base is not None
        assert getattr(got.base, part) == value
    else:
        assert isinstance(got, RejectedUpload) and got.rejection.reason is Reason.MALFORMED
        assert f"base.{part}" in got.rejection.message


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prev_seq": 5}, "prev_seq"),
        ({"prev_seq": 0}, "prev_seq"),
        ({"prev_seq": MAX_BIGINT + 1}, "prev_seq"),
        ({"prev_seq": "4"}, "prev_seq"),
        ({"table": ""}, "table"),
        ({"table": "x" * (MAX_TABLE_CHARS + 1)}, "table"),
        ({"table": "public.work\x00orders"}, "table"),
        ({"table": "public.work\norders"}, "table"),
        ({"table": 7}, "table"),
        ({"key": [1] * (MAX_KEY_VALUES + 1)}, "key"),
        ({"key": {}}, "key"),
        ({"base": {"commit_lsn": 1}}, "base"),
        ({"base": {"commit_lsn": 1, "seq": 0, "x": 1}}, "base"),
        ({"base": [1, 0]}, "base"),
    ],
)
def test_other_fields_out_of_range_are_malformed(fields: dict[str, Any], message: str) -> None:
    (got,) = parse_upload({"entries": [raw(5, **fields)]}, DEVICE)
    assert isinstance(got, RejectedUpload) and got.rejection.reason is Reason.MALFORMED
    assert message in got.rejection.message


def test_a_table_of_the_longest_length_is_read() -> None:
    (got,) = parse_upload({"entries": [raw(5, table="t" * MAX_TABLE_CHARS)]}, DEVICE)
    assert isinstance(got, JournalEntry)


def record(**fields: Any) -> bytes:
    obj: dict[str, Any] = {
        "v": 1,
        "device_id": DEVICE,
        "seq": 5,
        "received_at_us": 1,
        "claims": {},
        "entry": raw(5),
        "rejection": None,
    }
    obj.update(fields)
    return dump_json(obj)


@pytest.mark.parametrize(
    "fields",
    [
        {"seq": MAX_BIGINT + 1},
        {"seq": 0},
        {"device_id": "tab\x00x"},
        {"device_id": ""},
        {"device_id": "x" * 129},
        {"device_id": 7},
    ],
)
def test_journal_records_that_cannot_be_recorded_are_unreadable(fields: dict[str, Any]) -> None:
    with pytest.raises(JournalFormatError):
        JournalRecord.from_bytes(record(**fields))


def test_journal_records_with_a_bad_entry_become_rejections() -> None:
    bad_base = JournalRecord.from_bytes(
        record(entry=raw(5, base={"commit_lsn": MAX_BIGINT + 1, "seq": 0}))
    )
    assert bad_base.entry is None and bad_base.rejection is not None
    assert "base.commit_lsn" in bad_base.rejection.message
    other_seq = JournalRecord.from_bytes(record(entry=raw(6)))
    assert other_seq.entry is None and other_seq.rejection is not None
    weird_time = JournalRecord.from_bytes(record(received_at_us=MAX_BIGINT + 1))
    assert weird_time.received_at_us == 0 and weird_time.entry is not None


# --------------------------------------------------------------------------- values vs PostgreSQL

FLOAT4 = ColumnType(Kind.FLOAT, "float4", 32)
FLOAT8 = ColumnType(Kind.FLOAT, "float8", 64)
NUMERIC = ColumnType(Kind.NUMERIC, "numeric")
MONEY = ColumnType(Kind.DECIMAL, "numeric(10,2)", precision=10, scale=2)

BOUNDARIES: list[tuple[ColumnType, list[Any]]] = [
    (ColumnType(Kind.INT, "int2", 16), [32767, 32768, -32768, -32769]),
    (ColumnType(Kind.INT, "int4", 32), [(1 << 31) - 1, 1 << 31, -(1 << 31), -(1 << 31) - 1]),
    (
        ColumnType(Kind.INT, "int8", 64),
        [MAX_BIGINT, MAX_BIGINT + 1, -MAX_BIGINT - 1, (1 << 64) - 1],
    ),
    (ColumnType(Kind.INT, "oid", 32), [0, (1 << 32) - 1, 1 << 32]),
    (
        FLOAT4,
        [3.4028234663852886e38, 3.40282357e38, -3.5e38, 1.4e-45, 7.1e-46, 7e-46, 1e-46, 0.0],
    ),
    (FLOAT4, [(1 << 64) - 1, "NaN", "-Infinity"]),
    (FLOAT8, [1.7976931348623157e308, 5e-324, -5e-324, (1 << 64) - 1, "Infinity"]),
    (
        NUMERIC,
        [
            "1e131071",
            "1e131072",
            "-1e131071",
            "9" * 131072,
            "9" * 131073,
            "1e-16383",
            "1e-16384",
            "0." + "0" * 16382 + "1",
            "0." + "0" * 16383 + "1",
            "0e-16384",
            "NaN",
        ],
    ),
    (MONEY, ["99999999.99", "99999999.995", "-99999999.994", "1e8", "1e-20000", 12]),
    (ColumnType(Kind.DATE, "date"), [2_145_031_948, 2_145_031_949, -2_440_588, -2_440_589]),
    (ColumnType(Kind.TIME, "time"), [0, 86_400_000_000, 86_400_000_001, -1]),
    (
        ColumnType(Kind.TIMESTAMP, "timestamp"),
        [MAX_BIGINT, -210_866_803_200_000_000, -210_866_803_200_000_001, "INFINITY"],
    ),
    (ColumnType(Kind.TIMESTAMPTZ, "timestamptz"), [MAX_BIGINT, -210_866_803_200_000_000]),
    (
        ColumnType(Kind.INTERVAL, "interval"),
        [{"months": (1 << 31) - 1, "days": -(1 << 31), "micros": MAX_BIGINT}],
    ),
    (ColumnType(Kind.TEXT, "text"), ["a\x00b", "é\U0001f600"]),
    (
        ColumnType(Kind.JSON, "jsonb"),
        ['"\\u0000"', '"\\\\u0000"', '{"a": "\\u0000x"}', '"\\u0001"'],
    ),
    (ColumnType(Kind.JSON, "json"), ['"\\u0000"', '{"a": 1}', "{"]),
    (ColumnType(Kind.UUID, "uuid"), ["6f1c1a9e-0b0e-4a86-9b38-3c8e3b7f1a2d", "not-a-uuid"]),
]


@pytest.mark.parametrize(
    ("ct", "value"),
    [pytest.param(ct, v, id=f"{ct.pg_type}:{str(v)[:30]}") for ct, vs in BOUNDARIES for v in vs],
)
def test_intake_accepts_a_value_exactly_when_postgresql_does(
    pg_conn: psycopg.Connection[Any], ct: ColumnType, value: Any
) -> None:
    try:
        normal = coerce_value(ct, value)
        ours = True
    except ValueError:
        ours = False
    text = to_pg_text(ct, normal) if ours else value
    if not isinstance(text, str):
        text = str(text)
    try:
        with pg_conn.transaction():
            pg_conn.execute(f"select %s::{ct.pg_type}", (text,))
        theirs = True
    except (psycopg.DataError, psycopg.errors.ProgramLimitExceeded, ValueError):
        theirs = False
    assert ours == theirs, f"intake {'accepts' if ours else 'refuses'}, PostgreSQL does not"
