"""Relay commands: ``fieldsync token …`` (``token_app``) and ``fieldsync relay …`` (``app``).

Thin typer layer over relay.auth and relay.downstream.rules: parse arguments, call the
library, turn domain errors into exit codes and one-line messages on stderr:

- 0 success; 1 runtime failure (database unreachable); 2 invalid configuration
  or arguments (the message names the file, key or option at fault).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from core.errors import FieldsyncError
from relay.auth import DEFAULT_AUDIENCE, DEFAULT_ISSUER, issue_token
from relay.auth_keys import KeyStore
from relay.downstream.rules import Rules, TableInfo
from relay.downstream.rules_parser import check_rules_file, load_rules
from relay.errors import ConfigError, RulesError

EXIT_RUNTIME = 1
EXIT_CONFIG = 2

token_app = typer.Typer(
    help="Device tokens (JWT) for the relay's device API.",
    no_args_is_help=True,
    add_completion=False,
)
app = typer.Typer(
    help="relay: per-device buckets, device API, journal intake.",
    no_args_is_help=True,
    add_completion=False,
)


@token_app.callback()
def _token_group() -> None:
    """Device tokens (JWT) for the relay's device API."""


@app.callback()
def _relay_group() -> None:
    """relay: per-device buckets, device API, journal intake."""


def _fail(message: object, code: int = EXIT_CONFIG) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


_DURATION = re.compile(r"(\d+)([smhdw]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d``, ``2w`` or combinations (``1h30m``) in seconds."""
    compact = text.strip().lower()
    pos, total = 0, 0
    while pos < len(compact):
        m = _DURATION.match(compact, pos)
        if m is None:
            break
        total += int(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if not compact or pos != len(compact) or total <= 0:
        raise ConfigError(f"--ttl {text!r} is not a positive duration (e.g. 3600, 90m, 24h, 7d)")
    return total


def parse_claims(items: list[str]) -> dict[str, Any]:
    """``name=value`` pairs; a value with commas is a list (``sites=a,b``; ``sites=a,`` is ``["a"]``).

    A name given twice collects its values into a list.  Values are strings.
    """
    claims: dict[str, Any] = {}
    for item in items:
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not name:
            raise ConfigError(
                f"--claim {item!r} is not name=value (e.g. --claim sites=plant-1,plant-3)"
            )
        parsed: str | list[str] = (
            [v.strip() for v in value.split(",") if v.strip()] if "," in value else value
        )
        if name in claims:
            before = claims[name]
            claims[name] = (before if isinstance(before, list) else [before]) + (
                parsed if isinstance(parsed, list) else [parsed]
            )
        else:
            claims[name] = parsed
    return claims


@token_app.command("issue")
def token_issue(
    keys: Annotated[
        Path, typer.Option("--keys", help="keys file (see config/relay-keys.example.toml)")
    ],
    device: Annotated[str, typer.Option("--device", help="device id; becomes the token's sub")],
    kid: Annotated[
        str | None, typer.Option("--kid", help="key to sign with (default: the file's current key)")
    ] = None,
    claim: Annotated[
        list[str] | None,
        typer.Option("--claim", help="claim name=value; a,b makes a list; repeatable"),
    ] = None,
    ttl: Annotated[
        str, typer.Option("--ttl", help="lifetime: seconds or 90m, 24h, 7d, 1h30m")
    ] = "24h",
    audience: Annotated[
        str, typer.Option("--audience", help="aud claim: the relay's configured audience")
    ] = DEFAULT_AUDIENCE,
    issuer: Annotated[
        str, typer.Option("--issuer", help="iss claim: the relay's configured issuer")
    ] = DEFAULT_ISSUER,
) -> None:
    """Issue a signed token for a device and print it on stdout."""
    try:
        ttl_s = parse_duration(ttl)
        claims = parse_claims(claim or [])
        store = KeyStore.from_file(keys)
        token = issue_token(store, kid, device, claims, ttl_s, audience=audience, issuer=issuer)
    except FieldsyncError as exc:
        raise _fail(exc) from None
    typer.echo(token)


@app.command("check-rules")
def relay_check_rules(
    rules: Annotated[
        Path, typer.Option("--rules", help="rules file (see config/rules.example.toml)")
    ],
    schema_from_dsn: Annotated[
        str | None,
        typer.Option(
            "--schema-from-dsn",
            help="PostgreSQL DSN whose catalog the tables and columns are checked against",
        ),
    ] = None,
    store_dsn: Annotated[
        str | None,
        typer.Option(
            "--store-dsn",
            help="bucket store DSN: also check that the store was built under the same "
            "placement of rows (else it must be rebuilt; needs --schema-from-dsn)",
        ),
    ] = None,
    topic_prefix: Annotated[
        str,
        typer.Option(
            "--topic-prefix", help="the relay's topic_prefix (with --store-dsn: its offsets)"
        ),
    ] = "fieldsync",
) -> None:
    """Validate a rules file: structure only, or against a database's tables and columns,
    and whether a bucket store can serve it without a rebuild."""
    if store_dsn is not None and schema_from_dsn is None:
        raise _fail("--store-dsn needs --schema-from-dsn (date filters are compared as typed)")
    verdict = ""
    try:
        if schema_from_dsn is None:
            buckets = check_rules_file(rules)
            note = " (structure only; pass --schema-from-dsn to check tables and columns)"
        else:
            loaded = load_rules(rules, schema_from_catalog(schema_from_dsn))
            buckets = tuple(loaded.buckets.values())
            note = ""
            if store_dsn is not None:
                verdict = store_verdict(store_dsn, loaded, topic_prefix)
    except RulesError as exc:
        for problem in exc.problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except ConfigError as exc:  # StoreRulesMismatch
        raise _fail(exc) from None
    except FieldsyncError as exc:
        raise _fail(exc, EXIT_RUNTIME) from None
    typer.echo(f"ok: {rules}: {len(buckets)} bucket rule(s){note}")
    if verdict:
        typer.echo(f"  bucket store: {verdict}")
    for b in buckets:
        params = (
            ", ".join(f"{p} <- {c}" for p, c in zip(b.parameters, b.claims, strict=True))
            or "global"
        )
        typer.echo(f"  {b.name} [{params}]: {', '.join(b.tables)}")


@app.command("run")
def relay_run(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="relay settings file (TOML; see docs/relay.md)"),
    ] = None,
    engine: Annotated[
        bool,
        typer.Option("--engine/--no-engine", help="also run the bucket engine (leader-elected)"),
    ] = True,
) -> None:
    """Run the relay: the device API (HTTP + WebSocket) and the bucket engine."""
    from relay import server

    try:
        server.run(config, run_engine=engine)
    except ConfigError as exc:
        raise _fail(exc) from None
    except FieldsyncError as exc:
        raise _fail(exc, EXIT_RUNTIME) from None


def store_verdict(dsn: str, rules: Rules, topic_prefix: str) -> str:
    """Whether the bucket store at ``dsn`` can serve ``rules`` as it is (what a relay's
    start would decide, nothing written); StoreRulesMismatch when it must be rebuilt."""
    from relay.downstream.pg_store_schema import check_placement
    from relay.downstream.rules_placement import placement_text

    return check_placement(dsn, placement_text(rules), rules.source, topic_prefix)


def schema_from_catalog(dsn: str) -> dict[str, TableInfo]:
    """Columns, primary keys and date/time columns of every user table, keyed
    ``schema.table`` (as the relay reads them)."""
    from relay.downstream.table_infos import table_infos_from_catalog

    return table_infos_from_catalog(dsn)
