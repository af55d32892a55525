"""Targets: device tags and the inventory selectors that narrow a rollout's target."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from slmops_fleet.rollouts.waves import PlanError

MAX_TAGS = 32
_TAG = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_TERM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*(>=|<=|!=|=|>|<)\s*(.*?)\s*$")
_ORDERING = {">=", "<=", ">", "<"}


def check_tags(tags: Sequence[str]) -> list[str]:
    """Valid, deduplicated, sorted tags, or a PlanError naming the bad one."""
    for tag in tags:
        if not _TAG.match(tag):
            raise PlanError(f"tag {tag[:80]!r} must be 1-64 letters, digits or _ . : -")
    out = sorted(set(tags))
    if len(out) > MAX_TAGS:
        raise PlanError(f"a device has at most {MAX_TAGS} tags, got {len(out)}")
    return out


@dataclass(frozen=True)
class Term:
    key: str
    op: str
    value: str

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"


def _number(text: Any) -> float | None:
    if isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        return float(text)
    try:
        return float(str(text))
    except ValueError:
        return None


def parse_selector(text: str | None) -> list[Term]:
    """'tag=canary,arch=x86_64,memory_bytes>=2e9': every term must hold (AND).

    Keys: `tag` (= has the tag, != lacks it), `id`, `name`, or any inventory key (os, arch, cpu_count,
    memory_bytes, disk_free_bytes, providers, cpu_features, agent_version). Numbers compare as numbers
    (>=, <=, >, <, =, !=); a list (providers, cpu_features) `=` means it contains the value."""
    if text is None or not text.strip():
        return []
    terms = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        m = _TERM.match(raw)
        if not m or not m.group(3):
            raise PlanError(f"selector term {raw.strip()[:80]!r} is not KEY=VALUE, KEY!=VALUE or KEY>=NUMBER")
        key, op, value = m.group(1), m.group(2), m.group(3)
        if op in _ORDERING and _number(value) is None:
            raise PlanError(f"selector term {raw.strip()!r}: {op} needs a number")
        if key == "tag" and op not in ("=", "!="):
            raise PlanError(f"selector term {raw.strip()!r}: tags take = or != only")
        terms.append(Term(key, op, value))
    return terms


def _term_holds(term: Term, device_id: str, name: str, tags: Sequence[str], inventory: dict[str, Any]) -> bool:
    if term.key == "tag":
        return (term.value in tags) == (term.op == "=")
    if term.key == "id":
        have: Any = device_id
    elif term.key == "name":
        have = name
    elif term.key in inventory:
        have = inventory[term.key]
    else:
        return False
    if isinstance(have, list):
        if term.op not in ("=", "!="):
            return False
        return (term.value in [str(x) for x in have]) == (term.op == "=")
    left, right = _number(have), _number(term.value)
    if left is not None and right is not None and not isinstance(have, str):
        return {
            "=": left == right,
            "!=": left != right,
            ">=": left >= right,
            "<=": left <= right,
            ">": left > right,
            "<": left < right,
        }[term.op]
    if term.op in _ORDERING:
        return False
    return (str(have) == term.value) == (term.op == "=")


def selector_matches(
    terms: Sequence[Term], *, device_id: str, name: str, tags: Sequence[str], inventory: dict[str, Any]
) -> bool:
    return all(_term_holds(t, device_id, name, tags, inventory) for t in terms)
