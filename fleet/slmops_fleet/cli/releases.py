"""`slmops fleet release ...`: group packages into releases (the variants of one model version)."""

from __future__ import annotations

from typing import Annotated, Any

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

app = typer.Typer(help="Releases: the variants of one model version.", no_args_is_help=True)


@app.command("create")
def release_create(
    name: Annotated[str, typer.Argument(help="Release name (the model's name).")],
    version: Annotated[str, typer.Argument(help="Release version.")],
    package: Annotated[
        list[str],
        typer.Option(
            "--package",
            help="A package of the release (id or unique prefix), repeatable: model variants, one per hardware "
            "profile, or adapter packages, one per base.",
        ),
    ],
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Group uploaded packages into release NAME@VERSION; a rollout of it gives each device the best variant it
    can run (`slmops fleet rollout explain` says which and why)."""
    ids = [p.strip() for item in package for p in item.split(",") if p.strip()]
    release = call(fleet, token, data_dir, lambda c: c.create_release(name, version, ids))
    if as_json:
        print_json(release)
        return
    _print_release(release)


def _print_release(release: dict[str, Any]) -> None:
    table = new_table(f"release {release['ref']} ({release['id']})", "package", "kind", "profile", "provider", "needs")
    for p in release["packages"]:
        if p.get("base_package_id"):
            needs = f"base {p['base_package_id'][:12]}"
        else:
            needs = f"{size_text(p['min_memory_bytes'])} memory" if p["min_memory_bytes"] else ""
        table.add_row(p["id"][:16], p["kind"], p["profile"], p["provider"], needs)
    out_console().print(table)


@app.command("list")
def release_list(
    fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List releases."""
    releases = call(fleet, token, data_dir, lambda c: c.list_releases())
    if as_json:
        print_json(releases)
        return
    table = new_table("releases", "release", "id", "packages", "profiles", "created")
    for r in releases:
        profiles = ", ".join(p["profile"] or p["kind"] for p in r["packages"])
        table.add_row(r["ref"], r["id"], str(len(r["packages"])), profiles, ago_text(r["created_at"]))
    out_console().print(table)


@app.command("show")
def release_show(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION or a release id.")],
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One release and its packages."""
    release = call(fleet, token, data_dir, lambda c: c.get_release(ref))
    if as_json:
        print_json(release)
        return
    _print_release(release)
