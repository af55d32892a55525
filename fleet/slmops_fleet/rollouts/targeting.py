"""Named groups and continuous targeting, without a database: who is in a group now, which assigned
group owns a device, and what a group's assignment still owes.

- A group is static (a list of device ids) or dynamic (a selector, which may not name groups).
  Revoked devices are in no group.
- A group may have an assignment: a release (or package) with a rollout plan. The fleet keeps
  applying it: a device that is in the group now and that no rollout of the assignment has targeted
  gets it, by a follow-up rollout with the same plan (variant selection, waves, gates).
- A device in several assigned groups follows one: the group of the highest priority, ties broken by
  the group name (alphabetical). A device that leaves a group keeps what it has; if it is now owned
  by another assigned group, that group's assignment gives it its release.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

from slmops_fleet.rollouts.selectors import DeviceFacts, Selector, check_groups, parse_selector
from slmops_fleet.rollouts.waves import PlanError

MAX_GROUP_DEVICES = 10_000
MAX_GROUPS = 1000  # every driver step evaluates every assigned group


class Device(Protocol):
    id: str
    name: str
    tags: list[str]
    inventory: dict[str, Any]


@dataclass(frozen=True)
class GroupDef:
    name: str
    selector: str | None  # dynamic
    devices: tuple[str, ...] | None  # static
    priority: int = 0
    assigned: bool = False

    def parsed(self) -> Selector:
        return parse_selector(self.selector or "")


def check_group_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", name):
        raise PlanError(f"group name {name[:80]!r} must be 1-64 letters, digits or _ . : -")


def check_group(group: GroupDef) -> None:
    """A PlanError for a group that cannot be stored."""
    check_group_name(group.name)
    if (group.selector is None) == (group.devices is None):
        raise PlanError("a group is a selector (dynamic) or a list of devices (static): give exactly one")
    if group.selector is not None:
        if not group.selector.strip():
            raise PlanError("a dynamic group needs a selector")
        check_groups(group.parsed(), None)
    if group.devices is not None and not 1 <= len(group.devices) <= MAX_GROUP_DEVICES:
        raise PlanError(f"a static group lists 1 to {MAX_GROUP_DEVICES} devices")


class Membership:
    """Group membership of a set of devices, given every group's definition."""

    def __init__(self, groups: Sequence[GroupDef], devices: Sequence[Device]) -> None:
        self.groups = {g.name: g for g in groups}
        self._selectors = {g.name: g.parsed() for g in groups if g.selector is not None}
        self._static = {g.name: set(g.devices or ()) for g in groups if g.devices is not None}
        self.devices = {d.id: d for d in devices}
        self._assigned = sorted((g for g in groups if g.assigned), key=lambda g: (-g.priority, g.name))
        self._in = cache(self._compute)
        self._bare = cache(self._facts_without_groups)  # one per device, whatever the number of groups

    def _compute(self, device_id: str, group: str) -> bool:
        if group in self._static:
            return device_id in self._static[group]
        sel = self._selectors.get(group)
        return sel is not None and sel.matches(self._bare(device_id))

    def _facts_without_groups(self, device_id: str) -> DeviceFacts:
        d = self.devices[device_id]
        return DeviceFacts(d.id, d.name or "", list(d.tags or []), dict(d.inventory or {}))

    def facts(self, device_id: str) -> DeviceFacts:
        """What a rollout's selector sees of a device, `group=NAME` included."""
        d = self.devices[device_id]
        return DeviceFacts(
            d.id, d.name or "", list(d.tags or []), dict(d.inventory or {}), lambda g: self._in(device_id, g)
        )

    def members(self, group: str) -> list[str]:
        return sorted(d for d in self.devices if self._in(d, group))

    def groups_of(self, device_id: str) -> list[str]:
        """The named groups the device is in, by name."""
        return sorted(g for g in self.groups if self._in(device_id, g))

    def owner(self, device_id: str) -> str | None:
        """The assigned group the device follows: the highest priority, then the first name."""
        return next((g.name for g in self._assigned if self._in(device_id, g.name)), None)

    def owned(self, group: str) -> list[str]:
        """The group's members that follow its assignment (not a higher-priority group's)."""
        return [d for d in self.members(group) if self.owner(d) == group]
