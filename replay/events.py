"""What a read of the change log hands out: decoded events and the counts of a read.

A :class:`ChangeEvent` is one change event of docs/events.md decoded with the schema it
names, with where it was read (topic, partition, offset) and its position.  A
:class:`ReadStats` counts what one read saw (records fetched, events handed out,
duplicates and tombstones dropped, records outside the range).

Plain values, no I/O; each belongs to the read that made it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from replay.bounds import Pos, format_position

__all__ = ["ChangeEvent", "Prefilter", "Progress", "ReadStats"]


@dataclasses.dataclass(slots=True)
class ChangeEvent:
    """A decoded change event with where it was read."""

    table: str
    position: Pos
    op: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    before_kind: str | None
    unchanged: list[str]
    source: dict[str, Any]
    fingerprint: bytes
    topic: str
    partition: int
    offset: int
    ts_us: int = 0  # when cdc encoded it
    key_fingerprint: bytes | None = None  # of the Kafka key's schema; None: no Kafka key

    @property
    def commit_ts_us(self) -> int:
        """Commit time (µs); 0 for snapshot reads."""
        return int(self.source.get("commit_ts_us") or 0)

    @property
    def time_us(self) -> int:
        """The event's time for time bounds: its commit time, or for a snapshot read
        (which has none) the time cdc read it."""
        return int(self.source.get("commit_ts_us") or self.ts_us)

    @property
    def origin(self) -> str | None:
        origin = self.source.get("origin")
        return str(origin) if origin is not None else None


@dataclasses.dataclass
class ReadStats:
    """What a read saw."""

    records: int = 0  # Kafka records fetched (table topics)
    events: int = 0  # events handed out (in range, decoded)
    duplicates: int = 0  # dropped: position not above the last one
    tombstones: int = 0  # null values skipped
    skipped: int = 0  # outside the range or filtered before decoding
    total: int = 0  # records the read expects to fetch (for progress), 0 if unknown
    first_position: Pos | None = None
    last_position: Pos | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("first_position", "last_position"):
            pos = getattr(self, name)
            out[name] = format_position(pos) if pos is not None else None
        return out


Progress = Callable[[int, int], None]  # (records fetched, records expected or 0)
Prefilter = Callable[[Any], bool]  # raw Kafka record -> decode it?
