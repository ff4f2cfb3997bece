"""Outcome records too large for Kafka are split (relay/upstream/outcome_records.py): before,
an outbox record over kafka-python's 1 MiB ``max_request_size`` (outcomes carry the row
afterwards) was refused at every try and the applier published no outcome for any device
again."""

from __future__ import annotations

from core.journal_outcomes import Outcome, OutcomeKind, decode_outcomes, encode_outcomes
from relay.upstream.outcome_records import OUTCOME_RECORD_BYTES, fit_outcome_records


def applied(seq: int, size: int) -> Outcome:
    return Outcome(
        "dev-1",
        seq,
        OutcomeKind.APPLIED,
        "public.doc",
        (seq,),
        row={"id": seq, "b": "x" * size},
        columns={"b": "device"},
        visible_after=1000 + seq,
    )


def test_a_record_that_fits_is_sent_as_it_is() -> None:
    payload = encode_outcomes([applied(1, 10), applied(2, 10)])
    assert fit_outcome_records(payload) == [payload]


def test_a_large_record_is_split_in_order_and_an_outcome_too_large_alone_loses_its_row() -> None:
    outcomes = [applied(1, 300_000), applied(2, 300_000), applied(3, 2_500_000)]
    outcomes += [applied(4, 400_000), applied(5, 10)]
    records = fit_outcome_records(encode_outcomes(outcomes))
    assert all(len(r) <= OUTCOME_RECORD_BYTES for r in records), [len(r) for r in records]
    back = [o for r in records for o in decode_outcomes(r)]
    assert [o.seq for o in back] == [1, 2, 3, 4, 5]
    assert [o for o in back if o.seq != 3] == [o for o in outcomes if o.seq != 3]
    cut = back[2]
    assert cut.row is None and cut.kind is OutcomeKind.APPLIED
    assert cut.visible_after == 1003 and cut.columns == {"b": "device"}
    assert "the row afterwards is left out of this outcome" in cut.message


def test_a_conflict_too_large_alone_keeps_its_id() -> None:
    big = {"id": 1, "b": "y" * 1_500_000}
    conflict = Outcome(
        "dev-1",
        7,
        OutcomeKind.CONFLICT,
        "public.doc",
        (1,),
        row=big,
        conflict={"id": 42, "row": {"server": big, "device": big}},
    )
    (record,) = fit_outcome_records(encode_outcomes([conflict]))
    (back,) = decode_outcomes(record)
    assert back.conflict == {"id": 42} and back.row is None
    assert "conflict versions are left out" in back.message
