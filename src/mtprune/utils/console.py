"""The console that commands print their tables on.

On a terminal, rich uses the terminal's width. When the output is a file, a pipe or a CI log, rich would assume
80 columns and cut wide tables; there the console is ``NON_TTY_WIDTH`` columns wide (or ``$COLUMNS`` when set),
so a table is printed whole, and cells that still do not fit wrap (the command tables use ``overflow="fold"``).
"""

from __future__ import annotations

import os
import sys

NON_TTY_WIDTH = 240


def console_width() -> int | None:
    """``None`` on a terminal (rich measures it), else ``$COLUMNS`` or ``NON_TTY_WIDTH``."""
    if sys.stdout.isatty():
        return None
    try:
        return max(int(os.environ.get("COLUMNS", "")), 40)
    except ValueError:
        return NON_TTY_WIDTH


def console():
    """A ``rich.console.Console`` on stdout that does not cut tables when stdout is not a terminal."""
    from rich.console import Console

    return Console(width=console_width())
