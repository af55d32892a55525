"""Tables on the terminal: rich's when it is installed (the fleet and builder extras bring it), aligned
plain text otherwise (the device's install leaves rich out)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def print_table(title: str, columns: Sequence[str] | None, rows: Sequence[Sequence[str]]) -> None:
    """Print `rows` under `title`; `columns` None: a two-column field/value table with no header."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        sys.stdout.write(plain_table(title, columns, rows))
        return
    table = Table(title=title, title_justify="left", header_style="bold", show_header=columns is not None)
    for i, column in enumerate(columns or ("field", "value")):
        table.add_column(column, no_wrap=i == 0, style="bold" if columns is None and i == 0 else None)
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def plain_table(title: str, columns: Sequence[str] | None, rows: Sequence[Sequence[str]]) -> str:
    """The table as aligned text: the title, the header (if any), then one line a row."""
    lines = [list(columns)] if columns is not None else []
    lines += [list(row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))] if lines else []
    out = [title]
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if n == 0 and columns is not None:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"
