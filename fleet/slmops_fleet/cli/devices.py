"""`slmops fleet device ...`: list enrolled devices, tag them, revoke them, rotate their credentials."""

from __future__ import annotations

from typing import Annotated

import typer

from slmops_fleet.cli.common import (
    DataDirOpt,
    FleetOpt,
    JsonOpt,
    TokenOpt,
    ago_text,
    call,
    new_table,
    out_console,
    print_json,
    size_text,
)

app = typer.Typer(help="Enrolled devices.", no_args_is_help=True)


@app.command("list")
def device_list(
    fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List enrolled devices (groups: the named groups each is in; * marks the assigned group whose
    release it follows)."""
    devices = call(fleet, token, data_dir, lambda c: c.list_devices())
    if as_json:
        print_json(devices)
        return
    table = new_table("devices", "id", "name", "tags", "groups", "state", "active version", "progress", "last seen")
    for d in devices:
        progress = ""
        if d["bytes_needed"]:
            progress = f"{size_text(d['bytes_received'])} / {size_text(d['bytes_needed'])}"
        table.add_row(
            d["id"],
            d["name"] or "",
            ",".join(d.get("tags") or []),
            ",".join(g + ("*" if g == d.get("follows_group") else "") for g in d.get("groups") or []),
            "revoked" if d.get("status") == "revoked" else (d["state"] or "enrolled"),
            d["active_version"] or "",
            progress,
            ago_text(d["last_seen"]),
        )
    out_console().print(table)


@app.command("tag")
def device_tag(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    add: Annotated[list[str] | None, typer.Option("--add", help="Tag to add; repeatable or comma-separated.")] = None,
    remove: Annotated[
        list[str] | None, typer.Option("--remove", help="Tag to remove; repeatable or comma-separated.")
    ] = None,
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add or remove a device's tags (rollouts select devices by them: --select tag=canary)."""
    adds = [t.strip() for item in (add or []) for t in item.split(",") if t.strip()]
    removes = [t.strip() for item in (remove or []) for t in item.split(",") if t.strip()]
    if not adds and not removes:
        raise typer.BadParameter("give --add or --remove")
    d = call(fleet, token, data_dir, lambda c: c.update_device_tags(device_id, adds, removes))
    if as_json:
        print_json(d)
        return
    groups = ", ".join(g + (" (follows its release)" if g == d.get("follows_group") else "") for g in d["groups"])
    out_console().print(f"{d['id']}: tags {', '.join(d['tags']) or 'none'}; groups {groups or 'none'}", highlight=False)


@app.command("revoke")
def device_revoke(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Decommission a device: its broker credentials are removed and its connection closed at once; its
    record, reports and telemetry are kept; it is never targeted again and its key cannot enroll again."""
    d = call(fleet, token, data_dir, lambda c: c.revoke_device(device_id))
    if as_json:
        print_json(d)
        return
    what = "revoked" if d["revoked_now"] else "was already revoked"
    out_console().print(f"{d['id']}: {what} ({d['revoked_at']}, by {d['revoked_by']})", highlight=False)


@app.command("rotate-credentials")
def device_rotate(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give a device a new broker password over its MQTT link; the old one is refused once the device
    confirms (an offline device gets it when it reconnects). Running it again resends a pending one."""
    r = call(fleet, token, data_dir, lambda c: c.rotate_credentials(device_id))
    if as_json:
        print_json(r)
        return
    out_console().print(
        f"{r['device_id']}: rotation {r['rotation_id']} sent (pending since {r['started_at']}); "
        "the old password works until the device confirms",
        highlight=False,
    )
