"""Column kinds in ``/v1/schema`` (docs/relay.md): each column's kind decided from its
PostgreSQL type as cdc carries its values on the wire (relay/downstream/table_infos.py,
core/column_kinds.py), read from the catalog alike for builtin and user types; the
schema body giving the kinds of the columns a device receives; the table follower
rebinding the rules when a column's kind changes."""

from __future__ import annotations

import typing
from typing import Any

import psycopg

from core.column_kinds import COLUMN_KINDS, column_kind
from core.pg_types import MappingCatalog, TypeInfo, TypeKind
from core.values import Kind
from relay.downstream.api_messages import TableModel, visible_schema
from relay.downstream.rules import TableInfo
from relay.downstream.rules_parser import rules_from_mapping
from relay.downstream.table_follower import changed_tables, describe_change
from relay.downstream.table_infos import catalog_kinds, table_infos_from_catalog

TYPES: list[tuple[str, str]] = [
    # (PostgreSQL type, kind): docs/events.md "Type mapping", as the device reads it
    ("boolean", "bool"),
    ("smallint", "int"),
    ("integer", "int"),
    ("bigint", "int"),
    ("oid", "int"),
    ("real", "float"),
    ("double precision", "float"),
    ("numeric(10,2)", "text"),
    ("numeric", "text"),
    ("text", "text"),
    ("varchar(20)", "text"),
    ("char(3)", "text"),
    ("uuid", "text"),
    ("bytea", "text"),
    ("json", "text"),
    ("jsonb", "text"),
    ("inet", "text"),
    ("date", "int"),
    ("time", "int"),
    ("timetz", "text"),
    ("timestamp", "int"),
    ("timestamptz", "int"),
    ("interval", "json"),
    ("integer[]", "json"),
    ("text[][]", "json"),
    ("kinds_mood", "text"),  # an enum
    ("kinds_flag", "bool"),  # a domain over boolean
    ("kinds_flag[]", "json"),
    ("kinds_day", "int"),  # a domain over date
    ("int4range", "text"),  # no mapping: its text form
    ("money", "text"),
    ("point", "text"),
]
USER_TYPES = """
create type kinds_mood as enum ('ok', 'sad');
create domain kinds_flag as boolean;
create domain kinds_day as date;
"""


def test_every_value_kind_has_a_column_kind() -> None:
    assert {column_kind(k) for k in Kind} == set(COLUMN_KINDS)
    annotation = TableModel.model_fields["kinds"].annotation
    literal = typing.get_args(typing.get_args(typing.get_args(annotation)[0])[1])
    assert literal == COLUMN_KINDS, "the OpenAPI description lists the same kinds"


def test_kinds_of_builtin_and_user_types_without_a_database() -> None:
    catalog = MappingCatalog(
        [
            TypeInfo(90001, "mood", "app", TypeKind.ENUM),
            TypeInfo(90002, "flag", "app", TypeKind.DOMAIN, base_oid=16),
            TypeInfo(90003, "_flag", "app", TypeKind.ARRAY, elem_oid=90002),
            TypeInfo(90004, "span", "app", TypeKind.RANGE),
        ]
    )
    columns = [
        ("b", 16, -1),
        ("i", 23, -1),
        ("f", 701, -1),
        ("d", 1700, (10 << 16) + 2 + 4),
        ("j", 3802, -1),
        ("ts", 1184, -1),
        ("iv", 1186, -1),
        ("arr", 1007, -1),
        ("mood", 90001, -1),
        ("flag", 90002, -1),
        ("flags", 90003, -1),
        ("span", 90004, -1),
    ]
    assert dict(catalog_kinds(columns, catalog)) == {
        "b": "bool",
        "i": "int",
        "f": "float",
        "d": "text",
        "j": "text",
        "ts": "int",
        "iv": "json",
        "arr": "json",
        "mood": "text",
        "flag": "bool",
        "flags": "json",
        "span": "text",
    }


def test_kinds_read_from_the_catalog(pg_dsn: str) -> None:
    columns = ", ".join(f"c{i} {typ}" for i, (typ, _) in enumerate(TYPES))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(USER_TYPES)
        conn.execute(f"create table kinds_all (id int primary key, {columns})")
    info = table_infos_from_catalog(pg_dsn)["public.kinds_all"]
    assert info.kinds == (("id", "int"), *((f"c{i}", k) for i, (_, k) in enumerate(TYPES)))


DOCUMENT: dict[str, Any] = {
    "bucket": [{"name": "all", "table": [{"table": "public.g", "columns": ["n"]}]}],
}
G = TableInfo(("id", "n", "secret"), ("id",), (), (("id", "int"), ("n", "int"), ("secret", "text")))


def test_the_schema_gives_the_kinds_of_the_columns_a_device_receives() -> None:
    body = visible_schema(rules_from_mapping(DOCUMENT, {"public.g": G}, "r.toml"), ["all[]"])
    assert body["tables"][0]["columns"] == ["id", "n"]
    assert body["tables"][0]["kinds"] == {"id": "int", "n": "int"}
    without = TableInfo(G.columns, G.key)  # bound to definitions without kinds
    body = visible_schema(rules_from_mapping(DOCUMENT, {"public.g": without}, "r.toml"), ["all[]"])
    assert "kinds" not in body["tables"][0]


def test_a_column_retyped_to_another_kind_is_a_change_of_the_table() -> None:
    rules = rules_from_mapping(DOCUMENT, {"public.g": G}, "r.toml")
    same = TableInfo(G.columns, G.key, (), G.kinds)
    assert changed_tables(rules, {"public.g": same}) == {}
    now = TableInfo(G.columns, G.key, (), (("id", "int"), ("n", "bool"), ("secret", "text")))
    assert changed_tables(rules, {"public.g": now}) == {"public.g": (G, now)}
    assert describe_change("public.g", G, now) == "public.g: kinds n int → bool"
    rebound = rules_from_mapping(DOCUMENT, {"public.g": now}, "r.toml")
    assert visible_schema(rebound, ["all[]"])["tables"][0]["kinds"] == {"id": "int", "n": "bool"}
