"""The wave planner: which devices a rollout updates in which wave.

- Waves are cumulative: `1,50%,100%` means one device first, then up to half of the target, then
  all. A count is a number of devices, a percent is rounded up; a wave that adds nobody is dropped,
  and the last wave always takes every remaining device.
- A wave may instead be a selector (`tag=canary`): the devices it matches, whatever their number.
  Selector waves come first; the count and percent waves after them are of the devices they left
  (`tag=canary,10%,100%`: the canaries, then a tenth of the rest, then all). A selector wave that
  matches nobody is dropped; after selector waves alone, a last wave of the rest is added. In a
  text of waves a selector runs up to the next count or percent (its commas are AND).
- Devices are assigned to waves deterministically: ordered by SHA-256 of (salt, device id), the salt
  being the rollout id, so the same rollout always plans the same waves, and canaries are not
  always the devices that enrolled first.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MAX_WAVES = 100
_WAVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")
_NUMERIC = re.compile(r"^\s*[\d.]+\s*%?\s*$")


class PlanError(ValueError):
    """A wave specification or gate that cannot be used; str() says why."""


@dataclass(frozen=True)
class WaveSpec:
    """One cumulative wave boundary: `count` devices or `percent` of the target, or the devices a
    `selector` matches (checked by `slmops_fleet.rollouts.plan.RolloutPlan`)."""

    count: int | None = None
    percent: float | None = None
    selector: str | None = None

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

    @property
    def numeric(self) -> bool:
        return self.selector is None

    def cumulative(self, total: int) -> int:
        if self.percent is not None:
            return min(total, math.ceil(total * self.percent / 100 - 1e-9))
        assert self.count is not None
        return min(total, self.count)

    def __str__(self) -> str:
        if self.selector is not None:
            return self.selector
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


def _split(text: str) -> list[str]:
    """'tag=canary,arch=x86_64,10%,100%' -> ['tag=canary,arch=x86_64', '10%', '100%']."""
    out: list[str] = []
    joining = False
    for piece in text.split(","):
        if not piece.strip():
            continue
        if _NUMERIC.match(piece):
            out.append(piece.strip())
            joining = False
        elif joining:
            out[-1] += "," + piece
        else:
            out.append(piece.strip())
            joining = True
    return out


def parse_waves(specs: Sequence[str] | str | None) -> list[WaveSpec]:
    """'1,50%,100%' or ['1', '50%', '100%'] or 'tag=canary,10%,100%' -> WaveSpecs (each item of a list
    is split at the commas that end a selector); None or empty: one wave of 100%."""
    if specs is None:
        items: list[str] = []
    elif isinstance(specs, str):
        items = _split(specs)
    else:
        items = [s for item in specs for s in _split(str(item))]
    if not items:
        return [WaveSpec(percent=100.0)]
    if len(items) > MAX_WAVES:
        raise PlanError(f"at most {MAX_WAVES} waves, got {len(items)}")
    out = [WaveSpec.parse(s) if _NUMERIC.match(s) else WaveSpec(selector=s.strip()) for s in items]
    for before, after in itertools.pairwise(out):
        if before.numeric and not after.numeric:
            raise PlanError(
                f"wave {str(after)!r} is neither a device count (5) nor a percent (25%), and a selector wave "
                "must come before the count and percent waves"
            )
    return out


def wave_order(device_ids: Sequence[str], salt: str) -> list[str]:
    """The deterministic order devices join waves in."""
    return sorted(set(device_ids), key=lambda d: (hashlib.sha256(f"{salt}\0{d}".encode()).hexdigest(), d))


def plan_waves(
    device_ids: Sequence[str],
    waves: Sequence[WaveSpec],
    salt: str,
    matches: Callable[[str, str], bool] | None = None,
) -> list[list[str]]:
    """Split devices into waves (each a sorted list of device ids); never an empty wave.
    `matches(selector, device_id)` says whether a device belongs to a selector wave."""
    ordered = wave_order(device_ids, salt)
    out: list[list[str]] = []
    picked: set[str] = set()
    for w in waves:
        if w.selector is None:
            continue
        if matches is None:
            raise PlanError(f"wave {w}: selector waves need the devices' tags and inventory")
        members = [d for d in ordered if d not in picked and matches(w.selector, d)]
        picked.update(members)
        if members:
            out.append(sorted(members))
    ordered = [d for d in ordered if d not in picked]
    numeric = [w for w in waves if w.numeric] or [WaveSpec(percent=100.0)]
    total = len(ordered)
    done = 0
    for i, w in enumerate(numeric):
        upto = w.cumulative(total)
        if upto < done:
            raise PlanError(f"waves must not shrink: wave {i + 1} ({w}) covers fewer devices than the one before")
        if i == len(numeric) - 1:
            upto = total
        if upto > done:
            out.append(sorted(ordered[done:upto]))
            done = upto
    if done < total:  # unreachable (the last wave takes the rest), kept as a guard
        out.append(sorted(ordered[done:]))
    return out
