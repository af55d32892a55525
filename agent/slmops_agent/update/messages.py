"""What the updater takes in and hands out: the desired state, the reported state and the blob
requests, as plain values (`slmops_agent.codec` translates them from and to protobuf)."""

from __future__ import annotations

from dataclasses import dataclass

from slmops_agent.update_record import TestSummary, UpdateRecord
from slmops_protos.states import UpdateState

# The fleet numbers a device's desired states one by one and stores them as signed 64-bit integers:
# a generation further ahead than this, or past that, is forged (a retained message on the device's
# topic), and taking it would make the agent ignore every real desired state after it.
MAX_GENERATION_STEP = 1 << 32
MAX_GENERATION = (1 << 63) - 1


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

    @classmethod
    def of(cls, r: UpdateRecord, *, bytes_received: int) -> Report:
        """The report of the record `r` (`bytes_received`: the record's, or the fetch's live count)."""
        active = r.active
        return cls(
            state=r.state,
            generation=r.generation,
            target_package_id=r.target_package_id,
            active_package_id=active.package_id if active else "",
            active_version=active.version if active else "",
            active_slot=r.active_slot,
            reason=r.reason,
            bytes_needed=r.bytes_needed,
            bytes_received=bytes_received,
            test=r.test,
        )


@dataclass(frozen=True)
class BlobWant:
    """A BlobRequest: `missing` empty means the whole blob."""

    sha256: str
    missing: tuple[int, ...]
    chunk_size: int
    waiting: bool = False  # asked before, connected since, no bad chunk: what it lacks may be on its way


def forged_generation(generation: int, handled: int) -> str:
    """Why a desired generation newer than the handled one cannot be the fleet's ("" when it can be):
    the fleet numbers a device's desired states one by one, so a jump past `MAX_GENERATION_STEP` or
    `MAX_GENERATION` is a forged retained message."""
    if generation > min(handled + MAX_GENERATION_STEP, MAX_GENERATION):
        return (
            f"more than {MAX_GENERATION_STEP} past the handled {handled} (or past {MAX_GENERATION}); "
            "the fleet never skips that far"
        )
    return ""
