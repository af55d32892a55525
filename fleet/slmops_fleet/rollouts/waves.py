"""The wave planner: which devices a rollout updates in which wave.

- Waves are cumulative: `1,50%,100%` means one device first, then up to half of the target, then
  all. A count is a number of devices, a percent is rounded up; a wave that adds nobody is dropped,
  and the last wave always takes every remaining device.
- Devices are assigned to waves deterministically: ordered by SHA-256 of (salt, device id), the salt
  being the rollout id, so the same rollout always plans the same waves, and canaries are not
  always the devices that enrolled first.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_WAVES = 100
_WAVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


class PlanError(ValueError):
    """A wave specification or gate that cannot be used; str() says why."""


@dataclass(frozen=True)
class WaveSpec:
    """One cumulative wave boundary: `count` devices or `percent` of the target."""

    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str) -> WaveSpec:
        m = _WAVE.match(str(text))
        if not m:
            raise PlanError(f"wave {text!r} is neither a device count (5) nor a percent (25%)")
        number, pct = float(m.group(1)), bool(m.group(2))
        if pct:
            if not 0 < number <= 100:
                raise PlanError(f"wave {text!r}: a percent must be above 0 and at most 100")
            return cls(percent=number)
        if number != int(number) or number < 1:
            raise PlanError(f"wave {text!r}: a device count must be a whole number of at least 1")
        return cls(count=int(number))

    def cumulative(self, total: int) -> int:
        if self.percent is not None:
            return min(total, math.ceil(total * self.percent / 100 - 1e-9))
        assert self.count is not None
        return min(total, self.count)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


def parse_waves(specs: Sequence[str] | str | None) -> list[WaveSpec]:
    """'1,50%,100%' or ['1', '50%', '100%'] -> WaveSpecs; None or empty: one wave of 100%."""
    if specs is None:
        items: list[str] = []
    elif isinstance(specs, str):
        items = [s for s in specs.split(",") if s.strip()]
    else:
        items = [s for item in specs for s in str(item).split(",") if s.strip()]
    if not items:
        return [WaveSpec(percent=100.0)]
    if len(items) > MAX_WAVES:
        raise PlanError(f"at most {MAX_WAVES} waves, got {len(items)}")
    return [WaveSpec.parse(s) for s in items]


def wave_order(device_ids: Sequence[str], salt: str) -> list[str]:
    """The deterministic order devices join waves in."""
    return sorted(set(device_ids), key=lambda d: (hashlib.sha256(f"{salt}\0{d}".encode()).hexdigest(), d))


def plan_waves(device_ids: Sequence[str], waves: Sequence[WaveSpec], salt: str) -> list[list[str]]:
    """Split devices into waves (each a sorted list of device ids); never an empty wave."""
    ordered = wave_order(device_ids, salt)
    total = len(ordered)
    out: list[list[str]] = []
    done = 0
    for i, w in enumerate(waves):
        upto = w.cumulative(total)
        if upto < done:
            raise PlanError(f"waves must not shrink: wave {i + 1} ({w}) covers fewer devices than the one before")
        if i == len(waves) - 1:
            upto = total
        if upto > done:
            out.append(sorted(ordered[done:upto]))
            done = upto
    if done < total:  # unreachable (the last wave takes the rest), kept as a guard
        out.append(sorted(ordered[done:]))
    return out
