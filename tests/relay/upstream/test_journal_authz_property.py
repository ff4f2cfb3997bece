"""Property: no device ever writes beyond its write rights, through journal entries or
conflict resolutions, and nothing it is shown exceeds what the rules grant.

Random rules (matches on claims, filters, projections, ``writable``, ``claim``), random
conflict policies, random rows, devices with random claims, and a random script of
server edits, device journal entries (honest and hostile: stale bases, hidden columns,
rows it cannot see, moves, claims) and conflict resolutions, applied to the real
PostgreSQL by the applier (``ApplierDb``) one at a time.  After each device action the
table is compared with its state before, and an oracle evaluated directly from the rules'
data (placement, projections and rights worked out here, not by relay.downstream.rules or
relay.upstream.write_rules) checks that every row the device changed was within its write rights
before and after, that it changed only columns it may write, that no change showed it
columns it could not see unless a ``claim`` rule allows it, and that every row shown in
an outcome is the current row cut to what the device may see.  A "widen" step is a
device trying on purpose to move a row it sees into a bucket that shows it more."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from core.hlc import Hlc
from core.journal_format import JournalRecord, entry_from_json
from core.journal_outcomes import Outcome
from relay.downstream.rules import canonical_text
from relay.errors import ResolveError
from relay.upstream.applier_db import ApplierDb
from relay.upstream.applier_store import Delivery

TABLE = "public.t"
COLUMNS = ("id", "x", "y", "z", "w")
DATA = ("x", "y", "z", "w")
IDS = (1, 2, 3, 4, 5)
VALUES: list[str | None] = ["a", "b", None]
CLAIM_NAMES = ["c1", "c2"]

# --------------------------------------------------------------------------- strategies


@st.composite
def table_entries(
    draw: st.DrawFn, parameters: list[str], match: str | None = None, narrow: bool = False
) -> dict[str, Any]:
    """A bucket rule's entry for the table (``match``: the column of its one parameter;
    ``narrow``: it shows only some columns)."""
    entry: dict[str, Any] = {"table": TABLE}
    free = list(DATA)
    matches: dict[str, str] = {}
    for p in parameters:
        column = match or draw(st.sampled_from(free))
        free.remove(column)
        matches[column] = p
    entry["match"] = matches
    filters = []
    if draw(st.booleans()):
        op = draw(st.sampled_from(["=", "!=", "in", "not in", "is null", "is not null"]))
        f: dict[str, Any] = {"column": draw(st.sampled_from(DATA)), "op": op}
        if op in ("in", "not in"):
            f["value"] = draw(st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=2))
        elif op in ("=", "!="):
            f["value"] = draw(st.sampled_from(["a", "b"]))
        filters.append(f)
    entry["filters"] = filters
    projection = "columns" if narrow else draw(st.sampled_from(["all", "columns", "exclude"]))
    if narrow:  # the owner column and at most one other (as the example's site view)
        entry["columns"] = ["x", *draw(st.lists(st.sampled_from(["z", "w"]), max_size=1))]
    elif projection == "columns":
        entry["columns"] = draw(st.lists(st.sampled_from(DATA), unique=True))
    elif projection == "exclude":
        entry["exclude"] = draw(st.lists(st.sampled_from(DATA), unique=True))
    entry["writable"] = draw(st.sampled_from([True, True, True, False]))
    entry["claim"] = entry["writable"] and draw(st.booleans())
    return entry


@st.composite
def rule_sets(draw: st.DrawFn) -> dict[str, Any]:
    """Random rule sets; half of them shaped like the example rules (rows of an owner, and
    a narrower view of the rows of a site), where moves between rules that show different
    columns (claims, hand-overs) are likely."""
    buckets = []
    if draw(st.booleans()):
        owner = draw(table_entries(["p0"], match="x"))
        site = draw(table_entries(["p0"], match="y", narrow=True))
        buckets = [
            {"name": "r0", "parameters": ["p0"], "claims": {"p0": "c1"}, "table": [owner]},
            {"name": "r1", "parameters": ["p0"], "claims": {"p0": "c2"}, "table": [site]},
        ]
    for i in range(len(buckets), draw(st.integers(len(buckets) + 1, 3))):
        parameters = [f"p{j}" for j in range(draw(st.integers(0, 2)))]
        buckets.append(
            {
                "name": f"r{i}",
                "parameters": parameters,
                "claims": {p: draw(st.sampled_from(CLAIM_NAMES)) for p in parameters},
                "table": [draw(table_entries(parameters))],
            }
        )
    return {"token_claims": CLAIM_NAMES, "bucket": buckets}


claim_value = st.sampled_from(["a", "b", ["a", "b"], ["b"], None])
device_claims = st.fixed_dictionaries({"c1": claim_value, "c2": claim_value})
rows = st.fixed_dictionaries({c: st.sampled_from(VALUES) for c in DATA})
policies = st.fixed_dictionaries(
    {
        "table": st.sampled_from(["server_wins", "client_wins", "ask", "ask"]),
        "w": st.sampled_from([None, "ask", "ask", "client_wins"]),
    }
)

# --------------------------------------------------------------------------- the oracle


def claim_set(value: Any) -> set[str]:
    items = value if isinstance(value, list) else [value]
    return {t for t in (canonical_text(v) for v in items) if t is not None}


def holds(f: dict[str, Any], value: Any) -> bool:
    text = canonical_text(value)
    wanted = {
        canonical_text(v)
        for v in (f["value"] if isinstance(f.get("value"), list) else [f.get("value")])
    }
    return {
        "is null": value is None,
        "is not null": value is not None,
        "=": text is not None and text in wanted,
        "in": text is not None and text in wanted,
        "!=": text is not None and text not in wanted,
        "not in": text is not None and text not in wanted,
    }[f["op"]]


def reach(
    rules: dict[str, Any], claims: dict[str, Any], row: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The table entries of the rules through which a device with ``claims`` holds ``row``."""
    if row is None:
        return []
    found = []
    for bucket in rules["bucket"]:
        for entry in bucket["table"]:
            if not all(holds(f, row[f["column"]]) for f in entry["filters"]):
                continue
            ok = True
            for p in bucket["parameters"]:
                texts = {canonical_text(row[c]) for c, q in entry["match"].items() if q == p}
                ok = ok and len(texts) == 1 and None not in texts
                ok = ok and texts <= claim_set(claims.get(bucket["claims"][p]))
            if ok:
                found.append(entry)
    return found


def shown(entries: list[dict[str, Any]]) -> set[str]:
    cols: set[str] = set()
    for e in entries:
        if "columns" in e:
            cols |= {"id", *e["columns"]}
        else:
            cols |= {c for c in COLUMNS if c not in e.get("exclude", [])}
    return cols


def writable(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["writable"]]


def check_change(
    rules: dict[str, Any],
    claims: dict[str, Any],
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    what: str,
) -> None:
    """A device changed ``before`` into ``after`` (one row): within its rights?"""
    b, a = reach(rules, claims, before), reach(rules, claims, after)
    if before is not None:
        assert writable(b), f"{what}: changed a row it may not write: {before} -> {after}"
    if after is not None:
        assert writable(a), f"{what}: left the row where it may not write it: {before} -> {after}"
    if before is not None and after is not None:
        changed = {c for c in DATA if before[c] != after[c]}
        assert changed <= shown(writable(b)), f"{what}: wrote {changed} of {before} -> {after}"
        gained = shown(a) - shown(b)
        claimable = shown([e for e in a if e["claim"]])
        assert gained <= claimable, f"{what}: now shows {gained} of {after} (was {before})"
    elif after is not None:  # inserted: every set value is its own write (no defaults)
        changed = {c for c in DATA if after[c] is not None}
        assert changed <= shown(writable(a)), f"{what}: inserted {changed} in {after}"


def check_shown(
    rules: dict[str, Any],
    claims: dict[str, Any],
    row: Any,
    actual: dict[str, Any] | None,
    what: str,
) -> None:
    """A row shown to the device (an outcome's) is the current row cut to what it sees."""
    if row is None:
        return
    assert actual is not None, f"{what}: shows a row that does not exist: {row}"
    visible = shown(reach(rules, claims, actual))
    assert set(row) <= visible, f"{what}: shows {set(row) - visible} of {actual}"
    assert all(row[c] == actual[c] for c in row), f"{what}: shows {row}, the row is {actual}"


# --------------------------------------------------------------------------- the database


class World:
    """The captured database (table ``t``), the applier on it, and the current files."""

    def __init__(self, dsn: str, tmp: Path) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute("create table t (id int primary key, x text, y text, z text, w text)")
        self.rules_path = tmp / "rules.toml"
        self.conflicts_path = tmp / "conflicts.toml"
        self.db = ApplierDb(dsn, self.rules_path, self.conflicts_path)
        self.offsets = itertools.count()
        self.seqs: dict[str, int] = {}

    def reset(
        self, rules: dict[str, Any], policy: dict[str, Any], initial: list[dict[str, Any]]
    ) -> None:
        self.rules_path.write_text(rules_toml(rules))
        conflicts = f'[[table]]\ntable = "{TABLE}"\npolicy = "{policy["table"]}"\n'
        if policy["w"]:
            conflicts += f'[table.columns]\nw = "{policy["w"]}"\n'
        self.conflicts_path.write_text(conflicts)
        self.conn.execute("truncate t")
        if self.db.conn is None:
            self.db.connect()
            self.db.migrate()
        self.conn.execute(
            "truncate fieldsync_applier.applied, fieldsync_applier.conflicts, "
            "fieldsync_applier.outbox, fieldsync_applier.row_clock, fieldsync_applier.dead_letters"
        )
        self.db.connect()  # re-reads the rules and policies
        for i, row in zip(IDS, initial, strict=False):
            self.insert({"id": i, **row})
        self.seqs.clear()

    def rows(self) -> dict[int, dict[str, Any]]:
        cur = self.conn.execute("select id, x, y, z, w from t")
        return {r[0]: dict(zip(COLUMNS, r, strict=True)) for r in cur.fetchall()}

    def insert(self, row: dict[str, Any]) -> None:
        self.conn.execute(
            "insert into t values (%s, %s, %s, %s, %s) on conflict (id) do update set "
            "x = excluded.x, y = excluded.y, z = excluded.z, w = excluded.w",
            [row[c] for c in COLUMNS],
        )

    def entry(self, device: str, claims: dict[str, Any], raw: dict[str, Any]) -> list[Outcome]:
        seq = self.seqs[device] = self.seqs.get(device, 0) + 1
        raw = {**raw, "seq": seq, "hlc": Hlc(time.time_ns() // 1_000_000, 0, device).encode()}
        record = JournalRecord(device, seq, entry_from_json(raw, device), claims, None, 1)
        delivery = Delivery("fs._journal", 0, next(self.offsets))
        return self.db.apply([(delivery, record.to_bytes())])

    def close(self) -> None:
        self.db.close()
        self.conn.close()


def rules_toml(rules: dict[str, Any]) -> str:
    lines = [f"token_claims = {json.dumps(rules['token_claims'])}"]
    for b in rules["bucket"]:
        lines += [
            "[[bucket]]",
            f'name = "{b["name"]}"',
            f"parameters = {json.dumps(b['parameters'])}",
        ]
        claims = ", ".join(f'{p} = "{c}"' for p, c in b["claims"].items())
        lines.append(f"claims = {{ {claims} }}")
        for e in b["table"]:
            lines += ["[[bucket.table]]", f'table = "{e["table"]}"']
            if e["match"]:
                lines.append(
                    "match = { " + ", ".join(f'{c} = "{p}"' for c, p in e["match"].items()) + " }"
                )
            filters = [
                "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in f.items()) + " }"
                for f in e["filters"]
            ]
            lines.append(f"filters = [{', '.join(filters)}]")
            for key in ("columns", "exclude"):
                if key in e:
                    lines.append(f"{key} = {json.dumps(e[key])}")
            lines.append(f"writable = {'true' if e['writable'] else 'false'}")
            lines.append(f"claim = {'true' if e['claim'] else 'false'}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def world(pg_dsn: str, tmp_path: Path) -> Any:
    w = World(pg_dsn, tmp_path)
    try:
        yield w
    finally:
        w.close()


# --------------------------------------------------------------------------- the property


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rules=rule_sets(),
    policy=policies,
    initial=st.lists(rows, min_size=2, max_size=4),
    devices=st.lists(device_claims, min_size=1, max_size=3),
    data=st.data(),
)
def test_devices_write_only_within_their_rights_and_see_only_what_is_granted(
    world: World,
    rules: dict[str, Any],
    policy: dict[str, Any],
    initial: list[dict[str, Any]],
    devices: list[dict[str, Any]],
    data: st.DataObject,
) -> None:
    world.reset(rules, policy, initial)
    for step in range(data.draw(st.integers(6, 20), label="steps")):
        action = data.draw(st.sampled_from(["server", "entry", "entry", "widen", "resolve"]))
        if action == "server":
            server_edit(world, data)
            continue
        d = data.draw(st.integers(0, len(devices) - 1), label="device")
        if action == "resolve":  # a device with open conflicts, if there is one
            owners = world.conn.execute(
                "select distinct device_id from fieldsync_applier.conflicts "
                "where status = 'open' order by 1"
            ).fetchall()
            if owners:
                d = int(data.draw(st.sampled_from(owners), label="owner")[0][3:])
        device, claims = f"dev{d}", devices[d]
        before = world.rows()
        what = f"step {step}: {action} of {device} {claims}"
        if action in ("entry", "widen"):
            reachable = {i: shown(reach(rules, claims, r)) for i, r in before.items()}
            reachable = {i: cols for i, cols in reachable.items() if cols}
            widening = widenings(rules, claims, before) if action == "widen" else []
            if widening:  # a device trying to see more of a row by moving it
                i, column, value = data.draw(st.sampled_from(widening), label="widening")
                raw = {"table": TABLE, "op": "update", "key": [i], "old": before[i],
                       "new": {column: value}, "base": None, "prev_seq": None}  # fmt: skip
            else:
                raw = data.draw(entries(before, reachable, moves(rules, claims)), label="entry")
            outcomes = world.entry(device, claims, raw)
        else:
            outcome = resolve(world, device, claims, data)
            outcomes = [outcome] if outcome is not None else []
        after = world.rows()
        for i in sorted(set(before) | set(after)):
            if before.get(i) != after.get(i):
                event(f"{action} changed a row")
                check_change(rules, claims, before.get(i), after.get(i), f"{what}, row {i}")
        for o in outcomes:
            event(f"{action}: {o.kind.value} {o.reason or ''}".strip())
            if "would show this device" in o.message:
                event(f"{action}: refused as a widening")
            actual = after.get(o.key[0]) if o.key else None
            check_shown(rules, claims, o.row, actual, f"{what}: outcome {o.kind.value}")
            if o.conflict and "row" in o.conflict:
                check_shown(rules, claims, o.conflict["row"]["server"], actual, f"{what}: conflict")


def server_edit(world: World, data: st.DataObject) -> None:
    i = data.draw(st.sampled_from(IDS), label="server row")
    if data.draw(st.booleans(), label="server deletes"):
        world.conn.execute("delete from t where id = %s", (i,))
    else:
        world.insert({"id": i, **data.draw(rows, label="server row values")})


def widenings(
    rules: dict[str, Any], claims: dict[str, Any], current: dict[int, dict[str, Any]]
) -> list[tuple[int, str, Any]]:
    """(row, column, value) writes of a column the device sees that would show it more
    columns of the row (what a claim = true rule allows, and nothing else)."""
    found = []
    for i, row in sorted(current.items()):
        now = shown(reach(rules, claims, row))
        for column, value in moves(rules, claims):
            if column in now and row[column] != value:
                after = reach(rules, claims, {**row, column: value})
                if shown(after) - now:
                    found.append((i, column, value))
                    if not shown(after) - now <= shown([e for e in after if e["claim"]]):
                        found.append((i, column, value))  # no claim rule allows it: twice as likely
    return found


def moves(rules: dict[str, Any], claims: dict[str, Any]) -> list[tuple[str, Any]]:
    """(column, value) writes that would put a row into a bucket of the device (its match
    columns set to its claim values, filter columns to the values filters ask for)."""
    found: set[tuple[str, Any]] = set()
    for bucket in rules["bucket"]:
        for entry in bucket["table"]:
            for column, p in entry["match"].items():
                found |= {(column, v) for v in claim_set(claims.get(bucket["claims"][p]))}
            for f in entry["filters"]:
                values = f.get("value")
                for v in values if isinstance(values, list) else [values]:
                    found.add((f["column"], v))
    return sorted(found, key=str)


@st.composite
def entries(
    draw: st.DrawFn,
    current: dict[int, dict[str, Any]],
    reachable: dict[int, set[str]],
    targets: list[tuple[str, Any]],
) -> dict[str, Any]:
    """An entry as an honest device (mostly a row it holds, columns it sees; often moving
    it into another of its buckets) or a hostile one (any row, any column) could send it."""
    honest = bool(reachable) and draw(st.integers(0, 3)) > 0
    i = draw(st.sampled_from(sorted(reachable) if honest else IDS))
    op = draw(st.sampled_from(["update", "update", "update", "delete", "insert"]))
    row = current.get(i) or {"id": i, **draw(rows)}
    base = dict(row)
    if draw(st.booleans()):  # an edit made on an older version (the server changed it since)
        c = draw(st.sampled_from(DATA))
        base[c] = draw(st.sampled_from(VALUES))
    columns = sorted(reachable[i] - {"id"}) if honest and reachable[i] != {"id"} else list(DATA)
    written = draw(st.lists(st.sampled_from(columns), min_size=1, unique=True))
    new = {c: draw(st.sampled_from(VALUES)) for c in written}
    movable = [(c, v) for c, v in targets if c in columns]
    move: bool = draw(st.booleans())
    if movable and move:
        column, value = draw(st.sampled_from(movable))
        new = {column: value}
    raw: dict[str, Any] = {"table": TABLE, "op": op, "key": [i], "base": None, "prev_seq": None}
    if op == "insert":
        raw.update(old=None, new={"id": i, **new})
    elif op == "delete":
        raw.update(old=base, new=None)
    else:
        raw.update(old=base, new=new)
    return raw


def resolve(
    world: World, device: str, claims: dict[str, Any], data: st.DataObject
) -> Outcome | None:
    """The device settles one of its open conflicts (if any), as over the device API."""
    found = world.conn.execute(
        # in an order the script determines (ids are random UUIDs: ordered by them, a replayed
        # example would settle another conflict, which Hypothesis rejects as inconsistent data)
        "select id, kind, held from fieldsync_applier.conflicts where device_id = %s "
        "and status = 'open' order by seq, tbl, row_key, kind",
        (device,),
    ).fetchall()
    if not found:
        return None
    conflict_id, kind, held = data.draw(st.sampled_from(found), label="conflict")
    choice = data.draw(st.sampled_from(["device", "server", "values"]), label="choice")
    values = None
    if choice == "values":
        if kind == "columns":
            values = {c: data.draw(st.sampled_from(VALUES)) for c in held}
        else:
            values = data.draw(rows, label="resolution row")
    before = world.rows()
    try:
        return world.db.resolve(conflict_id, choice, values, by=f"device:{device}", claims=claims)
    except ResolveError as exc:
        event(f"resolve refused: {getattr(exc, 'code', 'invalid')}")
        assert world.rows() == before, "a refused resolution wrote something"
        return None
