"""What of a rule set the bucket store's contents depend on, and how two such sets differ.

The bucket store keeps every row in the buckets the rules placed it in, with the columns
they projected (docs/relay.md, "Rules changes").  A store built under one rule set and
served under another is silently wrong: rows the new rules place elsewhere stay where
they were, a new rule's buckets stay empty, a changed column list keeps the old columns,
until each row happens to change again.  So the store records the *placement* of the
rules it was built with, and a relay refuses to serve it under a different one
(:meth:`relay.downstream.pg_bucket_store.PgBucketStore.bind_rules`).

The placement is, per bucket rule: its parameters (their order is the order of the
values in bucket ids) and, per table, its ``match`` pairs, its filters (with their
values as compared: canonical texts, dates and times as the events' integers) and its
``columns`` / ``exclude`` lists.  What does not change the store is left out: a rule's
description, its parameters' claims (which buckets a *token* gets), ``writable`` and
``claim`` (the write path), ``token_claims``, the order of rules, tables, filters and
listed columns.  :func:`placement_of` gives it as plain JSON-able values,
:func:`placement_text` as canonical JSON, :func:`placement_changes` the differences
between two of them, one line each, naming rule, table and key, and
:func:`changed_tables` the tables they concern.  Only those tables matter: the engine
consumes the change topics of the rules' tables only, so a table the store holds
nothing of (no row, no offset of its topic: e.g. one newly given to devices) is read
from the beginning of its topic under the new rules and needs no rebuild.

Pure: values in, values out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from relay.downstream.rules import BucketRule, Rules, TableRule

__all__ = ["changed_tables", "placement_changes", "placement_of", "placement_text"]

Placement = dict[str, Any]
"""``{rule name: {"parameters": [...], "tables": {table: {...}}}}`` (JSON values)."""


def placement_of(rules: Rules) -> Placement:
    """The part of ``rules`` the bucket store's contents depend on."""
    return {name: _rule(rule) for name, rule in sorted(rules.buckets.items())}


def placement_text(rules: Rules) -> str:
    """:func:`placement_of` as canonical JSON (sorted keys, no spaces, ASCII)."""
    return json.dumps(placement_of(rules), sort_keys=True, separators=(",", ":"))


def _rule(rule: BucketRule) -> dict[str, Any]:
    return {
        "parameters": list(rule.parameters),
        "tables": {t: _table(entry) for t, entry in sorted(rule.tables.items())},
    }


def _table(entry: TableRule) -> dict[str, Any]:
    return {
        "match": sorted([column, parameter] for column, parameter in entry.match),
        "filters": sorted([f.column, f.op, sorted(f.values)] for f in entry.filters),
        "columns": None if entry.columns is None else sorted(entry.columns),
        "exclude": sorted(entry.exclude),
    }


def placement_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs from ``old`` to ``new`` (two :func:`placement_of` values), one line per
    difference, naming the bucket rule, the table and the key; empty when they are equal."""
    lines: list[str] = []
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            lines.append(f"bucket rule {name!r} was removed")
        elif name not in old:
            lines.append(f"bucket rule {name!r} was added")
        else:
            lines += _rule_changes(name, old[name], new[name])
    return lines


def changed_tables(old: Mapping[str, Any], new: Mapping[str, Any]) -> set[str]:
    """The tables whose rows ``new`` places or projects differently from ``old``: those
    some rule names whose parameters or entry for the table differ, was added, or gained
    or lost the table.  A rule removed as a whole changes no table: its buckets are no
    longer granted to any token, so devices drop them, whatever the store keeps in them."""
    kept = {name: rule for name, rule in old.items() if name in new}
    tables = _tables_of(kept) | _tables_of(new)
    return {t for t in tables if _slice(kept, t) != _slice(new, t)}


def _tables_of(placement: Mapping[str, Any]) -> set[str]:
    return {t for rule in placement.values() for t in rule.get("tables") or {}}


def _slice(placement: Mapping[str, Any], table: str) -> dict[str, Any]:
    return {
        name: [rule.get("parameters"), rule["tables"][table]]
        for name, rule in placement.items()
        if table in (rule.get("tables") or {})
    }


def _rule_changes(name: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if old.get("parameters") != new.get("parameters"):
        lines.append(
            f"bucket rule {name!r}: parameters {_show(old.get('parameters'))} → "
            f"{_show(new.get('parameters'))}"
        )
    old_tables: Mapping[str, Any] = old.get("tables") or {}
    new_tables: Mapping[str, Any] = new.get("tables") or {}
    for table in sorted(old_tables.keys() | new_tables.keys()):
        where = f"bucket rule {name!r} table {table!r}"
        if table not in new_tables:
            lines.append(f"{where} was removed")
        elif table not in old_tables:
            lines.append(f"{where} was added")
        else:
            before, after = old_tables[table], new_tables[table]
            for key in sorted(before.keys() | after.keys()):
                if before.get(key) != after.get(key):
                    lines.append(
                        f"{where}: {key} {_show(before.get(key))} → {_show(after.get(key))}"
                    )
    return lines


def _show(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    return text if len(text) <= 200 else text[:199] + "…"
