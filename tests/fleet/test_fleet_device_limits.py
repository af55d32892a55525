"""What one device may ask of a real fleet (FleetThread, embedded broker) through MQTT: blob requests
always use the fleet's chunk size and are held to a rate per device; a telemetry batch has a size."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops_fleet.settings import MAX_CHUNK
from slmops_protos.fleet.v1 import fleet_pb2
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


def test_a_device_flooding_blob_requests_is_held_to_its_rate(
    fleet_settings: Callable[..., Any], fleet_package: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Past its burst a device's requests are dropped at the network thread, counted, and logged once."""
    from slmops_fleet.process import FleetThread

    data = random_bytes(2 * CHUNK, 32)
    sha = hashlib.sha256(data).hexdigest()
    caplog.set_level(logging.WARNING, logger="slmops_fleet.device_limits")
    with FleetThread(fleet_settings(blob_request_rate=0.5, blob_request_burst=5)) as fleet:
        a, b = enroll_two_and_roll_out(fleet, fleet_package({"weights.bin": data}))
        flooder, other = _connected(a), _connected(b)
        try:
            flooder.desired()
            for _ in range(40):
                flooder.request_blob(sha, missing=[1])
            ingest = fleet.server.ingest
            policy = ingest.blob_policy
            _wait(lambda: policy.counters.rate_limited + ingest.counters.blob_requests == 40, 10, "40 requests")
            served = ingest.counters.blob_requests
            assert 5 <= served <= 6 and policy.counters.rate_limited == 40 - served
            dropped = [r for r in caplog.records if "dropped: more than" in r.getMessage()]
            assert len(dropped) == 1 and flooder.device_id in dropped[0].getMessage()
            # The other device has its own bucket: its request is served and its blob arrives.
            other.desired()
            other.request_blob(sha)
            assert other.wait_blob(sha) == data
            assert policy.counters.rate_limited == 40 - served
        finally:
            flooder.close()
            other.close()


def test_the_token_bucket_refills_and_logs_once_per_window(caplog: pytest.LogCaptureFixture) -> None:
    from slmops_fleet.codec import BlobRequestIn
    from slmops_fleet.device_limits import BlobRequestPolicy

    now = [100.0]
    policy = BlobRequestPolicy(CHUNK, rate=2.0, burst=3, log_window_s=60.0, clock=lambda: now[0])
    ask = BlobRequestIn("dev-1", "a" * 64, (), CHUNK)
    caplog.set_level(logging.WARNING, logger="slmops_fleet.device_limits")
    assert [policy.admit(ask) is not None for _ in range(5)] == [True, True, True, False, False]
    assert policy.admit(BlobRequestIn("dev-2", "a" * 64, (), CHUNK)) is not None  # a bucket per device
    now[0] += 1.0  # two tokens back
    assert [policy.admit(ask) is not None for _ in range(3)] == [True, True, False]
    now[0] += 100.0  # full again (three at most), and the window is over
    assert [policy.admit(ask) is not None for _ in range(4)] == [True, True, True, False]
    assert policy.counters.rate_limited == 4
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "dev-1" in messages[0] and "(2 more like it" in messages[1]


def _telemetry(device_id: str, n: int, first_seq: int) -> bytes:
    now_ms = int(time.time() * 1000)
    samples = [
        fleet_pb2.TelemetrySample(timestamp_unix_ms=now_ms, seq=first_seq + i, requests_total=i) for i in range(n)
    ]
    return fleet_pb2.TelemetryBatch(device_id=device_id, samples=samples).SerializeToString()


def test_a_telemetry_batch_past_the_sample_limit_is_refused_whole(
    fleet_settings: Callable[..., Any], fleet_package: Callable[..., Path]
) -> None:
    from slmops_fleet.process import FleetThread

    with FleetThread(fleet_settings(telemetry_max_samples=50)) as fleet:
        a, _b = enroll_two_and_roll_out(fleet, fleet_package({"weights.bin": b"w"}))
        dev = _connected(a)
        try:
            topic = dev.topics.telemetry(dev.device_id)
            dev.publish(topic, _telemetry(dev.device_id, 51, 1))
            dev.publish(topic, _telemetry(dev.device_id, 50, 100))  # at the limit: kept, every sample
            _wait(lambda: fleet.server.store.counts()["telemetry_samples"] > 0, 10, "telemetry samples")
            assert fleet.server.ingest.wait_idle(10)
            assert fleet.server.store.counts()["telemetry_samples"] == 50
            seqs = sorted(t.seq for t in fleet.server.store.telemetry(dev.device_id, limit=1000))
            assert seqs == list(range(100, 150))
            counters = fleet.server.ingest.counters
            assert counters.telemetry_refused == 1 and counters.telemetry_batches == 1 and counters.malformed == 0
        finally:
            dev.close()


def test_the_default_sample_limit_takes_any_batch_an_agent_sends() -> None:
    """An agent sends at most `telemetry_batch` samples a message, which it bounds: the fleet's
    default limit takes that many (and refuses the 300,000 one message once carried)."""
    from slmops_agent.settings import AgentSettings
    from slmops_fleet.settings import FleetSettings

    agent_max = AgentSettings.model_fields["telemetry_batch"].le
    assert agent_max is not None
    fleet_max = FleetSettings.model_fields["telemetry_max_samples"].default
    assert agent_max <= fleet_max < 300_000


def test_one_device_cannot_outweigh_the_pooled_quality_score(fleet: Any, fleet_package: Callable[..., Path]) -> None:
    """A device reporting a million matched golden prompts counts for what its package holds (2 judged
    of 3 prompts): with another device matching none, the pooled score is 2/4 and the gate fails."""
    golden = [("What is 2+2?", "4"), ("Capital of France?", "Paris"), ("Say hello", "")]
    folder = fleet_package({"weights.bin": b"w"}, golden=golden)
    gates = {"min_quality_score": 0.6, "min_devices": 2}
    a, b = enroll_two_and_roll_out(fleet, folder, waves=["100%"], gates=gates)
    liar, honest = _connected(a), _connected(b)
    try:
        with _admin(fleet) as admin:

            def rollout() -> dict[str, Any]:
                body: dict[str, Any] = admin.get("/v1/rollouts/latest").json()
                return body

            def commit(dev: SimDevice, n: int, judged: int, matched: int) -> None:
                d = dev.desired()
                test = fleet_pb2.TestResult(ran=True, passed=True, prompts=n, judged=judged, matched=matched)
                pid = d.model.package_id
                dev.report(
                    fleet_pb2.COMMITTED, d.generation, target_package_id=pid, active_package_id=pid,
                    active_version="1.0.0", test=test,
                )  # fmt: skip

            def test_of(device_id: str) -> dict[str, Any] | None:
                found: dict[str, Any] | None = next(d for d in rollout()["devices"] if d["device_id"] == device_id).get(
                    "test"
                )
                return found

            commit(liar, 10**6, 10**6, 10**6)
            _wait(lambda: test_of(liar.device_id) is not None, 10, "the first report")
            reported = test_of(liar.device_id)
            assert reported is not None and (reported["prompts"], reported["judged"], reported["matched"]) == (3, 2, 2)
            commit(honest, 3, 2, 0)
            _wait(lambda: rollout()["state"] != "in_progress", 15, "the gate's verdict")
            done = rollout()
            assert done["state"] == "rolled_back", done
            assert "on-device quality score 50% (2/4 golden prompts matched" in done["reason"]
    finally:
        liar.close()
        honest.close()
