#!/usr/bin/env python3
"""Benchmarks of the relay's device API; figures go to docs/performance.md.

    .venv/bin/python bench/relay_api_bench.py                 # all cases, full sizes
    .venv/bin/python bench/relay_api_bench.py pull latency    # some cases
    .venv/bin/python bench/relay_api_bench.py --quick         # smoke run, tiny sizes

Everything runs on this machine: an embedded PostgreSQL (source database and
bucket store in one cluster), for the full path also a Kafka-protocol broker
(tansu) and ``fieldsync cdc run``, and the relay as ``fieldsync relay run``
in a subprocess (uvicorn, one process, default ``[http]`` settings unless
noted).  Clients run in this process (the idle case's in client processes).  ``--pg-dsn`` / ``--kafka-bootstrap`` use
external services instead (bench/bench_support.py).

1. **pull**: one device pulls a ``--rows`` (1M) row bucket from scratch over
   HTTP (``GET /v1/changes`` pages of ``max_page_ops``, gzip, each page parsed)
   until its checkpoint is complete, against the limit: ``COPY (select ...)
   TO STDOUT`` of the same rows out of PostgreSQL (client reads every byte).
   Reported: rows/s of both and their ratio (target >= 0.3).  The pull's figure
   includes the client's own work (inflate, JSON parse, holding every row), which
   COPY's does not; the relay's and the client's CPU are printed beside it.
2. **latency**: ``--devices`` (1,000) devices hold a WebSocket stream each
   (``/v1/stream``), every device its own bucket; a writer commits
   ``--rate`` single-row transactions per second for ``--seconds``, each to a
   random device's row; a device notes when the op arrives.  Latency = arrival
   - the moment the writer's COMMIT returned.  ``--path full`` (default):
   UPDATE in the captured database -> cdc -> Kafka -> bucket engine -> store ->
   API.  ``--path store``: the writer applies the change to the bucket store
   directly (store commit -> device).  Target p99 <= 100 ms.
3. **fanout**: ``--devices`` streams (1,000; the second target: 10,000) all
   sync one global bucket besides their own; each commit to it must reach every
   device (store path): p50/p99 of the deliveries, when the last device got it
   (targets: p99 <= 150 ms and last <= 200 ms for 1,000; last <= 1 s for 10,000)
   and the relay's CPU time per commit (the least noisy figure on a shared
   machine).
4. **idle**: ``--connections`` (5,000; the target: 20,000) WebSocket streams opened
   and left idle, by client processes of at most 5,000 streams each (so the relay
   alone holds its side of the sockets); relay RSS before and after gives memory per
   connection; afterwards one change is pushed to a sample of them to show they are
   alive, and the relay's CPU while idle is reported.  ``RLIMIT_NOFILE`` is raised
   first, up to the hard limit (the relay's sockets, its store connections and files
   must fit under it).

The table printed at the end is Markdown, ready for docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_support
import httpx
import orjson
import psycopg
from bench_support import Results, Services, log, percentile
from websockets.asyncio.client import connect as ws_connect

from devtools.local_services import free_port
from relay.auth import issue_token
from relay.auth_keys import KeyStore
from relay.downstream.bucket_store import ChangeKind, RowChange
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.rules import Rules
from relay.downstream.rules_parser import load_rules
from relay.downstream.table_infos import table_infos_from_catalog

RULES = """
token_claims = ["grp"]

[[bucket]]
name = "grp"
parameters = ["g"]
claims = { g = "grp" }

[[bucket.table]]
table = "public.items"
match = { grp = "g" }
"""

ITEMS_DDL = """
create table items (
    id bigint primary key,
    grp text not null,
    name text not null,
    qty integer not null,
    price numeric(10,2) not null,
    notes text,
    updated_at timestamptz not null default now()
)
"""


# --------------------------------------------------------------------------- process figures


def raise_fd_limit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, want)
    if hard != resource.RLIM_INFINITY and target > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            target = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# --------------------------------------------------------------------------- services


@dataclass
class Env:
    """The services (bench_support), a signing key for device tokens."""

    svc: Services
    keys_path: Path = field(init=False)
    keys: KeyStore = field(init=False)

    def __post_init__(self) -> None:
        self.keys_path = self.work / "keys.toml"
        self.keys_path.write_text(
            f'current = "k1"\n[[key]]\nkid = "k1"\nalg = "HS256"\nsecret = "{"b" * 48}"\n'
        )
        self.keys_path.chmod(0o600)
        self.keys = KeyStore.from_file(self.keys_path)

    @property
    def work(self) -> Path:
        return self.svc.work

    def new_db(self, prefix: str) -> str:
        return self.svc.new_database(prefix)

    def token(self, device: str, **claims: Any) -> str:
        return issue_token(self.keys, None, device, claims, 6 * 3600)


@dataclass
class Relay:
    proc: subprocess.Popen[str]
    base: str
    output: list[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ws(self) -> str:
        return self.base.replace("http://", "ws://")


@contextlib.contextmanager
def relay(
    env: Env,
    *,
    store_dsn: str,
    source_dsn: str,
    rules_path: Path,
    engine: bool = False,
    prefix: str = "fieldsync",
    http: dict[str, Any] | None = None,
    extra: str = "",
) -> Iterator[Relay]:
    """``fieldsync relay run`` in a subprocess; yields once it listens."""
    port = free_port()
    http_lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in (http or {}).items())
    config = env.work / f"relay-{uuid.uuid4().hex[:6]}.toml"
    bootstrap = env.svc.bootstrap or "127.0.0.1:9"
    config.write_text(
        f'[relay]\nstore_dsn = "{store_dsn}"\nsource_dsn = "{source_dsn}"\n'
        f'rules = "{rules_path}"\ntopic_prefix = "{prefix}"\n'
        f'kafka_bootstrap_servers = "{bootstrap}"\nlog_level = "WARNING"\n{extra}'
        f'[http]\nport = {port}\n{http_lines}[auth]\nkeys_file = "{env.keys_path}"\n'
    )
    cmd = [sys.executable, "-m", "fieldsync.cli", "relay", "run", "--config", str(config)]
    if not engine:
        cmd.append("--no-engine")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(
                "relay did not start:\n" + (proc.stdout.read() if proc.stdout else "")
            )
        time.sleep(0.2)
    drain = threading.Thread(target=lambda: output.extend(proc.stdout or ()), daemon=True)
    drain.start()
    try:
        yield Relay(proc, base, output)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_rules(env: Env, text: str = RULES) -> Path:
    path = env.work / f"rules-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    return path


def fill_store(store: PgBucketStore, rules: Rules, source_dsn: str, grp_filter: str) -> int:
    """Apply every row of ``items`` (as snapshot reads) to the store, in batches."""
    n = 0
    with psycopg.connect(source_dsn) as conn, conn.cursor(name="fill") as cur:
        cur.itersize = 10000
        cur.execute(f"select * from items where {grp_filter} order by id")
        names = [d.name for d in cur.description or ()]
        batch: list[RowChange] = []
        for values in cur:
            row = dict(zip(names, values, strict=True))
            n += 1
            batch.append(RowChange("public.items", ChangeKind.UPSERT, (1, n), (row["id"],), row))
            if len(batch) == 10000:
                store.apply(rules, batch)
                batch = []
        if batch:
            store.apply(rules, batch)
    return n


# --------------------------------------------------------------------------- case 1: pull


def case_pull(env: Env, args: argparse.Namespace, results: Results) -> None:
    rows = args.rows
    source = env.new_db("src")
    store_dsn = env.new_db("store")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ITEMS_DDL)
        conn.execute(
            "insert into items (id, grp, name, qty, price, notes) select i, 'g1', "
            "'item-' || lpad(i::text, 8, '0'), (i * 7) %% 1000, ((i * 13) %% 100000) / 100.0, "
            "case when i %% 3 = 0 then null else 'note ' || md5(i::text) end "
            "from generate_series(1, %s) i",
            (rows,),
        )
        conn.execute("vacuum analyze items")
    rules_path = write_rules(env)
    rules = load_rules(rules_path, table_infos_from_catalog(source))
    store = PgBucketStore(store_dsn)
    store.migrate()
    t0 = time.perf_counter()
    filled = fill_store(store, rules, source, "true")
    fill_s = time.perf_counter() - t0
    store.close()
    with psycopg.connect(store_dsn, autocommit=True) as conn:
        conn.execute("analyze")  # what autovacuum does after a bulk load
    log(f"pull: store filled with {filled:,} rows in {fill_s:.1f}s ({filled / fill_s:,.0f} rows/s)")

    copy_times = []
    copy_bytes = 0
    for _ in range(2):
        with psycopg.connect(source) as conn, conn.cursor() as cur:
            t0 = time.perf_counter()
            copy_bytes = 0
            with cur.copy("copy (select * from items where grp = 'g1') to stdout") as copy:
                for chunk in copy:
                    copy_bytes += len(chunk)
            copy_times.append(time.perf_counter() - t0)
    copy_s = min(copy_times)
    copy_rate = rows / copy_s
    results.add("pull", f"COPY {rows:,} rows out of PostgreSQL (limit)", copy_rate, "rows/s")

    token = env.token("puller", grp="g1")
    http = {"max_page_ops": args.page_ops} if args.page_ops else {}
    with relay(env, store_dsn=store_dsn, source_dsn=source, rules_path=rules_path, http=http) as r:
        for encoding in ("gzip", "identity"):
            relay_cpu, client_cpu = cpu_s(r.pid), time.process_time()
            got, pages, wire, elapsed, verified = pull_all(
                r.base, token, encoding, args.page_ops or 5000
            )
            relay_cpu, client_cpu = cpu_s(r.pid) - relay_cpu, time.process_time() - client_cpu
            assert got == rows, f"pulled {got} of {rows} rows"
            rate = rows / elapsed
            label = "gzip" if encoding == "gzip" else "no compression"
            results.add(
                "pull",
                f"device pull from scratch over HTTP, {label} ({pages} pages, "
                f"{wire / 1e6:.0f} MB on the wire)",
                rate,
                "rows/s",
            )
            results.add(
                "pull",
                f"ratio to COPY, {label}",
                rate / copy_rate,
                "x",
                ">= 0.3",
                rate / copy_rate >= 0.3,
            )
            results.notes.append(
                f"pull, {label}: relay process CPU {relay_cpu:.2f} s "
                f"({relay_cpu / rows * 1e6:.1f} µs a row), the client's CPU (HTTP, inflate, "
                f"JSON parse, holding the rows) {client_cpu:.2f} s "
                f"({client_cpu / rows * 1e6:.1f} µs a row); wall {elapsed:.2f} s"
            )
            if not verified:
                results.notes.append("pull: checkpoint count did not match the rows pulled")
        got, pages, elapsed, cpu = asyncio.run(ws_pull_all(r.ws, token, r.pid))
        assert got == rows, f"pulled {got} of {rows} rows over the stream"
        rate = rows / elapsed
        results.add(
            "pull",
            f"device pull from scratch over the WebSocket stream ({pages} messages, "
            "permessage-deflate)",
            rate,
            "rows/s",
        )
        results.add(
            "pull",
            "ratio to COPY, WebSocket",
            rate / copy_rate,
            "x",
            ">= 0.3",
            rate / copy_rate >= 0.3,
        )
        results.notes.append(
            f"pull: relay process CPU for the WebSocket pull: {cpu:.1f} s "
            f"({rows / cpu:,.0f} rows per relay CPU-second)"
        )
    results.notes.append(
        f"pull: COPY moved {copy_bytes / 1e6:.0f} MB (text format); the store was filled "
        f"through PgBucketStore.apply at {filled / fill_s:,.0f} rows/s (not part of the figure)"
    )


def pull_all(base: str, token: str, encoding: str, limit: int) -> tuple[int, int, int, float, bool]:
    """Pull from scratch until the checkpoint is complete: (rows, pages, bytes, seconds, ok)."""
    headers = {"Authorization": f"Bearer {token}", "Accept-Encoding": encoding}
    held: dict[str, Any] = {}
    cursor: str | None = None
    pages = wire = 0
    gc.disable()  # the device keeps 1M parsed rows: cyclic GC passes over them would dominate
    t0 = time.perf_counter()
    with httpx.Client(base_url=base, timeout=60) as client:
        while True:
            params: dict[str, Any] = {"limit": limit}
            if cursor:
                params["cursor"] = cursor
            with client.stream("GET", "/v1/changes", params=params, headers=headers) as resp:
                if resp.status_code == 429:
                    time.sleep(float(resp.headers.get("retry-after", "1")))
                    continue
                resp.raise_for_status()
                raw = b"".join(resp.iter_raw())
                wire += len(raw)
                body = raw if encoding == "identity" else resp_decode(raw)
            msg = orjson.loads(body)
            pages += 1
            for op in msg["ops"]:
                if op["op"] == "PUT":
                    held[op["key"][0]] = op["data"]
                else:
                    held.pop(op["key"][0], None)
            cursor = msg["cursor"]
            if msg["checkpoint"]["complete"]:
                break
    elapsed = time.perf_counter() - t0
    gc.enable()
    counts = [b["count"] for b in msg["checkpoint"]["buckets"].values()]
    return len(held), pages, wire, elapsed, sum(counts) == len(held)


async def ws_pull_all(ws_base: str, token: str, pid: int) -> tuple[int, int, float, float]:
    """Pull from scratch over ``/v1/stream``: (rows, messages, seconds, relay CPU seconds)."""
    held: dict[Any, Any] = {}
    messages = 0
    gc.disable()
    c0 = cpu_s(pid)
    t0 = time.perf_counter()
    async with ws_connect(
        f"{ws_base}/v1/stream",
        additional_headers={"Authorization": f"Bearer {token}"},
        max_size=None,
    ) as ws:
        while True:
            msg = orjson.loads(await ws.recv())
            messages += 1
            for op in msg["ops"]:
                if op["op"] == "PUT":
                    held[op["key"][0]] = op["data"]
                else:
                    held.pop(op["key"][0], None)
            if msg["checkpoint"]["complete"]:
                break
    elapsed = time.perf_counter() - t0
    gc.enable()
    return len(held), messages, elapsed, cpu_s(pid) - c0


def resp_decode(raw: bytes) -> bytes:
    import gzip

    return gzip.decompress(raw)


# --------------------------------------------------------------------------- case 2: latency


WO_RULES = """
token_claims = ["technician"]

[[bucket]]
name = "tech"
parameters = ["t"]
claims = { t = "technician" }

[[bucket.table]]
table = "public.work_orders"
match = { technician = "t" }
"""

WO_DDL = "create table work_orders (id int primary key, technician text not null, notes text)"


DEFLATE = True  # offer permessage-deflate (--no-deflate: plain frames)


async def open_streams(ws_base: str, tokens: Sequence[str], concurrency: int = 100) -> list[Any]:
    sem = asyncio.Semaphore(concurrency)

    async def one(token: str) -> Any:
        async with sem:
            for attempt in range(5):
                try:
                    ws = await ws_connect(
                        f"{ws_base}/v1/stream",
                        additional_headers={"Authorization": f"Bearer {token}"},
                        open_timeout=60,
                        ping_interval=None,
                        max_size=None,
                        compression="deflate" if DEFLATE else None,
                    )
                    first = orjson.loads(await ws.recv())
                    assert first.get("type") == "changes", first
                    return ws
                except (OSError, TimeoutError):
                    await asyncio.sleep(0.2 * (attempt + 1))
            raise RuntimeError("could not open a stream")

    return list(await asyncio.gather(*(one(t) for t in tokens)))


def case_latency(env: Env, args: argparse.Namespace, results: Results) -> None:
    devices = args.devices
    full = args.path == "full"
    if full and env.svc.bootstrap is None:
        raise RuntimeError("--path full needs the broker")
    source = env.new_db("src")
    store_dsn = env.new_db("store")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(WO_DDL)
        conn.execute("alter table work_orders replica identity default")
        conn.execute(
            "insert into work_orders select i, 'd' || lpad(i::text, 5, '0'), 'start' "
            "from generate_series(1, %s) i",
            (devices,),
        )
    rules_path = write_rules(env, WO_RULES)
    rules = load_rules(rules_path, table_infos_from_catalog(source))
    prefix = env.svc.new_topic_prefix("lat")
    cdc_proc = None
    if full:
        cdc_proc = start_cdc(env, source, prefix)
    else:
        store = PgBucketStore(store_dsn)
        store.migrate()
        with psycopg.connect(source) as conn:
            cur = conn.execute("select id, technician, notes from work_orders")
            store.apply(
                rules,
                [
                    RowChange(
                        "public.work_orders",
                        ChangeKind.UPSERT,
                        (1, i),
                        (r[0],),
                        {"id": r[0], "technician": r[1], "notes": r[2]},
                    )
                    for i, r in enumerate(cur.fetchall())
                ],
            )
    try:
        extra = "batch_max_ms = 5\n" if full else ""
        with relay(
            env,
            store_dsn=store_dsn,
            source_dsn=source,
            rules_path=rules_path,
            engine=full,
            prefix=prefix,
            extra=extra,
        ) as r:
            if full:
                wait_snapshot(store_dsn, devices)
            lat, lost, n = asyncio.run(latency_run(env, r, source, store_dsn, rules, devices, args))
    finally:
        if cdc_proc is not None:
            cdc_proc.send_signal(signal.SIGTERM)
            cdc_proc.wait(30)
    label = (
        "PostgreSQL commit -> cdc -> Kafka -> engine -> store -> device"
        if full
        else "bucket-store commit -> device"
    )
    results.add("latency", f"{label}: commits", n, "")
    results.add("latency", f"{label}: p50", percentile(lat, 50), "ms")
    results.add(
        "latency", f"{label}: p99", percentile(lat, 99), "ms", "<= 100", percentile(lat, 99) <= 100
    )
    results.add("latency", f"{label}: max", max(lat), "ms")
    if lost:
        results.notes.append(f"latency: {lost} of {n} changes did not arrive within 10 s")


def start_cdc(env: Env, source: str, prefix: str) -> subprocess.Popen[str]:
    config = env.work / f"cdc-{prefix}.toml"
    config.write_text(
        f'[postgres]\ndsn = "{source}"\n[kafka]\nbootstrap_servers = "{env.svc.kafka}"\n'
        f'topic_prefix = "{prefix}"\n[cdc]\nlog_level = "WARNING"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "fieldsync.cli", "cdc", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return proc


def wait_snapshot(store_dsn: str, devices: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.Error), psycopg.connect(store_dsn) as conn:
            row = conn.execute(
                "select count(*) from fieldsync_relay.buckets where row_count > 0"
            ).fetchone()
            if row and row[0] >= devices:
                return
        time.sleep(0.5)
    raise RuntimeError("the engine did not bring the snapshot into the store in time")


async def latency_run(
    env: Env,
    r: Relay,
    source: str,
    store_dsn: str,
    rules: Rules,
    devices: int,
    args: argparse.Namespace,
) -> tuple[list[float], int, int]:
    names = [f"d{i:05d}" for i in range(1, devices + 1)]
    t0 = time.perf_counter()
    streams = await open_streams(r.ws, [env.token(f"dev-{n}", technician=n) for n in names])
    log(f"latency: {devices} streams open in {time.perf_counter() - t0:.1f}s")
    arrived: dict[str, float] = {}
    committed: dict[str, float] = {}
    target: dict[str, int] = {}

    async def listen(ws: Any) -> None:
        with contextlib.suppress(Exception):
            async for raw in ws:
                now = time.time()
                for op in orjson.loads(raw)["ops"]:
                    notes = (op.get("data") or {}).get("notes", "")
                    if notes.startswith("m"):
                        arrived.setdefault(notes, now)

    tasks = [asyncio.create_task(listen(ws)) for ws in streams]
    stop = threading.Event()
    warmup = int(args.rate * 2)  # the first 2 s warm connections and caches: not counted
    total = warmup + int(args.rate * args.seconds)

    def writer() -> None:
        rng = random.Random(7)
        interval = 1.0 / args.rate
        store = None if args.path == "full" else PgBucketStore(store_dsn)
        with psycopg.connect(source, autocommit=True) as conn:
            start = time.perf_counter()
            for i in range(total):
                if stop.is_set():
                    break
                due = start + i * interval
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                idx = rng.randrange(devices)
                mark = f"m{i}"
                if store is None:
                    conn.execute("update work_orders set notes = %s where id = %s", (mark, idx + 1))
                else:
                    store.apply(
                        rules,
                        [
                            RowChange(
                                "public.work_orders",
                                ChangeKind.UPSERT,
                                (2, i),
                                (idx + 1,),
                                {"id": idx + 1, "technician": names[idx], "notes": mark},
                            )
                        ],
                    )
                if i >= warmup:
                    committed[mark] = time.time()
                    target[mark] = idx
        if store is not None:
            store.close()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    while thread.is_alive():
        await asyncio.sleep(0.2)
    deadline = time.monotonic() + 10
    while len(arrived) < len(committed) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    lat = [(arrived[m] - c) * 1000 for m, c in committed.items() if m in arrived]
    missing = sorted(m for m in committed if m not in arrived)
    if missing:
        await diagnose(r, env, store_dsn, missing, target, names, arrived)
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*(ws.close() for ws in streams), return_exceptions=True)
    return lat, len(missing), len(committed)


async def diagnose(
    r: Relay,
    env: Env,
    store_dsn: str,
    missing: list[str],
    target: dict[str, int],
    names: list[str],
    arrived: dict[str, float],
) -> None:
    """Changes not delivered within 10 s: in the store by then? over HTTP? later on the stream?"""
    with psycopg.connect(store_dsn) as conn:
        in_store = {
            str(row[0])
            for row in conn.execute(
                "select distinct data::json->>'notes' from fieldsync_relay.ops "
                "where data::json->>'notes' = any(%s)",
                (missing,),
            ).fetchall()
        }
    via_http = 0
    async with httpx.AsyncClient(base_url=r.base, timeout=30) as client:
        for mark in missing:
            device = names[target[mark]]
            token = env.token(f"check-{device}", technician=device)
            resp = await client.get("/v1/changes", headers={"Authorization": f"Bearer {token}"})
            notes = {(op.get("data") or {}).get("notes") for op in resp.json()["ops"]}
            via_http += mark in notes
    await asyncio.sleep(10)
    late = sum(1 for m in missing if m in arrived)
    log(
        f"latency: {len(missing)} changes not pushed within 10 s (e.g. {missing[:4]}): "
        f"{len(in_store)} were in the store's op logs at that point, {via_http} were served by "
        f"GET /v1/changes from scratch, {late} arrived on their stream in the next 10 s"
    )


FANOUT_RULES = (
    WO_RULES
    + """
[[bucket]]
name = "bulletin"

[[bucket.table]]
table = "public.bulletins"
"""
)


def case_fanout(env: Env, args: argparse.Namespace, results: Results) -> None:
    """One commit to a global bucket that every connected device syncs (store path)."""
    devices = args.devices
    source = env.new_db("src")
    store_dsn = env.new_db("store")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(WO_DDL)
        conn.execute("create table bulletins (id int primary key, notes text)")
    rules_path = write_rules(env, FANOUT_RULES)
    rules = load_rules(rules_path, table_infos_from_catalog(source))
    store = PgBucketStore(store_dsn)
    store.migrate()
    http = {"max_connections": devices + 1000}
    with relay(env, store_dsn=store_dsn, source_dsn=source, rules_path=rules_path, http=http) as r:
        lat, last, commits, cpu = asyncio.run(fanout_run(env, r, store, rules, devices, args))
    store.close()
    label = f"store commit to a global bucket -> all {devices:,} devices"
    results.add("fanout", f"{label}: commits", commits, "")
    results.add("fanout", f"{label}: p50 of deliveries", percentile(lat, 50), "ms")
    p99 = percentile(lat, 99)
    last50 = percentile(last, 50)
    if devices <= 1000:
        results.add("fanout", f"{label}: p99 of deliveries", p99, "ms", "<= 150", p99 <= 150)
        results.add(
            "fanout",
            f"{label}: last device, median over commits",
            last50,
            "ms",
            "<= 200",
            last50 <= 200,
        )
    else:
        results.add("fanout", f"{label}: p99 of deliveries", p99, "ms")
        results.add(
            "fanout",
            f"{label}: last device, median over commits",
            last50,
            "ms",
            "<= 1,000",
            last50 <= 1000,
        )
    results.add("fanout", f"{label}: relay CPU per commit", cpu * 1000, "ms")


async def fanout_run(
    env: Env, r: Relay, store: PgBucketStore, rules: Rules, devices: int, args: argparse.Namespace
) -> tuple[list[float], list[float], int, float]:
    """Commits to the global bucket, one at a time: (delivery latencies, last delivery per
    commit, commits, relay CPU seconds per commit)."""
    names = [f"d{i:05d}" for i in range(1, devices + 1)]
    streams = await open_streams(r.ws, [env.token(f"dev-{n}", technician=n) for n in names])
    arrivals: dict[str, list[float]] = {}

    async def listen(ws: Any) -> None:
        with contextlib.suppress(Exception):
            async for raw in ws:
                now = time.time()
                for op in orjson.loads(raw)["ops"]:
                    notes = (op.get("data") or {}).get("notes", "")
                    if notes.startswith("b"):
                        arrivals.setdefault(notes, []).append(now)

    tasks = [asyncio.create_task(listen(ws)) for ws in streams]
    committed: dict[str, float] = {}
    commits = max(3, int(args.seconds / 2))
    cpu = 0.0
    for i in range(commits + 1):
        c0 = cpu_s(r.pid)
        mark = f"b{i}"
        await asyncio.to_thread(
            store.apply,
            rules,
            [
                RowChange(
                    "public.bulletins", ChangeKind.UPSERT, (5, i), (1,), {"id": 1, "notes": mark}
                )
            ],
        )
        if i > 0:  # the first one warms up
            committed[mark] = time.time()
        deadline = time.monotonic() + 30
        while len(arrivals.get(mark, [])) < devices and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if i > 0:
            cpu += cpu_s(r.pid) - c0
        await asyncio.sleep(0.5)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*(ws.close() for ws in streams), return_exceptions=True)
    lat = [(a - c) * 1000 for m, c in committed.items() for a in arrivals.get(m, [])]
    last = [(max(arrivals[m]) - c) * 1000 for m, c in committed.items() if m in arrivals]
    missing = sum(devices - len(arrivals.get(m, [])) for m in committed)
    if missing:
        log(f"fanout: {missing} deliveries missing")
    return lat, last, len(committed), cpu / max(1, len(committed))


# --------------------------------------------------------------------------- case 3: idle


def case_idle(env: Env, args: argparse.Namespace, results: Results) -> None:
    n = args.connections
    limit = raise_fd_limit(n + 1000)
    log(f"idle: RLIMIT_NOFILE soft limit now {limit} (the relay inherits it)")
    source = env.new_db("src")
    store_dsn = env.new_db("store")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(WO_DDL)
    rules_path = write_rules(env, WO_RULES)
    rules = load_rules(rules_path, table_infos_from_catalog(source))
    store = PgBucketStore(store_dsn)
    store.migrate()
    store.apply(
        rules,
        [
            RowChange(
                "public.work_orders",
                ChangeKind.UPSERT,
                (1, i),
                (i,),
                {"id": i, "technician": f"d{i:05d}", "notes": "start"},
            )
            for i in range(1, n + 1)
        ],
    )
    http = {"max_connections": n + 1000}
    with relay(env, store_dsn=store_dsn, source_dsn=source, rules_path=rules_path, http=http) as r:
        out = idle_run(env, r, store, rules, n)
    store.close()
    base_kib, after_kib, opened, idle_cpu, alive, sample = out
    per_conn = (after_kib - base_kib) * 1024 / max(1, opened)
    results.add(
        "idle",
        "idle WebSocket streams held by one relay process",
        opened,
        "",
        ">= 20,000",
        opened >= 20000,
    )
    results.add("idle", "relay RSS before / after (MiB)", after_kib / 1024, "MiB")
    results.add(
        "idle",
        "memory per idle connection (relay)",
        per_conn / 1024,
        "KiB",
        "<= 40",
        per_conn / 1024 <= 40,
    )
    results.add("idle", "relay CPU while all are idle (10 s)", idle_cpu * 100, "% of a core")
    results.add(
        "idle", f"streams alive after idling (push to {sample} of them)", alive, f"of {sample}"
    )
    results.notes.append(
        f"idle: relay RSS {base_kib / 1024:.0f} MiB with 1 stream, {after_kib / 1024:.0f} MiB with {opened}"
    )


CLIENT_PROCESS_STREAMS = 5000
"""Most streams one client process holds (the idle case spreads them over processes, so
the relay alone holds its side of the sockets and the clients' own fd limits suffice)."""


def idle_client(conn: Any, ws_base: str, tokens: list[str], chosen: list[int]) -> None:
    """A client process of the idle case: open a stream per token, report how many
    opened; on "ping" wait for the ping on the ``chosen`` ones and report how many got it;
    on "close" close them all."""
    raise_fd_limit(len(tokens) + 200)

    async def run() -> None:
        streams = await open_streams(ws_base, tokens)
        conn.send(("open", len(streams)))
        await asyncio.to_thread(conn.recv)

        async def got_ping(ws: Any) -> bool:
            try:
                raw = await asyncio.wait_for(ws.recv(), 15)
            except Exception:
                return False
            ops = orjson.loads(raw)["ops"]
            return any((op.get("data") or {}).get("notes") == "ping" for op in ops)

        alive = sum(await asyncio.gather(*(got_ping(streams[i]) for i in chosen)))
        conn.send(("alive", alive))
        await asyncio.to_thread(conn.recv)
        await asyncio.gather(*(ws.close() for ws in streams), return_exceptions=True)

    asyncio.run(run())
    conn.send(("closed", 0))


def idle_run(
    env: Env, r: Relay, store: PgBucketStore, rules: Rules, n: int
) -> tuple[int, int, int, float, int, int]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")

    def start_client(tokens: list[str], picked: list[int]) -> tuple[Any, Any]:
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=idle_client, args=(theirs, r.ws, tokens, picked), daemon=True)
        proc.start()
        return proc, mine

    warm = start_client([env.token("warm", technician="d00001")], [])
    if not warm[1].poll(120):
        raise RuntimeError("idle: the warm-up stream did not open")
    warm[1].recv()
    time.sleep(1)
    base = rss_kib(r.pid)
    t0 = time.perf_counter()
    sample = min(200, n)
    chosen = set(random.Random(3).sample(range(1, n + 1), sample))
    ids = list(range(1, n + 1))
    parts = [ids[i : i + CLIENT_PROCESS_STREAMS] for i in range(0, n, CLIENT_PROCESS_STREAMS)]
    clients = [
        start_client(
            [env.token(f"dev-{i}", technician=f"d{i:05d}") for i in part],
            [k for k, i in enumerate(part) if i in chosen],
        )
        for part in parts
    ]
    opened = 0
    for _, pipe in clients:
        if pipe.poll(900):
            opened += pipe.recv()[1]
    log(
        f"idle: {opened} streams open in {time.perf_counter() - t0:.1f}s "
        f"({len(clients)} client processes)"
    )
    time.sleep(5)
    after = rss_kib(r.pid)
    c0 = cpu_s(r.pid)
    time.sleep(10)
    idle_cpu = (cpu_s(r.pid) - c0) / 10
    store.apply(
        rules,
        [
            RowChange(
                "public.work_orders",
                ChangeKind.UPSERT,
                (3, k),
                (i,),
                {"id": i, "technician": f"d{i:05d}", "notes": "ping"},
            )
            for k, i in enumerate(sorted(chosen))
        ],
    )
    alive = 0
    everyone = [*clients, warm]
    for _, pipe in everyone:
        pipe.send("ping")
    for _, pipe in everyone:
        if pipe.poll(60):
            alive += pipe.recv()[1]
    for _, pipe in everyone:
        pipe.send("close")
    for proc, pipe in everyone:
        with contextlib.suppress(EOFError, OSError):
            if pipe.poll(60):
                pipe.recv()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return base, after, opened, idle_cpu, alive, sample


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "cases", nargs="*", choices=["pull", "latency", "fanout", "idle", []], default=[]
    )
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--page-ops", type=int, default=0, help="http.max_page_ops (0: default)")
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--rate", type=float, default=100.0, help="commits per second (latency)")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--path", choices=["full", "store"], default="full")
    p.add_argument("--connections", type=int, default=5000)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--no-deflate", action="store_true", help="streams without permessage-deflate")
    bench_support.add_service_flags(p)
    args = p.parse_intermixed_args(argv)
    cases = args.cases or ["pull", "latency", "idle"]
    global DEFLATE
    DEFLATE = not args.no_deflate
    if args.quick:
        args.rows, args.devices, args.seconds, args.connections = 20000, 50, 3, 200
    raise_fd_limit(2 * args.devices + 1000)
    results = Results(echo=True)
    with bench_support.services(
        args.pg_dsn,
        args.kafka_bootstrap,
        kafka="latency" in cases and args.path == "full",
        pg_conf={"shared_buffers": "512MB"},
    ) as svc:
        env = Env(svc)
        for case in cases:
            log(f"--- {case}")
            {
                "pull": case_pull,
                "latency": case_latency,
                "fanout": case_fanout,
                "idle": case_idle,
            }[case](env, args, results)
    print()
    print(results.table())
    for note in results.notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
