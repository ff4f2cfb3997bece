"""The demo schema: the tables ``fieldsync demo`` runs on, and the rows it starts with.

Three tables of a field-service company: ``work_orders`` (one per job, assigned to a
technician at a site), ``parts`` (the catalogue) and ``site_stock`` (parts on hand per
site, a two-column key).  The example settings are written for them:
``config/rules.example.toml`` (which quotes :data:`DDL` in its header) and
``config/conflicts.example.toml``; the Docker Compose stack creates them with
``compose/initdb/01-fieldsync.sql``, which is :func:`initdb_sql` (a test checks both;
``python -m devtools.demo_schema`` prints the initdb file).

Used by the full demo (:mod:`devtools.demo`), the cdc-only demo (:mod:`devtools.cdc_demo`)
and the tests that run on the demo's tables.  Plain text only: the callers execute it
(PostgreSQL takes several statements in one ``execute`` without parameters).
"""

from __future__ import annotations

TABLES = ("public.work_orders", "public.parts", "public.site_stock")
"""The demo's tables, qualified, in the order :data:`DDL` creates them."""

DDL = """\
create table work_orders (id bigserial primary key, site text not null, technician text,
    status text not null default 'open', due date, cost numeric(10,2), notes text,
    updated_at timestamptz not null default now());
create table parts (id text primary key, name text not null, unit text not null,
    discontinued boolean not null default false);
create table site_stock (site text, part_id text, qty integer not null,
    primary key (site, part_id));
"""

SEED = """\
insert into work_orders (id, site, technician, status, notes) values
    (1, 'plant-1', 't42', 'open', 'replace the filter'),
    (2, 'plant-1', 't42', 'open', 'check the pump'),
    (3, 'plant-3', 't42', 'in_progress', 'calibrate the sensor'),
    (4, 'plant-3', 't42', 'closed', 'done last week'),
    (5, 'plant-1', 't7', 'open', 'someone else''s job');
select setval('work_orders_id_seq', 100);
insert into parts values ('p1', 'filter', 'pc', false), ('p2', 'gasket', 'pc', true);
"""
"""The demo's starting rows: technician t42 has orders 1-4 (4 closed) at plant-1 and
plant-3, t7 has order 5; part p2 is discontinued.  New orders get ids above 100."""

STORE_DATABASE = "fieldsync_relay"
"""The relay's store database, next to the captured one (logical decoding is per database,
so the relay's own writes never feed back into the change stream)."""

_INITDB_HEADER = f"""\
-- Runs once, when the postgres container creates its data directory (as user fieldsync,
-- database app).  The relay's store gets a database of its own: logical decoding is per
-- database, so the relay's writes never feed back into the change stream.
create database {STORE_DATABASE} owner fieldsync;

-- The demo schema the example rules and conflict policies are written for
-- (config/rules.example.toml, config/conflicts.example.toml).  Replace with your own.
"""


def initdb_sql() -> str:
    """The text of ``compose/initdb/01-fieldsync.sql``: the store database and :data:`DDL`."""
    return _INITDB_HEADER + DDL


if __name__ == "__main__":
    print(initdb_sql(), end="")
