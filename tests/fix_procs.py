"""Plugin: no test leaves a fieldsync process of its own running.

Tests start cdc daemons, relays and appliers as subprocesses and stop them in ``finally``
blocks; a test that fails between the start and its ``try`` (or a helper that forgets)
would leave the process running, holding a replication slot or a port, and disturb every
later test.  After each test this plugin looks for Python processes that descend from the
test process and did not exist before the test, terminates them (SIGTERM, then SIGKILL
after a grace period) and names them in a warning.  The embedded PostgreSQL and broker are
not Python processes and are never touched.

Linux only (``/proc``); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

PROC = Path("/proc")
MULTIPROCESSING_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
"""Processes the standard library keeps for the whole run, not a test's."""


class LeftoverProcess(UserWarning):
    """A test left a process of its own running; the harness stopped it."""


def _children() -> dict[int, int]:
    """pid -> parent pid of every live, non-zombie process."""
    out: dict[int, int] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z":
            out[int(entry.name)] = int(fields[1])
    return out


def _python_descendants() -> dict[int, str]:
    """pid -> command line of the Python processes below this one."""
    parents = _children()
    below: set[int] = set()
    frontier = {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - below
        below |= frontier
    found: dict[int, str] = {}
    for pid in below:
        try:
            argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        program = os.path.basename(argv[0].decode(errors="replace"))
        command = " ".join(a.decode(errors="replace") for a in argv if a)
        if any(helper in command for helper in MULTIPROCESSING_HELPERS):
            continue
        if "python" in program or "fieldsync" in program:
            found[pid] = command[:200]
    return found


def _stop(pids: dict[int, str], grace_s: float = 10.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive &= _children().keys()  # a zombie (exited, not yet reaped) counts as gone
        if alive:
            time.sleep(0.1)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _still_running(before: set[int], settle_s: float = 3.0) -> dict[int, str]:
    """The new Python descendants still alive after *settle_s* (a pool shut down without
    waiting, or a daemon told to stop, may still be on its way out)."""
    deadline = time.monotonic() + settle_s
    while True:
        left = {pid: cmd for pid, cmd in _python_descendants().items() if pid not in before}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    if not PROC.is_dir():
        yield
        return
    before = set(_python_descendants())
    yield
    left = _still_running(before)
    if left:
        _stop(left)
        names = "; ".join(f"{pid}: {cmd}" for pid, cmd in sorted(left.items()))
        warnings.warn(
            LeftoverProcess(f"stopped processes the test left running: {names}"), stacklevel=2
        )
