"""Versioned schema migrations for the relay's PostgreSQL schemas (applier, journal intake).

``run_migrations`` creates ``{schema}.schema_migrations`` and applies the statements of
``migrations`` whose version (1-based index) is not recorded yet, in one transaction under
a transaction-level advisory lock, so several processes starting at once migrate safely.
A schema newer than the code is refused with ``error``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg


def run_migrations(
    conn: psycopg.Connection[Any],
    schema: str,
    migrations: Sequence[str],
    lock: tuple[int, int],
    error: type[Exception],
) -> int:
    """Apply pending migrations; return the schema's version. The caller converts I/O errors."""
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s, %s)", lock)
        conn.execute(f"create schema if not exists {schema}")
        conn.execute(
            f"create table if not exists {schema}.schema_migrations "
            "(version int primary key, applied_at timestamptz not null default now())"
        )
        row = conn.execute(
            f"select coalesce(max(version), 0) from {schema}.schema_migrations"
        ).fetchone()
        version = int(row[0]) if row else 0
        if version > len(migrations):
            raise error(
                f"schema {schema} is at version {version}, newer than this code ({len(migrations)})"
            )
        for v in range(version + 1, len(migrations) + 1):
            conn.execute(migrations[v - 1])
            conn.execute(f"insert into {schema}.schema_migrations (version) values (%s)", (v,))
    return len(migrations)
