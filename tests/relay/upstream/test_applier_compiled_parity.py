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
from pathlib import Path

from tests.compiled_parity import assert_same_lines, built_and_pure, require_compiled_build

DRIVER = "tests.relay.upstream.applier_parity_driver"
APPLIER_HOT = {
    "core.journal_format",
    "core.journal_outcomes",
    "core.values",
    "relay.upstream.conflict_policies",
    "relay.upstream.merge",
    "relay.upstream.validation",
    "relay.upstream.write_rules",
}


PACKAGES = ("core", "cdc", "relay", "device_agent", "config")
FILES = (
    "tests/__init__.py",
    "tests/schemas.py",
    "tests/relay/__init__.py",
    "tests/relay/upstream/__init__.py",
    "tests/relay/upstream/applier_parity_driver.py",
)


def test_compiled_and_pure_applier_modules_give_the_same_results(tmp_path: Path) -> None:
    require_compiled_build()
    for seed in (1, 2):
        built, pure = built_and_pure(DRIVER, tmp_path, seed, PACKAGES, FILES)
        assert APPLIER_HOT <= set(json.loads(built[0])["compiled"])
        assert json.loads(pure[0]) == {"compiled": []}
        # the journal really ran: merges, rejections, broken records
        assert sum('"merge": {' in line for line in built) > 50
        assert sum('"reason": "wrong_type"' in line for line in built) > 20
        assert any(line.startswith('{"record_error"') for line in built)
        # Outcome.with_visible_after copies every other field
        assert '"visible_after_kept_all": false' not in "".join(built)
        assert '"visible_after_kept_all": true' in "".join(built)
        assert_same_lines(built, pure)
