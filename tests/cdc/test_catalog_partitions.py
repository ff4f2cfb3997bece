"""Catalog changes that add or remove rows of a partitioned table, or change the text of
composite values, without row events: the signatures' partitions and composite types
compared (cdc/ddl_detection.py), the checks acting on them (cdc/resnapshot_catalog.py, with
the catalog reads replaced), and recorded catalogs of older versions, which lack both."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cdc import pgoutput_messages as m
from cdc.ddl_detection import (
    ColumnFacts,
    CompositeFacts,
    PartitionFacts,
    TableSignature,
    attached_partitions,
    compare_catalogs,
    key_changed,
    recorded_catalog_from_bytes,
    resnapshot_reasons,
    rows_lost,
    signatures_to_bytes,
)
from tests.cdc.test_catalog_comparison import Catalog, checks_with

INT4, TEXT = 23, 25
N, S = PartitionFacts(11, "public.m_n", 8011), PartitionFacts(12, "public.m_s", 8012)
COMP = CompositeFacts(90, "pair", ((1, INT4, -1), (2, INT4, -1)), ("c",))


def col(attnum: int, name: str, type_oid: int = INT4, version: str = "700") -> ColumnFacts:
    return ColumnFacts(attnum, name, type_oid, -1, "?", False, version)


M = TableSignature(
    1,
    "public",
    "m",
    0,  # a partitioned table has no file node of its own
    (col(1, "id"), col(2, "region", TEXT)),
    key=("id", "region"),
    identity=m.ReplicaIdentity.DEFAULT,
    partitions=(N, S),
    composites=(),
)
T = TableSignature(
    2,
    "public",
    "t",
    5002,
    (col(1, "id"), col(2, "c")),
    key=("id",),
    identity=m.ReplicaIdentity.DEFAULT,
    partitions=(),
    composites=(COMP,),
)


def parts(*p: PartitionFacts) -> TableSignature:
    return dataclasses.replace(M, partitions=p)


def test_unchanged_partitions_need_nothing() -> None:
    assert resnapshot_reasons(M, M) == [] and not rows_lost(M, M) and not key_changed(M, M)
    assert attached_partitions(M, M) == []


def test_an_attached_partition_is_left_to_the_caller_and_retires_nothing() -> None:
    """ATTACH PARTITION (rows the table gained) and CREATE TABLE … PARTITION OF (empty) look
    the same in the catalog: whether the partition holds rows decides."""
    w = PartitionFacts(13, "public.m_w", 8013)
    now = parts(N, S, w)
    assert attached_partitions(M, now) == [w]
    assert resnapshot_reasons(M, now) == [] and not rows_lost(M, now)


@pytest.mark.parametrize(
    ("what", "now", "reason"),
    [
        (
            "DETACH PARTITION (also CONCURRENTLY), DROP TABLE of a partition",
            parts(N),
            "partition public.m_s detached or dropped: its rows left the table",
        ),
        (
            "TRUNCATE of a partition (or VACUUM FULL, CLUSTER of it)",
            parts(N, dataclasses.replace(S, filenode=9012)),
            "partition public.m_s has a new file node (TRUNCATE of the partition, which is not "
            "published through the root, or VACUUM FULL, CLUSTER, SET TABLESPACE)",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and not v.startswith("partition") else "",
)
def test_a_partition_that_took_rows_away_retires_keys(
    what: str, now: TableSignature, reason: str
) -> None:
    assert resnapshot_reasons(M, now) == [reason], what
    assert rows_lost(M, now) and not key_changed(M, now)
    (check,) = compare_catalogs({1: M}, {}, {1: now}).tables
    assert check.reasons() == [reason] and check.retire_keys


def test_a_rewrite_of_a_partitioned_table_is_seen_through_its_partitions() -> None:
    """Its own file node is always 0: ``ALTER COLUMN id TYPE int USING id + 1`` shows as the
    column's new catalog row and every partition's new file node."""
    rewritten = dataclasses.replace(
        M,
        columns=(col(1, "id", version="801"), M.columns[1]),
        partitions=(
            dataclasses.replace(N, filenode=9011),
            dataclasses.replace(S, filenode=9012),
        ),
    )
    reasons = resnapshot_reasons(M, rewritten)
    assert reasons[0] == "column id altered with a table rewrite"
    assert key_changed(M, rewritten), "a key column rewritten"


def test_a_partition_detached_in_a_for_all_tables_publication_is_read_on_its_own() -> None:
    """Detached, ``m_s`` is published as itself: its rows were only ever on ``m``'s topic."""
    alone = TableSignature(12, "public", "m_s", 8012, M.columns, partitions=(), composites=())
    got = compare_catalogs({1: M}, {}, {1: parts(N), 12: alone})
    parent, detached = got.tables
    assert parent.retire_keys and detached.detached_from == "public.m"
    assert detached.reasons() == [
        "detached from public.m: its rows were published as that table's, never on its own topic"
    ]
    assert not detached.retire_keys


@pytest.mark.parametrize(
    ("what", "attributes", "changed"),
    [
        ("ADD ATTRIBUTE", ((1, INT4, -1), (2, INT4, -1), (3, TEXT, -1)), True),
        ("DROP ATTRIBUTE", ((2, INT4, -1),), True),
        ("RENAME ATTRIBUTE: the text of a value names no attribute", COMP.attributes, False),
    ],
)
def test_a_composite_types_attributes(
    what: str, attributes: tuple[tuple[int, int, int], ...], changed: bool
) -> None:
    now = dataclasses.replace(T, composites=(dataclasses.replace(COMP, attributes=attributes),))
    want = (
        [
            "composite type pair (column(s) c): attribute added or dropped, every value's text changed"
        ]
        if changed
        else []
    )
    assert resnapshot_reasons(T, now) == want, what
    assert not key_changed(T, now), "c is not a key column"


def test_a_composite_in_a_key_column_changes_the_keys() -> None:
    keyed = dataclasses.replace(T, key=("id", "c"))
    grown = ((1, INT4, -1), (2, INT4, -1), (3, INT4, -1))
    now = dataclasses.replace(keyed, composites=(dataclasses.replace(COMP, attributes=grown),))
    assert key_changed(keyed, now)
    (check,) = compare_catalogs({2: keyed}, {}, {2: now}).tables
    assert check.retire_keys


def test_a_catalog_recorded_before_partitions_and_composites_loads_and_changes_nothing() -> None:
    """An older daemon recorded neither: after the upgrade they compare as unchanged (no
    re-snapshot of every table), and the next record has them."""
    data = json.loads(signatures_to_bytes({1: M, 2: T}))
    for t in data["tables"]:
        del t["partitions"], t["composites"]
    old, _ = recorded_catalog_from_bytes(json.dumps(data).encode())
    assert old[1].partitions is None and old[2].composites is None
    truncated = parts(N, dataclasses.replace(S, filenode=1))
    for was, now in ((old[1], truncated), (old[2], T)):
        assert resnapshot_reasons(was, now) == [] and not rows_lost(was, now)
        assert not key_changed(was, now) and attached_partitions(was, now) == []
    assert recorded_catalog_from_bytes(signatures_to_bytes({1: M, 2: T}))[0] == {1: M, 2: T}


def test_checks_read_attached_partitions_and_retire_after_a_detach(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    catalog = Catalog()
    checks, jobs = checks_with(monkeypatch, catalog, tables="public.m")
    with_rows: set[int] = {13}
    monkeypatch.setattr(checks, "_has_rows", lambda oid: oid in with_rows)
    checks.signatures = {1: M}
    # a partition created empty: nothing to read
    catalog.now = {1: parts(N, S, PartitionFacts(14, "public.m_e", 8014))}
    checks.check()
    assert jobs.progress.jobs == []
    # one attached with rows: the table is read again, no key retired
    catalog.now = {
        1: parts(
            N, S, PartitionFacts(14, "public.m_e", 8014), PartitionFacts(13, "public.m_w", 8013)
        )
    }
    checks.check()
    (job,) = jobs.progress.jobs
    assert (job.oid, job.table, job.retire_keys) == (1, "public.m", False)
    assert job.reason == "partition public.m_w attached with rows (no row event reported them)"
    # one detached: the keys no row has now are deleted first
    jobs.progress.jobs.clear()
    catalog.now = {
        1: parts(N, PartitionFacts(14, "public.m_e", 8014), PartitionFacts(13, "public.m_w", 8013))
    }
    checks.check()
    (job,) = jobs.progress.jobs
    assert (job.oid, job.retire_keys, job.retiring) == (1, True, True)
    assert "partition public.m_s detached or dropped" in job.reason
