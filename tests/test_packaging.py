"""Installability: the device install pulls neither torch nor transformers, and the
agent's code imports neither."""

from __future__ import annotations

import re
import subprocess
import sys
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


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolved(root: str, extra: str) -> set[str]:
    """Distributions that installing root[extra] pulls, walked through the installed metadata."""
    seen: set[str] = set()
    todo: list[tuple[str, set[str]]] = [(root, {extra})]
    while todo:
        name, extras = todo.pop()
        dist = distribution(name)
        for line in dist.requires or []:
            req = Requirement(line)
            marker: Marker | None = req.marker
            env_extras = extras | {""}
            if marker is not None and not any(marker.evaluate({"extra": e}) for e in env_extras):
                continue
            key = _norm(req.name)
            if key == _norm(root):  # slmops[agent,...] self-references
                todo.append((root, set(req.extras)))
                continue
            if key in seen:
                continue
            seen.add(key)
            try:
                distribution(req.name)
            except PackageNotFoundError:
                continue  # optional, not installed here: nothing below it to walk
            todo.append((req.name, set(req.extras)))
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
        "bad = sorted(n for n in ('torch', 'transformers', 'slmops_fleet', 'slmops_builder') if n in sys.modules)\n"
        "print(bad)\n"
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
