"""Authorization rules: loading and validation, row placement, claim grants, projection."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.downstream.rules import (
    Rules,
    TableInfo,
    bucket_id,
    canonical_text,
    claim_values,
    parse_bucket_id,
)
from relay.downstream.rules_parser import check_rules_file, load_rules, rules_from_mapping
from relay.errors import RowError, RulesError
from tests.schemas import DEMO_CATALOG, EXAMPLE_RULES

SCHEMA = {**DEMO_CATALOG, "public.audit": TableInfo(("at", "what"), ())}


def order(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": 7,
        "site": "plant-1",
        "technician": "t42",
        "status": "open",
        "due": dt.date(2024, 6, 1),
        "cost": Decimal("12.50"),
        "notes": "n",
        "updated_at": dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
    }
    row.update(changes)
    return row


def rules_of(text: str, tmp_path: Path, schema: dict[str, TableInfo] | None = None) -> Rules:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return load_rules(path, SCHEMA if schema is None else schema)


def problems_of(text: str, tmp_path: Path) -> list[str]:
    with pytest.raises(RulesError) as info:
        rules_of(text, tmp_path)
    return [str(p) for p in info.value.problems]


TECH = """
token_claims = ["technician", "sites"]
[[bucket]]
name = "tech_orders"
parameters = ["technician"]
claims = { technician = "technician" }
[[bucket.table]]
table = "public.work_orders"
match = { technician = "technician" }
"""


# --------------------------------------------------------------------------- the example file


@pytest.fixture(scope="module")
def example() -> Rules:
    return load_rules(EXAMPLE_RULES, SCHEMA)


def test_example_places_rows_in_buckets(example: Rules) -> None:
    assert example.buckets_for_row("public.work_orders", order()) == {
        'tech_orders["t42"]',
        'site["plant-1"]',
    }
    # closed: out of tech_orders (not in) and out of site (= 'open')
    assert example.buckets_for_row("public.work_orders", order(status="closed")) == frozenset()
    assert example.buckets_for_row("public.work_orders", order(status="done")) == {
        'tech_orders["t42"]'
    }
    assert example.buckets_for_row("public.work_orders", order(technician=None)) == {
        'site["plant-1"]'
    }
    assert example.buckets_for_row(
        "public.parts", {"id": "p1", "name": "valve", "unit": "pc", "discontinued": False}
    ) == {"catalog[]"}
    assert (
        example.buckets_for_row(
            "public.parts", {"id": "p1", "name": "v", "unit": "pc", "discontinued": True}
        )
        == frozenset()
    )
    assert example.buckets_for_row("public.unruled", {"id": 1}) == frozenset()
    assert example.tables == {"public.work_orders", "public.parts", "public.site_stock"}


def test_example_claims_grant_buckets(example: Rules) -> None:
    claims = {"sub": "tablet-7", "technician": "t42", "sites": ["plant-1", "plant-3"]}
    assert example.buckets_for_claims(claims) == {
        'tech_orders["t42"]',
        'site["plant-1"]',
        'site["plant-3"]',
        "catalog[]",
    }
    # missing / null / empty claims grant no bucket of their rule; global buckets always
    assert example.buckets_for_claims({"sub": "x"}) == {"catalog[]"}
    assert example.buckets_for_claims({"technician": None, "sites": []}) == {"catalog[]"}


def test_example_projection(example: Rules) -> None:
    row = order()
    tech = example.project("public.work_orders", "tech_orders", row)
    assert "cost" not in tech and tech["notes"] == "n" and tech["id"] == 7
    site = example.project("public.work_orders", "site", row)
    # the allow-list in schema order, key always included
    assert list(site) == ["id", "site", "technician", "status", "due"]
    part = example.project(
        "public.parts", "catalog", {"id": "p", "name": "v", "unit": "pc", "discontinued": False}
    )
    assert part == {"id": "p", "name": "v", "unit": "pc"}
    # columns the row lacks are absent, not invented
    assert example.project("public.work_orders", "site", {"id": 1, "site": "s"}) == {
        "id": 1,
        "site": "s",
    }
    with pytest.raises(KeyError, match="has no table"):
        example.project("public.parts", "tech_orders", {})


def test_example_structure_check_without_schema() -> None:
    buckets = check_rules_file(EXAMPLE_RULES)
    assert [b.name for b in buckets] == ["tech_orders", "site", "catalog"]
    assert buckets[1].claims == ("sites",)


# --------------------------------------------------------------------------- semantics


def test_list_claims_expand_to_the_product_of_parameters(tmp_path: Path) -> None:
    rules = rules_of(
        """
token_claims = ["sites", "crafts"]
[[bucket]]
name = "stock"
parameters = ["site", "craft"]
claims = { site = "sites", craft = "crafts" }
[[bucket.table]]
table = "public.work_orders"
match = { site = "site", technician = "craft" }
""",
        tmp_path,
    )
    granted = rules.buckets_for_claims({"sites": ["b", "a", "a"], "crafts": ["x", "y"]})
    assert granted == {'stock["a","x"]', 'stock["a","y"]', 'stock["b","x"]', 'stock["b","y"]'}
    assert rules.buckets_for_claims({"sites": ["a"], "crafts": []}) == frozenset()
    assert rules.buckets_for_row("public.work_orders", order(site="a", technician="y")) == {
        'stock["a","y"]'
    }


def test_values_compare_by_canonical_text(tmp_path: Path) -> None:
    rules = rules_of(TECH, tmp_path)
    assert rules.buckets_for_row("public.work_orders", order(technician=42)) == {
        'tech_orders["42"]'
    }
    assert rules.buckets_for_claims({"technician": 42}) == {'tech_orders["42"]'}
    assert rules.buckets_for_claims({"technician": [1, "1", True, None, {"x": 1}]}) == {
        'tech_orders["1"]',
        'tech_orders["true"]',
    }
    # NULL and values of types that never compare place the row in no bucket
    assert rules.buckets_for_row("public.work_orders", order(technician=None)) == frozenset()
    assert rules.buckets_for_row("public.work_orders", order(technician=b"t42")) == frozenset()


def test_canonical_text() -> None:
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    cases: list[tuple[object, str | None]] = [
        ("x", "x"),
        (5, "5"),
        (-5, "-5"),
        (True, "true"),
        (False, "false"),
        (3.0, "3"),
        (1.5, "1.5"),
        (1e-7, "0.0000001"),
        (float("nan"), None),
        (Decimal("12.50"), "12.5"),
        (Decimal("1E+2"), "100"),
        (Decimal("NaN"), None),
        (u, str(u)),
        (dt.date(2024, 6, 1), "2024-06-01"),
        (dt.datetime(2024, 6, 1, 12, tzinfo=dt.UTC), "2024-06-01T12:00:00+00:00"),
        (None, None),
        (b"x", None),
        (["a"], None),
    ]
    for value, expected in cases:
        assert canonical_text(value) == expected, value
    assert claim_values(["b", "a", None, "b"]) == ("a", "b")
    assert claim_values("a") == ("a",)
    assert claim_values(None) == ()


FILTER_ROWS = [None, "cancelled", "open", 3, "3"]


@pytest.mark.parametrize(
    ("op", "value", "expected"),
    [
        ("=", '"open"', [False, False, True, False, False]),
        ("!=", '"open"', [False, True, False, True, True]),  # NULL is never != (as in SQL)
        ("in", '["open", 3]', [False, False, True, True, True]),
        ("NOT  IN", '["open", 3]', [False, True, False, False, False]),
        ("is null", None, [True, False, False, False, False]),
        ("is not null", None, [False, True, True, True, True]),
    ],
)
def test_filter_operators(tmp_path: Path, op: str, value: str | None, expected: list[bool]) -> None:
    value_part = f", value = {value}" if value is not None else ""
    rules = rules_of(
        f"""
[[bucket]]
name = "all"
[[bucket.table]]
table = "public.work_orders"
filters = [ {{ column = "status", op = "{op}"{value_part} }} ]
""",
        tmp_path,
    )
    got = [bool(rules.buckets_for_row("public.work_orders", order(status=s))) for s in FILTER_ROWS]
    assert got == expected


def test_filter_values_are_data_not_code(tmp_path: Path) -> None:
    rules = rules_of(
        """
[[bucket]]
name = "odd"
[[bucket.table]]
table = "public.work_orders"
filters = [ { column = "notes", op = "=", value = "x' or '1'='1" },
            { column = "status", op = "!=", value = "__import__('os').system('false')" } ]
""",
        tmp_path,
    )
    assert rules.buckets_for_row("public.work_orders", order(notes="x' or '1'='1")) == {"odd[]"}
    assert rules.buckets_for_row("public.work_orders", order(notes="x")) == frozenset()


def test_a_parameter_matched_by_two_columns_needs_equal_values(tmp_path: Path) -> None:
    rules = rules_of(
        """
[[bucket]]
name = "own"
parameters = ["who"]
claims = { who = "sub" }
[[bucket.table]]
table = "public.work_orders"
match = { technician = "who", notes = "who" }
""",
        tmp_path,
    )
    assert rules.buckets_for_row("public.work_orders", order(technician="d1", notes="d1")) == {
        'own["d1"]'
    }
    assert (
        rules.buckets_for_row("public.work_orders", order(technician="d1", notes="d2"))
        == frozenset()
    )


def test_a_row_without_a_needed_column_is_an_error(tmp_path: Path) -> None:
    rules = rules_of(TECH, tmp_path)
    row = order()
    del row["technician"]
    with pytest.raises(RowError, match="'technician'"):
        rules.buckets_for_row("public.work_orders", row)
    with pytest.raises(RowError, match="'id'"):
        rules.key_of("public.work_orders", {"site": "x"})
    assert rules.key_of("public.work_orders", order()) == (7,)


# --------------------------------------------------------------------------- bucket ids


@given(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True), st.lists(st.text(), max_size=4)
)
def test_bucket_ids_round_trip_and_are_ascii(name: str, values: list[str]) -> None:
    bid = bucket_id(name, values)
    assert bid.isascii()
    assert parse_bucket_id(bid) == (name, tuple(values))


@given(st.lists(st.text(max_size=5), max_size=3), st.lists(st.text(max_size=5), max_size=3))
def test_bucket_ids_are_injective(a: list[str], b: list[str]) -> None:
    assert (bucket_id("r", a) == bucket_id("r", b)) == (a == b)


@pytest.mark.parametrize("text", ['r[ "a"]', "r", 'r["a",1]', "1r[]", 'r["\\u0041"]', 'r["a"'])
def test_non_canonical_bucket_ids_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="bucket id"):
        parse_bucket_id(text)


def test_rule_of_bucket(example: Rules) -> None:
    assert example.rule_of_bucket('site["x"]').name == "site"
    with pytest.raises(KeyError):
        example.rule_of_bucket('site["x","y"]')
    with pytest.raises(KeyError):
        example.rule_of_bucket("nope[]")


# --------------------------------------------------------------------------- validation


def test_unknown_operator_names_file_rule_and_key(tmp_path: Path) -> None:
    [problem] = problems_of(
        TECH + 'filters = [ { column = "status", op = "like", value = "x" } ]\n', tmp_path
    )
    assert problem == (
        f"{tmp_path / 'rules.toml'}: bucket 'tech_orders' table 'public.work_orders': "
        "filters[0].op 'like' is not an operator (use one of =, !=, in, not in, is null, is not null)"
    )


def test_unknown_table_column_and_claim_get_close_match_hints(tmp_path: Path) -> None:
    problems = problems_of(
        """
token_claims = ["technician"]
[[bucket]]
name = "tech_orders"
parameters = ["technician"]
claims = { technician = "tecnician" }
[[bucket.table]]
table = "public.work_order"
match = { technician = "technician" }
[[bucket]]
name = "catalog"
[[bucket.table]]
table = "public.parts"
columns = ["nmae"]
filters = [ { column = "unti", op = "=", value = "pc" } ]
""",
        tmp_path,
    )
    assert len(problems) == 4
    assert problems[0].endswith(
        "bucket 'tech_orders': claims.technician 'tecnician' is not a known claim (did you mean "
        "'technician'?) (declare it in token_claims; known: sub, technician)"
    )
    assert (
        "table 'public.work_order': table 'public.work_order' is not a known table (did you mean 'public.work_orders'?)"
        in problems[1]
    )
    assert (
        "bucket 'catalog' table 'public.parts': filters[0].column 'unti' is not a column of public.parts (did you mean 'unit'?)"
        in problems[2]
    )
    assert (
        "table 'public.parts': columns[0] 'nmae' is not a column of public.parts (did you mean 'name'?)"
        in problems[3]
    )


def test_unknown_keys_are_refused_with_hints(tmp_path: Path) -> None:
    problems = problems_of(
        TECH.replace('name = "tech_orders"', 'name = "tech_orders"\nparameter = 1')
        + "colums = ['id']\nfilters = [ { column = 'id', op = '=', vale = 1 } ]\n",
        tmp_path,
    )
    assert any(
        "bucket 'tech_orders': parameter is not a known key (did you mean 'parameters'?)" in p
        for p in problems
    )
    assert any("colums is not a known key (did you mean 'columns'?)" in p for p in problems)
    assert any("filters[0].vale is not a known key (did you mean 'value'?)" in p for p in problems)
    assert any("filters[0].value is missing (op '=' needs" in p for p in problems)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "defines no bucket"),
        ("[[bucket]]\n[[bucket.table]]\ntable='public.parts'\n", "bucket #1: name is missing"),
        (
            "[[bucket]]\nname='1x'\n[[bucket.table]]\ntable='public.parts'\n",
            "name '1x' is not a valid name",
        ),
        ("[[bucket]]\nname='a'\n", "bucket 'a': table is missing"),
        (
            "[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\n[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\n",
            "bucket 'a': name is already used by bucket #1",
        ),
        (
            "[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\n[[bucket.table]]\ntable='public.parts'\n",
            "table 'public.parts': table is listed twice in this bucket",
        ),
        ("[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.audit'\n", "has no primary key"),
        (
            "[[bucket]]\nname='a'\n[[bucket.table]]\nmatch={}\n",
            "bucket 'a' table #1: table is missing",
        ),
        (
            "[[bucket]]\nname='a'\nparameters=['p']\nclaims={p='sub'}\n[[bucket.table]]\ntable='public.parts'\n",
            "match does not match parameter 'p'",
        ),
        (
            "[[bucket]]\nname='a'\nparameters=['p']\n[[bucket.table]]\ntable='public.parts'\nmatch={id='p'}\n",
            "claims has no claim for parameter 'p'",
        ),
        (
            "[[bucket]]\nname='a'\nparameters=['p']\nclaims={p='sub', q='sub'}\n[[bucket.table]]\ntable='public.parts'\nmatch={id='p'}\n",
            "claims.q is not a parameter of this bucket",
        ),
        (
            "[[bucket]]\nname='a'\nparameters=['p']\nclaims={p='exp'}\n[[bucket.table]]\ntable='public.parts'\nmatch={id='p'}\n",
            "'exp' is a registered JWT claim",
        ),
        (
            "token_claims=['iat']\n[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\n",
            "token_claims[0] 'iat' is a registered JWT claim",
        ),
        (
            "[[bucket]]\nname='a'\nparameters=['p','p']\nclaims={p='sub'}\n[[bucket.table]]\ntable='public.parts'\nmatch={id='p'}\n",
            "parameters[1] 'p' is listed twice",
        ),
        (
            "[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\nmatch={id='p'}\n",
            "a global bucket",
        ),
        (
            "[[bucket]]\nname='a'\nparameters=['p']\nclaims={p='sub'}\n[[bucket.table]]\ntable='public.parts'\nmatch={id='q'}\n",
            "match.id 'q' is not a parameter of this bucket",
        ),
        (
            "[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\ncolumns=['id']\nexclude=['name']\n",
            "columns and exclude cannot both be given",
        ),
        (
            "[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\nexclude=['id']\n",
            "'id' is a primary-key column",
        ),
        (
            "[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\ncolumns=['id','id']\n",
            "columns[1] 'id' is listed twice",
        ),
        (
            "[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\nfilters=[{column='id',op='in',value=[]}]\n",
            "must be a non-empty array with op 'in'",
        ),
        (
            "[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\nfilters=[{column='id',op='=',value=['a']}]\n",
            "must be a single value with op '='",
        ),
        (
            "[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\nfilters=[{column='id',op='=',value=1.5}]\n",
            "must be a string, integer or boolean, not a float",
        ),
        (
            "[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\nfilters=[{column='id',op='in',value=['a', 1979-05-27]}]\n",
            "value[1] must be a string, integer or boolean",
        ),
        (
            "[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\nfilters=[{column='id',op='is null',value=1}]\n",
            "must not be given with op 'is null'",
        ),
        (
            "[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\nfilters=[{op='is null'}]\n",
            "filters[0].column is missing",
        ),
        (
            "[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\nfilters={column='id'}\n",
            "filters must be an array",
        ),
        ("bucket = 3\n", "bucket must be an array of tables"),
        (
            "frobnicate = 1\n[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\n",
            "frobnicate is not a known key",
        ),
    ],
)
def test_invalid_rules_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    problems = problems_of(text, tmp_path)
    assert any(expected in p for p in problems), problems
    assert all(p.startswith(str(tmp_path / "rules.toml") + ": ") for p in problems)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems = problems_of(
        """
[[bucket]]
name = "a"
[[bucket.table]]
table = "public.nope"
[[bucket]]
name = "b"
[[bucket.table]]
table = "public.parts"
filters = [ { column = "id", op = "~" } ]
""",
        tmp_path,
    )
    assert len(problems) == 2
    assert "bucket 'a'" in problems[0] and "bucket 'b'" in problems[1]


def test_unreadable_and_invalid_toml_files(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="does not exist"):
        load_rules(tmp_path / "missing.toml", SCHEMA)
    bad = tmp_path / "bad.toml"
    bad.write_text("[[bucket]\n")
    with pytest.raises(RulesError, match=r"bad\.toml: is not valid TOML"):
        check_rules_file(bad)


def test_structure_check_skips_tables_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("[[bucket]]\nname='a'\n[[bucket.table]]\ntable='x.y'\ncolumns=['q']\n")
    assert check_rules_file(path)[0].tables["x.y"].columns == ("q",)
    with pytest.raises(RulesError, match=r"'x\.y' is not a known table"):
        load_rules(path, SCHEMA)


def test_rules_from_mapping_matches_the_file_form() -> None:
    rules = rules_from_mapping(
        {"bucket": [{"name": "g", "table": [{"table": "public.parts"}]}]}, SCHEMA, "inline"
    )
    assert rules.buckets_for_claims({}) == {"g[]"}
    assert rules.source == "inline"


# --------------------------------------------------------------------------- dates and times


def test_temporal_values_are_the_event_integers() -> None:
    from relay.downstream.rules import temporal_value

    assert temporal_value("date", "2024-05-01") == 19844
    assert temporal_value("date", "1969-12-31") == -1
    assert temporal_value("time", "08:30:00.5") == (8 * 3600 + 30 * 60) * 1_000_000 + 500_000
    assert temporal_value("timestamp", "1970-01-02T00:00:01") == 86_401_000_000
    assert temporal_value("timestamptz", "1970-01-01T01:00:00+01:00") == 0
    assert temporal_value("timestamptz", "2024-05-01T00:00:00Z") == 19844 * 86_400_000_000
    with pytest.raises(ValueError, match="UTC offset"):
        temporal_value("timestamptz", "2024-05-01T00:00:00")
    with pytest.raises(ValueError, match="without time zone"):
        temporal_value("timestamp", "2024-05-01T00:00:00Z")


DATED = """
[[bucket]]
name = "due_soon"
[[bucket.table]]
table = "public.work_orders"
filters = [
    { column = "due", op = "in", value = ["2024-05-01", 19845] },
    { column = "updated_at", op = "!=", value = "2024-05-01T00:00:00Z" },
]
"""


def test_filters_on_date_columns_take_iso_text(tmp_path: Path) -> None:
    schema = dict(SCHEMA)
    wo = SCHEMA["public.work_orders"]
    schema["public.work_orders"] = TableInfo(
        wo.columns, wo.key, (("due", "date"), ("updated_at", "timestamptz"))
    )
    rules = rules_of(DATED, tmp_path, schema)
    # rows as the engine gets them from the events: integers
    assert rules.buckets_for_row("public.work_orders", order(due=19844, updated_at=0))
    assert rules.buckets_for_row("public.work_orders", order(due=19845, updated_at=0))
    assert not rules.buckets_for_row("public.work_orders", order(due=19846, updated_at=0))
    assert not rules.buckets_for_row(
        "public.work_orders", order(due=19844, updated_at=19844 * 86_400_000_000)
    )
    bad = DATED.replace('"2024-05-01", 19845', '"2024-13-01"')
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    with pytest.raises(RulesError) as info:
        load_rules(path, schema)
    text = str(info.value)
    assert "filters[0].value[0]" in text and "'2024-13-01' is not a date" in text


def test_example_rules_refuse_claiming_a_colleagues_order(example: Rules) -> None:
    """With the example rules, a technician who sees a colleague's open order through its
    site may not assign it to itself: that would show it the notes and times the site
    view hides (forbidden_move); handing its own order to a colleague is fine."""
    from core.journal_format import Reason
    from relay.upstream.write_rules import WriteScope, check_write

    scope = WriteScope.for_claims(example, {"technician": "t42", "sites": ["plant-1"]})
    colleague = {k: v for k, v in order(technician="t7").items() if k != "cost"}
    problem = check_write(
        scope, "public.work_orders", colleague, {**colleague, "technician": "t42"}, ["technician"]
    )
    assert problem is not None and problem.reason is Reason.FORBIDDEN_MOVE
    assert "notes" in problem.message and "updated_at" in problem.message
    own = {**colleague, "technician": "t42"}
    assert (
        check_write(scope, "public.work_orders", own, {**own, "technician": "t7"}, ["technician"])
        is None
    )
