"""`slmops builder|fleet|agent|demo`.

Each group lives with its program and is imported only when it is invoked or listed;
the group modules import their heavy dependencies inside the commands, and a group
whose extra is not installed shows how to install it instead of failing.

The shell is plain click, as the agent's group is: the device's install (agent/pyproject.toml)
carries neither typer nor rich. The fleet's, the builder's and the demo's groups are typer apps:
each runs as its own typer program under `slmops <group>` (typer vendors its own click, so its
commands are not mixed into this click group).
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from slmops_protos import __version__

# name -> (module, one-line help, the extra that installs its dependencies)
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
_HELP = ["-h", "--help"]
_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_GROUPS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _GROUPS:
            return None
        module_name, help_text, extra = _GROUPS[cmd_name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            return _missing(cmd_name, help_text, extra, exc)
        if isinstance(module.app, click.Command):
            return module.app
        return _typer_program(cmd_name, help_text, module.app)


def _typer_program(name: str, help_text: str, typer_app: Any) -> click.Command:
    """A typer app as `slmops NAME ...`: every argument after NAME goes to it, --help too."""

    @click.command(name, help=help_text, context_settings=_PASS_THROUGH, add_help_option=False)
    @click.pass_context
    def run(ctx: click.Context) -> None:
        import typer.main

        prog = f"{ctx.parent.info_name if ctx.parent else 'slmops'} {name}"
        typer.main.get_command(typer_app).main(args=ctx.args, prog_name=prog, help_option_names=_HELP)

    return run


def _missing(name: str, help_text: str, extra: str, exc: ImportError) -> click.Command:
    @click.command(name, help=help_text, context_settings=_PASS_THROUGH, add_help_option=False)
    def fail() -> None:
        click.echo(
            f"'slmops {name}' needs packages that are not installed ({exc.name or exc}).\n"
            f"Install them with: pip install 'slmops[{extra}]'",
            err=True,
        )
        raise click.exceptions.Exit(2)

    return fail


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": _HELP},
    no_args_is_help=True,
)
@click.version_option(__version__, message="slmops %(version)s", help="Show the version.")
def app() -> None:
    """slmops: operations for small language models on edge devices."""


def main() -> None:
    app()


if __name__ == "__main__":  # `python -m slmops_cli.main`, as torchrun -m and accelerate launch -m run it
    main()
