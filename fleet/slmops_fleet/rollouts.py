"""Rollout rules that need no database: the wave planner, the gates and their evaluation.

- Waves are cumulative: `1,50%,100%` means one device first, then up to half of the target, then
  all. A count is a number of devices, a percent is rounded up; a wave that adds nobody is dropped,
  and the last wave always takes every remaining device.
- Devices are assigned to waves deterministically: ordered by SHA-256 of (salt, device id), the salt
  being the rollout id, so the same rollout always plans the same waves, and canaries are not
  always the devices that enrolled first.
- Gates are checked while a wave runs (install gates: an early abort) and after its soak (all of
  them). A gate whose figures do not exist yet (no finished devices, no telemetry samples) passes
  and says so.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

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


# --- gates ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gates:
    """What a rollout must keep true; None: not checked."""

    min_success_rate: float | None = None  # committed / finished, once `min_devices` have finished
    max_failures: int | None = None  # rolled back or timed out devices tolerated
    min_devices: int = 1  # finished devices before the rate gates judge
    max_error_rate: float | None = None  # inference errors / requests from telemetry
    max_p95_ttft_ms: float | None = None  # p95 of time to first token from telemetry

    def __post_init__(self) -> None:
        if self.min_success_rate is not None and not 0 <= self.min_success_rate <= 1:
            raise PlanError("min_success_rate must be between 0 and 1")
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise PlanError("max_error_rate must be between 0 and 1")
        if self.max_failures is not None and self.max_failures < 0:
            raise PlanError("max_failures must be 0 or more")
        if self.min_devices < 1:
            raise PlanError("min_devices must be at least 1")
        if self.max_p95_ttft_ms is not None and self.max_p95_ttft_ms <= 0:
            raise PlanError("max_p95_ttft_ms must be above 0")

    @property
    def any(self) -> bool:
        return any(
            v is not None for v in (self.min_success_rate, self.max_failures, self.max_error_rate, self.max_p95_ttft_ms)
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Gates:
        return cls(**(data or {}))


@dataclass(frozen=True)
class GateInput:
    """The figures of the devices a rollout touched so far."""

    committed: int = 0
    rolled_back: int = 0
    timed_out: int = 0
    in_flight: int = 0
    requests: int = 0  # from telemetry, on the rollout's package, since the rollout began
    errors: int = 0
    ttft_samples: list[float] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return self.rolled_back + self.timed_out

    @property
    def finished(self) -> int:
        return self.committed + self.failures


@dataclass(frozen=True)
class GateResult:
    ok: bool
    checks: list[dict[str, Any]]  # one per gate: name, ok, value, limit, note

    @property
    def reason(self) -> str:
        failed = [c for c in self.checks if not c["ok"]]
        return "; ".join(c["note"] for c in failed) if failed else "gates passed"


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile."""
    if not values:
        raise ValueError("p95 of no values")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def evaluate_gates(gates: Gates, g: GateInput, *, install_only: bool = False) -> GateResult:
    """Check every configured gate; `install_only` skips the telemetry gates (while a wave runs)."""
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, value: Any, limit: Any, note: str) -> None:
        checks.append({"gate": name, "ok": ok, "value": value, "limit": limit, "note": note})

    if gates.max_failures is not None:
        ok = g.failures <= gates.max_failures
        check(
            "max_failures",
            ok,
            g.failures,
            gates.max_failures,
            f"{g.failures} devices failed ({g.rolled_back} rolled back, {g.timed_out} timed out), "
            f"{gates.max_failures} tolerated",
        )
    if gates.min_success_rate is not None:
        if g.finished < gates.min_devices:
            check(
                "min_success_rate",
                True,
                None,
                gates.min_success_rate,
                f"install success rate not judged yet: {g.finished} of {gates.min_devices} devices finished",
            )
        else:
            rate = g.committed / g.finished
            check(
                "min_success_rate",
                rate >= gates.min_success_rate,
                round(rate, 4),
                gates.min_success_rate,
                f"install success rate {rate:.0%} ({g.committed}/{g.finished}), at least "
                f"{gates.min_success_rate:.0%} required",
            )
    if install_only:
        return GateResult(all(c["ok"] for c in checks), checks)
    if gates.max_error_rate is not None:
        if g.requests <= 0:
            check("max_error_rate", True, None, gates.max_error_rate, "error rate: no inference requests in telemetry")
        else:
            rate = g.errors / g.requests
            check(
                "max_error_rate",
                rate <= gates.max_error_rate,
                round(rate, 4),
                gates.max_error_rate,
                f"error rate {rate:.1%} ({g.errors}/{g.requests} requests), at most {gates.max_error_rate:.1%} allowed",
            )
    if gates.max_p95_ttft_ms is not None:
        if not g.ttft_samples:
            check("max_p95_ttft_ms", True, None, gates.max_p95_ttft_ms, "p95 TTFT: no samples in telemetry")
        else:
            value = p95(g.ttft_samples)
            check(
                "max_p95_ttft_ms",
                value <= gates.max_p95_ttft_ms,
                round(value, 2),
                gates.max_p95_ttft_ms,
                f"p95 time to first token {value:.1f} ms over {len(g.ttft_samples)} samples, at most "
                f"{gates.max_p95_ttft_ms:g} ms allowed",
            )
    return GateResult(all(c["ok"] for c in checks), checks)


def counter_delta(values: Sequence[int]) -> int:
    """Growth of a cumulative counter over time-ordered samples; a drop (an agent restart) starts over."""
    total = 0
    for prev, cur in itertools.pairwise(values):
        total += cur - prev if cur >= prev else cur
    return total


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
        if self.soak_s < 0:
            raise PlanError("soak time must be 0 or more")
        if self.wave_timeout_s is not None and self.wave_timeout_s <= 0:
            raise PlanError("wave timeout must be above 0")

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


# --- targets: device tags and inventory selectors ---------------------------------------------------------

MAX_TAGS = 32
_TAG = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_TERM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*(>=|<=|!=|=|>|<)\s*(.*?)\s*$")
_ORDERING = {">=", "<=", ">", "<"}


def check_tags(tags: Sequence[str]) -> list[str]:
    """Valid, deduplicated, sorted tags, or a PlanError naming the bad one."""
    for tag in tags:
        if not _TAG.match(tag):
            raise PlanError(f"tag {tag[:80]!r} must be 1-64 letters, digits or _ . : -")
    out = sorted(set(tags))
    if len(out) > MAX_TAGS:
        raise PlanError(f"a device has at most {MAX_TAGS} tags, got {len(out)}")
    return out


@dataclass(frozen=True)
class Term:
    key: str
    op: str
    value: str

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"


def _number(text: Any) -> float | None:
    if isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        return float(text)
    try:
        return float(str(text))
    except ValueError:
        return None


def parse_selector(text: str | None) -> list[Term]:
    """'tag=canary,arch=x86_64,memory_bytes>=2e9': every term must hold (AND).

    Keys: `tag` (= has the tag, != lacks it), `id`, `name`, or any inventory key (os, arch, cpu_count,
    memory_bytes, disk_free_bytes, providers, cpu_features, agent_version). Numbers compare as numbers
    (>=, <=, >, <, =, !=); a list (providers, cpu_features) `=` means it contains the value."""
    if text is None or not text.strip():
        return []
    terms = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        m = _TERM.match(raw)
        if not m or not m.group(3):
            raise PlanError(f"selector term {raw.strip()[:80]!r} is not KEY=VALUE, KEY!=VALUE or KEY>=NUMBER")
        key, op, value = m.group(1), m.group(2), m.group(3)
        if op in _ORDERING and _number(value) is None:
            raise PlanError(f"selector term {raw.strip()!r}: {op} needs a number")
        if key == "tag" and op not in ("=", "!="):
            raise PlanError(f"selector term {raw.strip()!r}: tags take = or != only")
        terms.append(Term(key, op, value))
    return terms


def _term_holds(term: Term, device_id: str, name: str, tags: Sequence[str], inventory: dict[str, Any]) -> bool:
    if term.key == "tag":
        return (term.value in tags) == (term.op == "=")
    if term.key == "id":
        have: Any = device_id
    elif term.key == "name":
        have = name
    elif term.key in inventory:
        have = inventory[term.key]
    else:
        return False
    if isinstance(have, list):
        if term.op not in ("=", "!="):
            return False
        return (term.value in [str(x) for x in have]) == (term.op == "=")
    left, right = _number(have), _number(term.value)
    if left is not None and right is not None and not isinstance(have, str):
        return {
            "=": left == right,
            "!=": left != right,
            ">=": left >= right,
            "<=": left <= right,
            ">": left > right,
            "<": left < right,
        }[term.op]
    if term.op in _ORDERING:
        return False
    return (str(have) == term.value) == (term.op == "=")


def selector_matches(
    terms: Sequence[Term], *, device_id: str, name: str, tags: Sequence[str], inventory: dict[str, Any]
) -> bool:
    return all(_term_holds(t, device_id, name, tags, inventory) for t in terms)
