"""The OpenAI-compatible API on the loopback HTTP server, driven by the official `openai` client,
served from the real tiny model through the same ModelHost as gRPC."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from agent_helpers import PacedHost, ServerThread

from slmops_agent.httpapi import HttpServer
from slmops_agent.runtime.model import LoadedModel
from slmops_agent.runtime.requests import Limits
from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc


class Stack:
    def __init__(self, model: LoadedModel) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="so-", dir="/tmp"))
        self.host = PacedHost(queue_bound=2, limits=Limits(default_max_new_tokens=8, max_new_tokens_limit=200))
        self.host.swap(model)
        self.grpc = ServerThread(self.host, self.folder / "agent.sock", self.folder / "grpc.addr")
        self.http = HttpServer(self.host, port=0, addr_file=self.folder / "metrics.addr")
        self.url = asyncio.run_coroutine_threadsafe(self.http.start(), self.grpc.loop).result(15)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=30)

    def close(self) -> None:
        self.client.close()
        asyncio.run_coroutine_threadsafe(self.http.stop(1.0), self.grpc.loop).result(15)
        self.grpc.stop()
        self.host.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def stack(model: LoadedModel) -> Iterator[Stack]:
    s = Stack(model)
    try:
        yield s
    finally:
        s.close()


def grpc_text(stack: Stack, req: agent_pb2.GenerateRequest) -> str:
    with grpc.insecure_channel(stack.grpc.addresses[0]) as channel:
        return agent_pb2_grpc.InferenceStub(channel).GenerateUnary(req, timeout=10).text


def test_models_lists_the_active_model(stack: Stack) -> None:
    models = stack.client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"] and models.data[0].owned_by == "slmops"
    stack.host.swap(None)
    assert stack.client.models.list().data == []


def test_chat_completion_matches_grpc_and_streams_the_same_text(stack: Stack) -> None:
    question = "What is the capital of France?"
    reply = stack.client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": question}], max_tokens=12
    )
    expected = grpc_text(
        stack, agent_pb2.GenerateRequest(messages=[{"role": "user", "content": question}], max_new_tokens=12)
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "tiny-llama"
    assert choice.message.role == "assistant" and choice.message.content == expected and expected
    assert choice.finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 12 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12

    stack.host.pace_s = 0.003  # a device's speed: each piece is an event of its own
    stream = stack.client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": question}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_completions_and_stop_sequences(stack: Stack) -> None:
    full = stack.client.completions.create(model="", prompt="Hello", max_tokens=20)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    text = full.choices[0].text
    assert text == grpc_text(stack, agent_pb2.GenerateRequest(prompt="Hello", max_new_tokens=20))
    stop = text[6:9]
    cut = stack.client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=20, stop=stop)
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(stack.client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=20, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_sampling_options_and_the_extensions_reach_the_model(stack: Stack) -> None:
    def ask(model: str = "tiny-llama", **kw: object) -> str:
        create = stack.client.completions.create
        reply = create(model=model, prompt="Hello", max_tokens=30, **kw)  # type: ignore[call-overload]
        return str(reply.choices[0].text)

    assert ask(temperature=1.5, top_p=0.95, seed=7) == ask(temperature=1.5, top_p=0.95, seed=7)
    assert ask(extra_body={"repetition_penalty": 5.0}) != ask()
    assert ask(model="1.0.0") == ask(model="tiny-llama@1.0.0") == ask()


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"temperature": -1.0}, openai.BadRequestError, "temperature must be in [0, 10]"),
        ({"top_p": 2.0}, openai.BadRequestError, "top_p"),
        ({"max_tokens": 201}, openai.BadRequestError, "the limit is 200"),
        ({"n": 2}, openai.BadRequestError, "n must be 1"),
        ({"presence_penalty": 0.5}, openai.BadRequestError, "presence_penalty is not supported"),
        ({"stop": [""]}, openai.BadRequestError, "stop sequences must not be empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, openai.BadRequestError, "role must be one of"),
        ({"messages": [{"role": "user", "content": "Hello world " * 400}]}, openai.BadRequestError, "context"),
        ({"messages": []}, openai.BadRequestError, "messages is empty"),
        ({"model": "gpt-4o"}, openai.NotFoundError, "'gpt-4o' is not served here"),
        ({"model": "tiny-llama:legal"}, openai.NotFoundError, "adapter 'legal'"),
        ({"model": "tiny-llama@0.9"}, openai.NotFoundError, "'0.9' is not active"),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_errors_are_openai_errors(
    stack: Stack, kwargs: dict[str, object], error: type[Exception], words: str, stream: bool
) -> None:
    args: dict[str, object] = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    args.update(kwargs)
    with pytest.raises(error) as err:
        stack.client.chat.completions.create(stream=stream, **args)  # type: ignore[call-overload]
    assert words in str(err.value)
    assert stack.host.queue.depth == 0 and stack.host.metrics.errors_total == 0


def test_bad_bodies_no_model_and_a_full_queue(stack: Stack) -> None:
    r = httpx.post(f"{stack.url}/v1/chat/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{stack.url}/v1/chat/completions", json={"messages": "hi"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("messages")
    r = httpx.post(f"{stack.url}/v1/completions", json={"prompt": ["a", "b"]}, timeout=10)
    assert r.status_code == 400 and "one prompt" in r.json()["error"]["message"]

    hold, holding = threading.Event(), threading.Event()

    def occupy() -> None:
        with stack.host.queue.turn(threading.Event()):
            holding.set()
            hold.wait(10)

    blockers = [threading.Thread(target=occupy) for _ in range(2)]
    for t in blockers:
        t.start()
    try:
        assert holding.wait(5)
        deadline = time.monotonic() + 5
        while stack.host.queue.depth < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as err:
            stack.client.completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
        headers = err.value.response.headers
        assert int(headers["retry-after-ms"]) >= 50 and int(headers["retry-after"]) >= 1
        assert err.value.status_code == 429 and "the bound is 2" in str(err.value)
    finally:
        hold.set()
        for t in blockers:
            t.join(10)

    stack.host.swap(None)
    with pytest.raises(openai.InternalServerError) as err2:
        stack.client.completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
    assert err2.value.status_code == 503 and "no model is loaded" in str(err2.value)


def test_closing_a_stream_cancels_the_generation(stack: Stack) -> None:
    stack.host.pace_s = 0.02
    stream = stack.client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=200, stream=True
    )
    got = [next(stream) for _ in range(4)]
    assert any(c.choices[0].delta.content for c in got)
    stream.close()
    deadline = time.monotonic() + 5
    while stack.host.metrics.snapshot().requests_by_code.get("CANCELLED") != 1:
        assert time.monotonic() < deadline, stack.host.metrics.snapshot().requests_by_code
        time.sleep(0.01)
    assert stack.host.queue.depth == 0
    assert stack.host.metrics.snapshot().completion_tokens_total < 20  # 200 would take 4 s


def test_a_plain_request_whose_client_leaves_is_cancelled(stack: Stack) -> None:
    stack.host.pace_s = 0.02
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{stack.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 200}, timeout=httpx.Timeout(0.3)
        )
    deadline = time.monotonic() + 5
    while stack.host.metrics.snapshot().requests_by_code.get("CANCELLED") != 1:
        assert time.monotonic() < deadline, stack.host.metrics.snapshot().requests_by_code
        time.sleep(0.01)
    assert stack.host.queue.depth == 0
