"""The test harness itself: real PostgreSQL with logical WAL, a real broker."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kafka import KafkaProducer

from devtools import local_services
from devtools.local_services import EmbeddedBroker, EmbeddedPostgres


def test_postgres_has_logical_wal(pg_conn: psycopg.Connection) -> None:  # type: ignore[type-arg]
    assert pg_conn.execute("show wal_level").fetchone() == ("logical",)


def test_broker_round_trip(kafka_bootstrap: str, topic_prefix: str, kafka_reader) -> None:  # type: ignore[no-untyped-def]
    topic = f"{topic_prefix}.harness"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    producer.send(topic, key=b"k", value=b"v", headers=[("h", b"1")]).get(timeout=10)
    producer.close()
    records = kafka_reader(topic, expect=1)
    assert [(r.key, r.value, r.headers) for r in records] == [(b"k", b"v", [("h", b"1")])]


def test_reading_fewer_records_than_expected_fails_naming_the_topic(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    from tests.fix_kafka import TopicReadTimeout, read_topic

    topic = f"{topic_prefix}.harness_short"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    producer.send(topic, value=b"only one").get(timeout=10)
    producer.close()
    assert [r.value for r in read_topic(kafka_bootstrap, topic)] == [b"only one"]
    with pytest.raises(TopicReadTimeout, match=f"read 1 records of {topic} in 2 s, not 2 records"):
        read_topic(kafka_bootstrap, topic, timeout=2, expect=2)


_OWNER = """
import sys
from devtools.local_services import EmbeddedBroker, EmbeddedPostgres

pg = EmbeddedPostgres()
pg.start()
broker = EmbeddedBroker()
broker.start()
print(pg.proc.pid, broker.proc.pid, flush=True)
print(pg.base_dir, flush=True)
print(broker.base_dir, flush=True)
sys.stdin.read()  # until killed
"""


def test_servers_stop_when_their_owner_is_killed() -> None:
    """A run killed with SIGKILL (no clean-up runs) leaves no PostgreSQL or broker behind."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    dirs: list[str] = []
    try:
        assert owner.stdout is not None
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 2, "the owner did not report its servers"
        dirs = [owner.stdout.readline().strip() for _ in range(2)]
        for pid in pids:
            os.kill(pid, 0)  # both run
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
        deadline = time.monotonic() + 60
        alive = list(pids)
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if _running(pid)]
            time.sleep(0.1)
        assert not alive, f"still running after their owner was killed: {alive}"
    finally:
        owner.kill()
        owner.wait(timeout=30)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def _running(pid: int) -> bool:
    """A process that exists and is not a zombie (an orphan's zombie is reaped by init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_services_start_on_another_port_when_theirs_was_taken(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Another process may bind the port free_port() found before the service does (test
    sessions running side by side): the service starts again on another free port."""
    real_free_port = local_services.free_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for service in (EmbeddedPostgres, EmbeddedBroker):
            # the service is handed the taken port first, then free ones
            ports = itertools.chain([port], iter(real_free_port, None))
            monkeypatch.setattr(local_services, "free_port", lambda ports=ports: next(ports))
            with service() as server:
                assert server.port != port
                assert server.proc is not None and server.proc.poll() is None
                log = server.log_path.read_text(errors="replace")
                assert "in use" in log, log[-2000:]
    # a port the caller chose is not replaced: its failure is reported
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = EmbeddedBroker(base_dir=tmp_path, port=taken.getsockname()[1])
        with pytest.raises(local_services.ServiceError, match="did not start"):
            broker.start(timeout=60)


def test_a_test_database_is_dropped_with_a_slot_still_streaming(pg_server: Any) -> None:
    """A test's database goes even while a walsender still streams its slot (a daemon's
    connection not yet gone): the backend is ended, and the slot dropped once it exited."""
    from tests.fix_pg import _drop_database

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    dsn = pg_server.dsn_for(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select pg_create_logical_replication_slot('held', 'pgoutput')")
        conn.execute("create publication p for all tables")
    stream = psycopg.connect(dsn, autocommit=True, replication="database")
    try:
        stream.pgconn.send_query(
            b"START_REPLICATION SLOT held LOGICAL 0/0 (proto_version '1', publication_names 'p')"
        )
        started = stream.pgconn.get_result()
        assert started is not None and started.status == psycopg.pq.ExecStatus.COPY_BOTH
        if isinstance(pg_server, EmbeddedPostgres):
            # a walsender slow to exit, as on a busy machine: stopped for a second, so the
            # terminate request takes effect only then (an external server is not ours to stop)
            with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
                row = admin.execute(
                    "select active_pid from pg_replication_slots where slot_name = 'held'"
                ).fetchone()
            assert row is not None and row[0] is not None
            os.kill(row[0], signal.SIGSTOP)
            threading.Timer(1.0, os.kill, (row[0], signal.SIGCONT)).start()
        _drop_database(pg_server.dsn, name)
        with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
            assert (
                admin.execute("select 1 from pg_database where datname = %s", (name,)).fetchall()
                == []
            )
            assert (
                admin.execute(
                    "select 1 from pg_replication_slots where slot_name = 'held'"
                ).fetchall()
                == []
            )
    finally:
        with contextlib.suppress(Exception):
            stream.close()
