"""The agent's own error types. One function in `server.py` maps them to gRPC status codes."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class InvalidRequest(AgentError):
    """A generation request is malformed or out of range (INVALID_ARGUMENT)."""


class NotFound(AgentError):
    """A pinned model version or a named adapter is not here (NOT_FOUND)."""


class QueueFull(AgentError):
    """The request queue is at its bound (RESOURCE_EXHAUSTED)."""


class NoModelLoaded(AgentError):
    """No model is active yet (UNAVAILABLE)."""


class Cancelled(AgentError):
    """The caller went away or the agent is shutting down (CANCELLED)."""


class ModelLoadError(AgentError):
    """onnxruntime-genai could not load a slot folder."""


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
