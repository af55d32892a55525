"""The embedded amqtt broker: device authentication and topic ACLs through real MQTT connections
(the probe every broker must pass), and the changes to amqtt's subscription table and queues."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops_fleet.broker_access import filter_covered
from slmops_fleet.codec import chunk_to_pb
from slmops_protos.topics import Topics
from slmops_testing.fleet_api import enroll_two_and_roll_out
from slmops_testing.packages import random_bytes
from slmops_testing.simulated_devices import SimDevice, check_device_isolation, check_hostile_wills


def test_filter_coverage() -> None:
    assert filter_covered("r/blobs/+/chunks", "r/blobs/+/chunks")
    assert filter_covered("r/blobs/abc/chunks", "r/blobs/+/chunks")
    assert not filter_covered("r/blobs/#", "r/blobs/+/chunks")
    assert not filter_covered("r/blobs/+/+", "r/blobs/+/chunks")
    assert not filter_covered("r/devices/+/desired", "r/devices/a/desired")
    assert not filter_covered("r/devices/a", "r/devices/a/desired")
    assert not filter_covered("r/devices/a/desired/x", "r/devices/a/desired")
    assert filter_covered("r/x/y", "r/#") and filter_covered("r/#", "r/#")


def test_embedded_broker_isolates_devices(fleet: Any, fleet_package: Callable[..., Path]) -> None:
    a, b = enroll_two_and_roll_out(fleet, fleet_package({"m.bin": random_bytes(1000, 3)}))
    registry = fleet.server.registry
    check_device_isolation(
        "127.0.0.1",
        fleet.info.mqtt.port,
        Topics(fleet.settings.topic_root),
        a,
        b,
        (registry.fleet_username, registry.fleet_password),
    )


def test_embedded_broker_refuses_a_will_outside_the_devices_acl(fleet: Any, fleet_package: Callable[..., Path]) -> None:
    """amqtt publishes (and retains) a CONNECT's will without asking the topic plugin: the broker checks it
    at CONNECT. A will on another device's topics, retained or not, is refused and reaches no one; on the
    device's own publish topics a will is allowed, but not a retained one."""
    a, b = enroll_two_and_roll_out(fleet, fleet_package({"m.bin": random_bytes(1000, 5)}))
    registry = fleet.server.registry
    topics = Topics(fleet.settings.topic_root)
    observer = (registry.fleet_username, registry.fleet_password)
    with httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}) as admin:
        before = admin.get(f"/v1/devices/{b['device_id']}").json()
    check_hostile_wills("127.0.0.1", fleet.info.mqtt.port, topics, a, b, observer, refused=True)
    for retain, qos, accepted in ((True, 1, False), (False, 2, False), (False, 1, True)):
        dev = SimDevice.enrolled(a)
        dev.client.will_set(topics.reported(a["device_id"]), b"gone", qos=qos, retain=retain)
        try:
            assert dev.connect().is_failure is not accepted, f"own-topic will retain={retain} qos={qos}"
        finally:
            dev.close()
    with httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}) as admin:
        after = admin.get(f"/v1/devices/{b['device_id']}").json()
    assert (after["state"], after["reported_generation"]) == (before["state"], before["reported_generation"])


def test_embedded_broker_refuses_before_touching_sessions(fleet: Any, fleet_package: Callable[..., Path]) -> None:
    """A client with a stolen client id but no password must not kick the device off or drop its subscriptions."""
    a, _b = enroll_two_and_roll_out(fleet, fleet_package({"m.bin": b"x"}))
    dev = SimDevice.enrolled(a)
    try:
        assert not dev.connect().is_failure
        dev.subscribe_device_topics()
        dev.desired()
        for _ in range(3):
            thief = SimDevice(
                "127.0.0.1", fleet.info.mqtt.port, username="mallory", password="x", client_id=a["device_id"]
            )
            assert thief.connect().is_failure
            thief.close()
        # The device's session is untouched: a new desired state still reaches it, no reconnect needed.
        connects = dev.connack
        with httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}) as admin:
            pid = admin.get("/v1/packages").json()["packages"][0]["id"]
            assert admin.post("/v1/rollouts", json={"package_id": pid, "target": [a["device_id"]]}).status_code == 200
        assert dev.desired(generation=2).generation == 2
        assert dev.connack is connects
    finally:
        dev.close()


def test_embedded_broker_backlog_counts_unacknowledged_deliveries_to_devices(
    fleet: Any, fleet_package: Callable[..., Path]
) -> None:
    """The blob sender paces on it: deliveries a device has not acknowledged yet count."""
    a, _b = enroll_two_and_roll_out(fleet, fleet_package({"m.bin": random_bytes(1000, 4)}))
    broker, topics = fleet.server.broker, Topics(fleet.settings.topic_root)
    from slmops_fleet.embedded_broker import _Subscriptions

    assert isinstance(broker._broker.subscriptions, _Subscriptions)  # the running broker's table
    dev = SimDevice.enrolled(a)
    try:
        assert not dev.connect().is_failure
        dev.subscribe_device_topics()
        time.sleep(0.5)  # its retained desired state is delivered and acknowledged
        assert broker.backlog() == (0, 1)
        dev.client.loop_stop()  # the device stops reading: nothing it is sent gets acknowledged
        broker.BACKLOG_REFRESH_S = 0.0  # read it afresh each time here
        for i in range(3):
            chunk = chunk_to_pb("ab" * 32, i, 3, 3 * 256 * 1024, 256 * 1024, random_bytes(256 * 1024, i))
            fleet.server.mqtt.publish(topics.blob_chunks("ab" * 32), chunk, qos=1)
        deadline = time.monotonic() + 5
        while broker.backlog()[0] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert broker.backlog() == (3, 1)
        dev.client.loop_start()
        deadline = time.monotonic() + 5
        while broker.backlog()[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert broker.backlog() == (0, 1)
    finally:
        dev.close()


def test_embedded_broker_subscription_table_is_iterated_over_snapshots() -> None:
    """amqtt 0.12 fans a message out by iterating its subscription table while awaiting the topic
    plugin: a device that subscribed meanwhile (a new filter) raised "dictionary changed size during
    iteration" and the message was lost for every later subscriber (seen with 1,000 devices)."""
    from slmops_fleet.embedded_broker import _Subscriptions

    plain: dict[str, list[Any]] = {"r/blobs/+/chunks": [("dev-a", 1)], "r/devices/a/desired": []}
    with pytest.raises(RuntimeError, match="changed size"):
        for topic_filter, _subs in plain.items():
            plain[topic_filter + "/x"] = []
    table = _Subscriptions()
    table["r/blobs/+/chunks"], table["r/devices/a/desired"] = [("dev-a", 1)], []
    seen = []
    for topic_filter, subs in table.items():
        table["r/devices/b/" + topic_filter] = []  # device b subscribes while the fan-out awaits
        subs.append(("dev-b", 1))  # the fan-out's copy: the table itself is not changed through it
        seen.append(topic_filter)
    for topic_filter in table:  # amqtt's other loop (on connect) over the keys
        if topic_filter.startswith("r/devices/b/"):
            del table[topic_filter]
    assert seen == ["r/blobs/+/chunks", "r/devices/a/desired"]
    assert table == {"r/blobs/+/chunks": [("dev-a", 1)], "r/devices/a/desired": []}


def test_embedded_broker_counts_the_fleets_messages_waiting_for_fan_out() -> None:
    """Desired states and chunks the fleet published that amqtt has not fanned out yet are backlog;
    the devices' requests and reports (to the fleet alone) are not."""
    import asyncio
    from types import SimpleNamespace

    from slmops_fleet.broker_access import FLEET_USERNAME
    from slmops_fleet.embedded_broker import _BroadcastQueue

    async def run() -> list[int]:
        q = _BroadcastQueue()
        fleet, device = SimpleNamespace(username=FLEET_USERNAME), SimpleNamespace(username="dev-a")
        counts = []
        for session in (fleet, device, fleet, None):
            await q.put({"session": session, "topic": "t", "data": b""})
            counts.append(q.fleet_messages)
        while not q.empty():
            await q.get()
            counts.append(q.fleet_messages)
        return counts

    assert asyncio.run(run()) == [1, 1, 2, 2, 1, 1, 0, 0]


def test_embedded_broker_finds_subscribers_without_scanning_every_filter() -> None:
    """Each device has filters of its own: a message's subscribers are its exact filter plus the
    wildcard filters that match, found without testing every device's filters."""
    from amqtt.broker import Broker

    from slmops_fleet.embedded_broker import _Subscriptions

    table = _Subscriptions()
    for i in range(1000):
        table[f"r/devices/d{i}/desired"] = [(f"d{i}", 1)]
    table["r/blobs/+/chunks"] = [("d1", 1), ("d2", 1)]
    table["r/devices/+/reported"] = [("fleet", 1)]
    table["r/#"] = [("watcher", 0)]
    tested: list[str] = []

    def matches(topic: str, topic_filter: str) -> bool:
        tested.append(topic_filter)
        return Broker._matches(None, topic, topic_filter)  # type: ignore[arg-type]

    assert table.matching("r/devices/d7/desired", matches) == [[("d7", 1)], [("watcher", 0)]]
    assert sorted(tested) == ["r/#", "r/blobs/+/chunks", "r/devices/+/reported"]  # wildcards only
    assert table.matching("r/blobs/ab/chunks", matches) == [[("watcher", 0)], [("d1", 1), ("d2", 1)]]
    assert table.matching("r/devices/d7/reported", matches) == [[("watcher", 0)], [("fleet", 1)]]
    del table["r/#"]
    table.clear()
    assert table.matching("r/devices/d7/desired", matches) == [] and not table._wildcards
