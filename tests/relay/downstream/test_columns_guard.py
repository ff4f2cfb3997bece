"""ColumnsGuard (pure): asked once per table and column set, refusing with the change's
table, position and columns named; rows without columns are not checked."""

from __future__ import annotations

import pytest

from relay.downstream.bucket_store import ChangeKind, RowChange
from relay.downstream.columns_guard import ColumnsGuard
from relay.errors import EngineError

T = "public.orders"


def up(pos: int, **row: object) -> RowChange:
    return RowChange(T, ChangeKind.UPSERT, (pos, 0), (row.get("id"),), row)


def test_asks_once_per_column_set_and_refuses_naming_the_change() -> None:
    asked: list[tuple[str, tuple[str, ...]]] = []
    refuse = {("id", "note", "secret_cost")}

    def ask(table: str, columns: tuple[str, ...]) -> str | None:
        asked.append((table, columns))
        return "the rules no longer fit" if columns in refuse else None

    guard = ColumnsGuard(ask)
    guard.check([up(1, id=1, note="a", cost=1), up(2, id=2, note="b", cost=2)])
    guard.check([up(3, id=1, note="c", cost=3)])
    assert asked == [(T, ("id", "note", "cost"))]
    # another column set that fits (a column added): asked once, then known
    guard.check([up(4, id=1, note="d", cost=4, extra="e"), up(5, id=2, note="e", cost=5)])
    guard.check([up(6, id=1, note="f", cost=6, extra="g")])
    assert asked[1:] == [(T, ("id", "note", "cost", "extra"))]
    # deletes, truncates and rows not decoded carry no columns
    guard.check(
        [
            RowChange(T, ChangeKind.DELETE, (7, 0), (1,)),
            RowChange(T, ChangeKind.TRUNCATE, (8, 0)),
            RowChange(T, ChangeKind.UPSERT, (9, 0), (3,), None),
        ]
    )
    assert len(asked) == 2
    with pytest.raises(EngineError) as caught:
        guard.check([up(10, id=1, note="x", cost=1), up(11, id=1, note="y", secret_cost=99)])
    text = str(caught.value)
    assert text.startswith("public.orders: a change at (11, 0) has columns (id, note, secret_cost)")
    assert "the rules no longer fit" in text and "restart the relay" in text
    # refused column sets are asked again (the rules may fit by then)
    with pytest.raises(EngineError):
        guard.check([up(11, id=1, note="y", secret_cost=99)])
    assert asked[-2:] == [(T, ("id", "note", "secret_cost"))] * 2
