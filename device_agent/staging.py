"""Staged downloads: changes messages kept until a complete checkpoint can be applied.

A download reads changes messages from the stored cursor until one carries a complete
checkpoint (docs/relay.md, "Device API"); only then are they applied, all in one
transaction (device_agent/apply.py).  Messages before the complete one are *staged*:
each is stored in ``_fieldsync_staging`` with the cursor it leads to
(``staging_cursor``) and a running count of their ops (``staging_ops``), committed per
message (:func:`stage`).  A connection cut at any byte therefore resumes from the last
whole message (:func:`download_cursor`): nothing is downloaded twice more than one
message.  The apply transaction reads the staged messages back one at a time
(:func:`staged_messages`) and empties the staging area before it commits
(:func:`clear`), so nothing is applied twice and nothing is lost.

Runs on the caller's connection and thread.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson

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
        conn.execute(f"insert into {PREFIX}staging (message) values (?)", (orjson.dumps(msg),))
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
        yield orjson.loads(row[1])
    yield last


def clear(conn: Any) -> None:
    """Inside the apply transaction: the staged messages are applied; forget them."""
    conn.execute(f"delete from {PREFIX}staging")
    set_meta(conn, "staging_cursor", None)
    set_meta(conn, "staging_ops", None)
