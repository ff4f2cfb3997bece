"""Driver of tests/device_agent/test_device_apply_compiled_parity.py: seeded changes
messages through the device's apply, the database printed after each download.

Run as ``python -m tests.device_agent.apply_parity_driver SEED`` (with the compiled
modules, or with PYTHONPATH on a copy of the pure sources).  A seeded random generator
plays rounds of relay changes (puts, re-puts, removes, rows moving between buckets, rows
of a table several rules serve, compound and text keys, JSON and boolean values) on the
bucket-log model of tests/device_agent/test_device_apply.py, with app edits in between
(rows then take the general path) and ops named by another key than the table's (bucket
bookkeeping only; one left held refuses the download).  Each round's messages are applied
in pages of a random size, in bulk or flagged mode.  Output: the modules that were
compiled, then per round the apply's result (or the error text) and every table of the
database, rows sorted.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from device_agent.apply import apply_messages
from device_agent.errors import DeviceAgentError
from devtools.compiled import loaded_compiled
from tests.device_agent.test_device_apply import WO, FakeServer, app_conn
from tests.device_agent.test_device_apply_props import TABLES, fresh_db, play

_NOW = time.time()
_CLOCKS = (
    (_NOW - 86_400, _NOW + 86_400),  # seconds since 1970
    ((_NOW - 86_400) * 1000, (_NOW + 86_400) * 1000),  # milliseconds (HLC physical time)
    (2440587.5 + _NOW / 86_400 - 1, 2440587.5 + _NOW / 86_400 + 1),  # julian day
)


def masked(value: Any) -> Any:
    """The value, or "T" for a wall-clock reading of today (a number or its text)."""
    try:
        number = float(value) if isinstance(value, int | float | str) else None
    except ValueError:
        number = None
    if number is not None and any(low <= number <= high for low, high in _CLOCKS):
        return "T"
    return value


def dump(conn: sqlite3.Connection) -> dict[str, list[str]]:
    """Every table's rows, each as JSON text, sorted (the order of rows is not compared),
    wall-clock readings masked."""
    names = [
        r[0]
        for r in conn.execute("select name from sqlite_master where type = 'table' order by name")
    ]
    out = {}
    for name in names:
        rows = conn.execute(f'select * from "{name}"').fetchall()
        out[name] = sorted(json.dumps([masked(v) for v in r], default=repr) for r in rows)
    return out


def app_edit(conn: sqlite3.Connection, rng: random.Random) -> str:
    """An app's update or delete of a work order (journaled; the row is then held)."""
    app = app_conn(conn)
    try:
        oid = rng.randint(0, 6)
        if rng.random() < 0.7:
            app.execute('update "work_orders" set notes = ? where id = ?', (f"n{oid}", oid))
            return f"update {oid}"
        app.execute('delete from "work_orders" where id = ?', (oid,))
        return f"delete {oid}"
    finally:
        app.close()


def foreign_ops(server: FakeServer, rng: random.Random, keep: bool) -> None:
    """A PUT named by other key values than its data's key (as after a change of the
    table's key), and its REMOVE after it unless ``keep``."""
    n = rng.randint(100, 103)
    data = {"id": n, "site": "plant-1", "technician": "t1", "status": "x", "done": False}
    server.put('tech_orders["t1"]', WO, [f"k-{n}"], data)
    if not keep:
        server.remove('tech_orders["t1"]', WO, [f"k-{n}"])


def run(seed: int) -> Iterator[str]:
    yield json.dumps({"compiled": sorted(loaded_compiled())})
    rng = random.Random(seed)
    tables = sorted(TABLES)
    with tempfile.TemporaryDirectory() as directory:
        conn = fresh_db(directory)
        try:
            server = FakeServer()
            current: dict[tuple[str, str], dict[str, Any]] = {}
            since = 0
            rounds = 12
            for round_no in range(rounds):
                for _ in range(rng.randint(0, 40)):
                    op = (
                        rng.choice(["put", "put", "remove", "move"]),
                        rng.choice(tables),
                        rng.randint(0, 6),
                        rng.randint(0, 2),
                        rng.randint(0, 2),
                        rng.randint(0, 99),
                    )
                    play(server, current, op)
                last = round_no == rounds - 1
                if last or rng.random() < 0.3:
                    foreign_ops(server, rng, keep=last)
                edit = app_edit(conn, rng) if rng.random() < 0.3 else None
                msgs = server.messages(since, rng.randint(1, 15))
                total = sum(len(m["ops"]) for m in msgs)
                try:
                    result = apply_messages(
                        conn,
                        msgs,
                        f"c{server.op_id}",
                        bulk_ops=rng.choice([1, 10_000]),
                        total_ops=total,
                    )
                    outcome: Any = dataclasses.asdict(result) | {"seconds": None}
                except DeviceAgentError as exc:
                    outcome = {"error": type(exc).__name__, "text": str(exc)}
                since = server.op_id
                yield json.dumps(
                    {"round": round_no, "edit": edit, "apply": outcome, "db": dump(conn)},
                    default=repr,
                )
        finally:
            conn.close()


if __name__ == "__main__":
    for line in run(int(sys.argv[1])):
        print(line)
