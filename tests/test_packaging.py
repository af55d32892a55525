"""Installability: the device install pulls neither torch nor transformers, and the
agent's code imports neither; the device's own distribution (agent/pyproject.toml) carries no fleet
or builder code, no typer or rich, and the same device dependencies as the top-level agent extra."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from fnmatch import fnmatch
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

HEAVY = {"torch", "transformers", "peft", "olive-ai", "accelerate"}
ROOT = Path(__file__).resolve().parents[1]
# the CLI's presentation libraries: the fleet's and the builder's CLIs use them, the device does not
PRESENTATION = {"typer", "rich"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolved(root: str, extra: str) -> set[str]:
    """Distributions that installing root[extra] pulls, walked through the installed metadata."""
    return _walk(root, [(distribution(root).requires or [], {extra})])


def pulled(requirements: list[str]) -> set[str]:
    """Distributions that installing these requirements pulls, walked through the installed metadata."""
    return _walk("", [(requirements, set())])


def _walk(root: str, todo: list[tuple[list[str], set[str]]]) -> set[str]:
    seen: set[str] = set()
    while todo:
        lines, extras = todo.pop()
        for line in lines:
            req = Requirement(line)
            marker: Marker | None = req.marker
            env_extras = extras | {""}
            if marker is not None and not any(marker.evaluate({"extra": e}) for e in env_extras):
                continue
            key = _norm(req.name)
            if key == _norm(root):  # slmops[agent,...] self-references
                todo.append((distribution(root).requires or [], set(req.extras)))
                continue
            if key in seen:
                continue
            seen.add(key)
            try:
                dist = distribution(req.name)
            except PackageNotFoundError:
                continue  # optional, not installed here: nothing below it to walk
            todo.append((dist.requires or [], set(req.extras)))
    return seen


def test_agent_extra_pulls_no_torch() -> None:
    deps = resolved("slmops", "agent")
    assert {"onnxruntime-genai", "grpcio", "paho-mqtt", "psutil"} <= deps
    assert not deps & HEAVY, deps & HEAVY


def test_builder_extra_does_pull_torch() -> None:
    # The walk itself must be able to see torch, or the test above proves nothing.
    assert {"torch", "transformers"} <= resolved("slmops", "builder")


def test_agent_code_imports_no_torch() -> None:
    code = (
        "import sys, pkgutil, importlib, slmops_agent\n"
        "for m in pkgutil.walk_packages(slmops_agent.__path__, 'slmops_agent.'):\n"
        "    importlib.import_module(m.name)\n"
        "import slmops_cli.main\n"
        "bad = ('torch', 'transformers', 'slmops_fleet', 'slmops_builder', 'typer', 'rich')\n"
        "print(sorted(n for n in bad if n in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_console_assets_are_package_data() -> None:
    """Every file the web console serves is in the wheel (pyproject's package-data), uPlot's licence too."""
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = root / "fleet" / "slmops_fleet"
    assets = [p.relative_to(package).as_posix() for p in (package / "console" / "static").iterdir()]
    assert {"console/static/console.js", "console/static/uPlot.iife.min.js", "console/static/uPlot.LICENSE"} <= set(
        assets
    )
    for asset in assets:
        assert any(fnmatch(asset, p) for p in patterns.get("slmops_fleet", [])), f"{asset} is not package data"


def _requirements(lines: list[str]) -> dict[str, str]:
    return {_norm(Requirement(r).name): str(Requirement(r)) for r in lines}


def test_the_device_distribution_has_the_base_and_the_agent_extra_no_more() -> None:
    """One rule, two files: what `pip install ./agent` pulls is what `slmops[agent]` pulls, and neither
    pulls the CLI's presentation libraries (the fleet and builder extras do)."""
    top = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    device = tomllib.loads((ROOT / "agent" / "pyproject.toml").read_text())["project"]
    expected = _requirements(top["dependencies"] + top["optional-dependencies"]["agent"])
    assert _requirements(device["dependencies"]) == expected
    assert device["scripts"] == top["scripts"]
    assert not pulled(device["dependencies"]) & PRESENTATION, pulled(device["dependencies"]) & PRESENTATION
    for extra in ("fleet", "builder"):  # the walk can see them, or the line above proves nothing
        assert pulled(top["dependencies"] + top["optional-dependencies"][extra]) >= PRESENTATION


def test_the_device_wheel_carries_no_fleet_builder_typer_or_rich(tmp_path: Path) -> None:
    """A real build of agent/pyproject.toml: its wheel holds the agent, the contract and the CLI shell
    (every module of the first two), requires neither typer nor rich nor anything heavy, and `slmops`
    runs `slmops_cli.main`."""
    src = tmp_path / "src"  # a copy: pip builds in the source folder (build/, *.egg-info)
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    for part in ("agent", "protos", "slmops_cli"):
        shutil.copytree(ROOT / part, src / part, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src / "agent")],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("slmops_agent-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(z.read(f"{info}/METADATA").decode())
        scripts = z.read(f"{info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {"slmops_agent", "slmops_protos", "slmops_cli", info}
    for package in ("agent/slmops_agent", "protos/slmops_protos"):
        modules = {p.relative_to(ROOT / package.split("/")[0]).as_posix() for p in (ROOT / package).rglob("*.py")}
        assert modules <= set(names), sorted(modules - set(names))
    required = {_norm(Requirement(r).name) for r in metadata.get_all("Requires-Dist") or []}
    assert {"onnxruntime-genai", "grpcio", "click"} <= required
    assert not required & (PRESENTATION | HEAVY), required & (PRESENTATION | HEAVY)
    assert "slmops = slmops_cli.main:main" in scripts
