"""`slmops fleet group ...`: named device groups and the releases assigned to them, which keep
applying to the devices that enroll into the group or are tagged into it later."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from slmops_fleet.cli.common import (
    DataDirOpt,
    FleetOpt,
    JsonOpt,
    TokenOpt,
    call,
    new_table,
    out_console,
    parse_duration,
    print_json,
)

app = typer.Typer(
    help="Named device groups (a selector or a list of devices) and the release assigned to each.",
    no_args_is_help=True,
)

NameArg = Annotated[str, typer.Argument(help="Group name (1-64 letters, digits or _ . : -).")]


@app.command("create")
def group_create(
    name: NameArg,
    select: Annotated[
        str | None,
        typer.Option("--select", help="Dynamic group: 'tag=kiosk AND arch IN (x86_64, aarch64) AND NOT tag=lab'."),
    ] = None,
    devices: Annotated[
        list[str] | None, typer.Option("--devices", help="Static group: device ids, repeatable or comma-separated.")
    ] = None,
    priority: Annotated[
        int, typer.Option("--priority", help="A device in several assigned groups follows the highest.")
    ] = 0,
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a group: dynamic (--select, its members change with the devices' tags and inventory) or
    static (--devices)."""
    ids = [d.strip() for item in devices for d in item.split(",") if d.strip()] if devices is not None else None
    if (select is None) == (ids is None):
        raise typer.BadParameter("give --select EXPR or --devices ID,... (one of them)")
    group = call(
        fleet, token, data_dir, lambda c: c.create_group(name, selector=select, devices=ids, priority=priority)
    )
    if as_json:
        print_json(group)
        return
    out_console().print(f"group [bold]{group['name']}[/]: {len(group['members'])} devices now", highlight=False)


@app.command("list")
def group_list(
    fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List the groups, their members now and what is assigned to them."""
    groups = call(fleet, token, data_dir, lambda c: c.list_groups())
    if as_json:
        print_json(groups)
        return
    table = new_table("groups", "name", "kind", "selects", "priority", "members", "assigned", "following")
    for g in groups:
        a = g.get("assignment")
        table.add_row(
            g["name"],
            g["kind"],
            g["selector"] or f"{len(g['devices'] or [])} devices",
            str(g["priority"]),
            str(len(g["members"])),
            _assigned(a),
            str(len(a["following"])) if a else "",
        )
    out_console().print(table)


@app.command("show")
def group_show(
    name: NameArg, fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """A group's definition, its members now and its assignment."""
    g = call(fleet, token, data_dir, lambda c: c.get_group(name))
    if as_json:
        print_json(g)
        return
    a = g.get("assignment")
    console = out_console()
    console.print(
        f"group [bold]{g['name']}[/] ({g['kind']}, priority {g['priority']}): "
        + (g["selector"] or ", ".join(g["devices"] or [])),
        highlight=False,
    )
    console.print(f"assigned: {_assigned(a)}", highlight=False)
    following = set(a["following"]) if a else set()
    table = new_table("members now", "device", "follows this group's assignment")
    for d in g["members"]:
        table.add_row(d, "yes" if d in following else ("no (a higher-priority group)" if a else ""))
    console.print(table)


@app.command("delete")
def group_delete(name: NameArg, fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None) -> None:
    """Delete a group (unassign it first); its devices keep what they have."""
    call(fleet, token, data_dir, lambda c: c.delete_group(name))
    out_console().print(f"group {name} deleted", highlight=False)


@app.command("assign")
def group_assign(
    name: NameArg,
    release: Annotated[str | None, typer.Option("--release", help="Release NAME@VERSION (or id).")] = None,
    package: Annotated[str | None, typer.Option("--package", help="Package id (or a unique prefix).")] = None,
    waves: Annotated[
        str | None, typer.Option("--waves", help="As `rollout create --waves`: '1,50%,100%', 'tag=canary,100%'.")
    ] = None,
    soak: Annotated[str, typer.Option("--soak", help="Wait after each wave before its gates: 0, 90s, 10m.")] = "0",
    wave_timeout: Annotated[
        str | None, typer.Option("--wave-timeout", help="A device not finished this long after its wave times out.")
    ] = None,
    gate: Annotated[
        list[str] | None,
        typer.Option(
            "--gate",
            help="A gate as KEY=VALUE, repeatable: max_failures=0, min_success_rate=0.95 (see rollout create).",
        ),
    ] = None,
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Assign a release (or a package) to a group: a rollout of its devices now, and the same plan for
    every device that joins it later (enrolled, tagged, or its inventory changed). A rollout of the
    assignment that is rolled back or cancelled stops it; assign again to go on."""
    if (package is None) == (release is None):
        raise typer.BadParameter("give --release NAME@VERSION or --package ID (one of them)")
    body: dict[str, Any] = {"release": release} if release else {"package_id": package}
    if waves:
        body["waves"] = [waves]
    if parse_duration(soak):
        body["soak_s"] = parse_duration(soak)
    if wave_timeout is not None:
        body["wave_timeout_s"] = parse_duration(wave_timeout)
    if gate:
        body["gates"] = _gates(gate)
    out = call(fleet, token, data_dir, lambda c: c.assign_group(name, body))
    if as_json:
        print_json(out)
        return
    r = out["rollout"]
    out_console().print(
        f"group [bold]{name}[/]: {_assigned(out['group']['assignment'])}; "
        + (f"rollout {r['id']} to {len(r['devices'])} devices now" if r else "no device in it yet"),
        highlight=False,
    )


@app.command("unassign")
def group_unassign(name: NameArg, fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None) -> None:
    """Stop giving the group's release to devices that join it (its devices keep what they have)."""
    call(fleet, token, data_dir, lambda c: c.unassign_group(name))
    out_console().print(f"group {name}: nothing assigned", highlight=False)


def _assigned(a: dict[str, Any] | None) -> str:
    if not a:
        return "nothing"
    what = a["release"] or f"package {str(a['package_id'])[:12]}"
    return what + (f" (halted: {a['halted']})" if a.get("halted") else "")


def _gates(items: list[str]) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            number = float(value)
            out[key.strip()] = int(number) if number.is_integer() else number
        except ValueError:
            raise typer.BadParameter(f"{item!r} is not KEY=NUMBER", param_hint="--gate") from None
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=NUMBER", param_hint="--gate")
    return out
