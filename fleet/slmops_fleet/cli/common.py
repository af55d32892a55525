"""What every `slmops fleet` command shares: the options that find the fleet, --json, the consoles,
the one way to fail (a red message, exit code 1) and the formatting of sizes, ages and tables."""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from slmops_fleet.client import FleetClient


FleetOpt = Annotated[
    str | None, typer.Option("--fleet", help="Fleet URL (default: SLMOPS_FLEET_URL or <data dir>/fleet.json).")
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", help="Admin token (default: SLMOPS_FLEET_TOKEN or <data dir>/fleet.json).")
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="The fleet's data folder (default: SLMOPS_FLEET_DATA_DIR or ~/.slmops/fleet)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def out_console() -> Console:
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)  # piped to a file or a program: do not squeeze ids into 80 columns
    return console


def err_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console().print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _client(fleet: str | None, token: str | None, data_dir: Path | None) -> FleetClient:
    from slmops_fleet.client import FleetClient, FleetClientError, resolve_target

    try:
        return FleetClient.from_target(resolve_target(fleet, token, data_dir))
    except FleetClientError as exc:
        fail(str(exc))


def call(fleet: str | None, token: str | None, data_dir: Path | None, fn: Any) -> Any:
    from slmops_fleet.client import FleetClientError

    with _client(fleet, token, data_dir) as client:
        try:
            return fn(client)
        except FleetClientError as exc:
            fail(str(exc))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def size_text(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def ago_text(iso: str | None) -> str:
    if not iso:
        return "never"
    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    seconds = (datetime.now(timezone.utc) - then).total_seconds()
    if seconds < 90:
        return f"{max(0, int(seconds))} s ago"
    if seconds < 5400:
        return f"{int(seconds // 60)} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{int(seconds // 86400)} d ago"


def new_table(title: str, *columns: str) -> Table:
    from rich.table import Table

    # a key/value table (all column names empty) shows no header row
    table = Table(title=title, title_justify="left", header_style="bold", show_header=any(columns))
    for i, c in enumerate(columns):
        table.add_column(c, no_wrap=i == 0)  # the first column is an id: never wrapped
    return table


_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> int:
    """'90', '90s', '30m', '1h', '2d' -> seconds."""
    m = _DURATION.match(text.lower())
    if not m:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 30m, 1h or 2d")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def counts_text(counts: dict[str, int], empty: str = "none") -> str:
    return ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())) or empty
