"""Batching through the real gRPC server and the tiny model: requests waiting together are decoded
in one onnxruntime-genai Engine batch, each with its own prompt, sampling fields, stop sequences,
cancellation and result, and each gets the text it gets alone.

A batch forms when its head's turn comes, from the requests waiting behind it: the tests hold the
queue's one turn (`queue.turn`) while the streams arrive, then let go."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agent_helpers import PacedHost, ServerThread, load_unpacked, serving, wait_until
from test_metrics import HttpThread, scrape

from slmops_agent.runtime.model import LoadedModel, ModelInfo
from slmops_agent.runtime.requests import GenerationRequest, Limits
from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc

TOKENS = 16
PROMPTS = ("Hello world.", "The capital of France is", "Small language models", "one two three four")


@pytest.fixture
def host(model: LoadedModel) -> Iterator[PacedHost]:
    h = PacedHost(queue_bound=8, limits=Limits(default_max_new_tokens=TOKENS, max_new_tokens_limit=64))
    h.swap(model)
    yield h
    h.close()


@pytest.fixture
def served(host: PacedHost) -> Iterator[ServerThread]:
    with serving(host, addr_file=False) as s:
        yield s


@pytest.fixture
def stub(served: ServerThread) -> Iterator[agent_pb2_grpc.InferenceStub]:
    channel = grpc.insecure_channel(served.addresses[0])
    try:
        yield agent_pb2_grpc.InferenceStub(channel)
    finally:
        channel.close()


def request(prompt: str, **fields: object) -> agent_pb2.GenerateRequest:
    values: dict[str, object] = {"max_new_tokens": TOKENS, "temperature": 0.0, **fields}
    return agent_pb2.GenerateRequest(prompt=prompt, **values)  # type: ignore[arg-type]


def collect(
    stub: agent_pb2_grpc.InferenceStub, req: agent_pb2.GenerateRequest
) -> tuple[str, agent_pb2.GenerateResponse]:
    chunks = list(stub.Generate(req, timeout=60))
    return "".join(c.text for c in chunks), chunks[-1]


class Streams:
    """Streams started in threads while the test holds the queue's turn; `release` lets them run."""

    def __init__(self, host: PacedHost, stub: agent_pb2_grpc.InferenceStub) -> None:
        self.host = host
        self.stub = stub
        self.hold = threading.Event()
        self.held = threading.Thread(target=self._hold)
        self.held.start()
        wait_until(lambda: host.queue.depth == 1)
        self.threads: list[threading.Thread] = []
        self.chunks: list[list[agent_pb2.GenerateResponse]] = []
        self.errors: list[grpc.RpcError | None] = []
        self.calls: list[grpc.Future] = []

    def _hold(self) -> None:
        with self.host.queue.turn(threading.Event()):
            self.hold.wait(30)

    def start(self, req: agent_pb2.GenerateRequest) -> int:
        i = len(self.threads)
        self.chunks.append([])
        self.errors.append(None)
        call = self.stub.Generate(req, timeout=60)
        self.calls.append(call)

        def read() -> None:
            try:
                for chunk in call:
                    self.chunks[i].append(chunk)
            except grpc.RpcError as exc:
                self.errors[i] = exc

        t = threading.Thread(target=read)
        t.start()
        self.threads.append(t)
        wait_until(lambda: self.host.queue.depth == 2 + i)  # queued in this order
        return i

    def release(self) -> None:
        self.hold.set()
        self.held.join(10)

    def join(self) -> None:
        for t in self.threads:
            t.join(60)
            assert not t.is_alive()

    def text(self, i: int) -> str:
        return "".join(c.text for c in self.chunks[i])


def test_waiting_streams_run_as_one_batch_and_each_gets_its_solo_text(
    host: PacedHost, stub: agent_pb2_grpc.InferenceStub, served: ServerThread, tmp_path: Path
) -> None:
    requests = [
        request(PROMPTS[0]),
        request(PROMPTS[1], repetition_penalty=3.0),  # its own sampling fields, honoured in the batch
        request(PROMPTS[2], stop=["."]),
        request(PROMPTS[0], max_new_tokens=5),
    ]
    solo = [collect(stub, r) for r in requests]
    assert solo[1][0] != collect(stub, request(PROMPTS[1]))[0]  # the penalty changes the greedy text
    batches_before = host.metrics.snapshot().batches_total

    streams = Streams(host, stub)
    for r in requests:
        streams.start(r)
    streams.release()
    streams.join()

    assert streams.errors == [None] * 4
    snap = host.metrics.snapshot()
    assert snap.batches_total == batches_before + 1 and snap.batched_requests_total == 4  # one batch, all four
    for i, (text, final) in enumerate(solo):
        got = streams.chunks[i][-1]
        assert streams.text(i) == text, i
        assert got.finish_reason == final.finish_reason and got.usage == final.usage, i
        assert got.model_version == "1.0.0" and got.timings.tokens_per_second >= 0
    assert streams.chunks[3][-1].usage.completion_tokens == 5
    assert host.queue.depth == 0
    assert snap.requests_by_code.get("OK") == len(solo) + 1 + 4
    http = HttpThread(served, host, tmp_path / "metrics.addr")
    try:
        m = scrape(http.url)
    finally:
        http.stop()
    assert m[("slmops_agent_batches_total", ())] == 1 and m[("slmops_agent_batched_requests_total", ())] == 4
    assert m[("slmops_agent_queue_depth", ())] == 0 and m[("slmops_agent_requests_total", (("code", "OK"),))] == 9


def test_requests_that_cannot_share_a_batch_keep_their_place(
    host: PacedHost, stub: agent_pb2_grpc.InferenceStub
) -> None:
    """A seeded request runs alone (static batching has no per-request seed); nobody overtakes it."""
    seeded = request(PROMPTS[1], temperature=0.9, seed=7)
    solo_seeded = collect(stub, seeded)[0]
    started: list[str] = []  # the prompts, in the order their requests got the model
    submit = host.submit

    def recording_submit(req: GenerationRequest, **kw: Any) -> Any:
        on_start = kw.pop("on_start")

        def start(info: ModelInfo) -> None:
            started.append(req.prompt)
            on_start(info)

        return submit(req, on_start=start, **kw)

    host.submit = recording_submit  # type: ignore[method-assign]
    streams = Streams(host, stub)
    for r in (request(PROMPTS[0]), seeded, request(PROMPTS[2]), request(PROMPTS[3])):
        streams.start(r)
    streams.release()
    streams.join()
    assert streams.errors == [None] * 4
    # FIFO: the first alone (the seeded one after it stops its batch), the seeded one, the last two together
    assert started == [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]]
    assert streams.text(1) == solo_seeded  # the seed is honoured
    snap = host.metrics.snapshot()
    assert snap.batches_total == 1 and snap.batched_requests_total == 2  # only the last two shared one


def test_a_cancelled_member_stops_without_disturbing_the_others(
    host: PacedHost, stub: agent_pb2_grpc.InferenceStub
) -> None:
    solo = [collect(stub, request(p)) for p in PROMPTS[:3]]
    host.pace_s = 0.01  # ~16 tokens in 0.16 s: slow enough to cancel one mid-way
    streams = Streams(host, stub)
    for p in PROMPTS[:3]:
        streams.start(request(p))
    streams.release()
    wait_until(lambda: len(streams.chunks[1]) >= 2)
    streams.calls[1].cancel()
    streams.join()

    error = streams.errors[1]
    assert error is not None and error.code() is grpc.StatusCode.CANCELLED
    assert len(streams.chunks[1]) < TOKENS
    for i in (0, 2):
        assert streams.errors[i] is None
        assert streams.text(i) == solo[i][0] and streams.chunks[i][-1].usage == solo[i][1].usage
    wait_until(lambda: host.queue.depth == 0)
    snap = host.metrics.snapshot()
    assert snap.batches_total == 1 and snap.requests_by_code.get("CANCELLED") == 1


def test_a_hot_swap_during_a_batch_lets_it_finish_on_the_old_model(
    host: PacedHost, stub: agent_pb2_grpc.InferenceStub, pkg_v2: Path, tmp_path: Path
) -> None:
    v2 = load_unpacked(pkg_v2, tmp_path, version="2.0.0")
    solo = [collect(stub, request(p)) for p in PROMPTS[:2]]
    host.pace_s = 0.01
    streams = Streams(host, stub)
    for p in PROMPTS[:2]:
        streams.start(request(p))
    streams.release()
    wait_until(lambda: len(streams.chunks[0]) >= 2)
    host.swap(v2)
    host.pace_s = 0.0
    after = collect(stub, request(PROMPTS[0]))[1]
    streams.join()
    assert streams.errors == [None, None]
    for i in (0, 1):
        assert {c.model_version for c in streams.chunks[i]} == {"1.0.0"}
        assert streams.text(i) == solo[i][0]
    assert after.model_version == "2.0.0"
