"""`slmops builder|fleet|agent|demo`.

Each group lives with its program and is imported only when it is invoked or listed;
the group modules import their heavy dependencies inside the commands, and a group
whose extra is not installed shows how to install it instead of failing.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer
from typer.core import TyperGroup

# name -> (module, attribute, one-line help, the extra that installs its dependencies)
_GROUPS = {
    "builder": (
        "slmops_builder.cli",
        "Build, quantize, evaluate and sign model packages (cloud side).",
        "builder",
    ),
    "fleet": ("slmops_fleet.cli", "Run the fleet manager and operate it: tokens, packages, rollouts.", "fleet"),
    "agent": ("slmops_agent.cli", "The on-device agent: enroll, run, ask.", "agent"),
    "demo": ("slmops_cli.demo", "The whole journey on this machine: build, fleet, two agents, v1 then v2.", "all"),
}


class _LazyGroup(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        return list(_GROUPS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in _GROUPS:
            return None
        module_name, help_text, extra = _GROUPS[cmd_name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            return _missing(cmd_name, help_text, extra, exc)
        command = typer.main.get_command(module.app)
        command.name = cmd_name
        return command


def _missing(name: str, help_text: str, extra: str, exc: ImportError) -> Any:
    missing = typer.Typer(help=help_text, add_completion=False)

    @missing.callback(invoke_without_command=True, context_settings={"ignore_unknown_options": True})
    def fail() -> None:
        typer.echo(
            f"'slmops {name}' needs packages that are not installed ({exc.name or exc}).\n"
            f"Install them with: pip install 'slmops[{extra}]'",
            err=True,
        )
        raise typer.Exit(2)

    return typer.main.get_command(missing)


app = typer.Typer(
    cls=_LazyGroup,
    help="slmops: operations for small language models on edge devices.",
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    no_args_is_help=True,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"slmops {version('slmops')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """slmops: operations for small language models on edge devices."""


def main() -> None:
    app()
