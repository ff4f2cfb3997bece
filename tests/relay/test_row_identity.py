"""cdc, the relay and the applier name a table's rows by the same columns: its row identity
(``core.pg_types.KEY_INDEX``: the replica identity index under USING INDEX, else the primary
key; listed in the table's column order), against a real PostgreSQL catalog.

A device's table is keyed by what the relay says (``/v1/schema`` from
:func:`relay.downstream.table_infos.table_infos_from_catalog`), the relay names rows by
the Kafka key cdc writes, and the applier finds a device's edited row by
:class:`relay.upstream.applier_tables.TableMeta`'s key: if one of them read the primary key
where cdc keys by an identity index, a device's edits of such a table would miss their rows
and its ops would not match its table."""

from __future__ import annotations

import psycopg
import pytest

from cdc.pg_catalog import table_key_columns
from relay.downstream.table_infos import table_infos_from_catalog
from relay.upstream.applier_tables import read_tables

TABLES = {
    # a primary key, and the replica identity an index of other columns
    "public.ident_idx": (
        "create table ident_idx (id int primary key, code text not null, n int)",
        "create unique index ident_idx_code on ident_idx (code)",
        "alter table ident_idx replica identity using index ident_idx_code",
    ),
    # a composite primary key declared in another order than its columns
    "public.ident_pk": ("create table ident_pk (a int, b text, c int, primary key (c, a))",),
    # an identity index and no primary key
    "public.ident_nopk": (
        "create table ident_nopk (x int not null, y int not null, z text)",
        "create unique index ident_nopk_yx on ident_nopk (y, x)",
        "alter table ident_nopk replica identity using index ident_nopk_yx",
    ),
    # a primary key and REPLICA IDENTITY FULL: the primary key
    "public.ident_full": (
        "create table ident_full (id int primary key, v text)",
        "alter table ident_full replica identity full",
    ),
    # no key columns at all
    "public.ident_none": ("create table ident_none (v text)",),
}
EXPECTED = {
    "public.ident_idx": ("code",),
    "public.ident_pk": ("a", "c"),
    "public.ident_nopk": ("x", "y"),
    "public.ident_full": ("id",),
    "public.ident_none": (),
}


@pytest.fixture
def catalog(pg_dsn: str) -> str:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for statements in TABLES.values():
            for statement in statements:
                conn.execute(statement)
    return pg_dsn


def cdc_key(conn: psycopg.Connection[tuple[object, ...]], table: str) -> tuple[str, ...]:
    """cdc's key columns of ``table``, in column order (as its Kafka key lists them)."""
    oid = conn.execute("select %s::regclass::oid", (table,)).fetchone()
    assert oid is not None
    names = set(table_key_columns(conn, oid[0]))
    columns = conn.execute(
        "select attname from pg_attribute where attrelid = %s and attnum > 0 "
        "and not attisdropped order by attnum",
        (oid[0],),
    ).fetchall()
    return tuple(str(c[0]) for c in columns if c[0] in names)


def test_cdc_relay_and_applier_name_rows_by_the_same_columns(catalog: str) -> None:
    relay = table_infos_from_catalog(catalog)
    with psycopg.connect(catalog, autocommit=True) as conn:
        applier = read_tables(conn, TABLES)
        for table, key in EXPECTED.items():
            assert cdc_key(conn, table) == key, table
            assert relay[table].key == key, table
            assert applier[table].key == key, table


def test_switching_the_identity_moves_the_key_in_every_reader(catalog: str) -> None:
    with psycopg.connect(catalog, autocommit=True) as conn:
        conn.execute("alter table ident_idx replica identity default")
        conn.execute("alter table ident_full replica identity using index ident_full_pkey")
        assert read_tables(conn, ["public.ident_idx"])["public.ident_idx"].key == ("id",)
        assert cdc_key(conn, "public.ident_idx") == ("id",)
    relay = table_infos_from_catalog(catalog)
    assert relay["public.ident_idx"].key == ("id",)
    assert relay["public.ident_full"].key == ("id",)
