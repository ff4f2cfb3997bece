"""``fieldsync token issue`` and ``fieldsync relay check-rules`` through typer's CliRunner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import typer
from typer.testing import CliRunner

from devtools import demo_schema
from relay.auth import Authenticator
from relay.auth_keys import KeyStore
from relay.cli import app, parse_claims, parse_duration, token_app
from relay.errors import ConfigError
from tests.schemas import EXAMPLE_RULES

SECRET = "k" * 40
runner = CliRunner()


def command_paths(group: typer.Typer) -> list[list[str]]:
    root = typer.main.get_command(group)
    paths: list[list[str]] = [[]]

    def walk(cmd: Any, prefix: list[str]) -> None:
        # typer vendors its own click: look for sub-commands rather than a click.Group
        for name, sub in getattr(cmd, "commands", {}).items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(root, [])
    return paths


@pytest.mark.parametrize("group", [token_app, app], ids=["token", "relay"])
def test_every_command_has_help(group: typer.Typer) -> None:
    paths = command_paths(group)
    assert len(paths) >= 2
    for path in paths:
        result = runner.invoke(group, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(f'current = "hs"\n[[key]]\nkid = "hs"\nalg = "HS256"\nsecret = "{SECRET}"\n')
    return path


def issue(*args: str) -> Any:
    return runner.invoke(token_app, ["issue", *args])


def test_token_issue_prints_a_token_the_relay_accepts(keys: Path) -> None:
    result = issue(
        "--keys", str(keys), "--device", "tablet-7",
        "--claim", "sites=plant-1,plant-3", "--claim", "technician=t42", "--claim", "crew=a", "--claim", "crew=b",
        "--ttl", "1h30m", "--audience", "relay-x", "--issuer", "ops",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert "\n" not in token
    identity = Authenticator(KeyStore.from_file(keys), audience="relay-x", issuer="ops").verify(
        token
    )
    assert identity.device_id == "tablet-7"
    assert identity.claims["sites"] == ["plant-1", "plant-3"]
    assert identity.claims["technician"] == "t42"
    assert identity.claims["crew"] == ["a", "b"]
    assert identity.claims["exp"] - identity.claims["iat"] == 5400


def test_token_issue_defaults(keys: Path) -> None:
    result = issue("--keys", str(keys), "--device", "d1")
    assert result.exit_code == 0, result.output
    identity = Authenticator(KeyStore.from_file(keys)).verify(result.stdout.strip())
    assert identity.kid == "hs"
    assert identity.claims["exp"] - identity.claims["iat"] == 86400


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--kid", "nope"], "no key with kid 'nope'"),
        (["--ttl", "soon"], "--ttl 'soon' is not a positive duration"),
        (["--claim", "sites"], "--claim 'sites' is not name=value"),
        (["--claim", "exp=5"], "'exp' is a registered JWT claim"),
        (["--device", "a b"], "device id 'a b' is not valid"),
    ],
)
def test_token_issue_errors_exit_2_with_one_line(
    keys: Path, args: list[str], expected: str
) -> None:
    base = ["--keys", str(keys), "--device", "d1"]
    if "--device" in args:
        base = ["--keys", str(keys)]
    result = issue(*base, *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]


def test_token_issue_with_a_missing_keys_file(tmp_path: Path) -> None:
    result = issue("--keys", str(tmp_path / "nope.toml"), "--device", "d1")
    assert result.exit_code == 2
    assert "nope.toml: cannot read keys file" in result.stderr


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("15m", 900),
        ("24h", 86400),
        ("7d", 604800),
        ("2w", 1209600),
        ("1h30m", 5400),
        (" 1H ", 3600),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "h", "1x", "-5m", "1.5h"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_parse_claims() -> None:
    assert parse_claims(["a=x", "b=x,y", "c=x,", "d=", "a=z", "e=p=q"]) == {
        "a": ["x", "z"],
        "b": ["x", "y"],
        "c": ["x"],
        "d": "",
        "e": "p=q",
    }


# --------------------------------------------------------------------------- check-rules


def test_check_rules_structure_only() -> None:
    result = runner.invoke(app, ["check-rules", "--rules", str(EXAMPLE_RULES)])
    assert result.exit_code == 0, result.output
    assert "3 bucket rule(s) (structure only" in result.stdout
    assert "site [site <- sites]: public.work_orders, public.site_stock" in result.stdout
    assert "catalog [global]: public.parts" in result.stdout


def test_check_rules_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        "[[bucket]]\nname='a'\nparameters=['p']\n[[bucket.table]]\ntable='x.y'\nfilters=[{column='c',op='like'}]\n"
    )
    result = runner.invoke(app, ["check-rules", "--rules", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"error: {path}: bucket 'a'") for line in lines)


def test_check_rules_against_a_database(pg_dsn: str, tmp_path: Path) -> None:
    from relay.cli import schema_from_catalog

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(demo_schema.DDL)
        conn.execute(
            "create table site_stock_x (qty int, site text, part_id text, primary key (part_id, site))"
        )
    schema = schema_from_catalog(pg_dsn)
    assert schema["public.site_stock_x"].columns == ("qty", "site", "part_id")
    # in column order, as the change events' keys list them; the applier reads the same key
    assert schema["public.site_stock_x"].key == ("site", "part_id")
    from relay.upstream.applier_tables import read_tables

    with psycopg.connect(pg_dsn) as conn:
        applier = read_tables(conn, ["public.site_stock_x"])["public.site_stock_x"]
    assert applier.key == ("site", "part_id")

    result = runner.invoke(
        app,
        ["check-rules", "--rules", str(EXAMPLE_RULES), "--schema-from-dsn", pg_dsn],
    )
    assert result.exit_code == 0, result.output
    assert "structure only" not in result.stdout

    path = tmp_path / "rules.toml"
    path.write_text(
        "[[bucket]]\nname='a'\n[[bucket.table]]\ntable='public.parts'\ncolumns=['nmae']\n"
    )
    result = runner.invoke(app, ["check-rules", "--rules", str(path), "--schema-from-dsn", pg_dsn])
    assert result.exit_code == 2
    assert (
        "columns[0] 'nmae' is not a column of public.parts (did you mean 'name'?)" in result.stderr
    )


def test_check_rules_with_an_unreachable_database() -> None:
    result = runner.invoke(
        app,
        [
            "check-rules",
            "--rules",
            str(EXAMPLE_RULES),
            "--schema-from-dsn",
            "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2",
        ],
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot read the captured database's catalog")


def test_generated_columns_are_not_columns_devices_sync(pg_dsn: str) -> None:
    """cdc does not publish generated columns: the relay's tables leave them out too
    (listed, devices would hold NULL for them)."""
    from relay.cli import schema_from_catalog

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "create table gen_x (id int primary key, a int, "
            "twice int generated always as (a * 2) stored)"
        )
    assert schema_from_catalog(pg_dsn)["public.gen_x"].columns == ("id", "a")
