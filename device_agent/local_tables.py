"""The base layer of the device database: what every module that writes it shares.

- :data:`PREFIX`: the agent's metadata tables, triggers and indexes are named
  ``_fieldsync_…`` (apps must not write them);
- :func:`q`: a quoted SQLite identifier (every table and column name in generated SQL);
- :class:`LocalTable`: a synced table as the device holds it (a ``_fieldsync_tables``
  row: the relay's name, the local name, columns, key, rules, column kinds, counters),
  read with :func:`load_tables`;
- :func:`key_expr`: the SQL computing a row's identity ``k`` inside the metadata tables
  (the key value itself for a single-column key, the JSON array of the key values for a
  compound one: :func:`device_agent.local_db.key_k` in SQL);
- :class:`transaction`: ``BEGIN IMMEDIATE`` … ``COMMIT``, the one way the agent writes.

Imports form a DAG: this module imports no other module of the package;
device_agent/local_db.py (connection, metadata, values) and device_agent/triggers.py
(the journal triggers) build on it, device_agent/schema_sync.py on both.

Concurrency: nothing here keeps state outside the database file; a connection belongs to
one thread.  ``BEGIN IMMEDIATE`` takes SQLite's write lock at once, so a transaction of
the agent never fails half-way because an app began writing first (writers take turns:
``busy_timeout``).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from typing import Final

import orjson

PREFIX: Final = "_fieldsync_"


def q(name: str) -> str:
    """A quoted SQLite identifier."""
    return '"' + name.replace('"', '""') + '"'


def lit(text: str) -> str:
    """A SQLite string literal (a column name as a JSON key in the triggers)."""
    return "'" + text.replace("'", "''") + "'"


class transaction:
    """``with transaction(conn):`` a ``BEGIN IMMEDIATE`` … ``COMMIT`` (rollback on error)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("begin immediate")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("commit")
        else:
            self.conn.execute("rollback")


@dataclasses.dataclass
class LocalTable:
    """A synced table as the device holds it (``_fieldsync_tables``)."""

    id: int
    name: str
    local: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    rules: tuple[str, ...]
    kinds: dict[str, str]
    counters: frozenset[str] = frozenset()

    @property
    def multi(self) -> bool:
        """Rows may arrive through several rules (with different projections)."""
        return len(self.rules) != 1

    def key_kinds(self) -> list[str | None]:
        return [self.kinds.get(c) for c in self.key]


def load_tables(conn: sqlite3.Connection) -> dict[str, LocalTable]:
    out: dict[str, LocalTable] = {}
    for tid, name, local, cols, key, rules, kinds, counters in conn.execute(
        f"""select id, name, local, columns, key, rules, kinds, counters
            from {PREFIX}tables order by id"""
    ):
        out[name] = LocalTable(
            tid,
            name,
            local,
            tuple(orjson.loads(cols)),
            tuple(orjson.loads(key)),
            tuple(orjson.loads(rules)),
            dict(orjson.loads(kinds)),
            frozenset(orjson.loads(counters)),
        )
    return out


def save_kinds(conn: sqlite3.Connection, table: LocalTable) -> None:
    conn.execute(
        f"update {PREFIX}tables set kinds = ? where id = ?",
        (orjson.dumps(table.kinds).decode(), table.id),
    )


def json_value_sql(v: str) -> str:
    """SQL of the value ``v`` (a column or a parameter) as ``json_object`` / ``json_array``
    should take it.  SQLite writes a REAL there with 15 significant digits
    (0.30000000000000004 became 0.3, and 1.7976931348623157e308 a text no JSON parser
    reads); 17 digits read back as the same double (SQLite's own formatting is exact to
    that except above ~1e220, where it is within one unit in the last place).  ``!``
    keeps the decimal point, so the number stays a float."""
    return f"case when typeof({v}) = 'real' and {v} - {v} = 0 then json(printf('%!.17g', {v})) else {v} end"


def key_expr(table: LocalTable, ref: str) -> str:
    """SQL computing a row's ``k`` (:func:`device_agent.local_db.key_k`) from ``ref`` (a
    table name or alias)."""
    if len(table.key) == 1:
        return f"{ref}.{q(table.key[0])}"
    return "json_array(" + ", ".join(json_value_sql(f"{ref}.{q(c)}") for c in table.key) + ")"
