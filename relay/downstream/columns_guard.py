"""The bucket engine's check that the rules fit the columns of the changes it places.

The rules are bound to each table's columns (relay/downstream/table_follower.py rebinds
them when a definition changes).  A change whose row has columns the rules were not
bound to comes from a table whose definition changed after they were: placed under the
earlier rules, a column renamed from one a rule excludes would be sent to devices, and
one renamed from a column a rule lists would reach them as missing.  So before the engine
places a change of a table with a column set it has not seen fit, it asks ``ask(table,
columns)`` (in ``fieldsync relay run``: the table follower checks the definitions at once
and rebinds the rules when they fit, relay/server.py): None means go on, a text why
not, and then the batch is not applied (:class:`relay.errors.EngineError`; the engine
retries from its stored offsets, placing nothing more, until the rules fit again).

Rows the engine did not decode in full (placed nowhere from their placement columns),
deletes and truncates carry no columns and are not checked.  Cost: one comparison of a
row's keys with the table's last column set per change.

Used by the engine thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import Protocol

from relay.downstream.bucket_store import RowChange
from relay.errors import EngineError

__all__ = ["ColumnsGuard", "Follower", "ask_follower"]


class Follower(Protocol):
    """What :func:`ask_follower` needs of relay.downstream.table_follower.TableFollower."""

    unfit: str | None

    def check(self) -> bool: ...


def ask_follower(followers: Sequence[Follower]) -> Callable[[str, tuple[str, ...]], str | None]:
    """The question for :class:`ColumnsGuard` in ``fieldsync relay run``: have the table
    follower (``followers[0]``, there once the follower runs) read the definitions now,
    rebinding the rules when they fit; its :attr:`unfit` is the answer.  No follower yet,
    or definitions that cannot be read now: a reason, so that nothing is placed until
    they can be (the engine retries)."""

    def ask(table: str, columns: tuple[str, ...]) -> str | None:
        if not followers:
            return "the tables' definitions have not been read yet"
        try:
            followers[0].check()
        except Exception as exc:  # unreadable now: retried, placing nothing meanwhile
            return f"the tables' definitions cannot be read ({exc})"
        return followers[0].unfit

    return ask


class ColumnsGuard:
    """Asks ``ask`` once per table and column set not seen fitting (see the module); with
    ``ask`` None it checks nothing."""

    def __init__(self, ask: Callable[[str, tuple[str, ...]], str | None] | None) -> None:
        self.ask = ask
        self._fitting: dict[str, set[frozenset[str]]] = {}
        self._last: dict[str, AbstractSet[str]] = {}

    def check(self, changes: Sequence[RowChange]) -> None:
        """Raise EngineError, naming the change, if the rules do not fit its columns."""
        ask = self.ask
        if ask is None:
            return
        last = self._last
        for change in changes:
            row = change.row
            if row is None:
                continue
            known = last.get(change.table)
            if known is not None and row.keys() == known:
                continue
            columns = frozenset(row)
            fitting = self._fitting.setdefault(change.table, set())
            if columns not in fitting:
                why = ask(change.table, tuple(row))
                if why is not None:
                    raise EngineError(
                        f"{change.table}: a change at {change.position} has columns "
                        f"({', '.join(row)}) the rules were not bound to: {why}; the engine "
                        "places nothing more until the rules fit the table again (fix the "
                        "rules file and restart the relay)"
                    )
                fitting.add(columns)
            last[change.table] = columns
