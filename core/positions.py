"""Positions in PostgreSQL's write-ahead log, as PostgreSQL prints them.

An LSN is a 64-bit integer; PostgreSQL writes it as two hexadecimal halves,
``16/B374D848``.  Change events carry the commit LSN and a sequence number within the
transaction (docs/events.md); every package formats and parses LSNs with these two.
"""

from __future__ import annotations


def format_lsn(lsn: int) -> str:
    """Format an LSN the way PostgreSQL prints it (``16/B374D848``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """Parse ``16/B374D848`` into an integer LSN."""
    try:
        hi, lo = text.split("/")
        return (int(hi, 16) << 32) | int(lo, 16)
    except ValueError as exc:
        raise ValueError(f"not an LSN: {text!r} (expected e.g. '16/B374D848')") from exc
