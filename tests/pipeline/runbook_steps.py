"""Runs the runbooks of docs/operations.md, as written there, against a test stack.

A runbook is a ```` ```sh ```` block right after a ``<!-- runbook: NAME -->`` line.  Its
steps are its commands: a line (with ``\\`` continuations), or a command with a
here-document up to its terminator.  Each step is one of:

- ``systemctl stop|start|restart UNIT…``: the harness stops, starts or restarts the stack's
  process of each unit (``fieldsync-cdc``, ``fieldsync-relay``, ``fieldsync-applier@N`` or
  ``'fieldsync-applier@*'``); a started relay is waited for until it listens;
- ``NAME=value …`` (only assignments): variables for the next steps, unless the test gave
  that name a value of its own (the test's paths win over the documented examples);
- a line ending in ``# repeat until it exits 0``: run until it exits 0 (with a deadline);
- ``pip install`` lines (:data:`NOT_RUN`): not run, recorded;
- anything else: ``bash -euo pipefail -c STEP`` with the variables in the environment
  and this tree's ``fieldsync`` and ``device-agent`` first on ``PATH``; it must exit 0.

:meth:`Runbooks.run` returns what was done, step by step, for the test to check.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from tests.cdc.test_cdc_cli import REPO, cli_env
from tests.pipeline.pipeline_stack import Stack

DOC = REPO / "docs" / "operations.md"
_BLOCK = re.compile(r"<!-- runbook: ([a-z0-9-]+) -->\n```sh\n(.*?)```", re.S)
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
_ASSIGNMENT = re.compile(r"[A-Z_][A-Z0-9_]*=")
REPEAT = "# repeat until it exits 0"
NOT_RUN = ("pip ", "/opt/fieldsync/.venv/bin/pip ")
UNITS = {"fieldsync-cdc": "cdc", "fieldsync-relay": "relay", "fieldsync-applier@": "applier"}


def runbooks(doc: Path = DOC) -> dict[str, str]:
    """Every runbook of the document: name → its block."""
    found: dict[str, str] = {}
    for name, block in _BLOCK.findall(doc.read_text()):
        assert name not in found, f"runbook {name} appears twice in {doc}"
        found[name] = block
    return found


def steps(block: str) -> list[str]:
    """The block's commands (comment-only and blank lines left out)."""
    lines = block.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        text = lines[i]
        i += 1
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        while text.rstrip().endswith("\\") and i < len(lines):
            text += "\n" + lines[i]
            i += 1
        heredoc = _HEREDOC.search(text)
        if heredoc:
            while i < len(lines):
                text += "\n" + lines[i]
                i += 1
                if lines[i - 1].strip() == heredoc.group(2):
                    break
        out.append(text)
    return out


def _assignments(step: str) -> dict[str, str]:
    """The variables a step made only of ``NAME=value`` words sets (else nothing)."""
    if "\n" in step:
        return {}
    words = shlex.split(step, comments=True)
    if not words or not all(_ASSIGNMENT.match(w) for w in words):
        return {}
    return dict(w.split("=", 1) for w in words)  # type: ignore[misc]


def _unit_process(unit: str) -> str:
    unit = unit.strip("'\"")
    for prefix, name in UNITS.items():
        if unit == prefix or (prefix.endswith("@") and unit.startswith(prefix)):
            return name
    raise AssertionError(f"runbook names unit {unit!r}, which the test stack does not run")


@dataclasses.dataclass
class Runbooks:
    """Runs runbooks against ``stack`` with the test's ``variables`` (module docstring)."""

    stack: Stack
    variables: Mapping[str, str]
    cwd: Path
    repeat_s: float = 180.0
    env: dict[str, str] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.env = cli_env()
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.env.update(self.variables)

    def run(
        self, name: str, after: Mapping[str, Callable[[], None]] | None = None
    ) -> list[tuple[str, str]]:
        """Run runbook ``name``; ``after``: a callback run after the first step that starts
        with its key.  Returns (what was done, step) for each step."""
        block = runbooks().get(name)
        assert block is not None, f"no runbook {name!r} in {DOC}"
        hooks = dict(after or {})
        done: list[tuple[str, str]] = []
        for step in steps(block):
            done.append((self._step(step), step))
            for key in [k for k in hooks if step.startswith(k)]:
                hooks.pop(key)()
        assert not hooks, f"runbook {name}: no step starts with {sorted(hooks)}"
        return done

    def _step(self, step: str) -> str:
        words = step.split()
        if words[0] == "systemctl":
            self._systemctl(words[1], words[2:])
            return "systemctl"
        assignments = _assignments(step)
        if assignments:
            for key, value in assignments.items():
                if key not in self.variables:
                    self.env[key] = value
            return "assigned"
        if step.startswith(NOT_RUN):
            return "not run"
        if step.rstrip().endswith(REPEAT):
            self._repeat(step)
            return "repeated"
        res = self._bash(step)
        assert res.returncode == 0, (
            f"step failed ({res.returncode}): {step}\n{res.stdout}\n{res.stderr}"
        )
        return "ran"

    def _bash(self, step: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", step],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=900,
        )

    def _repeat(self, step: str) -> None:
        deadline = time.monotonic() + self.repeat_s
        while True:
            res = self._bash(step)
            if res.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"step still exits {res.returncode} after {self.repeat_s:g}s: {step}\n"
                    f"{res.stdout}\n{res.stderr}"
                )
            time.sleep(1)

    def _systemctl(self, action: str, units: list[str]) -> None:
        assert action in ("start", "stop", "restart"), f"systemctl {action} is not mapped"
        for unit in units:
            proc = self.stack.procs[_unit_process(unit)]
            with self.stack.lock:
                if action in ("stop", "restart"):
                    proc.stop()
                if action in ("start", "restart"):
                    proc.start()
            if action != "stop" and proc.name == "relay":
                self.stack.wait_listening()
