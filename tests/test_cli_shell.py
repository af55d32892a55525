"""The `slmops` shell (plain click): its groups, the typer programs run under it (their help, -h too,
and their exit codes pass through), and a group whose code is not installed (a device's install has
no fleet or builder) answers how to install it."""

from __future__ import annotations

import subprocess
import sys

from slmops_cli.procs import slmops_cmd
from slmops_protos import __version__


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(slmops_cmd(*args), capture_output=True, text=True, timeout=120)


def test_the_shell_lists_its_groups_and_its_version() -> None:
    done = _run("-h")
    assert done.returncode == 0
    assert [line.split()[0] for line in done.stdout.split("Commands:")[1].strip().splitlines()] == [
        "builder",
        "fleet",
        "agent",
        "demo",
    ]
    assert _run("--version").stdout.strip() == f"slmops {__version__}"


def test_typer_programs_run_under_their_group_with_their_help_and_exit_codes() -> None:
    for args, usage in (
        (("fleet", "-h"), "fleet [OPTIONS] COMMAND"),
        (("builder", "build", "--help"), "builder build"),
    ):
        done = _run(*args)
        assert done.returncode == 0 and usage in " ".join(done.stdout.split()), done.stdout
    done = _run("fleet", "no-such-command")
    assert done.returncode == 2 and "No such command" in done.stderr
    done = _run("agent", "-h")
    assert done.returncode == 0 and "enroll" in done.stdout and "run" in done.stdout


def test_a_group_not_installed_says_how_to_install_it() -> None:
    code = (
        "import sys\n"
        "sys.modules['slmops_fleet'] = None  # as on a device: slmops-agent has no fleet code\n"
        "from slmops_cli.main import main\n"
        "sys.argv = ['slmops', 'fleet', 'status', '--json']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "'slmops fleet' needs packages that are not installed" in done.stderr
    assert "pip install 'slmops[fleet]'" in done.stderr


def test_plain_tables_align_their_columns_with_or_without_a_header() -> None:
    from slmops_cli.tables import plain_table

    rows = [("device", "(not enrolled)"), ("queue depth", "0")]
    assert (
        plain_table("agent at unix:/s", None, rows) == "agent at unix:/s\ndevice       (not enrolled)\nqueue depth  0\n"
    )
    table = plain_table("models", ("slot", "name"), [("a", "smollm2"), ("b", "")])
    assert table == "models\nslot  name\n----  -------\na     smollm2\nb\n"
    assert plain_table("models", ("slot", "name"), []) == "models\nslot  name\n----  ----\n"
