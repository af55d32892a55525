"""Reach beyond loopback over real sockets: TLS (a self-signed certificate made here) and a bearer
token on gRPC and on the HTTP /v1 API; refusal to start without them; `slmops agent ask --token --tls-ca`."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from agent_helpers import ServerThread, agent_settings
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from slmops_agent.errors import AgentError
from slmops_agent.httpapi import HttpServer
from slmops_agent.reach import TlsFiles, is_loopback, tls_from, token_matches
from slmops_agent.runtime.host import ModelHost
from slmops_agent.runtime.model import LoadedModel
from slmops_agent.runtime.requests import Limits
from slmops_agent.server import SERVICE_NAME, AgentServer
from slmops_cli.procs import slmops_cmd
from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc

TOKEN = "s3cret-token-0123456789"


def make_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "slmops-agent-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "agent.crt", folder / "agent.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls(certs: tuple[Path, Path]) -> TlsFiles:
    return TlsFiles.load(*certs)


@pytest.fixture
def host(model: LoadedModel) -> Iterator[ModelHost]:
    h = ModelHost(queue_bound=4, limits=Limits(default_max_new_tokens=8, max_new_tokens_limit=100))
    h.swap(model)
    yield h
    h.close()


@pytest.fixture
def exposed(host: ModelHost, tls: TlsFiles, short_dir: Path) -> Iterator[ServerThread]:
    """gRPC on all interfaces (0.0.0.0) with TLS and a token, plus the Unix socket."""
    s = ServerThread(host, short_dir / "agent.sock", None, tcp_address="0.0.0.0:0", tls=tls, token=TOKEN)
    try:
        yield s
    finally:
        s.stop()


def secure(port: int, certs: tuple[Path, Path]) -> grpc.Channel:
    return grpc.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=certs[0].read_bytes())
    )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def req(**kw: object) -> agent_pb2.GenerateRequest:
    r = agent_pb2.GenerateRequest(prompt="Once upon a time", max_new_tokens=4, **kw)  # type: ignore[arg-type]
    return r


def test_loopback_and_token_checks() -> None:
    for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(h), h
    for h in ("0.0.0.0", "::", "", "10.0.0.5", "example.com"):
        assert not is_loopback(h), h
    assert token_matches(f"Bearer {TOKEN}", TOKEN) and token_matches(f"bearer  {TOKEN} ", TOKEN)
    for bad in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer "):
        assert not token_matches(bad, TOKEN), bad


def test_refuses_to_expose_without_tls_or_token(host: ModelHost, tls: TlsFiles, certs: tuple[Path, Path]) -> None:
    async def start(server: AgentServer | HttpServer) -> None:
        await server.start()

    cases: list[tuple[AgentServer | HttpServer, str]] = [
        (AgentServer(host, socket_path=None, tcp_address="0.0.0.0:0"), "TLS .* and a bearer token"),
        (AgentServer(host, socket_path=None, tcp_address="0.0.0.0:0", tls=tls), "needs a bearer token"),
        (AgentServer(host, socket_path=None, tcp_address="0.0.0.0:0", token=TOKEN), "needs TLS"),
        (HttpServer(host, address="0.0.0.0", port=0), "HTTP on 0.0.0.0 .*TLS"),
        (HttpServer(host, address="0.0.0.0", port=0, tls=tls), "HTTP on 0.0.0.0 .*bearer token"),
    ]
    for server, message in cases:
        with pytest.raises(AgentError, match=message):
            asyncio.run(start(server))
    with pytest.raises(AgentError, match="both a certificate and a key"):
        tls_from(certs[0], None)
    with pytest.raises(AgentError, match="cannot read the TLS files"):
        tls_from(certs[0], certs[0].parent / "missing.key")
    with pytest.raises(AgentError, match="must be PEM"):
        tls_from(certs[0], Path(os.devnull))


def test_the_daemon_refuses_before_listening(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    from slmops_agent.daemon import Agent

    with pytest.raises(AgentError, match=r"gRPC on 0\.0\.0\.0 is reachable beyond this machine"):
        Agent(agent_settings(tmp_path / "a", grpc_address="0.0.0.0:0", metrics_port=-1))
    with pytest.raises(AgentError, match=r"HTTP on 0\.0\.0\.0 .*bearer token"):
        Agent(agent_settings(tmp_path / "b", metrics_host="0.0.0.0", tls_cert=certs[0], tls_key=certs[1]))
    assert not (tmp_path / "a" / "agent.sock").exists()
    with pytest.raises(ValueError, match="at least 16"):
        agent_settings(tmp_path / "c", auth_token="short")
    assert TOKEN not in repr(agent_settings(tmp_path / "d", auth_token=TOKEN))


def test_grpc_needs_the_token_on_every_call_but_health(exposed: ServerThread, certs: tuple[Path, Path]) -> None:
    unix, tcp = exposed.addresses
    port = int(tcp.rpartition(":")[2])
    with secure(port, certs) as channel:
        stub = agent_pb2_grpc.InferenceStub(channel)
        for metadata in ((), bearer("wrong-token-0123456789"), (("authorization", TOKEN),)):
            for call in (
                lambda md: list(stub.Generate(req(), timeout=10, metadata=md)),
                lambda md: stub.GenerateUnary(req(), timeout=10, metadata=md),
                lambda md: stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10, metadata=md),
                lambda md: list(
                    reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=md
                    )
                ),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call(metadata)
                assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED, (metadata, err.value.details())
                assert "bearer token" in (err.value.details() or "")
        # health answers without a token (load balancers and probes)
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # the right token works: streaming, unary, status and reflection
        chunks = list(stub.Generate(req(), timeout=10, metadata=bearer(TOKEN)))
        assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].model_version == "1.0.0"
        assert stub.GenerateUnary(req(), timeout=10, metadata=bearer(TOKEN)).usage.completion_tokens == 4
        assert stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10, metadata=bearer(TOKEN)).device_id == "dev-x"
        services = list(
            reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=bearer(TOKEN)
            )
        )
        assert SERVICE_NAME in {s.name for s in services[0].list_services_response.service}
    # plain text to the TLS port does not get through
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
        with pytest.raises(grpc.RpcError) as err:
            agent_pb2_grpc.InferenceStub(plain).GetStatus(
                agent_pb2.GetStatusRequest(), timeout=5, metadata=bearer(TOKEN)
            )
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    # the Unix socket (guarded by its file permissions) needs no token
    with grpc.insecure_channel(unix) as local:
        assert agent_pb2_grpc.InferenceStub(local).GenerateUnary(req(), timeout=10).usage.completion_tokens == 4


def test_http_needs_tls_and_the_token_for_v1(exposed: ServerThread, host: ModelHost, tls: TlsFiles) -> None:
    http = HttpServer(host, address="0.0.0.0", port=0, tls=tls, token=TOKEN)
    url = asyncio.run_coroutine_threadsafe(http.start(), exposed.loop).result(15)
    try:
        assert url.startswith("https://0.0.0.0:")
        base = "https://127.0.0.1:" + url.rpartition(":")[2]
        verify = ssl.create_default_context(cafile=str(tls.cert_path))
        with httpx.Client(verify=verify, timeout=10) as client:
            for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
                r = client.get(f"{base}/v1/models", headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                assert "bearer token" in r.json()["error"]["message"]
                r = client.post(f"{base}/v1/completions", headers=headers, json={"model": "x", "prompt": "Hi"})
                assert r.status_code == 401
            assert client.get(f"{base}/metrics").status_code == 200  # scraping needs no token
            r = client.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200 and r.json()["data"]
        with pytest.raises(httpx.ConnectError):  # our certificate is not in the default trust store
            httpx.get(f"{base}/metrics", timeout=5)
        ai = openai.OpenAI(
            base_url=f"{base}/v1", api_key=TOKEN, max_retries=0, timeout=30, http_client=httpx.Client(verify=verify)
        )
        with ai:
            out = ai.completions.create(model="tiny-llama", prompt="Once upon a time", max_tokens=4)
            assert out.usage is not None and out.usage.completion_tokens == 4
        bad = openai.OpenAI(
            base_url=f"{base}/v1", api_key="nope", max_retries=0, timeout=30, http_client=httpx.Client(verify=verify)
        )
        with bad, pytest.raises(openai.AuthenticationError):
            bad.models.list()
    finally:
        asyncio.run_coroutine_threadsafe(http.stop(1.0), exposed.loop).result(15)


def test_ask_with_token_and_tls_ca(exposed: ServerThread, certs: tuple[Path, Path]) -> None:
    port = exposed.addresses[1].rpartition(":")[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_AGENT_")}
    base = [*slmops_cmd(), "agent", "ask", "Hello", "--raw", "--max-new-tokens", "3", "--json"]
    target = ["--target", f"127.0.0.1:{port}", "--tls-ca", str(certs[0])]

    def ask(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *target, *extra], capture_output=True, text=True, timeout=60, env=env)

    ok = ask("--token", TOKEN)
    assert ok.returncode == 0, ok.stderr
    assert '"completion_tokens": 3' in ok.stdout
    missing = ask()
    assert missing.returncode == 1 and "UNAUTHENTICATED" in missing.stderr
    wrong = ask("--token", "wrong-token-0123456789")
    assert wrong.returncode == 1 and "UNAUTHENTICATED: wrong bearer token" in wrong.stderr
    no_ca = subprocess.run(
        [*base, "--target", f"127.0.0.1:{port}", "--tls-ca", "/nonexistent/ca.pem"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert no_ca.returncode == 2 and "cannot read the CA file" in no_ca.stderr


def test_run_refuses_an_unprotected_public_address(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_AGENT_")}
    env.update(SLMOPS_AGENT_GRPC_ADDRESS="0.0.0.0:0", SLMOPS_AGENT_THREADS="1")
    cmd = [*slmops_cmd(), "agent", "run", "--state-dir", str(tmp_path / "state"), "--metrics-port", "-1"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 1
    assert "gRPC on 0.0.0.0 is reachable beyond this machine and needs TLS" in refused.stderr
    assert "bearer token (SLMOPS_AGENT_AUTH_TOKEN)" in refused.stderr
    env.update(SLMOPS_AGENT_TLS_CERT=str(certs[0]), SLMOPS_AGENT_AUTH_TOKEN="short")
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "auth_token" in bad.stderr and "at least 16" in bad.stderr
    env.update(SLMOPS_AGENT_AUTH_TOKEN=TOKEN)
    half = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert half.returncode == 1 and "TLS needs both a certificate and a key" in half.stderr
    assert not (tmp_path / "state" / "agent.sock").exists()
