"""The house keeps its shape: layers (import-linter contracts in pyproject.toml), no module
that is a maze, and no package cycle.  docs/architecture.md draws what is checked here."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "cdc", "relay", "device_agent", "replay", "devtools", "fieldsync")
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
        ],
        cwd=cwd,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_contracts_are_kept() -> None:
    res = _lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 4 kept, 0 broken." in res.stdout, res.stdout


@pytest.mark.parametrize(
    ("package", "planted", "contract"),
    [
        ("device_agent", "import psycopg", "the device agent imports no server package"),
        ("device_agent", "from relay import errors", "the device agent imports no server package"),
        ("cdc", "import relay.errors", "packages form layers"),
        ("core", "import cdc.errors", "packages form layers"),
        (
            "relay.downstream",
            "import relay.upstream.write_rules",
            "relay: the server over the upstream",
        ),
    ],
)
def test_a_planted_violation_breaks_a_contract(
    tmp_path: Path, package: str, planted: str, contract: str
) -> None:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path.joinpath(*package.split(".")) / "planted_violation.py"
    target.write_text(f'"""A planted violation."""\n\n{planted}\n')
    res = _lint_imports(tmp_path)
    assert res.returncode != 0, res.stdout
    broken = res.stdout[res.stdout.index("Broken contracts") :]
    assert contract in broken, res.stdout
    assert f"{package}.planted_violation" in broken, res.stdout


def _modules() -> list[Path]:
    return sorted(p for name in PACKAGES for p in (ROOT / name).rglob("*.py"))


def test_no_module_is_a_maze() -> None:
    too_long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


def test_no_class_is_a_maze() -> None:
    too_long = {}
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_CLASS_LINES:
                    too_long[f"{p.relative_to(ROOT)}:{node.name}"] = n
    assert not too_long, f"classes over {MAX_CLASS_LINES} lines: {too_long}"


def test_no_package_imports_another_in_a_cycle() -> None:
    edges: dict[str, set[str]] = {name: set() for name in PACKAGES}
    for p in _modules():
        source = p.relative_to(ROOT).parts[0]
        for node in ast.walk(ast.parse(p.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                else []
            )
            for name in names:
                top = name.split(".")[0]
                if top in edges and top != source:
                    edges[source].add(top)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
            for nxt in edges[start]
        )

    cycles = sorted(name for name in PACKAGES if reaches(name, name, {name}))
    assert not cycles, f"packages in an import cycle: {cycles} ({edges})"
