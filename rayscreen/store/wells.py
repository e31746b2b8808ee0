"""Well names. Users write the same well many ways (``A01``, ``a1``, ``A1``, ``A/1``);
rayscreen always shows the canonical ``A01`` and maps it to the plate's own row/column
names (which are ``A``/``1`` in most writers, ``A``/``01`` in some)."""

from __future__ import annotations

import re
import string

from .errors import RayscreenError, preview

_WELL_RE = re.compile(r"^\s*([A-Za-z]{1,2})\s*[/_\-]?\s*0*(\d{1,3})\s*$")

# Standard plate formats: rows x columns.
PLATE_FORMATS = {6: (2, 3), 12: (3, 4), 24: (4, 6), 48: (6, 8), 96: (8, 12), 384: (16, 24), 1536: (32, 48)}


def row_name(index: int) -> str:
    """0 -> 'A', 25 -> 'Z', 26 -> 'AA' (1536-well plates have 32 rows)."""
    letters = string.ascii_uppercase
    return letters[index] if index < 26 else letters[index // 26 - 1] + letters[index % 26]


def row_index(name: str) -> int:
    name = name.upper()
    if len(name) == 1:
        return string.ascii_uppercase.index(name)
    return (string.ascii_uppercase.index(name[0]) + 1) * 26 + string.ascii_uppercase.index(name[1])


def parse_well(name: str, *, context: str = "") -> tuple[str, int]:
    """Split a well name into (row letters, 1-based column). Raises naming the well."""
    m = _WELL_RE.match(str(name))
    if not m or int(m.group(2)) == 0:
        where = f" in {context}" if context else ""
        raise RayscreenError(
            f"unknown well name {name!r}{where}: expected a row letter and a column number "
            "such as 'A01', 'A1', 'a1' or 'A/1'"
        )
    return m.group(1).upper(), int(m.group(2))


def well_name(name: str, *, context: str = "") -> str:
    """Canonical well name: ``well_name('a1') == well_name('A/1') == 'A01'``."""
    row, col = parse_well(name, context=context)
    return f"{row}{col:02d}"


def plate_format_for(wells: list[str], *, context: str = "") -> tuple[int, int]:
    """Smallest standard (rows, columns) format holding all the wells."""
    need_rows = max(row_index(parse_well(w)[0]) for w in wells) + 1
    need_cols = max(parse_well(w)[1] for w in wells)
    # A partly filled plate is ambiguous; 96 wells is the smallest format screens use.
    for n_rows, n_cols in (PLATE_FORMATS[96], PLATE_FORMATS[384], PLATE_FORMATS[1536]):
        if need_rows <= n_rows and need_cols <= n_cols:
            return n_rows, n_cols
    n_rows, n_cols = PLATE_FORMATS[1536]
    outside = [well_name(w) for w in wells
               if row_index(parse_well(w)[0]) >= n_rows or parse_well(w)[1] > n_cols]
    raise RayscreenError(
        f"{context + ': ' if context else ''}well(s) {preview(outside)} lie outside a 1536-well plate "
        f"(rows A-{row_name(n_rows - 1)}, columns 1-{n_cols})"
    )
