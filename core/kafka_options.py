"""Kafka clients for every component: one set of connection options, one safe constructor.

The cdc daemon (``[kafka]``), the relay's engine, journal intake and applier
(``[relay] kafka_*``) and the audit tool all reach the same brokers the same way:
:func:`client_config` turns the settings (bootstrap servers, security, the time to
wait for a broker) into kafka-python keyword arguments, and :func:`build_client`
makes a kafka-python client (``KafkaProducer``, ``KafkaConsumer``,
``KafkaAdminClient``) from them.  Callers add their client's own options (acks,
isolation level, ...) on top.

kafka-python is imported inside the functions that need it, so importing this
module (or the settings modules that use it) does not load the client library.

Concurrency: the functions hold no state; a client built here is used as
kafka-python documents (a producer is thread-safe, a consumer is not).
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = [
    "build_client",
    "client_config",
    "has_bootstrap_timeout",
    "is_kafka_error",
    "kafka_errors",
    "within_timeout",
]

log = logging.getLogger(__name__)


def has_bootstrap_timeout() -> bool:
    """kafka-python >= 3 has ``bootstrap_timeout_ms``; 2.x rejects unknown settings."""
    from kafka import KafkaProducer

    return "bootstrap_timeout_ms" in KafkaProducer.DEFAULT_CONFIG


def client_config(
    bootstrap_servers: str,
    *,
    timeout_s: float,
    security_protocol: str = "PLAINTEXT",
    sasl_mechanism: str = "PLAIN",
    sasl_username: str | None = None,
    sasl_password: str | None = None,
    ssl_cafile: str | None = None,
) -> dict[str, Any]:
    """kafka-python client arguments: brokers, security, and *timeout_s* for every wait.

    *bootstrap_servers* is the comma-separated ``host:port`` list of the settings.
    *timeout_s* bounds a request and, where kafka-python has it, the wait for a first
    broker connection (kafka-python 3 waits 30 s for that by default, whatever
    ``request_timeout_ms`` says).  SASL credentials are passed with the ``SASL_*``
    protocols only.
    """
    timeout_ms = int(timeout_s * 1000)
    kw: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in bootstrap_servers.split(",")],
        "security_protocol": security_protocol,
        "request_timeout_ms": timeout_ms,
    }
    if has_bootstrap_timeout():
        kw["bootstrap_timeout_ms"] = timeout_ms
    if security_protocol.startswith("SASL_"):
        kw.update(
            sasl_mechanism=sasl_mechanism,
            sasl_plain_username=sasl_username,
            sasl_plain_password=sasl_password,
        )
    if ssl_cafile:
        kw["ssl_cafile"] = ssl_cafile
    return kw


def within_timeout(kafka: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """A copy of the client arguments *kafka* whose request and first-connection waits
    are at most *timeout_s* (and at least one second).

    ``bootstrap_timeout_ms`` is set only where kafka-python has it (2.x rejects it).
    """
    timeout_ms = max(1000, int(timeout_s * 1000))
    bounded = dict(kafka)
    bounded["request_timeout_ms"] = min(
        int(bounded.get("request_timeout_ms", timeout_ms)), timeout_ms
    )
    if has_bootstrap_timeout():
        current = int(bounded.get("bootstrap_timeout_ms", timeout_ms))
        bounded["bootstrap_timeout_ms"] = min(current, timeout_ms)
    return bounded


def build_client(cls: Any, **config: Any) -> Any:
    """``cls(**config)`` for a kafka-python client, without leaking its network thread.

    kafka-python starts a network thread before it connects to the first broker
    and, when that fails, raises from the constructor leaving the thread running
    (seen with 3.0.x): one leaked thread and socket per failed attempt while the
    broker is down.  Keep hold of the network client it makes and close it.
    """
    made: list[Any] = []
    base = cls.DEFAULT_CONFIG.get("kafka_client")
    if base is None or "kafka_client" in config:
        return cls(**config)

    def factory(**kw: Any) -> Any:
        client = base(**kw)
        made.append(client)
        return client

    try:
        return cls(kafka_client=factory, **config)
    except BaseException:
        for client in made:
            try:
                client.close()
            except Exception as exc:
                log.debug("closing the network client of a failed %s: %s", cls.__name__, exc)
        raise


def kafka_errors() -> tuple[type[BaseException], ...]:
    """kafka-python's exception base, imported when first needed (``except kafka_errors()``)."""
    from kafka.errors import KafkaError

    return (KafkaError,)


def is_kafka_error(exc: BaseException) -> bool:
    """Whether *exc* is one of kafka-python's errors (a broker or client failure)."""
    return isinstance(exc, kafka_errors())
