"""Every GenerateRequest field checked over a real gRPC server with the tiny model: one table of
bad requests and the status code and words each gets, on both the streaming and the unary call."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from agent_helpers import ServerThread, serving

from slmops_agent.runtime.host import ModelHost
from slmops_agent.runtime.model import LoadedModel
from slmops_agent.runtime.requests import Limits
from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc

LIMITS = Limits(default_max_new_tokens=8, max_new_tokens_limit=100, max_prompt_chars=20_000)


@pytest.fixture(scope="module")
def host() -> Iterator[ModelHost]:
    h = ModelHost(queue_bound=4, limits=LIMITS)
    yield h
    h.close()


@pytest.fixture(scope="module")
def served(host: ModelHost) -> Iterator[ServerThread]:
    with serving(host) as s:
        yield s


@pytest.fixture
def inference(served: ServerThread) -> Iterator[agent_pb2_grpc.InferenceStub]:
    with grpc.insecure_channel(served.addresses[0]) as channel:
        yield agent_pb2_grpc.InferenceStub(channel)


def chat(text: str, role: str = "user", **kw: object) -> agent_pb2.GenerateRequest:
    req = agent_pb2.GenerateRequest(**kw)  # type: ignore[arg-type]
    req.messages.add(role=role, content=text)
    return req


INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

CASES: list[tuple[str, agent_pb2.GenerateRequest, grpc.StatusCode, str]] = [
    ("neither", agent_pb2.GenerateRequest(), INVALID, "both empty"),
    ("both", chat("hi", prompt="raw too"), INVALID, "not both"),
    ("bad-role", chat("hi", role="robot"), INVALID, "messages[0].role must be one of"),
    ("empty-content", chat("", role="user"), INVALID, "messages[0].content is empty"),
    ("temperature-negative", chat("hi", temperature=-0.5), INVALID, "temperature must be in [0, 10]"),
    ("temperature-high", chat("hi", temperature=11.0), INVALID, "temperature"),
    ("temperature-nan", chat("hi", temperature=float("nan")), INVALID, "temperature"),
    ("top-p-zero", chat("hi", top_p=0.0), INVALID, "top_p must be in (0, 1]"),
    ("top-p-high", chat("hi", top_p=1.5), INVALID, "top_p"),
    ("top-k-high", chat("hi", top_k=100_001), INVALID, "top_k must be in [0, 100000]"),
    ("repetition-zero", chat("hi", repetition_penalty=0.0), INVALID, "repetition_penalty must be in (0, 10]"),
    ("repetition-high", chat("hi", repetition_penalty=10.5), INVALID, "repetition_penalty"),
    ("max-new-tokens", chat("hi", max_new_tokens=101), INVALID, "max_new_tokens is 101; the limit is 100"),
    ("seed", chat("hi", seed=2**40), INVALID, "seed must be in"),
    ("stop-count", chat("hi", stop=[f"s{i}" for i in range(17)]), INVALID, "at most 16 stop sequences; got 17"),
    ("stop-empty", chat("hi", stop=["ok", ""]), INVALID, "stop sequences must not be empty (stop[1])"),
    ("stop-long", chat("hi", stop=["x" * 257]), INVALID, "stop[0] is 257 characters; the limit is 256"),
    ("prompt-chars", agent_pb2.GenerateRequest(prompt="a" * 20_001), INVALID, "20001 characters; the limit is 20000"),
    ("context", agent_pb2.GenerateRequest(prompt="Hello world " * 400), INVALID, "the model's context is 256"),
    ("context-chat", chat("Hello world " * 400), INVALID, "the model's context is 256"),
    ("adapter", chat("hi", adapter="legal"), NOT_FOUND, "adapter 'legal' is not loaded (this model has: none)"),
    ("version-pin", chat("hi", model_version="0.0.1"), NOT_FOUND, "'0.0.1' is not active (active: 1.0.0)"),
]


@pytest.mark.parametrize(("request_", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_requests_get_status_codes(
    inference: agent_pb2_grpc.InferenceStub,
    host: ModelHost,
    model: LoadedModel,
    request_: agent_pb2.GenerateRequest,
    code: grpc.StatusCode,
    words: str,
) -> None:
    host.swap(model)
    errors_before = host.metrics.errors_total
    calls = (
        lambda: inference.GenerateUnary(request_, timeout=10),
        lambda: list(inference.Generate(request_, timeout=10)),
    )
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is code, err.value.details()
        assert words in (err.value.details() or "")
    assert host.metrics.errors_total == errors_before  # the caller's mistakes are not the device's errors
    assert host.queue.depth == 0
    # the server goes on answering
    ok = inference.GenerateUnary(chat("hi", max_new_tokens=2), timeout=10)
    assert ok.usage.completion_tokens == 2


def test_pins_that_match_and_edge_values_are_accepted(
    inference: agent_pb2_grpc.InferenceStub, host: ModelHost, model: LoadedModel
) -> None:
    host.swap(model)
    for req in (
        chat("hi", model_version="1.0.0", max_new_tokens=3),
        chat("hi", model_version="ab" * 32, max_new_tokens=3),
        chat("hi", temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=10.0, max_new_tokens=3),
        chat("hi", temperature=10.0, top_p=1e-6, top_k=100_000, seed=2**31 - 1, max_new_tokens=3),
        chat("hi", stop=["x" * 256] * 16, max_new_tokens=3),
        chat("hi", role="system", max_new_tokens=3),
        chat("hi", max_new_tokens=100),  # the limit itself; capped by the context
    ):
        reply = inference.GenerateUnary(req, timeout=10)
        assert reply.usage.completion_tokens >= 1 and reply.model_version == "1.0.0"


def test_no_model_is_unavailable(served: ServerThread, host: ModelHost, model: LoadedModel) -> None:
    host.swap(None)
    try:
        with grpc.insecure_channel(served.addresses[1]) as channel:
            stub = agent_pb2_grpc.InferenceStub(channel)
            for call in (
                lambda: stub.GenerateUnary(chat("hi"), timeout=10),
                lambda: list(stub.Generate(chat("hi"), timeout=10)),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() is grpc.StatusCode.UNAVAILABLE
                assert "no model is loaded" in (err.value.details() or "")
    finally:
        host.swap(model)


def test_repetition_penalty_reaches_the_search(
    inference: agent_pb2_grpc.InferenceStub, host: ModelHost, model: LoadedModel
) -> None:
    """The tiny model repeats one word when greedy; a strong penalty breaks the loop."""
    host.swap(model)
    plain = inference.GenerateUnary(agent_pb2.GenerateRequest(prompt="Hello", max_new_tokens=60), timeout=10).text
    penalised = inference.GenerateUnary(
        agent_pb2.GenerateRequest(prompt="Hello", max_new_tokens=60, repetition_penalty=5.0), timeout=10
    ).text
    neutral = inference.GenerateUnary(
        agent_pb2.GenerateRequest(prompt="Hello", max_new_tokens=60, repetition_penalty=1.0), timeout=10
    ).text
    assert neutral == plain
    assert penalised != plain
    assert len(set(penalised.split())) > len(set(plain.split()))


def test_context_is_checked_in_tokens_after_the_template(
    inference: agent_pb2_grpc.InferenceStub, host: ModelHost, model: LoadedModel
) -> None:
    """A prompt just under the context generates (capped by what is left); one over is refused."""
    host.swap(model)
    ids = len(model.tokenizer.encode("Hello world " * 25))
    assert ids < 256
    reply = inference.GenerateUnary(
        agent_pb2.GenerateRequest(prompt="Hello world " * 25, max_new_tokens=100), timeout=10
    )
    assert reply.usage.prompt_tokens == ids
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 256
    with pytest.raises(grpc.RpcError) as err:
        inference.GenerateUnary(agent_pb2.GenerateRequest(prompt="Hello world " * 200), timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "tokens" in (err.value.details() or "")
