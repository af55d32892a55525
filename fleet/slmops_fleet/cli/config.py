"""`slmops fleet config show`: the settings `slmops fleet serve` would run with, and where each comes
from (flags > environment > config file > defaults; secrets masked). The same loading as `serve`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from slmops_fleet.cli.common import DataDirOpt, JsonOpt, err_console, fail

if TYPE_CHECKING:
    from slmops_cli.settings_files import Loaded
    from slmops_fleet.settings import FleetSettings

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="SLMOPS_FLEET_CONFIG",
        help="TOML file of settings (default: <data dir>/fleet.toml when it exists; flags and SLMOPS_FLEET_* "
        "override it).",
    ),
]
# Variables with the settings' prefix that are not settings: the CLI's own.
CLI_VARIABLES = ("SLMOPS_FLEET_URL", "SLMOPS_FLEET_TOKEN", "SLMOPS_FLEET_CONFIG")

app = typer.Typer(help="The fleet's settings: what `serve` would run with.", no_args_is_help=True)


def load_fleet_settings(config: Path | None, flags: dict[str, Any]) -> Loaded[FleetSettings]:
    """FleetSettings from flags > environment > config file > defaults; fails with one line, warns about
    misspelt SLMOPS_FLEET_* variables on stderr."""
    from slmops_cli.settings_files import SettingsError, load
    from slmops_fleet.settings import DEFAULT_DATA_DIR, FleetSettings

    def default_file(values: dict[str, Any]) -> Path:
        return Path(values.get("data_dir") or DEFAULT_DATA_DIR).expanduser() / "fleet.toml"

    try:
        loaded = load(
            FleetSettings, flags=flags, config=config, default_config=default_file, also_known_env=CLI_VARIABLES
        )
    except SettingsError as exc:
        fail(str(exc))
    for warning in loaded.warnings:
        err_console().print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    return loaded


@app.command("show")
def show(config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Print the effective settings and where each comes from (secrets masked)."""
    from slmops_cli.settings_files import show as show_settings

    show_settings(load_fleet_settings(config, {"data_dir": data_dir}), as_json=as_json)
