"""Catalog checks of the re-snapshots: DDL that gives existing rows new values without a
row event, or leaves rows in Kafka that no table has (:mod:`cdc.ddl_detection` says which).

:class:`CatalogChecks` reads the signatures of the published tables
(``cdc.pg_catalog.read_signatures``) at start, every ``cdc.ddl_check_interval_s``, when a
Relation message of a table changed and when the stream shows a table the recorded catalog
lacks (a table created, or dropped and created again), compares them with the ones
recorded in Kafka (:func:`cdc.ddl_detection.compare_catalogs`), and queues a re-snapshot of
each table that needs one (or, with ``cdc.resnapshot_on_ddl`` off, logs what stays stale):

- a table whose signature changed (:func:`~cdc.ddl_detection.resnapshot_reasons`; the old
  keys are deleted first when its key changed, or when a partition was detached, dropped or
  given a new file node: rows may have left it);
- a partitioned table that gained a partition holding rows (``ATTACH PARTITION``; a
  partition created empty needs nothing);
- a partition detached in a FOR ALL TABLES publication, published as itself from then on
  (its rows were on its parent's topic only);
- a *replaced* table: published under a name recorded for another oid (dropped and created
  again), or published again under its name; the keys no row has now are deleted first
  (:mod:`cdc.key_retirement`), then every row is sent;
- a table added to a publication of listed tables: its existing rows were never sent.

A recorded table no longer published under its name gets a warning (its rows stay in Kafka)
and is remembered in the recorded catalog, so a table published under that name later is a
replaced one.  With a publication of listed tables (``postgres.tables``), each check first
adds back a listed table that exists but is not in the publication (DROP TABLE takes a
table out of every publication, so one created again is in none), with a warning, and
counts it as published again; a listed table that does not exist gets a warning (once,
until it exists again), and the others stream on.  The signatures read become the recorded
catalog, written to Kafka with the next commit (:mod:`cdc.resnapshot_state`).

Concurrency: runs on the daemon's thread, on the re-snapshot driver's own connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Any

import psycopg
from psycopg import sql

from cdc.change_assembler import topic_for
from cdc.ddl_detection import (
    TableCheck,
    TableSignature,
    attached_partitions,
    attached_reason,
    compare_catalogs,
    identity_warnings,
    unpublished_warning,
)
from cdc.errors import ReplicationLost
from cdc.incremental_snapshot import Job
from cdc.pg_catalog import read_signatures
from cdc.pg_source import add_listed_tables
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
        # recorded tables no longer published, by qualified name (ddl_detection.compare_catalogs)
        self.unpublished: dict[str, TableSignature] = {}
        self.dirty = False  # the recorded catalog changed since the last commit
        self._next_check = 0.0
        self._republished: set[str] = set()  # listed tables added back, not compared yet
        self._missing: set[str] = set()  # listed tables found missing (warned once)
        self._add_failure: str | None = None  # why adding listed tables back failed (warned)

    def due(self) -> bool:
        """Whether a Relation message changed, the stream showed a table the recorded
        catalog lacks, or the check interval passed."""
        first = self.stream.first_oids
        if first and self.signatures is not None:
            self.stream.check_oids |= first - self.signatures.keys()
            first.clear()
        return bool(self.stream.check_oids) or time.monotonic() >= self._next_check

    def check(self, republished: Collection[str] = ()) -> None:
        """Compare the catalog of now with the recorded one and queue what needs a
        re-snapshot; ``republished``: listed tables just added back to the publication
        (``cdc.pg_source.ensure_publication`` at start)."""
        self.stream.check_oids.clear()
        interval = self.s.cdc.ddl_check_interval_s
        self._next_check = time.monotonic() + interval if interval else float("inf")
        self._republished.update(republished)
        conn = self._connection()
        try:
            if self.pg.tables:
                self._add_listed(conn)
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
        republished, self._republished = self._republished, set()
        if self.signatures is None:
            self.signatures = now
            self.dirty = True
            log.info("recorded the catalog of %d published table(s)", len(now))
            return
        compared = compare_catalogs(
            {oid: s for oid, s in self.signatures.items() if not self._ignored(s)},
            self.unpublished,
            {oid: s for oid, s in now.items() if not self._ignored(s)},
            republished,
        )
        for gone in compared.unpublished:
            topic = topic_for(self.s.kafka.topic_prefix, gone.schema, gone.table)
            log.warning(
                "%s",
                unpublished_warning(gone, self.pg.publication, topic),
                extra={"table": gone.qualified},
            )
        for table in compared.tables:
            self._compare(table, all_tables)
        if now != self.signatures or compared.remembered != self.unpublished:
            self.signatures = now
            self.unpublished = compared.remembered
            self.dirty = True

    def _ignored(self, sig: TableSignature) -> bool:
        """The signal table: read by the daemon itself, never re-read."""
        return sig.oid == self.stream.signal_oid or (sig.schema, sig.table) == (
            self.stream.signal_name
        )

    def _add_listed(self, conn: psycopg.Connection[Any]) -> None:
        """Add listed tables missing from the publication back (a failure other than a lost
        connection is warned about when it first occurs, and the check goes on)."""
        try:
            added, missing = add_listed_tables(conn, self.pg.publication, self.pg.tables)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            text = str(exc).strip()
            if text != self._add_failure:
                log.warning(
                    "cannot add the tables of postgres.tables that are not in publication %s "
                    "back (tried again at each catalog check; the checks go on without them): "
                    "%s",
                    self.pg.publication,
                    text,
                )
            self._add_failure = text
            return
        self._add_failure = None
        self._listed(added, missing)

    def _listed(self, added: list[str], missing: list[str]) -> None:
        """Warn about listed tables added back to the publication, and (once) about listed
        tables that do not exist."""
        for name in added:
            log.warning(
                "%s is listed in postgres.tables but was not in publication %s (dropped and "
                "created again, or taken out with ALTER PUBLICATION … DROP TABLE): added it "
                "back; its rows in Kafka are checked against the table's",
                name,
                self.pg.publication,
                extra={"table": name},
            )
        self._republished.update(added)
        for name in sorted(set(missing) - self._missing):
            log.warning(
                "%s is listed in postgres.tables but does not exist: the other tables stream "
                "on; it is added back to publication %s when it is created again. Fix: create "
                "it, or remove it from postgres.tables",
                name,
                self.pg.publication,
                extra={"table": name},
            )
        self._missing = set(missing)

    def _compare(self, table: TableCheck, all_tables: bool) -> None:
        new, before = table.new, table.before
        for warning in identity_warnings(before, new) if before is not None else ():
            log.warning("%s", warning, extra={"table": new.qualified})
        reasons = table.reasons()
        if table.old is None and table.replaced is None and table.detached_from is None:
            reasons = self._added_reasons(new, all_tables)
        if table.old is not None:
            reasons += [
                attached_reason(p)
                for p in attached_partitions(table.old, new)
                if self._has_rows(p.oid)
            ]
        if not reasons:
            return
        retire = table.retire_keys
        if self.s.cdc.resnapshot_on_ddl:
            job = Job(new.oid, new.qualified, "; ".join(reasons))
            job.retire_keys = job.retiring = retire
            self.jobs.queue(job)
            return
        stale = ""
        if table.replaced is not None:
            stale = "; the rows of the table it replaced stay in Kafka"
        elif retire:
            stale = "; its key schema changed: the rows under the old keys stay in Kafka"
        log.warning(
            "%s: %s; existing rows keep their old values in Kafka (cdc.resnapshot_on_ddl "
            "is off; `fieldsync cdc snapshot --table %s` sends them)%s",
            new.qualified,
            "; ".join(reasons),
            new.qualified,
            stale,
        )

    def _added_reasons(self, new: TableSignature, all_tables: bool) -> list[str]:
        # a table added to a publication of listed tables (postgres.tables grew, or
        # ALTER PUBLICATION … ADD TABLE): rows it had then were never sent.  In a
        # FOR ALL TABLES publication a new table is published from its creation on.
        if self.pg.snapshot == "initial" and not all_tables and self._has_rows(new.oid):
            return ["added to the publication: its existing rows were never sent"]
        return []

    def _has_rows(self, oid: int) -> bool:
        """Whether the table ``oid`` (a published table, or a partition of one) holds a row
        (False when it is gone since the catalog was read)."""
        try:
            conn = self._connection()
            names = conn.execute(
                "select n.nspname, c.relname from pg_class c "
                "join pg_namespace n on n.oid = c.relnamespace where c.oid = %s",
                (oid,),
            ).fetchone()
            if names is None:
                return False
            row = conn.execute(
                sql.SQL("select exists (select 1 from {})").format(
                    sql.Identifier(str(names[0]), str(names[1]))
                )
            ).fetchone()
        except psycopg.OperationalError as exc:
            raise ReplicationLost(f"catalog check failed: {exc}") from exc
        except psycopg.Error:
            return True  # cannot tell (no privilege): the job says what is wrong
        return bool(row and row[0])
