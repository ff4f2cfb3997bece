"""Resolving a kept conflict: the resolution is a new edit of the conflict's row.

A conflict kept by an ``ask`` policy (``fieldsync_applier.conflicts``, both versions)
is settled by :func:`resolve_conflict` with a *choice*: ``server`` (keep the server's
current values), ``device`` (write the device's values) or ``values`` (write the given
values, wire form, checked against the column types).  In ONE transaction: the
conflict's row is locked (``FOR UPDATE``), the transaction's origin message names
``resolve:<conflict id>``, the row is written (:func:`resolution_writes` says what:
an update of the differing columns, an insert when the row is gone, a delete), the
conflict is marked resolved with the ``resolved`` outcome, and the outcome goes to the
outbox.  Resolving a resolved conflict returns its first resolution and changes nothing.

A device's resolution (``claims`` given: through the device API) is judged by its write
rules against the row as it is now, like its journal entries
(:func:`relay.upstream.write_rules.check_write`); a refusal raises
:class:`~relay.errors.ResolveForbidden` and writes nothing.  An operator's (no claims)
is trusted.

Runs on the caller's thread and the connection of its
:class:`~relay.upstream.applier_run.ApplyContext` (not thread-safe: callers serialize).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from core.hlc import Hlc
from core.journal_outcomes import Outcome, OutcomeKind
from core.row_wire import row_key_text
from core.values import coerce_value, same_value
from relay.errors import ConflictNotFound, ResolveError, ResolveForbidden
from relay.upstream.applier_entries import visible
from relay.upstream.applier_failures import Failure, classify_failure, pg_message
from relay.upstream.applier_run import ApplyContext, RunState
from relay.upstream.applier_store import SCHEMA, emit_origin, put_outbox
from relay.upstream.applier_tables import TableMeta
from relay.upstream.conflict_policies import TablePolicy
from relay.upstream.write_rules import check_write

__all__ = ["resolution_writes", "resolve_conflict"]


def resolve_conflict(
    db: ApplyContext,
    conflict_id: str,
    choice: str,
    values: Mapping[str, Any] | None = None,
    by: str = "",
    *,
    claims: Mapping[str, Any] | None = None,
) -> Outcome:
    """Settle a kept conflict: ``server`` (keep the server's current values),
    ``device`` (write the device's values), or ``values`` (write ``values``, wire
    form).  The write is a new edit; resolving a resolved conflict returns its first
    resolution and changes nothing.

    ``claims``: the resolution comes from a device holding a token with these claims
    (the device API), and is judged like a journal entry of it, against the row as it
    is now (:func:`relay.upstream.write_rules.check_write`: the rows and columns it may write,
    before and after, and no widening); a refusal raises :class:`ResolveForbidden`
    and writes nothing.  None: an operator resolves, trusted (nothing is checked)."""
    if choice not in ("server", "device", "values"):
        raise ResolveError(f"choice must be server, device or values, not {choice!r}")
    if (choice == "values") != (values is not None):
        raise ResolveError("give values exactly when choice is 'values'")
    conn = db.connection()
    try:
        with conn.transaction(), conn.cursor() as cur:
            return _resolve_in(db, cur, conflict_id, choice, values, by, claims)
    except psycopg.Error as exc:
        if classify_failure(exc) is not Failure.ENTRY:
            raise
        raise ResolveError(
            f"conflict {conflict_id}: PostgreSQL refused the resolution: {pg_message(exc)}"
        ) from exc


def _resolve_in(
    db: ApplyContext,
    cur: psycopg.Cursor[Any],
    conflict_id: str,
    choice: str,
    values: Mapping[str, Any] | None,
    by: str,
    claims: Mapping[str, Any] | None,
) -> Outcome:
    """:func:`resolve_conflict` inside its transaction."""
    found = cur.execute(
        f"select device_id, seq, tbl, key, kind, held, claims, status, resolution "
        f"from {SCHEMA}.conflicts where id = %s for update",
        (conflict_id,),
    ).fetchone()
    if found is None:
        raise ConflictNotFound(f"no kept conflict has id {conflict_id!r}")
    device, seq, table, key, kind, held, stored_claims, status, resolution = found
    if status == "resolved":
        return Outcome.from_json(resolution["outcome"])
    meta = db.tables.get(table)
    if meta is None:
        raise ResolveError(f"conflict {conflict_id}: table {table} is not synced any more")
    emit_origin(cur, f"resolve:{conflict_id}")
    state = RunState(db, cur, lock_rows=True)
    key = tuple(key)
    current = state.row(meta, key)
    writes, decisions = resolution_writes(meta, kind, held, choice, values, current.row, key)
    policy = db.policies.table(table)
    hlc = db.clock.now()
    after = write_resolution(state, meta, key, current.row, writes, policy, hlc)
    scope = db.scope(stored_claims if claims is None else claims)
    if claims is not None and writes:
        written = list(writes.get("update") or writes.get("insert") or ())
        problem = check_write(scope, table, current.row, after, written)
        if problem is not None:
            raise ResolveForbidden(
                problem.reason.value,
                f"conflict {conflict_id}: the resolution is refused as the "
                f"device's own write would be: {problem.message}",
            )
    outcome = Outcome(
        device_id=device,
        seq=int(seq),
        kind=OutcomeKind.RESOLVED,
        table=table,
        key=key,
        message=f"conflict {conflict_id} resolved: {choice}"
        + ("" if current.row is not None or writes.get("insert") else " (the row is gone)"),
        row=visible(scope, table, after),
        columns=decisions,
        conflict={"id": conflict_id, "choice": choice, "by": by},
        hlc=hlc.encode(),
        at_us=state.now_ms * 1000,
    )
    state.flush()
    if writes:
        state.wrote.add(int(seq))
        outcome = state.bound_written([outcome])[0]
    cur.execute(
        f"update {SCHEMA}.conflicts set status = 'resolved', resolved_at = now(), "
        "resolved_by = %s, resolution = %s where id = %s",
        (
            by,
            Jsonb({"choice": choice, "values": values, "outcome": outcome.to_json()}),
            conflict_id,
        ),
    )
    put_outbox(cur, device, [outcome])
    return outcome


def _coerced(meta: TableMeta, column: str, value: Any) -> Any:
    """A resolution's value in normal wire form; ResolveError names what is wrong."""
    ct = meta.types.get(column)
    if ct is None:
        raise ResolveError(f"{meta.name}: the resolution names no column {column!r:.80}")
    try:
        return coerce_value(ct, value)
    except ValueError as exc:
        raise ResolveError(
            f"{meta.name}: invalid value in the resolution: {column} ({ct.describe()}): {exc}"
        ) from exc


def resolution_writes(
    meta: TableMeta,
    kind: str,
    held: Mapping[str, Any],
    choice: str,
    values: Mapping[str, Any] | None,
    current: Mapping[str, Any] | None,
    key: Sequence[Any],
) -> tuple[dict[str, Any], dict[str, str]]:
    """What a resolution writes: ``{"update": {...}}``, ``{"insert": row}``,
    ``{"delete": True}`` or ``{}``; and the per-column decisions."""
    if choice == "server":
        cols = held.keys() if kind == "columns" else (held.get("device") or {}).keys()
        return {}, {c: "server" for c in cols}
    if kind == "columns":
        chosen = (
            {c: h["device"] for c, h in held.items()} if choice == "device" else dict(values or {})
        )
        extra = sorted(set(chosen) - set(held))
        if extra:
            raise ResolveError(f"values for column(s) not in conflict: {', '.join(extra)}")
        decisions = {c: choice for c in chosen}
        if current is None:
            return {}, decisions
    else:
        chosen_row = held.get("device") if choice == "device" else dict(values or {})
        if chosen_row is None:
            return ({"delete": True} if current is not None else {}), {}
        fixed = dict(zip(meta.key, key, strict=True))
        moved = sorted(
            c
            for c in meta.key
            if c in chosen_row
            and not same_value(meta.types[c], _coerced(meta, c, chosen_row[c]), fixed[c])
        )
        if moved:
            raise ResolveError(
                f"{meta.name}: the values change key column(s) {', '.join(moved)}; a "
                "resolution keeps the conflict's row"
            )
        chosen = {**fixed, **chosen_row, **fixed}
        decisions = {c: choice for c in chosen if c not in meta.key}
    normal = {c: _coerced(meta, c, v) for c, v in chosen.items()}
    if current is None:
        return {"insert": normal}, decisions
    sets = {c: v for c, v in normal.items() if not same_value(meta.types[c], current.get(c), v)}
    return ({"update": sets} if sets else {}), decisions


def write_resolution(
    state: RunState,
    meta: TableMeta,
    key: Sequence[Any],
    current: Mapping[str, Any] | None,
    writes: Mapping[str, Any],
    policy: TablePolicy,
    hlc: Hlc,
) -> dict[str, Any] | None:
    """Write what :func:`resolution_writes` decided; the row afterwards (None: gone)."""
    after = dict(current) if current is not None else None
    if "update" in writes:
        sets = writes["update"]
        columns = sorted(sets)
        state.cur.execute(
            meta.update_sql(columns),
            [meta.pg_text(c, sets[c]) for c in columns] + meta.key_params(key),
        )
        after = {**(after or {}), **sets}
    elif "insert" in writes:
        row = writes["insert"]
        columns = list(row)
        got = state.raw.execute(
            meta.insert_sql(columns), [meta.pg_text(c, row[c]) for c in columns]
        ).fetchone()
        assert got is not None
        after = meta.read(got[1:])
    elif writes.get("delete"):
        state.cur.execute(meta.delete_sql(), meta.key_params(key))
        after = None
    if writes and policy.timed:
        state.clock_writes[(meta.name, row_key_text(list(key)))] = (
            meta.name,
            row_key_text(list(key)),
            hlc.encode(),
            state.xid(),
            after is None,
        )
    return after
