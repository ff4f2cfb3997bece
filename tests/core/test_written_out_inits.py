"""Dataclasses whose ``__init__`` is written out (``init=False``; each field set with
``object.__setattr__`` when frozen, else ``self.field = …``: plain stores once mypyc
compiles them: core/journal_format.py, core/journal_outcomes.py, core/avro_envelope.py,
cdc/change_assembler.py).

A field added to such a class but not to its ``__init__`` would be left unset and fail
far from the cause, so every one of them in the project's sources is checked here: its
``__init__`` takes the fields in their order, with the fields' defaults (``None`` for one
made by a factory), and sets each of them exactly once.  Their behaviour as values
(frozen, equal, hashable, ``dataclasses.replace``) is checked on the real classes.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from core.hlc import Hlc
from core.journal_format import BasePosition, JournalEntry, JournalRecord, Op
from core.journal_outcomes import Outcome, OutcomeKind
from relay.upstream.merge import Action, EditTimes, MergeResult
from tests.schemas import REPO

PACKAGES = ("core", "cdc", "relay", "device_agent", "replay", "fieldsync")


def _written_out_classes() -> list[tuple[Path, ast.ClassDef]]:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef) and any(
                    isinstance(d, ast.Call)
                    and getattr(d.func, "id", None) == "dataclass"
                    and any(
                        k.arg == "init" and getattr(k.value, "value", True) is False
                        for k in d.keywords
                    )
                    for d in node.decorator_list
                ):
                    found.append((path, node))
    return found


def _fields(cls: ast.ClassDef) -> list[tuple[str, str]]:
    """(name, default source) of each field; a ``field(default_factory=…)`` as "None"."""
    out = []
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            value = stmt.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
                default = "None"
            else:
                default = ast.unparse(value) if value is not None else ""
            out.append((stmt.target.id, default))
    return out


def test_there_are_written_out_inits_to_check() -> None:
    names = {cls.name for _, cls in _written_out_classes()}
    assert {
        "JournalEntry",
        "Outcome",
        "JournalRecord",
        "MergeResult",
        "EditTimes",
        "Source",
        "OutEvent",
        "TxnEnd",
    } <= names


@pytest.mark.parametrize(
    ("path", "cls"),
    [pytest.param(p, c, id=c.name) for p, c in _written_out_classes()],
)
def test_init_takes_and_sets_every_field(path: Path, cls: ast.ClassDef) -> None:
    init = next(s for s in cls.body if isinstance(s, ast.FunctionDef) and s.name == "__init__")
    params = init.args.args[1:]
    defaults = [""] * (len(params) - len(init.args.defaults)) + [
        ast.unparse(d) for d in init.args.defaults
    ]
    assert [(p.arg, d) for p, d in zip(params, defaults, strict=True)] == _fields(cls), (
        f"{path.name}: {cls.name}.__init__ does not take its fields in order, with their defaults"
    )
    set_fields = [
        call.args[1].value
        for call in ast.walk(init)
        if isinstance(call, ast.Call)
        and ast.unparse(call.func) == "object.__setattr__"
        and isinstance(call.args[1], ast.Constant)
    ] + [  # a class that is not frozen sets self.<field>
        target.attr
        for stmt in ast.walk(init)
        if isinstance(stmt, ast.Assign)
        for target in stmt.targets
        if isinstance(target, ast.Attribute) and ast.unparse(target.value) == "self"
    ]
    assert set_fields == [name for name, _ in _fields(cls)], f"{path.name}: {cls.name}"


def test_written_out_classes_are_still_frozen_equal_and_hashable_values() -> None:
    hlc = Hlc(1, 2, "dev-1")
    entry = JournalEntry(3, "public.t", Op.UPDATE, (3,), {"a": 1}, {"a": 2}, hlc)
    assert entry == JournalEntry(3, "public.t", Op.UPDATE, (3,), {"a": 1}, {"a": 2}, hlc)
    assert entry.base is None and entry.prev_seq is None and entry.key_columns is None
    assert dataclasses.replace(entry, seq=4).seq == 4
    assert BasePosition(1, 2) < BasePosition(1, 3)
    assert hash(BasePosition(1, 2)) == hash(BasePosition(1, 2))
    record = JournalRecord("dev-1", 3, entry)
    assert record.claims == {} and record.rejection is None and record.received_at_us == 0
    outcome = Outcome("dev-1", 3, OutcomeKind.APPLIED)
    assert outcome.columns == {} and outcome.message == ""
    assert outcome.columns is not Outcome("dev-1", 4, OutcomeKind.APPLIED).columns
    assert outcome.with_visible_after(7) == dataclasses.replace(outcome, visible_after=7)
    result = MergeResult(OutcomeKind.APPLIED, Action.UPDATE, {"a": 2}, None)
    assert result.columns == {} and result.held == {} and result.held_row is None
    times = EditTimes(hlc, None, 5, 0)
    for value, name in ((entry, "seq"), (record, "seq"), (outcome, "seq"), (times, "now_ms")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, name, 9)
