"""Named device groups: create, list, show (members now) and delete them, and the group membership
the rollouts' selectors see (`membership`). What an assignment does lives in `store.targeting`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from slmops_fleet.errors import Conflict, InvalidRequest, NotFound
from slmops_fleet.rollouts import targeting
from slmops_fleet.rollouts.plan import RolloutPlan
from slmops_fleet.rollouts.selectors import check_groups, parse_selector
from slmops_fleet.rollouts.targeting import GroupDef, Membership, check_group
from slmops_fleet.rollouts.waves import PlanError
from slmops_fleet.store.database import Database, utcnow
from slmops_fleet.store.schema import DeviceRow, GroupRow, ReleaseRow


def group_def(row: GroupRow) -> GroupDef:
    return GroupDef(
        row.name,
        row.selector,
        tuple(row.devices) if row.devices is not None else None,
        row.priority or 0,
        row.assignment_id is not None,
    )


def _groups(s: Session) -> list[GroupDef]:
    return [group_def(g) for g in s.scalars(select(GroupRow).order_by(GroupRow.name)).all()]


def membership(s: Session, device_ids: Sequence[str] | None = None, *, assigning: str | None = None) -> Membership:
    """Every group and the devices (of `device_ids`, or every device that is not revoked);
    `assigning` counts that group as assigned already."""
    query = select(DeviceRow.id, DeviceRow.name, DeviceRow.tags, DeviceRow.inventory).where(
        DeviceRow.revoked_at.is_(None)
    )
    if device_ids is not None:
        query = query.where(DeviceRow.id.in_(device_ids))
    groups = [replace(g, assigned=True) if g.name == assigning else g for g in _groups(s)]
    return Membership(groups, s.execute(query).all())  # rows of four columns: no ORM objects to build


def device_groups(s: Session, rows: Sequence[DeviceRow]) -> dict[str, tuple[list[str], str | None]]:
    """Each device's named groups and the assigned group it follows, for device rows already read
    (revoked devices are in none): one query, of the groups, whatever the number of devices."""
    m = Membership(_groups(s), [r for r in rows if r.revoked_at is None])
    return {d: (m.groups_of(d), m.owner(d)) for d in m.devices}


def check_plan_groups(s: Session, plan: RolloutPlan) -> None:
    """An InvalidRequest at the first group a plan's selectors name that does not exist."""
    known = set(s.scalars(select(GroupRow.name)).all())
    try:
        for text in plan.selectors():
            check_groups(parse_selector(text), known)
    except PlanError as exc:
        raise InvalidRequest(str(exc)) from exc


def group_json(s: Session, row: GroupRow, members: Membership | None = None) -> dict[str, Any]:
    m = members or membership(s)
    release = s.get(ReleaseRow, row.release_id) if row.release_id else None
    out: dict[str, Any] = {
        "name": row.name,
        "kind": "static" if row.devices is not None else "dynamic",
        "selector": row.selector,
        "devices": list(row.devices) if row.devices is not None else None,
        "priority": row.priority or 0,
        "created_at": row.created_at.isoformat(),
        "members": m.members(row.name),
        "assignment": None,
    }
    if row.assignment_id is not None:
        out["assignment"] = {
            "id": row.assignment_id,
            "release": f"{release.name}@{release.version}" if release else None,
            "package_id": row.package_id,
            "plan": row.plan,
            "assigned_at": row.assigned_at.isoformat() if row.assigned_at else None,
            "following": m.owned(row.name),
            "halted": row.halted,
        }
    return out


class GroupQueries(Database):
    def create_group(
        self, name: str, *, selector: str | None = None, devices: Sequence[str] | None = None, priority: int = 0
    ) -> dict[str, Any]:
        """A dynamic group (`selector`) or a static one (`devices`, which must be enrolled)."""
        group = GroupDef(
            name,
            selector.strip() if selector is not None else None,
            tuple(sorted(set(devices))) if devices is not None else None,
            priority,
        )
        try:
            check_group(group)
        except PlanError as exc:
            raise InvalidRequest(str(exc)) from exc
        with self.session(write=True) as s:
            if s.get(GroupRow, name) is not None:
                raise Conflict(f"group {name!r} exists (delete it first)")
            if len(s.scalars(select(GroupRow.name)).all()) >= targeting.MAX_GROUPS:
                raise Conflict(f"this fleet has {targeting.MAX_GROUPS} groups, the most it keeps; delete one first")
            if group.devices is not None:
                known = set(s.scalars(select(DeviceRow.id).where(DeviceRow.id.in_(group.devices))).all())
                unknown = [d for d in group.devices if d not in known]
                if unknown:
                    raise InvalidRequest(f"unknown device ids: {', '.join(unknown[:10])}")
            row = GroupRow(
                name=name,
                selector=group.selector,
                devices=list(group.devices) if group.devices is not None else None,
                priority=priority,
                created_at=utcnow(),
            )
            s.add(row)
            s.flush()
            return group_json(s, row)

    def list_groups(self) -> list[dict[str, Any]]:
        with self.session() as s:
            m = membership(s)
            return [group_json(s, r, m) for r in s.scalars(select(GroupRow).order_by(GroupRow.name)).all()]

    def get_group(self, name: str) -> dict[str, Any]:
        with self.session() as s:
            return group_json(s, find_group(s, name))

    def delete_group(self, name: str) -> None:
        """Delete a group; its devices keep what they have. Refused while it has an assignment, or
        another group's assignment names it in a selector wave (unassign first)."""
        with self.session(write=True) as s:
            row = find_group(s, name, lock=True)
            if row.assignment_id is not None:
                raise Conflict(f"group {name!r} has a release assigned; unassign it first")
            for other in s.scalars(select(GroupRow).where(GroupRow.assignment_id.is_not(None))).all():
                texts = RolloutPlan.from_json(other.plan).selectors()
                if any(g == name for text in texts for g, _col in parse_selector(text).groups()):
                    raise Conflict(
                        f"group {other.name!r}'s assignment selects waves by group {name!r}; unassign it first"
                    )
            s.execute(delete(GroupRow).where(GroupRow.name == name))


def find_group(s: Session, name: str, *, lock: bool = False) -> GroupRow:
    row = s.get(GroupRow, name, with_for_update=lock)
    if row is None:
        known = sorted(s.scalars(select(GroupRow.name)).all())
        raise NotFound(f"unknown group {name!r}" + (f" (groups: {', '.join(known[:20])})" if known else ""))
    return row
