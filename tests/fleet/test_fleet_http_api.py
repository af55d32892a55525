"""The HTTP API of a real fleet (FleetThread: uvicorn, embedded amqtt, SQLite) over real sockets."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from slmops_builder.keys import generate_key
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.manifests import package_id
from slmops_protos.package.v1 import manifest_pb2
from slmops_testing.fleet_api import PUB, device_count, enroll, new_token, upload
from slmops_testing.packages import make_package, package_blobs, random_bytes
from slmops_testing.simulated_devices import SimDevice

# --- enrollment -------------------------------------------------------------------------------------------


def test_enroll_returns_credentials_and_keys(fleet: Any, admin: httpx.Client, signing_key: tuple[Path, Path]) -> None:
    r = enroll(fleet, new_token(admin))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["device_id"].startswith("dev-")
    assert body["fleet_url"] == fleet.url
    mqtt = body["mqtt"]
    assert mqtt["host"] == "127.0.0.1" and mqtt["port"] == fleet.info.mqtt.port
    assert mqtt["username"] == body["device_id"] and len(mqtt["password"]) >= 32
    assert mqtt["topic_root"] == "slmops/v1" and mqtt["tls"] is False
    assert body["signing_keys"] == [signing_key[1].read_text().strip()]
    (device,) = admin.get("/v1/devices").json()["devices"]
    assert device["id"] == body["device_id"] and device["name"] == "edge-1"
    assert device["inventory"]["cpu_features"] == ["avx2"] and device["public_key"] == PUB
    # The credentials work on the broker right away.
    dev = SimDevice.enrolled(body)
    try:
        assert not dev.connect().is_failure
    finally:
        dev.close()


def test_bad_tokens_are_refused_and_create_nothing(fleet: Any, admin: httpx.Client) -> None:
    token = new_token(admin)
    assert enroll(fleet, token).status_code == 200
    r = enroll(fleet, token)
    assert r.status_code == 401 and r.json()["detail"] == "enrollment token is already used"
    r = enroll(fleet, "not-a-token")
    assert r.status_code == 401 and r.json()["detail"] == "enrollment token is unknown"
    short = new_token(admin, ttl_s=1)
    time.sleep(1.2)
    r = enroll(fleet, short)
    assert r.status_code == 401 and r.json()["detail"] == "enrollment token is expired"
    assert device_count(admin) == 1


def test_malformed_enrollment_is_422_and_keeps_the_token(fleet: Any, admin: httpx.Client) -> None:
    token = new_token(admin)
    for body in (
        {"token": token, "public_key": "zz"},
        {"token": token, "public_key": "ab" * 31},
        {"public_key": PUB},
        {"token": token, "public_key": PUB, "inventory": {"cpu_count": -1}},
        {"token": token, "public_key": PUB, "surprise": 1},
    ):
        r = httpx.post(fleet.url + "/v1/enroll", json=body)
        assert r.status_code == 422, (body, r.text)
    assert device_count(admin) == 0
    assert enroll(fleet, token).status_code == 200  # the malformed requests did not use it up


def test_one_token_enrolls_one_device_under_concurrency(fleet: Any, admin: httpx.Client) -> None:
    token = new_token(admin)
    codes: list[int] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        codes.append(enroll(fleet, token, name=f"racer-{i}").status_code)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes) == [200] + [401] * 7
    assert device_count(admin) == 1


def test_admin_token_is_required(fleet: Any) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {fleet.admin_token}"}):
        for method, path in (("POST", "/v1/tokens"), ("GET", "/v1/devices"), ("GET", "/v1/stats")):
            r = httpx.request(method, fleet.url + path, headers=headers, json={})
            assert r.status_code == 401, (headers, path, r.text)
            assert "admin token" in r.json()["detail"]
    r = httpx.post(
        fleet.url + "/v1/tokens", headers={"Authorization": f"Bearer {fleet.admin_token}"}, json={"ttl_s": 0}
    )
    assert r.status_code == 422
    r = httpx.get(fleet.url + "/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "database": True, "mqtt": True, "version": "0.1.0"}


# --- packages and blobs -----------------------------------------------------------------------------------


def test_package_upload_checks_signature_and_blob_hashes(
    fleet: Any, admin: httpx.Client, fleet_package: Callable[..., Path], tmp_path: Path
) -> None:
    files = {"model.onnx": random_bytes(300_000, 1), "genai_config.json": b'{"model": {}}', "tok/tokenizer.json": b"{}"}
    folder = fleet_package(files)
    signed_bytes = (folder / "manifest.signed.pb").read_bytes()
    signed = manifest_pb2.SignedManifest.FromString(signed_bytes)

    # Signed by a key the fleet does not trust.
    other_key = tmp_path / "other.key"
    generate_key(other_key)
    stranger = make_package(files, tmp_path / "stranger" / "package", other_key)
    r = admin.post("/v1/packages", content=(stranger / "manifest.signed.pb").read_bytes())
    assert r.status_code == 400 and "untrusted keys" in r.json()["detail"]
    # A bad signature by the trusted key: the manifest was changed after signing.
    tampered = manifest_pb2.SignedManifest()
    tampered.CopyFrom(signed)
    m = manifest_pb2.Manifest.FromString(signed.manifest)
    m.version = "6.6.6"
    tampered.manifest = m.SerializeToString(deterministic=True)
    r = admin.post("/v1/packages", content=tampered.SerializeToString())
    assert r.status_code == 400 and "bad signature" in r.json()["detail"]
    for garbage, why in ((b"\xff\xfe not protobuf", "does not parse"), (b"", "empty body")):
        r = admin.post("/v1/packages", content=garbage)
        assert r.status_code == 400 and why in r.json()["detail"], r.text
    assert admin.get("/v1/packages").json()["packages"] == []

    # The real one.
    body = upload(admin, folder, blobs=False)
    pid = package_id(signed.manifest)
    assert body["package_id"] == pid and body["created"] is True and body["version"] == "1.0.0"
    blobs = package_blobs(folder)
    assert sorted(body["missing_blobs"]) == sorted(blobs)
    assert upload(admin, folder, blobs=False)["created"] is False

    big = next(sha for sha, size in blobs.items() if size == 300_000)
    data = (folder / "blobs" / big).read_bytes()
    bad = bytearray(data)
    bad[1000] ^= 0xFF
    r = admin.put(f"/v1/blobs/{big}", content=bytes(bad))
    assert r.status_code == 400 and "content hash mismatch" in r.json()["detail"]
    r = admin.put(f"/v1/blobs/{big}", content=data + b"x")
    assert r.status_code == 400 and "bytes per its manifest" in r.json()["detail"]
    r = admin.put(f"/v1/blobs/{'0' * 64}", content=b"x")
    assert r.status_code == 404 and "no uploaded package lists" in r.json()["detail"]
    r = admin.put("/v1/blobs/not-a-hash", content=b"x")
    assert r.status_code == 400
    assert big in admin.get(f"/v1/packages/{pid}").json()["missing_blobs"]
    assert not (fleet.settings.blobs_dir / big).exists()
    assert list(fleet.settings.blobs_dir.joinpath(".incoming").iterdir()) == []

    for sha in blobs:
        r = admin.put(f"/v1/blobs/{sha}", content=(folder / "blobs" / sha).read_bytes())
        assert r.status_code == 200 and r.json()["stored"] is True, r.text
    assert admin.put(f"/v1/blobs/{big}", content=data).json()["already_present"] is True
    pkg = admin.get(f"/v1/packages/{pid[:12]}").json()
    assert pkg["complete"] is True and pkg["missing_blobs"] == [] and pkg["file_count"] == 3
    assert (fleet.settings.blobs_dir / big).read_bytes() == data


# --- rollouts and what devices report ---------------------------------------------------------------------


def test_rollout_publishes_retained_desired_state_and_tracks_reports(
    fleet: Any, admin: httpx.Client, fleet_package: Callable[..., Path]
) -> None:
    folder = fleet_package({"model.onnx": random_bytes(10_000, 2), "genai_config.json": b"{}"})
    body = upload(admin, folder, blobs=False)
    pid = body["package_id"]
    creds = [enroll(fleet, new_token(admin), name=f"d{i}").json() for i in range(2)]
    ids = [c["device_id"] for c in creds]

    r = admin.post("/v1/rollouts", json={"package_id": pid, "target": "all"})
    assert r.status_code == 409 and "incomplete" in r.json()["detail"]
    upload(admin, folder)
    r = admin.post("/v1/rollouts", json={"package_id": "f" * 64, "target": "all"})
    assert r.status_code == 404 and "unknown package" in r.json()["detail"]
    r = admin.post("/v1/rollouts", json={"package_id": pid, "target": ["dev-nope"]})
    assert r.status_code == 400 and "unknown device" in r.json()["detail"]
    r = admin.post("/v1/rollouts", json={"package_id": pid, "target": "some"})
    assert r.status_code == 422

    r = admin.post("/v1/rollouts", json={"package_id": pid[:16], "target": "all"})
    assert r.status_code == 200, r.text
    rollout = r.json()
    assert rollout["state"] == "in_progress" and sorted(d["device_id"] for d in rollout["devices"]) == sorted(ids)

    # A device that connects afterwards gets its desired state, retained, with the signed manifest.
    dev = SimDevice.enrolled(creds[0])
    try:
        assert not dev.connect().is_failure
        dev.subscribe_device_topics()
        desired = dev.desired()
        assert dev.messages_on(dev.topics.desired(ids[0]))[-1].retain
        assert desired.device_id == ids[0] and desired.generation == 1 and desired.rollout_id == rollout["id"]
        assert desired.model.package_id == pid and desired.chunk_size == 256 * 1024
        assert desired.model.manifest.SerializeToString() == (folder / "manifest.signed.pb").read_bytes()

        # Reports move the device and the rollout along; telemetry lands in the store, once.
        dev.report(fleet_pb2.FETCHING, 1, target_package_id=pid, bytes_needed=10_000, bytes_received=5_000)
        dev.report(
            fleet_pb2.COMMITTED,
            1,
            target_package_id=pid,
            active_package_id=pid,
            active_version="1.0.0",
            active_slot="b",
            inventory=fleet_pb2.Inventory(arch="aarch64", cpu_count=4),
        )
        batch = fleet_pb2.TelemetryBatch(device_id=ids[0], dropped_total=2)
        for i in range(3):
            batch.samples.add(timestamp_unix_ms=1000 + i, seq=i, cpu_percent=10.0 * i, update_state=fleet_pb2.IDLE)
        dev.publish(dev.topics.telemetry(ids[0]), batch.SerializeToString())
        dev.publish(dev.topics.telemetry(ids[0]), batch.SerializeToString())
        dev.publish(dev.topics.reported(ids[0]), b"\xff\xff garbage")  # dropped, counted, nothing breaks
        assert fleet.server.ingest.wait_idle(10)
        device = admin.get(f"/v1/devices/{ids[0]}").json()
        assert device["state"] == "COMMITTED" and device["active_version"] == "1.0.0"
        assert device["inventory"]["arch"] == "aarch64" and device["telemetry_dropped_total"] == 2
        assert device["desired_generation"] == 1 and device["last_seen"]
        samples = admin.get(f"/v1/devices/{ids[0]}/telemetry").json()["samples"]
        assert [s["seq"] for s in samples] == [2, 1, 0] and samples[0]["update_state"] == "IDLE"
        assert fleet.server.ingest.counters.malformed == 1
        status = admin.get(f"/v1/rollouts/{rollout['id']}").json()
        assert {d["device_id"]: d["state"] for d in status["devices"]} == {ids[0]: "COMMITTED", ids[1]: "PENDING"}

        # A second rollout to one device raises its generation and supersedes the first for it.
        r2 = admin.post("/v1/rollouts", json={"package_id": pid, "target": [ids[1]]}).json()
        assert r2["devices"] == [r2["devices"][0]] and r2["devices"][0]["generation"] == 2
        first = admin.get(f"/v1/rollouts/{rollout['id']}").json()
        assert first["state"] == "succeeded" and first["counts"] == {"COMMITTED": 1, "SUPERSEDED": 1}
        assert admin.get("/v1/rollouts/latest").json()["id"] == r2["id"]
        assert [r["id"] for r in admin.get("/v1/rollouts").json()["rollouts"]] == [rollout["id"], r2["id"]]
    finally:
        dev.close()

    status = admin.get("/v1/status").json()
    assert status["devices"] == 2 and status["packages"] == 1 and status["mqtt"]["connected"] is True
    assert status["rollouts"] == 2 and status["telemetry_samples"] == 3


def test_fleet_restart_keeps_devices_and_republishes_desired_states(
    fleet_settings: Callable[..., Any], fleet_package: Callable[..., Path]
) -> None:
    from slmops_fleet.process import FleetThread

    settings = fleet_settings()
    folder = fleet_package({"a.bin": b"hello"})
    with FleetThread(settings) as first:
        admin = httpx.Client(base_url=first.url, headers={"Authorization": f"Bearer {first.admin_token}"})
        creds = enroll(first, new_token(admin)).json()
        pid = upload(admin, folder)["package_id"]
        assert admin.post("/v1/rollouts", json={"package_id": pid}).status_code == 200
        port, token = first.info.mqtt.port, first.admin_token
        admin.close()
    assert not settings.fleet_json.exists()  # a clean stop removes fleet.json
    with FleetThread(settings) as second:
        assert second.info.mqtt.port == port and second.admin_token == token  # kept for this data folder
        dev = SimDevice.enrolled(creds)
        try:
            assert not dev.connect().is_failure  # the new broker knows the device
            dev.subscribe_device_topics()
            assert dev.desired().model.package_id == pid  # republished, retained, after the restart
        finally:
            dev.close()
