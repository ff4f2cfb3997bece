"""ColumnsGuard (pure): asked once per table and column set, refusing with the change's
table, position and columns named; rows without columns are not checked."""

from __future__ import annotations

import pytest

from relay.downstream.bucket_store import ChangeKind, RowChange
from relay.downstream.columns_guard import ColumnsGuard, ask_follower
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


class FakeFollower:
    def __init__(self, fails: bool = False, unfit: str | None = None) -> None:
        self.fails, self.unfit, self.checks = fails, unfit, 0

    def check(self) -> bool:
        self.checks += 1
        if self.fails:
            raise OSError("connection refused")
        return False


def test_ask_follower_answers_from_a_fresh_check_and_fails_closed() -> None:
    followers: list[FakeFollower] = []
    ask = ask_follower(followers)
    assert ask(T, ("id",)) == "the tables' definitions have not been read yet"
    followers.append(FakeFollower())
    assert ask(T, ("id",)) is None and followers[0].checks == 1
    followers[0].unfit = "the rules no longer fit the tables (public.orders: cost dropped)"
    assert ask(T, ("id",)) == followers[0].unfit
    followers[0] = FakeFollower(fails=True)
    why = ask(T, ("id",))
    assert why == "the tables' definitions cannot be read (connection refused)"
    # the engine then refuses the batch (EngineError), which its run loop retries
    with pytest.raises(EngineError, match="cannot be read"):
        ColumnsGuard(ask).check([up(1, id=1)])
