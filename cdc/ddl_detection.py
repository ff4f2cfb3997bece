"""Which schema changes need a re-snapshot (pure, no I/O).

Some DDL gives existing rows new values without writing a row change to WAL (a column added
with a default, a table rewrite, an enum label renamed; :mod:`cdc.incremental_snapshot`
says why that matters).  The daemon sees them two ways:

- in the stream: two Relation messages of one table differ
  (:func:`cdc.relation_diff.compare_relations`): a column added, dropped or retyped, or the
  table renamed;
- in the catalog: the :class:`TableSignature` of a published table (its columns'
  ``pg_attribute`` facts, its file node, the labels of the enums it uses, the attributes of
  the composite types it uses, the partitions of a partitioned table with their file nodes,
  its replica identity and Kafka key columns), read by
  ``cdc.pg_catalog.read_signatures``, differs from the one recorded in Kafka
  (:func:`resnapshot_reasons` says why rows may hold values no event reported,
  :func:`key_changed` whether the rows' Kafka keys may have changed).

A table's Kafka key (its *row identity* in Kafka) is its replica identity index under
REPLICA IDENTITY USING INDEX, else its primary key, else nothing (its events have no Kafka
key: DEFAULT, FULL or NOTHING without a primary key).  So the key changes shape when the
identity index is replaced, when the identity is switched to or from USING INDEX, when the
primary key is added, dropped or redefined (under DEFAULT, FULL, NOTHING), and when a key
column is retyped or rewritten.

Tables are keyed by oid, but a topic is named by the table's qualified name, so the name
matters too (:func:`compare_catalogs`).  A table dropped and created again (``DROP TABLE t;
CREATE TABLE t …``, or ``ALTER TABLE t RENAME TO t_old; CREATE TABLE t …``) writes no row
event for the rows that disappeared: its name comes back under a new oid while the topic
still holds the old table's rows.  A table published again after it was not (``ALTER
PUBLICATION … DROP TABLE`` then ``ADD TABLE``) missed the changes in between.  Both are
*replaced* tables: their re-snapshot first deletes every key no row has now
(:mod:`cdc.key_retirement`), then sends every row.  A recorded table whose name no published
table has now (dropped, renamed, left the publication) is *unpublished*: its rows stay in
Kafka; the catalog remembers its last signature by name, so that a table published under
that name later is recognised as a replaced one.

Signatures are recorded as JSON (:func:`signatures_to_bytes`: the published tables and the
unpublished ones) in the compacted ``{prefix}._cdc_resnapshot`` topic
(``cdc.resnapshot_state``).  A record written before unpublished tables were kept has none.

Concurrency: plain data and functions, used from the daemon's one thread.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping
from typing import Any

from cdc import pgoutput_messages as m

__all__ = [
    "CatalogComparison",
    "ColumnFacts",
    "CompositeFacts",
    "EnumFacts",
    "PartitionFacts",
    "TableCheck",
    "TableSignature",
    "attached_partitions",
    "attached_reason",
    "compare_catalogs",
    "composite_changes",
    "describe_key",
    "identity_warnings",
    "key_changed",
    "recorded_catalog_from_bytes",
    "replaced_reason",
    "resnapshot_reasons",
    "rows_lost",
    "signatures_from_bytes",
    "signatures_to_bytes",
    "unpublished_warning",
]


@dataclasses.dataclass(frozen=True, slots=True)
class ColumnFacts:
    """One column in ``pg_attribute``: ``version`` is the xmin of its catalog row, which
    changes whenever an ALTER touches the column."""

    attnum: int
    name: str
    type_oid: int
    typmod: int
    type_name: str
    has_missing: bool
    version: str


@dataclasses.dataclass(frozen=True, slots=True)
class EnumFacts:
    """An enum type some column of the table uses (directly, or through a domain, array,
    range or composite type), with its labels in sort order."""

    oid: int
    name: str
    labels: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class CompositeFacts:
    """A composite type some column of the table uses (directly, or through a domain, array,
    range or another composite type): its attributes as ``(attnum, type oid, typmod)`` (an
    attribute added or dropped changes the text of every value: ``(1,2)`` → ``(1,2,)``; a
    rename changes none), and the table's columns whose values hold it."""

    oid: int
    name: str
    attributes: tuple[tuple[int, int, int], ...]
    columns: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class PartitionFacts:
    """A partition of a partitioned table (at any depth) with its file node (0 for one that is
    partitioned itself): TRUNCATE, VACUUM FULL, CLUSTER and SET TABLESPACE of the partition
    give it a new one."""

    oid: int
    name: str  # schema.table
    filenode: int


@dataclasses.dataclass(frozen=True, slots=True)
class TableSignature:
    """What the catalog says about a published table, as far as values depend on it."""

    oid: int
    schema: str
    table: str
    filenode: int
    columns: tuple[ColumnFacts, ...]
    enums: tuple[EnumFacts, ...] = ()
    key: tuple[str, ...] | None = None  # Kafka key columns in key order; None: not recorded
    identity: m.ReplicaIdentity | None = None  # None: not recorded
    membership: int | None = None
    """The oid of the table's ``pg_publication_rel`` row: a new one each time the table is
    added to a publication of listed tables (None: FOR ALL TABLES, or not recorded)."""
    # its partitions (() when it is not partitioned); None: not recorded (an older record)
    partitions: tuple[PartitionFacts, ...] | None = None
    composites: tuple[CompositeFacts, ...] | None = None  # None: not recorded

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    def to_json(self) -> dict[str, Any]:
        return {
            "oid": self.oid,
            "schema": self.schema,
            "table": self.table,
            "filenode": self.filenode,
            "columns": [dataclasses.astuple(c) for c in self.columns],
            "enums": [[e.oid, e.name, list(e.labels)] for e in self.enums],
            "key": None if self.key is None else list(self.key),
            "identity": None if self.identity is None else self.identity.value,
            "membership": self.membership,
            "partitions": None
            if self.partitions is None
            else [[p.oid, p.name, p.filenode] for p in self.partitions],
            "composites": None
            if self.composites is None
            else [
                [c.oid, c.name, [list(a) for a in c.attributes], list(c.columns)]
                for c in self.composites
            ],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TableSignature:
        key = None if d.get("key") is None else tuple(str(k) for k in d["key"])
        identity = d.get("identity")
        if identity is None and key == ():
            key = None  # recorded with primary keys only: an identity index key is unknown
        parts, comps = d.get("partitions"), d.get("composites")
        return cls(
            oid=int(d["oid"]),
            schema=str(d["schema"]),
            table=str(d["table"]),
            filenode=int(d["filenode"]),
            columns=tuple(
                ColumnFacts(int(a), str(n), int(t), int(tm), str(tn), bool(h), str(v))
                for a, n, t, tm, tn, h, v in d["columns"]
            ),
            enums=tuple(
                EnumFacts(int(o), str(n), tuple(str(x) for x in labels))
                for o, n, labels in d.get("enums", ())
            ),
            key=key,
            identity=None if identity is None else m.ReplicaIdentity(identity),
            membership=None if d.get("membership") is None else int(d["membership"]),
            partitions=None
            if parts is None
            else tuple(PartitionFacts(int(o), str(n), int(f)) for o, n, f in parts),
            composites=None
            if comps is None
            else tuple(
                CompositeFacts(
                    int(o),
                    str(n),
                    tuple((int(a), int(t), int(tm)) for a, t, tm in attrs),
                    tuple(str(c) for c in cols),
                )
                for o, n, attrs, cols in comps
            ),
        )


def resnapshot_reasons(old: TableSignature, new: TableSignature) -> list[str]:
    """Why existing rows of the table may hold values no row event reported (empty: none).

    - a column added with a default: ``atthasmissing`` (every old row reads the default),
      or with a table rewrite (a volatile default);
    - a column whose type changed (a type modifier change only when the table was
      rewritten: ``varchar(20)`` → ``varchar(40)`` keeps every value);
    - a column an ALTER touched while the table was rewritten
      (``ALTER COLUMN … TYPE <same type> USING …``);
    - a renamed column (rows arrive under the new name only with a re-read);
    - an enum label that is gone (``RENAME VALUE``; labels cannot be dropped);
    - a renamed table (its rows go to a new topic);
    - the Kafka key columns changed (:func:`describe_key`: the primary key added, dropped or
      redefined, the replica identity index replaced, the identity switched to or from
      USING INDEX): every row has a new Kafka key, or none.

    - an attribute added to or dropped from a composite type a column uses (every value's
      text changed; :func:`composite_changes`);
    - a partition detached or dropped (its rows left the table), or given a new file node
      (TRUNCATE of the partition, which a publication through the root does not publish;
      also VACUUM FULL, CLUSTER, SET TABLESPACE, which keep the rows: the rows are read
      again all the same, :func:`rows_lost`).  A partition attached is judged by the
      caller (:func:`attached_partitions`: only one with rows needs a re-read).

    A rewrite of an unpartitioned table that touches no column (VACUUM FULL, CLUSTER,
    TRUNCATE, SET TABLESPACE) and a column added without a default (old rows hold NULL, what
    consumers assume) need nothing.  A field an older record lacks (``None``) compares as
    unchanged.
    """
    reasons: list[str] = []
    if (old.schema, old.table) != (new.schema, new.table):
        reasons.append(f"table renamed from {old.qualified} (its rows go to a new topic)")
    if old.key is not None and new.key is not None and old.key != new.key:
        reasons.append(f"key changed from {describe_key(old)} to {describe_key(new)}")
    rewritten = _rewritten(old, new)
    before = {c.attnum: c for c in old.columns}
    for col in new.columns:
        was = before.get(col.attnum)
        if was is None:
            if col.has_missing:
                reasons.append(f"column {col.name} added with a default")
            elif rewritten:
                reasons.append(f"column {col.name} added, table rewritten (volatile default)")
            continue
        if was.type_oid != col.type_oid or (was.typmod != col.typmod and rewritten):
            reasons.append(
                f"column {col.name} changed type from {was.type_name} to {col.type_name}"
            )
        elif rewritten and was.version != col.version:
            reasons.append(f"column {col.name} altered with a table rewrite")
        if was.name != col.name:
            reasons.append(f"column {was.name} renamed to {col.name}")
    old_enums = {e.oid: e for e in old.enums}
    for e in new.enums:
        was_enum = old_enums.get(e.oid)
        if was_enum is None:
            continue
        gone = [label for label in was_enum.labels if label not in e.labels]
        if gone:
            reasons.append(f"enum {e.name}: label(s) {', '.join(repr(g) for g in gone)} renamed")
    for c in composite_changes(old, new):
        reasons.append(
            f"composite type {c.name} (column(s) {', '.join(c.columns)}): attribute added or "
            "dropped, every value's text changed"
        )
    detached, renewed = _partitions_gone(old, new)
    for p in detached:
        reasons.append(f"partition {p.name} detached or dropped: its rows left the table")
    for p in renewed:
        reasons.append(
            f"partition {p.name} has a new file node (TRUNCATE of the partition, which is "
            "not published through the root, or VACUUM FULL, CLUSTER, SET TABLESPACE)"
        )
    return reasons


def composite_changes(old: TableSignature, new: TableSignature) -> list[CompositeFacts]:
    """The composite types the table used before and uses now whose attributes were added or
    dropped (``ALTER TYPE … ADD ATTRIBUTE``/``DROP ATTRIBUTE``, or ``ALTER TABLE … ADD
    COLUMN``/``DROP COLUMN`` of a table whose row type a column uses; ``ALTER ATTRIBUTE …
    TYPE`` is refused while a column uses the type)."""
    if old.composites is None or new.composites is None:
        return []
    before = {c.oid: c for c in old.composites}
    return [
        c for c in new.composites if c.oid in before and before[c.oid].attributes != c.attributes
    ]


def _partitions_gone(
    old: TableSignature, new: TableSignature
) -> tuple[list[PartitionFacts], list[PartitionFacts]]:
    """The partitions recorded in ``old`` that ``new`` lacks (detached, dropped), and those
    it has under another file node."""
    if old.partitions is None or new.partitions is None:
        return [], []
    now = {p.oid: p for p in new.partitions}
    gone = [p for p in old.partitions if p.oid not in now]
    renewed = [
        now[p.oid] for p in old.partitions if p.oid in now and now[p.oid].filenode != p.filenode
    ]
    return gone, renewed


def _rewritten(old: TableSignature, new: TableSignature) -> bool:
    """Whether the table was rewritten: its file node changed, or (a partitioned table, whose
    own is 0) one of its partitions'."""
    return old.filenode != new.filenode or bool(_partitions_gone(old, new)[1])


def rows_lost(old: TableSignature, new: TableSignature) -> bool:
    """Whether rows may have left the table without a row event: a partition detached or
    dropped, or given a new file node (TRUNCATE of the partition; VACUUM FULL and CLUSTER
    cannot be told from it)."""
    detached, renewed = _partitions_gone(old, new)
    return bool(detached or renewed)


def attached_partitions(old: TableSignature, new: TableSignature) -> list[PartitionFacts]:
    """The partitions ``new`` has that ``old`` lacks: attached (``ATTACH PARTITION`` of a
    table with rows gives the table rows no event reported) or created (``CREATE TABLE …
    PARTITION OF``: empty, nothing to read); the caller reads whether each holds rows."""
    if old.partitions is None or new.partitions is None:
        return []
    before = {p.oid for p in old.partitions}
    return [p for p in new.partitions if p.oid not in before]


def attached_reason(partition: PartitionFacts) -> str:
    """Why a table is read again after :func:`attached_partitions` found ``partition`` with
    rows."""
    return f"partition {partition.name} attached with rows (no row event reported them)"


def describe_key(sig: TableSignature) -> str:
    """The table's Kafka key as a reason names it: ``(id)``, ``(code) (replica identity
    index)``, ``none (REPLICA IDENTITY FULL without a primary key: events have no Kafka
    key)``."""
    if sig.key:
        index = sig.identity is m.ReplicaIdentity.INDEX
        return f"({', '.join(sig.key)})" + (" (replica identity index)" if index else "")
    if sig.identity is None:
        return "none (events have no Kafka key)"
    return (
        f"none (REPLICA IDENTITY {sig.identity.name} without a primary key: events have no "
        "Kafka key)"
    )


def identity_warnings(old: TableSignature, new: TableSignature) -> list[str]:
    """What an operator should know when the table's replica identity or key changed for the
    worse: it has no replica identity now (NOTHING, or DEFAULT without a primary key), or no
    key columns (empty otherwise; the daemon's start-up checks cover the state at start)."""
    if old.identity == new.identity and bool(old.key) == bool(new.key):
        return []
    out = []
    ident = new.identity
    if ident is m.ReplicaIdentity.NOTHING or (ident is m.ReplicaIdentity.DEFAULT and not new.key):
        without = "" if new.key else " without a primary key"
        out.append(
            f"{new.qualified} has no replica identity (REPLICA IDENTITY {ident.name}{without}): "
            "PostgreSQL refuses its updates and deletes while the publication publishes them"
        )
    if not new.key and (old.key is None or old.key):
        out.append(
            f"{new.qualified} has no key columns: its events have no Kafka key, consumers that "
            "name rows by key (the relay) do not sync it, and re-snapshots cannot read it. Fix: "
            f"ALTER TABLE {new.qualified} ADD PRIMARY KEY (…) or REPLICA IDENTITY USING INDEX …"
        )
    return out


def key_changed(old: TableSignature, new: TableSignature) -> bool:
    """Whether the Kafka keys of the table's rows may differ now: the key columns changed
    (:func:`describe_key`), or one of them changed type, modifier or name, or was altered
    with a table rewrite (``TYPE int USING id * 10``), or holds a composite type whose
    attributes changed (:func:`composite_changes`).  (Whether a key's text really
    changed is for the data to tell: ``int`` → ``bigint`` keeps every key's text,
    :mod:`cdc.key_retirement`.)"""
    if old.key is not None and new.key is not None and old.key != new.key:
        return True
    if new.key and any(set(c.columns) & set(new.key) for c in composite_changes(old, new)):
        return True
    rewritten = _rewritten(old, new)
    before = {c.attnum: c for c in old.columns}
    for col in new.columns:
        if new.key is None or col.name not in new.key:
            continue
        was = before.get(col.attnum)
        if was is None:
            continue
        if (was.type_oid, was.typmod, was.name) != (col.type_oid, col.typmod, col.name):
            return True
        if rewritten and was.version != col.version:
            return True
    return False


def replaced_reason(old: TableSignature, new: TableSignature, old_now: str | None) -> str:
    """Why a replaced table (:func:`compare_catalogs`) is read again: ``old`` is the table
    last recorded under ``new``'s name, ``old_now`` the name ``old``'s oid is published under
    now (renamed away), if it is."""
    then = "its old rows are deleted and its rows sent again"
    if old.oid == new.oid:
        return (
            "published under this name again (changes made while it was not did not reach "
            f"its topic): {then}"
        )
    if old_now is not None:
        return (
            f"replaced by another table of the same name (oid {old.oid} → {new.oid}; oid "
            f"{old.oid} is {old_now} now): {then}"
        )
    return f"dropped and created again (oid {old.oid} → {new.oid}): {then}"


def unpublished_warning(sig: TableSignature, publication: str, topic: str) -> str:
    """What an operator should know when a recorded table is no longer published under its
    name."""
    return (
        f"{sig.qualified} (oid {sig.oid}) is no longer published (dropped, renamed, or taken "
        f"out of publication {publication}): its rows stay in Kafka ({topic}) and on the "
        f"devices. A table published as {sig.qualified} later has them deleted then. To "
        f"remove them now: create {sig.qualified} again, empty (with a publication of listed "
        "tables the daemon adds it back), and drop it once its re-snapshot is done; TRUNCATE "
        "a table before dropping it to remove its rows everywhere"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class TableCheck:
    """A published table of now against the recorded catalog: ``old`` is its signature
    recorded under its oid (None: not recorded); ``replaced`` the table last recorded under
    its name when the topic may hold rows no row event removed (another table's, or its own
    from before it left the publication), with ``replaced_now`` the name that table's oid is
    published under now (renamed away), if it is; ``detached_from`` the recorded table it
    was a partition of (a partition detached in a FOR ALL TABLES publication is published
    as itself from then on: its rows went to that table's topic, never to its own)."""

    new: TableSignature
    old: TableSignature | None = None
    replaced: TableSignature | None = None
    replaced_now: str | None = None
    detached_from: str | None = None

    def reasons(self) -> list[str]:
        """Why existing rows or keys in Kafka may be stale (empty: none known; a table new
        to the recorded catalog is judged by the caller)."""
        out = []
        if self.replaced is not None:
            out.append(replaced_reason(self.replaced, self.new, self.replaced_now))
        elif self.old is None and self.detached_from is not None:
            out.append(
                f"detached from {self.detached_from}: its rows were published as that "
                "table's, never on its own topic"
            )
        if self.old is not None:
            out.extend(resnapshot_reasons(self.old, self.new))
            if self.republished:
                out.append(
                    "taken out of the publication and added back: changes made meanwhile were "
                    "not published (its rows are sent again, keys no row has deleted)"
                )
        return out

    @property
    def republished(self) -> bool:
        """Whether the table (same oid) left the publication and came back since it was
        recorded: its ``pg_publication_rel`` row is another one.  Known from the catalog
        alone, so also after a restart in between."""
        old, new = self.old, self.new
        return (
            old is not None
            and old.membership is not None
            and new.membership is not None
            and old.membership != new.membership
        )

    @property
    def retire_keys(self) -> bool:
        """Whether the re-snapshot deletes the keys no row has now first: the table was
        replaced, taken out of the publication and added back (:attr:`republished`), its
        key changed (:func:`key_changed`), or rows may have left it (:func:`rows_lost`)."""
        return (
            self.replaced is not None
            or self.republished
            or (
                self.old is not None
                and (key_changed(self.old, self.new) or rows_lost(self.old, self.new))
            )
        )

    @property
    def before(self) -> TableSignature | None:
        """The signature the table's events were last written under (for
        :func:`identity_warnings`)."""
        return self.old if self.old is not None else self.replaced


@dataclasses.dataclass(frozen=True, slots=True)
class CatalogComparison:
    """:func:`compare_catalogs`: every published table of now, the recorded tables that are
    no longer published under their name (newly: to warn about), and the unpublished tables
    to record (by name)."""

    tables: tuple[TableCheck, ...]
    unpublished: tuple[TableSignature, ...]
    remembered: dict[str, TableSignature]


def compare_catalogs(
    recorded: Mapping[int, TableSignature],
    unpublished: Mapping[str, TableSignature],
    now: Mapping[int, TableSignature],
    republished: Collection[str] = (),
) -> CatalogComparison:
    """The published tables of ``now`` against the ``recorded`` ones (by oid) and the
    ``unpublished`` ones (by qualified name).  A table of now is *replaced* when

    - its name was last recorded under another oid (dropped and created again; or another
      table renamed away and this one created or renamed into its place), or
    - its name is among the unpublished ones (published again: created again, re-added to
      the publication, or renamed back), or
    - its name is in ``republished`` (the daemon just added it back to a publication of
      listed tables: it was out of it, whatever the recorded catalog says) and some table
      was recorded under it.

    A recorded table whose name no table of now has is newly unpublished; it is remembered
    (with the unpublished ones whose name is still not published) until a table is
    published under its name.  A table of now recorded as a partition of a recorded table
    was detached (``TableCheck.detached_from``)."""
    names_now = {s.qualified for s in now.values()}
    by_name = {s.qualified: s for s in recorded.values()}
    parent_of = {p.oid: s.qualified for s in recorded.values() for p in s.partitions or ()}
    checks = []
    for oid, new in sorted(now.items()):
        name = new.qualified
        holder = by_name.get(name) or unpublished.get(name)
        replaced = None
        if holder is not None and (holder.oid != oid or name in unpublished or name in republished):
            replaced = holder
        renamed_to = None
        if replaced is not None and replaced.oid != oid and replaced.oid in now:
            renamed_to = now[replaced.oid].qualified
        checks.append(TableCheck(new, recorded.get(oid), replaced, renamed_to, parent_of.get(oid)))
    gone = tuple(s for _, s in sorted(recorded.items()) if s.qualified not in names_now)
    remembered = {n: s for n, s in unpublished.items() if n not in names_now}
    remembered.update((s.qualified, s) for s in gone)
    return CatalogComparison(tuple(checks), gone, remembered)


def signatures_to_bytes(
    signatures: Mapping[int, TableSignature],
    unpublished: Mapping[str, TableSignature] | None = None,
) -> bytes:
    """The recorded catalog: the published tables (by oid) and the unpublished ones (by
    name, :func:`compare_catalogs`)."""
    return json.dumps(
        {
            "version": 1,
            "tables": [s.to_json() for _, s in sorted(signatures.items())],
            "unpublished": [s.to_json() for _, s in sorted((unpublished or {}).items())],
        },
        sort_keys=True,
    ).encode()


def recorded_catalog_from_bytes(
    data: bytes,
) -> tuple[dict[int, TableSignature], dict[str, TableSignature]]:
    """The published tables (by oid) and the unpublished ones (by qualified name) of a
    recorded catalog; a record written before unpublished tables were kept has none."""
    d = json.loads(data)
    if d.get("version") != 1:
        raise ValueError(f"catalog signatures of version {d.get('version')!r}, expected 1")
    tables = {s.oid: s for s in (TableSignature.from_json(t) for t in d.get("tables", ()))}
    gone = (TableSignature.from_json(t) for t in d.get("unpublished", ()))
    return tables, {s.qualified: s for s in gone}


def signatures_from_bytes(data: bytes) -> dict[int, TableSignature]:
    """The published tables of a recorded catalog, by oid."""
    return recorded_catalog_from_bytes(data)[0]
