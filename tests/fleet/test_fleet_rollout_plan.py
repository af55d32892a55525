"""A rollout's plan without a fleet: the wave planner, the gates (table-driven, the install, telemetry
and on-device quality gates) and the target selectors."""

from __future__ import annotations

from typing import Any

import pytest

from slmops_fleet.rollouts.gates import GateInput, Gates, counter_delta, evaluate_gates, p95
from slmops_fleet.rollouts.plan import RolloutPlan
from slmops_fleet.rollouts.selectors import DeviceFacts, parse_selector
from slmops_fleet.rollouts.waves import PlanError, WaveSpec, parse_waves, plan_waves

DEVICES = [f"dev-{i:02d}" for i in range(10)]


# --- the wave planner ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "n", "sizes"),
    [
        (None, 10, [10]),
        ("100%", 10, [10]),
        ("1,50%,100%", 10, [1, 4, 5]),
        ("1,50%", 10, [1, 9]),  # the last wave takes the rest
        ("1,1,100%", 10, [1, 9]),  # a wave that adds nobody is dropped
        ("10%,100%", 3, [1, 2]),  # percents round up
        ("5,100%", 3, [3]),  # more than there are
        ("1,50%,100%", 1, [1]),
        ("2, 4 ,6", 6, [2, 2, 2]),
        ("33.3%,100%", 3, [1, 2]),
        ("1,20%,100%", 4, [1, 3]),  # 20% of 4 rounds up to the one device already in
    ],
)
def test_plan_waves_sizes(spec: str | None, n: int, sizes: list[int]) -> None:
    waves = plan_waves(DEVICES[:n], parse_waves(spec), "ro-1")
    assert [len(w) for w in waves] == sizes
    assert sorted(d for w in waves for d in w) == DEVICES[:n]  # every device exactly once


def test_plan_waves_is_deterministic_and_salted() -> None:
    specs = parse_waves("1,3,100%")
    a = plan_waves(DEVICES, specs, "ro-a")
    assert a == plan_waves(list(reversed(DEVICES)), specs, "ro-a")  # input order does not matter
    canaries = {plan_waves(DEVICES, specs, f"ro-{i}")[0][0] for i in range(20)}
    assert len(canaries) > 3  # a different rollout picks different canaries


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0", "at least 1"),
        ("1.5", "whole number"),
        ("0%", "above 0"),
        ("101%", "at most 100"),
        ("x", "column 1: unknown key 'x'"),  # not a number: a selector, which must parse
        ("-1", "column 1: '-' cannot start a term|unknown key '-1'"),
        ("1,tag=canary", "a selector wave must come before"),
        (",".join(["1"] * 101), "at most 100 waves"),
    ],
)
def test_bad_wave_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        RolloutPlan(waves=[w.strip() for w in spec.split(",")])


@pytest.mark.parametrize("spec", ["5,2,100%", "5,10%", "50%,1"])
def test_shrinking_waves_are_refused(spec: str) -> None:
    with pytest.raises(PlanError, match="must not shrink"):
        plan_waves(DEVICES, parse_waves(spec), "ro")
    assert WaveSpec.parse("25%") == WaveSpec(percent=25.0) and str(WaveSpec(count=3)) == "3"


# --- gates --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gates", "figures", "install_only", "ok", "note"),
    [
        (Gates(), GateInput(rolled_back=5), False, True, "gates passed"),
        (Gates(max_failures=0), GateInput(committed=3), False, True, "gates passed"),
        (Gates(max_failures=0), GateInput(rolled_back=1), True, False, "1 devices failed"),
        (Gates(max_failures=1), GateInput(rolled_back=1, timed_out=1), True, False, "1 timed out"),
        (Gates(min_success_rate=0.9), GateInput(committed=9, rolled_back=1), False, True, "gates passed"),
        (Gates(min_success_rate=0.9), GateInput(committed=8, rolled_back=2), False, False, "success rate 80%"),
        (Gates(min_success_rate=0.9, min_devices=5), GateInput(rolled_back=2), True, True, "gates passed"),
        (Gates(min_success_rate=0.9, min_devices=5), GateInput(committed=3, rolled_back=2), True, False, "60%"),
        (Gates(max_error_rate=0.1), GateInput(requests=100, errors=10), False, True, "gates passed"),
        (Gates(max_error_rate=0.1), GateInput(requests=100, errors=11), False, False, "error rate 11.0%"),
        (Gates(max_error_rate=0.1), GateInput(requests=100, errors=50), True, True, "gates passed"),  # not yet
        (Gates(max_error_rate=0.1), GateInput(), False, True, "gates passed"),  # no samples: passes
        (Gates(max_p95_ttft_ms=100), GateInput(ttft_samples=[50.0] * 19 + [500.0]), False, True, "gates passed"),
        (Gates(max_p95_ttft_ms=100), GateInput(ttft_samples=[50.0] * 18 + [500.0] * 2), False, False, "p95"),
        (Gates(max_p95_ttft_ms=100), GateInput(), False, True, "gates passed"),
    ],
)
def test_gate_evaluation(gates: Gates, figures: GateInput, install_only: bool, ok: bool, note: str) -> None:
    result = evaluate_gates(gates, figures, install_only=install_only)
    assert result.ok is ok, result.checks
    assert note in result.reason


def test_gates_without_figures_say_so() -> None:
    result = evaluate_gates(Gates(max_error_rate=0.1, max_p95_ttft_ms=10, min_success_rate=0.5), GateInput())
    notes = " ".join(c["note"] for c in result.checks)
    assert "no inference requests" in notes and "no samples" in notes and "not judged yet" in notes


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_success_rate": 1.5},
        {"max_error_rate": -0.1},
        {"max_failures": -1},
        {"min_devices": 0},
        {"max_p95_ttft_ms": 0},
    ],
)
def test_bad_gates_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(PlanError):
        Gates(**kwargs)


def test_counters_and_percentiles() -> None:
    assert counter_delta([10, 15, 15, 20]) == 10
    assert counter_delta([10, 15, 3, 5]) == 10  # a restart at 3: 5 + 3 + 2
    assert counter_delta([7]) == 0
    assert p95([1.0]) == 1.0 and p95(list(map(float, range(1, 101)))) == 95.0
    plan = RolloutPlan(waves=["1", "100%"], soak_s=2, wave_timeout_s=5, gates=Gates(max_failures=0))
    assert RolloutPlan.from_json(plan.to_json()) == plan
    with pytest.raises(PlanError):
        RolloutPlan(waves=["1"], soak_s=-1)


# --- the quality gates, table-driven ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gates", "figures", "ok", "note"),
    [
        (Gates(min_quality_score=0.8), GateInput(scored=1, golden_judged=4, golden_matched=3), False, "score 75%"),
        (Gates(min_quality_score=0.75), GateInput(scored=1, golden_judged=4, golden_matched=3), True, "score 75%"),
        (Gates(min_quality_score=0.9), GateInput(), True, "not judged yet: 0 of 1"),
        (Gates(min_quality_score=0.9, min_devices=2), GateInput(scored=1, golden_judged=2), True, "1 of 2"),
        (Gates(min_health_pass_rate=1.0), GateInput(tests_ran=3, tests_passed=2), False, "pass rate 67% (2/3"),
        (Gates(min_health_pass_rate=0.5), GateInput(tests_ran=2, tests_passed=1), True, "pass rate 50%"),
        (Gates(min_health_pass_rate=0.5), GateInput(), True, "health checks not judged yet"),
    ],
)
def test_quality_gates(gates: Gates, figures: GateInput, ok: bool, note: str) -> None:
    result = evaluate_gates(gates, figures, install_only=True)  # judged while a wave runs
    assert result.ok is ok and gates.any
    assert note in result.checks[0]["note"], result.checks


def test_quality_gate_limits_are_checked() -> None:
    for bad in ({"min_quality_score": 1.5}, {"min_health_pass_rate": -0.1}):
        with pytest.raises(PlanError, match="between 0 and 1"):
            Gates(**bad)  # type: ignore[arg-type]


# --- selectors ------------------------------------------------------------------------------------------

INV = {
    "arch": "x86_64",
    "cpu_count": 4,
    "memory_bytes": 8_000_000_000,
    "providers": ["CPUExecutionProvider", "CUDAExecutionProvider"],
    "os": "Linux",
}


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("", True),
        ("tag=canary", True),
        ("tag!=canary", False),
        ("tag=lab", False),
        ("tag!=lab", True),
        ("memory_bytes>=2e9", True),
        ("memory_bytes>=8e9", True),
        ("memory_bytes>8e9", False),
        ("cpu_count<4", False),
        ("cpu_count=4", True),
        ("cpu_count!=4", False),
        ("arch=x86_64", True),
        ("arch=aarch64", False),
        ("arch!=aarch64", True),
        ("providers=CUDAExecutionProvider", True),
        ("providers!=CUDAExecutionProvider", False),
        ("providers=DmlExecutionProvider", False),
        ("disk_free_bytes>=1", False),  # the inventory lacks it: no match
        ("arch>=1", False),  # a string is not ordered
        ("name=edge-1", True),
        ("id=dev-1", True),
        ("tag=canary, arch=x86_64, memory_bytes>=2e9", True),
        ("tag=canary,arch=aarch64", False),
    ],
)
def test_selector_terms(selector: str, matches: bool) -> None:
    assert parse_selector(selector).matches(DeviceFacts("dev-1", "edge-1", ["canary"], INV)) is matches


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("memory_bytes>=lots", "needs a number"),
        ("tag>=3", "= or != only"),
        ("arch", "column 5: expected =, !="),
        ("=x86", "column 1: expected a term"),
        ("arch=", "column 6: expected a value"),
    ],
)
def test_bad_selectors_are_refused(selector: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_selector(selector)
    with pytest.raises(PlanError):
        RolloutPlan(waves=["100%"], selector=selector)
