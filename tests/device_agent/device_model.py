"""An in-memory model of the server side for device-agent tests (pure, no I/O): the
system of record's rows, the bucket engine's per-bucket op logs (op ids, positions,
compaction, checkpoints with core.row_wire.row_checksum), the journal intake and
the upstream applier (counter and lww merges, rejections, kept conflicts and their
resolution), and the outcome feed; plus :class:`ModelClient`, a RelayClient answering
from it in process, which can be told to fail at a chosen step of a sync.

Publication lags are explicit: ops become visible to devices up to ``ops_published``
(as cdc and the engine lag behind PostgreSQL) and outcomes up to ``outcomes_published``
(as the outbox and the feed lag behind the applier), so a test can deliver an outcome
before or after the server version that includes its edit.

Positions: the op with id ``n`` carries ``[lsn(n), 0]`` (commit LSNs increase with op
ids).  Every committed change that alters a row is one change event: a PUT into every
bucket the row is in afterwards (also when that bucket's projection did not change, as
the relay does) and a REMOVE from every bucket it left; a write changing nothing is no
event.  An outcome of an entry whose write changed the row carries ``visible_after``
(the applier's bound, relay/upstream/applier.py): ``lsn`` of the first op of that write, so that
every op of it and after it is at or above the bound, every op before it below.

Schema (small, not the demo's):

- ``public.jobs`` (id int key, crew, state, note text ``lww``, qty int ``counter``,
  secret excluded by the rules): rule ``crew`` puts a job into ``crew["<crew>"]`` unless
  its state is ``done``;
- ``public.stock`` ((region, part) text key, qty ``counter``): rule ``region`` puts a row
  into ``region["<region>"]`` (every column), rule ``parts`` into the global ``parts[]``
  (key columns only): a table two rules serve with different projections.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from core.row_wire import CHECKSUM_MODULUS, row_checksum, row_key_text
from device_agent.client import RelayClient, UploadResult
from device_agent.errors import RelayUnreachable

JOBS = "public.jobs"
STOCK = "public.stock"
JOB_COLUMNS = ("id", "crew", "state", "note", "qty")  # what devices see (secret excluded)
STOCK_COLUMNS = ("region", "part", "qty")
KEYS = {JOBS: ("id",), STOCK: ("region", "part")}
COLUMNS = {JOBS: JOB_COLUMNS, STOCK: STOCK_COLUMNS}
COUNTERS = {JOBS: ("qty",), STOCK: ("qty",)}
LOCAL = {JOBS: "jobs", STOCK: "stock"}

Key = tuple[Any, ...]
Row = dict[str, Any]


def placements(table: str, row: Mapping[str, Any] | None) -> dict[str, Row]:
    """The buckets a server row is in, with the projection each sends."""
    if row is None:
        return {}
    if table == JOBS:
        if row["state"] == "done":
            return {}
        return {f'crew["{row["crew"]}"]': {c: row.get(c) for c in JOB_COLUMNS}}
    return {
        f'region["{row["region"]}"]': {c: row.get(c) for c in STOCK_COLUMNS},
        "parts[]": {"region": row["region"], "part": row["part"]},
    }


@dataclasses.dataclass
class Op:
    op_id: int
    bucket: str
    table: str
    key: Key
    data: Row | None  # None: REMOVE

    def wire(self) -> dict[str, Any]:
        return {
            "op_id": self.op_id,
            "bucket": self.bucket,
            "op": "PUT" if self.data is not None else "REMOVE",
            "table": self.table,
            "key": list(self.key),
            "data": self.data,
            "position": [ServerModel.lsn(self.op_id), 0],
        }


@dataclasses.dataclass
class Conflict:
    id: int
    seq: int
    table: str
    key: Key
    device: Row  # the device's values of the conflicting columns
    open: bool = True


class ServerModel:
    """The server side of one device (see the module docstring)."""

    def __init__(self, device_buckets: Sequence[str], device_id: str = "tab-9") -> None:
        self.device_id = device_id
        self.device_buckets = tuple(sorted(device_buckets))
        self.rows: dict[tuple[str, Key], Row] = {}
        self.op_id = 0
        self.log: list[Op] = []
        self.ops_published = 0
        # journal: intake (first version kept), the applier's queue, outcomes
        self.intake: dict[int, dict[str, Any]] = {}
        self.intake_rejected: dict[int, tuple[str, str]] = {}
        self.reject_next = 0
        self.queue: list[int] = []
        self.outcomes: list[dict[str, Any]] = []
        self.outcomes_published = 0
        self.conflicts: dict[int, Conflict] = {}

    # ---- rows and ops

    @staticmethod
    def lsn(op_id: int) -> int:
        """The commit_lsn of the change event behind op ``op_id``."""
        return 1000 + op_id

    def write(self, table: str, key: Key, row: Row | None) -> int | None:
        """A committed server change (office SQL or the applier); returns its bound (the
        ``visible_after`` an applier outcome carries), None when it changed nothing."""
        current = self.rows.get((table, key))
        if row == current:
            return None
        bound = self.lsn(self.op_id + 1)
        before = placements(table, current)
        if row is None:
            self.rows.pop((table, key), None)
        else:
            self.rows[(table, key)] = dict(row)
        after = placements(table, row)
        for bucket in sorted(set(before) | set(after)):
            if bucket in after:
                self.emit(bucket, table, key, dict(after[bucket]))
            else:
                self.emit(bucket, table, key, None)
        return bound

    def emit(self, bucket: str, table: str, key: Key, data: Row | None) -> None:
        self.op_id += 1
        self.log.append(Op(self.op_id, bucket, table, key, data))

    def publish_ops(self) -> None:
        self.ops_published = self.op_id

    def latest(self, bucket: str, upto: int) -> dict[tuple[str, Key], Op]:
        """The latest op of each row of ``bucket`` with ``op_id <= upto`` (compaction)."""
        out: dict[tuple[str, Key], Op] = {}
        for op in self.log:
            if op.op_id > upto:
                break
            if op.bucket == bucket:
                out[(op.table, op.key)] = op
        return out

    def checkpoint(self, bucket: str, upto: int) -> dict[str, Any]:
        ops = self.latest(bucket, upto)
        held = [op for op in ops.values() if op.data is not None]
        total = sum(row_checksum(o.table, row_key_text(list(o.key)), o.data) for o in held)
        return {
            "last_op_id": max(
                (o.op_id for o in self.log if o.bucket == bucket and o.op_id <= upto), default=0
            ),
            "count": len(held),
            "checksum": str(total % CHECKSUM_MODULUS),
            "complete": True,
        }

    def received(self, table: str, key: Key, cursor: int) -> Row | None:
        """What a device that applied every op up to ``cursor`` holds of a row (its buckets'
        versions merged, latest op last), in the local table's columns."""
        versions = []
        for bucket in self.device_buckets:
            op = self.latest(bucket, cursor).get((table, key))
            if op is not None and op.data is not None:
                versions.append(op)
        if not versions:
            return None
        merged: Row = {}
        for op in sorted(versions, key=lambda o: o.op_id):
            merged.update(op.data or {})
        return {c: merged.get(c) for c in COLUMNS[table]}

    def projection(self, table: str) -> dict[Key, Row]:
        """The server's rows a device with ``device_buckets`` should show (nothing open)."""
        out = {}
        for (t, key), row in self.rows.items():
            if t != table:
                continue
            merged: Row = {}
            for bucket, data in placements(t, row).items():
                if bucket in self.device_buckets:
                    merged.update(data)
            if merged:
                out[key] = {c: merged.get(c) for c in COLUMNS[table]}
        return out

    def keys(self, table: str) -> set[Key]:
        return {op.key for op in self.log if op.table == table} | {
            k for (t, k) in self.rows if t == table
        }

    # ---- the journal

    def upload(self, entries: Sequence[Mapping[str, Any]]) -> UploadResult:
        result = UploadResult()
        for e in entries:
            seq = int(e["seq"])
            if seq not in self.intake:
                self.intake[seq] = dict(e)
                if self.reject_next:
                    self.reject_next -= 1
                    self.intake_rejected[seq] = ("wrong_type", f"entry {seq}: refused")
                self.queue.append(seq)
            if seq in self.intake_rejected:
                result.rejected[seq] = self.intake_rejected[seq]
            else:
                result.accepted.append(seq)
        return result

    def allowed(self, table: str, row: Mapping[str, Any] | None) -> bool:
        """Write permission: the row is in a device bucket whose projection has every
        column (``parts[]`` sends only the key: a stock row elsewhere is read-only)."""
        if row is None:
            return False
        full = {b for b, d in placements(table, row).items() if set(d) >= set(COLUMNS[table])}
        return bool(full & set(self.device_buckets))

    def outcome(self, seq: int, kind: str, bound: int | None = None, **extra: Any) -> None:
        e = self.intake[seq]
        if bound is not None:
            extra["visible_after"] = bound
        self.outcomes.append(
            {
                "v": 1,
                "device_id": self.device_id,
                "seq": seq,
                "outcome": kind,
                "table": e["table"],
                "key": e["key"],
                "reason": extra.pop("reason", None),
                "message": extra.pop("message", ""),
                **extra,
            }
        )

    def process(self, decision: str = "device") -> int | None:
        """Apply the oldest queued entry as the applier would.  ``decision`` settles a
        column both sides changed (``device``: lww with the device later, ``server``, or
        ``ask``: a kept conflict); ``reject`` refuses the entry (e.g. a db_error)."""
        if not self.queue:
            return None
        seq = self.queue.pop(0)
        e = self.intake[seq]
        table, key, op = e["table"], tuple(e["key"]), e["op"]
        cur = self.rows.get((table, key))
        if seq in self.intake_rejected:
            reason, message = self.intake_rejected[seq]
            self.outcome(seq, "rejected", reason=reason, message=message)
        elif decision == "reject":
            self.outcome(seq, "rejected", reason="db_error", message="refused by a trigger")
        elif op == "delete":
            if cur is None:
                self.outcome(seq, "applied", message="already deleted")
            elif not self.allowed(table, cur):
                self.outcome(seq, "rejected", reason="forbidden_row", message="not yours")
            else:
                self.outcome(seq, "applied", self.write(table, key, None))
        elif op == "insert":
            new = dict(e["new"])
            if cur is not None:
                row = dict(cur)
                for c, v in new.items():
                    row[c] = (cur.get(c) or 0) + (v or 0) if c in COUNTERS[table] else v
            else:
                row = {c: None for c in COLUMNS[table]}
                if table == JOBS:
                    row["secret"] = "s"
                row.update(new)
            if not self.allowed(table, row):
                self.outcome(seq, "rejected", reason="forbidden_move", message="not yours")
            else:
                bound = self.write(table, key, row)
                self.outcome(seq, "merged" if cur is not None else "applied", bound, row=row)
        else:
            self.apply_update(seq, e, table, key, cur, decision)
        return seq

    def apply_update(
        self, seq: int, e: Mapping[str, Any], table: str, key: Key, cur: Row | None, decision: str
    ) -> None:
        if cur is None:
            self.outcome(seq, "merged", message="the delete stands", row=None)
            return
        if not self.allowed(table, cur):
            self.outcome(seq, "rejected", reason="forbidden_row", message="not yours")
            return
        old, row = e["old"], dict(cur)
        columns: dict[str, str] = {}
        asked: dict[str, dict[str, Any]] = {}
        for c, v in e["new"].items():
            base, server = old.get(c), cur.get(c)
            if c in COUNTERS[table]:
                row[c] = (server or 0) + (v or 0) - (base or 0)
                columns[c] = "combined"
            elif server == base or server == v:
                row[c] = v
            elif decision == "ask":
                asked[c] = {"base": base, "server": server, "device": v}
            elif decision == "server":
                columns[c] = "server"
            else:
                row[c] = v
        if not self.allowed(table, row):
            self.outcome(seq, "rejected", reason="forbidden_move", message="leaves your buckets")
            return
        bound = self.write(table, key, row)  # a kept conflict may write the other columns
        if asked:
            cid = len(self.conflicts) + 1
            self.conflicts[cid] = Conflict(
                cid, seq, table, key, {c: a["device"] for c, a in asked.items()}
            )
            self.outcome(seq, "conflict", bound, conflict={"id": cid, "columns": asked}, row=row)
        else:
            self.outcome(seq, "merged" if columns else "applied", bound, columns=columns, row=row)

    def resolve(self, choice: str) -> int | None:
        """Resolve the oldest open kept conflict (``device`` or ``server`` values)."""
        c = next((c for c in self.conflicts.values() if c.open), None)
        if c is None:
            return None
        c.open = False
        cur = self.rows.get((c.table, c.key))
        bound = None
        if choice == "device" and cur is not None:
            bound = self.write(c.table, c.key, {**cur, **c.device})
        self.outcome(
            c.seq, "resolved", bound, conflict={"id": c.id, "choice": choice, "by": "dispatcher"}
        )
        return c.id

    def publish_outcomes(self, n: int | None = None) -> None:
        total = len(self.outcomes)
        self.outcomes_published = total if n is None else min(total, self.outcomes_published + n)


class Killed(RelayUnreachable):
    """The model client failing at a chosen step (a cut connection, a killed process)."""


class ModelClient(RelayClient):
    """A RelayClient answering from a :class:`ServerModel` in process.  ``kill`` names a
    step at which the next call fails: ``upload_answer`` (the server took the upload,
    the answer is lost), ``schema``, ``changes`` (the first changes request), or
    ``second_page`` (after one page was received)."""

    def __init__(self, model: ServerModel, token: str, schema: Mapping[str, Any]) -> None:
        super().__init__("http://model.invalid", token)
        self.model = model
        self._schema = dict(schema)
        self.kill: str | None = None
        self.pages = 0

    def _maybe_kill(self, step: str) -> None:
        if self.kill == step:
            self.kill = None
            raise Killed(f"killed at {step}")

    def schema(self) -> dict[str, Any]:
        self._maybe_kill("schema")
        return dict(self._schema)

    def changes(
        self, cursor: str | None, limit: int | None = None, wait_s: float = 0.0
    ) -> dict[str, Any]:
        self.pages += 1
        self._maybe_kill("changes")
        if self.pages > 1:
            self._maybe_kill("second_page")
        m = self.model
        upto = m.ops_published
        since = int(cursor[1:]) if cursor else 0
        ops = sorted(
            (op for b in m.device_buckets for op in m.latest(b, upto).values() if op.op_id > since),
            key=lambda o: o.op_id,
        )
        page = ops[: limit or len(ops)]
        more = len(page) < len(ops)
        cp: dict[str, Any] = {"complete": False, "buckets": {}}
        if not more:
            cp = {
                "complete": True,
                "buckets": {b: m.checkpoint(b, upto) for b in m.device_buckets},
            }
        return {
            "type": "changes",
            "ops": [op.wire() for op in page],
            "cursor": f"c{page[-1].op_id if more else upto}",
            "checkpoint": cp,
            "resync": [],
            "dropped": [],
            "has_more": more,
        }

    def upload_journal(self, entries: Sequence[Mapping[str, Any]]) -> UploadResult:
        result = self.model.upload(entries)
        self._maybe_kill("upload_answer")
        return result

    def outcomes(self, after: str | None) -> tuple[list[dict[str, Any]], str | None]:
        start = int(after or 0)
        end = self.model.outcomes_published
        return [dict(o) for o in self.model.outcomes[start:end]], str(end)

    def checkpoint(self) -> dict[str, Any]:
        m = self.model
        return {"buckets": {b: m.checkpoint(b, m.ops_published) for b in m.device_buckets}}


def schema_body(buckets: Sequence[str]) -> dict[str, Any]:
    return {
        "tables": [
            {
                "name": JOBS,
                "columns": list(JOB_COLUMNS),
                "key": ["id"],
                "rules": ["crew"],
                "counters": ["qty"],
            },
            {
                "name": STOCK,
                "columns": list(STOCK_COLUMNS),
                "key": ["region", "part"],
                "rules": ["parts", "region"],
                "counters": ["qty"],
            },
        ],
        "buckets": sorted(buckets),
    }


def token_for(device_id: str) -> str:
    import base64
    import json

    body = base64.urlsafe_b64encode(json.dumps({"sub": device_id}).encode()).decode()
    return "x." + body.rstrip("=") + ".y"
