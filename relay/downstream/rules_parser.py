"""Loading a rules file: the document and its bucket rules (docs/relay-rules.md).

:func:`load_rules` reads a rules file (relay/config_file.py: a missing, unreadable or
malformed file is one problem), :class:`RulesParser` walks it (``token_claims``, each
``[[bucket]]`` with its name, parameters and claims; each ``[[bucket.table]]`` is left to
:class:`relay.downstream.rules_table_parser.TableEntryParser`) collecting *every* problem
with file, rule and key path, and raises them all as one
:class:`relay.errors.RulesError`.  A valid file compiles to
:class:`relay.downstream.rules.Rules` bound to the schema (tables, columns, primary keys)
it was checked against; :func:`check_rules_file` checks the structure alone.

Pure apart from the one file read; a parser serves one parse, in one thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from core.settings_checks import close_match_hint
from relay.claims import DEVICE_CLAIM, REGISTERED_CLAIMS
from relay.config_file import listing, read_toml, toml_kind
from relay.downstream.rules import IDENTIFIER, BucketRule, Rules, TableInfo, TableRule
from relay.downstream.rules_table_parser import TableEntryParser
from relay.errors import RulesError

_BUCKET_KEYS: Final = ("name", "description", "parameters", "claims", "table")
_TOP_KEYS: Final = ("token_claims", "bucket")


def load_rules(path: str | Path, schema: Mapping[str, TableInfo]) -> Rules:
    """Read, validate and bind a rules file.  Raises :class:`RulesError` listing every problem."""
    source = str(path)
    return Rules(_parse(read_toml(path, RulesError), source, schema), schema, source)


def check_rules_file(path: str | Path) -> tuple[BucketRule, ...]:
    """Validate a rules file's structure only (no schema: tables and columns are not checked)."""
    return check_rules_mapping(read_toml(path, RulesError), str(path))


def check_rules_mapping(data: Mapping[str, Any], source: str = "<rules>") -> tuple[BucketRule, ...]:
    """:func:`check_rules_file` of the mapping a rules file parses to."""
    return tuple(_parse(data, source, None))


def rules_tables(data: Mapping[str, Any], source: str = "<rules>") -> set[str]:
    """The tables a rules document names (its structure checked, not its columns)."""
    return {t for b in check_rules_mapping(data, source) for t in b.tables}


def rules_from_mapping(
    data: Mapping[str, Any], schema: Mapping[str, TableInfo], source: str = "<rules>"
) -> Rules:
    """Validate and bind rules given as the mapping a TOML file parses to."""
    return Rules(_parse(data, source, schema), schema, source)


def _parse(
    data: Mapping[str, Any], source: str, schema: Mapping[str, TableInfo] | None
) -> list[BucketRule]:
    parser = RulesParser(source, schema)
    rules = parser.document(data)
    parser.raise_problems(RulesError)
    return rules


class RulesParser(TableEntryParser):
    """Walks a parsed rules file, collecting every problem instead of stopping at the first."""

    def names(self, scope: str, key: str, raw: object, what: str) -> list[str]:
        """A list of unique identifiers."""
        if not isinstance(raw, list):
            self.problem(scope, key, f"must be an array of {what} names, not a {toml_kind(raw)}")
            return []
        out: list[str] = []
        for i, item in enumerate(raw):
            if not isinstance(item, str) or not IDENTIFIER.match(item):
                self.problem(
                    scope,
                    f"{key}[{i}]",
                    f"{item!r} is not a valid {what} name (letters, digits and _, not starting with a digit)",
                )
            elif item in out:
                self.problem(scope, f"{key}[{i}]", f"{item!r} is listed twice")
            else:
                out.append(item)
        return out

    # ---- document

    def document(self, data: Mapping[str, Any]) -> list[BucketRule]:
        self.unknown_keys("", "", data, _TOP_KEYS)
        known_claims = {DEVICE_CLAIM}
        for i, claim in enumerate(
            self.names("", "token_claims", data.get("token_claims", []), "claim")
        ):
            if claim in REGISTERED_CLAIMS - {DEVICE_CLAIM}:
                self.problem(
                    "",
                    f"token_claims[{i}]",
                    f"{claim!r} is a registered JWT claim set by the issuer; it cannot select buckets",
                )
            known_claims.add(claim)
        raw = data.get("bucket")
        if raw is None:
            self.problem("", "", "defines no bucket (add a [[bucket]] table)")
            return []
        if not isinstance(raw, list) or not all(isinstance(b, dict) for b in raw):
            self.problem(
                "", "bucket", "must be an array of tables ([[bucket]]), not a " + toml_kind(raw)
            )
            return []
        rules: list[BucketRule] = []
        first_seen: dict[str, int] = {}
        for i, entry in enumerate(raw):
            rule = self.bucket(i, entry, known_claims, first_seen)
            if rule is not None:
                rules.append(rule)
        return rules

    # ---- buckets

    def bucket(
        self, index: int, raw: Mapping[str, Any], known_claims: set[str], first_seen: dict[str, int]
    ) -> BucketRule | None:
        before = len(self.problems)
        scope = f"bucket #{index + 1}"
        name = raw.get("name")
        if name is None:
            self.problem(scope, "name", "is missing")
        elif not isinstance(name, str) or not IDENTIFIER.match(name):
            self.problem(
                scope,
                "name",
                f"{name!r} is not a valid name (letters, digits and _, not starting with a digit)",
            )
        else:
            scope = f"bucket {name!r}"
            if name in first_seen:
                self.problem(scope, "name", f"is already used by bucket #{first_seen[name] + 1}")
            else:
                first_seen[name] = index
        self.unknown_keys(scope, "", raw, _BUCKET_KEYS)
        description = raw.get("description", "")
        if not isinstance(description, str):
            self.problem(scope, "description", f"must be a string, not a {toml_kind(description)}")
        parameters = self.names(scope, "parameters", raw.get("parameters", []), "parameter")
        claims = self.bucket_claims(scope, raw.get("claims", {}), parameters, known_claims)
        tables = self.bucket_tables(scope, raw.get("table"), parameters)
        if (
            len(self.problems) > before
            or not isinstance(name, str)
            or not isinstance(description, str)
        ):
            return None
        return BucketRule(name, tuple(parameters), claims, MappingProxyType(tables), description)

    def bucket_claims(
        self, scope: str, raw: object, parameters: list[str], known: set[str]
    ) -> tuple[str, ...]:
        if not isinstance(raw, dict):
            self.problem(
                scope, "claims", f'must be a table (parameter = "claim"), not a {toml_kind(raw)}'
            )
            return ()
        for key, claim in raw.items():
            if key not in parameters:
                self.problem(
                    scope,
                    f"claims.{key}",
                    f"is not a parameter of this bucket{close_match_hint(key, parameters)} (parameters: {listing(parameters)})",
                )
            elif not isinstance(claim, str):
                self.problem(
                    scope,
                    f"claims.{key}",
                    f"must be a claim name (a string), not a {toml_kind(claim)}",
                )
            elif claim in REGISTERED_CLAIMS - {DEVICE_CLAIM}:
                self.problem(
                    scope,
                    f"claims.{key}",
                    f"{claim!r} is a registered JWT claim; of those only 'sub' (the device id) can select buckets",
                )
            elif claim not in known:
                self.problem(
                    scope,
                    f"claims.{key}",
                    f"{claim!r} is not a known claim{close_match_hint(claim, known)} (declare it in token_claims; known: {listing(sorted(known))})",
                )
        for p in parameters:
            if p not in raw:
                self.problem(
                    scope, "claims", f'has no claim for parameter {p!r} (add {p} = "<claim>")'
                )
        return tuple(str(raw.get(p, "")) for p in parameters)

    def bucket_tables(self, scope: str, raw: object, parameters: list[str]) -> dict[str, TableRule]:
        if raw is None:
            self.problem(scope, "table", "is missing: a bucket needs at least one [[bucket.table]]")
            return {}
        if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
            self.problem(
                scope,
                "table",
                f"must be an array of tables ([[bucket.table]]), not a {toml_kind(raw)}",
            )
            return {}
        tables: dict[str, TableRule] = {}
        for j, entry in enumerate(raw):
            name = entry.get("table")
            if isinstance(name, str) and name in tables:
                self.problem(
                    f"{scope} table {name!r}",
                    "table",
                    "is listed twice in this bucket (use a second bucket for a second selection)",
                )
                continue
            rule = self.table(scope, j, entry, parameters)
            if rule is not None:
                tables[rule.table] = rule
        return tables
