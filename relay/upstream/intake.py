"""The journal intake's decisions: what the relay answers for each uploaded entry.

For an upload already read and checked for its structure
(:func:`relay.upstream.validation.parse_upload`), :func:`judge_upload` gives each entry
its ``{prefix}._journal`` record and its :class:`IntakeDecision` (``accepted`` or
``rejected`` with the reason): entries that could not be read are rejected as read;
the others are judged by the ordering rule (``blocked`` when ``prev_seq`` was rejected,
here or at an earlier upload) and by :func:`relay.upstream.validation.validate_entry`
against the device's write scope.  *Every* entry becomes a record, rejected ones
included (the applier records their outcome).

:func:`latest_per_entry` is the outcome store's rule: one outcome per ``(device_id,
seq)``, the latest, except that ``resolved`` is final.  :class:`JournalApiConfig` tunes
the endpoints (:mod:`relay.upstream.journal_api`).

Pure: no I/O; safe from any thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from core.journal_format import JournalEntry, JournalRecord, Rejection
from core.journal_outcomes import Outcome, OutcomeKind
from relay.upstream.validation import JournalLimits, RejectedUpload, blocked_by, validate_entry
from relay.upstream.write_rules import WriteScope

__all__ = [
    "IntakeDecision",
    "JournalApiConfig",
    "journal_topic",
    "judge_upload",
    "latest_per_entry",
    "outcomes_topic",
]


def journal_topic(prefix: str) -> str:
    """The topic of device journal records (intake → applier)."""
    return f"{prefix}._journal"


def outcomes_topic(prefix: str) -> str:
    """The topic of entry outcomes (applier → outcome store)."""
    return f"{prefix}._outcomes"


@dataclasses.dataclass(frozen=True)
class JournalApiConfig:
    """Tuning of the journal endpoints."""

    prefix: str = "fieldsync"
    limits: JournalLimits = dataclasses.field(default_factory=JournalLimits)
    long_poll_s: float = 30.0
    max_page_outcomes: int = 1000
    kafka_timeout_s: float = 30.0
    topic_partitions: int = 4

    def __post_init__(self) -> None:
        if self.max_page_outcomes < 1 or self.kafka_timeout_s <= 0 or self.long_poll_s < 0:
            raise ValueError("JournalApiConfig: max_page_outcomes >= 1, kafka_timeout_s > 0")

    @property
    def journal_topic(self) -> str:
        return journal_topic(self.prefix)

    @property
    def outcomes_topic(self) -> str:
        return outcomes_topic(self.prefix)


@dataclasses.dataclass(frozen=True)
class IntakeDecision:
    """The intake's answer for one entry (what the intake record keeps)."""

    status: Literal["accepted", "rejected"]
    reason: str | None = None
    message: str = ""

    @classmethod
    def of(cls, rejection: Rejection | None) -> IntakeDecision:
        if rejection is None:
            return cls("accepted")
        return cls("rejected", rejection.reason.value, rejection.message)

    def to_json(self, seq: int, duplicate: bool) -> dict[str, Any]:
        return {
            "seq": seq,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "duplicate": duplicate,
        }


def _decision(status: str, reason: str | None, message: str | None) -> IntakeDecision:
    return IntakeDecision("rejected" if status == "rejected" else "accepted", reason, message or "")


def judge_upload(
    items: Sequence[JournalEntry | RejectedUpload],
    scope: WriteScope,
    earlier: Mapping[int, IntakeDecision],
    device_id: str,
    claims: Mapping[str, Any],
    now_us: int,
) -> list[tuple[JournalRecord, IntakeDecision]]:
    """The ``_journal`` record and the answer of each item (in order).

    ``earlier``: intake decisions already recorded for seqs the items may name as
    ``prev_seq``.  The ordering rule: an entry whose ``prev_seq`` was rejected (here or
    earlier, ``blocked`` included) is rejected as ``blocked``; nothing else blocks."""
    decided: dict[int, IntakeDecision] = dict(earlier)

    def outcome_of(seq: int) -> tuple[str, str | None] | None:
        found = decided.get(seq)
        if found is None:
            return None
        return ("rejected", found.reason) if found.status == "rejected" else ("accepted", None)

    out: list[tuple[JournalRecord, IntakeDecision]] = []
    for item in items:
        if isinstance(item, RejectedUpload):
            record = JournalRecord(device_id, item.seq, None, claims, item.rejection, now_us)
            rejection: Rejection | None = item.rejection
        else:
            rejection = blocked_by(item, outcome_of)
            entry = item
            if rejection is None:
                entry, rejection = validate_entry(item, scope)
            record = JournalRecord(device_id, item.seq, entry, claims, rejection, now_us)
        decision = IntakeDecision.of(rejection)
        decided[item.seq] = decision
        out.append((record, decision))
    return out


def latest_per_entry(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """One outcome per ``(device_id, seq)``: the latest, except that a ``resolved`` one is
    never replaced by another kind (the first ``resolved`` is replaced only by a later
    ``resolved``).  In the order each key was first seen."""
    latest: dict[tuple[str, int], Outcome] = {}
    for o in outcomes:
        key = (o.device_id, o.seq)
        old = latest.get(key)
        if (
            old is not None
            and old.kind is OutcomeKind.RESOLVED
            and o.kind is not OutcomeKind.RESOLVED
        ):
            continue
        latest[key] = o
    return list(latest.values())
