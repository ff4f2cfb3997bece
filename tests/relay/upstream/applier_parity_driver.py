"""Driver of tests/relay/upstream/test_applier_compiled_parity.py: a seeded journal through
the applier's per-entry modules, every result printed as a JSON line.

Run as ``python -m tests.relay.upstream.applier_parity_driver SEED`` (with the compiled
modules, or with PYTHONPATH on a copy of the pure sources).  A seeded random generator
makes journal records of the demo schema (inserts, updates, deletes of work orders, stock
and parts, with good values, values of the wrong type, out-of-range numbers, stale or
missing old values, bad clocks, broken records), and each goes through what the applier
does per entry: :meth:`JournalRecord.from_bytes`, :func:`validate_entry` against a device's
write scope (the example rules), :func:`merge` with the example conflict policies against a
random server row, and the outcome's JSON.  Output: the modules that were compiled, then
per record the parsed entry, the validation result and the merge result (or the error
text).
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from core.errors import FieldsyncError
from core.hlc import Hlc
from core.journal_format import EntryProblem, JournalRecord, Op, entry_from_json
from core.journal_outcomes import Outcome
from core.values import ColumnType, Kind
from devtools.compiled import loaded_compiled
from relay.downstream.rules_parser import load_rules
from relay.upstream.conflict_policies import load_conflicts
from relay.upstream.merge import EditTimes, merge
from relay.upstream.validation import validate_entry
from relay.upstream.write_rules import WriteScope
from tests.schemas import DEMO_CATALOG, EXAMPLE_CONFLICTS, EXAMPLE_RULES

TEXT = ColumnType(Kind.TEXT, "text")
TYPES: dict[str, dict[str, ColumnType]] = {
    "public.work_orders": {
        "id": ColumnType(Kind.INT, "int8"),
        "site": TEXT,
        "technician": TEXT,
        "status": TEXT,
        "due": ColumnType(Kind.DATE, "date"),
        "cost": ColumnType(Kind.DECIMAL, "numeric(10,2)", precision=10, scale=2),
        "notes": TEXT,
        "updated_at": ColumnType(Kind.TIMESTAMPTZ, "timestamptz"),
    },
    "public.site_stock": {"site": TEXT, "part_id": TEXT, "qty": ColumnType(Kind.INT, "int4", 32)},
    "public.parts": {"id": TEXT, "name": TEXT, "unit": TEXT, "discontinued": TEXT},
}
SITES = ["north", "south"]
TECHS = ["ann", "bob"]
STATUSES = ["open", "closed", "cancelled", "in_progress"]


def _value(rng: random.Random, table: str, column: str) -> Any:
    """A value for a column: mostly good, sometimes of the wrong type or out of range."""
    if rng.random() < 0.02:
        return rng.choice([[], {"x": 1}, 2**70, "not-a-number", True, 1.5e308, "\x00"])
    if column == "id" and table == "public.parts":
        return rng.choice(["p1", "p2", "p3"])
    if column in {"id", "qty"}:
        return rng.randint(-5, 50) if rng.random() < 0.9 else rng.choice([2**31, "7"])
    if column == "site":
        return rng.choice(SITES)
    if column == "technician":
        return rng.choice(TECHS)
    if column == "status":
        return rng.choice(STATUSES)
    if column == "due":
        return rng.choice(["2026-12-07", "2026-02-30", None, "2027-01-01", "2026-06-01"])
    if column == "cost":
        return rng.choice(["12.34", "12.345", "99999999.99", "1e3", None, 7, "0.10", 12.5])
    if column == "updated_at":
        return rng.choice(
            ["2026-12-07T10:00:00Z", "2026-12-07 10:00:00+01", None, "2026-12-07T10:00:00.5Z"]
        )
    return rng.choice(["", "text", "ünïcode", None, "x" * rng.randint(0, 40)])


def _row(rng: random.Random, table: str) -> dict[str, Any]:
    return {c: _value(rng, table, c) for c in TYPES[table]}


def _entry(rng: random.Random, seq: int) -> dict[str, Any]:
    table = rng.choice(list(TYPES))
    keys = DEMO_CATALOG[table].key
    op = rng.choice(["insert", "update", "update", "delete"])
    row = _row(rng, table)
    key = [row[k] for k in keys]
    old = None if op == "insert" else _row(rng, table) | {k: row[k] for k in keys}
    new = None if op == "delete" else {c: v for c, v in row.items() if rng.random() < 0.7}
    if new is not None:
        new |= {k: row[k] for k in keys}
    if rng.random() < 0.1:
        key = key[:-1]
    hlc = str(Hlc(rng.randint(1_700_000_000_000, 1_800_000_000_000), rng.randint(0, 5), "dev-1"))
    raw: dict[str, Any] = {
        "seq": seq,
        "table": table,
        "op": op,
        "key": key,
        "old": old,
        "new": new,
        "hlc": hlc if rng.random() > 0.05 else "soon",
    }
    if rng.random() < 0.05:
        del raw[rng.choice(["table", "op", "key", "hlc"])]
    return raw


def _record(rng: random.Random, seq: int) -> bytes:
    roll = rng.random()
    if roll < 0.03:
        return b"{not json"
    if roll < 0.05:
        return json.dumps({"v": 1, "device_id": "", "seq": seq}).encode()
    claims = {"technician": rng.choice(TECHS), "sites": rng.sample(SITES, rng.randint(0, 2))}
    if rng.random() < 0.6:
        claims["sites"] = SITES
    return json.dumps(
        {
            "v": 1,
            "device_id": "dev-1",
            "seq": seq,
            "received_at_us": rng.randint(0, 10**15),
            "claims": claims,
            "entry": _entry(rng, seq),
            "rejection": None,
        }
    ).encode()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr, sort_keys=True))


def run(seed: int) -> Iterator[str]:
    yield json.dumps({"compiled": sorted(loaded_compiled())})
    rng = random.Random(seed)
    rules = load_rules(EXAMPLE_RULES, DEMO_CATALOG)
    policies = load_conflicts(EXAMPLE_CONFLICTS, TYPES)
    for seq in range(1, 401):
        data = _record(rng, seq)
        try:
            record = JournalRecord.from_bytes(data)
        except FieldsyncError as exc:
            yield json.dumps({"record_error": f"{type(exc).__name__}: {exc}"})
            continue
        out: dict[str, Any] = {
            "record": _jsonable(record.entry.to_json() if record.entry else None)
        }
        out["rejection"] = record.rejection.to_json() if record.rejection else None
        entry = record.entry
        if entry is not None:
            scope = WriteScope(rules, sorted(rules.buckets_for_claims(record.claims)), TYPES)
            for check_rows in (True, False):
                checked, rejection = validate_entry(entry, scope, check_rows=check_rows)
                out[f"valid_{check_rows}"] = _jsonable(
                    [checked.to_json(), rejection.to_json() if rejection else None]
                )
            checked, rejection = validate_entry(entry, scope, check_rows=False)
            if rejection is None:
                out["merge"] = _merge(rng, policies, checked)
        yield json.dumps(out, sort_keys=True)
    yield json.dumps({"entry_errors": [_entry_error(rng) for _ in range(40)]})


def _merge(rng: random.Random, policies: Any, entry: Any) -> Any:
    types = TYPES[entry.table]
    server = None if rng.random() < 0.2 else _row(rng, entry.table)
    if server is not None and entry.old is not None and rng.random() < 0.5:
        server = dict(entry.old) | {"notes": "server edit"}
    server_time: Hlc | int | None = rng.choice([None, entry.hlc, Hlc(1, 0, "s"), 1_750_000_000_000])
    times = EditTimes(entry.hlc, server_time, 1_760_000_000_000, 60_000)
    try:
        result = merge(
            entry.op,
            policies.table(entry.table),
            types,
            DEMO_CATALOG[entry.table].key,
            entry.old,
            server,
            entry.new,
            times,
        )
    except (FieldsyncError, ValueError, ArithmeticError) as exc:
        return f"{type(exc).__name__}: {exc}"
    outcome = Outcome(
        "dev-1",
        entry.seq,
        result.outcome,
        entry.table,
        entry.key,
        reason="because",
        message=result.message,
        row=result.row,
        columns=dict(result.columns),
        conflict={"id": "c1"} if result.held else None,
        hlc=str(entry.hlc),
        at_us=rng.randint(1, 10**15),
    )
    later = outcome.with_visible_after(rng.randint(1, 2**63))
    return _jsonable(
        {
            "action": str(result.action),
            "values": result.values,
            "held": result.held,
            "held_row": result.held_row,
            "message": result.message,
            "outcome": outcome.to_json(),
            "visible_after_kept_all": later
            == dataclasses.replace(outcome, visible_after=later.visible_after),
            "delete": entry.op is Op.DELETE,
            "decimal": isinstance(result.values.get("cost"), Decimal),
        }
    )


def _entry_error(rng: random.Random) -> str:
    raw = _entry(rng, rng.randint(1, 9))
    raw[rng.choice(list(raw))] = rng.choice([None, -1, "", [1], {"a": 1}])
    try:
        return json.dumps(entry_from_json(raw, "dev-2").to_json(), default=repr)
    except EntryProblem as exc:
        return json.dumps(exc.rejection.to_json())


if __name__ == "__main__":
    for line in run(int(sys.argv[1])):
        print(line)
