"""Staged downloads: changes messages kept until a complete checkpoint can be applied.

A download reads changes messages from the stored cursor until one carries a complete
checkpoint (docs/relay.md, "Device API"); only then are they applied, all in one
transaction (device_agent/apply.py).  Messages before the complete one are *staged*:
each is stored in ``_fieldsync_staging`` with the cursor it leads to
(``staging_cursor``) and a running count of their ops (``staging_ops``), committed per
message (:func:`stage`).  A message is stored as its JSON compressed with zlib (level 1:
a tenth of the bytes to write, and to free when the apply empties the staging area);
:func:`staged_messages` also reads the plain JSON text earlier versions stored (a JSON
object starts with ``{``, a zlib stream never does).  A connection cut at any byte therefore resumes from the last
whole message (:func:`download_cursor`): nothing is downloaded twice more than one
message.  The apply transaction reads the staged messages back one at a time
(:func:`staged_messages`) and empties the staging area before it commits
(:func:`clear`), so nothing is applied twice and nothing is lost.

Runs on the caller's connection and thread.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from device_agent.errors import StateError
from device_agent.local_db import get_meta, set_meta
from device_agent.local_tables import PREFIX, transaction


def staged_count(conn: Any) -> int:
    """How many messages are staged."""
    return int(conn.execute(f"select count(*) from {PREFIX}staging").fetchone()[0])


def staged_ops(conn: Any) -> int:
    """How many ops the staged messages hold."""
    return int(get_meta(conn, "staging_ops") or 0)


def download_cursor(conn: Any) -> str | None:
    """Where the next download starts: after the last staged message, else the cursor of
    the last apply (None: from the beginning)."""
    return get_meta(conn, "staging_cursor") or get_meta(conn, "cursor")


def stage(conn: Any, msg: Mapping[str, Any]) -> None:
    """Keep one message of an incomplete checkpoint (its own transaction)."""
    with transaction(conn):
        blob = zlib.compress(orjson.dumps(msg), 1)
        conn.execute(f"insert into {PREFIX}staging (message) values (?)", (blob,))
        set_meta(conn, "staging_cursor", str(msg["cursor"]))
        set_meta(
            conn,
            "staging_ops",
            str(int(get_meta(conn, "staging_ops") or 0) + len(msg.get("ops") or ())),
        )


def staged_messages(
    conn: Any, n_staged: int, last: Mapping[str, Any]
) -> Iterator[Mapping[str, Any]]:
    """The staged messages in order (one in memory at a time), then ``last``."""
    seq = 0
    while n_staged:
        row = conn.execute(
            f"select seq, message from {PREFIX}staging where seq > ? order by seq limit 1",
            (seq,),
        ).fetchone()
        if row is None:
            break
        seq = int(row[0])
        try:
            msg = decode(row[1])
        except (zlib.error, orjson.JSONDecodeError) as exc:
            raise StateError(
                f"staged message {seq} in {PREFIX}staging is unreadable ({exc}); run "
                "device-agent reset to download again"
            ) from exc
        yield msg
    yield last


def decode(blob: bytes | str) -> Mapping[str, Any]:
    """A staged message: zlib-compressed JSON, or the plain JSON of earlier versions."""
    if isinstance(blob, bytes) and blob[:1] != b"{":
        blob = zlib.decompress(blob)
    msg: Mapping[str, Any] = orjson.loads(blob)
    return msg


def clear(conn: Any) -> None:
    """Inside the apply transaction: the staged messages are applied; forget them."""
    conn.execute(f"delete from {PREFIX}staging")
    set_meta(conn, "staging_cursor", None)
    set_meta(conn, "staging_ops", None)
