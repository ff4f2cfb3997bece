"""The device's compiled apply module (``device_agent/bucket_ops.py``, devtools/compiled.py)
and the pure-Python one give the same database.

The same seeded downloads (tests/device_agent/apply_parity_driver.py: puts, removes, moves
between buckets, rows of a table several rules serve, app edits, ops named by another key
than the table's) are applied twice, in two subprocesses: once with the checkout as built
(the mypyc extension modules, where ``python3 dev.py`` could compile them) and once on a
copy of the ``.py`` sources alone.  Every apply's result, error text, and every table of
the database after it (holds with their terms and positions, bucket counts and checksums,
the app's tables, the journal) must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.compiled_parity import assert_same_lines, built_and_pure, require_compiled_build

DRIVER = "tests.device_agent.apply_parity_driver"
PACKAGES = ("core", "cdc", "relay", "device_agent", "config")
FILES = (
    "tests/__init__.py",
    "tests/device_agent/__init__.py",
    "tests/device_agent/test_device_apply.py",
    "tests/device_agent/test_device_apply_props.py",
    "tests/device_agent/apply_parity_driver.py",
)


def test_compiled_and_pure_apply_give_the_same_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_compiled_build()
    # bucket ids follow the order buckets are first met in sets of names: one hash seed
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    for seed in (1, 2, 3):
        built, pure = built_and_pure(DRIVER, tmp_path, seed, PACKAGES, FILES)
        assert "device_agent.bucket_ops" in json.loads(built[0])["compiled"]
        assert json.loads(pure[0]) == {"compiled": []}
        rounds = [json.loads(line) for line in built[1:]]
        # the downloads really ran: ops applied, rows held by app edits, a refused download
        assert sum(r["apply"].get("ops", 0) for r in rounds) > 100
        assert any(r["apply"].get("error") == "KeyMismatch" for r in rounds)
        assert all(r["db"]["_fieldsync_rows"] for r in rounds[1:])
        assert_same_lines(built, pure)
