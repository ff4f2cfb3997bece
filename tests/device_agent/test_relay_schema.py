"""device_agent.relay_schema: what of the relay's ``/v1/schema`` a device can hold."""

from __future__ import annotations

from typing import Any

import pytest

from device_agent.errors import StateError
from device_agent.relay_schema import parse_schema, sqlite_name_key


def table(name: str, columns: list[str], key: list[str] | None = None) -> dict[str, Any]:
    return {"name": name, "columns": columns, "key": key or columns[:1]}


def test_tables_sqlite_takes_for_one_are_refused_naming_both() -> None:
    """PostgreSQL's ``"Items"`` and ``items`` are two tables; SQLite's ``"Items"`` and
    ``"items"`` are one (``create table if not exists`` of the second did nothing: both
    tables' rows landed in one local table, the app's edits were journaled for both)."""
    body = {"tables": [table("public.Items", ["id", "v"]), table("public.items", ["id", "v"])]}
    with pytest.raises(StateError, match=r"'public.Items' and 'public.items'.*'items'"):
        parse_schema(body)
    other_schema = {"tables": [table("s.T", ["id"]), table("S.t", ["id"])]}
    with pytest.raises(StateError, match="same SQLite name"):
        parse_schema(other_schema)
    same = {"tables": [table("public.t", ["id"]), table("t", ["id"])]}
    with pytest.raises(StateError, match="same SQLite name"):
        parse_schema(same)


def test_columns_sqlite_takes_for_one_are_refused_naming_the_table() -> None:
    body = {"tables": [table("public.t", ["id", "Note", "note"])]}
    with pytest.raises(StateError, match=r"columns of public.t, 'Note' and 'note'"):
        parse_schema(body)


def test_names_differing_beyond_ascii_case_are_distinct() -> None:
    """SQLite folds only ASCII letters: ``Ä`` and ``ä`` are two names."""
    assert sqlite_name_key("Ärger_X") == "Ärger_x"
    schema = parse_schema(
        {"tables": [table("public.Ä", ["id", "Ü", "ü"]), table("public.ä", ["id"])]}
    )
    assert [t.local for t in schema.tables] == ["Ä", "ä"]
    assert schema.tables[0].columns == ("id", "Ü", "ü")
