"""Fleet rollback at the store level: which devices a rollback returns, to what, with which plan, the
link both ways, and the refusals (nothing changed, already rolled back, unknown rollout)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_fleet_rollout_rules import _finish, _report, _setup

from slmops_fleet.errors import Conflict, NotFound
from slmops_fleet.rollouts.gates import Gates
from slmops_fleet.rollouts.plan import RolloutPlan
from slmops_fleet.store import Store
from slmops_testing.fleet_api import enroll, new_token, upload


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


def test_the_api_refuses_a_rollback_clearly(
    fleet: Any, admin: httpx.Client, fleet_package: Callable[..., Path]
) -> None:
    """Through the HTTP API of a real fleet: an unknown rollout, a read-only token, and a rollout that
    changed nothing each get their status and a one-line reason; nothing is created."""
    pid = upload(admin, fleet_package({"model.onnx": b"x" * 1000, "genai_config.json": b"{}"}))["package_id"]
    enroll(fleet, new_token(admin), name="d0").raise_for_status()
    rollout = admin.post("/v1/rollouts", json={"package_id": pid, "target": "all"}).json()
    r = admin.post("/v1/rollouts/ro-nope/rollback")
    assert r.status_code == 404 and r.json()["detail"] == "unknown rollout id ro-nope"
    reader = admin.post("/v1/admin-tokens", json={"name": "ro", "role": "read-only"}).json()["token"]
    r = httpx.post(f"{fleet.url}/v1/rollouts/{rollout['id']}/rollback", headers={"Authorization": f"Bearer {reader}"})
    assert r.status_code == 403 and "needs operator" in r.json()["detail"]
    r = admin.post(f"/v1/rollouts/{rollout['id']}/rollback")
    assert r.status_code == 409, r.text
    assert r.json()["detail"].startswith(f"rollout {rollout['id']} changed no device that a rollback could return")
    assert [x["id"] for x in admin.get("/v1/rollouts").json()["rollouts"]] == [rollout["id"]]
    assert admin.get(f"/v1/rollouts/{rollout['id']}").json()["state"] == "in_progress"  # not cancelled either
