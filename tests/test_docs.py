"""The newcomer's documents stand on their own: every relative link resolves to a file of the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "ARCHITECTURE.md", "protos/README.md", "benchmarks/README.md")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves_inside_the_repository(doc: str) -> None:
    path = ROOT / doc
    for target in relative_links(path.read_text()):
        resolved = (path.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc} links outside the repository: {target}"
        assert resolved.exists(), f"{doc} links to a missing file: {target}"


def test_links_are_found() -> None:
    text = "see [a](docs/a.md), [b](https://example.org/b), [c](#top) and [d](../d.md#part)"
    assert relative_links(text) == ["docs/a.md", "../d.md#part"]


def test_the_architecture_names_modules_that_exist() -> None:
    """Module paths written in backticks with a slash or `.py` in ARCHITECTURE.md exist."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    programs = {"builder": "builder/slmops_builder", "fleet": "fleet/slmops_fleet", "agent": "agent/slmops_agent"}
    section = None
    missing = []
    for line in text.splitlines():
        heading = re.match(r"## The (\w+) \(", line)
        if heading:
            section = programs.get(heading.group(1))
        elif line.startswith("## "):
            section = None
        elif section and line.startswith("| `"):
            for name in re.findall(r"`([a-z_/]+(?:\.py)?)`", line.split("|")[1]):
                if not (ROOT / section / name).exists():
                    missing.append(f"{section}/{name}")
    assert not missing, f"ARCHITECTURE.md names modules that do not exist: {missing}"
