"""`slmops fleet package ...`: upload signed packages and list them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from slmops_fleet.cli.common import (
    DataDirOpt,
    FleetOpt,
    JsonOpt,
    TokenOpt,
    ago_text,
    call,
    err_console,
    fail,
    new_table,
    out_console,
    print_json,
    size_text,
)

app = typer.Typer(help="Model packages.", no_args_is_help=True)


@app.command("upload")
def package_upload(
    folder: Annotated[Path, typer.Argument(help="The package folder `slmops builder build` wrote.")],
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a signed package; only the blobs the fleet lacks are sent."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    if not folder.exists():
        fail(f"package folder not found: {folder}")
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        console=err_console(),
        transient=as_json,
    )
    task: list[Any] = []

    def on_start(blobs: int, total: int) -> None:
        if blobs:
            task.append(progress.add_task(f"uploading {blobs} blobs", total=total))

    def on_bytes(n: int) -> None:
        if task:
            progress.advance(task[0], n)

    with progress:
        result = call(fleet, token, data_dir, lambda c: c.upload_package(folder, on_start=on_start, on_bytes=on_bytes))
    if as_json:
        print_json(result)
        return
    skipped = result["file_count"] - result["uploaded_blobs"]
    out_console().print(
        f"package [bold]{result['name']} {result['version']}[/] ({result['profile'] or 'no profile'})\n"
        f"  id        {result['package_id']}\n"
        f"  security  version {result['security_version']} (devices refuse packages below what they committed)\n"
        f"  uploaded  {result['uploaded_blobs']} blobs, {size_text(result['uploaded_bytes'])}"
        f" ({max(0, skipped)} files already on the fleet)\n"
        f"  complete  {'yes' if result['complete'] else 'no: ' + str(len(result['missing_blobs'])) + ' blobs missing'}",
        highlight=False,
    )


@app.command("list")
def package_list(
    fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List uploaded packages."""
    packages = call(fleet, token, data_dir, lambda c: c.list_packages())
    if as_json:
        print_json(packages)
        return
    columns = ("id", "name", "version", "profile", "kind", "security", "size", "complete", "uploaded")
    table = new_table("packages", *columns)
    for p in packages:
        table.add_row(
            p["id"][:16],
            p["name"],
            p["version"],
            p["profile"],
            p["kind"],
            str(p["security_version"]),
            size_text(p["size_bytes"]),
            "yes" if p["complete"] else f"{len(p['missing_blobs'])} blobs missing",
            ago_text(p["created_at"]),
        )
    out_console().print(table)
