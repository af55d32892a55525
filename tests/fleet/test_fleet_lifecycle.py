"""A device's lifecycle through the real path, on the embedded broker and on Mosquitto with dynamic
security: a running fleet (FleetThread), devices on real MQTT connections (SimDevice: paho).

- revoke: the device's live connection is closed within 5 s, its credentials are refused afterwards,
  its record and telemetry stay, rollouts leave it out, its key cannot enroll again; the other
  device is untouched;
- rotation handshake (the agent's side is in tests/e2e/test_lifecycle.py): the update is retained
  for an offline device, the old password works until the ack, then only the new one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops_protos.fleet.v1 import fleet_pb2
from slmops_testing.fleet_api import new_token, upload
from slmops_testing.packages import random_bytes
from slmops_testing.simulated_devices import SimDevice


def new_key() -> str:
    raw = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return raw.hex()


def enroll(fleet: Any, admin: httpx.Client, name: str, public_key: str | None = None) -> httpx.Response:
    body = {"token": new_token(admin), "public_key": public_key or new_key(), "name": name}
    return httpx.post(fleet.url + "/v1/enroll", json=body, timeout=30)


def connected(creds: dict[str, Any], password: str | None = None) -> SimDevice:
    dev = SimDevice.enrolled(creds, **({"password": password} if password is not None else {}))
    reason = dev.connect()
    assert not reason.is_failure, f"{creds['device_id']} refused: {reason}"
    return dev


def refused(creds: dict[str, Any], password: str | None = None) -> bool:
    dev = SimDevice.enrolled(creds, **({"password": password} if password is not None else {}))
    try:
        return bool(dev.connect().is_failure)
    finally:
        dev.close()


def send_telemetry(dev: SimDevice, seq: int) -> None:
    batch = fleet_pb2.TelemetryBatch(device_id=dev.device_id)
    batch.samples.add(seq=seq, timestamp_unix_ms=int(time.time() * 1000), cpu_percent=12.5)
    dev.publish(dev.topics.telemetry(dev.device_id), batch.SerializeToString())


def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"no {what} after {timeout} s")


def test_a_revoked_device_is_cut_off_at_once_and_its_record_kept(
    any_fleet: Any, owner: httpx.Client, fleet_package: Callable[..., Path]
) -> None:
    key_a = new_key()
    a = enroll(any_fleet, owner, "a", key_a).json()
    b = enroll(any_fleet, owner, "b").json()
    dev_a, dev_b = connected(a), connected(b)
    try:
        send_telemetry(dev_a, 1)
        wait_for(lambda: owner.get(f"/v1/devices/{a['device_id']}/telemetry").json()["samples"], what="telemetry")

        # a rollout under way to both: the revoked device's target is cancelled, not failed
        pkg = upload(owner, fleet_package({"m.bin": random_bytes(2000, 7)}))
        first = owner.post("/v1/rollouts", json={"package_id": pkg["package_id"], "target": "all"}).json()

        started = time.monotonic()
        r = owner.post(f"/v1/devices/{a['device_id']}/revoke")
        assert r.status_code == 200, r.text
        wait_for(lambda: not dev_a.client.is_connected(), timeout=10, what="disconnect of the revoked device")
        took = time.monotonic() - started
        assert took < 5.0, f"the revoked device stayed connected {took:.1f} s"
        assert r.json()["status"] == "revoked" and r.json()["revoked_by"] == "owner" and r.json()["revoked_now"]
        assert r.json()["broker_credentials_removed"] is True
        targets = {t["device_id"]: t for t in owner.get(f"/v1/rollouts/{first['id']}").json()["devices"]}
        assert targets[a["device_id"]]["state"] == "CANCELLED" and "revoked" in targets[a["device_id"]]["reason"]
        assert targets[b["device_id"]]["state"] != "CANCELLED"

        # refused afterwards; the other device is untouched
        assert refused(a)
        assert dev_b.client.is_connected()
        send_telemetry(dev_b, 1)
        wait_for(lambda: owner.get(f"/v1/devices/{b['device_id']}/telemetry").json()["samples"], what="b telemetry")

        # the record and the telemetry already received stay; the device list shows it revoked
        rec = owner.get(f"/v1/devices/{a['device_id']}").json()
        assert rec["status"] == "revoked" and rec["revoked_at"] and rec["name"] == "a"
        assert [d["status"] for d in owner.get("/v1/devices").json()["devices"]] == ["revoked", "active"]
        samples = owner.get(f"/v1/devices/{a['device_id']}/telemetry").json()["samples"]
        assert len(samples) == 1 and samples[0]["cpu_percent"] == 12.5

        # idempotent: a second revoke changes nothing
        again = owner.post(f"/v1/devices/{a['device_id']}/revoke").json()
        assert again["revoked_now"] is False and again["revoked_at"] == rec["revoked_at"]

        # rollouts leave it out; naming it is refused
        r = owner.post("/v1/rollouts", json={"package_id": pkg["package_id"], "target": [a["device_id"]]})
        assert r.status_code == 400 and "revoked" in r.json()["detail"], r.text
        r = owner.post("/v1/rollouts", json={"package_id": pkg["package_id"], "target": "all"})
        assert r.status_code == 200, r.text
        assert [t["device_id"] for t in r.json()["devices"]] == [b["device_id"]]

        # its key cannot enroll again, and the enrollment token is not used up by trying
        token = new_token(owner)
        body = {"token": token, "public_key": key_a, "name": "a-again"}
        r = httpx.post(any_fleet.url + "/v1/enroll", json=body, timeout=30)
        assert r.status_code == 403 and "revoked" in r.json()["detail"], r.text
        r = httpx.post(any_fleet.url + "/v1/enroll", json={**body, "public_key": new_key()}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        dev_a.close()
        dev_b.close()


def test_rotation_keeps_the_old_password_until_the_device_confirms(any_fleet: Any, owner: httpx.Client) -> None:
    creds = enroll(any_fleet, owner, "rot").json()
    device_id, old = creds["device_id"], creds["mqtt"]["password"]

    # the device is offline when the rotation starts: the update waits for it, retained
    r = owner.post(f"/v1/devices/{device_id}/rotate-credentials")
    assert r.status_code == 200, r.text
    rotation = r.json()["rotation_id"]
    assert owner.post(f"/v1/devices/{device_id}/rotate-credentials").json()["rotation_id"] == rotation

    dev = connected(creds)  # the old password still works
    try:
        assert dev.subscribe(dev.topics.credentials(device_id))
        dev.wait_for(lambda: dev.messages_on(dev.topics.credentials(device_id)), what="the credentials update")
        got = dev.messages_on(dev.topics.credentials(device_id))[0]
        update = fleet_pb2.CredentialsUpdate.FromString(got.payload)
        assert got.retain and update.device_id == device_id and update.rotation_id == rotation
        new = update.password
        assert new and new != old

        # a wrong rotation id or another device's id in the ack changes nothing
        for bad in (
            fleet_pb2.CredentialsAck(device_id=device_id, rotation_id="rot-0000000000000000"),
            fleet_pb2.CredentialsAck(device_id="dev-someone-else", rotation_id=rotation),
        ):
            dev.publish(dev.topics.credentials_ack(device_id), bad.SerializeToString())
        time.sleep(1.0)
        assert dev.client.is_connected()
        assert owner.get(f"/v1/devices/{device_id}").json()["rotation_started_at"]

        # the ack switches the broker: the old connection is closed, the old password refused
        ack = fleet_pb2.CredentialsAck(device_id=device_id, rotation_id=rotation)
        dev.publish(dev.topics.credentials_ack(device_id), ack.SerializeToString())
        wait_for(lambda: not dev.client.is_connected(), timeout=10, what="the old connection closed")
    finally:
        dev.close()
    wait_for(lambda: owner.get(f"/v1/devices/{device_id}").json()["rotation_started_at"] is None, what="confirmed")
    assert refused(creds, old)
    fresh = connected(creds, new)
    try:
        # the retained update is gone
        assert fresh.subscribe(fresh.topics.credentials(device_id))
        time.sleep(0.5)
        assert not [m for m in fresh.messages_on(fresh.topics.credentials(device_id)) if m.payload]
    finally:
        fresh.close()
    audit = owner.get("/v1/audit").json()["entries"]
    assert any(e["actor"] == device_id and e["target"] == rotation for e in audit)

    # a revoked device cannot rotate
    owner.post(f"/v1/devices/{device_id}/revoke")
    r = owner.post(f"/v1/devices/{device_id}/rotate-credentials")
    assert r.status_code == 409, r.text


def agent_link(enrolled: dict[str, Any], path: Path, *, password: str = "", previous: str = "") -> Any:
    """The agent's own MQTT link (AgentMqtt with a CredentialKeeper on `path`), started."""
    from slmops_agent.credentials import CredentialKeeper, Credentials
    from slmops_agent.mqtt import AgentMqtt

    mqtt = {**enrolled["mqtt"], "previous_password": previous}
    if password:
        mqtt["password"] = password
    creds = Credentials.from_json({"version": 1, "device_id": enrolled["device_id"], "fleet_url": "", "mqtt": mqtt})
    creds.save(path)
    link = AgentMqtt(
        creds,
        on_desired=lambda _m: None,
        on_chunk=lambda _m: None,
        wants_blob=lambda _s: False,
        keeper=CredentialKeeper(path, creds),
        reconnect_min_s=0.5,
        reconnect_max_s=2,
        connect_jitter_s=0,
    )
    link.start()
    return link


def test_an_agent_that_crashed_before_its_ack_falls_back_and_confirms(
    any_fleet: Any, owner: httpx.Client, tmp_path: Path
) -> None:
    """The agent saved the new password and died before its ack: the broker still knows only the old
    one. Restarted, its MQTT link is refused with the new one, connects with the old, gets the retained
    update again, confirms, and is switched over (the agent's own link: AgentMqtt + CredentialKeeper)."""
    from slmops_agent.credentials import Credentials

    enrolled = enroll(any_fleet, owner, "crashy").json()
    device_id, old = enrolled["device_id"], enrolled["mqtt"]["password"]
    owner.post(f"/v1/devices/{device_id}/rotate-credentials").raise_for_status()
    (pending,) = any_fleet.server.store.pending_rotations()
    path = tmp_path / "credentials.json"
    link = agent_link(enrolled, path, password=pending.password, previous=old)
    try:
        wait_for(lambda: not Credentials.load(path).mqtt.previous_password, timeout=30, what="the new password working")
        wait_for(lambda: link.connects >= 2 and link.is_connected(), what="the link on its new password")
        assert owner.get(f"/v1/devices/{device_id}").json()["rotation_started_at"] is None
        assert Credentials.load(path).mqtt.password == pending.password
        assert refused(enrolled, old)
    finally:
        link.stop()


@pytest.mark.mosquitto
def test_a_device_enrolled_before_rotation_existed_gets_its_acl_updated(
    mosquitto_broker: Any, fleet_settings: Callable[..., Any], tmp_path: Path
) -> None:
    """On Mosquitto a device's ACL is a dynsec role made at enrollment: one made by an older fleet lacks
    the credentials topics. Rotating adds them and makes the device subscribe again."""
    from slmops_agent.credentials import Credentials
    from slmops_fleet.process import FleetThread
    from slmops_fleet.provisioning import device_role

    with FleetThread(fleet_settings(broker_url=mosquitto_broker.url)) as fleet:
        owner = httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"})
        enrolled = enroll(fleet, owner, "old-timer").json()
        device_id = enrolled["device_id"]
        topics = fleet.server.topics
        for acltype, topic in (
            ("publishClientSend", topics.credentials_ack(device_id)),
            ("subscribeLiteral", topics.credentials(device_id)),
        ):
            fleet.server.provisioner.command(
                {"command": "removeRoleACL", "rolename": device_role(device_id), "acltype": acltype, "topic": topic}
            )
        path = tmp_path / "credentials.json"
        link = agent_link(enrolled, path)
        try:
            wait_for(link.is_connected, what="the old device connected")
            owner.post(f"/v1/devices/{device_id}/rotate-credentials").raise_for_status()
            wait_for(
                lambda: owner.get(f"/v1/devices/{device_id}").json()["rotation_started_at"] is None,
                timeout=30,
                what="the rotation confirmed",
            )
            wait_for(lambda: not Credentials.load(path).mqtt.previous_password, what="the new password working")
            assert refused(enrolled, enrolled["mqtt"]["password"])
        finally:
            link.stop()
            owner.close()


def test_a_fleet_start_brings_older_devices_acls_up_to_date(
    mosquitto_broker: Any, fleet_settings: Callable[..., Any]
) -> None:
    """A device enrolled by an older fleet lacks newer topics in its dynsec role (`keys`: key statements
    would never reach it). The next fleet start adds them, without waiting for a rotation."""
    from slmops_fleet.process import FleetThread
    from slmops_fleet.provisioning import device_role

    settings = fleet_settings(broker_url=mosquitto_broker.url)

    def role_topics(fleet: Any, device_id: str) -> set[str]:
        role = fleet.server.provisioner.command({"command": "getRole", "rolename": device_role(device_id)})
        return {acl["topic"] for acl in role["data"]["role"]["acls"]}

    with FleetThread(settings) as fleet:
        owner = httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"})
        device_id = enroll(fleet, owner, "old-timer").json()["device_id"]
        owner.close()
        keys = fleet.server.topics.keys
        fleet.server.provisioner.command(
            {
                "command": "removeRoleACL",
                "rolename": device_role(device_id),
                "acltype": "subscribeLiteral",
                "topic": keys,
            }
        )
        assert keys not in role_topics(fleet, device_id)

    with FleetThread(settings) as fleet:
        wait_for(lambda: keys in role_topics(fleet, device_id), what="the keys topic back in the device's ACL")
