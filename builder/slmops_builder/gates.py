"""Quality, speed and size gates: thresholds a variant must meet to be packaged.

Each gate names one metric of the variant's evaluation (see `slmops_builder.evaluate`) and a bound.
Ratios (`ppl_ratio`, `size_ratio`) are relative to the recipe's reference variant. A gate passes
only when its metric was measured and meets the bound; a metric that could not be measured (a CUDA
variant on a machine without a GPU, say) fails the gate with that reason. Gates whose metric can
never exist for a recipe (a ratio without a reference, task accuracy without a task set) are
refused when the recipe is loaded, before any work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["GATES", "GateResult", "Gates", "check_gates"]

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
