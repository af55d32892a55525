"""Blob delivery through a real fleet and real MQTT: a paced broadcast shared by a wave, a device
that joins late and repairs its gaps by unicast, and a second version that moves only its changed blob."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleetkit import SimDevice, package_blobs, random_bytes

from slmops_protos.fleet.v1 import fleet_pb2

CHUNK = 256 * 1024


def _stats(admin: httpx.Client) -> dict[str, dict[str, int]]:
    return {b["sha256"]: b for b in admin.get("/v1/stats").json()["blobs"]}


def _upload(admin: httpx.Client, folder: Path) -> str:
    body = admin.post("/v1/packages", content=(folder / "manifest.signed.pb").read_bytes()).json()
    for sha in body["missing_blobs"]:
        assert admin.put(f"/v1/blobs/{sha}", content=(folder / "blobs" / sha).read_bytes()).status_code == 200
    return str(body["package_id"])


@pytest.fixture
def paced_fleet(fleet_settings: Callable[..., Any]) -> Any:
    from slmops_fleet.server import FleetThread

    # 1.5 MiB/s: a 3 MiB blob takes about 2 s, long enough for a device to join it halfway.
    with FleetThread(fleet_settings(broadcast_rate=1536 * 1024, coalesce_window_s=0.3, max_inflight=4)) as running:
        yield running


def test_broadcast_late_joiner_repair_and_delta(paced_fleet: Any, fleet_package: Callable[..., Path]) -> None:
    fleet = paced_fleet
    files_v1 = {
        "model.onnx.data": random_bytes(3 * 1024 * 1024, 10),  # 12 chunks
        "model.onnx": random_bytes(600 * 1024, 11),  # 3 chunks
        "genai_config.json": b'{"search": {"max_length": 64}}',  # 1 chunk
    }
    v1 = fleet_package(files_v1, version="1.0.0")
    sha = {name: hashlib.sha256(data).hexdigest() for name, data in files_v1.items()}
    big, mid, cfg = sha["model.onnx.data"], sha["model.onnx"], sha["genai_config.json"]
    assert set(package_blobs(v1)) == {big, mid, cfg}

    admin = httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}, timeout=30)
    devices: list[SimDevice] = []
    try:
        pid1 = _upload(admin, v1)
        creds = []
        for name in ("early", "late"):
            token = admin.post("/v1/tokens", json={}).json()["token"]
            body = {"token": token, "public_key": "ef" * 32, "name": name}
            creds.append(httpx.post(fleet.url + "/v1/enroll", json=body).json())
        assert admin.post("/v1/rollouts", json={"package_id": pid1, "target": "all"}).status_code == 200
        a, b = (SimDevice.enrolled(c) for c in creds)
        devices += [a, b]
        for d in (a, b):
            assert not d.connect().is_failure
            d.subscribe_device_topics()
            desired = d.desired()
            assert desired.model.package_id == pid1 and desired.chunk_size == CHUNK

        # Device A asks for every blob; B is subscribed to the chunks too but does not want them yet.
        for s in (big, mid, cfg):
            a.request_blob(s)
        a.wait_for(lambda: len(a.blob(big).chunks) >= 4, 30, "4 chunks of the big blob")
        assert len(a.blob(big).chunks) < 12, "the broadcast finished before the late device could join"
        b.request_blob(big)  # joins the running broadcast
        assert a.wait_blob(big) == files_v1["model.onnx.data"]
        assert a.wait_blob(mid) == files_v1["model.onnx"]
        assert a.wait_blob(cfg) == files_v1["genai_config.json"]
        assert all(v == "broadcast" for v in a.blob(big).via.values())

        # B kept what came after it joined; it asks for exactly the chunks it lacks, and gets them by unicast.
        time.sleep(0.5)
        missed = b.blob(big).missing()
        assert missed and len(missed) < 12, missed
        assert missed == list(range(len(missed))), "B lacks the chunks sent before it joined"
        b.request_blob(big, missing=missed)
        assert b.wait_blob(big) == files_v1["model.onnx.data"]
        via = b.blob(big).via
        assert sorted(i for i, v in via.items() if v == "repair") == missed
        assert a.messages_on(a.topics.device_blobs(b.device_id)) == []
        assert a.blob(big).bad == 0 and b.blob(big).bad == 0

        fleet.server.distributor.flush_stats()
        deadline = time.monotonic() + 10
        while not fleet.server.distributor.idle() and time.monotonic() < deadline:
            time.sleep(0.1)
        st = _stats(admin)
        assert st[big]["broadcasts"] == 1 and st[big]["broadcast_chunks"] == 12
        assert st[big]["broadcast_bytes"] == len(files_v1["model.onnx.data"])
        assert st[big]["whole_requests"] == 2 and st[big]["partial_requests"] == 1
        assert st[big]["repair_chunks"] == len(missed) and st[big]["repair_bytes"] == len(missed) * CHUNK
        assert st[mid]["broadcast_chunks"] == 3 and st[mid]["repair_chunks"] == 0

        # A repair may use another chunk size (the device's bitmap): 512 KiB chunks, 6 of them.
        a.blobs.pop(big)
        a.request_blob(big, missing=[0, 5], chunk_size=2 * CHUNK)
        a.wait_for(lambda: len(a.blob(big).chunks) == 2, 20, "two 512 KiB repair chunks")
        asm = a.blob(big)
        assert asm.chunk_size == 2 * CHUNK and asm.count == 6
        assert asm.chunks[5] == files_v1["model.onnx.data"][5 * 2 * CHUNK :]

        # Version 2 changes one small file: only that blob moves, in one broadcast shared by both devices.
        before = _stats(admin)
        files_v2 = {**files_v1, "genai_config.json": b'{"search": {"max_length": 128}}'}
        v2 = fleet_package(files_v2, version="2.0.0")
        pid2 = _upload(admin, v2)
        new_cfg = hashlib.sha256(files_v2["genai_config.json"]).hexdigest()
        assert admin.post("/v1/rollouts", json={"package_id": pid2, "target": "all"}).status_code == 200
        for d in (a, b):
            assert d.desired(generation=2).model.package_id == pid2
            d.request_blob(new_cfg)  # the only blob either device lacks
        for d in (a, b):
            assert d.wait_blob(new_cfg) == files_v2["genai_config.json"]
        # A blob that is not in a device's desired package is refused.
        a.request_blob(cfg)
        time.sleep(1.0)
        after = _stats(admin)
        assert after[new_cfg]["broadcasts"] == 1 and after[new_cfg]["whole_requests"] == 2
        for s in (big, mid, cfg):
            assert after[s] == before[s], f"blob {s[:12]} moved again"
        totals = admin.get("/v1/stats").json()["totals"]
        assert totals["broadcast_bytes"] == sum(len(x) for x in files_v1.values()) + len(files_v2["genai_config.json"])
    finally:
        for d in devices:
            d.close()
        admin.close()


def test_requests_for_blobs_outside_the_desired_package_move_nothing(fleet: Any) -> None:
    """A request from an id that is no enrolled device (only the fleet's own user can publish there)
    is refused before anything is read or sent."""
    registry = fleet.server.registry
    probe = SimDevice(
        "127.0.0.1",
        fleet.info.mqtt.port,
        username=registry.fleet_username,
        password=registry.fleet_password,
        client_id="probe",
    )
    try:
        assert not probe.connect().is_failure
        probe.device_id = "dev-ghost"
        probe.request_blob("a" * 64)
        deadline = time.monotonic() + 10
        while fleet.server.ingest.counters.blob_requests < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fleet.server.ingest.counters.blob_requests == 1
        assert fleet.server.ingest.wait_idle(10)
        assert fleet.server.distributor.active() == []
        fleet.server.distributor.flush_stats()
        assert fleet.server.store.blob_stats() == []
    finally:
        probe.close()


@pytest.mark.mosquitto
def test_broadcast_and_repair_through_mosquitto(
    mosquitto_broker: Any, fleet_settings: Callable[..., Any], fleet_package: Callable[..., Path]
) -> None:
    from slmops_fleet.server import FleetThread

    data = random_bytes(5 * CHUNK // 2, 20)  # 3 chunks, the last one short
    folder = fleet_package({"weights.bin": data})
    sha = hashlib.sha256(data).hexdigest()
    with FleetThread(fleet_settings(broker_url=mosquitto_broker.url)) as fleet:
        admin = httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}, timeout=30)
        dev: SimDevice | None = None
        try:
            pid = _upload(admin, folder)
            token = admin.post("/v1/tokens", json={}).json()["token"]
            creds = httpx.post(fleet.url + "/v1/enroll", json={"token": token, "public_key": "ef" * 32}).json()
            assert admin.post("/v1/rollouts", json={"package_id": pid}).status_code == 200
            dev = SimDevice.enrolled(creds)
            assert not dev.connect().is_failure
            dev.subscribe_device_topics()
            assert dev.desired().model.package_id == pid
            dev.request_blob(sha)
            assert dev.wait_blob(sha) == data
            assert set(dev.blob(sha).via.values()) == {"broadcast"}
            dev.blobs.pop(sha)
            dev.request_blob(sha, missing=[2])
            dev.wait_for(lambda: 2 in dev.blob(sha).chunks, 20, "repair chunk 2")
            assert dev.blob(sha).via == {2: "repair"} and dev.blob(sha).chunks[2] == data[2 * CHUNK :]
            dev.report(fleet_pb2.COMMITTED, 1, target_package_id=pid, active_package_id=pid, active_version="1.0.0")
            deadline = time.monotonic() + 10
            while admin.get("/v1/rollouts/latest").json()["state"] != "succeeded" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert admin.get("/v1/rollouts/latest").json()["state"] == "succeeded"
        finally:
            if dev is not None:
                dev.close()
            admin.close()
