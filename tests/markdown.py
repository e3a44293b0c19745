"""Reading the benchmarks' Markdown reports back in their tests."""

from __future__ import annotations


def table(text: str, heading: str, *, separator: bool = False) -> list[list[str]]:
    """The rows of the first table after the first heading line (``#``...) that contains ``heading``, as cells.

    The header row first; the ``|---|`` row after it only with ``separator``.
    """
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and heading in line)
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("| "))
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows if separator else [rows[0], *rows[2:]]
