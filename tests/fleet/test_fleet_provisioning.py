"""Provisioning device credentials on an external broker: Mosquitto with dynamic security (each device
its own user and ACL, checked by the probe every broker must pass; a broker that stops answering
creates no device), and a broker the fleet only uses (`--broker-provisioning none`)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.topics import Topics
from slmops_testing.fleet_api import enroll_two_and_roll_out
from slmops_testing.packages import random_bytes
from slmops_testing.simulated_devices import SimDevice, check_device_isolation, check_hostile_wills


@pytest.mark.mosquitto
def test_mosquitto_dynsec_isolates_devices(
    mosquitto_broker: Any, fleet_settings: Callable[..., Any], fleet_package: Callable[..., Path]
) -> None:
    from slmops_fleet.process import FleetThread

    settings = fleet_settings(broker_url=mosquitto_broker.url, topic_root="slmops/v1")
    with FleetThread(settings) as fleet:
        assert fleet.info.mqtt.embedded is False and fleet.info.mqtt.port == mosquitto_broker.port
        a, b = enroll_two_and_roll_out(fleet, fleet_package({"m.bin": random_bytes(1000, 4)}))
        assert a["mqtt"]["port"] == mosquitto_broker.port
        check_device_isolation(
            mosquitto_broker.host,
            mosquitto_broker.port,
            Topics(settings.topic_root),
            a,
            b,
            (mosquitto_broker.admin_username, mosquitto_broker.admin_password),
        )
        check_hostile_wills(
            mosquitto_broker.host,
            mosquitto_broker.port,
            Topics(settings.topic_root),
            a,
            b,
            (mosquitto_broker.admin_username, mosquitto_broker.admin_password),
            refused=False,
        )


@pytest.mark.mosquitto
def test_mosquitto_refused_provisioning_leaves_no_device(
    mosquitto_broker: Any, fleet_settings: Callable[..., Any]
) -> None:
    """If the broker stops answering, enrollment fails with 503 and the token stays usable."""
    from slmops_fleet.process import FleetThread

    with FleetThread(fleet_settings(broker_url=mosquitto_broker.url)) as fleet:
        fleet.server.provisioner.timeout_s = 2.0
        with httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}) as admin:
            token = admin.post("/v1/tokens", json={}).json()["token"]
            mosquitto_broker.stop()
            r = httpx.post(fleet.url + "/v1/enroll", json={"token": token, "public_key": "cd" * 32}, timeout=30)
            assert r.status_code == 503 and "broker credentials" in r.json()["detail"], r.text
            assert admin.get("/v1/devices").json()["devices"] == []
            mosquitto_broker.start()
            fleet.server.provisioner.timeout_s = 15.0
            r = httpx.post(fleet.url + "/v1/enroll", json={"token": token, "public_key": "cd" * 32}, timeout=30)
            assert r.status_code == 200, r.text
            dev = SimDevice.enrolled(r.json())
            try:
                assert not dev.connect().is_failure
            finally:
                dev.close()


def test_external_broker_without_provisioning(
    fleet_settings: Callable[..., Any], fleet_package: Callable[..., Path]
) -> None:
    """`--broker-provisioning none` on the machine's anonymous Mosquitto (port 1883, a unique topic root):
    the fleet only uses the broker; devices get the broker's address and the topic root."""
    try:
        socket.create_connection(("127.0.0.1", 1883), timeout=1).close()
    except OSError:
        pytest.skip("no MQTT broker on 127.0.0.1:1883")
    from slmops_fleet.process import FleetThread

    root = f"slmops-test-{os.urandom(4).hex()}/v1"
    settings = fleet_settings(broker_url="mqtt://127.0.0.1:1883", broker_provisioning="none", topic_root=root)
    with FleetThread(settings) as fleet:
        a, _b = enroll_two_and_roll_out(fleet, fleet_package({"m.bin": b"payload"}))
        assert a["mqtt"]["host"] == "127.0.0.1" and a["mqtt"]["port"] == 1883 and a["mqtt"]["topic_root"] == root
        dev = SimDevice.enrolled(a)
        try:
            assert not dev.connect().is_failure
            dev.subscribe_device_topics()
            assert dev.desired().device_id == a["device_id"]
            dev.report(fleet_pb2.COMMITTED, 1, active_version="1.0.0")
            with httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}) as admin:
                for _ in range(100):
                    if admin.get(f"/v1/devices/{a['device_id']}").json()["state"] == "COMMITTED":
                        break
                    time.sleep(0.1)
                assert admin.get(f"/v1/devices/{a['device_id']}").json()["active_version"] == "1.0.0"
                # the broker's users are the operator's: no rotation; a revocation says it removed nothing
                r = admin.post(f"/v1/devices/{a['device_id']}/rotate-credentials")
                assert r.status_code == 409 and "does not manage" in r.json()["detail"], r.text
                r = admin.post(f"/v1/devices/{_b['device_id']}/revoke")
                assert r.json()["status"] == "revoked" and r.json()["broker_credentials_removed"] is False
        finally:
            dev.close()
        # Clear the retained desired states this test left on the shared broker.
        for creds in (a, _b):
            dev = SimDevice("127.0.0.1", 1883, username=None, password=None, client_id="cleanup-" + os.urandom(3).hex())
            dev.connect()
            dev.client.publish(
                f"{root}/devices/{creds['device_id']}/desired", b"", qos=1, retain=True
            ).wait_for_publish(5)
            dev.close()
