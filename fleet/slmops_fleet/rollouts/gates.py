"""A rollout's gates and their evaluation (no database: the figures come in a `GateInput`).

- Gates are checked while a wave runs (install gates: an early abort) and after its soak (all of
  them). A gate whose figures do not exist yet (no finished devices, no telemetry samples) passes
  and says so.
- The quality gates read what each device's TESTING reported (`ReportedState.test`), so they are
  judged while a wave runs, like the install gates: `min_quality_score` is the share of judged
  golden prompts (those with a builder reference) whose on-device output matched, pooled over the
  devices that reported one; `min_health_pass_rate` is the share of devices whose TESTING passed
  (loaded, answered every prompt, within the latency budget) among those that ran it. A device
  commits a package whose prompts differ from the references; the quality gate is what aborts.
- A device's counts are bounded by the package its report is about (`bound_test`): it cannot
  have run more golden prompts than the package holds, nor judged more than have a reference, so
  one device cannot outweigh the others in the pooled score by claiming a million matches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from slmops_fleet.rollouts.waves import PlanError


@dataclass(frozen=True)
class GoldenPrompts:
    """What TESTING can count for a package: the prompts a device runs and those it can judge."""

    prompts: int  # the manifest's golden prompts (an agent runs one default prompt when it has none)
    judged: int  # of them with a builder reference

    def bound(self, test: dict[str, Any]) -> dict[str, Any]:
        """A device's TESTING result with its counts at most what this package allows."""
        prompts = min(int(test.get("prompts") or 0), self.prompts)
        judged = min(int(test.get("judged") or 0), self.judged, prompts)
        matched = min(int(test.get("matched") or 0), judged)
        return {**test, "prompts": prompts, "judged": judged, "matched": matched}


@dataclass(frozen=True)
class Gates:
    """What a rollout must keep true; None: not checked."""

    min_success_rate: float | None = None  # committed / finished, once `min_devices` have finished
    max_failures: int | None = None  # rolled back or timed out devices tolerated
    min_devices: int = 1  # finished devices before the rate gates judge
    max_error_rate: float | None = None  # inference errors / requests from telemetry
    max_p95_ttft_ms: float | None = None  # p95 of time to first token from telemetry
    min_quality_score: float | None = None  # matched / judged golden prompts, from the devices' TESTING
    min_health_pass_rate: float | None = None  # devices whose TESTING passed / devices that ran it

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
        for name in ("min_quality_score", "min_health_pass_rate"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise PlanError(f"{name} must be between 0 and 1")

    @property
    def any(self) -> bool:
        return any(
            v is not None
            for v in (
                self.min_success_rate,
                self.max_failures,
                self.max_error_rate,
                self.max_p95_ttft_ms,
                self.min_quality_score,
                self.min_health_pass_rate,
            )
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
    tests_ran: int = 0  # devices whose TESTING ran for the rollout's package
    tests_passed: int = 0
    scored: int = 0  # devices that reported judged golden prompts
    golden_judged: int = 0
    golden_matched: int = 0

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
    if gates.min_quality_score is not None:
        if g.scored < gates.min_devices or g.golden_judged == 0:
            check(
                "min_quality_score",
                True,
                None,
                gates.min_quality_score,
                f"on-device quality not judged yet: {g.scored} of {gates.min_devices} devices reported golden "
                "prompts with references",
            )
        else:
            score = g.golden_matched / g.golden_judged
            check(
                "min_quality_score",
                score >= gates.min_quality_score,
                round(score, 4),
                gates.min_quality_score,
                f"on-device quality score {score:.0%} ({g.golden_matched}/{g.golden_judged} golden prompts matched "
                f"the reference on {g.scored} devices), at least {gates.min_quality_score:.0%} required",
            )
    if gates.min_health_pass_rate is not None:
        if g.tests_ran < gates.min_devices:
            check(
                "min_health_pass_rate",
                True,
                None,
                gates.min_health_pass_rate,
                f"health checks not judged yet: {g.tests_ran} of {gates.min_devices} devices ran TESTING",
            )
        else:
            rate = g.tests_passed / g.tests_ran
            check(
                "min_health_pass_rate",
                rate >= gates.min_health_pass_rate,
                round(rate, 4),
                gates.min_health_pass_rate,
                f"health-check pass rate {rate:.0%} ({g.tests_passed}/{g.tests_ran} devices passed TESTING), at "
                f"least {gates.min_health_pass_rate:.0%} required",
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
