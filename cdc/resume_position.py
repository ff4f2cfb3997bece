"""The resume position: the last event position Kafka holds for a slot.

cdc writes it to the state topic (``{prefix}._cdc_state``, keyed by slot) in the same Kafka
transaction as the events it covers (cdc/kafka_sink.py), and reads it at start-up to know
where the replication stream resumes (cdc/kafka_state.py).  Pure: a value and its JSON.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

__all__ = ["ResumePosition"]


@dataclass(frozen=True, slots=True)
class ResumePosition:
    """The last event position Kafka holds for a slot."""

    commit_lsn: int
    seq: int
    complete: bool  # the whole transaction at commit_lsn is in Kafka
    snapshot_done: bool = True
    commit_ts_us: int = 0  # commit time of the transaction at commit_lsn (0 = snapshot)
    # `fieldsync cdc recover` is under way (cdc/slot_recovery.py): the daemon does not start
    recovering: bool = False

    def to_json(self) -> bytes:
        record: dict[str, object] = {
            "commit_lsn": self.commit_lsn,
            "seq": self.seq,
            "complete": self.complete,
            "snapshot_done": self.snapshot_done,
            "commit_ts_us": self.commit_ts_us,
            "written_at_us": int(time.time() * 1_000_000),
        }
        if self.recovering:
            record["recovering"] = True
        return json.dumps(record, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ResumePosition:
        d = json.loads(data)
        return cls(
            int(d["commit_lsn"]),
            int(d["seq"]),
            bool(d["complete"]),
            bool(d.get("snapshot_done", True)),
            int(d.get("commit_ts_us", 0)),
            bool(d.get("recovering", False)),
        )
