"""Hardware-aware selection: which package of a release each device gets (`select_variant`).

A variant is runnable on a device when its execution provider is among the device's providers (CPU
always is), the device's memory is at least the profile's `min_memory_bytes`, and, for an adapter
package, the device runs its base (the active package, or the base of the active adapter package).
Among the runnable ones the device gets, in order: an accelerator before the CPU (the ranking of
`slmops_protos.providers`; an unknown accelerator just before the CPU), then the higher precision
(fp32 > fp16/bf16 > int8 > int4), then the larger memory need (the bigger variant that still fits),
then the package id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from slmops_fleet.rollouts.waves import PlanError
from slmops_protos.providers import ort_provider_name, provider_rank

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


def check_release(variants: Sequence[Variant]) -> None:
    """A release holds model variants (one per hardware profile) or adapter packages (one per base
    package), so that a device gets one package of it; a PlanError says what clashes."""
    kinds = {v.kind for v in variants}
    if len(kinds) > 1:
        raise PlanError("a release holds model variants or adapter packages, not both")
    adapters = kinds == {"adapter"}
    seen: dict[str, str] = {}
    for v in variants:
        k = v.base_package_id if adapters else v.profile
        if k in seen:
            what = f"base {k[:12]}" if adapters else f"profile {k or '(none)'}"
            raise PlanError(f"packages {seen[k][:12]} and {v.package_id[:12]} are both for {what}")
        seen[k] = v.package_id


def _provider_rank(provider: str) -> int:
    """The contract's ranking, but an unknown accelerator ranks just before the CPU (not after it)."""
    return provider_rank(provider) if ort_provider_name(provider) else provider_rank("cpu") - 1


def _rank(v: Variant) -> tuple[int, int, int, str]:
    provider = (v.provider or "cpu").lower()
    return (
        _provider_rank(provider),
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
        wanted = ort_provider_name(provider) or provider
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
        reason = f"{detail}: {ort_provider_name(provider) or provider}, {chosen.precision or 'unknown precision'}"
        if chosen.min_memory_bytes:
            reason += f", needs {chosen.min_memory_bytes} bytes of {int(inventory.get('memory_bytes') or 0)}"
    skipped = sum(1 for c in candidates if not c["ok"])
    if skipped:
        reason += f" ({skipped} of {len(candidates)} variants not runnable here)"
    return Selection(chosen.package_id, reason, candidates)
