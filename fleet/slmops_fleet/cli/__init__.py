"""`slmops fleet ...`: run the fleet manager and operate it.

Cheap to import: FastAPI, SQLAlchemy, amqtt and paho are imported inside the commands.
Commands other than `serve` find the fleet by --fleet URL + --token, by SLMOPS_FLEET_URL and
SLMOPS_FLEET_TOKEN, or by <data dir>/fleet.json (which `serve` writes); an https:// fleet is
verified with `slmops fleet --ca FILE`, SLMOPS_FLEET_CA, or the CA fleet.json names.
"""

import os
from pathlib import Path
from typing import Annotated

import typer

from slmops_fleet.cli import (
    admin,
    config,
    devices,
    groups,
    keys,
    packages,
    releases,
    rollouts,
    serve,
    status,
    tokens,
)

__all__ = ["app"]

app = typer.Typer(
    help="Run the fleet manager and operate it: tokens, packages, rollouts, devices, signing keys.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _options(
    ca: Annotated[
        Path | None,
        typer.Option(
            "--ca",
            envvar="SLMOPS_FLEET_CA",
            help="CA (PEM) to verify an https:// fleet with (default: the one its fleet.json names).",
        ),
    ] = None,
) -> None:
    if ca is not None:
        os.environ["SLMOPS_FLEET_CA"] = str(ca)  # what `client.resolve_target` reads


app.command()(serve.serve)
app.command()(status.status)
app.command()(status.stats)
app.add_typer(tokens.app, name="token")
app.add_typer(packages.app, name="package")
app.add_typer(releases.app, name="release")
app.add_typer(rollouts.app, name="rollout")
app.add_typer(devices.app, name="device")
app.add_typer(groups.app, name="group")
app.add_typer(admin.app, name="admin-token")
app.command()(admin.audit)
app.add_typer(keys.app, name="keys")
app.add_typer(config.app, name="config")
