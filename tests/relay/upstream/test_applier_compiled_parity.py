"""The applier's compiled per-entry modules (devtools/compiled.py) and the pure-Python ones
give the same results.

The same seeded journal (tests/relay/upstream/applier_parity_driver.py) goes through record
parsing, validation against a device's write scope, the merge with the example conflict
policies and the outcome's JSON twice, in two subprocesses: once with the checkout as built
(the mypyc extension modules, where ``python3 dev.py`` could compile them) and once on a
copy of the ``.py`` sources alone.  Every parsed entry, rejection, normalized entry, merge
result, outcome and error text must be identical.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import compiled

ROOT = Path(__file__).resolve().parents[3]
DRIVER = "tests.relay.upstream.applier_parity_driver"
APPLIER_HOT = {
    "core.journal_format",
    "core.values",
    "relay.upstream.conflict_policies",
    "relay.upstream.merge",
    "relay.upstream.validation",
    "relay.upstream.write_rules",
}


def _run(cwd: Path, seed: int, pythonpath: Path | None = None) -> list[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run(
        [sys.executable, "-m", DRIVER, str(seed)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _pure_copy(dest: Path) -> Path:
    """The sources of core/, cdc/, relay/, the example config and the driver, without any
    compiled module."""
    for package in ("core", "cdc", "relay", "config"):
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("*.so"))
    (dest / "tests" / "relay" / "upstream").mkdir(parents=True)
    for name in (
        "tests/__init__.py",
        "tests/schemas.py",
        "tests/relay/__init__.py",
        "tests/relay/upstream/__init__.py",
        "tests/relay/upstream/applier_parity_driver.py",
    ):
        shutil.copy(ROOT / name, dest / name)
    return dest


def test_compiled_and_pure_applier_modules_give_the_same_results(tmp_path: Path) -> None:
    st = compiled.status()
    if st.state != "compiled":
        reason = compiled.why_not_buildable()
        if reason is None and os.environ.get("CI"):
            pytest.fail(f"a compiler is here but the hot modules are not built: {st}")
        pytest.skip(f"no compiled build to compare ({compiled.describe(st)}; python3 dev.py build)")
    for seed in (1, 2):
        built = _run(ROOT, seed)
        pure = _run(_pure_copy(tmp_path / f"pure{seed}"), seed, pythonpath=tmp_path / f"pure{seed}")
        assert APPLIER_HOT <= set(json.loads(built[0])["compiled"])
        assert json.loads(pure[0]) == {"compiled": []}
        # the journal really ran: merges, rejections, broken records
        assert sum('"merge": {' in line for line in built) > 50
        assert sum('"reason": "wrong_type"' in line for line in built) > 20
        assert any(line.startswith('{"record_error"') for line in built)
        # Outcome.with_visible_after copies every other field
        assert '"visible_after_kept_all": false' not in "".join(built)
        assert '"visible_after_kept_all": true' in "".join(built)
        assert len(built) == len(pure)
        for index, (a, b) in enumerate(zip(built[1:], pure[1:], strict=True), start=1):
            assert a == b, f"line {index} differs:\ncompiled: {a[:400]}\npure:     {b[:400]}"
