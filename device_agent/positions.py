"""Positions of server versions: ``[commit_lsn, seq]`` on the wire, ``'[lsn,seq]'`` stored.

A PUT or REMOVE op carries the position of the server change it comes from
(docs/relay.md, "Device API"); the device keeps it with each bucket's hold on a row
(``_fieldsync_rows.pos``, the compact JSON text :func:`pos_text` writes, which the journal
triggers copy into an entry's ``base``).  What the agent compares is the ``commit_lsn``:
:func:`pos_lsn` reads it from either form, :func:`max_lsn` takes the highest of a row's
holds (the *received* position, device_agent/visible.py).  Older relays sent no
position: then there is none (None), never a guess.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson


def pos_lsn(pos: Any) -> int | None:
    """The ``commit_lsn`` of a position: a wire ``[commit_lsn, seq]`` or its stored text
    ``'[lsn,seq]'``; None when there is none (older relays sent no position)."""
    if isinstance(pos, str):
        try:
            pos = orjson.loads(pos)
        except orjson.JSONDecodeError:
            return None
    if isinstance(pos, list | tuple) and len(pos) == 2 and type(pos[0]) is int:
        return int(pos[0])
    return None


def max_lsn(positions: Iterable[Any]) -> int | None:
    """The highest ``commit_lsn`` of stored positions (None: none known)."""
    found = [lsn for lsn in map(pos_lsn, positions) if lsn is not None]
    return max(found) if found else None


def pos_text(pos: Any) -> str | None:
    """A wire position (``[commit_lsn, seq]``; older relays sent none) as stored in
    ``_fieldsync_rows.pos``: compact JSON ``[lsn,seq]``, what the triggers copy into a
    journal entry's ``base``."""
    if isinstance(pos, list | tuple) and len(pos) == 2:
        return f"[{int(pos[0])},{int(pos[1])}]"
    return None
