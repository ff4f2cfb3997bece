"""Outcome records that fit Kafka (pure, no I/O).

The applier's outbox holds one ``{prefix}._outcomes`` record per device and batch
(:func:`core.journal_outcomes.encode_outcomes`): every outcome carries the row afterwards,
so a batch of edits of large rows, or one edit of a row grown large on the server, makes a
record larger than the producer and a broker take by default (1 MiB).  Such a record was
refused at every try, and the applier stopped publishing outcomes for every device.
:func:`fit_outcome_records` splits it, in order, into records of at most ``limit`` bytes;
an outcome too large alone loses its ``row`` (the device has the row from its download),
then its conflict versions and column decisions (the conflict's id stays: it is resolved
through the relay), each loss said in its ``message``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from core.journal_outcomes import Outcome, decode_outcomes, encode_outcomes

__all__ = ["OUTCOME_RECORD_BYTES", "fit_outcome_records"]

OUTCOME_RECORD_BYTES: Final = 1_000_000
"""Largest ``_outcomes`` record value the applier sends: under kafka-python's default
``max_request_size`` and a broker's default ``message.max.bytes`` (1 MiB) with the key and
the record's framing."""

MESSAGE_CHARS: Final = 2000
"""An outcome's message is cut to this many characters when it alone is too large."""


def fit_outcome_records(payload: bytes, limit: int = OUTCOME_RECORD_BYTES) -> list[bytes]:
    """``payload`` (an outcomes record) as records of at most ``limit`` bytes, the outcomes
    in their order; ``[payload]`` when it fits."""
    if len(payload) <= limit:
        return [payload]
    records: list[bytes] = []
    chunk: list[Outcome] = []
    size = 0
    for outcome in decode_outcomes(payload):
        fitted, alone = _fitted(outcome, limit)
        if chunk and size + alone > limit:  # each alone holds the header: sums overestimate
            records.append(encode_outcomes(chunk))
            chunk, size = [], 0
        chunk.append(fitted)
        size += alone
    if chunk:
        records.append(encode_outcomes(chunk))
    return records


def _fitted(outcome: Outcome, limit: int) -> tuple[Outcome, int]:
    """The outcome, cut until a record of it alone fits ``limit``; and that record's size."""
    size = len(encode_outcomes([outcome]))
    if size <= limit:
        return outcome, size
    cut = _replaced(
        outcome,
        row=None,
        message=_noted(
            outcome.message,
            f"the row afterwards is left out of this outcome ({size} bytes; outcome "
            f"records hold at most {limit}): the download brings it",
        ),
    )
    size = len(encode_outcomes([cut]))
    if size > limit:
        conflict = cut.conflict
        cut = _replaced(
            cut,
            columns={},
            conflict=None if conflict is None else {"id": conflict.get("id")},
            message=_noted(
                cut.message,
                "its column decisions and conflict versions are left out too "
                "(the relay's conflicts endpoint has them)",
            ),
        )
        size = len(encode_outcomes([cut]))
    if size > limit:
        cut = _replaced(cut, message=cut.message[:MESSAGE_CHARS])
        size = len(encode_outcomes([cut]))
    return cut, size


def _replaced(
    o: Outcome,
    *,
    row: Mapping[str, Any] | None = None,
    message: str | None = None,
    columns: Mapping[str, str] | None = None,
    conflict: Mapping[str, Any] | None = None,
) -> Outcome:
    """``o`` with ``row`` (always), and ``message``, ``columns``, ``conflict`` when given."""
    return Outcome(
        o.device_id,
        o.seq,
        o.kind,
        o.table,
        o.key,
        o.reason,
        o.message if message is None else message,
        row,
        o.columns if columns is None else columns,
        o.conflict if conflict is None else conflict,
        o.hlc,
        o.at_us,
        o.visible_after,
    )


def _noted(message: str, note: str) -> str:
    return f"{message} ({note})" if message else note
