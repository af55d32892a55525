"""Enrollment against an HTTP endpoint that speaks the contract's /v1/enroll JSON, and the inventory."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from slmops_agent.cli import app
from slmops_agent.codec import inventory_to_pb
from slmops_agent.credentials import Credentials, CredentialsError
from slmops_agent.enroll import enroll
from slmops_agent.errors import EnrollError
from slmops_agent.inventory import collect_inventory, cpu_features
from slmops_testing.brokers import free_port

KEY = "0f1677178bcf02f76cfbf8fffa674db25036871ec1f65c6c7500f80480af6bd0"


class EnrollEndpoint:
    """A real HTTP server answering POST /v1/enroll as the contract says (tokens: 'good' once)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.used: set[str] = set()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.bodies.append(body)
                token = body.get("token")
                if self.path != "/v1/enroll":
                    self._send(404, {"detail": "Not Found"})
                elif token == "malformed":
                    self._send(200, {"device_id": "dev-1"})
                elif token in endpoint.used:
                    self._send(401, {"detail": "enrollment token is already used"})
                elif not str(token).startswith("good"):
                    self._send(401, {"detail": "enrollment token is unknown"})
                else:
                    endpoint.used.add(token)
                    self._send(
                        200,
                        {
                            "device_id": f"dev-{len(endpoint.used)}",
                            "fleet_url": f"http://127.0.0.1:{self.server.server_address[1]}",
                            "mqtt": {
                                "host": "127.0.0.1",
                                "port": 1883,
                                "username": f"dev-{len(endpoint.used)}",
                                "password": "s3cret",
                                "topic_root": "slmops/v1",
                                "tls": False,
                            },
                            "signing_keys": [KEY],
                        },
                    )

            def _send(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def endpoint() -> Iterator[EnrollEndpoint]:
    e = EnrollEndpoint()
    try:
        yield e
    finally:
        e.server.shutdown()


def test_enroll_stores_credentials_and_sends_the_inventory(endpoint: EnrollEndpoint, tmp_path: Path) -> None:
    creds = enroll(endpoint.url, "good-1", tmp_path / "st", name="kiosk-7")
    assert creds.device_id == "dev-1" and creds.mqtt.password == "s3cret" and creds.signing_keys == [KEY]
    path = tmp_path / "st" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "st" / "device_key.pem").stat().st_mode) == 0o600
    assert Credentials.load(path) == creds
    body = endpoint.bodies[-1]
    assert body["token"] == "good-1" and body["name"] == "kiosk-7" and len(body["public_key"]) == 64
    inv = body["inventory"]
    assert set(inv) == {
        "os",
        "arch",
        "cpu_count",
        "memory_bytes",
        "disk_free_bytes",
        "providers",
        "cpu_features",
        "agent_version",
    }
    assert inv["cpu_count"] >= 1 and "CPUExecutionProvider" in inv["providers"] and inv["memory_bytes"] > 0


def test_already_enrolled_is_refused_unless_forced(endpoint: EnrollEndpoint, tmp_path: Path) -> None:
    enroll(endpoint.url, "good-1", tmp_path)
    key_before = (tmp_path / "device_key.pem").read_bytes()
    with pytest.raises(EnrollError, match=r"already enrolled as dev-1.*--force"):
        enroll(endpoint.url, "good-2", tmp_path)
    with pytest.raises(EnrollError, match="already used"):
        enroll(endpoint.url, "good-1", tmp_path, force=True)
    assert (tmp_path / "device_key.pem").read_bytes() == key_before  # refused: the key is unchanged
    creds = enroll(endpoint.url, "good-2", tmp_path, force=True)
    assert creds.device_id == "dev-2" and (tmp_path / "device_key.pem").read_bytes() != key_before


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("nope", "enrollment refused: enrollment token is unknown"),
        ("malformed", "malformed enrollment response"),
    ],
)
def test_refusals_are_one_line(endpoint: EnrollEndpoint, tmp_path: Path, token: str, message: str) -> None:
    with pytest.raises(EnrollError, match=message):
        enroll(endpoint.url, token, tmp_path)
    assert not (tmp_path / "credentials.json").exists()


def test_unreachable_fleet(tmp_path: Path) -> None:
    with pytest.raises(EnrollError, match=r"cannot reach the fleet at http://127\.0\.0\.1:\d+"):
        enroll(f"http://127.0.0.1:{free_port()}", "good", tmp_path, timeout_s=3)
    with pytest.raises(EnrollError, match="must look like https:"):
        enroll("fleet.local", "good", tmp_path)


def test_cli_enroll(endpoint: EnrollEndpoint, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["enroll", "--fleet", endpoint.url, "--token", "good-9", "--state-dir", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "enrolled as dev-1" in ok.output
    again = runner.invoke(
        app, ["enroll", "--fleet", endpoint.url, "--token", "good-9", "--state-dir", str(tmp_path), "--force"]
    )
    assert again.exit_code == 1
    assert again.output.strip().splitlines() == ["error: enrollment refused: enrollment token is already used"]
    assert Credentials.load(tmp_path / "credentials.json").device_id == "dev-1"  # a refusal loses nothing


def test_cpu_features_from_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni\n")
    assert cpu_features(x86) == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni"]
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm sve\n")
    assert cpu_features(arm) == ["asimd", "asimddp", "i8mm", "sve", "neon"]
    assert cpu_features(tmp_path / "missing") == []


def test_inventory_of_this_machine(tmp_path: Path) -> None:
    inv = collect_inventory(tmp_path)
    assert inv.arch and inv.os and inv.cpu_count == os.cpu_count()
    assert inventory_to_pb(inv).providers == inv.providers and inv.disk_free_bytes > 0


def test_a_ca_certificate_in_the_credentials_must_parse(tmp_path: Path) -> None:
    """credentials.json's CAs (from the enrollment answer) are parsed where they are read: a broken
    one is a CredentialsError naming the file, not a TLS failure later."""
    data = {
        "version": 1,
        "device_id": "dev-1",
        "fleet_url": "https://10.0.0.5:8443",
        "mqtt": {"host": "10.0.0.5", "port": 8883, "username": "dev-1", "password": "p", "tls": True},
        "fleet_ca_pem": "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    }
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CredentialsError, match="malformed"):
        Credentials.load(path)
    data["fleet_ca_pem"] = None
    path.write_text(json.dumps(data))
    creds = Credentials.load(path)
    assert creds.mqtt.tls and creds.mqtt.ca_pem is None and creds.fleet_ca_pem is None


def test_signing_keys_given_out_of_band_are_the_only_ones_pinned(endpoint: EnrollEndpoint, tmp_path: Path) -> None:
    other = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"  # RFC 8032 test key
    with pytest.raises(EnrollError, match="trusts none of the signing keys"):
        enroll(endpoint.url, "good-1", tmp_path / "a", trust_keys=[other])
    assert not (tmp_path / "a" / "credentials.json").exists()
    pub = tmp_path / "signing.pub"
    pub.write_text(KEY.upper() + "\n")
    creds = enroll(endpoint.url, "good-2", tmp_path / "b", trust_keys=[str(pub), other])
    assert creds.signing_keys == [KEY, other], "only the keys given, the fleet trusting at least one"
