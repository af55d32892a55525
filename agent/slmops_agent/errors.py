"""The agent's own error types. Each names its status code here (`code`, a gRPC status code name);
`status_name` is the one lookup, which the gRPC interceptor, the metrics and the HTTP API all use."""

from __future__ import annotations

from typing import ClassVar


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    code: ClassVar[str] = "FAILED_PRECONDITION"


class InvalidRequest(AgentError):
    """A generation request is malformed or out of range (INVALID_ARGUMENT)."""

    code: ClassVar[str] = "INVALID_ARGUMENT"


class NotFound(AgentError):
    """A pinned model version or a named adapter is not here (NOT_FOUND)."""

    code: ClassVar[str] = "NOT_FOUND"


class QueueFull(AgentError):
    """The request queue is at its bound (RESOURCE_EXHAUSTED); `retry_after_ms` is a hint for the caller."""

    code: ClassVar[str] = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after_ms: int = 1000) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class NoModelLoaded(AgentError):
    """No model is active yet (UNAVAILABLE)."""

    code: ClassVar[str] = "UNAVAILABLE"


class Cancelled(AgentError):
    """The caller went away or the agent is shutting down (CANCELLED)."""

    code: ClassVar[str] = "CANCELLED"


class ModelLoadError(AgentError):
    """onnxruntime-genai could not load a slot folder."""

    code: ClassVar[str] = "UNAVAILABLE"


class PackageRejected(AgentError):
    """An update was refused or failed; `reason` is what the device reports."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BlobError(AgentError):
    """A chunk or a blob failed a check (size, index, SHA-256)."""


class EnrollError(AgentError):
    """Enrollment failed; the message is one line for the operator."""


class StateDirLocked(AgentError):
    """Another agent process holds the state folder."""


def status_name(exc: BaseException) -> str:
    """The status code name for an exception: the agent's own errors carry theirs; a deadline is
    DEADLINE_EXCEEDED; anything else is INTERNAL (a bug, logged where it is caught)."""
    if isinstance(exc, AgentError):
        return exc.code
    if isinstance(exc, TimeoutError):
        return "DEADLINE_EXCEEDED"
    return "INTERNAL"
