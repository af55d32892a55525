"""What one device may ask of a real fleet (FleetThread, embedded broker) through MQTT: blob requests
always use the fleet's chunk size."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from slmops_fleet.settings import MAX_CHUNK
from slmops_testing.fleet_api import enroll_two_and_roll_out
from slmops_testing.packages import random_bytes
from slmops_testing.simulated_devices import SimDevice

CHUNK = 256 * 1024  # the `fleet_settings` chunk size


def _admin(fleet: Any) -> httpx.Client:
    return httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}, timeout=30)


def _connected(creds: dict[str, Any]) -> SimDevice:
    dev = SimDevice.enrolled(creds)
    assert not dev.connect().is_failure
    dev.subscribe_device_topics()
    return dev


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def test_chunk_sizes_named_by_a_device_start_no_broadcast(fleet: Any, fleet_package: Callable[..., Path]) -> None:
    """Twenty whole-blob requests naming twenty chunk sizes start one broadcast, in the fleet's size."""
    data = random_bytes(8 * CHUNK, 31)
    sha = hashlib.sha256(data).hexdigest()
    a, _b = enroll_two_and_roll_out(fleet, fleet_package({"weights.bin": data}))
    dev = _connected(a)
    try:
        assert dev.desired().chunk_size == CHUNK
        sizes = [CHUNK + i * (MAX_CHUNK - CHUNK) // 19 for i in range(20)]
        assert len(set(sizes)) == 20 and max(sizes) == MAX_CHUNK
        for size in sizes:
            dev.request_blob(sha, chunk_size=size)
        assert dev.wait_blob(sha) == data
        asm = dev.blob(sha)
        assert asm.chunk_size == CHUNK and asm.count == 8 and set(asm.via.values()) == {"broadcast"}
        assert fleet.server.ingest.wait_idle(10)
        _wait(fleet.server.distributor.idle, 10, "idle distributor")
        with _admin(fleet) as admin:
            (stats,) = admin.get("/v1/stats").json()["blobs"]
        assert stats["sha256"] == sha and stats["whole_requests"] == 20
        assert stats["broadcasts"] == 1 and stats["broadcast_chunks"] == 8 and stats["broadcast_bytes"] == len(data)
        assert fleet.server.ingest.blob_policy.counters.resized == 19
    finally:
        dev.close()
