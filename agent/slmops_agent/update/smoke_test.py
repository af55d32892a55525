"""TESTING: load the staged slot and run the manifest's golden prompts greedily within the latency
budget. A load failure, a failing prompt or a blown budget rejects the package; an output that
differs from the builder's reference does not (the fleet's quality gate judges the match count)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from slmops_agent.errors import ModelLoadError, PackageRejected
from slmops_agent.runtime.model import LoadedModel
from slmops_agent.runtime.requests import FinishReason, GenerationRequest, Limits
from slmops_agent.settings import AgentSettings
from slmops_agent.update.packages import Target
from slmops_agent.update_record import TestSummary
from slmops_protos.package.v1 import manifest_pb2

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Hello"  # the prompt run when the manifest has no golden prompts


@dataclass(frozen=True)
class SmokeResult:
    """One golden prompt run in TESTING (`matches`: None when the manifest has no reference)."""

    index: int
    matches: bool | None
    completion_tokens: int
    ttft_ms: float
    tokens_per_s: float


def golden_request(gp: manifest_pb2.GoldenPrompt, limits: Limits, adapter: str) -> GenerationRequest:
    """A golden prompt as a chat request, decoded greedily as the builder made the reference."""
    return GenerationRequest(
        messages=(("user", gp.prompt),),
        max_new_tokens=min(gp.max_new_tokens or limits.default_max_new_tokens, limits.max_new_tokens_limit),
        temperature=0.0,
        adapter=adapter,
    )


def run_smoke_test(
    load: Callable[[], LoadedModel], target: Target, settings: AgentSettings, results: list[SmokeResult]
) -> LoadedModel:
    """Load the model (`load`) and run the golden prompts; each prompt's outcome is appended to
    `results` as it comes (those before a failure stay). PackageRejected when the package fails."""
    budget = settings.smoke_test_budget_s
    t0 = time.perf_counter()
    try:
        loaded = load()
    except ModelLoadError as exc:
        raise PackageRejected(f"TESTING: {exc}") from exc
    prompts = list(target.manifest.golden_prompts) or [manifest_pb2.GoldenPrompt(prompt=DEFAULT_PROMPT)]
    limits = Limits(settings.smoke_test_max_new_tokens, settings.max_new_tokens_limit)
    for i, gp in enumerate(prompts):
        left = budget - (time.perf_counter() - t0)
        cancel = threading.Event()
        timer = threading.Timer(max(0.0, left), cancel.set)
        timer.start()
        request = golden_request(gp, limits, target.adapter)
        try:
            try:
                result = loaded.generate(request, limits=limits, cancel=cancel)
            except Exception:  # no chat template: the raw prompt
                result = loaded.generate(replace(request, messages=(), prompt=gp.prompt), limits=limits, cancel=cancel)
        except Exception as exc:
            raise PackageRejected(f"TESTING: golden prompt {i} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            timer.cancel()
        if result.finish_reason is FinishReason.CANCELLED:
            raise PackageRejected(f"TESTING: golden prompt {i} ran past the {budget:g} s latency budget")
        match = result.text.strip() == gp.reference.strip() if gp.reference else None
        results.append(SmokeResult(i, match, result.completion_tokens, result.ttft_ms, result.tokens_per_s))
        if match is not None:
            log.info("golden prompt %d: %s the reference", i, "matches" if match else "differs from")
    elapsed = time.perf_counter() - t0
    if elapsed > budget:
        raise PackageRejected(f"TESTING: load and golden prompts took {elapsed:.2f} s (budget {budget:g} s)")
    log.info("TESTING passed in %.2f s (%d prompts)", elapsed, len(prompts))
    return loaded


def summarize(results: list[SmokeResult], *, passed: bool, seconds: float, adapter: str) -> TestSummary:
    """The record's (and the report's) account of a TESTING run."""
    judged = [s for s in results if s.matches is not None]
    return TestSummary(
        ran=True,
        passed=passed,
        prompts=len(results),
        judged=len(judged),
        matched=sum(1 for s in judged if s.matches),
        seconds=round(seconds, 3),
        adapter=adapter,
    )
