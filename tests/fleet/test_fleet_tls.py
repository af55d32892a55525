"""TLS: the private CA and its server certificate, the settings that demand TLS off loopback, and a
fleet on loopback with TLS on: the admin CLI's client, an agent's enrollment and MQTT link."""

from __future__ import annotations

import json
import socket
import ssl
import stat
import threading
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from pydantic import ValidationError
from typer.testing import CliRunner

from slmops_agent.enroll import enroll
from slmops_agent.errors import EnrollError
from slmops_agent.mqtt import AgentMqtt
from slmops_fleet.cli import app as fleet_cli
from slmops_fleet.client import FleetClient, FleetClientError, resolve_target
from slmops_fleet.embedded_broker import EmbeddedBroker
from slmops_fleet.errors import StartupError
from slmops_fleet.process import FleetThread
from slmops_fleet.settings import BrokerAddress, FleetSettings
from slmops_fleet.tls import client_context, ensure_private_ca, operator_files, server_names
from slmops_protos.links import certificate_fingerprint, is_loopback
from slmops_testing.brokers import openssl_ca


def _sans(cert: Path) -> list[str]:
    san = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    return sorted(
        [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] + san.value.get_values_for_type(x509.DNSName)
    )


def test_private_ca_is_made_once_and_the_server_certificate_follows_the_hosts(tmp_path: Path) -> None:
    files = ensure_private_ca(tmp_path / "tls", ["10.1.2.3", "0.0.0.0", "fleet.example"])
    for key in (files.key, tmp_path / "tls" / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert _sans(files.cert) == ["10.1.2.3", "127.0.0.1", "fleet.example", "localhost"]  # no wildcard
    ca, cert = files.ca.read_bytes(), files.cert.read_bytes()
    again = ensure_private_ca(tmp_path / "tls", ["fleet.example", "10.1.2.3"])
    assert again.ca.read_bytes() == ca and again.cert.read_bytes() == cert, "same hosts: nothing new"
    moved = ensure_private_ca(tmp_path / "tls", ["10.9.9.9"])
    assert moved.ca.read_bytes() == ca, "the CA devices pinned stays"
    assert _sans(moved.cert) == ["10.9.9.9", "127.0.0.1", "localhost"]
    assert files.fingerprint == certificate_fingerprint(ca.decode())
    assert files.fingerprint.startswith("sha256:") and len(files.fingerprint) == 7 + 64


def test_a_handshake_verifies_the_name_and_the_ca(tmp_path: Path) -> None:
    files = ensure_private_ca(tmp_path / "tls", [])
    other = ensure_private_ca(tmp_path / "other", [])
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    ctx = files.server_context()

    def serve() -> None:
        for _ in range(3):
            conn, _ = server.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hi")
            except (ssl.SSLError, OSError):
                pass

    threading.Thread(target=serve, daemon=True).start()

    def connect(client: ssl.SSLContext, name: str) -> bytes:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname=name) as tls,
        ):
            return tls.recv(2)

    assert connect(client_context(files.ca), "127.0.0.1") == b"hi"
    with pytest.raises(ssl.SSLCertVerificationError, match=r"IP address mismatch|doesn.t match"):
        connect(client_context(files.ca), "10.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(client_context(other.ca), "127.0.0.1")
    server.close()


def test_operator_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="TLS file not found"):
        operator_files(tmp_path / "cert.pem", tmp_path / "key.pem", None)
    assert server_names(["::", "", "Fleet.Local"]) == ["127.0.0.1", "fleet.local", "localhost"]


def test_plaintext_off_loopback_needs_insecure(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"plaintext listener on 10\.0\.0\.5.*--insecure"):
        FleetSettings(data_dir=tmp_path, http_host="10.0.0.5", tls=False)
    with pytest.raises(ValidationError, match=r"plaintext listener on 0\.0\.0\.0"):
        FleetSettings(data_dir=tmp_path, broker_host="0.0.0.0", tls=False)
    assert not FleetSettings(data_dir=tmp_path, http_host="10.0.0.5", tls=False, insecure=True).tls_enabled
    assert FleetSettings(data_dir=tmp_path, http_host="10.0.0.5").tls_enabled, "off loopback: TLS by default"
    assert not FleetSettings(data_dir=tmp_path).tls_enabled, "loopback only: plaintext by default"
    with pytest.raises(ValidationError, match="not mqtts"):
        FleetSettings(data_dir=tmp_path, broker_url="mqtt://u:p@broker.example:1883")
    with pytest.raises(ValidationError, match="not mqtts"):
        FleetSettings(
            data_dir=tmp_path, broker_url="mqtts://u:p@broker.example", broker_admin_url="mqtt://a:b@broker.example"
        )
    FleetSettings(data_dir=tmp_path, broker_url="mqtts://u:p@broker.example")
    FleetSettings(data_dir=tmp_path, broker_url="mqtt://u:p@broker.example", insecure=True)
    with pytest.raises(ValidationError, match="must be https"):
        FleetSettings(data_dir=tmp_path, http_host="10.0.0.5", public_url="http://10.0.0.5:80")
    with pytest.raises(ValidationError, match="go together"):
        FleetSettings(data_dir=tmp_path, tls_cert=tmp_path / "c.pem")
    a = BrokerAddress.parse("mqtts://u:p@broker.example")
    assert (a.tls, a.port) == (True, 8883)
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("fleet.local")


def test_agent_refuses_plaintext_off_loopback_and_unpinned_keys(tmp_path: Path) -> None:
    with pytest.raises(EnrollError, match=r"refusing plaintext http:// to 10\.0\.0\.5"):
        enroll("http://10.0.0.5:8080", "t", tmp_path)
    with pytest.raises(EnrollError, match="not a hex Ed25519 public key"):
        enroll("https://127.0.0.1:1", "t", tmp_path, trust_keys=["zz"])
    with pytest.raises(EnrollError, match="cannot read the CA certificate"):
        enroll("https://127.0.0.1:1", "t", tmp_path, ca_file=tmp_path / "missing.pem")


def test_a_tls_fleet_on_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTPS and the embedded broker over TLS: the admin client trusts the CA through fleet.json, an
    agent enrolls with the CA pinned, keeps the broker's CA and connects over MQTT/TLS."""
    monkeypatch.delenv("SLMOPS_FLEET_URL", raising=False)
    monkeypatch.delenv("SLMOPS_FLEET_TOKEN", raising=False)
    monkeypatch.setenv("SLMOPS_FLEET_CA", "")  # restored after the test: `slmops fleet --ca` sets it
    monkeypatch.setattr(EmbeddedBroker, "CONNECT_TIMEOUT_S", 1.0)
    settings = FleetSettings(data_dir=tmp_path / "fleet", tls=True)
    with FleetThread(settings) as fleet:
        # a client that opens the TLS port and never says hello is dropped when the handshake times out
        assert fleet.info is not None
        with socket.create_connection(("127.0.0.1", fleet.info.mqtt.port), timeout=10) as silent:
            assert silent.recv(1) == b""
        assert fleet.url.startswith("https://127.0.0.1:")
        info = json.loads(settings.fleet_json.read_text())
        assert info["ca_file"] == str(settings.tls_dir / "ca.pem") and info["mqtt"]["tls"]
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(fleet.url + "/healthz")
        with (
            FleetClient(fleet.url, fleet.admin_token) as bare,
            pytest.raises(FleetClientError, match="SLMOPS_FLEET_CA"),
        ):
            bare.request("POST", "/v1/tokens", json={})
        token = client_token(settings)

        with pytest.raises(EnrollError, match="not verified by the system's CAs"):
            enroll(fleet.url, token, tmp_path / "unpinned")
        pem = httpx.get(fleet.url + "/v1/ca.pem", verify=False).text  # public, no token
        assert pem == (settings.tls_dir / "ca.pem").read_text()
        with pytest.raises(EnrollError, match="refusing to enroll"):
            enroll(fleet.url, token, tmp_path / "wrong-pin", ca_fingerprint="sha256:" + "ab" * 32)
        by_fingerprint = enroll(fleet.url, token, tmp_path / "pinned", ca_fingerprint=info["ca_fingerprint"])
        assert by_fingerprint.fleet_ca_pem == pem
        token = client_token(settings)
        creds = enroll(fleet.url, token, tmp_path / "agent", ca_file=Path(info["ca_file"]))
        assert creds.mqtt.tls and creds.mqtt.ca_pem == (settings.tls_dir / "ca.pem").read_text()
        assert creds.fleet_ca_pem == creds.mqtt.ca_pem
        # the admin CLI: `slmops fleet --ca FILE` verifies with that CA, and a wrong one is a clear error
        cli = ["token", "create", "--json", "--fleet", fleet.url, "--token", fleet.admin_token]
        wrong = ensure_private_ca(tmp_path / "wrong", []).ca
        result = CliRunner().invoke(fleet_cli, ["--ca", str(wrong), *cli])
        assert result.exit_code == 1 and "not verified by the CA given" in result.output, result.output
        result = CliRunner().invoke(fleet_cli, ["--ca", info["ca_file"], *cli])
        assert result.exit_code == 0 and json.loads(result.output)["token"], result.output
        link = AgentMqtt(creds, on_desired=print, on_chunk=print, wants_blob=lambda _: False, connect_jitter_s=0)
        link.start()
        try:
            assert link.wait_connected(15), "the agent did not connect over MQTT/TLS"
        finally:
            link.stop()


def client_token(settings: FleetSettings) -> str:
    with FleetClient.from_target(resolve_target(None, None, settings.data_dir)) as client:
        return str(client.request("POST", "/v1/tokens", json={})["token"])


def test_the_operators_certificate_is_served(tmp_path: Path) -> None:
    """--tls-cert/--tls-key/--tls-ca: the fleet serves them (HTTPS and MQTT) and hands out that CA."""
    certs = openssl_ca(tmp_path / "pki", "127.0.0.1", name="operator")
    settings = FleetSettings(data_dir=tmp_path / "fleet", tls_cert=certs.cert, tls_key=certs.key, tls_ca=certs.ca)
    assert settings.tls_enabled, "a certificate turns TLS on"
    with FleetThread(settings) as fleet:
        verify = ssl.create_default_context(cafile=str(certs.ca))
        assert httpx.get(fleet.url + "/healthz", verify=verify).status_code == 200
        assert fleet.info is not None and fleet.info.mqtt.ca_pem == certs.ca.read_text()
        with (
            socket.create_connection(("127.0.0.1", fleet.info.mqtt.port), timeout=5) as raw,
            verify.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    assert not (settings.tls_dir / "ca.key").exists(), "no private CA when the operator brings one"
