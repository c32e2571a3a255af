"""Report formatting shared by every command's markdown: numbers that may be missing, and tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def fmt(value: Any, spec: str = ".2f") -> str:
    """``value`` formatted by ``spec``, or ``n/a`` when it is None (not measured)."""
    return "n/a" if value is None else format(value, spec)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a markdown table: the header, its separator and one line per row of ready-made cells."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines
