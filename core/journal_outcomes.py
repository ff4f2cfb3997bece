"""What became of a journal entry: :class:`Outcome` and the ``{prefix}._outcomes`` records.

The applier publishes the outcome of every entry it judged (applied, merged, conflict,
rejected, and later resolved) to ``{prefix}._outcomes``, keyed by the device id, several
outcomes of one device per record (:func:`encode_outcomes` / :func:`decode_outcomes`);
the relay passes them on to their device (docs/journal.md, "Outcomes").  A record that
cannot be read raises :class:`core.errors.JournalFormatError` naming what is wrong.

:class:`Outcome` is a frozen dataclass with its ``__init__`` written out (see
core/journal_format.py): compiled by mypyc, its fields are set by plain stores.

Pure: no I/O; values are immutable and can be shared between threads.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from core.errors import JournalFormatError
from core.journal_format import MAX_BIGINT, RECORD_VERSION, is_seq, valid_device_id
from core.values import dump_json, is_int

__all__ = [
    "Outcome",
    "OutcomeKind",
    "decode_outcomes",
    "encode_outcomes",
    "parse_visible_after",
]


class OutcomeKind(enum.StrEnum):
    """What became of an entry (docs/journal.md, "Outcomes")."""

    APPLIED = "applied"
    MERGED = "merged"
    CONFLICT = "conflict"
    REJECTED = "rejected"
    RESOLVED = "resolved"


@dataclass(frozen=True, init=False)
class Outcome:
    """What became of one entry.  ``{prefix}._outcomes`` records (Kafka key: the device
    id) carry the outcomes of one device, several at a time (:func:`encode_outcomes`).
    ``row`` is the row afterwards as the device sees it (its columns
    only; None when the row does not exist), ``columns`` the per-column decisions of a
    merge (``device``, ``server``, ``equal``, ``combined``, ``held``), ``conflict`` the
    kept conflict (``id``, ``columns`` with ``base``/``server``/``device`` values, or
    ``row``: both versions), ``reason``/``message`` say why (rejections, row-level
    decisions).  Several outcomes may be published for one seq (``conflict`` then
    ``resolved``); a consumer keeps the latest per ``(device_id, seq)``.

    ``visible_after`` (set only when the applier wrote the entry's row in PostgreSQL): the
    WAL insert position the applier read after writing the row and before committing.
    Every change event of that write, and of any later version of the row, has a
    ``commit_lsn`` at or above it; every earlier version's is below it.  A device keeps
    the edit on top of its row until it has received a version at or above it
    (docs/journal.md, "Outcomes")."""

    device_id: str
    seq: int
    kind: OutcomeKind
    table: str | None = None
    key: tuple[Any, ...] | None = None
    reason: str | None = None
    message: str = ""
    row: Mapping[str, Any] | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    conflict: Mapping[str, Any] | None = None
    hlc: str | None = None
    at_us: int = 0
    visible_after: int | None = None

    def __init__(
        self,
        device_id: str,
        seq: int,
        kind: OutcomeKind,
        table: str | None = None,
        key: tuple[Any, ...] | None = None,
        reason: str | None = None,
        message: str = "",
        row: Mapping[str, Any] | None = None,
        columns: Mapping[str, str] | None = None,
        conflict: Mapping[str, Any] | None = None,
        hlc: str | None = None,
        at_us: int = 0,
        visible_after: int | None = None,
    ) -> None:
        object.__setattr__(self, "device_id", device_id)
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "message", message)
        object.__setattr__(self, "row", row)
        object.__setattr__(self, "columns", {} if columns is None else columns)
        object.__setattr__(self, "conflict", conflict)
        object.__setattr__(self, "hlc", hlc)
        object.__setattr__(self, "at_us", at_us)
        object.__setattr__(self, "visible_after", visible_after)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": RECORD_VERSION,
            "device_id": self.device_id,
            "seq": self.seq,
            "outcome": self.kind.value,
            "table": self.table,
            "key": list(self.key) if self.key is not None else None,
            "reason": self.reason,
            "message": self.message,
            "row": dict(self.row) if self.row is not None else None,
            "columns": dict(self.columns),
            "conflict": dict(self.conflict) if self.conflict is not None else None,
            "hlc": self.hlc,
            "at_us": self.at_us,
        }
        if self.visible_after is not None:
            out["visible_after"] = self.visible_after
        return out

    def with_visible_after(self, position: int) -> Outcome:
        """This outcome with ``visible_after`` set: ``dataclasses.replace`` without its
        per-call walk over the fields (the applier calls it for every written entry)."""
        return Outcome(
            self.device_id,
            self.seq,
            self.kind,
            self.table,
            self.key,
            self.reason,
            self.message,
            self.row,
            self.columns,
            self.conflict,
            self.hlc,
            self.at_us,
            position,
        )

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Outcome:
        if not valid_device_id(obj.get("device_id")) or not is_seq(obj.get("seq")):
            raise JournalFormatError(
                f"outcome has no valid device_id and seq (1 to {MAX_BIGINT}): {str(obj)[:200]}"
            )
        try:
            key = obj.get("key")
            return cls(
                device_id=str(obj["device_id"]),
                seq=int(obj["seq"]),
                kind=OutcomeKind(obj["outcome"]),
                table=obj.get("table"),
                key=tuple(key) if isinstance(key, list) else None,
                reason=obj.get("reason"),
                message=str(obj.get("message") or ""),
                row=obj.get("row"),
                columns=dict(obj.get("columns") or {}),
                conflict=obj.get("conflict"),
                hlc=obj.get("hlc"),
                at_us=int(obj.get("at_us") or 0),
                visible_after=parse_visible_after(obj.get("visible_after"), obj.get("seq")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise JournalFormatError(f"not an outcome record: {str(obj)[:200]}") from exc


def parse_visible_after(value: object, seq: object = None) -> int | None:
    """An outcome's ``visible_after``: None when absent (null), else a WAL position 0 ..
    :data:`MAX_BIGINT` given as a JSON integer or its decimal text; anything else raises
    :class:`JournalFormatError` naming the outcome's seq and the value."""
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if is_int(value) and 0 <= value <= MAX_BIGINT:
        return value
    raise JournalFormatError(
        f"outcome of entry {seq}: visible_after must be a WAL position, an integer 0 to "
        f"{MAX_BIGINT} (or its decimal text), not {str(value)[:40]!r}"
    )


def encode_outcomes(outcomes: Sequence[Outcome]) -> bytes:
    """The value of one ``{prefix}._outcomes`` record: outcomes of one device, in order::

    {"v": 1, "device_id": …, "outcomes": [outcome, …]}
    """
    if not outcomes or len({o.device_id for o in outcomes}) != 1:
        raise ValueError("an outcomes record holds the outcomes of exactly one device")
    return dump_json(
        {
            "v": RECORD_VERSION,
            "device_id": outcomes[0].device_id,
            "outcomes": [o.to_json() for o in outcomes],
        }
    )


def decode_outcomes(data: bytes) -> list[Outcome]:
    """The outcomes of one ``{prefix}._outcomes`` record."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise JournalFormatError(f"outcomes record is not JSON: {exc}") from exc
    if (
        not isinstance(obj, dict)
        or obj.get("v") != RECORD_VERSION
        or not isinstance(obj.get("outcomes"), list)
    ):
        raise JournalFormatError(
            f"not an outcomes record (version {RECORD_VERSION}): {str(data)[:120]}"
        )
    return [Outcome.from_json(o) for o in obj["outcomes"]]
