"""A hypothesis fuzz of every GenerateRequest field against the real gRPC server and the tiny model:
whatever the fields hold, the answer is OK, INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED, never
a crash (INTERNAL, UNKNOWN, a dropped connection), and the server keeps serving afterwards."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest
from agent_helpers import serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from slmops_agent.runtime.host import ModelHost
from slmops_agent.runtime.model import LoadedModel
from slmops_agent.runtime.requests import Limits
from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc

LIMITS = Limits(default_max_new_tokens=4, max_new_tokens_limit=6, max_prompt_chars=2_000)
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# valid UTF-8 only (protobuf strings), but control characters, NUL, emoji and right-to-left text are in
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
SHORT = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
FLOAT = st.floats(width=32, allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 1.0, 1e-9, -0.0])
ROLE = st.sampled_from(["system", "user", "assistant", "tool", "", "robot", "USER"]) | SHORT


NONEMPTY = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30)


CONSTRAINTS = {
    "json_schema": ['{"type": "object"}', '{"enum": ["a", "b"]}', '{"type": "array", "items": {"type": "integer"}}'],
    "regex": ["(yes|no)", "[0-9]{1,3}", "a?"],
    "lark_grammar": ['start: "a" | "b"', 'start: /[a-z]+/ "."'],
}
BAD_CONSTRAINTS = ["{", "[]", '{"type": 1}', '{"$ref": "#/nope"}', "(", "start: x", "x" * 70_000, "\x00"]


@st.composite
def requests(draw: st.DrawFn) -> agent_pb2.GenerateRequest:
    """Half the requests are wild (any value of each field), half tame (in range, so they reach the model)."""
    tame = draw(st.booleans())
    req = agent_pb2.GenerateRequest()
    shape = draw(
        st.sampled_from(["prompt", "messages"]) if tame else st.sampled_from(["prompt", "messages", "both", "neither"])
    )
    if shape in ("prompt", "both"):
        req.prompt = draw(NONEMPTY if tame else TEXT | st.sampled_from(["Hello", "Once upon a time", "word " * 300]))
    if shape in ("messages", "both"):
        role = st.sampled_from(["system", "user", "assistant"]) if tame else ROLE
        for r, content in draw(st.lists(st.tuples(role, NONEMPTY if tame else TEXT), min_size=1, max_size=4)):
            req.messages.add(role=r, content=content)
    req.max_new_tokens = draw(st.integers(0, 6) if tame else st.integers(0, 10) | st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        req.temperature = draw(st.floats(0, 2, width=32) if tame else FLOAT)
    if draw(st.booleans()):
        req.top_p = draw(st.floats(0.125, 1, width=32) if tame else FLOAT)
    if draw(st.booleans()):
        req.top_k = draw(st.integers(0, 60) if tame else st.integers(0, 60) | st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        req.seed = draw(st.integers(0, 2**32) if tame else st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        req.repetition_penalty = draw(st.floats(0.5, 2, width=32) if tame else FLOAT)
    req.stop.extend(draw(st.lists(NONEMPTY, max_size=3) if tame else st.lists(SHORT | st.just("x" * 300), max_size=18)))
    if not tame:
        req.adapter = draw(st.just("") | SHORT)
    kind = draw(st.sampled_from([None, None, "json_schema", "regex", "lark_grammar"]))
    if kind is not None:  # constrained decoding: a valid constraint, or anything at all
        valid = st.sampled_from(CONSTRAINTS[kind])
        setattr(req, kind, draw(valid if tame else valid | TEXT | st.sampled_from(BAD_CONSTRAINTS)))
    versions = st.sampled_from(["", "", "", "1.0.0", "ab" * 32, "9.9.9"])
    req.model_version = draw(versions if tame else versions | SHORT)
    return req


@pytest.fixture(scope="module")
def host(model: LoadedModel) -> Iterator[ModelHost]:
    h = ModelHost(queue_bound=4, limits=LIMITS)
    h.swap(model)
    yield h
    h.close()


@pytest.fixture(scope="module")
def channel(host: ModelHost) -> Iterator[grpc.Channel]:
    with serving(host, addr_file=False) as server, grpc.insecure_channel(server.addresses[0]) as ch:
        yield ch


def outcome(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        if callable(call):
            call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def check(stub: agent_pb2_grpc.InferenceStub, req: agent_pb2.GenerateRequest) -> None:
    streamed: list[agent_pb2.GenerateResponse] = []
    stream_code, stream_msg = outcome(lambda: streamed.extend(stub.Generate(req, timeout=30)))
    unary_code, unary_msg = outcome(lambda: stub.GenerateUnary(req, timeout=30))
    for code, msg in ((stream_code, stream_msg), (unary_code, unary_msg)):
        assert code in ALLOWED, (code, msg, req)
        if code is not grpc.StatusCode.OK:
            assert msg and "internal" not in msg.lower(), (code, msg)
    # the same request gets the same verdict either way (a full queue aside)
    if grpc.StatusCode.RESOURCE_EXHAUSTED not in (stream_code, unary_code):
        assert stream_code == unary_code, (stream_code, stream_msg, unary_code, unary_msg)
    if stream_code is grpc.StatusCode.OK:
        final = streamed[-1]
        assert (
            1 <= final.usage.completion_tokens <= LIMITS.max_new_tokens_limit or final.finish_reason == agent_pb2.STOP
        )
        assert final.model_version == "1.0.0"
        assert math.isfinite(final.timings.total_ms)
    if req.max_new_tokens > LIMITS.max_new_tokens_limit:
        assert stream_code is grpc.StatusCode.INVALID_ARGUMENT


def test_any_request_gets_a_clean_status_and_the_server_stays_whole(channel: grpc.Channel, host: ModelHost) -> None:
    stub = agent_pb2_grpc.InferenceStub(channel)

    # The random draws reach NOT_FOUND in about two runs of three: these examples always do.
    @settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(req=requests())
    @example(req=agent_pb2.GenerateRequest(prompt="Hello", max_new_tokens=2, model_version="9.9.9"))
    @example(req=agent_pb2.GenerateRequest(prompt="Hello", max_new_tokens=2, adapter="no-such-adapter"))
    def fuzz(req: agent_pb2.GenerateRequest) -> None:
        check(stub, req)

    fuzz()
    # afterwards: still serving, nothing but the allowed codes counted, the queue empty
    reply = stub.GenerateUnary(agent_pb2.GenerateRequest(prompt="Hello", max_new_tokens=3), timeout=30)
    assert reply.usage.completion_tokens == 3
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    codes = host.metrics.snapshot().requests_by_code
    assert set(codes) <= {c.name for c in ALLOWED}, codes
    # the fuzz reached the model, not only the validator
    assert codes.get("OK", 0) >= 10 and codes.get("INVALID_ARGUMENT", 0) >= 10, codes
    assert codes.get("NOT_FOUND", 0) >= 1, codes
    assert host.queue.depth == 0
