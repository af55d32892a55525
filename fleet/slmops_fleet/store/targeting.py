"""Continuous targeting: a release (or package) assigned to a named group keeps applying to the
devices that join the group (`slmops_fleet.rollouts.targeting` says who is in and who follows whom).

Assigning starts a rollout of the devices the group owns now. Every driver step, `reconcile_groups`
looks for the devices an assignment owes its release: in the group now, followed by it, and
targeted by none of its rollouts. They get a follow-up rollout with the same plan (variant
selection, waves, gates) once no rollout of the assignment is running; a rollout of the assignment
that was rolled back, cancelled or failed halts it (the release is not given to more devices; the
operator assigns again). Devices that leave a group keep what they have. A device that could run
none of the release's variants is tried again at each look (its inventory may have changed).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops_fleet.errors import Conflict, FleetError
from slmops_fleet.rollouts.plan import RolloutPlan
from slmops_fleet.rollouts.states import ACTIVE_ROLLOUT_STATES, RolloutState, TargetState
from slmops_fleet.store.database import new_id, utcnow
from slmops_fleet.store.groups import GroupQueries, find_group, group_json, membership
from slmops_fleet.store.records import DesiredRecord, RolloutRecord
from slmops_fleet.store.rollouts import RolloutQueries
from slmops_fleet.store.schema import GroupRolloutRow, GroupRow, RolloutDeviceRow, RolloutRow

log = logging.getLogger(__name__)

_HALTING = {RolloutState.ROLLED_BACK.value, RolloutState.CANCELLED.value, RolloutState.FAILED.value}


def _link(name: str, assignment_id: str, s: Session, rollout_id: str, *, assign: dict[str, Any] | None = None) -> None:
    """Inside the rollout's transaction: record it as the assignment's (and, on `assign`, the assignment)."""
    row = find_group(s, name, lock=True)
    if assign is not None:
        for key, value in assign.items():
            setattr(row, key, value)
    elif row.assignment_id != assignment_id or row.halted:
        raise Conflict(f"group {name!r}: its assignment changed")
    s.add(GroupRolloutRow(rollout_id=rollout_id, assignment_id=assignment_id, group_name=name, created_at=utcnow()))


class TargetingQueries(RolloutQueries, GroupQueries):
    def assign_group(
        self, name: str, plan: RolloutPlan, *, package_id: str | None = None, release_id: str | None = None
    ) -> tuple[dict[str, Any], RolloutRecord | None, list[DesiredRecord]]:
        """Assign a release (or a package) to a group: a rollout of the devices it owns now (none if
        it owns none yet), and the same for those that join it later (`reconcile_groups`)."""
        assignment_id = new_id("as")
        now = utcnow()
        fields = {
            "assignment_id": assignment_id,
            "package_id": package_id,
            "release_id": release_id,
            "plan": plan.to_json(),
            "assigned_at": now,
            "halted": None,
        }
        with self.session() as s:
            find_group(s, name)
            owned = membership(s, assigning=name).owned(name)
        rollout: RolloutRecord | None = None
        desired: list[DesiredRecord] = []
        if owned:
            rollout, desired = self.create_rollout(
                package_id, owned, plan, release_id=release_id, link=partial(_link, name, assignment_id, assign=fields)
            )
        else:
            with self.session(write=True) as s:
                row = find_group(s, name, lock=True)
                for key, value in fields.items():
                    setattr(row, key, value)
        log.info("group %s: assignment %s, %d devices now", name, assignment_id, len(owned))
        return self.get_group(name), rollout, desired

    def unassign_group(self, name: str) -> dict[str, Any]:
        """Stop applying the group's release to devices that join it; its devices keep what they have
        (a running rollout of the assignment goes on: cancel it to stop it)."""
        with self.session(write=True) as s:
            row = find_group(s, name, lock=True)
            row.assignment_id = row.release_id = row.package_id = row.plan = row.assigned_at = row.halted = None
            s.flush()
            return group_json(s, row)

    def reconcile_groups(self) -> list[DesiredRecord]:
        """One step of continuous targeting: follow-up rollouts for the devices assignments owe; the
        desired states to publish."""
        todo = []
        halts: dict[str, tuple[str, str]] = {}  # group -> (assignment id, why)
        with self.session() as s:  # read only: most steps find nothing to do
            rows = s.scalars(
                select(GroupRow)
                .where(GroupRow.assignment_id.is_not(None), GroupRow.halted.is_(None))
                .order_by(GroupRow.name)
            ).all()
            if not rows:
                return []
            members = membership(s)
            for row in rows:
                assert row.assignment_id is not None
                linked = s.scalars(
                    select(RolloutRow)
                    .join(GroupRolloutRow, GroupRolloutRow.rollout_id == RolloutRow.id)
                    .where(GroupRolloutRow.assignment_id == row.assignment_id)
                    .order_by(RolloutRow.created_at, RolloutRow.id)
                ).all()
                handled = set(  # a device that could run no variant is tried again (its inventory may change)
                    s.scalars(
                        select(RolloutDeviceRow.device_id).where(
                            RolloutDeviceRow.rollout_id.in_([r.id for r in linked]),
                            RolloutDeviceRow.state != TargetState.NO_VARIANT.value,
                        )
                    ).all()
                )
                new = [d for d in members.owned(row.name) if d not in handled]
                if not new or any(r.state in ACTIVE_ROLLOUT_STATES for r in linked):
                    continue
                if linked and linked[-1].state in _HALTING:
                    why = f"rollout {linked[-1].id} ended {linked[-1].state}: the release is not given to more devices"
                    halts[row.name] = (row.assignment_id, why)
                    continue
                todo.append((row.name, row.assignment_id, row.package_id, row.release_id, row.plan, new))
        if halts:
            with self.session(write=True) as s:
                for name, (assignment_id, why) in halts.items():
                    group = s.get(GroupRow, name, with_for_update=True)
                    if group is not None and group.assignment_id == assignment_id:
                        group.halted = why
                        log.warning("group %s: %s", name, why)
        out: list[DesiredRecord] = []
        notes: dict[str, str] = self.__dict__.setdefault("_targeting_notes", {})
        for name, assignment_id, package_id, release_id, plan, new in todo:
            try:
                rollout, desired = self.create_rollout(
                    package_id,
                    new,
                    RolloutPlan.from_json(plan),
                    release_id=release_id,
                    link=partial(_link, name, assignment_id),
                )
            except FleetError as exc:
                if notes.get(assignment_id) != str(exc):
                    notes[assignment_id] = str(exc)
                    log.warning("group %s: %d devices joined, no follow-up rollout: %s", name, len(new), exc)
                continue
            notes.pop(assignment_id, None)
            log.info("group %s: follow-up rollout %s for %d devices that joined", name, rollout.id, len(new))
            out += desired
        return out
