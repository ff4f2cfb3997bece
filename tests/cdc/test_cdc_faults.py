"""cdc under faults: Kafka outage, PostgreSQL restart, busy unpublished tables, bad start-up.

Every test runs against the real PostgreSQL and broker of the test session (or
its own throw-away one, where the fault needs it); a service that cannot start
fails the test.

The Kafka fault tests always start their own tansu broker (also when
FIELDSYNC_TEST_KAFKA_BOOTSTRAP names an external one): to cut clients off, the
broker must advertise the fault proxy's address, which only a broker started
here can be told to do.  The PostgreSQL restart test needs the embedded server
(an external one cannot be restarted from here: the test fails, as fix_pg says).
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc.errors import parse_lsn
from devtools.local_services import (
    EmbeddedBroker,
    EmbeddedPostgres,
)
from tests.cdc.cdc_support import make_settings, running_daemon, table_events, wait_for
from tests.cdc.test_cdc_cli import daemon_config, run_cli
from tests.fix_proxy import TcpProxy

# --------------------------------------------------------------------------- helpers


def slot_name() -> str:
    return "s_" + uuid.uuid4().hex[:12]


def confirmed_lsn(conn: psycopg.Connection[Any], slot: str) -> int:
    row = conn.execute(
        "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = %s", (slot,)
    ).fetchone()
    return parse_lsn(row[0]) if row and row[0] else 0


def insert_lsn(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(row[0])


def assert_exactly_once(events: list[dict[str, Any]], ids: set[int]) -> None:
    """Each position once, each id inserted exactly once, nothing else."""
    positions = [e["_pos"] for e in events]
    dup = len(positions) - len(set(positions))
    assert dup == 0, f"{dup} record(s) in Kafka share a position"
    seen = [e["after"]["id"] for e in events if e["op"] == "c"]
    assert len(seen) == len(set(seen)), "a row was written to Kafka twice with different positions"
    assert set(seen) == ids, (
        f"missing: {sorted(ids - set(seen))[:20]}, unexpected: {sorted(set(seen) - ids)[:20]}"
    )


class ProxiedBroker(EmbeddedBroker):
    """A tansu broker that advertises the address of a :class:`TcpProxy` in front of it.

    Clients bootstrap through the proxy and, because the broker advertises the
    proxy, every later connection (to the partition leader, the transaction
    coordinator) goes through it too: ``proxy.refuse()`` is a real outage.
    """

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir=base_dir)
        self.proxy = TcpProxy(self.host, self.port)

    @property
    def bootstrap(self) -> str:
        return self.proxy.address

    def advertised_url(self) -> str:
        return f"tcp://{self.proxy.address}"

    def _start_once(self, timeout: float) -> bool:
        self.proxy.target = (self.host, self.port)  # a new port when the last one was taken
        return super()._start_once(timeout)

    def stop(self) -> None:
        super().stop()
        self.proxy.close()


@pytest.fixture
def proxied_broker(tmp_path: Path) -> Iterator[ProxiedBroker]:
    broker = ProxiedBroker(tmp_path / "kafka")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def write_rows(conn: psycopg.Connection[Any], ids: range, table: str = "t") -> None:
    for i in ids:
        conn.execute(f"insert into {table} (id, v) values (%s, %s)", (i, f"row {i}"))


# --------------------------------------------------------------------------- Kafka outage


def test_kafka_outage_holds_slot_then_delivers_exactly_once(
    pg_dsn: str, proxied_broker: ProxiedBroker, topic_prefix: str
) -> None:
    """Broker unreachable mid-stream: the daemon gives up within kafka.timeout_s,
    retries with backoff, never confirms past what Kafka holds, and after the
    broker returns every row arrives exactly once and the slot moves on."""
    slot = slot_name()
    bootstrap = proxied_broker.bootstrap
    settings = make_settings(
        pg_dsn,
        bootstrap,
        topic_prefix,
        postgres_slot=slot,
        kafka_timeout_s="3",
        postgres_heartbeat_interval_s="1",
        cdc_retry_backoff_max_s="1",
    )

    def kafka_thread_names() -> list[str]:
        return [
            t.name
            for t in threading.enumerate()
            if t.name.startswith(("kafka-io", "kafka-python-producer"))
        ]

    # threads other tests of this process left behind are not this daemon's
    baseline = len(kafka_thread_names())
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table t (id int primary key, v text)")
        with running_daemon(settings) as daemon:
            write_rows(conn, range(0, 20))
            table_events(bootstrap, topic_prefix, "t", expect=20)
            before_outage = insert_lsn(conn)
            proxied_broker.proxy.refuse()
            down_at = time.monotonic()
            write_rows(conn, range(20, 60))
            # while down: the slot must not move past the rows Kafka does not have,
            # the broken session is given up after ~kafka.timeout_s, and retried.  The
            # bound on giving up tells kafka.timeout_s (3 s) from kafka-python's own
            # timeouts (30 s and more) with room for a busy machine
            gave_up_after = None
            while daemon.stats.sessions < 3 or time.monotonic() - down_at < 12:
                assert confirmed_lsn(conn, slot) <= before_outage, (
                    "slot confirmed past rows Kafka does not hold"
                )
                if gave_up_after is None and daemon.stats.sessions >= 2:
                    gave_up_after = time.monotonic() - down_at
                assert time.monotonic() - down_at < 120, (
                    f"only {daemon.stats.sessions} sessions in a 120 s outage: not retrying"
                )
                time.sleep(0.2)
            assert gave_up_after is not None and gave_up_after < 25, (
                f"daemon gave up the dead broker after {gave_up_after}s (kafka.timeout_s = 3)"
            )
            last_txn = insert_lsn(conn)
            write_rows(conn, range(60, 61))
            proxied_broker.proxy.allow()
            events = table_events(bootstrap, topic_prefix, "t", expect=61, timeout=60)
            wait_for(
                lambda: confirmed_lsn(conn, slot) > last_txn,
                timeout=60,
                what="slot to advance after the outage",
            )
            # clients of the failed sessions are closed, not left retrying in the background
            kafka_threads = kafka_thread_names()
            assert len(kafka_threads) <= baseline + 3, (
                f"Kafka client threads of failed sessions were left running: {kafka_threads}"
            )
    assert_exactly_once(events, set(range(61)))


# --------------------------------------------------------------------------- PostgreSQL restart


class Writer:
    """Inserts rows into ``t`` one transaction each, from a thread, riding out server restarts.

    ``acked`` holds ids whose commit returned; ``in_doubt`` ids whose commit
    raised (the row may or may not exist).
    """

    def __init__(self, dsn: str, start: int, pause_s: float = 0.005) -> None:
        self.dsn = dsn
        self.next_id = start
        self.pause_s = pause_s
        self.acked: list[int] = []
        self.in_doubt: list[int] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
            except psycopg.OperationalError:
                self.errors += 1
                time.sleep(0.1)
                continue
            i = self.next_id
            self.next_id += 1
            try:
                conn.execute("insert into t (id, v) values (%s, %s)", (i, f"row {i}"))
                self.acked.append(i)
            except psycopg.OperationalError:
                self.errors += 1
                self.in_doubt.append(i)
                conn = None
            time.sleep(self.pause_s)
        if conn is not None:
            conn.close()

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_mid_stream(
    mode: str, pg_server: Any, pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """PostgreSQL restarts while rows stream: the daemon reconnects and resumes;
    every committed row arrives once, none twice.

    ``immediate`` is a crash: the slot comes back at its last checkpointed
    position, behind what the daemon had confirmed, so PostgreSQL sends again
    transactions Kafka holds; the resume position read from Kafka skips them.
    """
    slot = slot_name()
    settings = make_settings(pg_dsn, kafka_bootstrap, topic_prefix, postgres_slot=slot)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table t (id int primary key, v text)")
    with running_daemon(settings) as daemon:
        with Writer(pg_dsn, start=0) as writer:
            wait_for(lambda: len(writer.acked) >= 50, what="rows written before the restart")
            pg_server.restart(mode)
            sessions_before = daemon.stats.sessions
            n = len(writer.acked)
            wait_for(lambda: len(writer.acked) >= n + 50, what="rows written after the restart")
        assert writer.errors > 0, "the writer never noticed the restart: did it happen?"
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            in_table = {r[0] for r in conn.execute("select id from t").fetchall()}
        assert set(writer.acked) <= in_table
        events = table_events(kafka_bootstrap, topic_prefix, "t", expect=len(in_table), timeout=60)
        assert daemon.stats.sessions > sessions_before or sessions_before > 1, (
            "the daemon did not reconnect"
        )
    assert_exactly_once(events, in_table)


# --------------------------------------------------------------------------- idle publication, busy database


@pytest.mark.parametrize("heartbeat_s", ["0", "1"])
def test_busy_unpublished_tables_do_not_pin_wal(
    heartbeat_s: str, pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The publication covers table ``a`` only; megabytes of writes to ``b``
    produce no events, yet the slot's confirmed position keeps following the
    WAL within a few status intervals (1 s here), with heartbeats off
    (keepalive replies alone) and on."""
    slot = slot_name()
    settings = make_settings(
        pg_dsn,
        kafka_bootstrap,
        topic_prefix,
        postgres_slot=slot,
        postgres_tables="public.a",
        postgres_heartbeat_interval_s=heartbeat_s,
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table a (id int primary key, v text)")
        conn.execute("create table b (id int primary key, v text)")
        with running_daemon(settings) as daemon:
            start = confirmed_lsn(conn, slot)
            for round_ in range(3):
                before = insert_lsn(conn)
                base = round_ * 2000
                conn.execute(
                    "insert into b select g, repeat(md5(g::text), 30) from generate_series(%s::int, %s::int) g",
                    (base, base + 1999),
                )
                after = insert_lsn(conn)
                assert after - before > 1_000_000, "the write to b made less WAL than intended"
                # a pinned slot never moves: the deadline only bounds the wait (the
                # walsender decodes megabytes first, slow on a busy machine)
                wait_for(
                    lambda b=before: confirmed_lsn(conn, slot) > b,
                    timeout=60,
                    interval=0.1,
                    what=f"slot to pass {after - before} bytes of unpublished WAL",
                )
            assert confirmed_lsn(conn, slot) - start > 3_000_000
            assert daemon.stats.events == 0, "writes to an unpublished table produced events"


# --------------------------------------------------------------------------- start-up errors that name the fix


def run_daemon_cli(config: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("cdc", "run", "--config", str(config), timeout=60)


def assert_config_error(res: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert res.returncode == 2, f"exit {res.returncode}, expected 2; stderr:\n{res.stderr[-3000:]}"
    line = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
    assert line.startswith("error: "), f"last stderr line is not the error: {line!r}"
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert "Traceback" not in res.stderr


def test_wal_level_not_logical(tmp_path: Path, kafka_bootstrap: str, topic_prefix: str) -> None:
    """A server with wal_level=replica (a second, throw-away cluster: the shared
    one cannot be changed) is refused with the setting and the fix named."""
    with EmbeddedPostgres(
        base_dir=tmp_path / "pg-replica", extra_conf={"wal_level": "replica"}
    ) as pg:
        config = daemon_config(
            tmp_path / "cdc.toml",
            dsn=pg.dsn,
            bootstrap=kafka_bootstrap,
            prefix=topic_prefix,
            slot=slot_name(),
        )
        res = run_daemon_cli(config)
    assert_config_error(res, "wal_level", "'replica'", "ALTER SYSTEM SET wal_level = logical")


def test_role_without_replication_privilege(
    tmp_path: Path, pg_server: Any, pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    role = "r_" + uuid.uuid4().hex[:10]
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        admin.execute(f"create role {role} login password 'pw-{role}'")
    try:
        dsn = psycopg.conninfo.make_conninfo(pg_dsn, user=role, password=f"pw-{role}")
        config = daemon_config(
            tmp_path / "cdc.toml",
            dsn=dsn,
            bootstrap=kafka_bootstrap,
            prefix=topic_prefix,
            slot=slot_name(),
        )
        res = run_daemon_cli(config)
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
            admin.execute(f"drop role if exists {role}")
    assert_config_error(res, role, "REPLICATION", f"ALTER ROLE {role} REPLICATION")


BAD_CONFIGS: dict[str, tuple[dict[str, dict[str, object]], list[str]]] = {
    "missing table": (
        {"postgres": {"tables": ["public.t", "public.nope"]}},
        ["public.nope", "do not exist", "Fix"],
    ),
    "unknown key": (
        {"postgres": {"slott": "x"}},
        ["unknown setting postgres.slott", "postgres.slot"],
    ),
    "unknown section": ({"kafak": {"timeout_s": 1.0}}, ["unknown section [kafak]", "[kafka]"]),
    "wrong type": ({"kafka": {"batch_max_events": "many"}}, ["kafka.batch_max_events", "expected"]),
    "bad value": ({"kafka": {"timeout_s": -1.0}}, ["kafka.timeout_s", "must be > 0"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configuration_exits_2_naming_it(
    case: str, tmp_path: Path, pg_dsn: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    overrides, fragments = BAD_CONFIGS[case]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table t (id int primary key)")
    config = daemon_config(
        tmp_path / "cdc.toml",
        dsn=pg_dsn,
        bootstrap=kafka_bootstrap,
        prefix=topic_prefix,
        slot=slot_name(),
        **overrides,
    )
    assert_config_error(run_daemon_cli(config), *fragments)


def test_missing_config_file(tmp_path: Path) -> None:
    assert_config_error(run_daemon_cli(tmp_path / "nope.toml"), "nope.toml", "does not exist")


def test_kafka_connections_cut_repeatedly(
    pg_dsn: str, proxied_broker: ProxiedBroker, topic_prefix: str
) -> None:
    """Every Kafka connection is cut several times while rows stream (the broker
    stays up): whatever the producer makes of it (reconnect, or a failed
    transaction and a new session), every row arrives exactly once."""
    bootstrap = proxied_broker.bootstrap
    settings = make_settings(
        pg_dsn, bootstrap, topic_prefix,
        postgres_slot=slot_name(), kafka_timeout_s="3", cdc_retry_backoff_max_s="0.5", kafka_batch_max_events="5",
    )  # fmt: skip
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table t (id int primary key, v text)")
    with running_daemon(settings), Writer(pg_dsn, start=0, pause_s=0.01) as writer:
        for _ in range(5):
            time.sleep(0.5)
            proxied_broker.proxy.cut()
        time.sleep(0.5)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        in_table = {r[0] for r in conn.execute("select id from t").fetchall()}
    assert set(writer.acked) == in_table
    with running_daemon(settings):
        events = table_events(bootstrap, topic_prefix, "t", expect=len(in_table), timeout=60)
    assert_exactly_once(events, in_table)


def test_small_kafka_timeout_is_usable(
    pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """kafka.timeout_s = 0.5 is valid (> 0) and must not turn into a Kafka client
    configuration error retried forever."""
    settings = make_settings(
        pg_dsn, kafka_bootstrap, topic_prefix, postgres_slot=slot_name(), kafka_timeout_s="0.5"
    )
    with caplog.at_level(logging.WARNING, logger="fieldsync.cdc"):
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("create table t (id int primary key, v text)")
            with running_daemon(settings):
                write_rows(conn, range(3))
                events = table_events(kafka_bootstrap, topic_prefix, "t", expect=3)
    assert_exactly_once(events, {0, 1, 2})
    # a busy machine may let a 0.5 s Kafka request time out and the session start again;
    # what must never happen is a session failing on the clients' configuration
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert not [m for m in retries if "KafkaConfigurationError" in m], retries
