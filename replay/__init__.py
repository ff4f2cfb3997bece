"""Audit replay: read the change log cdc wrote to Kafka and answer "who changed what, when".

What it reads
-------------
- ``{prefix}._schemas``: every schema, keyed by fingerprint (replay.catalog).
- ``{prefix}.{schema}.{table}``: the change events (docs/events.md), every partition of
  each table's topic merged into position order and deduplicated by the position in
  each record's ``fieldsync.pos`` header (replay.log_reader, replay.merge), each
  partition read to its end offset, never "until nothing came for a while"
  (replay.log_source).
- ``{prefix}._journal`` and ``{prefix}._outcomes``: device edits and what became of
  them (core.journal_format), for row histories (replay.history).

It never writes to Kafka or PostgreSQL (verify emits one non-transactional
logical-decoding message, replay.pg_side).

Modules, bottom up: errors; bounds (positions, times); catalog (schemas); log_source
(Kafka access, reading partitions to their end); events; merge (partitions into position
order); decode_workers (decoding in worker processes); log_reader (bounded, deduplicated
reads); render and keys (values and keys as people see them); state (rows as of a
bound); output (jsonl, csv, sqlite files); history, export, verify (with pg_side and
compare); cli (``fieldsync replay``, docs/replay.md).

Concurrency: one reader owns one consumer in the caller's thread; large reads may
decode in worker processes without changing the order of events (replay.decode_workers).
"""
