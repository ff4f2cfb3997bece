"""Shared by the compiled-parity tests (tests/cdc/test_compiled_parity.py,
tests/relay/upstream/test_applier_compiled_parity.py): run a seeded driver module once on
the checkout as built (with the mypyc extension modules) and once on a copy of the ``.py``
sources alone, and give both outputs, line by line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from devtools import compiled
from tests.schemas import REPO


def require_compiled_build() -> None:
    """Skip when there is no compiled build to compare (fail in CI where a compiler is)."""
    st = compiled.status()
    if st.state != "compiled":
        if compiled.why_not_buildable() is None and os.environ.get("CI"):
            pytest.fail(f"a compiler is here but the hot modules are not built: {st}")
        pytest.skip(f"no compiled build to compare ({compiled.describe(st)}; python3 dev.py build)")


def run_driver(driver: str, cwd: Path, seed: int, pythonpath: Path | None = None) -> list[str]:
    """The output lines of ``python -m driver seed`` run in ``cwd``."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run(
        [sys.executable, "-m", driver, str(seed)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def pure_copy(dest: Path, packages: Sequence[str], files: Sequence[str]) -> Path:
    """``packages`` (directories of the checkout) without any compiled module, and the
    single ``files`` (the driver and what it imports), copied under ``dest``."""
    for package in packages:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("*.so"))
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, dest / name)
    return dest


def built_and_pure(
    driver: str, tmp_path: Path, seed: int, packages: Sequence[str], files: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The driver's output on the checkout as built and on a pure copy of it."""
    built = run_driver(driver, REPO, seed)
    copy = pure_copy(tmp_path / f"pure{seed}", packages, files)
    return built, run_driver(driver, copy, seed, pythonpath=copy)


def assert_same_lines(built: list[str], pure: list[str]) -> None:
    """Every line after the first (which names the compiled modules) is the same."""
    assert len(built) == len(pure)
    for index, (a, b) in enumerate(zip(built[1:], pure[1:], strict=True), start=1):
        assert a == b, f"line {index} differs:\ncompiled: {a[:400]}\npure:     {b[:400]}"
