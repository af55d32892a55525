"""The states of a rollout, of its waves and of each target device: stable names, stored in the
database and shown by the API and the CLI as these very strings.

A target's state is one of `TargetState` (the fleet's own) or a device's reported update state
(`slmops_protos.states.UpdateState`: FETCHING ... COMMITTED, ROLLED_BACK).
"""

from __future__ import annotations

import enum

from slmops_protos.states import UpdateState


class _Name(str, enum.Enum):
    """A state whose str() and f-string are its stored name (Python 3.11 would print `Class.MEMBER`)."""

    def __str__(self) -> str:
        return str(self.value)


class RolloutState(_Name):
    IN_PROGRESS = "in_progress"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    ROLLED_BACK = "rolled_back"  # a gate failed: every touched device got its previous package back
    CANCELLED = "cancelled"


class WaveState(_Name):
    PENDING = "pending"
    RUNNING = "running"  # desired states published; waiting for COMMITTED / ROLLED_BACK or the timeout
    SOAKING = "soaking"  # every device finished; waiting out the soak time before the gates
    PASSED = "passed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TargetState(_Name):
    """A target device's state before and after the device itself reports (`UpdateState`)."""

    WAITING = "WAITING"  # in a wave that has not started
    PENDING = "PENDING"
    SUPERSEDED = "SUPERSEDED"
    TIMED_OUT = "TIMED_OUT"
    ABORTED = "ABORTED"  # still updating when the rollout was rolled back
    CANCELLED = "CANCELLED"  # its wave never started
    NO_VARIANT = "NO_VARIANT"  # the device can run none of the release's variants (reason says why)


# The stored names (plain strings, also for SQL parameters).
ACTIVE_ROLLOUT_STATES: frozenset[str] = frozenset(s.value for s in (RolloutState.IN_PROGRESS, RolloutState.PAUSED))
TERMINAL_TARGET_STATES: frozenset[str] = frozenset(
    s.value
    for s in (
        UpdateState.COMMITTED,
        UpdateState.ROLLED_BACK,
        TargetState.SUPERSEDED,
        TargetState.TIMED_OUT,
        TargetState.ABORTED,
        TargetState.CANCELLED,
        TargetState.NO_VARIANT,
    )
)
NO_WAVE = -1  # the wave of a NO_VARIANT target
