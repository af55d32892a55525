"""Fleet rollback at the store level: which devices a rollback returns, to what, with which plan, the
link both ways, and the refusals (nothing changed, already rolled back, unknown rollout)."""

from __future__ import annotations

import pytest
from test_fleet_rollout_rules import _finish, _report, _setup

from slmops_fleet.errors import Conflict, NotFound
from slmops_fleet.rollouts.gates import Gates
from slmops_fleet.rollouts.plan import RolloutPlan
from slmops_fleet.store import Store


def test_a_rollback_returns_every_changed_device_with_the_same_plan(store: Store) -> None:
    ids, old, new = _setup(store, 4)
    r0, first = store.create_rollout(old, "all")
    _finish(store, first)
    plan = RolloutPlan(waves=["1", "100%"], soak_s=0, wave_timeout_s=300, gates=Gates(max_failures=1))
    r1, canary = store.create_rollout(new, "all", plan)
    _finish(store, canary)
    second = store.advance_rollout(r1.id)
    assert len(second) == 3
    # two commit, one is still fetching, one failed (it runs the old package already)
    _report(store, second[0].device_id, second[0].generation, "COMMITTED", new)
    _report(store, second[1].device_id, second[1].generation, "FETCHING", new)
    _report(store, second[2].device_id, second[2].generation, "ROLLED_BACK", new, "smoke test failed")
    assert store.get_rollout(r1.id).state == "in_progress"

    back, desired = store.rollback_rollout(r1.id)
    assert back.rollback_of == r1.id and back.plan["waves"] == ["1", "100%"]
    assert back.plan["gates"]["max_failures"] == 1 and back.plan["wave_timeout_s"] == 300
    returned = {canary[0].device_id, second[0].device_id, second[1].device_id}
    assert {d.device_id for d in back.devices} == returned
    assert {d.package_id for d in back.devices} == {old}
    # the first wave started at once, a generation past the original's
    assert len(desired) == 1 and desired[0].package_id == old and desired[0].rollout_id == back.id
    gen = {d.device_id: d.generation for d in store.get_rollout(r1.id).devices}
    assert desired[0].generation == gen[desired[0].device_id] + 1

    original = store.get_rollout(r1.id)
    assert original.state == "cancelled" and original.rolled_back_by == [back.id]
    states = {d.device_id: d.state for d in original.devices}
    assert states[second[1].device_id] == "SUPERSEDED" and states[second[0].device_id] == "COMMITTED"
    assert any(t.get("event") == "rollback" for t in original.transitions)
    assert [r.rollback_of for r in store.list_rollouts()] == [None, None, r1.id]

    # the rest follow through the driver; the rollback ends like any rollout
    _finish(store, desired)
    rest = store.advance_rollout(back.id)
    assert {d.device_id for d in rest} == returned - {desired[0].device_id}
    _finish(store, rest)
    store.advance_rollout(back.id)
    assert store.get_rollout(back.id).state == "succeeded"

    # a second rollback of the same rollout is refused, and says by whom it was rolled back
    with pytest.raises(Conflict, match=f"already rolled back by {back.id}"):
        store.rollback_rollout(r1.id)
    assert r0.rollback_of is None and ids


def test_a_rollout_that_changed_nothing_cannot_be_rolled_back(store: Store) -> None:
    _ids, old, new = _setup(store, 2)
    r0, first = store.create_rollout(old, "all")
    _finish(store, first)
    # the first rollout gave the devices their first package: there is nothing to return to
    with pytest.raises(Conflict, match=r"changed no device.*no package from the fleet before"):
        store.rollback_rollout(r0.id)
    r1, desired = store.create_rollout(new, "all")
    _finish(store, desired, "ROLLED_BACK")
    refused = rf"rollout {r1.id} changed no device .*not changed by the rollout \(ROLLED_BACK\)"
    with pytest.raises(Conflict, match=refused):
        store.rollback_rollout(r1.id)
    assert store.get_rollout(r1.id).rolled_back_by == []
    with pytest.raises(NotFound):
        store.rollback_rollout("ro_nope")


def test_devices_a_later_rollout_owns_are_left_alone(store: Store) -> None:
    ids, old, new = _setup(store, 2)
    _r0, first = store.create_rollout(old, "all")
    _finish(store, first)
    r1, second = store.create_rollout(new, "all")
    _finish(store, second)
    _r2, third = store.create_rollout(old, [ids[0]])  # ids[0] moves on with a later rollout
    _finish(store, third)
    back, desired = store.rollback_rollout(r1.id)
    assert [d.device_id for d in back.devices] == [ids[1]] and [d.device_id for d in desired] == [ids[1]]
    # the rollout's gate revert already returned its devices: nothing left to roll back
    r3, fourth = store.create_rollout(new, "all", RolloutPlan(waves=["100%"], gates=Gates(max_failures=0)))
    _finish(store, fourth[:1], "ROLLED_BACK")
    assert len(store.advance_rollout(r3.id)) == 2  # the gate fails: both devices are reverted
    assert store.get_rollout(r3.id).state == "rolled_back"
    with pytest.raises(Conflict, match="changed no device"):
        store.rollback_rollout(r3.id)
