"""The compiled hot path (devtools/compiled.py) and the pure-Python one give the same bytes.

The same fixed pgoutput byte stream (tests/cdc/compiled_parity_driver.py) goes through the
decoder, the assembler, the Avro envelope and the Kafka record framing twice, in two
subprocesses: once with the checkout as built (the mypyc extension modules, where
``python3 dev.py`` could compile them) and once on a copy of the ``.py`` sources alone.
Every decoded message, event, schema, transaction end, error text and the record batch
must be identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from devtools import compiled
from tests.compiled_parity import assert_same_lines, built_and_pure, require_compiled_build

ROOT = Path(__file__).resolve().parents[2]
DRIVER = "tests.cdc.compiled_parity_driver"
HOT = sorted(p[: -len(".py")].replace("/", ".") for p in compiled.HOT_MODULES)


PACKAGES = ("core", "cdc", "relay", "device_agent")
FILES = ("tests/__init__.py", "tests/cdc/__init__.py", "tests/cdc/compiled_parity_driver.py")


def test_compiled_and_pure_builds_give_the_same_bytes(tmp_path: Path) -> None:
    require_compiled_build()
    for seed in (1, 2):
        built, pure = built_and_pure(DRIVER, tmp_path, seed, PACKAGES, FILES)
        assert json.loads(built[0]) == {"compiled": HOT}
        assert json.loads(pure[0]) == {"compiled": []}
        assert len(built) > 300  # the stream really ran: messages, events, errors, records
        assert sum('"event"' in line for line in built) > 200
        assert any(line.startswith('{"bad_value_error"') for line in built)
        assert_same_lines(built, pure)


def test_a_build_is_stale_once_a_module_it_depends_on_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for package in ("core", "cdc", "relay", "device_agent"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("*.so"))
    monkeypatch.setattr(compiled, "MANIFEST", tmp_path / "manifest.json")
    inputs = {p.relative_to(tmp_path).as_posix() for p in compiled.input_files(tmp_path)}
    assert set(compiled.HOT_MODULES) <= inputs
    assert "core/pg_types.py" in inputs  # imported by the hot modules, not compiled itself
    assert compiled.status(tmp_path).state == "pure"

    suffix = compiled.extension_suffix()
    for module in compiled.HOT_MODULES:
        (tmp_path / (module[: -len(".py")] + suffix)).write_bytes(b"")
    (tmp_path / f"{compiled.GROUP}__mypyc{suffix}").write_bytes(b"")
    assert compiled.status(tmp_path).state == "stale"  # no manifest
    (tmp_path / "manifest.json").write_text(
        json.dumps({"digest": compiled.source_digest(tmp_path)})
    )
    assert compiled.status(tmp_path).state == "compiled"

    types = tmp_path / "core" / "pg_types.py"
    types.write_text(types.read_text() + "\n# changed\n")
    assert compiled.status(tmp_path) == compiled.Status(
        "stale", len(compiled.HOT_MODULES) + 1, "sources changed since the build"
    )


def test_an_extension_module_left_over_from_an_earlier_hot_list_counts_as_compiled_output(
    tmp_path: Path,
) -> None:
    """A module dropped from HOT_MODULES leaves its extension beside its source: it is found
    (so the build is stale and removed), wherever it is in the project's packages, while
    extension modules outside them (a virtualenv's) are not."""
    from devtools.compiled import GROUP, extension_files, extension_suffix

    suffix = extension_suffix()
    ours = [
        tmp_path / "core" / f"hlc{suffix}",
        tmp_path / "relay" / "upstream" / f"merge{suffix}",
        tmp_path / f"{GROUP}__mypyc{suffix}",
    ]
    theirs = [tmp_path / ".venv" / "lib" / f"zlib{suffix}", tmp_path / "build" / f"x{suffix}"]
    for path in ours + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    assert sorted(extension_files(tmp_path)) == sorted(ours)
