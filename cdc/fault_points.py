"""Named crash points in the delivery protocol, armed only by tests.

The crash tests (``tests/cdc/test_cdc_crash.py``) prove that a daemon killed at any
moment loses nothing.  Random SIGKILLs rarely land in the narrow windows that
matter, so the code names those windows, and a test can make the daemon kill
itself exactly there::

    FIELDSYNC_FAULT_POINTS="after_kafka_commit:3,spill_replay:20000"

means: die with SIGKILL the 3rd time the daemon passes ``after_kafka_commit``,
or the 20 000th time it passes ``spill_replay``, whichever comes first.  The
variable is read once, when this module is imported (a process start); unset
(production), :data:`FAULTS` is disarmed and each site costs one attribute
test.  The process kills itself with SIGKILL (no cleanup, no buffered output
flushed, exactly like ``kill -9``), after logging one line
``fault point NAME reached: SIGKILL`` on stderr so a test can tell which window
it hit.

Points (the site's docstring or comment says what has happened at that moment):

==========================  ===========================================================
``after_events_sent``        a batch's events are on the broker, its resume position
                             is not (the Kafka transaction is still open)
``before_kafka_commit``      events and resume position are on the broker, the Kafka
                             transaction is not committed
``after_kafka_commit``       the Kafka transaction is committed, the slot's flush
                             position has not been sent to PostgreSQL
``streamed_txn_end``         Kafka holds every event of a streamed transaction (a
                             committed batch), not the record that it is complete
``snapshot_batch``           a batch of the initial snapshot is committed, the
                             snapshot is not finished
``spill_replay``             a streamed transaction is being replayed from the spill
                             store (counted per replayed message)
``resnapshot_chunk``         a re-snapshot chunk's rows are handed to the sink, the
                             Kafka transaction holding them is not committed
``retire_deletes``           the deletes of a table's old keys (its key schema
                             changed) are handed to the sink, not committed
``recover_new_slot``         ``fieldsync cdc recover``: the new slot exists and the
                             re-snapshots are requested; the deletes and the resume
                             position are not written (the recovery mark stays)
==========================  ===========================================================

Concurrency: one thread (the pipeline's) passes the points.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Final

ENV_VAR: Final = "FIELDSYNC_FAULT_POINTS"

POINTS: Final = frozenset(
    {
        "after_events_sent",
        "before_kafka_commit",
        "after_kafka_commit",
        "streamed_txn_end",
        "snapshot_batch",
        "spill_replay",
        "recover_new_slot",
        "resnapshot_chunk",
        "retire_deletes",
    }
)


def _sigkill_self(name: str) -> None:
    sys.stderr.write(f"fault point {name} reached: SIGKILL\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class FaultPoints:
    """Countdowns per point name; :meth:`due` says when one has run out."""

    def __init__(
        self, countdowns: Mapping[str, int], die: Callable[[str], None] = _sigkill_self
    ) -> None:
        unknown = sorted(set(countdowns) - POINTS)
        if unknown:
            raise ValueError(
                f"{ENV_VAR}: unknown fault point(s) {unknown}; known: {sorted(POINTS)}"
            )
        bad = sorted(name for name, n in countdowns.items() if n < 1)
        if bad:
            raise ValueError(f"{ENV_VAR}: the countdown of {bad} must be at least 1")
        self._left = dict(countdowns)
        self._die = die
        self.armed = bool(self._left)

    @classmethod
    def parse(cls, spec: str, die: Callable[[str], None] = _sigkill_self) -> FaultPoints:
        """``"name:countdown,name:countdown"`` (countdown defaults to 1)."""
        countdowns: dict[str, int] = {}
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            name, _, count = part.partition(":")
            try:
                countdowns[name.strip()] = int(count) if count.strip() else 1
            except ValueError:
                raise ValueError(
                    f"{ENV_VAR}: {part!r} is not name:countdown (countdown an integer)"
                ) from None
        return cls(countdowns, die)

    def due(self, name: str) -> bool:
        """Count one pass of ``name``; True when its countdown has just run out.

        The caller may then bring about the state the point stands for and call
        :meth:`crash`."""
        left = self._left.get(name)
        if left is None:
            return False
        left -= 1
        self._left[name] = left
        return left == 0

    def crash(self, name: str) -> None:
        self._die(name)

    def hit(self, name: str) -> None:
        """Count one pass of ``name`` and crash when its countdown runs out."""
        if self.due(name):
            self._die(name)


FAULTS: Final = FaultPoints.parse(os.environ.get(ENV_VAR, ""))
"""The process's fault points, from ``FIELDSYNC_FAULT_POINTS`` (disarmed when unset)."""
