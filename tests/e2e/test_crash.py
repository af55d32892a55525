"""Crashes through real processes: the broker SIGKILLed mid-transfer (Mosquitto with persistence,
and the fleet with its embedded broker), a chunk corrupted on the wire, and the agent process
SIGKILLed in each named update state while the fleet rolls a package out to it.

"Mid-transfer" is read from the agent's own chunk bitmap (`blobs/<sha>.bitmap`): the kill happens
when some but not all chunks of the package's big blob are on the device's disk. The fleet's
broadcast is paced (`--broadcast-rate`) so that window lasts seconds.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from slmops_testing import crash
from slmops_testing.brokers import CorruptingProxy, start_mosquitto
from slmops_testing.crash import CHUNK, Agent, blob_stats, padded_package, release, wait_device, wait_mid_transfer
from slmops_testing.processes import FleetProc

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def start_fleet(tmp_path: Path, signing_key: tuple[Path, Path]) -> Iterator[Callable[..., FleetProc]]:
    """start(*extra_args) -> a fleet on tmp_path/fleet (the same data folder, hence ports, each time)."""
    started: list[FleetProc] = []

    def start(*extra: str) -> FleetProc:
        log = tmp_path / "logs" / f"fleet-{len(started)}.log"
        started.append(crash.start_fleet(tmp_path / "fleet", log, signing_key[1], *extra))
        return started[-1]

    yield start
    for fleet in reversed(started):
        fleet.service.stop()


@pytest.fixture
def enroll(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """enroll(fleet, name, mqtt_port=None) -> an enrolled Agent in tmp_path/name, not started."""
    agents: list[Agent] = []

    def make(fleet: FleetProc, name: str, mqtt_port: int | None = None) -> Agent:
        agents.append(crash.enroll(fleet, tmp_path / name, tmp_path / "logs", mqtt_port))
        return agents[-1]

    yield make
    for agent in agents:
        agent.stop()


# --- the broker dies mid-transfer -----------------------------------------------------------------


@pytest.mark.mosquitto
def test_mosquitto_sigkilled_mid_transfer(
    tmp_path: Path,
    tiny_package_factory: Callable[..., Path],
    signing_key: tuple[Path, Path],
    start_fleet: Callable[..., FleetProc],
    enroll: Callable[..., Agent],
) -> None:
    """Mosquitto (persistence, autosave_interval 1) is SIGKILLed while the device has part of the
    package and restarted on the same port: the device asks for what it lacks, the download
    completes, verifies and commits."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        fleet = start_fleet("--broker-url", broker.url)
        agent = enroll(fleet, "agent").start()
        tiny = tiny_package_factory("1.0.0", out=tmp_path / "tiny")
        pkg, pid, pad = padded_package(tiny, tmp_path / "v1", signing_key[0], "1.0.0", 8 * CHUNK)
        release(fleet, pkg)

        have, count = wait_mid_transfer(agent.state_dir, pad)
        broker.kill()
        time.sleep(0.5)
        broker.start()

        wait_device(fleet, agent.device_id, "COMMITTED", pid, timeout=30)
        assert agent.answer() == "1.0.0"
        print(f"broker SIGKILLed with {have}/{count} chunks on the device; sent {blob_stats(fleet, pad)}")
    finally:
        broker.stop()


def test_fleet_and_embedded_broker_sigkilled_mid_transfer(
    tmp_path: Path,
    tiny_package_factory: Callable[..., Path],
    signing_key: tuple[Path, Path],
    start_fleet: Callable[..., FleetProc],
    enroll: Callable[..., Agent],
) -> None:
    """The embedded broker lives in the fleet process: SIGKILL the fleet while the device has part
    of the package; a new fleet process on the same data folder comes back on the same ports, the
    device reconnects, asks for its gaps and commits."""
    fleet = start_fleet()
    agent = enroll(fleet, "agent").start()
    tiny = tiny_package_factory("1.0.0", out=tmp_path / "tiny")
    pkg, pid, pad = padded_package(tiny, tmp_path / "v1", signing_key[0], "1.0.0", 8 * CHUNK)
    release(fleet, pkg)
    port = fleet.info["mqtt"]["port"]

    have, count = wait_mid_transfer(agent.state_dir, pad)
    fleet.service.kill()
    fleet = start_fleet()
    assert fleet.info["mqtt"]["port"] == port

    wait_device(fleet, agent.device_id, "COMMITTED", pid)
    assert agent.answer() == "1.0.0"
    assert blob_stats(fleet, pad)["partial_requests"] >= 1, "the device did not resume from its bitmap"
    print(f"fleet SIGKILLed with {have}/{count} chunks on the device")


def test_a_chunk_corrupted_on_the_wire_is_dropped_and_repaired(
    tmp_path: Path,
    tiny_package_factory: Callable[..., Path],
    signing_key: tuple[Path, Path],
    start_fleet: Callable[..., FleetProc],
    enroll: Callable[..., Agent],
) -> None:
    """A relay between the device and the (embedded) broker flips the last byte of the first
    broadcast chunk of the package's big blob: the device's per-chunk SHA-256 check drops it, the
    gap is repaired by unicast, and the blob is broadcast only once."""
    tiny = tiny_package_factory("1.0.0", out=tmp_path / "tiny")
    pkg, pid, pad = padded_package(tiny, tmp_path / "v1", signing_key[0], "1.0.0", 4 * CHUNK)
    fleet = start_fleet()
    mqtt = fleet.info["mqtt"]
    proxy = CorruptingProxy(str(mqtt["host"]), int(mqtt["port"]), topic_part=f"blobs/{pad}/chunks")
    try:
        agent = enroll(fleet, "agent", mqtt_port=proxy.port).start(SLMOPS_AGENT_LOG_LEVEL="DEBUG")
        release(fleet, pkg)
        wait_device(fleet, agent.device_id, "COMMITTED", pid)
    finally:
        proxy.close()
    assert len(proxy.flipped) == 1, proxy.flipped
    sent = blob_stats(fleet, pad)
    assert sent["repair_chunks"] >= 1 and sent["partial_requests"] >= 1, sent
    assert sent["broadcasts"] == 1 and sent["broadcast_bytes"] == sent["size"], f"the blob was sent whole again: {sent}"
    assert agent.service is not None
    assert "chunk dropped" in agent.service.log.read_text(), "the device did not log the bad chunk"
    assert agent.answer() == "1.0.0"


# --- the agent dies in each named state -------------------------------------------------------------

STATES = ("FETCHING", "VERIFYING", "STAGED", "TESTING", "COMMITTED")


def test_agent_sigkilled_in_each_update_state(
    tmp_path: Path,
    tiny_package_factory: Callable[..., Path],
    signing_key: tuple[Path, Path],
    start_fleet: Callable[..., FleetProc],
    enroll: Callable[..., Agent],
) -> None:
    """One fleet, one agent; for each state a new version is rolled out and the agent process dies
    by SIGKILL in that state:
    - FETCHING: killed from outside when its bitmap shows part of the package's big blob;
    - VERIFYING, STAGED, TESTING, COMMITTED (too short to hit from outside reliably): the agent runs
      with SLMOPS_AGENT_CRASH_AFTER_STATE, its documented fault-injection setting, and SIGKILLs
      itself right after the state's record is durable, before the state's side effect.
    Restarted without it, the agent answers with the old or the new version, never another or none
    past start-up, ends COMMITTED on the new one, and the fleet sees that."""
    fleet = start_fleet()
    agent = enroll(fleet, "agent").start()
    tiny = tiny_package_factory("1.0.0", out=tmp_path / "tiny")
    pkg, old_id, _ = padded_package(tiny, tmp_path / "v0", signing_key[0], "1.0.0", 1024)
    release(fleet, pkg)
    wait_device(fleet, agent.device_id, "COMMITTED", old_id)
    old = "1.0.0"

    for n, state in enumerate(STATES, start=1):
        new = f"1.{n}.0"
        pad = 6 * CHUNK if state == "FETCHING" else 1024  # only FETCHING needs a transfer to last
        pkg, new_id, pad_sha = padded_package(tiny, tmp_path / f"v{n}", signing_key[0], new, pad)
        if state == "FETCHING":
            release(fleet, pkg)
            wait_mid_transfer(agent.state_dir, pad_sha)
            agent.kill()
        else:
            agent.stop()
            agent.start(SLMOPS_AGENT_CRASH_AFTER_STATE=state)
            release(fleet, pkg)
            assert agent.service is not None
            agent.service.proc.wait(60)
            assert agent.service.proc.returncode == -signal.SIGKILL, f"{state}: {agent.service.proc.returncode}"
        assert agent.state() == state, f"killed in {state}, but state.json says {agent.state()}"

        agent.start()
        seen: set[str] = set()
        deadline = time.monotonic() + 30  # start-up: the model loads from the active slot
        while True:
            version = agent.answer()
            seen.add(version)
            if version == new:
                break
            assert version in ("", old), f"{state}: served {version!r} (old {old}, new {new})"
            assert version or time.monotonic() < deadline, f"{state}: nothing served 30 s after the restart"
            time.sleep(0.1)
        device = wait_device(fleet, agent.device_id, "COMMITTED", new_id)
        assert device["active_version"] == new and agent.state() == "COMMITTED", (state, device)
        if state == "FETCHING":
            assert blob_stats(fleet, pad_sha)["partial_requests"] >= 1, "the download did not resume from its bitmap"
        print(f"killed in {state}: served {sorted(seen - {''})} after the restart, then COMMITTED {new}")
        old = new
