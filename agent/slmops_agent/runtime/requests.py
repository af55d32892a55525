"""A generation request as the runtime takes it: its fields, the limits it is checked against
(`validate_request`), its result, and the flag that cancels it."""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

from slmops_agent.errors import InvalidRequest
from slmops_agent.runtime.constraints import Constraint, check_constraint

MAX_SEED = 2**31 - 1  # onnxruntime-genai takes a 32-bit seed


class FinishReason(enum.Enum):
    LENGTH = "LENGTH"
    STOP = "STOP"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class GenerationRequest:
    """A request, translated from GenerateRequest at the gRPC edge."""

    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    max_new_tokens: int = 0  # 0: the server default
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter: str = ""
    model_version: str = ""
    repetition_penalty: float | None = None
    constraint: Constraint | None = None  # constrained decoding (runtime.constraints)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    tokens_per_s: float
    total_ms: float
    model_version: str
    package_id: str


@dataclass(frozen=True)
class Limits:
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 4096
    max_prompt_chars: int = 1_000_000  # checked before tokenizing; the context check comes after
    max_messages: int = 1024
    max_stop_sequences: int = 16
    max_stop_chars: int = 256
    max_constraint_chars: int = 65_536


_ROLES = ("system", "user", "assistant", "tool")
MAX_TOP_K = 100_000


def validate_request(req: GenerationRequest, limits: Limits) -> None:
    """Raise InvalidRequest with a clear message for anything the model must not see."""
    if req.prompt and req.messages:
        raise InvalidRequest("give either prompt or messages, not both")
    if not req.prompt and not req.messages:
        raise InvalidRequest("prompt and messages are both empty")
    if len(req.messages) > limits.max_messages:
        raise InvalidRequest(f"{len(req.messages)} messages; the limit is {limits.max_messages}")
    chars = len(req.prompt) + sum(len(c) for _, c in req.messages)
    if chars > limits.max_prompt_chars:
        raise InvalidRequest(f"the prompt is {chars} characters; the limit is {limits.max_prompt_chars}")
    for i, (role, content) in enumerate(req.messages):
        if role not in _ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(_ROLES)}; got {role!r}")
        if not content:
            raise InvalidRequest(f"messages[{i}].content is empty")
    if req.max_new_tokens > limits.max_new_tokens_limit:
        raise InvalidRequest(f"max_new_tokens is {req.max_new_tokens}; the limit is {limits.max_new_tokens_limit}")
    if req.temperature is not None and not 0.0 <= req.temperature <= 10.0:
        raise InvalidRequest(f"temperature must be in [0, 10]; got {req.temperature}")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1]; got {req.top_p}")
    if req.top_k is not None and not 0 <= req.top_k <= MAX_TOP_K:
        raise InvalidRequest(f"top_k must be in [0, {MAX_TOP_K}]; got {req.top_k}")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise InvalidRequest(f"seed must be in [0, {MAX_SEED}]; got {req.seed}")
    if req.repetition_penalty is not None and not 0.0 < req.repetition_penalty <= 10.0:
        raise InvalidRequest(f"repetition_penalty must be in (0, 10]; got {req.repetition_penalty}")
    if len(req.stop) > limits.max_stop_sequences:
        raise InvalidRequest(f"at most {limits.max_stop_sequences} stop sequences; got {len(req.stop)}")
    for i, stop in enumerate(req.stop):
        if not stop:
            raise InvalidRequest(f"stop sequences must not be empty (stop[{i}])")
        if len(stop) > limits.max_stop_chars:
            raise InvalidRequest(f"stop[{i}] is {len(stop)} characters; the limit is {limits.max_stop_chars}")
    if req.adapter and not req.adapter.isprintable():
        raise InvalidRequest("adapter name has control characters")
    if req.constraint is not None:
        check_constraint(req.constraint, limits.max_constraint_chars)


class CancelToken(threading.Event):
    """A cancel flag that keeps why the request ends early (a status code name, for the metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = "CANCELLED"

    def cancel(self, reason: str = "CANCELLED") -> None:
        if not self.is_set():
            self.reason = reason
            self.set()


def cancel_reason(cancel: threading.Event) -> str:
    return cancel.reason if isinstance(cancel, CancelToken) else "CANCELLED"
