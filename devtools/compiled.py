"""The compiled hot paths: mypyc builds of the modules every change event and every
journal entry passes through.

Which modules: :data:`HOT_MODULES`.  The per-event code of cdc: the pgoutput wire reader
and decoder, the change assembler, the Avro envelope and binary encoders, the PostgreSQL
value parsers and type mapping, the Kafka record framing and batching.  The per-entry code
of the upstream applier: the journal record and outcome formats (``core/journal_format.py``,
``core/journal_outcomes.py``), the column values and their checks (``core/values.py``),
and in ``relay/upstream/`` the write rules, the validation of entries, the conflict
policies and the three-way merge (the applier's I/O modules around them stay Python).
The per-change code of the relay's bucket engine: the Avro reader that runs a program
compiled from each writer schema (``core/avro_reader.py``) and the event prefilter
(``relay/downstream/event_prefilter.py``).  The per-op code of the device agent's apply
(``device_agent/bucket_ops.py``: checksum terms, holds, bucket sums, fast-path rows).

They are ordinary typed Python (``mypy --strict`` clean); mypyc compiles them into C extension
modules placed next to their sources
(``cdc/pgoutput_decoder.cpython-311-x86_64-linux-gnu.so`` beside ``cdc/pgoutput_decoder.py``),
which Python's import system prefers to the ``.py``, plus one shared library of the group
at the top of the checkout (``fieldsync_hot__mypyc.*.so``).  Nothing else changes: the
pure-Python modules are the same code, and produce the same bytes and results
(``tests/cdc/test_compiled_parity.py``,
``tests/relay/upstream/test_applier_compiled_parity.py``, ``tests/core/test_avro_reader.py``
and ``tests/device_agent/test_device_apply_compiled_parity.py`` run both on one input and
compare).

Freshness: a build records a digest of its inputs (the hot modules, the core, cdc, relay
and device_agent modules they import, this file, the Python and mypy versions) in
``build/compiled/manifest.json``.
When the digest no longer matches (a source was edited) the compiled modules are removed
before anything else, so the sources always win: ``python3 dev.py`` rebuilds them, and the
test suite's first plugin (``tests/fix_compiled.py``) removes stale ones.  Without a C
compiler, the Python headers or mypyc, nothing is built and the pure-Python modules run.
``FIELDSYNC_NO_COMPILE=1`` asks for the pure modules even where a compiler is present.

Commands (``python -m devtools.compiled ...``; ``python3 dev.py build`` runs ``build``):
``ensure`` (build when missing or stale, say which build runs), ``build`` (rebuild now),
``clean`` (remove the compiled modules), ``status``.

Concurrency: building and removing hold an exclusive lock file (``build/compiled.lock``), so
two commands started at once in one checkout do not interleave; a build first removes the
old extension files (new files are new inodes, so a running process keeps the ones it
loaded) and writes the manifest only when every module was built.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / "build" / "compiled"
MANIFEST = BUILD_DIR / "manifest.json"
LOCK = ROOT / "build" / "compiled.lock"
GROUP = "fieldsync_hot"
NO_COMPILE_ENV = "FIELDSYNC_NO_COMPILE"

#: The modules mypyc compiles, as paths from the checkout's root.  Each must stay
#: mypyc-compatible: no monkeypatching of its names, no subclassing of its classes by
#: interpreted code, values of the declared types at runtime.
HOT_MODULES: tuple[str, ...] = (
    "cdc/pgoutput_wire.py",
    "cdc/pgoutput_decoder.py",
    "cdc/change_assembler.py",
    "cdc/kafka_records.py",
    "cdc/kafka_bulk.py",
    "core/avro_binary.py",
    "core/avro_envelope.py",
    "core/avro_reader.py",
    "core/pg_values.py",
    "core/pg_type_mapping.py",
    "core/values.py",
    "core/journal_format.py",
    "core/journal_outcomes.py",
    "relay/upstream/write_rules.py",
    "relay/upstream/validation.py",
    "relay/upstream/conflict_policies.py",
    "relay/upstream/merge.py",
    "relay/downstream/event_prefilter.py",
    "device_agent/bucket_ops.py",
)
_PROJECT_PACKAGES = ("core", "cdc", "relay", "device_agent")


@dataclass(frozen=True)
class Status:
    """Which build the checkout runs: ``compiled`` (fresh), ``stale``, or ``pure``."""

    state: str
    modules: int
    reason: str = ""


def extension_suffix() -> str:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    return str(suffix) if suffix else ".so"


_SOURCE_PACKAGES: Final = (
    "core",
    "cdc",
    "relay",
    "device_agent",
    "replay",
    "devtools",
    "fieldsync",
)
"""Every package of the project: none has a C extension of its own, so an extension
module inside one is a compiled hot module, or one left over from an earlier list."""


def extension_files(root: Path = ROOT) -> list[Path]:
    """The compiled files present: every extension module inside the project's packages
    (the hot modules, and any left over by a build of an earlier :data:`HOT_MODULES`, which
    makes the build stale) and the group's shared library."""
    suffix = extension_suffix()
    found: list[Path] = []
    for package in _SOURCE_PACKAGES:
        found += sorted((root / package).rglob(f"*{suffix}"))
    found += sorted(root.glob(f"{GROUP}__mypyc*{suffix}"))
    return found


def _imported_modules(path: Path) -> set[str]:
    """Project modules (core.*, cdc.*, relay.*, device_agent.*) a source file imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.split(".")[0] in _PROJECT_PACKAGES}


def input_files(root: Path = ROOT) -> list[Path]:
    """The hot modules and every project module they import, transitively (their types
    are part of what mypyc compiles against)."""
    seen: set[Path] = set()
    todo = [root / m for m in HOT_MODULES]
    while todo:
        path = todo.pop()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        for name in _imported_modules(path):
            base = root / Path(*name.split("."))
            todo += [base.with_suffix(".py"), base / "__init__.py"]
    return sorted(seen)


def _mypy_version() -> str:
    try:
        return importlib.metadata.version("mypy")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def source_digest(root: Path = ROOT) -> str:
    h = hashlib.sha256()
    h.update(f"{sys.version}|{_mypy_version()}|{extension_suffix()}".encode())
    for path in [*input_files(root), Path(__file__).resolve()]:
        h.update(str(path.relative_to(root) if path.is_relative_to(root) else path.name).encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def why_not_buildable() -> str | None:
    """None when this machine can compile the hot modules, else the reason it cannot."""
    if os.environ.get(NO_COMPILE_ENV):
        return f"{NO_COMPILE_ENV} is set"
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed: it comes with mypy, in the test extra"
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed: it is in the test extra"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler: {cc} not found"
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not include.exists():
        return f"no Python headers: {include} missing"
    return None


def status(root: Path = ROOT) -> Status:
    files = extension_files(root)
    if not files:
        return Status("pure", 0, why_not_buildable() or "not built")
    try:
        manifest = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return Status("stale", len(files), "no build manifest")
    if manifest.get("digest") != source_digest(root):
        return Status("stale", len(files), "sources changed since the build")
    if len(files) != len(HOT_MODULES) + 1:
        return Status("stale", len(files), "build incomplete")
    return Status("compiled", len(HOT_MODULES))


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_compiled() -> int:
    files = extension_files()
    for path in files:
        path.unlink(missing_ok=True)
    MANIFEST.unlink(missing_ok=True)
    return len(files)


def clean() -> int:
    """Remove the compiled modules (the pure-Python ones run); returns how many files."""
    with _locked():
        return _remove_compiled()


def drop_if_stale() -> Status:
    """Remove a stale or partial build so that the sources run; returns the status before."""
    st = status()
    if st.state == "stale":
        with _locked():
            if status().state == "stale":
                _remove_compiled()
    return st


_SETUP = """
import sys
from mypyc.build import mypycify
from setuptools.dist import Distribution

GROUP, build_dir, modules = sys.argv[1], sys.argv[2], sys.argv[3:]
extensions = mypycify(modules, opt_level="3", group_name=GROUP, target_dir=build_dir + "/c")
dist = Distribution({"name": "fieldsync-compiled", "ext_modules": extensions})
dist.script_args = [
    "build_ext", "--inplace", "--build-temp", build_dir + "/temp", "--build-lib", build_dir + "/lib",
]
dist.parse_command_line()
dist.run_commands()
"""


def build(log: Path | None = None) -> Status:
    """Compile the hot modules in place; raises ``RuntimeError`` (with the log's tail) when
    the compiler fails, leaving the pure-Python modules in place."""
    reason = why_not_buildable()
    if reason is not None:
        with _locked():
            _remove_compiled()
        return Status("pure", 0, reason)
    with _locked():
        _remove_compiled()
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        log = log or BUILD_DIR / "build.log"
        digest = source_digest()
        with log.open("w") as out:
            # setuptools reads no pyproject.toml here: it gets its extensions directly
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _SETUP,
                    GROUP,
                    str(BUILD_DIR.relative_to(ROOT)),
                    *HOT_MODULES,
                ],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if proc.returncode != 0 or len(extension_files()) != len(HOT_MODULES) + 1:
            _remove_compiled()
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
            raise RuntimeError(f"mypyc build failed (exit {proc.returncode}; {log}):\n{tail}")
        MANIFEST.write_text(json.dumps({"digest": digest, "modules": list(HOT_MODULES)}))
    return status()


def loaded_compiled() -> list[str]:
    """The hot modules this process imports from their compiled build (importing each)."""
    names = []
    for path in HOT_MODULES:
        name = path[: -len(".py")].replace("/", ".")
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        if not str(module.__file__).endswith(".py"):
            names.append(name)
    return names


def describe(st: Status) -> str:
    if st.state == "compiled":
        return f"compiled: {st.modules} modules (mypyc; python3 dev.py build --pure for none)"
    if st.state == "stale":
        return f"compiled modules stale ({st.reason})"
    return f"pure Python ({st.reason})"


def ensure() -> Status:
    """Build when missing or stale and this machine can; never fails for want of a compiler."""
    st = status()
    if st.state == "compiled" and not os.environ.get(NO_COMPILE_ENV):
        return st
    if why_not_buildable() is not None:
        if st.state != "pure":
            clean()
        return Status("pure", 0, why_not_buildable() or "")
    print("[dev] compiling the hot modules with mypyc (about a minute)", flush=True)
    return build()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.compiled", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", choices=["ensure", "build", "clean", "status"])
    args = parser.parse_args(argv)
    try:
        if args.command == "clean":
            clean()
            st = status()
        elif args.command == "build":
            st = build()
        elif args.command == "ensure":
            st = ensure()
        else:
            st = status()
    except RuntimeError as exc:
        print(f"[dev] {exc}", file=sys.stderr, flush=True)
        print("[dev] pure Python (the mypyc build failed)", flush=True)
        return 1
    print(f"[dev] {describe(st)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
