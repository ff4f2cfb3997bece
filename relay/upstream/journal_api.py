"""Device edits over the device API: journal upload, outcomes, kept conflicts.

Endpoints (mounted by :func:`relay.downstream.api.create_app` when given a :class:`JournalApi`;
same bearer authentication and per-device rate limit as the rest of ``/v1``; the device
is always the token's ``sub``, no parameter can name another one)::

    POST /v1/journal                         upload entries; per-entry accepted / rejected
    GET  /v1/outcomes?after=&limit=&wait=    the device's entry outcomes after a position
    GET  /v1/conflicts                       the device's kept (ask) conflicts, open ones
    POST /v1/conflicts/{id}/resolve          settle one: mine / theirs / given values

docs/relay.md ("Journal upload, outcomes, conflicts") is the reference for clients;
docs/journal.md describes entries, validation, the ordering rule and outcomes.

Data path and choices:

- **Upload.**  The body is read with :func:`relay.upstream.validation.parse_upload` (400
  ``bad_upload`` / 413 ``batch_too_large`` for the upload as a whole).  Entries whose
  ``(device, seq)`` has an *intake record* (:mod:`relay.upstream.journal_store`) are
  answered from it, ``duplicate: true``, and not sent again.  The others are judged
  (:func:`relay.upstream.intake.judge_upload`: the ordering rule, then
  :func:`relay.upstream.validation.validate_entry` against the token's write scope), then
  *every* one of them, rejected ones included, is produced to ``{prefix}._journal``
  (:class:`relay.upstream.journal_kafka.JournalProducer`) and the relay waits for Kafka's
  acknowledgements.  Only then are the intake records written and the answer given.
  Kafka failing → 503 and no intake record: nothing was acknowledged, the device uploads
  again.  The intake record failing after Kafka acknowledged → 503 as well, same retry.
  Each entry recorded counts in ``fieldsync_relay_journal_entries_total{status}``.
- **Outcomes.**  :class:`relay.upstream.outcome_feed.OutcomeFeed` copies
  ``{prefix}._outcomes`` into the outcome store; ``GET /v1/outcomes?after=P`` returns
  the device's outcomes with a position above ``P`` (a later outcome of an old seq,
  ``conflict`` → ``resolved``, gets a new position, so a device never misses it),
  long-polling on the store's wake-ups.
- **Conflicts.**  Listed from the outcome store (the open ones are those whose latest
  outcome is ``conflict``; rows already cut to what the device may see); resolved through
  :class:`relay.upstream.conflict_desk.ConflictDesk` (the device's own conflicts only,
  judged by its write rules).  The ``resolved`` outcome is put into the outcome store at
  once (and comes again through ``_outcomes``, which changes nothing).

Concurrency model: the endpoints run on the API's event loop; every database call runs in
a worker thread (``asyncio.to_thread``), Kafka sends in a small executor of their own and
their acknowledgements are awaited without holding a thread, so a Kafka outage cannot
starve the store reads of ``/v1/changes``.  The journal store is thread-safe (a pool of
connections); the conflict desk serializes its one captured-database connection with a
lock; the outcome feed runs in a thread of its own.  (No ``from __future__ import
annotations``: FastAPI reads the endpoint annotations at runtime.)
"""

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Final, Literal

import orjson
from fastapi import APIRouter, Body, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, Field

from core.journal_format import MAX_BIGINT, JournalEntry, JournalRecord
from core.values import ColumnType
from relay.api_errors import ApiError, Unavailable
from relay.auth import DeviceIdentity
from relay.downstream.rules import Rules
from relay.errors import (
    ConflictNotFound,
    JournalStoreError,
    ResolveError,
    ResolveForbidden,
    UploadError,
)
from relay.metrics import JOURNAL_ENTRIES
from relay.settings import RelaySettings
from relay.upstream.applier_db import ApplierDb
from relay.upstream.conflict_desk import ConflictDesk
from relay.upstream.intake import IntakeDecision, JournalApiConfig, judge_upload
from relay.upstream.journal_kafka import JournalProducer, SchemaTypes, TypesSource
from relay.upstream.journal_store import JournalStore, OutcomePage
from relay.upstream.outcome_feed import OutcomeFeed
from relay.upstream.validation import (
    JournalLimits,
    RejectedUpload,
    key_columns_behind,
    parse_upload,
)
from relay.upstream.write_rules import WriteScope

__all__ = [
    "MAX_CONFLICT_ID",
    "JournalApi",
]

log = logging.getLogger("relay.upstream.journal_api")

MAX_CONFLICT_ID: Final = 200


# --------------------------------------------------------------------------- the endpoints


class UploadResultModel(BaseModel):
    seq: int
    status: Literal["accepted", "rejected"] = Field(
        description="accepted: Kafka holds the entry and the applier will decide its outcome"
    )
    reason: str | None = Field(description="rejected: stable code (docs/journal.md)")
    message: str = Field(description="rejected: what is wrong, naming the entry and column")
    duplicate: bool = Field(description="answered from the intake record of an earlier upload")


class UploadAnswer(BaseModel):
    results: list[UploadResultModel] = Field(description="one per uploaded entry, in order")


class OutcomesMessage(BaseModel):
    outcomes: list[dict[str, Any]] = Field(
        description="Outcome objects (docs/journal.md), oldest position first; keep the "
        "latest per seq"
    )
    cursor: int = Field(description="send it back as ?after= to continue")
    has_more: bool


class ConflictsMessage(BaseModel):
    conflicts: list[dict[str, Any]] = Field(
        description="the latest outcome (kind conflict) of each open conflict; "
        "conflict.id is what to resolve"
    )
    has_more: bool


class ResolveRequest(BaseModel):
    choice: Literal["mine", "theirs", "values"] = Field(
        description="mine: the device's values; theirs: the server's; values: the given ones"
    )
    values: dict[str, Any] | None = Field(
        default=None, description="with choice 'values' only: column → value (wire form)"
    )


class ResolveAnswer(BaseModel):
    outcome: dict[str, Any] = Field(description="the entry's resolved outcome")
    already_resolved: bool = Field(description="it was resolved before; nothing was written")


_CHOICES: Final = {"mine": "device", "theirs": "server", "values": "values"}


_NO_TYPES: Final[Mapping[str, Mapping[str, ColumnType]]] = {}


def _no_types() -> Mapping[str, Mapping[str, ColumnType]]:
    return _NO_TYPES


def _error_docs() -> dict[int | str, dict[str, Any]]:
    from relay.api_errors import ErrorMessage

    return {s: {"model": ErrorMessage} for s in (400, 401, 403, 404, 413, 422, 429, 500, 503)}


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


class JournalApi:
    """The journal endpoints and what they share (see the module docstring).  The caller
    owns the parts; :meth:`close` closes them."""

    def __init__(
        self,
        rules: Rules,
        store: JournalStore,
        producer: JournalProducer,
        config: JournalApiConfig,
        *,
        desk: ConflictDesk | None = None,
        types: TypesSource | None = None,
        feed: OutcomeFeed | None = None,
    ) -> None:
        self.rules = rules
        self.store = store
        self.producer = producer
        self.config = config
        self.desk = desk
        self.feed = feed
        self.types: TypesSource = types or (desk.types if desk is not None else _no_types)
        self._scopes: dict[tuple[frozenset[str], int, int], WriteScope] = {}

    @classmethod
    def from_settings(cls, settings: RelaySettings, rules: Rules) -> "JournalApi":
        """The parts for ``fieldsync relay run``: the store database, Kafka, and the
        captured database (if configured) for conflicts and column types."""
        r, j = settings.relay, settings.journal
        kafka = settings.kafka_client_kwargs()
        config = JournalApiConfig(
            prefix=r.topic_prefix,
            limits=JournalLimits(j.max_upload_entries, j.max_entry_bytes),
            long_poll_s=settings.http.long_poll_s,
            kafka_timeout_s=r.kafka_timeout_s,
            topic_partitions=j.topic_partitions,
        )
        store = JournalStore(r.store_dsn, password=r.store_password)
        store.migrate()
        desk = None
        types: TypesSource | None = None
        captured = settings.captured_dsn()
        if captured is not None:
            desk = ConflictDesk(
                ApplierDb(
                    captured[0],
                    r.rules,
                    j.conflicts,
                    password=captured[1],
                    consumer=j.consumer,
                    max_skew_ms=int(j.max_clock_skew_s * 1000),
                    lock_timeout_ms=j.lock_timeout_ms,
                )
            )
        else:
            types = SchemaTypes(kafka, r.topic_prefix)
        feed = OutcomeFeed(store, kafka, r.topic_prefix, retention_days=j.retention_days)
        return cls(
            rules,
            store,
            JournalProducer(kafka, config),
            config,
            desk=desk,
            types=types,
            feed=feed,
        )

    def use_rules(self, rules: Rules) -> None:
        """Judge uploads by ``rules`` from now on (the relay's table follower calls it when
        a table's definition changed); scopes of the rules before are dropped."""
        self.rules = rules
        self._scopes.clear()

    def close(self) -> None:
        if self.feed is not None:
            self.feed.request_stop()
        self.producer.close()
        if self.desk is not None:
            self.desk.close()
        if isinstance(self.types, SchemaTypes):
            self.types.close()
        self.store.close()

    # ---- upload

    def _scope(self, claims: Mapping[str, Any]) -> WriteScope:
        """The write scope of the buckets ``claims`` grant (shared by devices granted the
        same buckets, remade when the column types or the rules change: the relay's
        table follower swaps ``rules`` when a table's definition changes)."""
        types, rules = self.types(), self.rules
        granted = frozenset(rules.buckets_for_claims(claims))
        key = (granted, id(types), id(rules))
        found = self._scopes.get(key)
        if found is None:
            if len(self._scopes) > 10_000:
                self._scopes.clear()
            found = self._scopes[key] = WriteScope(rules, granted, types)
        return found

    def _judge(
        self,
        who: DeviceIdentity,
        items: Sequence[JournalEntry | RejectedUpload],
        earlier: Mapping[int, IntakeDecision],
    ) -> list[tuple[JournalRecord, IntakeDecision]]:
        scope = self._scope(who.claims)
        now_us = time.time_ns() // 1000
        return judge_upload(items, scope, earlier, who.device_id, dict(who.claims), now_us)

    async def upload(self, who: DeviceIdentity, raw: bytes) -> dict[str, Any]:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "bad_upload", f"the upload is not JSON: {exc}") from exc
        try:
            items = parse_upload(body, who.device_id, self.config.limits)
        except UploadError as exc:
            raise ApiError(exc.status, exc.code, str(exc)) from exc
        wanted = {i.seq for i in items}
        wanted |= {i.prev_seq for i in items if isinstance(i, JournalEntry) and i.prev_seq}
        known = await self._in_store(self.store.intake_lookup, who.device_id, sorted(wanted))
        fresh = [i for i in items if i.seq not in known]
        behind = key_columns_behind(fresh, self.rules)
        if behind is not None:
            raise Unavailable(behind, retry_after_s=5)
        judged = await asyncio.to_thread(self._judge, who, fresh, known) if fresh else []
        await self.producer.send([record for record, _ in judged])
        recorded = await self._in_store(
            self.store.record_intake, who.device_id, [(r.seq, d) for r, d in judged]
        )
        results = []
        for item in items:
            if item.seq in recorded:
                decision, mine = recorded[item.seq]
                results.append(decision.to_json(item.seq, not mine))
                if mine:
                    JOURNAL_ENTRIES.labels(decision.status).inc()
            else:
                results.append(known[item.seq].to_json(item.seq, True))
        return {"results": results}

    async def _in_store(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except JournalStoreError as exc:
            log.warning("journal: %s", exc)
            raise Unavailable("the relay's store cannot be used right now; retry shortly") from exc

    # ---- outcomes and conflicts

    async def outcomes(
        self, who: DeviceIdentity, after: int, limit: int, wait: float
    ) -> dict[str, Any]:
        def read() -> OutcomePage | None:
            page = self.store.read_outcomes(who.device_id, after, limit)
            return page if page.payloads else None

        if wait > 0:
            try:
                page = await self.store.wait_async(who.device_id, read, wait)
            except JournalStoreError as exc:
                log.warning("journal: %s", exc)
                raise Unavailable("the relay's store cannot be read right now; retry") from exc
        else:
            page = await self._in_store(read)
        if page is None:
            page = OutcomePage([], after, False)
        return {
            "outcomes": [orjson.Fragment(p) for p in page.payloads],
            "cursor": page.cursor,
            "has_more": page.has_more,
        }

    async def conflicts(self, who: DeviceIdentity, limit: int) -> dict[str, Any]:
        payloads, more = await self._in_store(self.store.open_conflicts, who.device_id, limit)
        return {"conflicts": [orjson.Fragment(p) for p in payloads], "has_more": more}

    async def resolve(
        self, who: DeviceIdentity, conflict_id: str, request: ResolveRequest
    ) -> dict[str, Any]:
        if self.desk is None:
            raise Unavailable(
                "this relay has no access to the captured database (set journal.dsn or "
                "relay.source_dsn), so it cannot resolve conflicts",
                retry_after_s=60,
            )
        try:
            outcome, already = await asyncio.to_thread(
                self.desk.resolve,
                who.device_id,
                conflict_id,
                _CHOICES[request.choice],
                request.values,
                dict(who.claims),
            )
        except ConflictNotFound as exc:
            raise ApiError(404, "conflict_not_found", str(exc)) from exc
        except ResolveForbidden as exc:
            raise ApiError(403, exc.code, str(exc)) from exc
        except ResolveError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from exc
        try:
            await asyncio.to_thread(self.store.put_outcomes, [outcome])
        except JournalStoreError as exc:  # it comes through _outcomes anyway
            log.warning("resolved outcome of conflict %s not stored yet: %s", conflict_id, exc)
        return {"outcome": outcome.to_json(), "already_resolved": already}

    # ---- routing

    def router(self, identity: Callable[..., Any]) -> APIRouter:
        """The endpoints, authenticated (and rate-limited) by the API's ``identity``."""
        cfg = self.config
        errors = _error_docs()
        router = APIRouter(prefix="/v1", tags=["journal"])
        Device = Annotated[DeviceIdentity, Security(identity)]

        @router.post(
            "/journal",
            response_model=UploadAnswer,
            responses=errors,
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["entries"],
                                "properties": {
                                    "entries": {
                                        "type": "array",
                                        "maxItems": cfg.limits.max_entries,
                                        "items": {"type": "object"},
                                    }
                                },
                            }
                        }
                    },
                }
            },
        )
        async def upload(device: Device, request: Request) -> Response:
            """Upload journal entries (docs/journal.md); answered once Kafka holds them."""
            return _json(await self.upload(device, await request.body()))

        @router.get("/outcomes", response_model=OutcomesMessage, responses=errors)
        async def outcomes(
            device: Device,
            after: Annotated[
                int,
                Query(
                    ge=0,
                    le=MAX_BIGINT,
                    description="the cursor of the previous answer; 0: from the start",
                ),
            ] = 0,
            limit: Annotated[
                int | None,
                Query(ge=1, description=f"most outcomes (at most {cfg.max_page_outcomes})"),
            ] = None,
            wait: Annotated[
                float,
                Query(
                    ge=0,
                    description=f"seconds to wait when nothing is new (at most {cfg.long_poll_s})",
                ),
            ] = 0.0,
        ) -> Response:
            """The device's entry outcomes after the cursor (long-poll up to ``wait`` s)."""
            size = min(limit or cfg.max_page_outcomes, cfg.max_page_outcomes)
            return _json(await self.outcomes(device, after, size, min(wait, cfg.long_poll_s)))

        @router.get("/conflicts", response_model=ConflictsMessage, responses=errors)
        async def conflicts(
            device: Device,
            limit: Annotated[
                int | None, Query(ge=1, description=f"most (at most {cfg.max_page_outcomes})")
            ] = None,
        ) -> Response:
            """The device's open kept conflicts (ask policy), oldest first."""
            size = min(limit or cfg.max_page_outcomes, cfg.max_page_outcomes)
            return _json(await self.conflicts(device, size))

        @router.post(
            "/conflicts/{conflict_id}/resolve", response_model=ResolveAnswer, responses=errors
        )
        async def resolve(
            device: Device,
            conflict_id: Annotated[str, PathParam(max_length=MAX_CONFLICT_ID)],
            request: Annotated[ResolveRequest, Body()],
        ) -> Response:
            """Settle one of the device's conflicts; a new edit. Resolving twice is harmless."""
            return _json(await self.resolve(device, conflict_id, request))

        return router
