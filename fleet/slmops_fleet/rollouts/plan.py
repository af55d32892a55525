"""A rollout's plan: its waves, soak time, wave timeout, gates and target selector (stored as JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slmops_fleet.rollouts.gates import Gates
from slmops_fleet.rollouts.selectors import parse_selector
from slmops_fleet.rollouts.waves import PlanError, parse_waves


@dataclass(frozen=True)
class RolloutPlan:
    """How a rollout proceeds; stored as JSON with the rollout."""

    waves: list[str]  # the specs as given, e.g. ["1", "50%", "100%"]
    soak_s: float = 0.0
    wave_timeout_s: float | None = None
    gates: Gates = field(default_factory=Gates)
    selector: str = ""  # narrows the target: tags and inventory terms, e.g. "tag=canary,memory_bytes>=2e9"

    def __post_init__(self) -> None:
        parse_selector(self.selector)
        for wave in parse_waves(self.waves):
            if wave.selector is not None:
                parse_selector(wave.selector)
        if self.soak_s < 0:
            raise PlanError("soak time must be 0 or more")
        if self.wave_timeout_s is not None and self.wave_timeout_s <= 0:
            raise PlanError("wave timeout must be above 0")

    def selectors(self) -> list[str]:
        """The target selector and the selector waves' (what may name groups)."""
        return [s for s in [self.selector, *(w.selector or "" for w in parse_waves(self.waves))] if s]

    def to_json(self) -> dict[str, Any]:
        return {
            "waves": list(self.waves),
            "soak_s": self.soak_s,
            "wave_timeout_s": self.wave_timeout_s,
            "gates": self.gates.to_json(),
            "selector": self.selector,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> RolloutPlan:
        data = data or {}
        return cls(
            waves=list(data.get("waves") or ["100%"]),
            soak_s=float(data.get("soak_s") or 0.0),
            wave_timeout_s=data.get("wave_timeout_s"),
            gates=Gates.from_json(data.get("gates")),
            selector=str(data.get("selector") or ""),
        )
