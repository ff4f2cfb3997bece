"""Entries made before a column was dropped or renamed on the server: the column, in
``old``, and in ``new`` when the entry does not change it, is left out, so the edit of
the other columns is applied; an entry that changes it is refused as ``unknown_column``,
naming it.  The intake and the applier judge alike (both run
:func:`relay.upstream.validation.validate_entry`).  Pure: value literals."""

from __future__ import annotations

from typing import Any

import pytest

from core.journal_format import EntryProblem, Op, Reason
from relay.upstream.validation import known_columns, validate_entry
from tests.relay.upstream.test_journal import SCOPE, entry

COLUMNS = ("id", "note")
WHERE = "entry 4 (public.t1)"


@pytest.mark.parametrize(
    ("op", "old", "new", "kept_old", "kept_new"),
    [
        # update of another column: the dropped column is only in old
        (
            Op.UPDATE,
            {"id": 1, "note": "a", "extra": "x"},
            {"note": "b"},
            {"id": 1, "note": "a"},
            {"note": "b"},
        ),
        # new gives it the value old has: not changed
        (
            Op.UPDATE,
            {"id": 1, "note": "a", "extra": "x"},
            {"note": "b", "extra": "x"},
            {"id": 1, "note": "a"},
            {"note": "b"},
        ),
        (
            Op.UPDATE,
            {"id": 1, "note": "a", "extra": [1, {"k": None}]},
            {"note": "b", "extra": [1, {"k": None}]},
            {"id": 1, "note": "a"},
            {"note": "b"},
        ),
        # an insert giving it null
        (Op.INSERT, None, {"id": 1, "note": "b", "extra": None}, None, {"id": 1, "note": "b"}),
        # a delete: old only
        (Op.DELETE, {"id": 1, "note": "a", "extra": 5}, None, {"id": 1, "note": "a"}, None),
    ],
)
def test_a_column_the_table_lacks_is_left_out_when_the_entry_does_not_change_it(
    op: Op,
    old: dict[str, Any] | None,
    new: dict[str, Any] | None,
    kept_old: dict[str, Any] | None,
    kept_new: dict[str, Any] | None,
) -> None:
    assert known_columns(op, COLUMNS, old, new, WHERE) == (kept_old, kept_new)


@pytest.mark.parametrize(
    ("op", "old", "new", "named"),
    [
        (Op.UPDATE, {"id": 1, "note": "a", "extra": "x"}, {"extra": "y"}, "'extra'"),
        # not the same JSON value: true is not 1, 1 is not 1.0, [1] is not [true]
        (Op.UPDATE, {"id": 1, "extra": True}, {"extra": 1}, "'extra'"),
        (Op.UPDATE, {"id": 1, "extra": 1}, {"extra": 1.0}, "'extra'"),
        (Op.UPDATE, {"id": 1, "extra": [1]}, {"extra": [True]}, "'extra'"),
        # an update setting a column old lacks
        (Op.UPDATE, {"id": 1, "note": "a"}, {"note": "b", "memo": "m"}, "'memo'"),
        (Op.INSERT, None, {"id": 1, "extra": "x", "memo": 0}, "'extra', 'memo'"),
    ],
)
def test_a_change_of_a_column_the_table_lacks_is_refused_naming_it(
    op: Op, old: dict[str, Any] | None, new: dict[str, Any] | None, named: str
) -> None:
    with pytest.raises(EntryProblem) as caught:
        known_columns(op, COLUMNS, old, new, WHERE)
    rejection = caught.value.rejection
    assert rejection.reason is Reason.UNKNOWN_COLUMN
    assert rejection.message == (
        f"{WHERE}: new changes {named}, which the table does not have (dropped or renamed "
        "on the server): the edit cannot be applied"
    )


def test_rows_naming_only_known_columns_are_passed_on_as_they_are() -> None:
    old, new = {"id": 1, "note": "a"}, {"note": "b"}
    kept_old, kept_new = known_columns(Op.UPDATE, COLUMNS, old, new, WHERE)
    assert kept_old is old and kept_new is new


ROW = {"id": 7, "site": "s1", "technician": "t42", "status": "open", "notes": "a"}


@pytest.mark.parametrize("check_rows", [True, False], ids=["intake", "applier"])
def test_validation_leaves_a_dropped_column_out_of_the_entry(check_rows: bool) -> None:
    # "priority" was dropped on the server after the device made these entries
    update = entry(old={**ROW, "priority": 3}, new={"notes": "b"})
    normalized, rejection = validate_entry(update, SCOPE, check_rows=check_rows)
    assert rejection is None, rejection
    assert normalized.old == ROW and normalized.new == {"notes": "b"}
    assert normalized.written_columns() == ["notes"]

    insert = entry("insert", new={"id": 7, "site": "s1", "technician": "t42", "priority": None})
    normalized, rejection = validate_entry(insert, SCOPE, check_rows=check_rows)
    assert rejection is None, rejection
    assert normalized.new == {"id": 7, "site": "s1", "technician": "t42"}

    delete = entry("delete", old={**ROW, "priority": 3})
    normalized, rejection = validate_entry(delete, SCOPE, check_rows=check_rows)
    assert rejection is None, rejection
    assert normalized.old == ROW

    changes = entry(old={**ROW, "priority": 3}, new={"notes": "b", "priority": 4})
    kept, rejection = validate_entry(changes, SCOPE, check_rows=check_rows)
    assert kept is changes
    assert rejection is not None and rejection.reason is Reason.UNKNOWN_COLUMN
    assert rejection.message == (
        "entry 1 (public.work_orders): new changes 'priority', which the table does not "
        "have (dropped or renamed on the server): the edit cannot be applied"
    )
