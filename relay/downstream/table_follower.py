"""Following the captured tables' definitions while the relay runs.

The rules are bound to the tables' columns and key columns (:class:`TableInfo`) at start.
A column added, a key redefined, a replica identity changed or a column retyped to
another kind later would leave ``/v1/schema`` and the journal intake on the old
definitions until a restart: devices would refuse the rows cdc re-sends under the new key
(``KeyMismatch``), never get a new column, and read a retyped column's values by its old
kind.  :class:`TableFollower` re-reads the definitions every
``relay.schema_check_interval_s`` (from ``relay.source_dsn``'s catalog, else from
``{prefix}._schemas``), and when one of the rules' tables changed it binds the rules file's
content, as read at start, to the new definitions and hands the new :class:`Rules` to the
parts that serve devices (``on_change``).  The rules file is not read again: a changed
rules file still needs a restart and, when it places rows differently, a store rebuild
(docs/relay.md, "Rules changes").  A definition the rules no longer fit (a column they
name was dropped) is logged as an error, once per definition, and the rules in use stay
(:attr:`TableFollower.unfit` says why).  The bucket engine asks the follower (its
``columns_guard``, relay/downstream/columns_guard.py) before it places a change of a table whose columns it
has not seen fit the rules, and places nothing more while the rules do not fit: with the
earlier rules it would send a renamed column a rule excludes, or NULL for a renamed one
a rule lists.

The bucket engine names rows by their events' keys whatever the rules say; it takes the
new rules for its next batch too, so that rows are projected by them (a rule's column
list always includes the table's key columns, and those may have changed).  Its reader's
event decoder keeps the rules it started with: it only reads which rows a rule places,
which a table's new definition changes only when a column a rule filters on is retyped
between a date or time type and another (a restart then).

:func:`table_follower` builds one for ``fieldsync relay run`` (relay/server.py), reading
where start-up read: ``source_dsn``'s catalog (:class:`CatalogReader`, one connection kept
open, the full read only when :func:`catalog_mark` of the rules' tables changed), else the
schema log, read on from where it was.

Concurrency model: one daemon thread runs :meth:`TableFollower.check` every interval;
``on_change`` is called from that thread and must only swap references (the readers of a
:class:`Rules` keep the object they took).  :meth:`check` may also be called directly (in
tests, or by a caller that knows the definitions changed).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, Protocol

import psycopg

from relay.downstream.bucket_engine import SchemaLog
from relay.downstream.rules import Rules, TableInfo
from relay.downstream.rules_parser import rules_from_mapping
from relay.downstream.table_infos import (
    catalog_connection,
    table_infos_from_conn,
    table_infos_from_registry,
)
from relay.errors import EngineError, RelayError, RulesError
from relay.metrics import TABLE_DEFINITIONS
from relay.settings import RelaySettings

__all__ = [
    "CatalogReader",
    "TableFollower",
    "TableReader",
    "catalog_mark",
    "changed_tables",
    "describe_change",
    "table_follower",
]

log = logging.getLogger(__name__)


class TableReader(Protocol):
    """Reads the captured tables' current definitions (may raise; the follower retries)."""

    def __call__(self) -> Mapping[str, TableInfo]: ...


def changed_tables(
    rules: Rules, infos: Mapping[str, TableInfo]
) -> dict[str, tuple[TableInfo, TableInfo]]:
    """The rules' tables whose definition in ``infos`` is not the one ``rules`` were bound
    to: table → (bound, now).  A table missing from ``infos`` is not a change (a reader
    that sees no schema of it yet knows nothing new)."""
    out: dict[str, tuple[TableInfo, TableInfo]] = {}
    for table in sorted(rules.tables):
        now = infos.get(table)
        if now is None:
            continue
        bound = rules.table_info(table)
        if now != bound:  # columns, key, date and time columns, kinds
            out[table] = (bound, now)
    return out


def describe_change(table: str, bound: TableInfo, now: TableInfo) -> str:
    """``public.gauges: key (id) → (id, site), columns +priority -notes, kinds done int →
    bool``."""
    parts = []
    if now.key != bound.key:
        parts.append(f"key ({', '.join(bound.key)}) → ({', '.join(now.key)})")
    added = [c for c in now.columns if c not in bound.columns]
    dropped = [c for c in bound.columns if c not in now.columns]
    if added or dropped:
        parts.append("columns " + " ".join([f"+{c}" for c in added] + [f"-{c}" for c in dropped]))
    was = dict(bound.kinds)
    retyped = [f"{c} {was[c]} → {k}" for c, k in now.kinds if c in was and was[c] != k]
    if retyped:
        parts.append("kinds " + ", ".join(retyped))
    if not parts:
        parts.append("column order or types")
    return f"{table}: {', '.join(parts)}"


_MARK_QUERY: Final = """
    select coalesce(string_agg(concat_ws(':', t.name, c.oid, c.xmin,
        (select string_agg(concat(a.attnum, '.', a.xmin), ',' order by a.attnum)
           from pg_attribute a where a.attrelid = c.oid and a.attnum > 0),
        (select string_agg(concat(i.indexrelid, '.', i.xmin), ',' order by i.indexrelid)
           from pg_index i where i.indrelid = c.oid)), ';' order by t.name), '')
    from unnest(%s::text[], %s::text[], %s::text[]) t(name, nsp, rel)
    left join (pg_class c join pg_namespace n on n.oid = c.relnamespace)
      on n.nspname = t.nsp and c.relname = t.rel
"""


def catalog_mark(conn: psycopg.Connection[Any], tables: Iterable[str]) -> str:
    """A text that changes whenever a definition of one of ``tables`` (``schema.table``,
    as the relay and the applier name them) changes: the transaction ids that wrote their
    ``pg_class``, ``pg_attribute`` and ``pg_index`` rows (every ``ALTER TABLE``, index,
    key or replica identity change writes one of them; so do a few changes that alter
    nothing an entry is judged by, such as ``TRUNCATE`` or ``GRANT``, which cost one
    re-read).  One catalog read of a few index lookups per table."""
    names = sorted(tables)
    parts = [n.partition(".") for n in names]
    row = conn.execute(
        _MARK_QUERY, (names, [p[0] for p in parts], [p[2] for p in parts])
    ).fetchone()
    return str(row[0]) if row else ""


class CatalogReader:
    """A :class:`TableReader` of ``source_dsn``'s catalog on one connection kept open
    (opened again after an error): the full read only when :func:`catalog_mark` of the
    rules' tables changed since the last one."""

    def __init__(self, dsn: str, password: str | None, tables: Iterable[str]) -> None:
        self.dsn, self.password = dsn, password
        self.tables = sorted(tables)
        self.reads = 0  # full reads so far
        self._conn: psycopg.Connection[Any] | None = None
        self._mark: str | None = None
        self._infos: dict[str, TableInfo] = {}

    def __call__(self) -> dict[str, TableInfo]:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = catalog_connection(self.dsn, self.password)
            mark = catalog_mark(self._conn, self.tables)
            if mark != self._mark:
                self._infos = table_infos_from_conn(self._conn)
                self._mark = mark
                self.reads += 1
            return self._infos
        except psycopg.Error as exc:
            self.close()
            raise EngineError(f"cannot read the captured database's catalog: {exc}") from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class TableFollower:
    """Re-binds the rules when a table they name changes (see the module docstring)."""

    def __init__(
        self,
        rules: Rules,
        document: Mapping[str, Any],
        read: TableReader,
        on_change: Callable[[Rules], None],
        interval_s: float,
    ) -> None:
        self.rules = rules
        self.document = document
        self.read = read
        self.on_change = on_change
        self.interval_s = interval_s
        self.changes = 0  # rules rebound so far
        self.unfit: str | None = None
        """Why the rules do not fit the tables' current definitions (None: they do)."""
        self._failed: set[tuple[tuple[str, TableInfo], ...]] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Read the definitions once; True when the rules were rebound to new ones."""
        with self._lock:
            infos = self.read()
            changed = changed_tables(self.rules, infos)
            if not changed:
                self.unfit = None
                return False
            what = "; ".join(describe_change(t, b, n) for t, (b, n) in changed.items())
            try:
                rules = rules_from_mapping(self.document, infos, self.rules.source)
            except RulesError as exc:
                self.unfit = f"the rules no longer fit the tables ({what}): {exc}"
                seen = tuple(sorted((t, n) for t, (_, n) in changed.items()))
                if seen not in self._failed:
                    self._failed.add(seen)
                    TABLE_DEFINITIONS.labels("unfit").inc()
                    log.error(
                        "the captured tables changed (%s), but the rules no longer fit them; "
                        "/v1/schema and the journal keep the earlier definitions, and the "
                        "bucket engine places no change with other columns, until the rules "
                        "are fixed and the relay restarts: %s",
                        what,
                        exc,
                    )
                return False
            self.rules = rules
            self.unfit = None
            self.changes += 1
            self.on_change(rules)
            TABLE_DEFINITIONS.labels("rebound").inc()
        log.warning("the captured tables changed; /v1/schema and the journal follow: %s", what)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except (RelayError, OSError) as exc:
                log.warning("reading the captured tables' definitions failed, retrying: %s", exc)
            except Exception:
                log.exception("reading the captured tables' definitions failed, retrying")

    @contextlib.contextmanager
    def running(self) -> Iterator[TableFollower]:
        """The follower's thread while the block runs (none when the interval is 0)."""
        if self.interval_s <= 0:
            yield self
            return
        thread = self._thread = threading.Thread(
            target=self._loop, name="relay-table-follower", daemon=True
        )
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(30)

    @property
    def idle(self) -> bool:
        """Whether no thread of this follower runs (never started, or ended)."""
        return self._thread is None or not self._thread.is_alive()


@contextlib.contextmanager
def table_follower(
    settings: RelaySettings,
    rules: Rules,
    document: dict[str, Any],
    on_change: Callable[[Rules], None],
) -> Iterator[TableFollower]:
    """A :class:`TableFollower` reading the definitions where start-up read them
    (``source_dsn``'s catalog, else ``{prefix}._schemas``), running while the block runs."""
    r = settings.relay
    schemas: SchemaLog | None = None
    read: Callable[[], dict[str, TableInfo]]
    catalog: CatalogReader | None = None
    if r.source_dsn:
        read = catalog = CatalogReader(r.source_dsn, r.source_password, rules.tables)
    elif r.schema_check_interval_s > 0:
        schema_log = schemas = SchemaLog(settings.kafka_client_kwargs(), r.topic_prefix)

        def read() -> dict[str, TableInfo]:
            schema_log.refresh()
            return table_infos_from_registry(schema_log.registry)

    else:
        read = dict
    follower = TableFollower(rules, document, read, on_change, r.schema_check_interval_s)
    try:
        with follower.running():
            yield follower
    finally:
        if follower.idle:  # not under a read still running
            if schemas is not None:
                schemas.close()
            if catalog is not None:
                catalog.close()
