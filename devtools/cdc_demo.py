"""``fieldsync demo --cdc-only``: the whole cdc path on embedded services, in one process.

Starts a throw-away PostgreSQL (wal_level=logical) and a tansu broker, creates the
demo's tables with their starting rows (:mod:`devtools.demo_schema`; they are the
snapshot), runs the cdc daemon in a thread, writes ``work_orders`` rows (insert,
update, delete) at a steady rate from this thread, and prints every event once Kafka
has acknowledged it, decoded from its Avro bytes with the schemas read back from the
``_schemas`` topic.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import psycopg

from cdc.change_assembler import OutEvent
from devtools import demo_schema
from devtools.local_services import EmbeddedBroker, EmbeddedPostgres


def read_schemas(bootstrap: str, prefix: str) -> Any:
    """A SchemaRegistry holding every schema in ``{prefix}._schemas``."""
    from kafka import KafkaConsumer, TopicPartition

    from cdc.kafka_sink import schemas_topic
    from core.avro_envelope import SchemaRegistry

    registry = SchemaRegistry()
    topic = schemas_topic(prefix)
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        if not tps:
            return registry
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        deadline = time.monotonic() + 10
        while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=300).values():
                for r in recs:
                    if r.value:
                        registry.add(r.value.decode())
    finally:
        consumer.close()
    return registry


def run_demo(seconds: float = 0.0, rate: float = 2.0) -> None:
    from cdc.pipeline import CdcDaemon
    from cdc.settings import load_cdc_settings
    from core.avro_envelope import decode

    print("starting embedded PostgreSQL and broker ...", flush=True)
    with EmbeddedPostgres() as pg, EmbeddedBroker() as broker:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(demo_schema.DDL)
            conn.execute(demo_schema.SEED)
        prefix = "fieldsync"
        settings = load_cdc_settings(
            None,
            {
                "FIELDSYNC_POSTGRES_DSN": pg.dsn,
                "FIELDSYNC_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                "FIELDSYNC_KAFKA_TOPIC_PREFIX": prefix,
            },
        )
        registry_box: list[Any] = [None]

        def on_commit(events: list[OutEvent]) -> None:
            for ev in events:
                try:
                    value = decode(ev.value, registry_box[0])
                except Exception:
                    registry_box[0] = read_schemas(broker.bootstrap, prefix)
                    value = decode(ev.value, registry_box[0])
                print(
                    json.dumps(
                        {
                            "topic": ev.topic,
                            "pos": [ev.commit_lsn, ev.seq],
                            "op": value["op"],
                            "after": value.get("after"),
                            "before": value.get("before"),
                        },
                        default=str,
                    ),
                    flush=True,
                )

        registry_box[0] = read_schemas(broker.bootstrap, prefix)
        daemon = CdcDaemon(settings, on_commit=on_commit)
        worker = threading.Thread(target=daemon.run, name="cdc", daemon=True)
        worker.start()
        daemon.ready.wait(60)
        print(f"cdc streaming from {pg.dsn} to {broker.bootstrap}; Ctrl-C to stop", flush=True)
        deadline = time.monotonic() + seconds if seconds else None
        try:
            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                while deadline is None or time.monotonic() < deadline:
                    r = random.random()
                    if r < 0.5:
                        conn.execute(
                            "insert into work_orders (site, technician, cost) values (%s, %s, %s)",
                            (
                                random.choice(["plant-1", "plant-3"]),
                                random.choice(["t42", "t7"]),
                                round(random.uniform(10, 500), 2),
                            ),
                        )
                    elif r < 0.85:
                        conn.execute(
                            "update work_orders set status = %s, updated_at = now() where id = (select id from work_orders order by random() limit 1)",
                            (random.choice(["in_progress", "completed"]),),
                        )
                    else:
                        conn.execute(
                            "delete from work_orders where id = (select id from work_orders order by random() limit 1)"
                        )
                    time.sleep(1.0 / rate)
        except KeyboardInterrupt:
            pass
        finally:
            daemon.request_stop()
            worker.join(30)
