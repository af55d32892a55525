"""What the updater takes in and hands out: the desired state, the reported state and the blob
requests, as plain values (`slmops_agent.codec` translates them from and to protobuf)."""

from __future__ import annotations

from dataclasses import dataclass

from slmops_agent.update_record import TestSummary
from slmops_protos.states import UpdateState


@dataclass(frozen=True)
class Desired:
    device_id: str
    generation: int
    package_id: str | None  # None: keep what runs
    signed_manifest: bytes = b""
    rollout_id: str = ""
    chunk_size: int = 0


@dataclass(frozen=True)
class Report:
    state: UpdateState
    generation: int
    target_package_id: str
    active_package_id: str
    active_version: str
    active_slot: str
    reason: str = ""
    bytes_needed: int = 0
    bytes_received: int = 0
    test: TestSummary | None = None


@dataclass(frozen=True)
class BlobWant:
    """A BlobRequest: `missing` empty means the whole blob."""

    sha256: str
    missing: tuple[int, ...]
    chunk_size: int
