"""The leftover-process plugin (tests/fix_procs.py) finds and stops a test's processes."""

from __future__ import annotations

import subprocess
import sys

from tests.fix_procs import _python_descendants, _stop


def test_a_python_child_is_found_and_stopped() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        found = _python_descendants()
        assert proc.pid in found and "time.sleep(600)" in found[proc.pid]
        _stop({proc.pid: found[proc.pid]})
        assert proc.wait(timeout=30) != 0  # ended by the signal, not by itself
        assert proc.pid not in _python_descendants()
    finally:
        proc.kill()
        proc.wait()


def test_a_child_that_ignores_sigterm_is_killed() -> None:
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        _stop({proc.pid: "ignores SIGTERM"}, grace_s=0.5)
        assert proc.wait(timeout=30) == -9
    finally:
        proc.kill()
        proc.wait()
