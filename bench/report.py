"""The bench table: every row says how many times faster devise is, whatever the row measures.

A row measures seconds or milliseconds (less is better) or images/s (more is better); the
speed-up is always devise's speed over the other's, so a number above 1 means devise is faster
and one below 1 is printed with "(slower)". The limit column is read the same way: devise's
speed over the limit's.
"""

from __future__ import annotations

from dataclasses import dataclass

TIME_UNITS = ("s", "ms")
RATE_UNITS = ("images/s",)

HEADER = (
    "measurement",
    "devise",
    "notebook's way",
    "devise speed-up (x faster)",
    "limit",
    "devise / limit (x faster)",
)


@dataclass
class Row:
    """One measurement: devise's number, the notebook's and an optional limit, in `unit`."""

    what: str
    unit: str  # "s", "ms" or "images/s"
    devise: float
    notebook: float | None = None
    limit: float | None = None
    limit_note: str = ""

    def __post_init__(self) -> None:
        if self.unit not in TIME_UNITS + RATE_UNITS:
            raise ValueError(f"unknown unit {self.unit!r}")


def times_faster(devise: float, other: float, unit: str) -> float:
    """How many times faster devise is than `other` (> 1 faster, < 1 slower)."""
    if unit in TIME_UNITS:
        return other / devise
    return devise / other


def fmt_speedup(x: float) -> str:
    """2.5 -> '2.50x'; 0.55 -> '0.55x (slower)'; large values with fewer digits."""
    text = f"{x:.0f}x" if x >= 100 else f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"
    return text if x >= 1 else f"{text} (slower)"


def fmt_value(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def cells(row: Row) -> tuple[str, ...]:
    """The table cells of a row (strings, in HEADER order)."""
    nb = row.notebook
    lim = row.limit
    return (
        f"{row.what} ({row.unit})",
        fmt_value(row.devise),
        fmt_value(nb) if nb is not None else "",
        fmt_speedup(times_faster(row.devise, nb, row.unit)) if nb is not None else "",
        f"{fmt_value(lim)}{f' ({row.limit_note})' if row.limit_note else ''}" if lim else "",
        fmt_speedup(times_faster(row.devise, lim, row.unit)) if lim else "",
    )


def markdown(rows: list[Row]) -> str:
    """A markdown table of rows under HEADER."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)
