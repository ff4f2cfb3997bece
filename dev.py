#!/usr/bin/env python3
"""Bootstrap and run fieldsync on a fresh machine that has only Python 3.11+.

    python3 dev.py demo     # the whole pipeline on embedded PostgreSQL + broker (cdc, relay, applier, a device)
    python3 dev.py test     # the whole test suite (real PostgreSQL and broker, started by the harness)
    python3 dev.py soak     # the long soaks (pytest -m slow: crash runs with many seeds); FIELDSYNC_SOAK_SEEDS=1-50
    python3 dev.py bench    # the benchmarks (figures go to docs/performance.md by hand)
    python3 dev.py build    # compile the hot modules (cdc, engine readers, applier, device apply) with mypyc again (--pure: remove it, run pure Python)
    python3 dev.py run -- fieldsync --help   # any command inside the virtual environment

It creates ``.venv`` next to this file and installs the project with its test
extras (only when pyproject.toml changed since the last install), then compiles the hot
modules of the cdc path with mypyc when a C compiler and the Python headers are present
(only when their sources changed; see devtools/compiled.py) and says which build runs:
"[dev] compiled: N modules" or "[dev] pure Python (why)".  Without a compiler the
pure-Python modules run: same behaviour, same output bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".fieldsync-installed"


def _have_pg_binaries() -> bool:
    if os.environ.get("FIELDSYNC_PG_BINDIR") or shutil.which("pg_config"):
        return True
    return any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be started by an older system python
        sys.exit(f"fieldsync needs Python 3.11 or newer (this is {sys.version.split()[0]})")
    if not (BIN / "python").exists():
        print(f"[dev] creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    extras = "test" if _have_pg_binaries() else "test,pgserver"
    want = f"{digest}:{extras}"
    if STAMP.exists() and STAMP.read_text() == want:
        return
    print(f"[dev] installing fieldsync[{extras}] into {VENV}", flush=True)
    subprocess.run(
        [str(BIN / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True
    )
    subprocess.run(
        [str(BIN / "python"), "-m", "pip", "install", "-q", "-e", f"{ROOT}[{extras}]"], check=True
    )
    STAMP.write_text(want)


def ensure_compiled() -> None:
    """Build the compiled hot modules when missing or stale; a failed or impossible build
    leaves the pure-Python modules running (devtools/compiled.py says why)."""
    subprocess.call([str(BIN / "python"), "-m", "devtools.compiled", "ensure"], cwd=ROOT)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    ensure_venv()
    cmd, rest = argv[0], argv[1:]
    if cmd == "build":
        action = "clean" if rest[:1] == ["--pure"] else "build"
        return subprocess.call([str(BIN / "python"), "-m", "devtools.compiled", action], cwd=ROOT)
    ensure_compiled()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if cmd == "demo":
        args = [str(BIN / "fieldsync"), "demo", *rest]
    elif cmd == "test":
        args = [str(BIN / "python"), "-m", "pytest", *rest]
    elif cmd == "soak":
        # -m slow after pyproject's addopts (-m 'not slow') wins; -rP prints each run's summary
        args = [str(BIN / "python"), "-m", "pytest", "-m", "slow", "-rP", *rest]
    elif cmd == "bench":
        args = [str(BIN / "python"), str(ROOT / "bench" / "run_all.py"), *rest]
    elif cmd == "run":
        args = rest[1:] if rest[:1] == ["--"] else rest
    else:
        print(f"unknown command {cmd!r}; see python3 dev.py --help", file=sys.stderr)
        return 2
    return subprocess.call(args, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
