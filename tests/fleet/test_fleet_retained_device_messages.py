"""A device's retained will on its own topic, on Mosquitto with dynamic security: Mosquitto's ACLs
cannot refuse retain (the embedded broker refuses such a will at CONNECT: see
test_fleet_embedded_broker.py), so the fleet must not take the retained copy, replayed at each
subscribe, for a new report. It drops it, counts it, and clears it from the broker."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from slmops_fleet.process import FleetThread
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_testing.brokers import MosquittoBroker
from slmops_testing.fleet_api import enroll, new_token
from slmops_testing.simulated_devices import SimDevice


def _limits(fleet: FleetThread) -> dict[str, Any]:
    r = httpx.get(fleet.url + "/v1/status", headers={"Authorization": f"Bearer {fleet.admin_token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json()["limits"])


def _reports(fleet: FleetThread) -> int:
    """Reports ingest has taken in since this fleet started."""
    assert fleet.server is not None and fleet.server.ingest is not None
    assert fleet.server.ingest.wait_idle(10)
    return fleet.server.ingest.counters.reported


@pytest.mark.mosquitto
def test_a_retained_will_on_a_devices_own_topic_is_dropped_and_cleared(
    mosquitto_broker: MosquittoBroker, fleet_settings: Callable[..., Any]
) -> None:
    settings = fleet_settings(broker_url=mosquitto_broker.url)
    with FleetThread(settings) as fleet:
        with httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}) as admin:
            creds = enroll(fleet, new_token(admin), "a").json()
        device_id = creds["device_id"]
        dev = SimDevice.enrolled(creds)
        will = fleet_pb2.ReportedState(device_id=device_id, generation=1)
        dev.client.will_set(dev.topics.reported(device_id), will.SerializeToString(), qos=1, retain=True)
        assert not dev.connect().is_failure
        dev.drop()  # no DISCONNECT: Mosquitto publishes the will, and keeps it retained
        time.sleep(1.0)
        assert _limits(fleet)["mqtt_retained_device_messages_cleared"] == 0
        assert _reports(fleet) == 1  # delivered live: the device's own report, like any other

    # At the next subscribe Mosquitto replays the retained will: the fleet drops and clears it.
    with FleetThread(settings) as fleet:
        deadline = time.monotonic() + 10
        while _limits(fleet)["mqtt_retained_device_messages_cleared"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _limits(fleet)["mqtt_retained_device_messages_cleared"] == 1
        assert _reports(fleet) == 0  # not taken for a report

    # Cleared on the broker: a third start gets nothing replayed.
    with FleetThread(settings) as fleet:
        time.sleep(1.5)
        assert _limits(fleet)["mqtt_retained_device_messages_cleared"] == 0
        assert _reports(fleet) == 0
