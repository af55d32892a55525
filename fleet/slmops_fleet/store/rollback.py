"""Fleet rollback in one transaction: the rollout that returns the devices another rollout changed
to the package each had before (`slmops_fleet.rollouts.rollback` decides which), with the same waves
and gates; the original is cancelled first when it still runs."""

from __future__ import annotations

import logging

from sqlalchemy import select

from slmops_fleet.errors import NotFound
from slmops_fleet.rollouts import rules
from slmops_fleet.rollouts.plan import RolloutPlan
from slmops_fleet.rollouts.rollback import plan_rollback
from slmops_fleet.rollouts.states import ACTIVE_ROLLOUT_STATES, RolloutState
from slmops_fleet.store.database import new_id, utcnow
from slmops_fleet.store.devices import latest_desired
from slmops_fleet.store.groups import membership
from slmops_fleet.store.records import DesiredRecord, RolloutRecord
from slmops_fleet.store.rollouts import RolloutQueries, _Storage, add_rollout, lock_rollout_devices
from slmops_fleet.store.schema import RolloutRow

log = logging.getLogger(__name__)


class RollbackQueries(RolloutQueries):
    def rollback_rollout(self, rollout_id: str) -> tuple[RolloutRecord, list[DesiredRecord]]:
        """Start the rollback of `rollout_id`: its first wave at once (the desired states to publish),
        the others by the rollout driver. A Conflict when the rollout changed no device."""
        now = utcnow()
        new = new_id("ro")
        with self.session(write=True) as s:
            lock_rollout_devices(s, rollout_id)
            original = s.get(RolloutRow, rollout_id, with_for_update=True)
            if original is None:
                raise NotFound(f"unknown rollout id {rollout_id}")
            storage = _Storage(s, original, now)
            targets = storage.targets()
            earlier = list(s.scalars(select(RolloutRow.id).where(RolloutRow.rollback_of == rollout_id)).all())
            chosen = plan_rollback(
                rollout_id, targets, latest_desired(s, [t.device_id for t in targets]), rolled_back_by=earlier
            )
            if original.state in ACTIVE_ROLLOUT_STATES:
                rules.control(original, "cancel", f"rolled back by {new}", storage, now)
            original_plan = RolloutPlan.from_json(original.plan)
            plan = RolloutPlan(
                waves=original_plan.waves,
                soak_s=original_plan.soak_s,
                wave_timeout_s=original_plan.wave_timeout_s,
                gates=original_plan.gates,
            )
            device_ids = sorted(chosen.returns)
            selections = chosen.selections(rollout_id)
            groups = membership(s, device_ids)  # the original's waves may be chosen by selector
            layout = rules.lay_out(new, device_ids, selections, plan, {d: groups.facts(d) for d in device_ids})
            note = f"rollback of {rollout_id}: {len(device_ids)} devices return to their previous package"
            if chosen.left:
                note += f"; {len(chosen.left)} left as they are"
            rollout = RolloutRow(
                id=new,
                package_id=layout.primary,
                release_id=None,
                target=device_ids,
                state=RolloutState.IN_PROGRESS,
                created_at=now,
                updated_at=now,
                transitions=[rules.transition(RolloutState.IN_PROGRESS, now, f"{note} ({layout.note})")],
                plan=plan.to_json(),
                current_wave=0,
                rollback_of=rollout_id,
            )
            add_rollout(s, rollout, layout, selections, now)
            desired = rules.start_wave(rollout, 0, _Storage(s, rollout, now), now)
            s.flush()
            rules.record(original, now, f"rollback {new} started: {len(device_ids)} devices", event="rollback")
            for device_id, why in sorted(chosen.left.items()):
                log.info("rollback %s of %s leaves %s: %s", new, rollout_id, device_id, why)
            return self._rollout_record(s, rollout), desired
