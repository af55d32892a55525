"""Across hosts: the fleet in one network namespace, two agents in two others, joined by a bridge
the test makes (10.213.0.0/24, nothing routed anywhere else). Every link is TLS: the agents enroll
over HTTPS with the fleet's CA pinned, take a rollout over MQTT/TLS (the embedded broker, then
Mosquitto with a CA the test makes with openssl) and answer over gRPC. A client with the wrong
CA, and plaintext clients, are refused.

Needs root for the namespaces; skips with the kernel's reason where they are refused.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest

from slmops_cli.procs import ProcessFailed, Service, run, wait_until
from slmops_testing.brokers import ServerCerts, openssl_ca, start_mosquitto
from slmops_testing.netns import HostNetwork, Netns, NetnsUnavailable
from slmops_testing.processes import AGENT_ENV, AgentProc, FleetProc, healthy, read_json

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def network() -> Iterator[HostNetwork]:
    try:
        net = HostNetwork.create(2)
    except NetnsUnavailable as exc:
        pytest.skip(f"network namespaces are refused here: {exc}")
    try:
        yield net
    finally:
        net.remove()


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in reversed(started):
        service.stop()


def _fleet(tmp_path: Path, hub: Netns, key: Path, services: list[Service], *extra: str) -> FleetProc:
    data_dir = tmp_path / "fleet"
    service = Service(
        "fleet",
        [
            "fleet",
            "serve",
            "--data-dir",
            str(data_dir),
            "--host",
            hub.address,
            "--port",
            "0",
            "--trust-key",
            str(key),
            *extra,
        ],
        tmp_path / "logs" / "fleet.log",
        prefix=hub.prefix,
    )
    services.append(service)
    info = service.wait_for(lambda: read_json(data_dir / "fleet.json"), timeout=60, what="fleet.json")
    assert info["url"].startswith(f"https://{hub.address}:"), info["url"]
    service.wait_for(lambda: hub.call(healthy, info["url"], info["ca_file"]), timeout=60, what="a healthy API")
    return FleetProc(service, data_dir, info, prefix=tuple(hub.prefix))


def _agent(tmp_path: Path, fleet: FleetProc, ns: Netns, name: str, key: Path, services: list[Service]) -> AgentProc:
    state_dir = tmp_path / name
    token = fleet.cli("token", "create")["token"]
    # the fleet's CA given out of band: the file to the first agent, its fingerprint to the second
    pin = ["--ca", fleet.info["ca_file"]] if name.endswith("0") else ["--ca-fingerprint", fleet.info["ca_fingerprint"]]
    enroll = ["agent", "enroll", "--fleet", fleet.info["url"], "--token", token, "--state-dir", str(state_dir)]
    run([*enroll, "--name", name, *pin, "--trust-key", str(key)], prefix=ns.prefix)
    credentials = json.loads((state_dir / "credentials.json").read_text())
    service = Service(
        name,
        ["agent", "run", "--state-dir", str(state_dir), "--grpc-port", "0"],
        tmp_path / "logs" / f"{name}.log",
        env=AGENT_ENV,
        prefix=ns.prefix,
    )
    services.append(service)
    service.wait_for((state_dir / "grpc.addr").exists, timeout=60, what="its gRPC address")
    agent = AgentProc(service, state_dir, credentials["device_id"], credentials, prefix=tuple(ns.prefix))
    wait_until(lambda: fleet.devices().get(agent.device_id, {}).get("last_seen"), timeout=60, what=f"{name} connected")
    return agent


def _rollout_across_hosts(
    tmp_path: Path,
    network: HostNetwork,
    fleet: FleetProc,
    signing_key: tuple[Path, Path],
    tiny_package_factory: Callable[..., Path],
    services: list[Service],
) -> list[AgentProc]:
    agents = [_agent(tmp_path, fleet, ns, f"agent-{i}", signing_key[1], services) for i, ns in enumerate(network.hosts)]
    for agent in agents:
        m = agent.credentials["mqtt"]
        assert m["tls"] and m["ca_pem"] and agent.credentials["fleet_ca_pem"]
        assert agent.credentials["signing_keys"] == [signing_key[1].read_text().strip()]
    package_id = fleet.release(tiny_package_factory("1.0.0", out=tmp_path / "pkg"))
    fleet.wait_committed(package_id)
    for agent in agents:
        target = (agent.state_dir / "grpc.addr").read_text().strip()  # TCP inside the agent's host
        answer = agent.ask("Hello there", "--max-new-tokens", "4", "--target", target)
        assert answer["package_id"] == package_id and answer["completion_tokens"] == 4
    return agents


# --- what a hostile or misconfigured client gets -------------------------------------------------------


def _tls_handshake(host: str, port: int, ca: str) -> str:
    """'ok' when a TLS handshake verified with `ca` (name included) succeeds, else the error."""
    ctx = ssl.create_default_context(cafile=ca)
    try:
        with socket.create_connection((host, port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=host):
            return "ok"
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _mqtt_connect(host: str, port: int, creds: dict[str, str], ca: str | None) -> str:
    """A paho CONNECT with the device's real credentials, over TLS verified with `ca` or plaintext."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv311)
    client.username_pw_set(creds["username"], creds["password"])
    if ca is not None:
        client.tls_set_context(ssl.create_default_context(cafile=ca))
    acked: list[str] = []
    client.on_connect = lambda *a: acked.append(str(a[3]))
    try:
        client.connect(host, port, keepalive=5)
        for _ in range(50):  # up to 5 s for a CONNACK
            if client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS or acked:
                break
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.disconnect()
    return f"CONNACK {acked[0]}" if acked else "no CONNACK"


def _plain_http(url: str) -> str:
    try:
        return f"HTTP {httpx.get(url.replace('https://', 'http://') + '/healthz', timeout=5).status_code}"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"


def _https(url: str, ca: str) -> str:
    try:
        return (
            f"HTTP {httpx.get(url + '/healthz', timeout=5, verify=ssl.create_default_context(cafile=ca)).status_code}"
        )
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"


def _refusals(tmp_path: Path, network: HostNetwork, fleet: FleetProc, agent: AgentProc, broker_ca: str) -> None:
    outside = network.hosts[0]
    m = agent.credentials["mqtt"]
    host, port = m["host"], int(m["port"])
    wrong = openssl_ca(tmp_path / "wrong", network.hub.address, name="wrong").ca

    # positive controls: the right CA opens both links
    assert outside.call(_tls_handshake, host, port, broker_ca) == "ok"
    assert outside.call(_https, fleet.info["url"], fleet.info["ca_file"]) == "HTTP 200"
    # MQTT with the wrong CA: the handshake fails before a byte of MQTT
    got = outside.call(_mqtt_connect, host, port, m, str(wrong))
    assert "CERTIFICATE_VERIFY_FAILED" in got, got
    # plaintext MQTT to the TLS port: no CONNACK, ever
    got = outside.call(_mqtt_connect, host, port, m, None)
    assert not got.startswith("CONNACK"), got
    # HTTPS with the wrong CA, plaintext HTTP to the HTTPS port
    got = outside.call(_https, fleet.info["url"], str(wrong))
    assert "CERTIFICATE_VERIFY_FAILED" in got, got
    got = outside.call(_plain_http, fleet.info["url"])
    assert got != "HTTP 200", got
    # the agent: the wrong CA, and plaintext http:// off loopback
    token = fleet.cli("token", "create")["token"]
    enroll = ["agent", "enroll", "--token", token, "--state-dir", str(tmp_path / "refused")]
    with pytest.raises(ProcessFailed, match="is not verified by the CA in"):
        run([*enroll, "--fleet", fleet.info["url"], "--ca", str(wrong)], prefix=outside.prefix)
    with pytest.raises(ProcessFailed, match="not the sha256:00000000"):
        run([*enroll, "--fleet", fleet.info["url"], "--ca-fingerprint", "sha256:" + "0" * 64], prefix=outside.prefix)
    with pytest.raises(ProcessFailed, match=r"refusing plaintext http:// to 10\.213\.0\.1"):
        run([*enroll, "--fleet", fleet.info["url"].replace("https://", "http://")], prefix=outside.prefix)
    assert not (tmp_path / "refused" / "credentials.json").exists()
    # the token the refused attempts carried was never spent
    run([*enroll, "--fleet", fleet.info["url"], "--ca", fleet.info["ca_file"]], prefix=outside.prefix)


# --- the tests -----------------------------------------------------------------------------------------


def test_across_hosts_on_the_embedded_broker(
    tmp_path: Path,
    network: HostNetwork,
    services: list[Service],
    signing_key: tuple[Path, Path],
    tiny_package_factory: Callable[..., Path],
) -> None:
    hub = network.hub
    # The broker on every interface of the fleet's host: devices are told the host they enrolled at.
    fleet = _fleet(tmp_path, hub, signing_key[1], services, "--broker-host", "0.0.0.0", "--broker-port", "0")
    assert fleet.info["mqtt"]["host"] == "" and fleet.info["mqtt"]["tls"]
    agents = _rollout_across_hosts(tmp_path, network, fleet, signing_key, tiny_package_factory, services)
    assert {a.credentials["mqtt"]["host"] for a in agents} == {hub.address}
    _refusals(tmp_path, network, fleet, agents[0], fleet.info["ca_file"])


@pytest.mark.mosquitto
def test_across_hosts_on_mosquitto_with_tls(
    tmp_path: Path,
    network: HostNetwork,
    services: list[Service],
    signing_key: tuple[Path, Path],
    tiny_package_factory: Callable[..., Path],
) -> None:
    hub = network.hub
    certs: ServerCerts = openssl_ca(tmp_path / "mosquitto-tls", hub.address, name="mosquitto")
    broker = start_mosquitto(tmp_path / "mosquitto", host=hub.address, tls=certs, netns=hub)
    try:
        fleet = _fleet(
            tmp_path, hub, signing_key[1], services, "--broker-url", broker.url, "--broker-ca", str(certs.ca)
        )
        assert not fleet.info["mqtt"]["embedded"] and fleet.info["mqtt"]["tls"]
        agents = _rollout_across_hosts(tmp_path, network, fleet, signing_key, tiny_package_factory, services)
        assert agents[0].credentials["mqtt"]["ca_pem"] == certs.ca.read_text()
        _refusals(tmp_path, network, fleet, agents[0], str(certs.ca))
    finally:
        broker.stop()


def test_a_plaintext_fleet_off_loopback_needs_insecure(
    tmp_path: Path, network: HostNetwork, services: list[Service]
) -> None:
    hub = network.hub
    args = ["fleet", "serve", "--data-dir", str(tmp_path / "fleet"), "--host", hub.address, "--no-tls"]
    with pytest.raises(ProcessFailed, match=r"plaintext listener on 10\.213\.0\.1.*--insecure"):
        run(args, prefix=hub.prefix, timeout=60)
    assert not (tmp_path / "fleet" / "fleet.json").exists()

    # said explicitly, it runs, and warns
    service = Service("fleet", [*args, "--insecure"], tmp_path / "fleet.log", prefix=hub.prefix)
    services.append(service)
    info = service.wait_for(lambda: read_json(tmp_path / "fleet" / "fleet.json"), timeout=60, what="fleet.json")
    assert info["url"].startswith(f"http://{hub.address}:") and info["ca_file"] is None
    assert network.hosts[0].call(healthy, info["url"])
    assert "--insecure: plaintext listener off loopback on 10.213.0.1" in service.log.read_text()
