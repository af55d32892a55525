"""The rollout state machine's decisions: how a rollout is laid out, when a wave starts, times out,
completes, soaks and passes, when the gates abort it and what the revert gives back, what the
operator may do, and how it ends.

The store runs these inside the rollout's transaction. They read and change the stored rollout, its
waves and its targets through the fields below, and ask the store (`RolloutStorage`) for what only
it can do: read rows, give a device a new desired state, read telemetry.

A paused rollout only lets its running wave complete: no time outs, gates, soak end or next wave
until it resumes; the wave timeout and the soak count only running time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from slmops_fleet.errors import Conflict, InvalidRequest
from slmops_fleet.rollouts.gates import GateInput, counter_delta, evaluate_gates
from slmops_fleet.rollouts.plan import RolloutPlan
from slmops_fleet.rollouts.selectors import DeviceFacts, parse_selector
from slmops_fleet.rollouts.states import (
    ACTIVE_ROLLOUT_STATES,
    TERMINAL_TARGET_STATES,
    RolloutState,
    TargetState,
    WaveState,
)
from slmops_fleet.rollouts.variants import Selection
from slmops_fleet.rollouts.waves import PlanError, parse_waves, plan_waves
from slmops_protos.states import UpdateState

if TYPE_CHECKING:
    from slmops_fleet.store.records import DesiredRecord

COMMITTED = UpdateState.COMMITTED.value
ROLLED_BACK = UpdateState.ROLLED_BACK.value


class Rollout(Protocol):
    id: str
    package_id: str
    state: str
    plan: dict[str, Any] | None
    current_wave: int
    transitions: list[dict[str, Any]]
    created_at: datetime
    updated_at: datetime
    reason: str | None


class Wave(Protocol):
    idx: int
    state: str
    started_at: datetime | None
    completed_at: datetime | None
    finished_at: datetime | None
    reason: str | None


class Target(Protocol):
    """One device of a rollout."""

    device_id: str
    wave: int
    generation: int  # of the desired state this rollout gave it; 0 before its wave
    state: str
    reason: str | None
    updated_at: datetime
    previous_package_id: str | None
    package_id: str | None
    test: dict[str, Any] | None


class Desired(Protocol):
    """A device's newest desired state."""

    generation: int
    package_id: str
    rollout_id: str | None


class RolloutStorage(Protocol):
    """What the rules ask of the store, inside the rollout's transaction."""

    def wave(self, idx: int) -> Wave | None: ...

    def waves(self) -> Sequence[Wave]: ...

    def targets(self) -> Sequence[Target]:
        """Every target of the rollout."""

    def waiting(self, idx: int) -> Sequence[Target]:
        """The WAITING targets of wave `idx`, by device id."""

    def current_desired(self, device_ids: Sequence[str]) -> Mapping[str, Desired]:
        """The devices' newest desired states, the devices locked until the transaction ends."""

    def give(self, device_id: str, generation: int, package_id: str) -> DesiredRecord:
        """Store desired state `generation` of the device, naming `package_id`, for this rollout."""

    def telemetry(
        self, device_ids: Sequence[str], since_ms: int, package_ids: set[str]
    ) -> Sequence[tuple[str, int, int, float]]:
        """(device id, requests_total, errors_total, ttft_ms) samples, by device, time and seq."""


# --- history --------------------------------------------------------------------------------------------


def transition(state: str, now: datetime, reason: str, *, event: str = "", wave: int = -1) -> dict[str, Any]:
    out: dict[str, Any] = {"state": str(state), "at": now.isoformat(), "reason": reason}
    if event:
        out["event"] = event
    if wave >= 0:
        out["wave"] = wave + 1
    return out


def record(
    rollout: Rollout, now: datetime, reason: str, *, state: str | None = None, event: str = "", wave: int = -1
) -> None:
    if state is not None:
        rollout.state = state
    rollout.updated_at = now
    rollout.transitions = [
        *list(rollout.transitions or []),
        transition(rollout.state, now, reason, event=event, wave=wave),
    ]


def paused_for(transitions: Sequence[dict[str, Any]], since: datetime, now: datetime) -> timedelta:
    """How long the rollout was paused between `since` and `now`: the wave timeout and the soak
    count only running time, so an operator's pause never times a device out or ends a soak."""
    total = timedelta()
    paused_at: datetime | None = None
    for t in transitions:
        at = datetime.fromisoformat(t["at"])
        if t["state"] == RolloutState.PAUSED and paused_at is None:
            paused_at = at
        elif t["state"] != RolloutState.PAUSED and paused_at is not None:
            total += max(timedelta(), min(at, now) - max(paused_at, since))
            paused_at = None
    if paused_at is not None:
        total += max(timedelta(), now - max(paused_at, since))
    return total


def count_states(targets: Iterable[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in targets:
        out[str(t.state)] = out.get(str(t.state), 0) + 1
    return dict(sorted(out.items()))


def _join(first: str | None, second: str) -> str:
    return f"{first}; {second}" if first else second


# --- creating a rollout ---------------------------------------------------------------------------------


def narrow(selector: str, device_ids: Sequence[str], facts: Mapping[str, DeviceFacts]) -> list[str]:
    """The target devices the plan's selector keeps (all of them without a selector)."""
    if not selector:
        return list(device_ids)
    parsed = parse_selector(selector)
    chosen = {d for d in device_ids if parsed.matches(facts[d])}
    if not chosen:
        raise Conflict(f"the selector {selector!r} matches none of the {len(device_ids)} target devices")
    return [d for d in device_ids if d in chosen]


@dataclass(frozen=True)
class Layout:
    """A new rollout's devices: its waves of devices that can run a variant, the others, the package
    recorded as the rollout's (what most devices get) and the history's first line."""

    waves: list[list[str]]
    unrunnable: list[str]
    primary: str
    note: str


def lay_out(
    rollout_id: str,
    device_ids: Sequence[str],
    selections: Mapping[str, Selection],
    plan: RolloutPlan,
    facts: Mapping[str, DeviceFacts],
) -> Layout:
    runnable = [d for d in device_ids if selections[d].package_id]
    unrunnable = [d for d in device_ids if not selections[d].package_id]
    if not runnable:
        why = "; ".join(f"{d}: {selections[d].reason}" for d in unrunnable[:3])
        raise Conflict(f"none of the {len(device_ids)} target devices can run a variant ({why})")
    try:
        parsed = {w.selector: parse_selector(w.selector) for w in parse_waves(plan.waves) if w.selector}
        waves = plan_waves(runnable, parse_waves(plan.waves), rollout_id, lambda sel, d: parsed[sel].matches(facts[d]))
    except PlanError as exc:
        raise InvalidRequest(str(exc)) from exc
    chosen_counts: dict[str, int] = {}
    for d in runnable:
        pid = selections[d].package_id or ""
        chosen_counts[pid] = chosen_counts.get(pid, 0) + 1
    primary = min(chosen_counts, key=lambda p: (-chosen_counts[p], p))
    note = f"created: {len(runnable)} devices in {len(waves)} waves ({', '.join(plan.waves)})"
    if unrunnable:
        note += f"; {len(unrunnable)} devices can run no variant"
    return Layout(waves, unrunnable, primary, note)


# --- moving a rollout along -----------------------------------------------------------------------------


def start_wave(rollout: Rollout, idx: int, storage: RolloutStorage, now: datetime) -> list[DesiredRecord]:
    """Give the waiting devices of wave `idx` their new desired state (their newest generation + 1)."""
    wave = storage.wave(idx)
    assert wave is not None
    targets = storage.waiting(idx)
    current = storage.current_desired([t.device_id for t in targets]) if targets else {}
    desired: list[DesiredRecord] = []
    for t in targets:
        prev = current.get(t.device_id)
        t.generation = (prev.generation if prev else 0) + 1
        t.previous_package_id = prev.package_id if prev else None
        t.state = TargetState.PENDING
        t.updated_at = now
        desired.append(storage.give(t.device_id, t.generation, t.package_id or rollout.package_id))
    wave.state = WaveState.RUNNING
    wave.started_at = now
    rollout.current_wave = idx
    record(rollout, now, f"wave {idx + 1} started: {len(desired)} devices", event="wave_started", wave=idx)
    return desired


def advance(rollout: Rollout, storage: RolloutStorage, now: datetime, *, drive: bool) -> list[DesiredRecord]:
    """Move an in-progress rollout along as far as it can go now; returns desired states to publish.

    `drive=False` (a device report, a new rollout) does only what needs no publishing: time outs,
    wave completion, gates that pass, the final state. Starting a wave and aborting are the
    driver's (`drive=True`), which publishes what this returns."""
    if rollout.state not in ACTIVE_ROLLOUT_STATES:
        return []
    paused = rollout.state == RolloutState.PAUSED
    plan = RolloutPlan.from_json(rollout.plan)
    wave = storage.wave(rollout.current_wave)
    if wave is None:
        return []
    if wave.state == WaveState.PENDING:
        return start_wave(rollout, wave.idx, storage, now) if drive and not paused else []
    targets = list(storage.targets())
    in_wave = [t for t in targets if t.wave == wave.idx]
    if wave.state == WaveState.RUNNING:
        open_targets = [t for t in in_wave if t.state not in TERMINAL_TARGET_STATES]
        started = wave.started_at or rollout.created_at
        clock = now - paused_for(rollout.transitions or [], started, now)
        if (
            not paused
            and open_targets
            and plan.wave_timeout_s is not None
            and clock >= started + timedelta(seconds=plan.wave_timeout_s)
        ):
            for t in open_targets:
                t.reason = f"no COMMITTED or ROLLED_BACK within {plan.wave_timeout_s:g} s (last: {t.state})"
                t.state = TargetState.TIMED_OUT
                t.updated_at = now
            open_targets = []
    if drive and not paused and plan.gates.any:
        result = evaluate_gates(plan.gates, gate_input(rollout, targets, storage, telemetry=False), install_only=True)
        if not result.ok:
            return abort(rollout, targets, storage, now, f"wave {wave.idx + 1}: {result.reason}")
    if wave.state == WaveState.RUNNING:
        if open_targets:
            return []
        wave.state = WaveState.SOAKING
        wave.completed_at = now
        counts = ", ".join(f"{n} {st.lower()}" for st, n in count_states(in_wave).items()) or "no devices"
        record(rollout, now, f"wave {wave.idx + 1} complete: {counts}", event="wave_completed", wave=wave.idx)
    if wave.state != WaveState.SOAKING or paused:
        return []
    completed = wave.completed_at or now
    if now - paused_for(rollout.transitions or [], completed, now) < completed + timedelta(seconds=plan.soak_s):
        return []
    result = evaluate_gates(plan.gates, gate_input(rollout, targets, storage, telemetry=True))
    if not result.ok:
        return abort(rollout, targets, storage, now, f"wave {wave.idx + 1}: {result.reason}") if drive else []
    wave.state = WaveState.PASSED
    wave.finished_at = now
    wave.reason = result.reason
    record(rollout, now, f"wave {wave.idx + 1} passed: {result.reason}", event="wave_passed", wave=wave.idx)
    last = max((w.idx for w in storage.waves()), default=0)
    if wave.idx < last:
        rollout.current_wave = wave.idx + 1
        return start_wave(rollout, wave.idx + 1, storage, now) if drive else []
    _finish(rollout, plan, targets, now)
    return []


def _finish(rollout: Rollout, plan: RolloutPlan, targets: Sequence[Target], now: datetime) -> None:
    """Every wave passed: the rollout succeeded, failed or was superseded, by its targets' states."""
    states = [t.state for t in targets]
    committed = states.count(COMMITTED)
    failures = states.count(ROLLED_BACK) + states.count(TargetState.TIMED_OUT)
    superseded = states.count(TargetState.SUPERSEDED)
    if failures and (not plan.gates.any or committed == 0):
        new = RolloutState.FAILED
    elif committed:
        new = RolloutState.SUCCEEDED
    else:
        new = RolloutState.SUPERSEDED
    reason = f"{committed} committed, {states.count(ROLLED_BACK)} rolled back, {superseded} superseded"
    if states.count(TargetState.TIMED_OUT):
        reason += f", {states.count(TargetState.TIMED_OUT)} timed out"
    if states.count(TargetState.NO_VARIANT):
        reason += f", {states.count(TargetState.NO_VARIANT)} without a runnable variant"
    rollout.reason = reason
    record(rollout, now, reason, state=new)


def gate_input(rollout: Rollout, targets: Sequence[Target], storage: RolloutStorage, *, telemetry: bool) -> GateInput:
    """The figures of the devices the rollout touched (got a desired state and were not taken away);
    with `telemetry`, their requests, errors and TTFT on the rollout's packages since its first wave."""
    excluded = (TargetState.SUPERSEDED, TargetState.CANCELLED)
    touched = [t for t in targets if t.generation > 0 and t.state not in excluded]
    states = [t.state for t in touched]
    tests = [t.test for t in touched if t.test and t.test.get("ran")]
    scored = [x for x in tests if int(x.get("judged") or 0) > 0]
    requests = errors = 0
    ttft: list[float] = []
    if telemetry and touched:
        first = min((w.started_at for w in storage.waves() if w.started_at is not None), default=None)
        since_ms = int((first or rollout.created_at).timestamp() * 1000)
        samples = storage.telemetry(
            [t.device_id for t in touched], since_ms, {t.package_id or rollout.package_id for t in touched}
        )
        per_device: dict[str, list[tuple[int, int]]] = {}
        for device_id, req, err, t_ms in samples:
            per_device.setdefault(device_id, []).append((req, err))
            if t_ms and t_ms > 0:
                ttft.append(float(t_ms))
        for series in per_device.values():
            requests += counter_delta([r for r, _ in series])
            errors += counter_delta([e for _, e in series])
    return GateInput(
        committed=states.count(COMMITTED),
        rolled_back=states.count(ROLLED_BACK),
        timed_out=states.count(TargetState.TIMED_OUT),
        in_flight=sum(1 for st in states if st not in TERMINAL_TARGET_STATES),
        requests=requests,
        errors=errors,
        ttft_samples=ttft,
        tests_ran=len(tests),
        tests_passed=sum(1 for x in tests if x.get("passed")),
        scored=len(scored),
        golden_judged=sum(int(x.get("judged") or 0) for x in scored),
        golden_matched=sum(int(x.get("matched") or 0) for x in scored),
    )


def abort(
    rollout: Rollout, targets: Sequence[Target], storage: RolloutStorage, now: datetime, reason: str
) -> list[DesiredRecord]:
    """A gate failed: every device this rollout touched gets its previous package back (a new
    generation), devices of waves not started are cancelled, the rollout is `rolled_back`."""
    touched = [t for t in targets if t.generation > 0 and t.state != TargetState.SUPERSEDED]
    ids = [t.device_id for t in touched]
    latest = storage.current_desired(ids) if ids else {}
    desired: list[DesiredRecord] = []
    kept: list[str] = []
    for t in targets:
        if t.state == TargetState.WAITING:
            t.state, t.reason, t.updated_at = TargetState.CANCELLED, "the rollout was rolled back before its wave", now
            continue
        if t.generation == 0 or t.state == TargetState.SUPERSEDED:
            continue
        cur = latest.get(t.device_id)
        if cur is None or cur.generation != t.generation or cur.rollout_id != rollout.id:
            continue  # something newer owns the device now
        if t.state not in TERMINAL_TARGET_STATES:
            t.state = TargetState.ABORTED
        t.updated_at = now
        if t.previous_package_id is None:
            kept.append(t.device_id)
            t.reason = _join(t.reason, "no previous package to return to")
            continue
        generation = cur.generation + 1
        desired.append(storage.give(t.device_id, generation, t.previous_package_id))
        t.reason = _join(t.reason, f"reverted to {t.previous_package_id[:12]} (generation {generation})")
    for w in storage.waves():
        if w.idx == rollout.current_wave:
            w.state, w.finished_at, w.reason = WaveState.FAILED, now, reason
        elif w.state == WaveState.PENDING:
            w.state = WaveState.CANCELLED
    rollout.reason = reason
    detail = f"{reason}; {len(desired)} devices get their previous package back"
    if kept:
        detail += f", {len(kept)} had none"
    record(rollout, now, detail, state=RolloutState.ROLLED_BACK, event="aborted", wave=rollout.current_wave)
    return desired


# --- the operator and the devices -----------------------------------------------------------------------

_CONTROLS: dict[str, tuple[frozenset[str], RolloutState]] = {
    "pause": (frozenset({RolloutState.IN_PROGRESS.value}), RolloutState.PAUSED),
    "resume": (frozenset({RolloutState.PAUSED.value}), RolloutState.IN_PROGRESS),
    "cancel": (ACTIVE_ROLLOUT_STATES, RolloutState.CANCELLED),
}


def check_action(action: str) -> None:
    """An InvalidRequest unless `action` is one `control` knows."""
    if action not in _CONTROLS:
        raise InvalidRequest(f"unknown rollout action {action!r}: pause, resume or cancel")


def control(rollout: Rollout, action: str, reason: str, storage: RolloutStorage, now: datetime) -> None:
    """pause | resume | cancel (`check_action` first), by the operator; a cancel also cancels the waves
    and devices not done."""
    sources, new = _CONTROLS[action]
    if rollout.state not in sources:
        raise Conflict(
            f"rollout {rollout.id} is {rollout.state}; only a rollout that is {' or '.join(sorted(sources))} "
            f"can be {'cancelled' if action == 'cancel' else action + 'd'}"
        )
    why = reason or f"{action} by the operator"
    if action == "cancel":
        for t in storage.targets():
            if t.state == TargetState.WAITING:
                t.state, t.reason, t.updated_at = (
                    TargetState.CANCELLED,
                    "the rollout was cancelled before its wave",
                    now,
                )
        for w in storage.waves():
            if w.state in (WaveState.PENDING, WaveState.RUNNING, WaveState.SOAKING):
                w.state, w.finished_at, w.reason = WaveState.CANCELLED, now, why
        rollout.reason = why
    record(rollout, now, why, state=new, event=action, wave=rollout.current_wave)


def report(
    target: Target,
    generation: int,
    state: str,
    reason: str,
    test: dict[str, Any] | None,
    now: datetime,
    *,
    bound: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> bool:
    """A device reported `state` for desired state `generation` of this target; True when the report
    ended the target (its rollout may move on). `bound` limits the TESTING result kept to what the
    target's package allows (`gates.GoldenPrompts`)."""
    if target.generation != generation or target.state in TERMINAL_TARGET_STATES or target.state == state:
        return False
    target.state = state
    target.reason = reason or None
    target.updated_at = now
    if test is not None:
        target.test = bound(test) if bound is not None else test
    return state in TERMINAL_TARGET_STATES
