"""The whole agent against a real broker (the machine's Mosquitto), with a paho client playing the fleet."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agent_helpers import AgentThread, FleetSim, agent_settings, desired_for, manifest_of, save_credentials

from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc
from slmops_protos.fleet.v1 import fleet_pb2

HAPPY = ["FETCHING", "VERIFYING", "STAGED", "TESTING", "COMMITTED"]


@pytest.fixture
def device_id() -> str:
    return f"dev-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def running(
    short_dir: Path, device_id: str, topic_root: str, trusted_hex: str, fleet_sim: FleetSim
) -> Iterator[AgentThread]:
    """An enrolled agent; the fleet simulator is listening before it connects."""
    state = short_dir / "state"
    save_credentials(state, device_id, topic_root, trusted_hex)
    agent = AgentThread(agent_settings(state, telemetry_interval_s=0.3))
    try:
        yield agent
    finally:
        agent.stop()


def dedup(states: list[str]) -> list[str]:
    out: list[str] = []
    for s in states:
        if not out or out[-1] != s:
            out.append(s)
    return out


def ask(target: str, text: str) -> agent_pb2.GenerateResponse:
    with grpc.insecure_channel(target) as channel:
        req = agent_pb2.GenerateRequest(max_new_tokens=6)
        req.messages.add(role="user", content=text)
        return agent_pb2_grpc.InferenceStub(channel).GenerateUnary(req, timeout=30)


def test_rollout_of_two_versions_over_mqtt(
    running: AgentThread, fleet_sim: FleetSim, device_id: str, pkg_v1: Path, pkg_v2: Path
) -> None:
    # on connect the device reports where it stands, with its inventory
    first = fleet_sim.wait_state(0, "IDLE", timeout=20)
    assert first.device_id == device_id and first.inventory.cpu_count >= 1
    assert "CPUExecutionProvider" in first.inventory.providers and first.inventory.memory_bytes > 0

    fleet_sim.add_package(pkg_v1)
    fleet_sim.set_desired(desired_for(pkg_v1, 1, device_id))
    done = fleet_sim.wait_state(1, "COMMITTED")
    assert dedup(fleet_sim.states_for(1)) == HAPPY
    assert done.active_version == "1.0.0" and done.active_slot == "a" and done.target_package_id
    assert done.inventory.arch
    assert ask(running.addresses[0], "Hello").model_version == "1.0.0"

    requests_before = len(fleet_sim.requests)
    fleet_sim.add_package(pkg_v2)
    fleet_sim.set_desired(desired_for(pkg_v2, 2, device_id))
    done = fleet_sim.wait_state(2, "COMMITTED")
    assert done.active_version == "2.0.0" and done.active_slot == "b"
    assert ask(running.addresses[1], "Hello").model_version == "2.0.0"
    new_requests = fleet_sim.requests[requests_before:]
    genai = next(f.sha256 for f in manifest_of(pkg_v2).files if f.path == "genai_config.json")
    assert {r.blob_sha256 for r in new_requests} == {genai} and all(r.device_id == device_id for r in new_requests)

    # telemetry flows, in order, and knows the update state and the active package
    fleet_sim.wait(
        lambda s: any(
            x.active_package_id == done.active_package_id and x.requests_total >= 2
            for b in s.telemetry
            for x in b.samples
        )
    )
    seqs = fleet_sim.telemetry_seqs()
    assert seqs == sorted(seqs) and len(seqs) >= 2
    sample = fleet_sim.telemetry[-1].samples[-1]
    assert sample.memory_total_bytes > 0 and sample.update_state == fleet_pb2.COMMITTED
    assert fleet_sim.telemetry[-1].device_id == running.agent.device_id


def test_malformed_messages_are_dropped_and_bad_packages_reported(
    running: AgentThread, fleet_sim: FleetSim, device_id: str, pkg_v1: Path, topic_root: str
) -> None:
    topics = fleet_sim.topics
    fleet_sim.wait_state(0, "IDLE", timeout=20)
    fleet_sim.publish_raw(topics.desired(device_id), b"\xff\xff not a protobuf")
    fleet_sim.publish_raw(topics.device_blobs(device_id), b"\x0a\xff garbage")
    fleet_sim.publish_raw(topics.blob_chunks("ab" * 32), b"garbage")
    fleet_sim.publish_raw(f"{topic_root}/blobs/not-a-sha/chunks", b"garbage")
    # a desired state for another device on our topic: ignored
    fleet_sim.publish_raw(topics.desired(device_id), desired_for(pkg_v1, 9, "someone-else").SerializeToString())

    bad = desired_for(pkg_v1, 1, device_id)
    bad.model.manifest.signatures[0].signature = b"\x00" * 64
    fleet_sim.set_desired(bad)
    rejected = fleet_sim.wait_state(1, "ROLLED_BACK")
    assert "bad signature" in rejected.reason and rejected.active_package_id == ""

    # still alive: the next valid desired state is installed
    fleet_sim.add_package(pkg_v1)
    fleet_sim.set_desired(desired_for(pkg_v1, 2, device_id))
    assert fleet_sim.wait_state(2, "COMMITTED").active_version == "1.0.0"
    assert running.agent.mqtt is not None and running.agent.mqtt.dropped_messages >= 2
    assert running.agent.updater.record.generation == 2  # generation 9 was for another device


def test_lost_broadcast_chunks_are_repaired_by_unicast(
    running: AgentThread, fleet_sim: FleetSim, device_id: str, pkg_v1: Path
) -> None:
    big = max(manifest_of(pkg_v1).files, key=lambda f: f.size)
    fleet_sim.drop[big.sha256] = {0, 2}
    fleet_sim.add_package(pkg_v1)
    fleet_sim.set_desired(desired_for(pkg_v1, 1, device_id))
    assert fleet_sim.wait_state(1, "COMMITTED").active_version == "1.0.0"
    repairs = [r for r in fleet_sim.requests if r.missing]
    assert repairs and repairs[0].blob_sha256 == big.sha256 and list(repairs[0].missing) == [0, 2]


def test_a_device_that_was_offline_converges_on_the_retained_desired_state(
    short_dir: Path, fleet_sim: FleetSim, device_id: str, topic_root: str, trusted_hex: str, pkg_v1: Path
) -> None:
    fleet_sim.add_package(pkg_v1)
    fleet_sim.set_desired(desired_for(pkg_v1, 4, device_id))  # published before the device exists
    state = short_dir / "state"
    save_credentials(state, device_id, topic_root, trusted_hex)
    agent = AgentThread(agent_settings(state))
    try:
        assert fleet_sim.wait_state(4, "COMMITTED").active_version == "1.0.0"
    finally:
        agent.stop()
    # restarted: the same retained message is not handled twice; the device reports COMMITTED again
    fleet_sim.reported.clear()
    agent = AgentThread(agent_settings(state))
    try:
        again = fleet_sim.wait_state(4, "COMMITTED", timeout=20)
        assert again.active_version == "1.0.0"
        assert ask(agent.addresses[0], "Hi").model_version == "1.0.0"  # served from the slot at start-up
        assert dedup(fleet_sim.states_for(4)) == ["COMMITTED"]
    finally:
        agent.stop()
