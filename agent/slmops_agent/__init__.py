"""slmops agent: the on-device side (enrollment, updates over MQTT, local gRPC inference)."""

from slmops_agent.errors import (
    AgentError,
    Cancelled,
    EnrollError,
    InvalidRequest,
    NoModelLoaded,
    NotFound,
    PackageRejected,
    QueueFull,
    status_name,
)
from slmops_agent.settings import AgentSettings, load_settings
from slmops_protos import __version__

__all__ = [
    "AgentError",
    "AgentSettings",
    "Cancelled",
    "EnrollError",
    "InvalidRequest",
    "NoModelLoaded",
    "NotFound",
    "PackageRejected",
    "QueueFull",
    "__version__",
    "load_settings",
    "status_name",
]
