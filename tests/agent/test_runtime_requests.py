"""Request validation (`runtime.requests`): every field against its limit, without a model."""

from __future__ import annotations

import pytest

from slmops_agent.errors import InvalidRequest
from slmops_agent.runtime.requests import GenerationRequest, Limits, validate_request

LIMITS = Limits(default_max_new_tokens=16, max_new_tokens_limit=64)


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (GenerationRequest(), "both empty"),
        (GenerationRequest(prompt="a", messages=(("user", "b"),)), "not both"),
        (GenerationRequest(messages=(("robot", "b"),)), "role must be one of"),
        (GenerationRequest(messages=(("user", ""),)), "content is empty"),
        (GenerationRequest(prompt="a", max_new_tokens=65), "limit is 64"),
        (GenerationRequest(prompt="a", temperature=-1), "temperature"),
        (GenerationRequest(prompt="a", top_p=0), "top_p"),
        (GenerationRequest(prompt="a", top_p=1.5), "top_p"),
        (GenerationRequest(prompt="a", seed=2**31), "seed"),
        (GenerationRequest(prompt="a", repetition_penalty=0), "repetition_penalty"),
        (GenerationRequest(prompt="a", stop=("",)), "stop sequences"),
        (GenerationRequest(prompt="a", stop=("x" * 257,)), r"stop\[0\] is 257 characters; the limit is 256"),
        (GenerationRequest(prompt="a", stop=("x",) * 17), "at most 16 stop sequences; got 17"),
        (GenerationRequest(prompt="a", top_k=100_001), r"top_k must be in \[0, 100000\]"),
        (GenerationRequest(prompt="a", temperature=float("nan")), "temperature"),
        (GenerationRequest(prompt="a" * 1_000_001), "1000001 characters; the limit is 1000000"),
        (GenerationRequest(messages=(("user", "b"),) * 1025), "1025 messages; the limit is 1024"),
        (GenerationRequest(prompt="a", adapter="x\ny"), "control characters"),
    ],
)
def test_invalid_requests(req: GenerationRequest, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        validate_request(req, LIMITS)


def test_valid_request_passes() -> None:
    validate_request(GenerationRequest(prompt="hi", temperature=0.7, top_p=0.9, top_k=40, seed=1, stop=("x",)), LIMITS)
