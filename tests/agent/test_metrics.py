"""Prometheus metrics on the loopback HTTP server, scraped over a real socket after real requests
through the gRPC server and the tiny model; and the whole agent writing metrics.addr."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from agent_helpers import AgentThread, ServerThread, agent_settings
from prometheus_client.parser import text_string_to_metric_families

from slmops_agent.httpapi import HttpServer
from slmops_agent.runtime.host import ModelHost
from slmops_agent.runtime.model import LoadedModel
from slmops_agent.runtime.requests import Limits
from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from /metrics."""
    reply = httpx.get(f"{url}/metrics", timeout=10)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class HttpThread:
    """An HttpServer on the same loop as a gRPC ServerThread (as in the agent)."""

    def __init__(self, grpc_server: ServerThread, host: ModelHost, addr_file: Path) -> None:
        self.loop = grpc_server.loop
        self.http = HttpServer(host, port=0, addr_file=addr_file)
        self.url = asyncio.run_coroutine_threadsafe(self.http.start(), self.loop).result(15)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.http.stop(1.0), self.loop).result(15)


@pytest.fixture
def stack(model: LoadedModel) -> Iterator[tuple[ModelHost, ServerThread, HttpThread, Path]]:
    folder = Path(tempfile.mkdtemp(prefix="sm-", dir="/tmp"))
    host = ModelHost(queue_bound=1, limits=Limits(default_max_new_tokens=4, max_new_tokens_limit=50))
    grpc_server = ServerThread(host, folder / "agent.sock", folder / "grpc.addr")
    http = HttpThread(grpc_server, host, folder / "metrics.addr")
    try:
        yield host, grpc_server, http, folder
    finally:
        http.stop()
        grpc_server.stop()
        host.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_metrics_follow_requests_errors_queue_and_model(
    stack: tuple[ModelHost, ServerThread, HttpThread, Path], model: LoadedModel
) -> None:
    host, grpc_server, http, folder = stack
    assert http.url.startswith("http://127.0.0.1:") and not http.url.endswith(":0")
    assert (folder / "metrics.addr").read_text().strip() == http.url.removeprefix("http://")
    before = scrape(http.url)
    assert before[("slmops_agent_model_loaded", ())] == 0
    assert not any(name == "slmops_agent_active_model" for name, _ in before)
    assert before[("slmops_agent_queue_bound", ())] == 1

    with grpc.insecure_channel(grpc_server.addresses[0]) as channel:
        stub = agent_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.GenerateUnary(agent_pb2.GenerateRequest(prompt="hi"), timeout=10)  # no model: UNAVAILABLE
        host.swap(model)
        for _ in range(3):
            stub.GenerateUnary(agent_pb2.GenerateRequest(prompt="Hello", max_new_tokens=5), timeout=10)
        list(stub.Generate(agent_pb2.GenerateRequest(prompt="Hello", max_new_tokens=5), timeout=10))
        with pytest.raises(grpc.RpcError):
            stub.GenerateUnary(agent_pb2.GenerateRequest(prompt="hi", top_p=3.0), timeout=10)
        # hold the only place: the next is RESOURCE_EXHAUSTED, and the queue depth shows it
        hold, holding = threading.Event(), threading.Event()

        def occupy() -> None:
            with host.queue.turn(threading.Event()):
                holding.set()
                hold.wait(10)

        t = threading.Thread(target=occupy)
        t.start()
        assert holding.wait(5)
        with pytest.raises(grpc.RpcError) as err:
            stub.GenerateUnary(agent_pb2.GenerateRequest(prompt="hi"), timeout=10)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        busy = scrape(http.url)
        hold.set()
        t.join(5)

    m = scrape(http.url)
    assert busy[("slmops_agent_queue_depth", ())] == 1 and m[("slmops_agent_queue_depth", ())] == 0
    assert m[("slmops_agent_requests_total", (("code", "OK"),))] == 4
    for code in ("UNAVAILABLE", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"):
        assert m[("slmops_agent_requests_total", (("code", code),))] == 1
        assert m[("slmops_agent_errors_total", (("code", code),))] == 1
    assert ("slmops_agent_errors_total", (("code", "OK"),)) not in m
    assert m[("slmops_agent_time_to_first_token_seconds_count", ())] == 4
    assert m[("slmops_agent_time_to_first_token_seconds_bucket", (("le", "+Inf"),))] == 4
    assert 0 < m[("slmops_agent_time_to_first_token_seconds_sum", ())] < 40
    assert m[("slmops_agent_completion_tokens_total", ())] == 20
    assert m[("slmops_agent_decode_seconds_total", ())] > 0 and m[("slmops_agent_tokens_per_second", ())] > 0
    labels = (("name", "tiny-llama"), ("package_id", "ab" * 32), ("slot", "a"), ("version", "1.0.0"))
    assert m[("slmops_agent_active_model", labels)] == 1 and m[("slmops_agent_model_loaded", ())] == 1


def test_unknown_paths_and_methods(stack: tuple[ModelHost, ServerThread, HttpThread, Path]) -> None:
    _, _, http, _ = stack
    assert httpx.get(f"{http.url}/nothing", timeout=10).status_code == 404
    assert httpx.post(f"{http.url}/metrics", timeout=10).status_code == 405


def test_a_taken_port_is_a_clear_error(stack: tuple[ModelHost, ServerThread, HttpThread, Path]) -> None:
    from slmops_agent.errors import AgentError

    host, grpc_server, http, _ = stack
    port = int(http.url.rpartition(":")[2])
    other = HttpServer(host, port=port)
    with pytest.raises(AgentError, match=f"HTTP cannot listen on 127.0.0.1:{port}"):
        asyncio.run_coroutine_threadsafe(other.start(), grpc_server.loop).result(15)


def test_the_agent_serves_metrics_and_writes_metrics_addr(short_dir: Path) -> None:
    agent = AgentThread(agent_settings(short_dir / "state", metrics_port=0))
    addr_file = short_dir / "state" / "metrics.addr"
    try:
        url = agent.addresses[-1]
        assert url == "http://" + addr_file.read_text().strip()
        m = scrape(url)
        assert m[("slmops_agent_model_loaded", ())] == 0 and m[("slmops_agent_queue_bound", ())] == 4
        with grpc.insecure_channel(agent.addresses[1]) as channel, pytest.raises(grpc.RpcError):
            agent_pb2_grpc.InferenceStub(channel).GenerateUnary(agent_pb2.GenerateRequest(prompt="x"), timeout=10)
        assert scrape(url)[("slmops_agent_requests_total", (("code", "UNAVAILABLE"),))] == 1
    finally:
        agent.stop()
    assert not addr_file.exists()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/metrics", timeout=2)


def test_metrics_can_be_turned_off(short_dir: Path) -> None:
    agent = AgentThread(agent_settings(short_dir / "state", metrics_port=-1))
    try:
        assert len(agent.addresses) == 2 and not (short_dir / "state" / "metrics.addr").exists()
    finally:
        agent.stop()
