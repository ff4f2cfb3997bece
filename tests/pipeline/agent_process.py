"""``device-agent sync --watch`` as a process for end-to-end tests (not a plugin: imported
by tests): started on a database (``python -m device_agent.cli``, this source tree), its
output appended to a log file, killed with SIGKILL as a crash and started again, or
stopped with SIGTERM; and :func:`until`, the poll with a deadline the tests wait with."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.cdc.test_cdc_cli import cli_env


def until(check: Callable[[], Any], what: str, timeout: float, alive: Callable[[], None]) -> Any:
    """Poll ``check`` (every 10 ms) until it returns something true; ``alive`` raises when
    a process the wait depends on died."""
    deadline = time.monotonic() + timeout
    while True:
        alive()
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:g} s (last: {got!r})")
        time.sleep(0.01)


class AgentProcess:
    """``device-agent sync --watch`` as a process; SIGKILLed and started again."""

    def __init__(self, db: str, log: Path, rng: random.Random) -> None:
        self.db, self.log, self.rng = db, log, rng
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.modes: list[str] = []

    def start(self) -> None:
        self.incarnation += 1
        ws = self.rng.random() < 0.5  # WebSocket or long-poll, seeded per incarnation
        self.modes.append("ws" if ws else "poll")
        with open(self.log, "a") as out:
            out.write(f"--- agent #{self.incarnation} ({self.modes[-1]}) ---\n")
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "device_agent.cli", "sync", "--watch", "--json"]
                + ([] if ws else ["--no-ws"])
                + ["--db", self.db],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=cli_env(),
            )

    def tail(self) -> str:
        return "".join(self.log.read_text().splitlines(keepends=True)[-40:])

    def alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the agent (#{self.incarnation}) exited on its own with "
                f"{self.proc.returncode}:\n{self.tail()}"
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.alive()
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL

    def stop(self) -> int:
        """SIGTERM (as at shutdown); the exit status."""
        assert self.proc is not None
        self.alive()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the agent did not stop on SIGTERM:\n{self.tail()}") from None

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
