"""The pipeline's server processes for end-to-end tests (not a plugin: imported by tests).

``fieldsync cdc run``, ``fieldsync relay run`` and ``fieldsync relay applier`` run as
subprocesses (``python -m fieldsync.cli``, this source tree) on settings, rules, conflicts and
token-key files written for the test, against the test PostgreSQL and broker.  Each
:class:`Process` keeps its output in a log file and can be killed with SIGKILL and
started again on the same arguments (a new incarnation, appending to the same log).
The relay listens on a free port chosen at each start; :attr:`Stack.url` follows it.
The relay's and the applier's metrics endpoints listen on free ports too
(:meth:`Stack.metrics_url` reads them from the logs).

Threads: one reader thread per running process copies its output; :class:`Stack`'s
lock serialises kill/restart against :meth:`Stack.check`, so a process that a test
killed on purpose is never reported as having died.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from relay.auth_keys import KeyStore
from tests.cdc.cdc_support import wait_for
from tests.cdc.test_cdc_cli import cli_env, daemon_config
from tests.schemas import write_keys

_LISTENING = re.compile(r"listening on http://[^:]+:(\d+)")
_METRICS = re.compile(r"metrics on (http://[^/\s\"]+)/metrics")
STOPPED = re.compile(r"(bucket engine|outcome feed) stopped with an error")
"""What the relay logs when a thread of it stops for good while the process runs on."""


class Process:
    """A server process (``python -m fieldsync.cli ...``); output kept in a log file."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name, self.args, self.log = name, args, log
        self.lines: list[str] = []
        self.incarnation = 0
        self.proc: subprocess.Popen[str]
        self.reader: threading.Thread
        log.write_text("")
        self.start()

    def start(self) -> None:
        """Start (again): ``lines`` holds this incarnation's output only."""
        self.incarnation += 1
        self.lines = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fieldsync.cli", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=cli_env(),
        )
        self.reader = threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True)
        self.reader.start()

    def _read(self, proc: subprocess.Popen[str], lines: list[str]) -> None:
        assert proc.stdout is not None
        with open(self.log, "a") as out:
            out.write(f"--- {self.name} #{self.incarnation} (pid {proc.pid}) ---\n")
            for line in proc.stdout:
                lines.append(line)
                out.write(line)
                out.flush()

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with {self.proc.returncode}:\n" + "".join(self.lines[-30:])
            )

    def stopped_threads(self) -> list[str]:
        """This incarnation's log lines saying that a thread stopped for good (with the
        traceback's last line)."""
        out = []
        for i, line in enumerate(self.lines):
            if STOPPED.search(line):
                tail = next(
                    (x for x in self.lines[i + 1 : i + 80] if not x.startswith((" ", "Trace"))),
                    "",
                )
                out.append(f"{self.name}: {line.strip()}: {tail.strip()}")
        return out

    def kill(self) -> int:
        """SIGKILL, as a crash: no shutdown code runs.  Returns the exit status (-9)."""
        self.alive()
        self.proc.send_signal(signal.SIGKILL)
        code = self.proc.wait(30)
        self.reader.join(10)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.reader.join(10)


@dataclass
class Stack:
    """cdc, the relay and the applier, running; see the module docstring."""

    keys: KeyStore
    cdc_config: Path
    relay_config: Path
    procs: dict[str, Process]
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self) -> None:
        """Every process is running (raises with the tail of the one that is not)."""
        with self.lock:
            for p in self.procs.values():
                p.alive()

    def stopped_threads(self) -> list[str]:
        with self.lock:
            return [x for p in self.procs.values() for x in p.stopped_threads()]

    def wait_listening(self, timeout: float = 90) -> str:
        relay = self.procs["relay"]

        def port() -> int:
            for p in self.procs.values():
                p.alive()
            found = _LISTENING.search("".join(relay.lines))
            return int(found.group(1)) if found else 0

        self.url = f"http://127.0.0.1:{wait_for(port, timeout=timeout, what='the relay listening')}"
        return self.url

    def metrics_url(self, name: str, timeout: float = 90) -> str:
        """The base URL of the metrics endpoint of process ``name`` (its log says where:
        the stack's settings ask for any free port)."""
        proc = self.procs[name]

        def found() -> str:
            proc.alive()
            m = _METRICS.search("".join(proc.lines))
            return m.group(1) if m else ""

        url: str = wait_for(found, timeout=timeout, what=f"the metrics endpoint of {name}")
        return url

    def kill_and_restart(self, name: str) -> int:
        """SIGKILL one process and start it again (for the relay: until it listens, on a
        new port, :attr:`url`).  Returns the killed process's exit status."""
        with self.lock:
            code = self.procs[name].kill()
            self.procs[name].start()
            if name == "relay":
                self.wait_listening()
        return code

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.stop()


@contextlib.contextmanager
def services(
    tmp_path: Path,
    pg_dsn: str,
    store_dsn: str,
    bootstrap: str,
    prefix: str,
    *,
    rules: str,
    conflicts: str,
    tables: list[str],
    http_port: int = 0,
    engine_shares: int = 1,
    long_poll_s: float = 5,
    ddl_check_s: float | None = None,
    max_page_ops: int | None = None,
) -> Iterator[Stack]:
    """cdc, the relay and the applier running on their settings files (rules and conflicts
    given as TOML text, ``tables`` published by cdc); stopped at the end, after a check
    that none had died.  ``http_port``: the relay's API port (0: a free one at each start;
    a fixed one keeps :attr:`Stack.url` across restarts, for devices).  ``engine_shares``
    above 1: cdc creates change topics of that many partitions, and as many relay
    processes run (``relay``, ``relay-2``, ...), each leading one share of the engine.
    ``long_poll_s``: the relay's cap on a long-poll's wait.  ``ddl_check_s``: seconds
    between cdc's and the relay's reads of the tables' definitions (``cdc.ddl_check_interval_s``,
    ``relay.schema_check_interval_s``; None: their defaults), for tests of DDL.
    ``max_page_ops``: the relay's cap on the ops of one changes message
    (``http.max_page_ops``; None: its default), small for downloads of many messages."""
    (tmp_path / "rules.toml").write_text(rules)
    (tmp_path / "conflicts.toml").write_text(conflicts)
    keys = write_keys(tmp_path / "keys.toml", "e" * 40)
    cdc_config = daemon_config(
        tmp_path / "cdc.toml",
        dsn=pg_dsn,
        bootstrap=bootstrap,
        prefix=prefix,
        slot="e2e_" + uuid.uuid4().hex[:10],
        postgres={"tables": tables},
        kafka={"batch_max_ms": 10, "topic_partitions": engine_shares},
        cdc={
            "state_dir": str(tmp_path / "cdc-state"),
            **({} if ddl_check_s is None else {"ddl_check_interval_s": ddl_check_s}),
        },
    )
    schema_check = "" if ddl_check_s is None else f"schema_check_interval_s = {ddl_check_s}\n"
    page_cap = "" if max_page_ops is None else f"max_page_ops = {max_page_ops}\n"
    relay_config = tmp_path / "relay.toml"
    relay_config.write_text(
        f'[relay]\nstore_dsn = "{store_dsn}"\nsource_dsn = "{pg_dsn}"\n'
        f'rules = "{tmp_path / "rules.toml"}"\ntopic_prefix = "{prefix}"\n'
        f'kafka_bootstrap_servers = "{bootstrap}"\nbatch_max_ms = 10\n'
        f'metrics_listen = "127.0.0.1:0"\nengine_shares = {engine_shares}\n{schema_check}\n'
        f"[http]\nport = {http_port}\nlong_poll_s = {long_poll_s}\nrate_per_s = 0\n{page_cap}\n"
        f'[auth]\nkeys_file = "{keys}"\n\n'
        f'[journal]\ndsn = "{pg_dsn}"\nconflicts = "{tmp_path / "conflicts.toml"}"\n'
        'batch_max_ms = 10\napplier_metrics_listen = "127.0.0.1:0"\n'
    )
    stack = Stack(KeyStore.from_file(keys), cdc_config, relay_config, {})
    try:
        stack.procs["cdc"] = Process(
            "cdc", ["cdc", "run", "--config", str(cdc_config)], tmp_path / "cdc.log"
        )
        stack.procs["relay"] = Process(
            "relay", ["relay", "run", "--config", str(relay_config)], tmp_path / "r.log"
        )
        for n in range(2, engine_shares + 1):
            stack.procs[f"relay-{n}"] = Process(
                f"relay-{n}",
                ["relay", "run", "--config", str(relay_config)],
                tmp_path / f"r{n}.log",
            )
        stack.procs["applier"] = Process(
            "applier",
            ["relay", "applier", "--config", str(relay_config)],
            tmp_path / "applier.log",
        )
        stack.wait_listening()
        yield stack
        stack.check()
    finally:
        stack.stop()
