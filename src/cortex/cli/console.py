"""Rich output shared by the operator commands: tables, memory bars, sizes and durations.

A terminal gets colours and its own width; a pipe or a file gets plain text 160 columns wide,
so ``cortex status | grep`` and tests see whole lines, never wrapped cells.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported when something is drawn, not at every CLI start
    from rich.console import Console
    from rich.table import Table

BAR_WIDTH = 20


def console() -> Console:
    from rich.console import Console

    # markup off: model ids and memory bars contain "[...]", which is data, not a style tag
    if sys.stdout.isatty():
        return Console(markup=False)
    return Console(width=160, no_color=True, highlight=False, soft_wrap=True, markup=False)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    from rich import box
    from rich.table import Table

    # A terminal gets rules; a pipe gets plain columns (one line per row, easy to grep).
    style = box.SIMPLE_HEAD if sys.stdout.isatty() else None
    grid = Table(title=title, title_justify="left", box=style, show_edge=False, pad_edge=False)
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*row)
    return grid


def human_bytes(size: int | float | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit in ("B", "KiB") else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def memory_bar(used: int, total: int, width: int = BAR_WIDTH) -> str:
    """``[#######.............] 3.5 GiB / 10.0 GiB`` (plain characters: greppable)."""
    filled = round(width * used / total) if total > 0 else 0
    filled = max(0, min(width, filled))
    return f"[{'#' * filled}{'.' * (width - filled)}] {human_bytes(used)} / {human_bytes(total)}"


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
