"""Blob delivery on Mosquitto (a broker that does not tell the fleet its delivery backlog) when a
device reads slowly: a real fleet, a real Mosquitto on its own port, devices that speak the real
protocol (slmops_testing/swarm.py, the agent's stall rule with a short timer).

One device stops reading its socket for a while once it has asked for the blob, so the broadcast
waits for it in the broker and the kernel while its stall timer fires again and again (requests
marked `waiting`); another loses a chunk in the middle of the broadcast. The blob goes out once, the
lost chunk once more by unicast, and every device gets every chunk and commits."""

from __future__ import annotations

import hashlib
import selectors
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops_protos.fleet.v1 import fleet_pb2
from slmops_testing.fleet_api import INVENTORY, new_token, upload
from slmops_testing.packages import random_bytes
from slmops_testing.swarm import Swarm, SwarmDevice

CHUNK = 256 * 1024
CHUNKS = 16
PAUSE_S = 4.0  # how long the slow device leaves its socket unread (8 stall timers of 0.5 s)


def _enroll(fleet: Any, admin: httpx.Client, name: str) -> dict[str, Any]:
    body = {"token": new_token(admin), "public_key": "ef" * 32, "name": name, "inventory": INVENTORY}
    response = httpx.post(fleet.url + "/v1/enroll", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _drop_first(device: SwarmDevice, index: int) -> list[int]:
    """The device loses chunk `index` the first time it comes (as if the broker had dropped it)."""
    lost: list[int] = []
    keep = device._on_chunk

    def on_chunk(c: fleet_pb2.BlobChunk) -> None:
        if c.index == index and not lost:
            lost.append(c.index)
            return
        keep(c)

    device._on_chunk = on_chunk  # type: ignore[method-assign]
    return lost


def _run(swarm: Swarm, slow: SwarmDevice, until: Callable[[], bool], timeout: float) -> None:
    """Serve the swarm; once `slow` fetches, leave its socket unread for PAUSE_S (it still ticks and
    sends)."""
    paused_at: float | None = None
    resumed = False
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the devices did not all finish"
        now = time.monotonic()
        if paused_at is None and slow.fetches:
            paused_at = now
            swarm.selector.unregister(slow.client.socket())
        elif paused_at is not None and not resumed and now - paused_at >= PAUSE_S:
            resumed = True
            swarm.selector.register(slow.client.socket(), selectors.EVENT_READ, slow.client)
        swarm.poll(0.02)
        for d in swarm.devices:
            d.client.loop_misc()
            d.tick(now)
        if paused_at is not None and not resumed:
            slow.client.loop_write()  # its requests still go out
    assert resumed, "the slow device never fetched"


@pytest.mark.mosquitto
@pytest.mark.timeout(120)
def test_a_slow_reader_costs_no_second_broadcast_and_a_lost_chunk_is_repaired(
    mosquitto_broker: Any, fleet_settings: Callable[..., Any], fleet_package: Callable[..., Path]
) -> None:
    from slmops_fleet.process import FleetThread

    data = random_bytes(CHUNKS * CHUNK, 41)
    sha = hashlib.sha256(data).hexdigest()
    folder = fleet_package({"weights.bin": data})
    settings = fleet_settings(broker_url=mosquitto_broker.url, chunk_size=CHUNK, coalesce_window_s=0.3)
    with FleetThread(settings) as fleet:
        admin = httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}, timeout=30)
        events: list[tuple[Any, ...]] = []
        swarm = Swarm(
            [_enroll(fleet, admin, f"slow-{i}") for i in range(4)], stall_s=0.5, on_event=lambda *e: events.append(e)
        )
        try:
            pid = upload(admin, folder)["package_id"]
            swarm.connect()
            deadline = time.monotonic() + 30
            while sum(e[0] == "connected" for e in events) < 4:
                assert time.monotonic() < deadline, events
                swarm.poll(0.05)
            slow, lossy = swarm.devices[0], swarm.devices[1]
            lost = _drop_first(lossy, CHUNKS // 2)
            requests: list[bool] = []
            send = slow.client.publish

            def publish(topic: str, payload: bytes, **kwargs: Any) -> Any:
                if topic.endswith("/blob-requests"):
                    requests.append(fleet_pb2.BlobRequest.FromString(payload).waiting)
                return send(topic, payload, **kwargs)

            slow.client.publish = publish  # type: ignore[method-assign]
            assert admin.post("/v1/rollouts", json={"package_id": pid}).status_code == 200
            _run(swarm, slow, lambda: sum(e[0] == "done" for e in events) >= 4, timeout=60)

            assert sorted(e[2] for e in events if e[0] == "done") == ["COMMITTED"] * 4, events
            assert all(d.bad_chunks == 0 and d.bytes_received == len(data) for d in swarm.devices)
            assert lost == [CHUNKS // 2]
            # The slow device asked again while its chunks waited for it, each time marked waiting.
            assert requests[0] is False and len(requests) >= 3 and all(requests[1:]), requests

            deadline = time.monotonic() + 10
            while admin.get("/v1/stats").json()["active_transfers"]:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            fleet.server.distributor.flush_stats()
            stats = {b["sha256"]: b for b in admin.get("/v1/stats").json()["blobs"]}[sha]
            assert stats["broadcast_chunks"] == CHUNKS, stats  # once, though the slow device asked again
            assert stats["repair_chunks"] == 1, stats  # the lost chunk, to the device that lost it
            egress = stats["broadcast_bytes"] + stats["repair_bytes"]
            assert egress <= 1.2 * len(data), stats
        finally:
            swarm.close()
            admin.close()
