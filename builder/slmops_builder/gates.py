"""Quality, speed and size gates: thresholds a variant must meet to be packaged.

Each gate names one metric of the variant's evaluation (see `slmops_builder.evaluate`) and a bound.
Ratios (`ppl_ratio`, `size_ratio`) are relative to the recipe's reference variant. A gate passes
only when its metric was measured and meets the bound; a metric that could not be measured (a CUDA
variant on a machine without a GPU, say) fails the gate with that reason. Gates whose metric can
never exist for a recipe (a ratio without a reference, task accuracy without a task set) are
refused when the recipe is loaded, before any work.

`gate_variants` gives each variant of a recipe build its verdict: packaged, failed gates, not
selected (a fallback chain packages only its first variant that passes) or reference only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["GATES", "GateResult", "GatedVariant", "Gates", "check_gates", "gate_variants"]

# gate name -> (metric, "max" | "min", unit for messages)
GATES: Mapping[str, tuple[str, str, str]] = {
    "max_ppl_ratio": ("ppl_ratio", "max", "x"),
    "max_perplexity": ("perplexity", "max", ""),
    "min_decode_tps": ("decode_tps", "min", " tok/s"),
    "max_ttft_ms": ("ttft_ms", "max", " ms"),
    "max_size_mb": ("size_mb", "max", " MiB"),
    "max_size_ratio": ("size_ratio", "max", "x"),
    "max_peak_rss_mb": ("peak_rss_mb", "max", " MiB"),
    "min_task_accuracy": ("task_accuracy", "min", ""),
}
RATIO_GATES = frozenset({"max_ppl_ratio", "max_size_ratio"})


class Gates(BaseModel):
    """The `[gates]` table of a recipe; every gate is optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reference: str | None = Field(
        default=None, description="Profile the ratios are relative to [default: cpu-fp32 when built]."
    )
    max_ppl_ratio: float | None = Field(default=None, gt=0)
    max_perplexity: float | None = Field(default=None, gt=0)
    min_decode_tps: float | None = Field(default=None, ge=0)
    max_ttft_ms: float | None = Field(default=None, gt=0)
    max_size_mb: float | None = Field(default=None, gt=0)
    max_size_ratio: float | None = Field(default=None, gt=0)
    max_peak_rss_mb: float | None = Field(default=None, gt=0)
    min_task_accuracy: float | None = Field(default=None, ge=0, le=1)

    def thresholds(self) -> dict[str, float]:
        """gate name -> bound, for the gates that are set."""
        return {name: float(v) for name in GATES if (v := getattr(self, name)) is not None}

    def needs_reference(self) -> bool:
        return any(getattr(self, name) is not None for name in RATIO_GATES)


@dataclass(frozen=True)
class GateResult:
    gate: str
    metric: str
    threshold: float
    measured: float | None
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {
            "gate": self.gate,
            "metric": self.metric,
            "threshold": self.threshold,
            "measured": self.measured,
            "passed": self.passed,
            "reason": self.reason,
        }


def check_gates(
    thresholds: Mapping[str, float], metrics: Mapping[str, float], *, unmeasured: str = "not measured"
) -> list[GateResult]:
    """Check each gate against `metrics`; `unmeasured` explains a missing metric."""
    out: list[GateResult] = []
    for gate, bound in thresholds.items():
        metric, kind, unit = GATES[gate]
        value = metrics.get(metric)
        if value is None:
            out.append(GateResult(gate, metric, bound, None, False, f"{gate}: {metric} {unmeasured}"))
            continue
        passed = value <= bound if kind == "max" else value >= bound
        op = ("<=" if passed else ">") if kind == "max" else (">=" if passed else "<")
        reason = f"{gate}: {metric} {value:.4g}{unit} {op} {bound:g}{unit}"
        out.append(GateResult(gate, metric, bound, float(value), passed, reason))
    return out


class GatedVariant(Protocol):
    """What `gate_variants` reads and sets on a variant (a recipe's `VariantResult`)."""

    profile: str
    metrics: dict[str, float]
    size_bytes: int
    gates: list[GateResult]
    verdict: str
    reason: str

    @property
    def passed(self) -> bool: ...


def gate_variants(
    variants: Sequence[GatedVariant],
    *,
    reference: str | None,
    thresholds: Mapping[str, float],
    to_package: Sequence[str],
    fallback: Sequence[str],
    runnable: Mapping[str, bool],
) -> None:
    """Add the ratios to the reference, check the gates and set each variant's verdict and reason.
    `to_package`: the profiles asked for; `fallback`: the chain of which only the first that passes
    is packaged; `runnable`: profile -> whether this machine could evaluate it."""
    ref = next((v for v in variants if v.profile == reference), None)
    for v in variants:
        if ref is not None:
            if "perplexity" in v.metrics and "perplexity" in ref.metrics:
                v.metrics["ppl_ratio"] = v.metrics["perplexity"] / ref.metrics["perplexity"]
            v.metrics["size_ratio"] = v.size_bytes / ref.size_bytes
        why = "not measured" if runnable[v.profile] else "not measured: this machine cannot run the variant"
        v.gates = check_gates(thresholds, v.metrics, unmeasured=why)
    chain = list(fallback)
    chosen = next((v.profile for v in variants if v.profile in chain and v.passed), None) if chain else None
    for v in variants:
        failed = "; ".join(g.reason for g in v.gates if not g.passed)
        if v.profile not in to_package:
            v.verdict, v.reason = "reference only", "the gates' reference; not in profiles"
        elif not v.passed:
            v.verdict, v.reason = "failed gates", failed
        elif chain and v.profile in chain and v.profile != chosen:
            v.verdict, v.reason = "not selected", f"fallback chose {chosen}, earlier in {chain}"
        else:
            v.verdict, v.reason = "packaged", "; ".join(g.reason for g in v.gates) or "no gates"
