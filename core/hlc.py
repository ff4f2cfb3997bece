"""Hybrid logical clock (HLC): physical milliseconds + a logical counter + the node id.

A hybrid logical clock (Kulkarni, Demirbas et al., "Logical Physical Clocks and
Consistent Snapshots in Globally Distributed Databases", 2014) gives every event a
timestamp ``(l, c, node)`` such that

- timestamps of one node strictly increase, even when its wall clock goes backwards;
- if event *e* happened before event *f* (same node, or *f* received a message that
  carried *e*'s timestamp), then ``ts(e) < ts(f)``;
- ``l`` stays close to physical time: it is the largest wall-clock reading (in ms) the
  node has seen, its own or in a received timestamp, so it never runs ahead of the
  fastest clock in the system; ``c`` counts events within the same ``l``.

Timestamps are totally ordered by ``(physical_ms, logical, node)``; the node id breaks
ties between different nodes deterministically.

Encoding (:meth:`Hlc.encode`): ``"%012x.%04x.%s" % (physical_ms, logical, node)``, e.g.
``0189f3c2a1b0.0003.tablet-7``.  The fixed-width lower-case hex fields make *string*
order equal to timestamp order.  :meth:`Hlc.to_int` packs ``physical_ms << 16 |
logical`` into one sortable integer (without the node).

Algorithm (the paper's, with ``pt`` the wall clock in ms):

- local event or send: ``l' = max(l, pt)``; ``c = c + 1`` if ``l' == l`` else ``0``;
- receive of ``(lm, cm)``: ``l' = max(l, lm, pt)``; ``c`` becomes ``max(c, cm) + 1`` if
  ``l' == l == lm``, ``c + 1`` if only ``l' == l``, ``cm + 1`` if only ``l' == lm``,
  else ``0``.

If the counter would pass 0xFFFF, ``l`` moves on by one millisecond and the counter
restarts at 0 (65 536 events within one millisecond).  A received timestamp more than
``max_drift_ms`` ahead of the local wall clock is refused with :class:`ClockDriftError`
(when ``max_drift_ms`` is set), so one node with a broken clock cannot drag every other
clock into the future.

This module has no dependencies beyond the standard library, does no I/O and only
reads the wall clock through an injectable function, so the device agent reuses it.
:class:`HybridClock` is thread-safe (one lock around its state); :class:`Hlc` is
immutable.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_LOGICAL", "MAX_PHYSICAL_MS", "ClockDriftError", "Hlc", "HybridClock", "valid_node"]

MAX_LOGICAL: Final = 0xFFFF
MAX_PHYSICAL_MS: Final = 0xFFFF_FFFF_FFFF
"""12 hex digits of milliseconds: up to the year 10889."""
MAX_NODE_CHARS: Final = 128

_SPACE = re.compile(r"\s")
_ENCODED = re.compile(r"([0-9a-f]{12})\.([0-9a-f]{4})\.(.+)\Z", re.DOTALL)


class ClockDriftError(ValueError):
    """A received timestamp is further ahead of the local wall clock than allowed."""


def valid_node(node: object) -> bool:
    """A node id is 1-128 printable characters without whitespace (like a device id)."""
    return (
        isinstance(node, str)
        and 0 < len(node) <= MAX_NODE_CHARS
        and node.isprintable()
        and _SPACE.search(node) is None
    )


@dataclass(frozen=True, order=True, slots=True)
class Hlc:
    """One hybrid-logical-clock timestamp; ordered by ``(physical_ms, logical, node)``."""

    physical_ms: int
    logical: int
    node: str

    def __post_init__(self) -> None:
        if not isinstance(self.physical_ms, int) or not 0 <= self.physical_ms <= MAX_PHYSICAL_MS:
            raise ValueError(f"HLC physical time {self.physical_ms!r} is not 0..{MAX_PHYSICAL_MS}")
        if not isinstance(self.logical, int) or not 0 <= self.logical <= MAX_LOGICAL:
            raise ValueError(f"HLC logical counter {self.logical!r} is not 0..{MAX_LOGICAL}")
        if not valid_node(self.node):
            raise ValueError(_node_error(self.node))

    def encode(self) -> str:
        """The sortable text form ``pppppppppppp.llll.node`` (hex, fixed width)."""
        return f"{self.physical_ms:012x}.{self.logical:04x}.{self.node}"

    @classmethod
    def decode(cls, text: str) -> Hlc:
        """Parse :meth:`encode`'s form; ``ValueError`` naming the text otherwise."""
        if not isinstance(text, str):
            raise ValueError(f"an HLC timestamp is a string, not {type(text).__name__}")
        m = _ENCODED.match(text)
        if m is None:
            raise ValueError(
                f"not an HLC timestamp: {text[:80]!r} (expected 12 hex digits, '.', 4 hex "
                "digits, '.', node id)"
            )
        node = m.group(3)
        if node not in _VALID_NODES:
            if not valid_node(node):
                raise ValueError(_node_error(node))
            if len(_VALID_NODES) >= _VALID_NODES_MAX:
                _VALID_NODES.clear()
            _VALID_NODES.add(node)
        # the pattern bounds both numbers (12 and 4 hex digits): no range check to repeat
        hlc = object.__new__(cls)
        _SET_PHYSICAL(hlc, int(m.group(1), 16))
        _SET_LOGICAL(hlc, int(m.group(2), 16))
        _SET_NODE(hlc, node)
        return hlc

    def to_int(self) -> int:
        """``physical_ms << 16 | logical``: sortable, without the node."""
        return self.physical_ms << 16 | self.logical

    @classmethod
    def from_int(cls, value: int, node: str) -> Hlc:
        """Inverse of :meth:`to_int` for a given node."""
        if not isinstance(value, int) or value < 0 or value >> 16 > MAX_PHYSICAL_MS:
            raise ValueError(f"{value!r} is not a packed HLC timestamp")
        return cls(value >> 16, value & MAX_LOGICAL, node)

    def __str__(self) -> str:
        return self.encode()


# decode fills an instance through the slots' descriptors: the frozen dataclass's
# ``__init__`` (an ``object.__setattr__`` a field) and ``__post_init__`` cost more than the
# parse, and the applier decodes a few timestamps per entry
_SET_PHYSICAL: Final[Callable[[Hlc, int], None]] = vars(Hlc)["physical_ms"].__set__
_SET_LOGICAL: Final[Callable[[Hlc, int], None]] = vars(Hlc)["logical"].__set__
_SET_NODE: Final[Callable[[Hlc, str], None]] = vars(Hlc)["node"].__set__
_VALID_NODES: set[str] = set()
"""Node ids :meth:`Hlc.decode` found valid (a few per device; cleared when it reaches
``_VALID_NODES_MAX``)."""
_VALID_NODES_MAX: Final = 4096


def _node_error(node: object) -> str:
    return f"HLC node {node!r} must be 1-{MAX_NODE_CHARS} printable characters without whitespace"


def wall_clock_ms() -> int:
    """Milliseconds since 1970-01-01 UTC from the system clock."""
    return time.time_ns() // 1_000_000


class HybridClock:
    """The clock of one node.  ``now()``/``send()`` for local events, ``recv()`` for
    timestamps received from other nodes.

    ``last`` restores a previously issued timestamp (e.g. persisted by the device agent)
    so timestamps keep increasing across restarts even if the wall clock went back.
    """

    def __init__(
        self,
        node: str,
        *,
        wall_ms: Callable[[], int] = wall_clock_ms,
        max_drift_ms: int | None = None,
        last: Hlc | None = None,
    ) -> None:
        if not valid_node(node):
            raise ValueError(
                f"HLC node {node!r} must be 1-{MAX_NODE_CHARS} printable characters "
                "without whitespace"
            )
        if max_drift_ms is not None and max_drift_ms < 0:
            raise ValueError("max_drift_ms must be >= 0 (or None for no limit)")
        self.node = node
        self.max_drift_ms = max_drift_ms
        self._wall_ms = wall_ms
        self._lock = threading.Lock()
        self._l = last.physical_ms if last is not None else 0
        self._c = last.logical if last is not None else 0

    @property
    def last(self) -> Hlc:
        """The latest timestamp issued (``(0, 0)`` before the first event)."""
        with self._lock:
            return Hlc(self._l, self._c, self.node)

    def _wall(self) -> int:
        return min(max(int(self._wall_ms()), 0), MAX_PHYSICAL_MS)

    def now(self) -> Hlc:
        """Timestamp a local event (or a message about to be sent)."""
        with self._lock:
            pt = self._wall()
            if pt > self._l:
                self._l, self._c = pt, 0
            else:
                self._bump(self._c + 1)
            return Hlc(self._l, self._c, self.node)

    send = now

    def recv(self, remote: Hlc) -> Hlc:
        """Merge a received timestamp; returns the timestamp of the receive event.

        Raises :class:`ClockDriftError` if ``remote`` is more than ``max_drift_ms`` ahead
        of the local wall clock (the clock is then unchanged).
        """
        with self._lock:
            pt = self._wall()
            if self.max_drift_ms is not None and remote.physical_ms - pt > self.max_drift_ms:
                raise ClockDriftError(
                    f"timestamp {remote.encode()} from {remote.node!r} is "
                    f"{remote.physical_ms - pt} ms ahead of this clock "
                    f"(at most {self.max_drift_ms} ms allowed)"
                )
            l_new = max(self._l, remote.physical_ms, pt)
            if l_new == self._l and l_new == remote.physical_ms:
                counter = max(self._c, remote.logical) + 1
            elif l_new == self._l:
                counter = self._c + 1
            elif l_new == remote.physical_ms:
                counter = remote.logical + 1
            else:
                counter = 0
            self._l = l_new
            self._bump(counter)
            return Hlc(self._l, self._c, self.node)

    def _bump(self, counter: int) -> None:
        """Set the counter; past 0xFFFF move ``l`` on by 1 ms instead (caller holds the lock)."""
        if counter > MAX_LOGICAL:
            if self._l >= MAX_PHYSICAL_MS:
                raise OverflowError("HLC physical time reached its maximum")
            self._l += 1
            counter = 0
        self._c = counter
