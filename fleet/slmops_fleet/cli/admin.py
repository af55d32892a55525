"""`slmops fleet admin-token ...` (named admin tokens with roles) and `slmops fleet audit`."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from typing import Annotated

import typer

from slmops_fleet.cli.common import (
    DataDirOpt,
    FleetOpt,
    JsonOpt,
    TokenOpt,
    call,
    err_console,
    new_table,
    out_console,
    parse_duration,
    print_json,
)

app = typer.Typer(
    help="Named admin tokens with roles: read-only (GET only), operator (runs the fleet), admin (also tokens).",
    no_args_is_help=True,
)


@app.command("create")
def admin_token_create(
    name: Annotated[str, typer.Argument(help="A unique name; it shows in the audit log.")],
    role: Annotated[str, typer.Option("--role", help="read-only, operator or admin.")] = "read-only",
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token (printed once; the fleet keeps only its hash)."""
    result = call(fleet, token, data_dir, lambda c: c.create_admin_token(name, role))
    if as_json:
        print_json(result)
        return
    sys.stdout.write(result["token"] + "\n")
    err_console().print(f"admin token {result['name']!r} ({result['role']}); it is not shown again", highlight=False)


@app.command("list")
def admin_token_list(
    fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List the named tokens (never their secrets)."""
    tokens = call(fleet, token, data_dir, lambda c: c.list_admin_tokens())
    if as_json:
        print_json(tokens)
        return
    table = new_table("admin tokens", "name", "role", "created", "by", "revoked")
    for t in tokens:
        table.add_row(t["name"], t["role"], t["created_at"], t["created_by"], t["revoked_at"] or "")
    out_console().print(table)


@app.command("revoke")
def admin_token_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a token: it is refused from the next request on."""
    result = call(fleet, token, data_dir, lambda c: c.revoke_admin_token(name))
    if as_json:
        print_json(result)
        return
    what = "revoked" if result["revoked_now"] else "was already revoked"
    out_console().print(f"admin token {result['name']!r} {what}", highlight=False)


def audit(
    since: Annotated[
        str | None, typer.Option("--since", help="Entries from then on: an age (30m, 2d) or an ISO 8601 time.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000, help="At most this many, the newest.")] = 200,
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The audit log: every admin action (who, what, when, how it ended) and every enrollment."""
    since_iso = _since(since) if since else None
    entries = call(fleet, token, data_dir, lambda c: c.audit(since_iso, limit))
    if as_json:
        print_json(entries)
        return
    table = new_table("audit log", "time", "who", "role", "from", "action", "target", "status")
    for e in entries:
        table.add_row(
            e["at"], e["actor"], e["role"], e["client"], f"{e['method']} {e['path']}", e["target"], str(e["status"])
        )
    out_console().print(table)


def _since(text: str) -> str:
    try:
        return (datetime.now(timezone.utc) - timedelta(seconds=parse_duration(text))).isoformat()
    except typer.BadParameter:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither an age like 30m nor an ISO 8601 time", param_hint="--since"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).isoformat()
