"""The applier's view of the captured tables: reading it, and noticing when it changed.

The applier binds the rules and conflicts files to the captured database's tables at
start (:func:`bind_catalog`), from their contents as read then (:func:`read_documents`:
an edited file takes effect at a restart).  While it runs, a table's definition may
change (a column added, a key redefined).  :func:`~relay.downstream.table_follower.catalog_mark` is a text that changes
whenever one does: the transaction ids that wrote the tables' ``pg_class``,
``pg_attribute`` and ``pg_index`` rows, which every ``ALTER TABLE``, index, key or replica
identity change writes (so do a few changes that alter nothing an entry is judged by,
such as ``TRUNCATE`` or ``GRANT``: they cost one re-read).  The applier compares it when an
entry names what its view lacks (:func:`names_unknown`) and otherwise at most every
:data:`CATALOG_CHECK_S` (relay/upstream/applier_db.py, ``ApplierDb.follow_catalog``).

I/O: the functions taking a connection read the catalog on it (callers' thread).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, NamedTuple

import psycopg

from core.journal_format import JournalEntry
from relay.config_file import read_toml
from relay.downstream.rules import Rules
from relay.downstream.rules_parser import rules_from_mapping
from relay.downstream.table_follower import catalog_mark
from relay.downstream.table_infos import table_infos_from_conn
from relay.errors import ConflictsError, RulesError
from relay.upstream.applier_tables import TableMeta, read_tables
from relay.upstream.conflict_policies import ConflictPolicies, conflicts_from_mapping

__all__ = [
    "CATALOG_CHECK_S",
    "Documents",
    "bind_catalog",
    "catalog_mark",
    "names_unknown",
    "read_documents",
]

CATALOG_CHECK_S: Final = 1.0
"""Seconds between comparisons of the catalog mark while no entry names anything unknown."""


class Documents(NamedTuple):
    """The rules file's and the conflicts file's contents (None: no conflicts file)."""

    rules: dict[str, Any]
    conflicts: dict[str, Any] | None


def read_documents(rules_path: str | Path, conflicts_path: str | Path | None) -> Documents:
    """Both files read and parsed (their problems raised as RulesError / ConflictsError)."""
    conflicts = read_toml(conflicts_path, ConflictsError) if conflicts_path is not None else None
    return Documents(read_toml(rules_path, RulesError), conflicts)


def bind_catalog(
    conn: psycopg.Connection[Any],
    documents: Documents,
    rules_path: str | Path,
    conflicts_path: str | Path | None,
) -> tuple[Rules, dict[str, TableMeta], ConflictPolicies]:
    """The rules bound to the catalog's tables (as the engine reads them), the tables'
    metadata and the conflict policies checked against their types."""
    rules = rules_from_mapping(documents.rules, table_infos_from_conn(conn), str(rules_path))
    tables = read_tables(conn, rules.tables)
    types = {t: m.types for t, m in tables.items()}
    policies = (
        conflicts_from_mapping(documents.conflicts, str(conflicts_path), types)
        if documents.conflicts is not None
        else ConflictPolicies()
    )
    return rules, tables, policies


def names_unknown(meta: TableMeta | None, entry: JournalEntry) -> bool:
    """Whether ``entry`` names key columns, a number of key values or columns that
    ``meta`` (the applier's view of its table) lacks."""
    if meta is None:
        return False
    if entry.key_columns is not None and entry.key_columns != meta.key:
        return True
    if len(entry.key) != len(meta.key):
        return True
    known = meta.types.keys()
    return not all(known >= row.keys() for row in (entry.old, entry.new) if row)
