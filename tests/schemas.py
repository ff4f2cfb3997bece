"""The schemas, rules, conflict policies and key files the tests share; the repository's paths.

- The demo's tables (:mod:`devtools.demo_schema`: ``work_orders``, ``parts``,
  ``site_stock``), for which ``config/rules.example.toml`` and
  ``config/conflicts.example.toml`` are written: create them with ``demo_schema.DDL``;
  :data:`DEMO_CATALOG` is what the relay reads of them from PostgreSQL's catalog, for tests
  that load the example rules without a database (tests/test_schemas.py checks it against
  the real catalog).
- The crews schema of the whole-pipeline runs (tests/pipeline/test_device_e2e.py and the
  soak, tests/pipeline/pipeline_soak.py): ``jobs`` (integer key; ``crew`` picks the bucket;
  state ``done`` takes a job out of every bucket; ``note`` lww, ``hours`` a counter,
  ``priority`` ask; ``secret`` and ``updated_at`` not sent; a CHECK constraint and a
  trigger that refuse poison values) and ``stock`` (two-column text key, ``qty`` a
  counter, one bucket per element of the list claim ``regions``).
- :func:`write_keys`: a relay key file with one HS256 key, for tests that start the relay
  as a process.

A test whose point is a different table (other columns, other rules) keeps its own
statement next to it.  Plain module, no fixtures (those are tests/fix_*.py).
"""

from __future__ import annotations

from pathlib import Path

from relay.downstream.rules import TableInfo

# --------------------------------------------------------------------------- paths

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config"
COMPOSE = REPO / "compose"
BENCH = REPO / "bench"
EXAMPLE_RULES = CONFIG / "rules.example.toml"
EXAMPLE_CONFLICTS = CONFIG / "conflicts.example.toml"


def write_keys(path: Path, secret: str) -> Path:
    """A relay key file at ``path`` (mode 0600, as the relay requires) with one HS256 key
    ``k1``, the current one."""
    path.write_text(f'current = "k1"\n\n[[key]]\nkid = "k1"\nalg = "HS256"\nsecret = "{secret}"\n')
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------- the demo's tables

WO = "public.work_orders"
DEMO_CATALOG = {
    WO: TableInfo(
        ("id", "site", "technician", "status", "due", "cost", "notes", "updated_at"), ("id",)
    ),
    "public.parts": TableInfo(("id", "name", "unit", "discontinued"), ("id",)),
    "public.site_stock": TableInfo(("site", "part_id", "qty"), ("site", "part_id")),
}
"""Columns and key of each demo table, as ``table_infos_from_catalog`` reads them (without
the kinds of the date and time columns, which only rules that filter on them need)."""

# --------------------------------------------------------------------------- crews: jobs, stock

CREW_JOBS_RULES = """
token_claims = ["crew"]

[[bucket]]
name = "crew_jobs"
parameters = ["crew"]
claims = { crew = "crew" }

[[bucket.table]]
table = "public.jobs"
match = { crew = "crew" }
"""
"""One bucket per crew over ``public.jobs`` alone (the pipeline status and runbook tests)."""

POISON_MARK = "<poison>"
"""A note holding this is refused by ``jobs``' CHECK constraint."""
JOBS_TABLES = ["public.jobs", "public.stock"]
JOBS_DDL = f"""
create table jobs (id integer primary key, crew text not null,
    state text not null default 'open', note text, hours integer not null default 0,
    priority integer not null default 3, secret text default 'internal',
    updated_at timestamptz not null default now(),
    constraint jobs_note_clean check (note is null or position('{POISON_MARK}' in note) = 0));
create function jobs_guard() returns trigger language plpgsql as $$
begin
    if new.hours > 1000000 then
        raise exception 'job %: % hours is beyond any plausible value', new.id, new.hours;
    end if;
    return new;
end $$;
create trigger jobs_guard before insert or update on jobs
    for each row execute function jobs_guard();
create table stock (region text, part text, qty integer not null default 0,
    primary key (region, part));
"""
JOBS_RULES = """
token_claims = ["crew", "regions"]

[[bucket]]
name = "crew_jobs"
parameters = ["crew"]
claims = { crew = "crew" }

[[bucket.table]]
table = "public.jobs"
match = { crew = "crew" }
filters = [ { column = "state", op = "!=", value = "done" } ]
exclude = ["secret", "updated_at"]

[[bucket]]
name = "region_stock"
parameters = ["region"]
claims = { region = "regions" }

[[bucket.table]]
table = "public.stock"
match = { region = "region" }
"""
JOBS_CONFLICTS = """
[default]
policy = "server_wins"

[[table]]
table = "public.jobs"
policy = "lww"
time_column = "updated_at"
columns = { hours = "counter", priority = "ask" }

[[table]]
table = "public.stock"
policy = "server_wins"
columns = { qty = "counter" }
"""
