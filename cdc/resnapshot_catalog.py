"""Catalog checks of the re-snapshots: DDL that gives existing rows new values without a
row event (:mod:`cdc.ddl_detection` says which).

:class:`CatalogChecks` reads the signatures of the published tables
(``cdc.pg_catalog.read_signatures``) at start, every ``cdc.ddl_check_interval_s`` and when
a Relation message of a table changed, compares them with the ones recorded in Kafka, and
queues a re-snapshot of each table that needs one (or, with ``cdc.resnapshot_on_ddl`` off,
logs what would be stale).  A table added to a publication of listed tables is queued
too: its existing rows were never sent.  The signatures read become the recorded catalog,
written to Kafka with the next commit (:mod:`cdc.resnapshot_state`).

Concurrency: runs on the daemon's thread, on the re-snapshot driver's own connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from cdc.ddl_detection import (
    TableSignature,
    identity_warnings,
    key_changed,
    resnapshot_reasons,
)
from cdc.errors import ReplicationLost
from cdc.incremental_snapshot import Job
from cdc.pg_catalog import read_signatures
from cdc.resnapshot_stream import ChunkTracker, Jobs
from cdc.settings import CdcSettings

__all__ = ["CatalogChecks"]

log = logging.getLogger("fieldsync.cdc")


class CatalogChecks:
    """The catalog recorded for the slot, and the checks against the catalog of now."""

    def __init__(
        self,
        settings: CdcSettings,
        jobs: Jobs,
        stream: ChunkTracker,
        connection: Callable[[], psycopg.Connection[Any]],
    ) -> None:
        self.s = settings
        self.pg = settings.postgres
        self.jobs = jobs
        self.stream = stream
        self._connection = connection
        self.signatures: dict[int, TableSignature] | None = None
        self.dirty = False  # the recorded catalog changed since the last commit
        self._next_check = 0.0

    def due(self) -> bool:
        """Whether a Relation message changed or the check interval passed."""
        return bool(self.stream.check_oids) or time.monotonic() >= self._next_check

    def check(self) -> None:
        self.stream.check_oids.clear()
        interval = self.s.cdc.ddl_check_interval_s
        self._next_check = time.monotonic() + interval if interval else float("inf")
        conn = self._connection()
        try:
            now = read_signatures(conn, self.pg.publication)
            row = conn.execute(
                "select puballtables from pg_publication where pubname = %s",
                (self.pg.publication,),
            ).fetchone()
        except psycopg.OperationalError as exc:
            raise ReplicationLost(f"catalog check failed: {exc}") from exc
        except psycopg.Error as exc:
            log.warning("catalog check failed (tried again later): %s", str(exc).strip())
            return
        all_tables = bool(row and row[0])
        if self.signatures is None:
            self.signatures = now
            self.dirty = True
            log.info("recorded the catalog of %d published table(s)", len(now))
            return
        for oid, new in now.items():
            if oid == self.stream.signal_oid or (new.schema, new.table) == self.stream.signal_name:
                continue
            old = self.signatures.get(oid)
            for warning in identity_warnings(old, new) if old is not None else ():
                log.warning("%s", warning, extra={"table": new.qualified})
            reasons = self._reasons(old, new, all_tables)
            if not reasons:
                continue
            rekeyed = old is not None and key_changed(old, new)
            if self.s.cdc.resnapshot_on_ddl:
                job = Job(oid, new.qualified, "; ".join(reasons))
                job.retire_keys = job.retiring = rekeyed
                self.jobs.queue(job)
            else:
                log.warning(
                    "%s: %s; existing rows keep their old values in Kafka (cdc.resnapshot_on_ddl "
                    "is off; `fieldsync cdc snapshot --table %s` sends them)%s",
                    new.qualified,
                    "; ".join(reasons),
                    new.qualified,
                    "; its key schema changed: the rows under the old keys stay in Kafka"
                    if rekeyed
                    else "",
                )
        if now != self.signatures:
            self.signatures = now
            self.dirty = True

    def _reasons(
        self, old: TableSignature | None, new: TableSignature, all_tables: bool
    ) -> list[str]:
        if old is not None:
            return resnapshot_reasons(old, new)
        # a table added to a publication of listed tables (postgres.tables grew, or
        # ALTER PUBLICATION … ADD TABLE): rows it had then were never sent.  In a
        # FOR ALL TABLES publication a new table is published from its creation on.
        if self.pg.snapshot == "initial" and not all_tables and self._has_rows(new):
            return ["added to the publication: its existing rows were never sent"]
        return []

    def _has_rows(self, sig: TableSignature) -> bool:
        try:
            row = (
                self._connection()
                .execute(
                    sql.SQL("select exists (select 1 from {})").format(
                        sql.Identifier(sig.schema, sig.table)
                    )
                )
                .fetchone()
            )
        except psycopg.OperationalError as exc:
            raise ReplicationLost(f"catalog check failed: {exc}") from exc
        except psycopg.Error:
            return True  # cannot tell (no privilege): the job says what is wrong
        return bool(row and row[0])
