"""Fleet rollback: which devices a rollout changed, and the package each one had before it.

A rollback is a rollout of its own (`rollback_of` names the original) that gives each device the
original changed its previous package back, with the original's waves and gates (its selector
dropped: the devices are named). A device counts as changed when the original gave it a desired
state that is still its newest one (nothing later owns it) and the device took it or may still
take it: COMMITTED, still updating, or timed out. Devices that reported ROLLED_BACK already run
their old package; devices the gates' own revert, a later rollout or a cancel before their wave
took away were never changed or are someone else's now.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from slmops_fleet.errors import Conflict
from slmops_fleet.rollouts.rules import Desired, Target
from slmops_fleet.rollouts.states import TERMINAL_TARGET_STATES, TargetState
from slmops_fleet.rollouts.variants import Selection
from slmops_protos.states import UpdateState

# A target in one of these states may run the rollout's package (or be on its way to it).
_MAY_HAVE_CHANGED = frozenset({UpdateState.COMMITTED.value, TargetState.TIMED_OUT.value})


@dataclass(frozen=True)
class RollbackPlan:
    """The devices to return (device id -> the package it had before) and why the others are left."""

    returns: dict[str, str]
    left: dict[str, str]

    def selections(self, rollout_id: str) -> dict[str, Selection]:
        """The rollback's "variant" of each device: its previous package."""
        return {
            d: Selection(pid, f"the package it had before rollout {rollout_id}", []) for d, pid in self.returns.items()
        }


def plan_rollback(
    rollout_id: str, targets: Sequence[Target], latest: Mapping[str, Desired], rolled_back_by: Sequence[str]
) -> RollbackPlan:
    """What a rollback of `rollout_id` gives back (`latest`: each target device's newest desired state).
    A Conflict, saying why, when it would return no device."""
    returns: dict[str, str] = {}
    left: dict[str, str] = {}
    for t in targets:
        if t.generation == 0:
            left[t.device_id] = f"never given the rollout's package ({t.state})"
            continue
        if t.state in TERMINAL_TARGET_STATES and t.state not in _MAY_HAVE_CHANGED:
            left[t.device_id] = f"not changed by the rollout ({t.state})"
            continue
        cur = latest.get(t.device_id)
        if cur is None or cur.rollout_id != rollout_id or cur.generation != t.generation:
            owner = f"rollout {cur.rollout_id}" if cur is not None and cur.rollout_id else "a newer desired state"
            left[t.device_id] = f"{owner} has changed it since"
            continue
        if not t.previous_package_id:
            left[t.device_id] = "it had no package from the fleet before the rollout"
            continue
        if t.previous_package_id == (t.package_id or ""):
            left[t.device_id] = "the rollout gave it the package it already had"
            continue
        returns[t.device_id] = t.previous_package_id
    if not returns:
        if rolled_back_by:
            raise Conflict(f"rollout {rollout_id} was already rolled back by {', '.join(rolled_back_by)}")
        why = "; ".join(f"{d}: {r}" for d, r in sorted(left.items())[:3]) or "it has no target devices"
        more = f" (and {len(left) - 3} more)" if len(left) > 3 else ""
        raise Conflict(f"rollout {rollout_id} changed no device that a rollback could return: {why}{more}")
    return RollbackPlan(returns, left)
