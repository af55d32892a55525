"""The walking skeleton through real processes: a fleet (`slmops fleet serve`, embedded amqtt
broker or Mosquitto), two agents (`slmops agent run`), real gRPC, a tiny model built in the test."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from slmops_builder.keys import generate_key, load_private_key, public_path, sign
from slmops_cli.procs import ProcessFailed, run
from slmops_protos import Topics
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.manifests import SIGNED_MANIFEST_FILE, parse_signed_manifest
from slmops_testing.brokers import start_mosquitto
from slmops_testing.processes import AgentProc, FleetProc

pytestmark = pytest.mark.timeout(400)


def _file_blob(package: Path, name: str) -> str:
    files = json.loads((package / "manifest.json").read_text())["files"]
    return next(f["sha256"] for f in files if f["path"] == name)


def _journey(
    tmp_path: Path,
    tiny_package_factory: Callable[..., Path],
    signing_key: tuple[Path, Path],
    run_fleet: Callable[..., FleetProc],
    enroll_agent: Callable[..., AgentProc],
    *fleet_args: str,
) -> tuple[FleetProc, list[AgentProc]]:
    """v1 to two agents, an answer from each, then v2 that changes one file."""
    fleet = run_fleet(tmp_path / "fleet", [signing_key[1]], *fleet_args)
    agents = [enroll_agent(fleet, tmp_path / f"agent-{i}", f"agent-{i}") for i in (1, 2)]

    v1 = tiny_package_factory("1.0.0", out=tmp_path / "pkg-v1")
    v1_id = fleet.release(v1)
    fleet.wait_committed(v1_id)
    sent_v1 = fleet.blob_bytes_sent()
    blobs = {f["sha256"]: int(f["size"]) for f in json.loads((v1 / "manifest.json").read_text())["files"]}
    v1_bytes = sum(blobs.values())
    # One broadcast served both devices: the fleet sent each blob about once, not once per device.
    assert v1_bytes <= sum(sent_v1.values()) <= 1.2 * v1_bytes

    for agent in agents:
        answer = agent.ask("Hello there", "--max-new-tokens", "8")
        assert answer["model_version"] == "1.0.0"
        assert answer["package_id"] == v1_id
        assert answer["completion_tokens"] == 8 and answer["text"]
        assert answer["tokens_per_second"] > 0

    v2 = tiny_package_factory("1.1.0", search={"top_k": 5}, out=tmp_path / "pkg-v2")
    v2_id = fleet.release(v2)
    fleet.wait_committed(v2_id)
    sent_v2 = fleet.blob_bytes_sent()
    moved = {sha: n - sent_v1.get(sha, 0) for sha, n in sent_v2.items() if n != sent_v1.get(sha, 0)}
    changed = _file_blob(v2, "genai_config.json")
    assert set(moved) == {changed}, "only the changed file may travel"
    for agent in agents:
        assert agent.ask("Hello", "--max-new-tokens", "4")["model_version"] == "1.1.0"
    devices = fleet.devices()
    assert {d["active_version"] for d in devices.values()} == {"1.1.0"}
    return fleet, agents


def test_journey_on_the_embedded_broker(
    tmp_path: Path,
    tiny_package_factory: Callable[..., Path],
    signing_key: tuple[Path, Path],
    run_fleet: Callable[..., FleetProc],
    enroll_agent: Callable[..., AgentProc],
) -> None:
    fleet, agents = _journey(tmp_path, tiny_package_factory, signing_key, run_fleet, enroll_agent)

    # Telemetry reached the fleet's store.
    device = agents[0].device_id
    samples = fleet.api("GET", f"/v1/devices/{device}/telemetry", params={"limit": 5}).json()
    assert samples, "no telemetry stored"

    # A blob corrupted at rest in the fleet: the agents detect it, roll back, and keep serving 1.1.0.
    v3 = tiny_package_factory("1.2.0", search={"top_k": 7}, out=tmp_path / "pkg-v3")
    v3_id = fleet.cli("package", "upload", str(v3))["package_id"]
    blob = next((fleet.data_dir / "blobs").rglob(_file_blob(v3, "genai_config.json")))
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes().replace(b"top_k", b"top_q"))
    fleet.cli("rollout", "create", "--package", v3_id, "--target", "all")
    fleet.wait_devices(
        lambda d: d["state"] == "ROLLED_BACK" and d["target_package_id"] == v3_id, "both agents rolled back v3"
    )
    for d in fleet.devices().values():
        assert "fails its SHA-256 check" in d["reason"], d["reason"]
        assert d["active_version"] == "1.1.0"
    for agent in agents:
        assert agent.ask("Hi", "--max-new-tokens", "2")["model_version"] == "1.1.0"


def test_untrusted_signature_is_refused_by_the_device(
    tmp_path: Path,
    tiny_package_factory: Callable[..., Path],
    signing_key: tuple[Path, Path],
    run_fleet: Callable[..., FleetProc],
    enroll_agent: Callable[..., AgentProc],
) -> None:
    """The fleet learns a new signing key after the device enrolled: the device, which pinned its keys
    at enrollment, refuses a package signed only by the new key and keeps serving."""
    fleet = run_fleet(tmp_path / "fleet", [signing_key[1]])
    agent = enroll_agent(fleet, tmp_path / "agent", "agent")
    v1_id = fleet.release(tiny_package_factory("1.0.0", out=tmp_path / "v1"))
    fleet.wait_committed(v1_id)

    other = tmp_path / "keys" / "other.key"
    generate_key(other)
    fleet.service.stop()
    fleet = run_fleet(tmp_path / "fleet", [signing_key[1], public_path(other)])
    package = tiny_package_factory("2.0.0", out=tmp_path / "v2")
    signed = parse_signed_manifest((package / SIGNED_MANIFEST_FILE).read_bytes())
    (package / SIGNED_MANIFEST_FILE).write_bytes(sign(signed.manifest, load_private_key(other)).SerializeToString())

    v2_id = fleet.release(package)  # the fleet trusts the new key, so it accepts the package
    fleet.wait_devices(lambda d: d["state"] == "ROLLED_BACK" and d["target_package_id"] == v2_id, "a refusal")
    reason = fleet.devices()[agent.device_id]["reason"]
    assert "untrusted" in reason, reason
    assert agent.ask("Hi", "--max-new-tokens", "2")["model_version"] == "1.0.0"


def test_enrollment_tokens_are_one_time_and_expire(
    tmp_path: Path, signing_key: tuple[Path, Path], run_fleet: Callable[..., FleetProc]
) -> None:
    fleet = run_fleet(tmp_path / "fleet", [signing_key[1]])
    url = fleet.info["url"]

    def enroll(token: str, name: str) -> None:
        run(["agent", "enroll", "--fleet", url, "--token", token, "--state-dir", str(tmp_path / name)])

    with pytest.raises(ProcessFailed, match="unknown"):
        enroll("not-a-token", "wrong")
    token = fleet.cli("token", "create")["token"]
    enroll(token, "first")
    with pytest.raises(ProcessFailed, match="already used"):
        enroll(token, "reused")
    short = fleet.cli("token", "create", "--ttl", "1s")["token"]
    time.sleep(1.5)
    with pytest.raises(ProcessFailed, match="expired"):
        enroll(short, "late")
    assert len(fleet.devices()) == 1, "a refused token created a device"
    for name in ("wrong", "reused", "late"):
        assert not (tmp_path / name / "credentials.json").exists()


def _mqtt_client(creds: dict[str, object], client_id: str) -> mqtt.Client:
    m = creds["mqtt"]
    assert isinstance(m, dict)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(m["username"], m["password"])
    return client


def _check_isolation(fleet: FleetProc, a: AgentProc, b: AgentProc) -> None:
    """Device A's credentials can neither read B's desired state nor speak for B."""
    topics = Topics(a.credentials["mqtt"]["topic_root"])
    received: list[str] = []
    client = _mqtt_client(a.credentials, a.device_id)  # brokers pin the client id to the device id

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        received.append(msg.topic)

    client.on_message = on_message
    a.service.stop()  # the probe uses A's identity; keep the real agent from fighting over it
    host, port = a.credentials["mqtt"]["host"], a.credentials["mqtt"]["port"]
    client.connect(host, port)
    client.loop_start()
    try:
        client.subscribe(topics.desired(a.device_id), qos=1)  # positive control: its own retained state
        client.subscribe(topics.desired(b.device_id), qos=1)
        forged = fleet_pb2.ReportedState(device_id=b.device_id, state=fleet_pb2.ROLLED_BACK, reason="forged by A")
        client.publish(topics.reported(b.device_id), forged.SerializeToString(), qos=1)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and topics.desired(a.device_id) not in received:
            time.sleep(0.05)
        time.sleep(1)
    finally:
        client.loop_stop()
        client.disconnect()
    assert topics.desired(a.device_id) in received, "the probe did not work at all"
    assert topics.desired(b.device_id) not in received, "device A read device B's desired state"
    assert fleet.devices()[b.device_id]["reason"] != "forged by A", "device A spoke for device B"


def test_devices_are_isolated_on_the_embedded_broker(
    tmp_path: Path,
    tiny_package_factory: Callable[..., Path],
    signing_key: tuple[Path, Path],
    run_fleet: Callable[..., FleetProc],
    enroll_agent: Callable[..., AgentProc],
) -> None:
    fleet = run_fleet(tmp_path / "fleet", [signing_key[1]])
    a, b = (enroll_agent(fleet, tmp_path / n, n) for n in ("a", "b"))
    fleet.wait_committed(fleet.release(tiny_package_factory("1.0.0", out=tmp_path / "v1")))
    _check_isolation(fleet, a, b)


@pytest.mark.mosquitto
def test_journey_on_mosquitto(
    tmp_path: Path,
    tiny_package_factory: Callable[..., Path],
    signing_key: tuple[Path, Path],
    run_fleet: Callable[..., FleetProc],
    enroll_agent: Callable[..., AgentProc],
) -> None:
    """The same flow through Mosquitto, the fleet provisioning each device (dynamic security)."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        fleet, agents = _journey(
            tmp_path, tiny_package_factory, signing_key, run_fleet, enroll_agent, "--broker-url", broker.url
        )
        assert fleet.info["mqtt"]["port"] == broker.port and not fleet.info["mqtt"]["embedded"]
        _check_isolation(fleet, agents[0], agents[1])
    finally:
        broker.stop()


def test_agents_converge_after_the_fleet_and_its_broker_are_killed(
    tmp_path: Path,
    tiny_package_factory: Callable[..., Path],
    signing_key: tuple[Path, Path],
    run_fleet: Callable[..., FleetProc],
    enroll_agent: Callable[..., AgentProc],
) -> None:
    """SIGKILL the fleet (and with it the embedded broker) after v1; a new fleet process on the same
    data folder comes back on the same ports, the agents reconnect by themselves and take v2."""
    fleet = run_fleet(tmp_path / "fleet", [signing_key[1]])
    agent = enroll_agent(fleet, tmp_path / "agent", "agent")
    fleet.wait_committed(fleet.release(tiny_package_factory("1.0.0", out=tmp_path / "v1")))
    port = fleet.info["mqtt"]["port"]

    fleet.service.kill()
    assert agent.ask("Hi", "--max-new-tokens", "2")["model_version"] == "1.0.0", "the agent serves on its own"
    fleet = run_fleet(tmp_path / "fleet", [signing_key[1]])
    assert fleet.info["mqtt"]["port"] == port
    v2_id = fleet.release(tiny_package_factory("2.0.0", search={"top_k": 3}, out=tmp_path / "v2"))
    fleet.wait_committed(v2_id, timeout=180)
    assert agent.ask("Hi", "--max-new-tokens", "2")["model_version"] == "2.0.0"
