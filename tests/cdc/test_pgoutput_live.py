"""The decoder against live PostgreSQL pgoutput output, every message kind it can produce."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from cdc import pgoutput_messages as m
from cdc.pg_source import Keepalive, ReplicationStream, connect, highest_proto_version
from cdc.pgoutput_decoder import PgOutputDecoder


def _drain(
    stream: ReplicationStream, decoder: PgOutputDecoder, until: Any, timeout: float = 15.0
) -> list[m.Message]:
    out: list[m.Message] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = stream.read(0.2)
        if msg is None or isinstance(msg, Keepalive):
            continue
        out.append(decoder.decode(msg.payload, msg.wal_start))
        if until(out):
            return out
    raise AssertionError(f"timed out; got {[type(x).__name__ for x in out]}")


def test_live_messages(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create type color as enum ('red', 'green')")
        conn.execute("create table live (id int primary key, c color, t text)")
        conn.execute("create publication p_live for table live")
        version = conn.info.server_version
        proto = highest_proto_version(version)
        rconn = connect(pg_dsn, replication=True)
        rconn.execute("CREATE_REPLICATION_SLOT s_live LOGICAL pgoutput (SNAPSHOT 'nothing')")
        stream = ReplicationStream(rconn, "s_live", "p_live", 0, proto, streaming=False)
        decoder = PgOutputDecoder(proto)
        try:
            conn.execute("select pg_replication_origin_create('edge-7')")
            with conn.transaction():
                conn.execute("select pg_replication_origin_session_setup('edge-7')")
                conn.execute("select pg_replication_origin_xact_setup('0/42', now())")
                conn.execute(
                    "select pg_logical_emit_message(true, 'fieldsync.origin', 'device:d1')"
                )
                conn.execute("insert into live values (1, 'red', 'a')")
                conn.execute("update live set t = 'b' where id = 1")
                conn.execute("update live set id = 2 where id = 1")
                conn.execute("delete from live where id = 2")
            conn.execute("select pg_replication_origin_session_reset()")
            conn.execute("truncate live")
            conn.execute("select pg_logical_emit_message(false, 'fieldsync.heartbeat', 'hb')")
            msgs = _drain(
                stream,
                decoder,
                lambda out: any(
                    isinstance(x, m.LogicalMessage) and not x.transactional for x in out
                ),
            )
        finally:
            stream.close()
    kinds = [type(x).__name__ for x in msgs]
    assert kinds[:10] == [
        "Begin",
        "Origin",
        "LogicalMessage",
        "Type",
        "Relation",
        "Insert",
        "Update",
        "Update",
        "Delete",
        "Commit",
    ], kinds
    # pgoutput may send Type/Relation again before the next transaction's first change
    rest = [k for k in kinds[10:] if k not in ("Type", "Relation")]
    assert rest == ["Begin", "Truncate", "Commit", "LogicalMessage"], kinds
    msgs = msgs[:10] + [x for x in msgs[10:] if not isinstance(x, m.Type | m.Relation)]
    by = {k: x for k, x in zip(kinds[:10], msgs[:10], strict=True)}
    origin = msgs[1]
    assert isinstance(origin, m.Origin) and origin.name == "edge-7" and origin.origin_lsn == 0x42
    assert (
        isinstance(msgs[2], m.LogicalMessage)
        and msgs[2].content == b"device:d1"
        and msgs[2].prefix == "fieldsync.origin"
    )
    typ = by["Type"]
    assert isinstance(typ, m.Type) and typ.name == "color"
    rel = by["Relation"]
    assert isinstance(rel, m.Relation) and rel.name == "live" and rel.namespace == "public"
    assert [(c.name, c.is_key) for c in rel.columns] == [("id", True), ("c", False), ("t", False)]
    ins = msgs[5]
    assert isinstance(ins, m.Insert) and ins.new == ("1", "red", "a")
    key_change = msgs[7]
    assert (
        isinstance(key_change, m.Update)
        and key_change.old_kind == m.OldTupleKind.KEY
        and key_change.old is not None
        and key_change.old[0] == "1"
    )
    dele = msgs[8]
    assert isinstance(dele, m.Delete) and dele.old[0] == "2"
    begin, commit = msgs[0], msgs[9]
    assert (
        isinstance(begin, m.Begin)
        and isinstance(commit, m.Commit)
        and begin.final_lsn == commit.commit_lsn
    )
    assert abs(commit.commit_ts_us / 1e6 - time.time()) < 60, (
        "commit timestamp is in Unix microseconds"
    )
    trunc = msgs[11]
    assert isinstance(trunc, m.Truncate) and trunc.relation_oids == (rel.oid,)
    hb = msgs[13]
    assert isinstance(hb, m.LogicalMessage) and not hb.transactional and hb.content == b"hb"


def test_live_stream_messages(pg_dsn: str) -> None:
    dsn = psycopg.conninfo.make_conninfo(pg_dsn, options="-c logical_decoding_work_mem=64kB")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table s (id int primary key, pad text)")
        conn.execute("create publication p_s for table s")
        proto = highest_proto_version(conn.info.server_version)
        rconn = connect(dsn, replication=True)
        rconn.execute("CREATE_REPLICATION_SLOT s_s LOGICAL pgoutput (SNAPSHOT 'nothing')")
        stream = ReplicationStream(rconn, "s_s", "p_s", 0, proto, streaming=True)
        decoder = PgOutputDecoder(proto)
        try:
            with conn.transaction():
                conn.execute(
                    "insert into s select g, repeat('x', 300) from generate_series(1, 3000) g"
                )
            with conn.transaction():
                conn.execute(
                    "insert into s select g, repeat('x', 300) from generate_series(10001, 13000) g"
                )
                raise psycopg.Rollback()
            msgs = _drain(
                stream, decoder, lambda out: any(isinstance(x, m.StreamAbort) for x in out)
            )
        finally:
            stream.close()
    starts = [x for x in msgs if isinstance(x, m.StreamStart)]
    assert starts and starts[0].first_segment
    assert sum(isinstance(x, m.StreamStop) for x in msgs) == len(starts)
    inserts = [x for x in msgs if isinstance(x, m.Insert)]
    assert all(x.xid is not None for x in inserts), "inside a stream block changes carry their xid"
    commit = next(x for x in msgs if isinstance(x, m.StreamCommit))
    abort = next(x for x in msgs if isinstance(x, m.StreamAbort))
    assert commit.xid == starts[0].xid and abort.xid == abort.subxid != commit.xid
    assert sum(1 for x in inserts if x.xid == commit.xid) == 3000
