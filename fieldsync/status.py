"""``fieldsync status``: one view of the whole pipeline, composed of what each component
reads about itself.

Parts, each read by its component's own function (this module only composes them and
judges the result against :class:`Bounds`):

- ``cdc``: the slot and the resume position (:func:`cdc.status.read_status`, what
  ``fieldsync cdc status`` shows);
- ``engine``: the bucket engine's committed offsets and leadership in the bucket store
  (:func:`relay.downstream.engine_status.read_engine_progress`) against the end offsets
  of the change topics of the rules' tables (:func:`relay.kafka_offsets.partition_lag`);
- ``applier``: the applier's committed offsets, running shards and kept-aside entries in
  the captured database (:func:`relay.upstream.applier_status.read_applier_progress`)
  against the end offsets of ``{prefix}._journal``;
- ``devices``: open WebSocket streams and waiting long-polls, scraped from the relays'
  metrics endpoints (:func:`relay.metrics.read_connections`: a relay knows its
  connections in memory only), and the devices whose uploads the intake took in lately
  (:func:`relay.upstream.journal_status.read_journal_status`);
- ``conflicts``: entries whose latest outcome in the outcome store is ``conflict``.

Every part gets a :class:`State`; the report's exit code is :data:`EXIT_UNREACHABLE` when a
part could not be read, else :data:`EXIT_ATTENTION` when a part is down, behind or past a
bound, else 0.  docs/operations.md ("fieldsync status") documents the JSON keys.

Concurrency: the parts are read at the same time, one thread each (each opens and closes
its own connections and consumers), so an unreachable service costs one timeout, not one
per part.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from cdc.settings import CdcSettings
from cdc.status import read_status
from core.errors import FieldsyncError
from relay.downstream.engine_status import read_engine_progress, ruled_topics
from relay.kafka_offsets import TopicsLag, partition_lag
from relay.metrics import local_metrics_url, read_connections
from relay.settings import RelaySettings
from relay.upstream.applier_status import read_applier_progress
from relay.upstream.intake import journal_topic
from relay.upstream.journal_status import JournalStatus, read_journal_status

__all__ = [
    "EXIT_ATTENTION",
    "EXIT_UNREACHABLE",
    "PARTS",
    "Bounds",
    "Part",
    "Report",
    "State",
    "read_pipeline_status",
]

EXIT_ATTENTION: Final = 1
"""A part is down, behind or past a bound."""
EXIT_UNREACHABLE: Final = 3
"""A part could not be read (PostgreSQL, the broker, the store, a relay's metrics)."""
PARTS: Final = ("cdc", "engine", "applier", "devices", "conflicts")
FACTS: Final[dict[str, tuple[str, ...]]] = {
    "cdc": (
        "slot",
        "exists",
        "active",
        "wal_status",
        "safe_wal_size",
        "confirmed_flush_lsn",
        "current_wal_lsn",
        "lag_bytes",
        "last_event_time",
        "resnapshots",
    ),
    "engine": ("group", "leading", "lag_records", "partitions", "missing_topics"),
    "applier": (
        "consumer",
        "topic",
        "shards",
        "running_shards",
        "lag_records",
        "partitions",
        "dead_letters",
        "bad_records",
    ),
    "devices": ("connected", "streams", "long_polls", "endpoints", "uploaded_recently", "recent_s"),
    "conflicts": ("open", "devices"),
}
"""Every part's keys in the JSON report, in order: always present, null when not known."""
RECENT_S: Final = 3600.0
"""Devices that uploaded within this many seconds count as uploading lately."""


class State(enum.Enum):
    """A part's state; the order is severity (the report shows the worst)."""

    OK = "ok"
    SKIPPED = "skipped"  # no settings for it given, or nothing to read it from
    ATTENTION = "attention"  # past a bound on what waits for an operator
    BEHIND = "behind"  # lag past its bound
    DOWN = "down"  # a process that should run does not (or never ran)
    UNREACHABLE = "unreachable"


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What counts as within bounds (``None``: no bound)."""

    max_wal_lag_bytes: int = 1 << 30
    max_engine_lag: int = 10_000
    max_applier_lag: int = 10_000
    max_dead_letters: int | None = None
    max_open_conflicts: int | None = None


@dataclasses.dataclass
class Part:
    """One part of the pipeline: its state, its facts (JSON-ready: the keys of
    :data:`FACTS`, null until known), a note (why it was skipped) and its problems."""

    name: str
    state: State = State.OK
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)
    note: str | None = None

    def __post_init__(self) -> None:
        self.facts = {**dict.fromkeys(FACTS[self.name]), **self.facts}

    def flag(self, state: State, problem: str) -> None:
        """Record a problem (on one line); the part's state becomes the worse of the two."""
        order = list(State)
        if order.index(state) > order.index(self.state):
            self.state = state
        self.problems.append(" ".join(problem.split()))

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            **self.facts,
            "note": self.note,
            "problems": list(self.problems),
        }


@dataclasses.dataclass(frozen=True)
class Report:
    """Every part, in :data:`PARTS` order; the verdict is derived from their states."""

    parts: tuple[Part, ...]

    @property
    def exit_code(self) -> int:
        states = {p.state for p in self.parts}
        if State.UNREACHABLE in states:
            return EXIT_UNREACHABLE
        if states & {State.DOWN, State.BEHIND, State.ATTENTION}:
            return EXIT_ATTENTION
        return 0

    @property
    def problems(self) -> list[str]:
        return [f"{p.name}: {problem}" for p in self.parts for problem in p.problems]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.exit_code == 0,
            "exit_code": self.exit_code,
            "problems": self.problems,
            **{p.name: p.to_json() for p in self.parts},
        }


def read_pipeline_status(
    cdc: CdcSettings | None,
    relay: RelaySettings | None,
    *,
    bounds: Bounds = Bounds(),
    relay_metrics: Sequence[str] = (),
    timeout_s: float = 10.0,
) -> Report:
    """Read every part the settings allow (module docstring); never raises for a service
    that cannot be reached: that part is ``unreachable`` with the reason."""
    readers: dict[str, Callable[[], Any]] = {}
    if cdc is not None:
        readers["cdc"] = lambda: cdc_part(cdc, bounds, timeout_s)
    if relay is not None:
        readers["engine"] = lambda: engine_part(relay, bounds, timeout_s)
        readers["applier"] = lambda: applier_part(relay, bounds, timeout_s)
        readers["journal"] = lambda: _journal(relay, timeout_s)
        readers["connections"] = lambda: _connections(relay, relay_metrics, timeout_s)
    with ThreadPoolExecutor(max_workers=max(1, len(readers))) as pool:
        futures = {name: pool.submit(read) for name, read in readers.items()}
        done = {name: f.result() for name, f in futures.items()}
    skipped = "no --relay settings given"
    parts = {
        "cdc": done.get("cdc") or _skipped("cdc", "no --cdc settings given"),
        "engine": done.get("engine") or _skipped("engine", skipped),
        "applier": done.get("applier") or _skipped("applier", skipped),
    }
    if relay is None:
        parts["devices"] = _skipped("devices", skipped)
        parts["conflicts"] = _skipped("conflicts", skipped)
    else:
        parts["devices"] = devices_part(done["connections"], done["journal"])
        parts["conflicts"] = conflicts_part(done["journal"], bounds)
    return Report(tuple(parts[name] for name in PARTS))


def _skipped(name: str, why: str, facts: dict[str, Any] | None = None) -> Part:
    return Part(name, State.SKIPPED, facts or {}, note=why)


# --------------------------------------------------------------------------- cdc


def cdc_part(settings: CdcSettings, bounds: Bounds, timeout_s: float) -> Part:
    part = Part("cdc", facts={"slot": settings.postgres.slot})
    try:
        status = read_status(settings, timeout_s)
    except FieldsyncError as exc:
        part.flag(State.UNREACHABLE, f"PostgreSQL: {exc}")
        return part
    keys = ("exists", "active", "wal_status", "safe_wal_size", "confirmed_flush_lsn")
    part.facts.update({k: status.get(k) for k in keys})
    part.facts.update(
        current_wal_lsn=status.get("current_wal_lsn"),
        lag_bytes=status.get("lag_bytes"),
        last_event_time=status.get("last_event_time"),
        resnapshots=status.get("resnapshots", []),
    )
    if "kafka_error" in status:
        part.flag(State.UNREACHABLE, f"Kafka: {status['kafka_error']}")
    slot = settings.postgres.slot
    if not status["exists"]:
        part.flag(
            State.DOWN, f"replication slot {slot!r} does not exist (`fieldsync cdc run` creates it)"
        )
        return part
    if status.get("wal_status") == "lost":
        part.flag(
            State.DOWN, f"replication slot {slot!r} is lost: recover it (`fieldsync cdc recover`)"
        )
    if not status.get("active"):
        part.flag(
            State.DOWN,
            f"no cdc daemon streams from slot {slot!r} (is `fieldsync cdc run` running?)",
        )
    lag = status.get("lag_bytes") or 0
    if lag > bounds.max_wal_lag_bytes:
        part.flag(
            State.BEHIND,
            f"{lag} bytes of WAL not confirmed (bound {bounds.max_wal_lag_bytes}, --max-wal-lag-bytes)",
        )
    return part


# --------------------------------------------------------------------------- engine and applier


def _lag_facts(lag: TopicsLag) -> dict[str, Any]:
    return {
        "lag_records": lag.records,
        "partitions": [
            {
                "topic": p.topic,
                "partition": p.partition,
                "end_offset": p.end_offset,
                "next_offset": p.next_offset,
                "lag_records": p.records,
            }
            for p in lag.partitions
        ],
    }


def engine_part(settings: RelaySettings, bounds: Bounds, timeout_s: float) -> Part:
    r = settings.relay
    part = Part("engine", facts={"group": r.consumer_group})
    try:
        topics = ruled_topics(r.rules, r.topic_prefix)
        progress = read_engine_progress(
            r.store_dsn,
            group=r.consumer_group,
            password=r.store_password,
            timeout_s=timeout_s,
            shares=r.engine_shares,
        )
    except FieldsyncError as exc:
        part.flag(State.UNREACHABLE, str(exc))
        return part
    part.facts["leading"] = progress.leading
    try:
        lag = partition_lag(
            settings.kafka_client_kwargs(), list(topics), progress.applied, timeout_s=timeout_s
        )
    except FieldsyncError as exc:
        part.flag(State.UNREACHABLE, str(exc))
    else:
        part.facts.update(_lag_facts(lag))
        part.facts["missing_topics"] = list(lag.missing_topics)
        if lag.records > bounds.max_engine_lag:
            part.flag(
                State.BEHIND,
                f"{lag.records} change records not applied (bound {bounds.max_engine_lag}, "
                "--max-engine-lag)",
            )
    if not progress.migrated:
        part.flag(State.DOWN, "the bucket store has no engine tables: no relay ever ran on it")
    elif not progress.leading and r.engine_shares > 1:
        unled = ", ".join(str(s) for s in progress.unled)
        part.flag(
            State.DOWN,
            f"no relay runs the bucket engine of share(s) {unled} of {r.engine_shares} of group "
            f"{r.consumer_group!r} (is a `fieldsync relay run` running for each share?)",
        )
    elif not progress.leading:
        part.flag(
            State.DOWN,
            f"no relay runs the bucket engine of group {r.consumer_group!r} "
            "(is `fieldsync relay run` running?)",
        )
    return part


def applier_part(settings: RelaySettings, bounds: Bounds, timeout_s: float) -> Part:
    j = settings.journal
    topic = journal_topic(settings.relay.topic_prefix)
    facts = {"consumer": j.consumer, "topic": topic, "shards": j.shards}
    captured = settings.captured_dsn()
    if captured is None:
        return _skipped("applier", "neither journal.dsn nor relay.source_dsn is set", facts)
    part = Part("applier", facts=facts)
    try:
        progress = read_applier_progress(
            captured[0],
            consumer=j.consumer,
            topic=topic,
            shards=j.shards,
            password=captured[1],
            timeout_s=timeout_s,
        )
    except FieldsyncError as exc:
        part.flag(State.UNREACHABLE, str(exc))
        return part
    part.facts.update(
        running_shards=list(progress.running_shards),
        dead_letters=progress.dead_letters,
        bad_records=progress.bad_records,
    )
    try:
        applied = {(topic, p): o for p, o in progress.applied.items()}
        lag = partition_lag(settings.kafka_client_kwargs(), [topic], applied, timeout_s=timeout_s)
    except FieldsyncError as exc:
        part.flag(State.UNREACHABLE, str(exc))
    else:
        part.facts.update(_lag_facts(lag))
        if lag.records > bounds.max_applier_lag:
            part.flag(
                State.BEHIND,
                f"{lag.records} journal records not applied (bound {bounds.max_applier_lag}, "
                "--max-applier-lag)",
            )
    _judge_applier(part, progress.migrated, j.shards, progress.running_shards, bounds)
    return part


def _judge_applier(
    part: Part, migrated: bool, shards: int, running: Sequence[int], bounds: Bounds
) -> None:
    kept = part.facts["dead_letters"] + part.facts["bad_records"]
    if bounds.max_dead_letters is not None and kept > bounds.max_dead_letters:
        part.flag(
            State.ATTENTION,
            f"{kept} entries kept aside (dead letters and unreadable records; bound "
            f"{bounds.max_dead_letters}, --max-dead-letters)",
        )
    if not migrated:
        part.flag(State.DOWN, "the captured database has no applier tables: no applier ever ran")
        return
    missing = [s for s in range(shards) if s not in running]
    if missing:
        part.flag(
            State.DOWN,
            f"applier shard(s) {', '.join(map(str, missing))} of {shards} not running "
            "(`fieldsync relay applier --shard N`)",
        )


# --------------------------------------------------------------------------- devices and conflicts


def _journal(settings: RelaySettings, timeout_s: float) -> JournalStatus | FieldsyncError:
    r = settings.relay
    try:
        return read_journal_status(
            r.store_dsn, password=r.store_password, recent_s=RECENT_S, timeout_s=timeout_s
        )
    except FieldsyncError as exc:
        return exc


def _connections(settings: RelaySettings, urls: Sequence[str], timeout_s: float) -> list[Any] | str:
    """Each endpoint's :class:`relay.metrics.Connections` or error; a string when there
    is no endpoint to read (why)."""
    listen = settings.relay.metrics_listen
    if not urls:
        url = local_metrics_url(listen)
        if url is None:
            return (
                "relay.metrics_listen is off"
                if not listen
                else f"relay.metrics_listen = {listen!r} takes any free port: give --relay-metrics URL"
            )
        urls = [url]
    out: list[Any] = []
    for url in urls:
        try:
            out.append(read_connections(url, timeout_s))
        except FieldsyncError as exc:
            out.append(exc)
    return out


def devices_part(connections: list[Any] | str, journal: JournalStatus | FieldsyncError) -> Part:
    part = Part("devices")
    if isinstance(journal, JournalStatus):
        part.facts["uploaded_recently"] = journal.uploading_devices
        part.facts["recent_s"] = journal.recent_s
    if isinstance(connections, str):
        part.state, part.note = State.SKIPPED, connections
        return part
    read = [c for c in connections if not isinstance(c, FieldsyncError)]
    if read:
        streams = sum(c.streams for c in read)
        polls = sum(c.long_polls for c in read)
        part.facts.update(
            connected=streams + polls,
            streams=streams,
            long_polls=polls,
            endpoints=[c.url for c in read],
        )
    for c in connections:
        if isinstance(c, FieldsyncError):
            part.flag(State.UNREACHABLE, str(c))
    return part


def conflicts_part(journal: JournalStatus | FieldsyncError, bounds: Bounds) -> Part:
    part = Part("conflicts")
    if isinstance(journal, FieldsyncError):
        part.flag(State.UNREACHABLE, str(journal))
        return part
    part.facts.update(open=journal.open_conflicts, devices=journal.conflict_devices)
    bound = bounds.max_open_conflicts
    if bound is not None and journal.open_conflicts > bound:
        part.flag(
            State.ATTENTION,
            f"{journal.open_conflicts} conflicts wait for a resolution (bound {bound}, "
            "--max-open-conflicts)",
        )
    return part
