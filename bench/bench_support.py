"""What the benchmarks in bench/ share: their services, their clean-up, their result tables.

Imported by every ``*_bench.py`` as ``import bench_support`` (bench/ is the script's own
directory, so it is on ``sys.path``); importing it also puts the repository root on
``sys.path``, so a benchmark runs from a checkout without an installed ``fieldsync``.

Services.  :func:`add_service_flags` gives a benchmark ``--pg-dsn`` (a superuser DSN of an
external PostgreSQL with ``wal_level=logical``) and ``--kafka-bootstrap`` (an external
broker); :func:`services` reaches those, or starts embedded ones
(:mod:`devtools.local_services`: a throw-away PostgreSQL cluster, a tansu broker with
memory storage) when they are not given, and stops them at the end.  A benchmark works
only in databases and topic prefixes of its own (:meth:`Services.database`,
:meth:`Services.topic_prefix`, or their ``new_*`` forms that last until the end), which
are dropped afterwards, with their replication slots and their topics: an external server
is left as it was.

Results.  :class:`MarkdownTable` renders a benchmark's result table in Markdown, ready
for docs/performance.md; :func:`ratio` is the column that compares a figure with the
limit it is measured against.  :class:`Results` is the table of benchmarks that report
one figure per row (case, measure, value, unit, target, met).

Concurrency: none of its own; used from a benchmark's main thread.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from devtools.local_services import EmbeddedBroker, EmbeddedPostgres, find_pg_bindir  # noqa: E402

# --------------------------------------------------------------------------- output


def log(msg: str) -> None:
    """A progress line (the result tables come at the end)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def fmt_number(v: float | int | None) -> str:
    """A figure with as many digits as it deserves: 12,345 / 12.3 / 1.23; ``n/a`` for none."""
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def ratio(value: float, limit: float) -> str:
    """The ratio column: ``value`` over the ``limit`` it is measured against (two decimals)."""
    return f"{value / limit:.2f}"


def machine() -> str:
    """The machine a figure was measured on, and how busy it was."""
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )


class MarkdownTable:
    """A result table in Markdown: ``columns`` in order; those named in ``right`` (the
    numbers) are right-aligned.  Cells are strings as given (format them with the
    precision that fits), ints get thousands separators, floats :func:`fmt_number`."""

    def __init__(self, columns: Sequence[str], right: Iterable[str] = ()) -> None:
        self.columns = list(columns)
        unknown = set(right) - set(self.columns)
        if unknown:
            raise ValueError(f"right-aligned column(s) {sorted(unknown)} are not columns")
        self.right = set(right)
        self.rows: list[list[str]] = []

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns: {cells}")
        self.rows.append([_cell(c) for c in cells])

    def render(self) -> str:
        head = "| " + " | ".join(self.columns) + " |"
        rule = "| " + " | ".join("---:" if c in self.right else "---" for c in self.columns)
        lines = [head, rule + " |"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int | float):
        return fmt_number(value)
    return str(value)


@dataclass
class Row:
    case: str
    measure: str
    value: float | None
    unit: str
    target: str = ""
    met: str = ""


@dataclass
class Results:
    """One figure per row; ``echo`` logs each as it is added."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    echo: bool = False

    def add(
        self,
        case: str,
        measure: str,
        value: float | None,
        unit: str,
        target: str = "",
        met: bool | None = None,
    ) -> None:
        verdict = "" if met is None else ("yes" if met else "NO")
        self.rows.append(Row(case, measure, value, unit, target, verdict))
        if self.echo:
            log(f"{case}: {measure} = {fmt_number(value)} {unit}")

    def table(self) -> str:
        table = MarkdownTable(
            ["case", "measure", "value", "unit", "target", "met"], right=["value"]
        )
        for r in self.rows:
            table.add(r.case, r.measure, fmt_number(r.value), r.unit, r.target, r.met)
        return table.render()


# --------------------------------------------------------------------------- services


def add_service_flags(
    parser: argparse.ArgumentParser, *, pg: bool = True, kafka: bool = True
) -> None:
    """``--pg-dsn`` and/or ``--kafka-bootstrap`` (bench/run_all.py passes them on)."""
    if pg:
        parser.add_argument(
            "--pg-dsn",
            help="superuser DSN of an external PostgreSQL (wal_level=logical) instead of an "
            "embedded one",
        )
    if kafka:
        parser.add_argument(
            "--kafka-bootstrap",
            help="host:port of an external broker instead of the embedded tansu",
        )


@dataclass
class Services:
    """PostgreSQL and the broker a benchmark runs against (``None``: not needed)."""

    pg_dsn: str | None
    bootstrap: str | None
    work: Path
    """A scratch directory, removed at the end."""
    description: str
    pg_log: Path | None = None
    """The embedded server's log (None for an external one)."""
    pg_bindir: Path | None = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    @property
    def admin_dsn(self) -> str:
        if self.pg_dsn is None:
            raise RuntimeError("this benchmark started without PostgreSQL")
        return self.pg_dsn

    @property
    def kafka(self) -> str:
        if self.bootstrap is None:
            raise RuntimeError("this benchmark started without a broker")
        return self.bootstrap

    @property
    def bindir(self) -> Path:
        """Where PostgreSQL's programs are (``pg_recvlogical``, ``pgbench``)."""
        return self.pg_bindir or find_pg_bindir()

    def dsn_for(self, dbname: str) -> str:
        return psycopg.conninfo.make_conninfo(self.admin_dsn, dbname=dbname)

    def server_version(self) -> str:
        with psycopg.connect(self.admin_dsn) as conn:
            row = conn.execute("show server_version").fetchone()
        return str(row[0]) if row else "?"

    @contextlib.contextmanager
    def database(self, prefix: str) -> Iterator[str]:
        """DSN of a new database named ``{prefix}_{random}``; dropped at the end of the
        block, with its replication slots."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        try:
            yield self.dsn_for(name)
        finally:
            drop_database(self.admin_dsn, name)

    def new_database(self, prefix: str) -> str:
        """:meth:`database` that lasts until :func:`services` ends."""
        return self._stack.enter_context(self.database(prefix))

    @contextlib.contextmanager
    def topic_prefix(self, prefix: str) -> Iterator[str]:
        """A new topic prefix ``{prefix}{random}``; its topics are deleted at the end of
        the block."""
        name = f"{prefix}{uuid.uuid4().hex[:8]}"
        try:
            yield name
        finally:
            delete_topics(self.kafka, name)

    def new_topic_prefix(self, prefix: str) -> str:
        """:meth:`topic_prefix` that lasts until :func:`services` ends."""
        return self._stack.enter_context(self.topic_prefix(prefix))


@contextlib.contextmanager
def services(
    pg_dsn: str | None = None,
    kafka_bootstrap: str | None = None,
    *,
    pg: bool = True,
    kafka: bool = True,
    pg_conf: dict[str, str] | None = None,
    pg_bindir: str | None = None,
) -> Iterator[Services]:
    """PostgreSQL (``pg``) and a broker (``kafka``): the external ones given, else embedded
    ones started here (``pg_conf``: settings of the embedded server).  At the end: the
    databases and topic prefixes the benchmark made are removed, embedded services
    stopped, the scratch directory deleted."""
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="fieldsync-bench-"))
        stack.callback(shutil.rmtree, work, True)
        pg_log, parts = None, []
        if pg and pg_dsn is None:
            log("starting embedded PostgreSQL")
            server = EmbeddedPostgres(base_dir=work / "pg", extra_conf=pg_conf)
            server.start()
            stack.callback(server.stop)
            pg_dsn, pg_log = server.dsn, server.log_path
            pg_bindir = pg_bindir or str(server.bindir)
            parts.append("embedded PostgreSQL (fsync=off)")
        elif pg:
            parts.append("external PostgreSQL")
        if kafka and kafka_bootstrap is None:
            log("starting embedded broker (tansu, memory storage)")
            broker = EmbeddedBroker(base_dir=work / "kafka")
            broker.start()
            stack.callback(broker.stop)
            kafka_bootstrap = broker.bootstrap
            parts.append("embedded tansu broker (memory storage)")
        elif kafka:
            parts.append("external broker")
        svc = Services(
            pg_dsn if pg else None,
            kafka_bootstrap if kafka else None,
            work,
            "; ".join(parts),
            pg_log,
            Path(pg_bindir) if pg_bindir else None,
        )
        if pg:
            svc.description = f"PostgreSQL {svc.server_version()}, {svc.description}"
        with svc._stack:  # the benchmark's databases and topics go before the services
            yield svc


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop database ``name`` and its replication slots (ending the sessions that hold
    them), as a benchmark's clean-up."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for _ in range(50):
            slots = conn.execute(
                "select slot_name, active_pid from pg_replication_slots where database = %s",
                (name,),
            ).fetchall()
            if not slots:
                break
            for slot, pid in slots:
                if pid is not None:
                    conn.execute("select pg_terminate_backend(%s)", (pid,))
                with contextlib.suppress(psycopg.Error):
                    conn.execute("select pg_drop_replication_slot(%s)", (slot,))
            time.sleep(0.1)
        conn.execute(f'drop database if exists "{name}" with (force)')


def delete_topics(bootstrap: str, prefix: str) -> None:
    """Delete the topics of ``prefix`` (``{prefix}.…``); a broker that refuses is logged,
    not fatal (the figures are already taken)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    except KafkaError as exc:
        log(f"topics of prefix {prefix!r} not deleted: {exc!r}")
        return
    try:
        topics = [t for t in admin.list_topics() if t == prefix or t.startswith(prefix + ".")]
        if topics:
            admin.delete_topics(topics)
    except KafkaError as exc:
        log(f"topics of prefix {prefix!r} not deleted: {exc!r}")
    finally:
        admin.close()
