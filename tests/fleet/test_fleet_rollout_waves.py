"""Rollouts in waves through a real fleet (FleetThread: uvicorn, embedded amqtt, SQLite, the rollout
driver) with simulated devices that speak the real protocol through the real broker and answer each
desired state the way the test tells them to."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest

from slmops_fleet.process import FleetThread
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_testing.fleet_api import enroll, new_token, upload
from slmops_testing.packages import random_bytes
from slmops_testing.simulated_devices import SimDevice


class AnsweringDevice(SimDevice):
    """Answers each new desired state at once with `answer(desired)`: COMMITTED, ROLLED_BACK or None (silent)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answer: Callable[[fleet_pb2.DesiredState], int | None] = lambda _d: fleet_pb2.COMMITTED
        self.handled: list[tuple[int, str]] = []  # (generation, package id) in the order they came

    def _on_connect(self, c: paho.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        super()._on_connect(c, u, f, reason, p)
        if not reason.is_failure:
            c.subscribe(self.topics.desired(self.device_id), qos=1)  # again after every reconnect

    def _on_message(self, c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        super()._on_message(c, u, msg)
        if msg.topic != self.topics.desired(self.device_id):
            return
        d = fleet_pb2.DesiredState.FromString(msg.payload)
        if self.handled and d.generation <= self.handled[-1][0]:
            return
        self.handled.append((d.generation, d.model.package_id))
        state = self.answer(d)
        if state is None:
            return
        rep = fleet_pb2.ReportedState(
            device_id=self.device_id,
            generation=d.generation,
            state=state,  # type: ignore[arg-type]
            target_package_id=d.model.package_id,
            active_package_id=d.model.package_id if state == fleet_pb2.COMMITTED else "",
            reason="" if state == fleet_pb2.COMMITTED else "golden prompts differ",
        )
        c.publish(self.topics.reported(self.device_id), rep.SerializeToString(), qos=1)  # no waiting in a callback


class Fleet:
    def __init__(self, thread: FleetThread, admin: httpx.Client, devices: list[AnsweringDevice]) -> None:
        self.thread = thread
        self.admin = admin
        self.devices = devices
        self.by_id = {d.device_id: d for d in devices}

    def rollout(self, rid: str) -> dict[str, Any]:
        r = self.admin.get(f"/v1/rollouts/{rid}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait_rollout(
        self, rid: str, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 15
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            r = self.rollout(rid)
            if check(r):
                return r
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout} s: {r['state']} {r['waves']} {r['transitions'][-3:]}")
            time.sleep(0.1)

    def create(self, pid: str, **body: Any) -> dict[str, Any]:
        r = self.admin.post("/v1/rollouts", json={"package_id": pid, "target": "all", **body})
        assert r.status_code == 200, r.text
        return dict(r.json())


@pytest.fixture
def fleet5(fleet_settings: Callable[..., Any], fleet_package: Callable[..., Path]) -> Iterator[tuple[Fleet, str, str]]:
    """A fleet with 5 answering devices all COMMITTED on package v1; yields (fleet, v1 id, v2 id)."""
    with FleetThread(fleet_settings(rollout_tick_s=0.1)) as thread:
        admin = httpx.Client(base_url=thread.url, headers={"Authorization": f"Bearer {thread.admin_token}"}, timeout=30)
        v1 = upload(admin, fleet_package({"model.onnx": random_bytes(2000, 11)}, version="1.0.0"))["package_id"]
        v2 = upload(admin, fleet_package({"model.onnx": random_bytes(2000, 12)}, version="2.0.0"))["package_id"]
        devices = []
        try:
            for i in range(5):
                dev = AnsweringDevice.enrolled(enroll(thread, new_token(admin), name=f"sim-{i}").json())
                assert not dev.connect().is_failure
                dev.subscribe(dev.topics.desired(dev.device_id))
                devices.append(dev)
            fleet = Fleet(thread, admin, devices)
            base = fleet.create(v1)
            fleet.wait_rollout(base["id"], lambda r: r["state"] == "succeeded", "v1 everywhere")
            yield fleet, v1, v2
        finally:
            for dev in devices:
                dev.close()
            admin.close()


def _wave_members(r: dict[str, Any]) -> list[set[str]]:
    out: list[set[str]] = [set() for _ in r["waves"]]
    for d in r["devices"]:
        out[d["wave"]].add(d["device_id"])
    return out


def test_waves_proceed_in_order(fleet5: tuple[Fleet, str, str]) -> None:
    fleet, _v1, v2 = fleet5
    r = fleet.create(v2, waves=["1", "60%", "100%"], soak_s=0.3, gates={"max_failures": 0})
    assert [w["size"] for w in r["waves"]] == [1, 2, 2] and r["counts"] == {"PENDING": 1, "WAITING": 4}
    done = fleet.wait_rollout(r["id"], lambda x: x["state"] == "succeeded", "a finished rollout")
    members = _wave_members(done)
    # Every device went to v2 at generation 2, and no wave started before the one before it had passed and soaked.
    for dev in fleet.devices:
        assert dev.handled[-1] == (2, v2)
    events = [(t.get("event"), t.get("wave"), t["at"]) for t in done["transitions"] if t.get("event")]
    assert [(e, w) for e, w, _ in events] == [
        (e, w) for w in (1, 2, 3) for e in ("wave_started", "wave_completed", "wave_passed")
    ]
    waves = done["waves"]
    for prev, nxt in itertools.pairwise(waves):
        assert prev["completed_at"] < nxt["started_at"]
        soaked = _seconds_between(prev["completed_at"], nxt["started_at"])
        assert soaked >= 0.3, soaked
    for w, ids in zip(waves, members, strict=True):
        assert w["counts"] == {"COMMITTED": len(ids)} and w["state"] == "passed"
    assert done["reason"] == "5 committed, 0 rolled back, 0 superseded"


def _seconds_between(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def test_a_failing_canary_rolls_back_and_gets_its_previous_package(fleet5: tuple[Fleet, str, str]) -> None:
    fleet, v1, v2 = fleet5
    for dev in fleet.devices:
        dev.answer = lambda d: fleet_pb2.ROLLED_BACK if d.model.package_id == v2 else fleet_pb2.COMMITTED
    r = fleet.create(v2, waves=["1", "100%"], gates={"max_failures": 0})
    done = fleet.wait_rollout(r["id"], lambda x: x["state"] == "rolled_back", "an aborted rollout")
    (canary,) = _wave_members(done)[0]
    assert "wave 1: 1 devices failed (1 rolled back, 0 timed out), 0 tolerated" in done["reason"]
    assert [w["state"] for w in done["waves"]] == ["failed", "cancelled"]
    # The canary gets its previous desired state back (a new generation naming v1); the rest never saw v2.
    dev = fleet.by_id[canary]
    dev.wait_for(lambda: dev.handled[-1] == (3, v1), 10, "the revert to v1")
    assert dev.handled == [(1, v1), (2, v2), (3, v1)]
    for other in fleet.devices:
        if other is not dev:
            assert other.handled == [(1, v1)]
    states = {d["device_id"]: d["state"] for d in done["devices"]}
    assert states[canary] == "ROLLED_BACK" and sorted(states.values()).count("CANCELLED") == 4
    device = fleet.admin.get(f"/v1/devices/{canary}").json()
    assert device["desired_generation"] == 3 and device["desired_package_id"] == v1


def test_pause_holds_the_next_wave_and_resume_continues(fleet5: tuple[Fleet, str, str]) -> None:
    fleet, _v1, v2 = fleet5
    r = fleet.create(v2, waves=["1", "100%"], soak_s=1.0)
    paused = fleet.admin.post(f"/v1/rollouts/{r['id']}/pause", json={"reason": "watch the canary"})
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    fleet.wait_rollout(r["id"], lambda x: x["waves"][0]["state"] == "soaking", "the canary done")
    time.sleep(1.5)  # past the soak: a running rollout would have started wave 2 by now
    held = fleet.rollout(r["id"])
    assert held["state"] == "paused" and held["waves"][1]["state"] == "pending"
    assert held["counts"] == {"COMMITTED": 1, "WAITING": 4}
    again = fleet.admin.post(f"/v1/rollouts/{r['id']}/pause")
    assert again.status_code == 409 and "is paused" in again.json()["detail"]
    assert fleet.admin.post(f"/v1/rollouts/{r['id']}/resume").json()["state"] == "in_progress"
    done = fleet.wait_rollout(r["id"], lambda x: x["state"] == "succeeded", "the resumed rollout finished")
    assert done["counts"] == {"COMMITTED": 5}
    reasons = [(t["state"], t["reason"]) for t in done["transitions"]]
    assert ("paused", "watch the canary") in reasons and ("in_progress", "resume by the operator") in reasons
    assert fleet.admin.post(f"/v1/rollouts/{r['id']}/explode").status_code == 422
    assert fleet.admin.post("/v1/rollouts/ro-nope/cancel").status_code == 404


def test_cancel_stops_the_rollout(fleet5: tuple[Fleet, str, str]) -> None:
    fleet, v1, v2 = fleet5
    for dev in fleet.devices:
        dev.answer = lambda _d: None  # silent: the canary wave never completes
    r = fleet.create(v2, waves=["1", "100%"])
    (canary,) = _wave_members(r)[0]
    fleet.by_id[canary].wait_for(lambda: fleet.by_id[canary].handled[-1][1] == v2, 10, "the canary's v2")
    cancelled = fleet.admin.post(f"/v1/rollouts/{r['id']}/cancel", json={"reason": "wrong build"})
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["state"] == "cancelled" and body["reason"] == "wrong build"
    assert [w["state"] for w in body["waves"]] == ["cancelled", "cancelled"]
    time.sleep(0.5)  # several driver ticks
    after = fleet.rollout(r["id"])
    assert after["state"] == "cancelled" and after["counts"] == {"CANCELLED": 4, "PENDING": 1}
    for dev in fleet.devices:
        if dev.device_id != canary:
            assert dev.handled == [(1, v1)]
    bad = fleet.admin.post("/v1/rollouts", json={"package_id": v2, "waves": ["3", "1", "100%"]})
    assert bad.status_code == 400 and "must not shrink" in bad.json()["detail"]
    bad = fleet.admin.post("/v1/rollouts", json={"package_id": v2, "gates": {"max_failures": -1}})
    assert bad.status_code == 422
    bad = fleet.admin.post("/v1/rollouts", json={"package_id": v2, "waves": ["1", "x"]})
    assert bad.status_code == 400 and "neither a device count" in bad.json()["detail"]
    assert fleet.rollout("latest")["id"] == r["id"]  # the refused requests created nothing


def test_tags_and_selectors_choose_the_target(fleet5: tuple[Fleet, str, str]) -> None:
    fleet, v1, v2 = fleet5
    chosen = [d.device_id for d in fleet.devices[:2]]
    for device_id in chosen:
        r = fleet.admin.post(f"/v1/devices/{device_id}/tags", json={"add": ["canary", "lab"]})
        assert r.status_code == 200 and r.json()["tags"] == ["canary", "lab"], r.text
    r = fleet.admin.post(f"/v1/devices/{chosen[1]}/tags", json={"remove": ["lab"]})
    assert r.json()["tags"] == ["canary"]
    assert fleet.admin.post("/v1/devices/dev-nope/tags", json={"add": ["x"]}).status_code == 404
    bad = fleet.admin.post(f"/v1/devices/{chosen[0]}/tags", json={"add": ["no spaces"]})
    assert bad.status_code == 400 and "must be 1-64" in bad.json()["detail"]
    listed = {d["id"]: d["tags"] for d in fleet.admin.get("/v1/devices").json()["devices"]}
    assert listed[chosen[0]] == ["canary", "lab"] and listed[fleet.devices[4].device_id] == []

    bad = fleet.admin.post("/v1/rollouts", json={"package_id": v2, "selector": "memory_bytes>=many"})
    assert bad.status_code == 400 and "needs a number" in bad.json()["detail"]
    none = fleet.admin.post("/v1/rollouts", json={"package_id": v2, "selector": "tag=canary,memory_bytes>=1e15"})
    assert none.status_code == 409 and "matches none" in none.json()["detail"]
    r = fleet.create(v2, waves=["1", "100%"], selector="tag=canary,memory_bytes>=2e9,arch=x86_64")
    assert sorted(d["device_id"] for d in r["devices"]) == sorted(chosen)
    fleet.wait_rollout(r["id"], lambda x: x["state"] == "succeeded", "the selected devices updated")
    for dev in fleet.devices:
        assert dev.handled[-1] == ((2, v2) if dev.device_id in chosen else (1, v1))


def test_a_fleet_restart_resumes_the_rollout_where_it_was(
    fleet_settings: Callable[..., Any], fleet_package: Callable[..., Path]
) -> None:
    settings = fleet_settings(rollout_tick_s=0.1)
    devices: list[AnsweringDevice] = []
    try:
        with FleetThread(settings) as first:
            admin = httpx.Client(base_url=first.url, headers={"Authorization": f"Bearer {first.admin_token}"})
            v2 = upload(admin, fleet_package({"model.onnx": random_bytes(2000, 13)}, version="2.0.0"))["package_id"]
            for i in range(2):
                dev = AnsweringDevice.enrolled(enroll(first, new_token(admin), name=f"r-{i}").json())
                assert not dev.connect().is_failure
                devices.append(dev)
            fleet = Fleet(first, admin, devices)
            r = fleet.create(v2, waves=["1", "100%"], soak_s=1.5)
            fleet.wait_rollout(r["id"], lambda x: x["waves"][0]["state"] == "soaking", "the canary committed")
            assert fleet.rollout(r["id"])["waves"][1]["state"] == "pending"
            admin.close()
        # The fleet is down during the soak; the new process picks the rollout up from the database.
        restarted = datetime.now(timezone.utc)
        with FleetThread(settings) as second:
            admin = httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {second.admin_token}"})
            fleet = Fleet(second, admin, devices)
            done = fleet.wait_rollout(r["id"], lambda x: x["state"] == "succeeded", "the rollout finished", 30)
            assert done["counts"] == {"COMMITTED": 2} and [w["state"] for w in done["waves"]] == ["passed", "passed"]
            assert datetime.fromisoformat(done["waves"][1]["started_at"]) > restarted
            for dev in devices:
                assert dev.handled[-1] == (1, v2)
            admin.close()
    finally:
        for dev in devices:
            dev.close()
