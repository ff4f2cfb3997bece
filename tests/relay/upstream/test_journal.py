"""Journal entries: column types from cdc schemas, value checks and conversions, upload
parsing, validation against rules (write permission), ordering rule, record formats."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.avro_envelope import TableCodec
from core.errors import JournalFormatError
from core.hlc import Hlc
from core.journal_format import JournalEntry, JournalRecord, Op, Reason, Rejection
from core.journal_outcomes import Outcome, OutcomeKind, decode_outcomes, encode_outcomes
from core.pg_types import ColumnSpec, MappingCatalog
from core.pg_values import parse_date as _parse_date
from core.pg_values import parse_time as _parse_time
from core.pg_values import timestamp_parser as _timestamp_parser
from core.value_schemas import column_types_from_schemas
from core.values import (
    ColumnType,
    Kind,
    civil_from_days,
    coerce_value,
    dump_json,
    same_value,
    to_datum,
    to_pg_text,
)
from relay.downstream.rules import TableInfo
from relay.downstream.rules_parser import rules_from_mapping
from relay.errors import BatchTooLarge, RulesError, UploadError
from relay.upstream.validation import (
    JournalLimits,
    RejectedUpload,
    blocked_by,
    parse_upload,
    validate_entry,
)
from relay.upstream.write_rules import WriteScope, check_write

NUMERIC_10_2 = ((10 << 16) | 2) + 4

SPECS = [
    ("id", 20, -1, True),
    ("flag", 16, -1, False),
    ("small", 21, -1, False),
    ("n4", 23, -1, False),
    ("f4", 700, -1, False),
    ("f8", 701, -1, False),
    ("cost", 1700, NUMERIC_10_2, False),
    ("amount", 1700, -1, False),
    ("note", 25, -1, False),
    ("doc", 3802, -1, False),
    ("uid", 2950, -1, False),
    ("blob", 17, -1, False),
    ("day", 1082, -1, False),
    ("at", 1083, -1, False),
    ("ts", 1114, -1, False),
    ("tstz", 1184, -1, False),
    ("span", 1186, -1, False),
    ("ints", 1007, -1, False),
    ("tags", 1009, -1, False),
    ("costs", 1231, NUMERIC_10_2, False),
    ("spans", 1187, -1, False),
]


def value_schema() -> str:
    codec = TableCodec(
        db="app",
        schema="public",
        table="things",
        columns=[ColumnSpec(n, oid, mod, key) for n, oid, mod, key in SPECS],
        catalog=MappingCatalog(),
        unchanged_sentinel=object(),
        warn=lambda _m: None,
    )
    return codec.value_schema_json


TYPES = column_types_from_schemas([value_schema()])["public.things"]


def test_column_types_from_cdc_value_schema() -> None:
    kinds = {c: (t.kind, t.bits) for c, t in TYPES.items()}
    assert kinds["id"] == (Kind.INT, 64)
    assert kinds["small"] == (Kind.INT, 16)
    assert kinds["n4"] == (Kind.INT, 32)
    assert kinds["f4"] == (Kind.FLOAT, 32)
    assert TYPES["cost"].kind is Kind.DECIMAL and (
        TYPES["cost"].precision,
        TYPES["cost"].scale,
    ) == (10, 2)
    assert TYPES["amount"].kind is Kind.NUMERIC
    assert [
        TYPES[c].kind for c in ("note", "doc", "uid", "blob", "day", "at", "ts", "tstz", "span")
    ] == [
        Kind.TEXT,
        Kind.JSON,
        Kind.UUID,
        Kind.BYTES,
        Kind.DATE,
        Kind.TIME,
        Kind.TIMESTAMP,
        Kind.TIMESTAMPTZ,
        Kind.INTERVAL,
    ]
    assert TYPES["ints"].kind is Kind.ARRAY and TYPES["ints"].element == ColumnType(
        Kind.INT, "int4", 32
    )
    costs = TYPES["costs"].element
    assert costs is not None and costs.kind is Kind.DECIMAL and costs.scale == 2
    # the interval record is defined once and referenced by name afterwards
    spans = TYPES["spans"].element
    assert spans is not None and spans.kind is Kind.INTERVAL


def test_non_envelope_schemas_are_ignored() -> None:
    assert (
        column_types_from_schemas(
            ['{"type": "string"}', {"type": "record", "name": "x", "fields": []}]
        )
        == {}
    )


@pytest.mark.parametrize(
    ("column", "value", "normal"),
    [
        ("flag", True, True),
        ("small", -32768, -32768),
        ("f8", 3, 3.0),
        ("f8", "NaN", "NaN"),
        ("cost", "12.5", "12.50"),
        ("cost", 7, "7.00"),
        ("cost", 1.25, "1.25"),
        ("cost", "NaN", "NAN"),
        ("cost", "-0.005", "-0.01"),
        ("amount", "3.14159265358979323846", "3.14159265358979323846"),
        ("amount", "Infinity", "Infinity"),
        ("doc", '{"a": [1]}', '{"a": [1]}'),
        ("uid", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ("blob", "AAEC", "AAEC"),
        ("day", -719528, -719528),
        ("day", "INFINITY", "INFINITY"),
        ("at", 86_400_000_000, 86_400_000_000),
        ("tstz", "NEG_INFINITY", "NEG_INFINITY"),
        (
            "span",
            {"days": -1, "months": 0, "micros": 7200000000},
            {"months": 0, "days": -1, "micros": 7200000000},
        ),
        ("ints", [[1, None], [3, 4]], [[1, None], [3, 4]]),
        ("ints", "[0:1]={7,8}", "[0:1]={7,8}"),
        ("note", None, None),
    ],
)
def test_coerce_accepts_and_normalizes(column: str, value: Any, normal: Any) -> None:
    assert coerce_value(TYPES[column], value) == normal


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("flag", 1, "true or false"),
        ("small", 32768, "out of range"),
        ("n4", True, "integer"),
        ("n4", 1.5, "integer"),
        ("f8", "1.5", "number"),
        ("cost", "12,5", "decimal"),
        ("cost", "123456789.00", "out of range"),
        ("amount", [1], "decimal"),
        ("note", 5, "string"),
        ("note", "a\x00b", "NUL"),
        ("doc", {"a": 1}, "string"),
        ("doc", "{nope", "JSON"),
        ("uid", "not-a-uuid", "UUID"),
        ("blob", "***", "base64"),
        ("day", "2024-01-01", "days"),
        ("at", -1, "microseconds"),
        ("ts", 1.0, "microseconds"),
        ("span", {"months": 1}, "months"),
        ("ints", [1, "x"], "array element"),
        ("ints", {"a": 1}, "array"),
    ],
)
def test_coerce_refuses_with_a_reason(column: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        coerce_value(TYPES[column], value)


def test_same_value_compares_decimals_by_number() -> None:
    assert same_value(TYPES["amount"], "12.5", "12.50")
    assert not same_value(TYPES["amount"], "12.5", "12.51")
    assert not same_value(TYPES["n4"], 1, True)
    assert not same_value(TYPES["f8"], 1, 1.0)
    assert same_value(TYPES["ints"], [1, [2]], [1, [2]])


def test_to_datum_gives_the_decoded_avro_form() -> None:
    from decimal import Decimal

    assert to_datum(TYPES["cost"], "12.50") == Decimal("12.50")
    assert to_datum(TYPES["blob"], "AAEC") == b"\x00\x01\x02"
    assert to_datum(TYPES["f8"], "-Infinity") == float("-inf")
    assert to_datum(TYPES["cost"], "NAN") == "NAN"


@given(st.integers(-2_440_588, 2_145_031_948))
def test_date_text_round_trips_through_the_cdc_parser(days: int) -> None:
    text = to_pg_text(TYPES["day"], days)
    assert text is not None and _parse_date(text) == days


@given(st.integers(-2_440_588 * 86_400_000_000, (1 << 63) - 1))
def test_timestamp_text_round_trips_through_the_cdc_parser(micros: int) -> None:
    for column, with_tz in (("ts", False), ("tstz", True)):
        text = to_pg_text(TYPES[column], micros)
        assert text is not None
        assert _timestamp_parser(with_tz=with_tz)(text) == micros


@given(st.integers(0, 86_400_000_000))
def test_time_text_round_trips(micros: int) -> None:
    text = to_pg_text(TYPES["at"], micros)
    assert text is not None and _parse_time(text) == micros


def test_civil_from_days_known_dates() -> None:
    assert civil_from_days(0) == (1970, 1, 1)
    assert civil_from_days(-719528) == (0, 1, 1)  # 1 BC
    assert to_pg_text(TYPES["day"], -719528) == "0001-01-01 BC"


def test_pg_text_of_other_kinds() -> None:
    assert to_pg_text(TYPES["blob"], "AAEC") == "\\x000102"
    assert to_pg_text(TYPES["cost"], "NAN") == "NaN"
    assert (
        to_pg_text(TYPES["span"], {"months": 1, "days": -2, "micros": 3})
        == "1 mons -2 days 3 microseconds"
    )
    assert to_pg_text(TYPES["tags"], ["a", None, 'q"\\', ["x"]]) == '{"a",NULL,"q\\"\\\\",{"x"}}'
    assert to_pg_text(TYPES["ts"], "INFINITY") == "infinity"
    assert to_pg_text(TYPES["flag"], False) == "false"
    assert to_pg_text(TYPES["note"], None) is None


# --------------------------------------------------------------------------- uploads

DEVICE = "tab-1"
HLC = Hlc(1_700_000_000_000, 0, DEVICE).encode()


def raw(seq: int, **fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "seq": seq,
        "table": "public.work_orders",
        "op": "update",
        "key": [7],
        "old": {"id": 7, "status": "open", "notes": "a"},
        "new": {"notes": "b"},
        "base": {"commit_lsn": 100, "seq": 0},
        "hlc": HLC,
        "prev_seq": None,
    }
    entry.update(fields)
    return entry


def test_parse_upload_reads_entries() -> None:
    got = parse_upload({"entries": [raw(1), raw(2, op="delete", new=None, prev_seq=1)]}, DEVICE)
    assert [type(e) for e in got] == [JournalEntry, JournalEntry]
    first = got[0]
    assert isinstance(first, JournalEntry) and first.op is Op.UPDATE and first.key == (7,)
    assert first.hlc == Hlc.decode(HLC) and first.base is not None and first.base.commit_lsn == 100


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ([raw(1)], UploadError),
        ({"entries": [{"table": "x"}]}, UploadError),
        ({"entries": [raw(2), raw(2)]}, UploadError),
        ({"entries": [raw(i) for i in range(1, 5)]}, BatchTooLarge),
    ],
)
def test_parse_upload_refuses_unusable_uploads(body: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_upload(body, DEVICE, JournalLimits(max_entries=3))


@pytest.mark.parametrize(
    ("fields", "reason", "message"),
    [
        ({"op": "upsert"}, Reason.MALFORMED, "op must be"),
        ({"key": []}, Reason.MALFORMED, "key"),
        ({"old": None}, Reason.MALFORMED, "needs old"),
        ({"op": "insert"}, Reason.MALFORMED, "must not carry old"),
        ({"base": {"commit_lsn": -1, "seq": 0}}, Reason.MALFORMED, "base"),
        ({"prev_seq": 5}, Reason.MALFORMED, "prev_seq"),
        ({"extra": 1}, Reason.MALFORMED, "unknown field"),
        ({"key_columns": "id"}, Reason.MALFORMED, "key_columns"),
        ({"key_columns": ["id", "site"]}, Reason.MALFORMED, "key_columns must be"),
        ({"key_columns": [""]}, Reason.MALFORMED, "key_columns"),
        ({"key_columns": [7]}, Reason.MALFORMED, "key_columns"),
        ({"key": [1, 2], "key_columns": ["id", "id"]}, Reason.MALFORMED, "distinct"),
        ({"hlc": "yesterday"}, Reason.BAD_HLC, "HLC"),
        ({"hlc": Hlc(1, 0, "other").encode()}, Reason.BAD_HLC, "device id"),
        ({"new": {"notes": "x" * 500}}, Reason.ENTRY_TOO_LARGE, "bytes"),
    ],
)
def test_parse_upload_rejects_single_entries(
    fields: dict[str, Any], reason: Reason, message: str
) -> None:
    got = parse_upload(
        {"entries": [raw(1), raw(3, **fields)]}, DEVICE, JournalLimits(max_entry_bytes=400)
    )
    assert isinstance(got[0], JournalEntry)
    bad = got[1]
    assert isinstance(bad, RejectedUpload) and bad.seq == 3
    assert bad.rejection.reason is reason and message in bad.rejection.message


# --------------------------------------------------------------------------- validation

SCHEMA = {
    "public.work_orders": TableInfo(
        ("id", "site", "technician", "status", "cost", "notes"), ("id",)
    ),
    "public.secret": TableInfo(("id", "x"), ("id",)),
}
WO_TYPES = {
    "public.work_orders": {
        "id": ColumnType(Kind.INT, "int8"),
        "site": ColumnType(Kind.TEXT, "text"),
        "technician": ColumnType(Kind.TEXT, "text"),
        "status": ColumnType(Kind.TEXT, "text"),
        "cost": ColumnType(Kind.DECIMAL, "numeric(10,2)", precision=10, scale=2),
        "notes": ColumnType(Kind.TEXT, "text"),
    }
}
RULES = rules_from_mapping(
    {
        "token_claims": ["technician"],
        "bucket": [
            {
                "name": "mine",
                "parameters": ["tech"],
                "claims": {"tech": "technician"},
                "table": [
                    {
                        "table": "public.work_orders",
                        "match": {"technician": "tech"},
                        "filters": [{"column": "status", "op": "!=", "value": "closed"}],
                        "exclude": ["cost"],
                    }
                ],
            }
        ],
    },
    SCHEMA,
)
SCOPE = WriteScope.for_claims(RULES, {"sub": DEVICE, "technician": "t42"}, WO_TYPES)


def entry(op: str = "update", **fields: Any) -> JournalEntry:
    base: dict[str, Any] = {
        "old": {"id": 7, "site": "s1", "technician": "t42", "status": "open", "notes": "a"},
        "new": {"notes": "b"},
    }
    if op == "insert":
        base = {"old": None, "new": {"id": 7, "site": "s1", "technician": "t42", "status": "open"}}
    if op == "delete":
        base["new"] = None
    base.update(fields)
    got = parse_upload({"entries": [raw(1, op=op, **base)]}, DEVICE)[0]
    assert isinstance(got, JournalEntry)
    return got


def test_valid_entries_pass_and_are_normalized() -> None:
    for e in (
        entry(),
        entry("insert"),
        entry("delete"),
        entry(new={"notes": "b", "status": "done"}),
    ):
        normalized, rejection = validate_entry(e, SCOPE)
        assert rejection is None, rejection
        assert normalized.seq == e.seq


@pytest.mark.parametrize(
    ("e", "reason", "message"),
    [
        (entry(table="public.secret"), Reason.UNKNOWN_TABLE, "public.secret"),
        (entry(table="public.nope"), Reason.UNKNOWN_TABLE, "public.nope"),
        (entry(new={"colour": "red"}), Reason.UNKNOWN_COLUMN, "colour"),
        (entry(new={"notes": 5}), Reason.WRONG_TYPE, "notes (text)"),
        (entry(key=["7"]), Reason.WRONG_TYPE, "key"),
        (entry(key=[7, 8]), Reason.BAD_KEY, "primary key"),
        (entry(key_columns=["site"]), Reason.BAD_KEY, "names the row by (site)"),
        (entry("delete", key_columns=["code"]), Reason.BAD_KEY, "table's key is (id)"),
        (entry(new={"id": 8}), Reason.KEY_CHANGE, "cannot change"),
        (
            entry("insert", new={"site": "s1", "technician": "t42", "status": "open"}),
            Reason.BAD_KEY,
            "key column",
        ),
        (entry(old={"id": 7}, new={"notes": "b"}), Reason.MISSING_OLD, "notes"),
        (
            entry(old={"id": 7, "cost": "1.00"}, new={"cost": "2.00"}),
            Reason.FORBIDDEN_COLUMN,
            "cost",
        ),
        (
            entry(old={"id": 7, "site": "s", "technician": "t9", "status": "open", "notes": "a"}),
            Reason.FORBIDDEN_ROW,
            "not in any bucket",
        ),
        (entry(new={"technician": "t9"}), Reason.FORBIDDEN_MOVE, "moves the row out"),
        (entry(new={"status": "closed"}), Reason.FORBIDDEN_MOVE, "moves the row out"),
        (
            entry("insert", new={"id": 7, "site": "s", "technician": "t9", "status": "open"}),
            Reason.FORBIDDEN_MOVE,
            "none of",
        ),
    ],
)
def test_invalid_entries_are_rejected_with_a_reason(
    e: JournalEntry, reason: Reason, message: str
) -> None:
    _, rejection = validate_entry(e, SCOPE)
    assert rejection is not None and rejection.reason is reason, rejection
    assert message in rejection.message
    assert f"entry {e.seq}" in rejection.message


def test_unchanged_columns_do_not_count_as_writes() -> None:
    e = entry(
        old={"id": 7, "site": "s1", "technician": "t42", "status": "open", "cost": "1.00"},
        new={"cost": "1.0"},
    )
    normalized, rejection = validate_entry(e, SCOPE)
    assert rejection is None and normalized.written_columns(WO_TYPES["public.work_orders"]) == []


def test_check_write_judges_full_rows_and_skips_partial_ones() -> None:
    row = {"id": 7, "site": "s", "technician": "t42", "status": "open", "cost": "1.00", "notes": ""}
    assert check_write(SCOPE, "public.work_orders", row, {**row, "notes": "x"}, ["notes"]) is None
    moved = check_write(
        SCOPE, "public.work_orders", row, {**row, "technician": "t1"}, ["technician"]
    )
    assert moved is not None and moved.reason is Reason.FORBIDDEN_MOVE
    other = check_write(
        SCOPE, "public.work_orders", {**row, "technician": "t1"}, row, ["technician"]
    )
    assert other is not None and other.reason is Reason.FORBIDDEN_ROW
    # a row lacking the columns the rules need cannot be judged here
    assert (
        check_write(SCOPE, "public.work_orders", {"id": 7}, {"id": 7, "notes": "x"}, ["notes"])
        is None
    )


def test_blocked_by_follows_prev_seq_only() -> None:
    outcomes = {1: ("rejected", "forbidden_move"), 2: ("applied", None)}
    on_rejected = entry(prev_seq=None)
    assert blocked_by(on_rejected, outcomes.get) is None
    dependent = parse_upload({"entries": [raw(3, prev_seq=1)]}, DEVICE)[0]
    assert isinstance(dependent, JournalEntry)
    blocked = blocked_by(dependent, outcomes.get)
    assert blocked is not None and blocked.reason is Reason.BLOCKED and "entry 1" in blocked.message
    after_applied = parse_upload({"entries": [raw(3, prev_seq=2)]}, DEVICE)[0]
    assert (
        isinstance(after_applied, JournalEntry) and blocked_by(after_applied, outcomes.get) is None
    )
    unknown = parse_upload({"entries": [raw(9, prev_seq=8)]}, DEVICE)[0]
    assert isinstance(unknown, JournalEntry) and blocked_by(unknown, outcomes.get) is None


# --------------------------------------------------------------------------- records


def test_journal_record_round_trip() -> None:
    e = entry()
    record = JournalRecord(DEVICE, e.seq, e, {"sub": DEVICE, "technician": "t42"}, None, 123)
    back = JournalRecord.from_bytes(record.to_bytes())
    assert back == record
    assert record.kafka_key == DEVICE.encode()
    rejected = JournalRecord(DEVICE, 4, None, {}, Rejection(Reason.ENTRY_TOO_LARGE, "too big"), 5)
    assert JournalRecord.from_bytes(rejected.to_bytes()) == rejected


def test_key_columns_are_optional_and_kept_through_validation_and_records() -> None:
    plain = entry()
    assert plain.key_columns is None and "key_columns" not in plain.to_json()
    named = entry(key_columns=["id"])
    assert named.key_columns == ("id",) and named.to_json()["key_columns"] == ["id"]
    normalized, rejection = validate_entry(named, SCOPE)
    assert rejection is None and normalized.key_columns == ("id",)
    record = JournalRecord(DEVICE, named.seq, normalized, {"sub": DEVICE}, None, 1)
    assert JournalRecord.from_bytes(record.to_bytes()).entry == normalized


def test_journal_record_with_a_broken_entry_becomes_a_malformed_rejection() -> None:
    data = json.dumps(
        {"v": 1, "device_id": DEVICE, "seq": 4, "entry": {"seq": 4, "op": "x"}}
    ).encode()
    record = JournalRecord.from_bytes(data)
    assert record.entry is None and record.rejection is not None
    assert record.rejection.reason is Reason.MALFORMED


def test_outcome_round_trip() -> None:
    o = Outcome(
        DEVICE,
        3,
        OutcomeKind.MERGED,
        "public.work_orders",
        (7,),
        None,
        "",
        {"id": 7},
        {"notes": "server"},
        None,
        HLC,
        9,
    )
    other = Outcome(DEVICE, 4, OutcomeKind.REJECTED, reason="blocked", message="entry 4 …")
    assert decode_outcomes(encode_outcomes([o, other])) == [o, other]
    with pytest.raises(ValueError, match="one device"):
        encode_outcomes([o, Outcome("other", 1, OutcomeKind.APPLIED)])


def test_outcomes_carry_visible_after_only_when_set() -> None:
    """The applier's bound: written as an integer when set, absent otherwise (outcomes of
    older appliers read as None); its decimal text is accepted; anything else is refused
    naming the entry."""
    wrote = Outcome(DEVICE, 5, OutcomeKind.APPLIED, "public.work_orders", (7,), visible_after=42)
    none = Outcome(DEVICE, 6, OutcomeKind.REJECTED, reason="forbidden_row")
    assert wrote.to_json()["visible_after"] == 42 and "visible_after" not in none.to_json()
    assert decode_outcomes(encode_outcomes([wrote, none])) == [wrote, none]
    big = (1 << 63) - 1
    assert Outcome.from_json({**none.to_json(), "visible_after": str(big)}).visible_after == big
    assert Outcome.from_json({**none.to_json(), "visible_after": None}).visible_after is None
    for bad in (-1, 1 << 63, "0/16B3748", 1.5, True, [1]):
        with pytest.raises(JournalFormatError, match="entry 6: visible_after"):
            Outcome.from_json({**none.to_json(), "visible_after": bad})


def test_records_keep_integers_beyond_64_bits_exact() -> None:
    e = entry(new={"notes": "b"})
    record = JournalRecord(DEVICE, e.seq, e, {"sub": DEVICE, "n": 2**70}, None, 1)
    assert JournalRecord.from_bytes(record.to_bytes()).claims["n"] == str(2**70)
    assert dump_json({"a": [1, -(2**80)]}) == b'{"a":[1,"-1208925819614629174706176"]}'


# --------------------------------------------------------------------------- writable, claim, widening

SITE_RULES_DATA: dict[str, Any] = {
    "token_claims": ["technician", "sites"],
    "bucket": [
        {
            "name": "mine",
            "parameters": ["tech"],
            "claims": {"tech": "technician"},
            "table": [
                {
                    "table": "public.work_orders",
                    "match": {"technician": "tech"},
                    "exclude": ["cost"],
                }
            ],
        },
        {
            "name": "site",
            "parameters": ["site"],
            "claims": {"site": "sites"},
            "table": [
                {
                    "table": "public.work_orders",
                    "match": {"site": "site"},
                    "filters": [{"column": "status", "op": "=", "value": "open"}],
                    "columns": ["site", "status", "technician"],
                }
            ],
        },
    ],
}


def site_scope(
    mine: dict[str, Any] | None = None, site: dict[str, Any] | None = None
) -> WriteScope:
    """t42 at plant-1: its own orders (all but cost) and the open orders of the site
    (site, status, technician); ``mine``/``site``: extra keys of each rule's table entry."""
    data = json.loads(json.dumps(SITE_RULES_DATA))
    if mine and "columns" in mine:
        del data["bucket"][0]["table"][0]["exclude"]
    data["bucket"][0]["table"][0].update(mine or {})
    data["bucket"][1]["table"][0].update(site or {})
    rules = rules_from_mapping(data, SCHEMA)
    return WriteScope.for_claims(rules, {"technician": "t42", "sites": ["plant-1"]}, WO_TYPES)


COLLEAGUE = {
    "id": 9,
    "site": "plant-1",
    "technician": "t7",
    "status": "open",
    "cost": None,
    "notes": "n",
}
OWN = {**COLLEAGUE, "id": 8, "technician": "t42"}
WO = "public.work_orders"


def test_claiming_a_colleagues_row_widens_and_is_a_forbidden_move() -> None:
    scope = site_scope()
    claimed = {**COLLEAGUE, "technician": "t42"}
    problem = check_write(scope, WO, COLLEAGUE, claimed, ["technician"])
    assert problem is not None and problem.reason is Reason.FORBIDDEN_MOVE
    assert "notes" in problem.message and "claim = true" in problem.message
    # the same write is fine where the rules let that bucket claim rows
    assert (
        check_write(site_scope(mine={"claim": True}), WO, COLLEAGUE, claimed, ["technician"])
        is None
    )


def test_writes_that_show_nothing_new_are_not_widening() -> None:
    scope = site_scope()
    # a colleague's row moved to a third technician: still only the site's columns
    assert (
        check_write(scope, WO, COLLEAGUE, {**COLLEAGUE, "technician": "t9"}, ["technician"]) is None
    )
    # its own row handed to a colleague: it sees less afterwards, not more
    assert check_write(scope, WO, OWN, {**OWN, "technician": "t7"}, ["technician"]) is None
    # its own row edited
    assert check_write(scope, WO, OWN, {**OWN, "notes": "x"}, ["notes"]) is None
    # an insert has no "before": the device wrote the row itself
    assert check_write(scope, WO, None, OWN, [c for c in OWN if c != "cost"]) is None


def test_read_only_buckets_give_no_write_rights() -> None:
    scope = site_scope(site={"writable": False})
    other = check_write(scope, WO, COLLEAGUE, {**COLLEAGUE, "status": "done"}, ["status"])
    assert other is not None and other.reason is Reason.FORBIDDEN_ROW
    assert "writable = false" in other.message
    handed = check_write(scope, WO, OWN, {**OWN, "technician": "t7"}, ["technician"])
    assert handed is not None and handed.reason is Reason.FORBIDDEN_MOVE
    assert "it may write" in handed.message
    # its own row is still writable through its own bucket
    assert check_write(scope, WO, OWN, {**OWN, "notes": "x"}, ["notes"]) is None


def test_columns_are_writable_only_through_writable_buckets() -> None:
    scope = site_scope(mine={"columns": ["notes"]})  # own bucket: id and notes only
    # status is shown by the site bucket, which is writable: fine
    assert check_write(scope, WO, OWN, {**OWN, "status": "open"}, ["status"]) is None
    read_only_site = site_scope(mine={"columns": ["notes"]}, site={"writable": False})
    problem = check_write(read_only_site, WO, OWN, {**OWN, "status": "open"}, ["status"])
    assert problem is not None and problem.reason is Reason.FORBIDDEN_COLUMN


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"writable": "yes"}, "writable must be true or false"),
        ({"claim": 1}, "claim must be true or false"),
        ({"writable": False, "claim": True}, "claim is true but writable is false"),
    ],
)
def test_write_options_are_validated(extra: dict[str, Any], message: str) -> None:
    data = json.loads(json.dumps(SITE_RULES_DATA))
    data["bucket"][1]["table"][0].update(extra)
    with pytest.raises(RulesError, match=message):
        rules_from_mapping(data, SCHEMA)
