"""Reading the relay's validated TOML files: the rules file (relay/downstream/rules_parser.py),
the conflicts file (relay/upstream/merge.py), the token key store (relay/auth_keys.py) and
the revocation list (relay/auth.py).

The rules and conflicts files are checked the same way: :func:`read_toml` turns a
missing, unreadable or malformed file into the file's own error (one
:class:`relay.errors.RulesProblem`); a parser built on :class:`ProblemCollector` then walks the parsed document and records
*every* problem it finds (file, scope, key path, message) instead of stopping at the
first, and :meth:`ProblemCollector.raise_problems` raises them all at once.  The key
store and revocation list stop at their first problem, one message naming file and
entry: :func:`read_toml_file` reads them.  Messages suggest the closest known name for a
misspelt one (:func:`close_match_hint`).

Pure apart from :func:`read_toml` and :func:`read_toml_file` (one file read each); a
collector belongs to one parse, in one thread.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.settings_checks import close_match_hint
from relay.errors import ConfigError, RulesProblem

ProblemsError = Callable[[Sequence[RulesProblem]], ConfigError]
"""The error a file's problems are raised as (e.g. ``RulesError``, ``ConflictsError``)."""


def read_toml(path: str | Path, error: ProblemsError) -> dict[str, Any]:
    """The parsed TOML document at ``path``; ``error`` with one problem when the file does
    not exist, cannot be read or is not valid TOML."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise error([RulesProblem(source, "", "", "does not exist")]) from exc
    except OSError as exc:
        raise error([RulesProblem(source, "", "", f"cannot be read: {exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise error([RulesProblem(source, "", "", f"is not valid TOML: {exc}")]) from exc


class ProblemCollector:
    """The problems found so far in one parse of ``source`` (file order)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[RulesProblem] = []

    def problem(self, scope: str, key: str, message: str) -> None:
        self.problems.append(RulesProblem(self.source, scope, key, message))

    def unknown_keys(
        self, scope: str, prefix: str, raw: Mapping[str, Any], known: Sequence[str]
    ) -> None:
        """A problem for each key of ``raw`` that is not ``known`` (named ``prefix + key``)."""
        for key in raw:
            if key not in known:
                self.problem(
                    scope,
                    prefix + key,
                    f"is not a known key{close_match_hint(key, known)} (known: {', '.join(known)})",
                )

    def raise_problems(self, error: ProblemsError) -> None:
        """Raise every problem found as ``error``; nothing when there is none."""
        if self.problems:
            raise error(self.problems)


def toml_kind(value: object) -> str:
    """What a parsed TOML value is, in TOML's words (``table``, ``array``, ``string``, …)."""
    return {dict: "table", list: "array", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


def listing(names: Iterable[str]) -> str:
    """``a, b, c``, or ``none``."""
    names = list(names)
    return ", ".join(names) if names else "none"


def read_toml_file(path: Path, what: str, error: Callable[[str], ConfigError]) -> dict[str, Any]:
    """The parsed TOML document at ``path`` for files whose errors are one message (the
    token key store and revocation list): ``error("<path>: cannot read <what>: <reason>")``
    or ``error("<path>: <what> is not valid TOML: <reason>")``."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: {what} is not valid TOML: {exc}") from exc
