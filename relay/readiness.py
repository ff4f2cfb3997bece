"""``GET /readyz`` on the relay's API port: may this process take device traffic now?

Ready (200) when all of these hold, else 503 with the reasons:

- **store**: the bucket store answers a trivial read within :data:`CHECK_TIMEOUT_S`;
- **broker**: a Kafka broker answers a metadata request (:class:`BrokerProbe`);
- **engine**: the bucket engine of this process, when it leads, is at most
  ``[relay] ready_max_lag_s`` behind (``fieldsync_relay_engine_lag_seconds``).  An engine
  standing by (another process leads) or not run here (``--no-engine``) is no reason to
  refuse traffic.

The body (both statuses; docs/relay.md pins it)::

    {"ready": false, "store": "ok", "broker": "unreachable", "engine": "caught_up",
     "engine_lag_s": 0.0, "max_lag_s": 30.0,
     "reasons": ["broker: NoBrokersAvailable: ..."]}

``store`` and ``broker`` are ``ok`` or ``unreachable``; ``engine`` is ``caught_up``,
``behind``, ``standby`` or ``off``; ``engine_lag_s`` is null unless the engine leads here.
``/healthz`` stays the liveness check (the process and its store).

Concurrency model: the endpoint runs on the API's event loop; the store read runs in a
worker thread (the store's async read), the broker question in a worker thread with at
most one in flight (a second check meanwhile reports the first one still waiting).  The
engine's state is read from thread-safe fields.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Protocol

import orjson
from fastapi import APIRouter
from fastapi.responses import Response

from core.kafka_options import build_client, is_kafka_error

__all__ = ["CHECK_TIMEOUT_S", "BrokerProbe", "EngineStatus", "Readiness", "StorePing"]

log = logging.getLogger("relay.readiness")

CHECK_TIMEOUT_S: Final = 5.0
"""How long the store and the broker have to answer a readiness check."""

EngineStatus = tuple[str, float | None]
"""``("off" | "standby" | "leading", lag in seconds when leading)``."""


class StorePing(Protocol):
    """The bucket store's trivial read (:meth:`PgBucketStore.bucket_state_async`)."""

    async def bucket_state_async(self, buckets: Sequence[str]) -> Mapping[str, Any]: ...


class BrokerProbe:
    """Asks the brokers for the cluster's metadata with one kept admin client (made on
    first use, remade after a failure).  Thread-safe; at most one question in flight."""

    def __init__(self, kafka: Mapping[str, Any]) -> None:
        self._kafka = dict(kafka)
        self._admin: Any = None
        self._lock = threading.Lock()

    def ask(self) -> str | None:
        """None when a broker answered, else why not."""
        if not self._lock.acquire(blocking=False):
            return "the previous question to the brokers is still unanswered"
        try:
            from kafka import KafkaAdminClient

            if self._admin is None:
                self._admin = build_client(KafkaAdminClient, **self._kafka)
            self._admin.describe_cluster()
            return None
        except Exception as exc:
            if not is_kafka_error(exc):
                raise
            self._drop()
            return f"{type(exc).__name__}: {exc}"
        finally:
            self._lock.release()

    def _drop(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                admin.close()
            except Exception as exc:  # closing must not hide the original problem
                log.debug("closing the readiness admin client: %s", exc)

    def close(self) -> None:
        with self._lock:
            self._drop()


class Readiness:
    """The readiness check of one relay process (see the module docstring)."""

    def __init__(
        self,
        store: StorePing,
        broker: BrokerProbe,
        engine: Callable[[], EngineStatus],
        max_lag_s: float,
    ) -> None:
        self.store = store
        self.broker = broker
        self.engine = engine
        self.max_lag_s = max_lag_s

    async def check(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, body)``; the body as in the module docstring."""
        reasons: list[str] = []
        store_problem, broker_problem = await asyncio.gather(
            self._store_problem(), self._broker_problem()
        )
        if store_problem is not None:
            reasons.append(f"store: {store_problem}")
        if broker_problem is not None:
            reasons.append(f"broker: {broker_problem}")
        state, lag_s = self.engine()
        engine = state if state != "leading" else "caught_up"
        if lag_s is not None and lag_s > self.max_lag_s:
            engine = "behind"
            reasons.append(
                f"engine: {lag_s:.1f} s behind the change topics "
                f"(relay.ready_max_lag_s = {self.max_lag_s:g})"
            )
        body = {
            "ready": not reasons,
            "store": "ok" if store_problem is None else "unreachable",
            "broker": "ok" if broker_problem is None else "unreachable",
            "engine": engine,
            "engine_lag_s": None if lag_s is None else round(lag_s, 3),
            "max_lag_s": self.max_lag_s,
            "reasons": reasons,
        }
        return not reasons, body

    async def _store_problem(self) -> str | None:
        try:
            await asyncio.wait_for(self.store.bucket_state_async([]), CHECK_TIMEOUT_S)
        except TimeoutError:
            return f"no answer within {CHECK_TIMEOUT_S:g} s"
        except Exception as exc:  # any failure to answer is "unreachable", with its reason
            return str(exc) or type(exc).__name__
        return None

    async def _broker_problem(self) -> str | None:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.broker.ask), CHECK_TIMEOUT_S)
        except TimeoutError:
            return f"no answer within {CHECK_TIMEOUT_S:g} s"

    def router(self) -> APIRouter:
        """``GET /readyz`` (no authentication, like ``/healthz``)."""
        router = APIRouter()

        @router.get("/readyz", tags=["ops"])
        async def readyz() -> Response:
            """Readiness: store and broker reachable, engine caught up (docs/relay.md)."""
            ready, body = await self.check()
            return Response(
                orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json"
            )

        return router
