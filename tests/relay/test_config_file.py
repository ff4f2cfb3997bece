"""relay/config_file.py: the one way the rules and conflicts files (and the token key store
and revocation list) are read and their problems collected."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.settings_checks import close_match_hint
from relay.config_file import ProblemCollector, read_toml, read_toml_file
from relay.errors import ConflictsError, KeyStoreError, RulesError, RulesProblem


@pytest.mark.parametrize("error", [RulesError, ConflictsError])
def test_read_toml_names_the_file_in_one_problem(tmp_path: Path, error: type[RulesError]) -> None:
    good = tmp_path / "good.toml"
    good.write_text('a = 1\n[b]\nc = "d"\n')
    assert read_toml(good, error) == {"a": 1, "b": {"c": "d"}}
    bad = tmp_path / "bad.toml"
    bad.write_text("a = \n")
    for path, message in (
        (tmp_path / "missing.toml", "does not exist"),
        (bad, "is not valid TOML"),
        (tmp_path, "cannot be read"),  # a directory
    ):
        with pytest.raises(error) as caught:
            read_toml(path, error)
        (problem,) = caught.value.problems
        assert problem.file == str(path) and problem.message.startswith(message), problem
        assert str(caught.value).startswith(f"{path}: {message}")


def test_read_toml_file_gives_one_message_naming_file_and_what(tmp_path: Path) -> None:
    bad = tmp_path / "keys.toml"
    bad.write_text("[[key]\n")
    with pytest.raises(KeyStoreError, match=r"keys\.toml: keys file is not valid TOML"):
        read_toml_file(bad, "keys file", KeyStoreError)
    with pytest.raises(KeyStoreError, match=r"nope\.toml: cannot read revocation list: "):
        read_toml_file(tmp_path / "nope.toml", "revocation list", KeyStoreError)


def test_did_you_mean_suggests_only_close_names() -> None:
    assert close_match_hint("colums", ["columns", "exclude"]) == " (did you mean 'columns'?)"
    assert close_match_hint("zzz", ["columns", "exclude"]) == ""
    assert close_match_hint("x", []) == ""


KEYS = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(raw=st.dictionaries(KEYS, st.integers(), max_size=8), known=st.lists(KEYS, max_size=5))
def test_every_unknown_key_is_a_problem_in_file_order(
    raw: dict[str, int], known: list[str]
) -> None:
    collector = ProblemCollector("f.toml")
    collector.unknown_keys("bucket 'b'", "filters[0].", raw, known)
    unknown = [k for k in raw if k not in known]
    assert [p.key for p in collector.problems] == [f"filters[0].{k}" for k in unknown]
    for p in collector.problems:
        assert p.file == "f.toml" and p.rule == "bucket 'b'"
        assert p.message.startswith("is not a known key")
        assert p.message.endswith(f"(known: {', '.join(known)})")
    if unknown:
        with pytest.raises(RulesError) as caught:
            collector.raise_problems(RulesError)
        assert caught.value.problems == tuple(collector.problems)
    else:
        collector.raise_problems(RulesError)  # nothing found: nothing raised


def test_problems_keep_their_order_and_scope() -> None:
    collector = ProblemCollector("rules.toml")
    collector.problem("", "", "defines no bucket")
    collector.problem("bucket 'x'", "name", "is already used")
    assert collector.problems == [
        RulesProblem("rules.toml", "", "", "defines no bucket"),
        RulesProblem("rules.toml", "bucket 'x'", "name", "is already used"),
    ]
    with pytest.raises(ConflictsError, match=r"rules\.toml: bucket 'x': name is already used"):
        collector.raise_problems(ConflictsError)
