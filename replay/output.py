"""Output files: the state of tables (``as-of``) as JSON lines, CSV or SQLite, and the
CSV form shared with ``export``.

- ``jsonl``: one row per line, every table: ``table``, ``key``, ``row`` (PostgreSQL column
  names, JSON-form values, docs/events.md), the row's position, commit time and origin,
  and ``unknown_columns`` (unchanged TOAST values the log does not hold).
- ``csv``: one table per file, PostgreSQL ``COPY … CSV FORCE QUOTE *`` style: values as
  PostgreSQL prints them, every value quoted, NULL an empty unquoted field (so NULL and
  the empty string stay apart; :func:`read_csv` reads it back), then ``_position``,
  ``_commit_time``, ``_origin``.
- ``sqlite``: one table per captured table (named ``schema.table``; integers, booleans,
  floats and bytes in their SQLite types, the rest as PostgreSQL prints it) plus
  ``_replay`` with the read's metadata.

A table's columns are its newest schema version's, then older ones some row still
holds.  A row of a table without key columns that occurs ``n`` times is written ``n``
times.  Files are written from the start (an existing SQLite file is replaced).

Concurrency: none; writes happen in the caller's thread after the read.
"""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final, Literal

from replay.bounds import format_position, format_time
from replay.catalog import LogCatalog
from replay.keys import key_of
from replay.render import dumps, named_row, text_of
from replay.state import LogState, RowVersion, TableState

__all__ = ["Format", "csv_line", "quote_name", "read_csv", "write_state"]

Format = Literal["jsonl", "csv", "sqlite"]


def _columns(state: TableState) -> list[tuple[str, bytes]]:
    """Output columns of a table: (PostgreSQL name, fingerprint of a version that has it),
    the newest schema version's columns first, then older ones some row still holds."""
    catalog = state.catalog
    versions = catalog.tables.get(state.table, [])
    used = {r.fingerprint for r in state.rows.values()}
    out: dict[str, bytes] = {}
    for v in reversed(versions):
        if v is versions[-1] or v.fingerprint in used:
            for c in v.columns:
                out.setdefault(c, v.fingerprint)
    return list(out.items())


def _row_cells(state: TableState, row: RowVersion) -> dict[str, Any]:
    """PostgreSQL name -> JSON-form value of a row (its own schema version)."""
    return named_row(state.catalog, row.fingerprint, row.values)


def write_state(
    state: LogState,
    out: Path | IO[str],
    fmt: Format,
    *,
    meta: Mapping[str, Any] | None = None,
) -> int:
    """Write the state: ``jsonl`` (one row per line, every table), ``csv`` (one table per
    file: ``out`` is a file for one table, a directory for several), ``sqlite`` (one SQLite
    table per table, named ``schema.table``, plus ``_replay`` with ``meta``).  Returns the
    number of rows written."""
    tables = [state.tables[t] for t in sorted(state.tables)]
    if fmt == "jsonl":
        with _open_text(out) as fh:
            return sum(_jsonl_rows(t, fh) for t in tables)
    if fmt == "csv":
        if len(tables) == 1:
            with _open_text(out) as fh:
                return _csv_rows(tables[0], fh)
        if not isinstance(out, Path):
            raise ValueError("csv with several tables needs a directory for --out")
        out.mkdir(parents=True, exist_ok=True)
        n = 0
        for t in tables:
            with (out / f"{t.table}.csv").open("w", encoding="utf-8", newline="") as fh:
                n += _csv_rows(t, fh)
        return n
    if fmt == "sqlite":
        if not isinstance(out, Path):
            raise ValueError("sqlite needs a file for --out")
        return _sqlite_state(tables, out, meta or {})
    raise ValueError(f"unknown format {fmt!r} (jsonl, csv, sqlite)")


class _open_text:
    def __init__(self, out: Path | IO[str]) -> None:
        self.out = out
        self.fh: IO[str] | None = None

    def __enter__(self) -> IO[str]:
        if isinstance(self.out, Path):
            self.fh = self.out.open("w", encoding="utf-8", newline="")
            return self.fh
        return self.out

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            self.fh.close()


def _meta_of(row: RowVersion) -> dict[str, Any]:
    return {
        "position": format_position(row.position),
        "commit_time": format_time(row.time_us),
        "origin": row.origin,
    }


def _jsonl_rows(state: TableState, fh: IO[str]) -> int:
    n = 0
    for row in state.rows.values():
        version = state.catalog.versions[row.fingerprint]
        line: dict[str, Any] = {
            "table": state.table,
            "key": key_of(version, row.values) if version.key_fields else None,
            "row": _row_cells(state, row),
            **_meta_of(row),
        }
        if row.unknown:
            names = version.column_of()
            line["unknown_columns"] = sorted(names.get(f, f) for f in row.unknown)
        for _ in range(row.count):
            fh.write(dumps(line))
            fh.write("\n")
            n += 1
    return n


def _csv_field(value: str | None) -> str:
    """PostgreSQL ``COPY … CSV FORCE QUOTE *`` style: NULL is an empty unquoted field."""
    if value is None:
        return ""
    return '"' + value.replace('"', '""') + '"'


def csv_line(values: Sequence[str | None]) -> str:
    """One CSV record (fields as :func:`_csv_field` writes them, CRLF at the end)."""
    return ",".join(_csv_field(v) for v in values) + "\r\n"


def _csv_rows(state: TableState, fh: IO[str]) -> int:
    columns = _columns(state)
    fh.write(csv_line([c for c, _ in columns] + ["_position", "_commit_time", "_origin"]))
    n = 0
    for row in state.rows.values():
        cells = _row_cells(state, row)
        values = [text_of(state.catalog, row.fingerprint, c, cells.get(c)) for c, _ in columns]
        meta = _meta_of(row)
        line = csv_line([*values, meta["position"], meta["commit_time"], meta["origin"]])
        for _ in range(row.count):
            fh.write(line)
            n += 1
    return n


_SQLITE_TYPES: Final = {"int": "INTEGER", "bool": "INTEGER", "float": "REAL", "bytes": "BLOB"}


def _sqlite_value(catalog: LogCatalog, fp: bytes, column: str, value: Any) -> Any:
    if value is None:
        return None
    version = catalog.versions.get(fp)
    ct = version.types.get(column) if version is not None else None
    kind = ct.kind.value if ct is not None else ""
    if kind == "int" and isinstance(value, int):
        return value
    if kind == "bool":
        return 1 if value else 0
    if kind == "float" and isinstance(value, float):
        return value
    if kind == "bytes" and isinstance(value, str):
        return base64.b64decode(value)
    return text_of(catalog, fp, column, value)


def quote_name(name: str) -> str:
    """An SQL identifier, quoted (``"public.t"``)."""
    return '"' + name.replace('"', '""') + '"'


def _sqlite_state(tables: Sequence[TableState], path: Path, meta: Mapping[str, Any]) -> int:
    if path.exists():
        path.unlink()
    db = sqlite3.connect(path)
    n = 0
    try:
        with db:
            db.execute("create table _replay (name text primary key, value text)")
            db.executemany(
                "insert into _replay values (?, ?)",
                [(k, v if isinstance(v, str) else dumps(v)) for k, v in meta.items()],
            )
            for state in tables:
                columns = _columns(state)
                decl = []
                for column, fp in columns:
                    ct = state.catalog.versions[fp].types.get(column)
                    decl.append(
                        f"{quote_name(column)} {_SQLITE_TYPES.get(ct.kind.value if ct else '', 'TEXT')}"
                    )
                decl += ["_position TEXT", "_commit_time TEXT", "_origin TEXT"]
                db.execute(f"create table {quote_name(state.table)} ({', '.join(decl)})")
                marks = ", ".join("?" * (len(columns) + 3))
                insert = f"insert into {quote_name(state.table)} values ({marks})"
                batch = []
                for row in state.rows.values():
                    cells = _row_cells(state, row)
                    values = [
                        _sqlite_value(state.catalog, row.fingerprint, c, cells.get(c))
                        for c, _ in columns
                    ]
                    meta_row = _meta_of(row)
                    record = (
                        *values,
                        meta_row["position"],
                        meta_row["commit_time"],
                        meta_row["origin"],
                    )
                    batch.extend([record] * row.count)
                    if len(batch) >= 5000:
                        db.executemany(insert, batch)
                        n += len(batch)
                        batch = []
                db.executemany(insert, batch)
                n += len(batch)
    finally:
        db.close()
    return n


def read_csv(path: Path) -> list[dict[str, str | None]]:
    """Rows of a CSV file written here; an empty unquoted field is NULL (None)."""
    with path.open(encoding="utf-8", newline="") as fh:
        text = fh.read()
    records: list[list[str | None]] = []
    fields: list[str | None] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == '"':
            j, parts = i + 1, []
            while True:
                k = text.index('"', j)
                parts.append(text[j:k])
                if text.startswith('"', k + 1):
                    parts.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            fields.append("".join(parts))
        else:
            k = i
            while k < n and text[k] not in ",\r\n":
                k += 1
            fields.append(text[i:k] or None)
            i = k
        if text.startswith(",", i):
            i += 1
            continue
        records.append(fields)
        fields = []
        i += 2 if text.startswith("\r\n", i) else 1
    if not records:
        return []
    header = [h or "" for h in records[0]]
    return [dict(zip(header, r, strict=True)) for r in records[1:]]
