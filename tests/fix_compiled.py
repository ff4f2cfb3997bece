"""First plugin of every test run: the sources run, never a stale compiled build.

``python3 dev.py`` compiles the hot modules (cdc, the engine's readers, the applier, the
device's apply) with mypyc (devtools/compiled.py) and rebuilds them when a source changes;
a test run started some other way (``.venv/bin/python -m pytest``) after an edit would otherwise import the old
extension modules.  This plugin is loaded before any other (first ``-p`` in pyproject's
addopts), removes a stale build before anything imports it, and names the build under test
in the report header.
"""

from __future__ import annotations

import pytest

from devtools.compiled import describe, drop_if_stale, status

_BEFORE = drop_if_stale()


def pytest_report_header(config: pytest.Config) -> str:
    note = (
        " (a stale build was removed; python3 dev.py build recompiles)"
        if _BEFORE.state == "stale"
        else ""
    )
    return f"fieldsync hot modules: {describe(status())}{note}"
