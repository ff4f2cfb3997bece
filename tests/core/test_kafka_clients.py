"""kafka-python clients made while the broker is down leak no network thread (kafka-python
3.0 starts one before connecting and leaves it running when the constructor raises; the
relay and cdc build their clients through core.kafka_options.build_client, which closes it)."""

from __future__ import annotations

import threading

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from core.kafka_options import build_client
from devtools.local_services import free_port


@pytest.mark.parametrize("cls", [KafkaAdminClient, KafkaProducer, KafkaConsumer])
def test_failed_clients_leave_no_thread(cls: type) -> None:
    dead = f"127.0.0.1:{free_port()}"
    before = {t.ident for t in threading.enumerate()}
    for _ in range(3):
        try:
            client = build_client(
                cls,
                bootstrap_servers=dead,
                request_timeout_ms=600,
                bootstrap_timeout_ms=500,
                api_version_auto_timeout_ms=500,
            )
        except Exception:  # NoBrokersAvailable / KafkaTimeoutError: what a dead broker gives
            continue
        client.close()  # a lazily connecting client: nothing to leak, close it
    leaked = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert leaked == []
