"""The demo schema is written down once (devtools/demo_schema.py); every other copy of it
is checked against that one: the Docker Compose initdb file, the schema quoted in the
example rules, and the tests' catalog of it (tests/schemas.py), against a real
PostgreSQL."""

from __future__ import annotations

import psycopg

from devtools import demo_schema
from relay.downstream.rules_parser import load_rules
from relay.downstream.table_infos import table_infos_from_catalog
from tests.schemas import COMPOSE, DEMO_CATALOG, EXAMPLE_RULES


def test_compose_initdb_is_the_demo_schema() -> None:
    path = COMPOSE / "initdb" / "01-fieldsync.sql"
    assert path.read_text() == demo_schema.initdb_sql(), (
        f"{path} is not devtools/demo_schema.py's; write it again with "
        "`python -m devtools.demo_schema > compose/initdb/01-fieldsync.sql`"
    )


def test_example_rules_quote_the_demo_schema() -> None:
    text = EXAMPLE_RULES.read_text()
    quoted = text.split("# Written for this schema", 1)[1].split("\n#\n", 1)[0]
    lines = quoted.splitlines()[1:]  # the heading line's rest, then the statements
    assert all(line.startswith("#   ") for line in lines), lines
    assert "".join(line[4:] + "\n" for line in lines) == demo_schema.DDL


def test_demo_schema_seed_and_catalog_on_postgresql(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(demo_schema.DDL)
        conn.execute(demo_schema.SEED)
        t42 = conn.execute("select count(*) from work_orders where technician = 't42'")
        assert t42.fetchone() == (4,)
    catalog = table_infos_from_catalog(pg_dsn)
    assert set(catalog) == set(demo_schema.TABLES) == set(DEMO_CATALOG)
    assert {t: (i.columns, i.key) for t, i in catalog.items()} == {
        t: (i.columns, i.key) for t, i in DEMO_CATALOG.items()
    }
    rules = load_rules(EXAMPLE_RULES, catalog)  # the example rules fit the demo's tables
    assert set(rules.tables) == set(demo_schema.TABLES)
