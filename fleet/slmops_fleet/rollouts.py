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
- The quality gates read what each device's TESTING reported (`ReportedState.test`), so they are
  judged while a wave runs, like the install gates: `min_quality_score` is the share of judged
  golden prompts (those with a builder reference) whose on-device output matched, pooled over the
  devices that reported one; `min_health_pass_rate` is the share of devices whose TESTING passed
  (loaded, answered every prompt, within the latency budget) among those that ran it. A device
  commits a package whose prompts differ from the references; the quality gate is what aborts.
- Hardware-aware selection (`select_variant`): a variant is runnable on a device when its
  execution provider is among the device's providers (CPU always is), the device's memory is at
  least the profile's `min_memory_bytes`, and, for an adapter package, the device runs its base
  (the active package, or the base of the active adapter package). Among the runnable ones the
  device gets, in order: an accelerator before the CPU (TensorRT, CUDA, ROCm, DirectML, QNN,
  OpenVINO, CoreML, WebGPU, then CPU), then the higher precision (fp32 > fp16/bf16 > int8 > int4),
  then the larger memory need (the bigger variant that still fits), then the package id.
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


# --- hardware-aware selection ------------------------------------------------------------------------------

# onnxruntime's provider names for a profile's `execution_provider`, best first (CPU last).
PROVIDERS: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_PROVIDER_RANK = {name: i for i, name in enumerate(PROVIDERS)}
_PRECISION_RANK = {"fp32": 4, "fp16": 3, "bf16": 3, "int8": 2, "int4": 1}


@dataclass(frozen=True)
class Variant:
    """What selection needs to know about one package of a release."""

    package_id: str
    kind: str  # "model" or "adapter"
    profile: str
    provider: str = "cpu"  # the profile's execution_provider ("" means cpu)
    precision: str = ""
    min_memory_bytes: int = 0
    base_package_id: str = ""  # an adapter package: the model package it needs
    cpu_features: tuple[str, ...] = ()  # CPU flags the device must report (its inventory's cpu_features)


@dataclass(frozen=True)
class Selection:
    """The variant a device gets (None: it can run none) and why, with every candidate's verdict."""

    package_id: str | None
    reason: str
    candidates: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"package_id": self.package_id, "reason": self.reason, "candidates": self.candidates}


def _rank(v: Variant) -> tuple[int, int, int, str]:
    provider = (v.provider or "cpu").lower()
    return (
        _PROVIDER_RANK.get(provider, _PROVIDER_RANK["cpu"] - 1),  # an unknown accelerator: just before the CPU
        -_PRECISION_RANK.get(v.precision.lower(), 0),
        -v.min_memory_bytes,
        v.package_id,
    )


def _verdict(v: Variant, inventory: dict[str, Any], active_base: str) -> str:
    """ "" if the device can run `v`, else why not."""
    if v.kind == "adapter":
        if not active_base:
            return f"an adapter for base {v.base_package_id[:12]}; the device runs no model yet"
        if v.base_package_id != active_base:
            return f"an adapter for base {v.base_package_id[:12]}; the device runs {active_base[:12]}"
        return ""
    provider = (v.provider or "cpu").lower()
    if provider != "cpu":
        wanted = PROVIDERS.get(provider, provider)
        have = [str(p) for p in inventory.get("providers") or []]
        if wanted not in have:
            return f"needs {wanted}; the device has {', '.join(have) or 'no providers reported (CPU assumed)'}"
    flags = {str(f).lower() for f in inventory.get("cpu_features") or []}
    lacking = [f for f in v.cpu_features if f not in flags]
    if lacking:
        return f"needs CPU features {', '.join(lacking)}; the device does not report them"
    memory = int(inventory.get("memory_bytes") or 0)
    if v.min_memory_bytes:
        if memory <= 0:
            return f"needs {v.min_memory_bytes} bytes of memory; the device reported none"
        if memory < v.min_memory_bytes:
            return f"needs {v.min_memory_bytes} bytes of memory; the device has {memory}"
    return ""


def select_variant(variants: Sequence[Variant], *, inventory: dict[str, Any], active_base: str = "") -> Selection:
    """The best variant this device can run (see the module's docstring for the order)."""
    if not variants:
        raise PlanError("no variants to choose from")
    ordered = sorted(variants, key=_rank)
    verdicts = {v.package_id: _verdict(v, inventory, active_base) for v in ordered}
    chosen = next((v for v in ordered if not verdicts[v.package_id]), None)
    candidates: list[dict[str, Any]] = []
    for v in ordered:
        why = verdicts[v.package_id]
        if chosen is not None and not why:
            why = "chosen: the best runnable variant" if v is chosen else f"runnable, but {chosen.profile} ranks higher"
        candidates.append(
            {
                "package_id": v.package_id,
                "profile": v.profile,
                "kind": v.kind,
                "ok": not verdicts[v.package_id],
                "why": why,
            }
        )
    if chosen is None:
        reason = "no runnable variant: " + "; ".join(
            f"{c['profile'] or c['package_id'][:12]}: {c['why']}" for c in candidates
        )
        return Selection(None, reason, candidates)
    provider = (chosen.provider or "cpu").lower()
    detail = f"{chosen.profile or chosen.package_id[:12]}"
    if chosen.kind == "adapter":
        reason = f"{detail}: an adapter for the base the device runs"
    else:
        reason = f"{detail}: {PROVIDERS.get(provider, provider)}, {chosen.precision or 'unknown precision'}"
        if chosen.min_memory_bytes:
            reason += f", needs {chosen.min_memory_bytes} bytes of {int(inventory.get('memory_bytes') or 0)}"
    skipped = sum(1 for c in candidates if not c["ok"])
    if skipped:
        reason += f" ({skipped} of {len(candidates)} variants not runnable here)"
    return Selection(chosen.package_id, reason, candidates)
