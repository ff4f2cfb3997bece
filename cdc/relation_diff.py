"""What changed between two Relation messages of one table (pure, no I/O).

The stream side of the DDL detection (:mod:`cdc.ddl_detection` is the catalog side): a
Relation message that differs from the previous one of its table makes the daemon check
the catalog at once.

Concurrency: plain data and functions.
"""

from __future__ import annotations

import dataclasses

from cdc import pgoutput_messages as m

__all__ = ["RelationDiff", "compare_relations"]


@dataclasses.dataclass(frozen=True, slots=True)
class RelationDiff:
    """What changed between two Relation messages of one table (by column name)."""

    added: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    retyped: tuple[str, ...] = ()
    renamed_table: tuple[str, str] | None = None  # (old, new) qualified names
    rekeyed: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # (old, new) key columns

    @property
    def changed(self) -> bool:
        return bool(
            self.added or self.dropped or self.retyped or self.renamed_table or self.rekeyed
        )

    def describe(self) -> str:
        parts = []
        if self.renamed_table:
            parts.append(f"renamed {self.renamed_table[0]} → {self.renamed_table[1]}")
        if self.added:
            parts.append("added " + ", ".join(self.added))
        if self.dropped:
            parts.append("dropped " + ", ".join(self.dropped))
        if self.retyped:
            parts.append("retyped " + ", ".join(self.retyped))
        if self.rekeyed:
            parts.append(f"key ({', '.join(self.rekeyed[0])}) → ({', '.join(self.rekeyed[1])})")
        return "; ".join(parts) or "no column change"


def compare_relations(old: m.Relation, new: m.Relation) -> RelationDiff:
    """Columns added, dropped or retyped (type or modifier), and the key columns (the
    replica identity) changed, between two Relation messages."""
    before = {c.name: (c.type_oid, c.type_modifier) for c in old.columns}
    after = {c.name: (c.type_oid, c.type_modifier) for c in new.columns}
    renamed = None
    if (old.namespace, old.name) != (new.namespace, new.name):
        renamed = (f"{old.namespace}.{old.name}", f"{new.namespace}.{new.name}")
    old_key = tuple(c.name for c in old.columns if c.is_key)
    new_key = tuple(c.name for c in new.columns if c.is_key)
    return RelationDiff(
        added=tuple(c.name for c in new.columns if c.name not in before),
        dropped=tuple(c.name for c in old.columns if c.name not in after),
        retyped=tuple(
            c.name for c in new.columns if c.name in before and before[c.name] != after[c.name]
        ),
        renamed_table=renamed,
        rekeyed=(old_key, new_key) if old_key != new_key else None,
    )
