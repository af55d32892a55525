"""The persisted update-state record (`state.json`) and the recovery table.

The record is written atomically (temp file, fsync, rename, fsync of the folder) BEFORE the
side effect of each state. Its `active_slot` is the truth about what serves: writing the
COMMITTED record is the flip; the `current` symlink follows it.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from slmops_agent.errors import AgentError
from slmops_agent.layout import SLOTS, write_atomic
from slmops_protos.states import UpdateState

RECORD_VERSION = 1


# A state's side effect, in the order the updater runs them. The record says "I am in state X";
# the side effect of X runs after the record is durable.
SIDE_EFFECTS: dict[UpdateState, str] = {
    UpdateState.IDLE: "none",
    UpdateState.FETCHING: "fetch the blobs the package needs (partial files + chunk bitmaps)",
    UpdateState.VERIFYING: "re-hash every blob of the package",
    UpdateState.STAGED: "wipe the inactive slot and link the package's files into it",
    UpdateState.TESTING: "load the staged slot and run the golden prompts within the budget",
    UpdateState.COMMITTED: "point `current` at the new slot and hot-swap the serving model",
    UpdateState.ROLLED_BACK: "wipe the half-staged slot; keep serving the active slot",
}


class Recovery(enum.Enum):
    """What the agent does at start-up for the state it finds in the record."""

    NOTHING = "serve the active slot"
    RESUME_FETCH = "resume the download from the persisted bitmaps"
    VERIFY_AGAIN = "verify again (idempotent)"
    STAGE_AGAIN = "wipe the half-staged slot and stage again"
    TEST_AGAIN_ONCE = "test again once; a second interruption in TESTING rolls back"
    FINISH_COMMIT = "re-point `current` at the record's active slot and serve it"
    FINISH_ROLLBACK = "wipe the target slot if it was being staged; serve the active slot"


RECOVERY: dict[UpdateState, Recovery] = {
    UpdateState.IDLE: Recovery.NOTHING,
    UpdateState.FETCHING: Recovery.RESUME_FETCH,
    UpdateState.VERIFYING: Recovery.VERIFY_AGAIN,
    UpdateState.STAGED: Recovery.STAGE_AGAIN,
    UpdateState.TESTING: Recovery.TEST_AGAIN_ONCE,
    UpdateState.COMMITTED: Recovery.FINISH_COMMIT,
    UpdateState.ROLLED_BACK: Recovery.FINISH_ROLLBACK,
}

# Allowed transitions (ROLLED_BACK from any; a new target from a terminal state or FETCHING).
TRANSITIONS: dict[UpdateState, frozenset[UpdateState]] = {
    UpdateState.IDLE: frozenset({UpdateState.FETCHING, UpdateState.COMMITTED}),
    UpdateState.FETCHING: frozenset({UpdateState.FETCHING, UpdateState.VERIFYING, UpdateState.COMMITTED}),
    UpdateState.VERIFYING: frozenset({UpdateState.STAGED}),
    UpdateState.STAGED: frozenset({UpdateState.TESTING}),
    UpdateState.TESTING: frozenset({UpdateState.COMMITTED}),
    UpdateState.COMMITTED: frozenset({UpdateState.FETCHING, UpdateState.COMMITTED}),
    UpdateState.ROLLED_BACK: frozenset({UpdateState.FETCHING, UpdateState.COMMITTED}),
}
TERMINAL = frozenset({UpdateState.IDLE, UpdateState.COMMITTED, UpdateState.ROLLED_BACK})
MAX_TRANSITIONS_PER_TARGET = 32  # more writes than this for one target is a loop: roll back
MAX_TEST_ATTEMPTS = 2


class StateError(AgentError):
    """state.json is unreadable or a transition is not allowed."""


@dataclass(frozen=True)
class SlotInfo:
    package_id: str
    name: str
    version: str
    profile: str = ""
    base_package_id: str = ""  # an adapter package: the model package it runs on (staged with it)
    adapters: tuple[str, ...] = ()  # the other adapter packages on that base the slot keeps serving


@dataclass(frozen=True)
class TestSummary:
    """What TESTING found for the record's target (reported as `ReportedState.test`)."""

    ran: bool = False
    passed: bool = False
    prompts: int = 0
    judged: int = 0  # prompts with a reference answer
    matched: int = 0  # judged prompts whose output equals the reference
    seconds: float = 0.0
    adapter: str = ""


@dataclass(frozen=True)
class UpdateRecord:
    state: UpdateState = UpdateState.IDLE
    generation: int = 0  # the newest desired generation handled
    rollout_id: str = ""
    target_package_id: str = ""
    target_version: str = ""
    target_slot: str = ""
    chunk_size: int = 0
    local_source: str = ""  # a side-loaded package's folder (empty: blobs come over MQTT)
    bytes_needed: int = 0  # what the target's blobs missing at its start weigh (0: all were here)
    bytes_received: int = 0  # of those, what was received by the last state change
    active_slot: str = ""  # "" while nothing is installed
    slots: dict[str, SlotInfo | None] = field(default_factory=lambda: dict.fromkeys(SLOTS))
    reason: str = ""
    test: TestSummary | None = None  # the target's TESTING outcome (None until TESTING ran)
    test_attempts: int = 0
    security_version: int = 0  # the highest security version committed: packages below it are refused
    transitions: int = 0  # record writes for the current target
    writes: int = 0  # record writes ever
    updated_unix_ms: int = 0
    version: int = RECORD_VERSION

    @property
    def active(self) -> SlotInfo | None:
        return self.slots.get(self.active_slot) if self.active_slot else None

    @property
    def inactive_slot(self) -> str:
        return "b" if self.active_slot == "a" else "a"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UpdateRecord:
        if data.get("version") != RECORD_VERSION:
            raise StateError(f"state.json version {data.get('version')!r} is not {RECORD_VERSION}")
        slots: dict[str, SlotInfo | None] = dict.fromkeys(SLOTS)
        for name, info in (data.get("slots") or {}).items():
            if name in SLOTS and info:
                slots[name] = SlotInfo(**{**info, "adapters": tuple(info.get("adapters") or ())})
        active = str(data.get("active_slot", ""))
        if active and active not in SLOTS:
            raise StateError(f"state.json names an unknown active slot {active!r}")
        return cls(
            state=UpdateState(data["state"]),
            generation=int(data.get("generation", 0)),
            rollout_id=str(data.get("rollout_id", "")),
            target_package_id=str(data.get("target_package_id", "")),
            target_version=str(data.get("target_version", "")),
            target_slot=str(data.get("target_slot", "")),
            chunk_size=int(data.get("chunk_size", 0)),
            local_source=str(data.get("local_source", "")),
            bytes_needed=int(data.get("bytes_needed", 0)),
            bytes_received=int(data.get("bytes_received", 0)),
            active_slot=active,
            slots=slots,
            reason=str(data.get("reason", "")),
            test=TestSummary(**data["test"]) if data.get("test") else None,
            test_attempts=int(data.get("test_attempts", 0)),
            security_version=int(data.get("security_version", 0)),
            transitions=int(data.get("transitions", 0)),
            writes=int(data.get("writes", 0)),
            updated_unix_ms=int(data.get("updated_unix_ms", 0)),
        )


class StateStore:
    """Loads and atomically saves the record; counts writes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> UpdateRecord:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return UpdateRecord()
        except (OSError, ValueError) as exc:
            raise StateError(f"cannot read {self.path}: {exc}") from exc
        try:
            return UpdateRecord.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{self.path} is malformed: {exc}") from exc

    def save(self, record: UpdateRecord) -> UpdateRecord:
        record = replace(record, writes=record.writes + 1, updated_unix_ms=int(time.time() * 1000))
        write_atomic(self.path, (json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n").encode())
        return record


def check_transition(old: UpdateState, new: UpdateState) -> None:
    if new is UpdateState.ROLLED_BACK or new in TRANSITIONS[old]:
        return
    raise StateError(f"transition {old.value} -> {new.value} is not allowed")
