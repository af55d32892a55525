"""`slmops fleet token ...`: one-time enrollment tokens."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from slmops_fleet.cli.common import (
    DataDirOpt,
    FleetOpt,
    JsonOpt,
    TokenOpt,
    call,
    err_console,
    parse_duration,
    print_json,
)

app = typer.Typer(help="Enrollment tokens.", no_args_is_help=True)


@app.command("create")
def token_create(
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime: 90s, 30m, 1h, 2d.")] = "1h",
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a one-time enrollment token."""
    ttl_s = parse_duration(ttl)
    if ttl_s < 1:
        raise typer.BadParameter("the lifetime must be at least one second", param_hint="--ttl")
    result = call(fleet, token, data_dir, lambda c: c.create_token(ttl_s))
    if as_json:
        print_json(result)
    else:
        sys.stdout.write(result["token"] + "\n")
        err_console().print(f"one-time enrollment token, valid until {result['expires_at']}", highlight=False)
