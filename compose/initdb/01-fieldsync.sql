-- Runs once, when the postgres container creates its data directory (as user fieldsync,
-- database app).  The relay's store gets a database of its own: logical decoding is per
-- database, so the relay's writes never feed back into the change stream.
create database fieldsync_relay owner fieldsync;

-- The demo schema the example rules and conflict policies are written for
-- (config/rules.example.toml, config/conflicts.example.toml).  Replace with your own.
create table work_orders (id bigserial primary key, site text not null, technician text,
    status text not null default 'open', due date, cost numeric(10,2), notes text,
    updated_at timestamptz not null default now());
create table parts (id text primary key, name text not null, unit text not null,
    discontinued boolean not null default false);
create table site_stock (site text, part_id text, qty integer not null,
    primary key (site, part_id));
