"""Named groups, continuous targeting and canary waves by tag through a real fleet (FleetThread:
uvicorn, the embedded amqtt broker or Mosquitto, SQLite, the rollout driver) with simulated devices
that speak the real protocol over real MQTT connections."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_fleet_rollout_waves import AnsweringDevice, Fleet

from slmops_fleet.process import FleetThread
from slmops_testing.fleet_api import enroll, new_token, upload
from slmops_testing.packages import random_bytes


class GroupFleet(Fleet):
    def enroll(self, name: str, *tags: str) -> AnsweringDevice:
        dev = AnsweringDevice.enrolled(enroll(self.thread, new_token(self.admin), name=name).json())
        assert not dev.connect().is_failure
        dev.subscribe(dev.topics.desired(dev.device_id))
        self.devices.append(dev)
        self.by_id[dev.device_id] = dev
        if tags:
            self.tag(dev, *tags)
        return dev

    def tag(self, dev: AnsweringDevice, *tags: str) -> None:
        r = self.admin.post(f"/v1/devices/{dev.device_id}/tags", json={"add": list(tags)})
        assert r.status_code == 200, r.text

    def post(self, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
        r = self.admin.post(path, json=body)
        assert r.status_code == status, r.text
        return dict(r.json())


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def gfleet(
    request: pytest.FixtureRequest, fleet_settings: Callable[..., Any], fleet_package: Callable[..., Path]
) -> Iterator[tuple[GroupFleet, str]]:
    """A fleet (on the embedded broker, and on Mosquitto) with no device yet and package v2 uploaded;
    yields (fleet, v2 id)."""
    broker = {"broker_url": request.getfixturevalue("mosquitto_broker").url} if request.param == "mosquitto" else {}
    with FleetThread(fleet_settings(rollout_tick_s=0.1, **broker)) as thread:
        admin = httpx.Client(base_url=thread.url, headers={"Authorization": f"Bearer {thread.admin_token}"}, timeout=30)
        v2 = upload(admin, fleet_package({"model.onnx": random_bytes(2000, 12)}, version="2.0.0"))["package_id"]
        fleet = GroupFleet(thread, admin, [])
        try:
            yield fleet, v2
        finally:
            for dev in fleet.devices:
                dev.close()
            admin.close()


def _got(dev: AnsweringDevice, package_id: str) -> None:
    dev.wait_for(lambda: bool(dev.handled) and dev.handled[-1][1] == package_id, 15, f"{package_id[:12]} on the device")


def test_a_device_enrolled_after_the_assignment_converges(gfleet: tuple[GroupFleet, str]) -> None:
    fleet, v2 = gfleet
    first = [fleet.enroll(f"kiosk-{i}") for i in range(2)]
    other = fleet.enroll("office-1")
    group = fleet.post("/v1/groups", {"name": "kiosks", "selector": "name IN (kiosk-0, kiosk-1, kiosk-late)"})
    assert group["kind"] == "dynamic" and group["members"] == sorted(d.device_id for d in first)
    out = fleet.post("/v1/groups/kiosks/assign", {"package_id": v2, "waves": ["1", "100%"]})
    assert sorted(d["device_id"] for d in out["rollout"]["devices"]) == out["group"]["members"]
    fleet.wait_rollout(out["rollout"]["id"], lambda r: r["state"] == "succeeded", "the group's rollout")
    for dev in first:
        _got(dev, v2)

    late = fleet.enroll("kiosk-late")  # enrolled after the assignment: a follow-up rollout gives it v2
    _got(late, v2)
    follow = [r for r in fleet.admin.get("/v1/rollouts").json()["rollouts"] if r["id"] != out["rollout"]["id"]]
    assert len(follow) == 1 and [d["device_id"] for d in follow[0]["devices"]] == [late.device_id]
    fleet.wait_rollout(follow[0]["id"], lambda r: r["state"] == "succeeded", "the follow-up rollout")
    shown = fleet.admin.get("/v1/groups/kiosks").json()
    assert late.device_id in shown["members"] and late.device_id in shown["assignment"]["following"]
    assert other.handled == []  # never in the group: never given anything
    assert [g for _, g in first[0].handled] == [v2]  # the first members were not given it twice


def test_a_device_tagged_into_the_group_later_converges(gfleet: tuple[GroupFleet, str]) -> None:
    fleet, v2 = gfleet
    a = fleet.enroll("edge-a", "kiosk")
    b = fleet.enroll("edge-b")
    fleet.post("/v1/groups", {"name": "kiosks", "selector": "tag=kiosk AND NOT tag=lab"})
    out = fleet.post("/v1/groups/kiosks/assign", {"package_id": v2})
    fleet.wait_rollout(out["rollout"]["id"], lambda r: r["state"] == "succeeded", "the group's rollout")
    _got(a, v2)
    assert b.handled == []
    fleet.tag(b, "kiosk")  # b now matches: it gets the group's package
    _got(b, v2)
    # A device that stops matching keeps what it has (nothing new is published to it).
    r = fleet.admin.post(f"/v1/devices/{a.device_id}/tags", json={"remove": ["kiosk"]})
    assert r.status_code == 200 and fleet.admin.get("/v1/groups/kiosks").json()["members"] == [b.device_id]
    device = fleet.admin.get(f"/v1/devices/{a.device_id}").json()
    assert device["desired_package_id"] == v2 and len(a.handled) == 1


def test_canary_wave_by_tag_completes_before_the_rest(gfleet: tuple[GroupFleet, str]) -> None:
    fleet, v2 = gfleet
    canaries = {fleet.enroll(f"c-{i}", "canary").device_id for i in range(2)}
    rest = {fleet.enroll(f"r-{i}").device_id for i in range(4)}
    r = fleet.post(
        "/v1/rollouts",
        {"package_id": v2, "target": "all", "waves": ["tag=canary", "50%", "100%"], "soak_s": 0.2},
    )
    assert [w["size"] for w in r["waves"]] == [2, 2, 2]
    done = fleet.wait_rollout(r["id"], lambda x: x["state"] == "succeeded", "the rollout finished")
    members: list[set[str]] = [set() for _ in done["waves"]]
    for d in done["devices"]:
        members[d["wave"]].add(d["device_id"])
    assert members[0] == canaries and members[1] | members[2] == rest
    waves = done["waves"]
    assert waves[0]["completed_at"] < waves[1]["started_at"] and waves[1]["completed_at"] < waves[2]["started_at"]
    assert done["plan"]["waves"] == ["tag=canary", "50%", "100%"]


def test_priority_decides_between_two_assigned_groups(gfleet: tuple[GroupFleet, str], fleet_package: Any) -> None:
    fleet, v2 = gfleet
    v3 = upload(fleet.admin, fleet_package({"model.onnx": random_bytes(2000, 13)}, version="3.0.0"))["package_id"]
    dev = fleet.enroll("both", "kiosk", "beta")
    fleet.post("/v1/groups", {"name": "kiosks", "selector": "tag=kiosk"})
    fleet.post("/v1/groups", {"name": "beta", "devices": [dev.device_id], "priority": 10})
    fleet.post("/v1/groups/beta/assign", {"package_id": v3})
    _got(dev, v3)
    out = fleet.post("/v1/groups/kiosks/assign", {"package_id": v2})
    assert out["rollout"] is None and out["group"]["assignment"]["following"] == []  # beta outranks kiosks
    assert fleet.admin.get("/v1/groups").json()["groups"][0]["assignment"]["following"] == [dev.device_id]
    other = fleet.enroll("other")
    picked = fleet.post("/v1/rollouts", {"package_id": v2, "selector": "group=beta OR name=nobody"})
    assert [d["device_id"] for d in picked["devices"]] == [dev.device_id] and other.handled == []


def test_bad_groups_and_selectors_are_refused_with_the_column(gfleet: tuple[GroupFleet, str]) -> None:
    fleet, v2 = gfleet
    dev = fleet.enroll("edge-1", "canary")
    bad = fleet.post("/v1/rollouts", {"package_id": v2, "selector": "tag=canary OR"}, status=400)
    assert "column 14: expected a term" in bad["detail"]
    bad = fleet.post("/v1/rollouts", {"package_id": v2, "selector": "tag=canary AND group=nope"}, status=400)
    assert "column 16: unknown group 'nope'" in bad["detail"]
    bad = fleet.post("/v1/rollouts", {"package_id": v2, "waves": ["tag=canary AND (arch=x", "100%"]}, status=400)
    assert "column 23: expected ')'" in bad["detail"]
    bad = fleet.post("/v1/groups", {"name": "g", "selector": "arch IN x86_64"}, status=400)
    assert "column 9: expected '(' after arch IN" in bad["detail"]
    bad = fleet.post("/v1/groups", {"name": "g", "selector": "group=other"}, status=400)
    assert "column 1: a group's selector cannot refer to groups" in bad["detail"]
    bad = fleet.post("/v1/groups", {"name": "g", "selector": "tag=a", "devices": [dev.device_id]}, status=400)
    assert "exactly one" in bad["detail"]
    bad = fleet.post("/v1/groups", {"name": "g", "devices": ["dev-nope"]}, status=400)
    assert "unknown device ids: dev-nope" in bad["detail"]
    fleet.post("/v1/groups", {"name": "g", "selector": "tag=canary"})
    for gates, why in [({"nope": 1}, "unexpected keyword argument 'nope'"), ({"max_failures": -1}, "0 or more")]:
        bad = fleet.post("/v1/groups/g/assign", {"package_id": v2, "gates": gates}, status=400)
        assert why in bad["detail"]
    bad = fleet.post("/v1/groups/g/assign", {"package_id": v2, "waves": ["10%", "tag=canary"]}, status=400)
    assert "a selector wave must come before" in bad["detail"]
    assert fleet.admin.get("/v1/groups/g").json()["assignment"] is None
    assert fleet.admin.delete("/v1/groups/g").status_code == 200
    missing = fleet.post("/v1/groups/nope/assign", {"package_id": v2}, status=404)
    assert "unknown group 'nope'" in missing["detail"]
    assert fleet.admin.get("/v1/groups").json()["groups"] == []  # nothing was kept
    assert dev.handled == []
