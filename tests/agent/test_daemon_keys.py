"""Key statements reaching the whole agent over a real broker (the machine's Mosquitto, a paho client
playing the fleet on the retained keys topic): a forged statement, one signed by a retired key and a
replayed older one are refused and change nothing; a good one rotates the keys, so a package signed
by the retired key is refused (ROLLED_BACK, reported) and one signed by the new key installs; the
ring survives a restart of the agent."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import AgentThread, FleetSim, agent_settings, desired_for, save_credentials
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops_builder.keys import generate_key, key_statement, load_private_key
from slmops_cli.procs import wait_until
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.manifests import public_key_bytes
from slmops_protos.package.v1 import manifest_pb2
from slmops_testing.packages import repackage


def _chain(*statements: manifest_pb2.SignedKeyStatement) -> bytes:
    return fleet_pb2.KeyStatements(statements=list(statements)).SerializeToString()


@pytest.fixture
def keys_topic(fleet_sim: FleetSim) -> Iterator[str]:
    yield fleet_sim.topics.keys
    fleet_sim.publish_raw(fleet_sim.topics.keys, b"", retain=True)  # clear the retained message


def test_key_statements_over_mqtt(
    short_dir: Path,
    topic_root: str,
    trusted_hex: str,
    signing_key: tuple[Path, Path],
    fleet_sim: FleetSim,
    keys_topic: str,
    pkg_v1: Path,
    pkg_v2: Path,
) -> None:
    device_id = f"dev-{uuid.uuid4().hex[:10]}"
    state = short_dir / "state"
    save_credentials(state, device_id, topic_root, trusted_hex)
    old = load_private_key(signing_key[0])
    new_path = short_dir / "new.key"
    new = generate_key(new_path)
    stranger = Ed25519PrivateKey.generate()
    s1 = key_statement(1, [old], add=[new.public_key()], retire=[old.public_key()])
    forged = key_statement(1, [stranger], add=[stranger.public_key()], retire=[old.public_key()])
    by_retired = key_statement(2, [old], add=[stranger.public_key()])
    by_old_v2 = repackage(pkg_v1, short_dir / "old-v2", signing_key[0], version="2.0.0")
    by_new_v2 = repackage(pkg_v2, short_dir / "new-v2", new_path, version="2.0.0")

    agent = AgentThread(agent_settings(state, telemetry_interval_s=0.3))
    try:
        fleet_sim.add_package(pkg_v1)
        fleet_sim.set_desired(desired_for(pkg_v1, 1, device_id))
        fleet_sim.wait_state(1, "COMMITTED")
        keys = agent.agent.keys

        fleet_sim.publish_raw(keys_topic, _chain(forged), retain=True)
        wait_until(lambda: keys.refused >= 1, timeout=10, what="the forged statement refused")
        assert "untrusted" in keys.last_refusal and keys.ring.sequence == 0

        fleet_sim.publish_raw(keys_topic, _chain(s1), retain=True)
        wait_until(lambda: keys.ring.sequence == 1, timeout=10, what="the statement applied")
        assert keys.ring.trusted == (public_key_bytes(new.public_key()).hex(),)

        fleet_sim.publish_raw(keys_topic, _chain(s1, by_retired), retain=True)
        wait_until(lambda: keys.refused >= 2, timeout=10, what="the retired key's statement refused")
        assert "retired key" in keys.last_refusal and keys.ring.sequence == 1
        older = key_statement(1, [new], add=[stranger.public_key()])  # a "sequence 1" again, now by the new key
        seen = keys.messages
        fleet_sim.publish_raw(keys_topic, _chain(older), retain=True)
        wait_until(lambda: keys.messages > seen, timeout=10, what="the replayed sequence handled")
        assert keys.ring.sequence == 1 and len(keys.ring.trusted) == 1

        fleet_sim.add_package(by_old_v2)
        fleet_sim.set_desired(desired_for(by_old_v2, 2, device_id))
        refused = fleet_sim.wait_state(2, "ROLLED_BACK")
        assert "signed by a retired key" in refused.reason and refused.active_version == "1.0.0"
        fleet_sim.publish_raw(keys_topic, _chain(s1), retain=True)
    finally:
        agent.stop()

    # restart: the ring comes back from the state folder, the retained chain changes nothing
    agent = AgentThread(agent_settings(state, telemetry_interval_s=0.3))
    try:
        assert agent.agent.keys.ring.sequence == 1
        fleet_sim.add_package(by_new_v2)
        fleet_sim.set_desired(desired_for(by_new_v2, 3, device_id))
        done = fleet_sim.wait_state(3, "COMMITTED")
        assert done.active_version == "2.0.0"
        assert agent.agent.keys.refused == 0
    finally:
        agent.stop()
