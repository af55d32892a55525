"""Build one signed package: convert (cached), stage, evaluate, write and sign.

Steps, each reported to `progress` as it starts and ends:
    convert   the profile's conversion engine, or the step cache's earlier output
    stage     the package folder: genai_config search overrides, inference_model.json
    evaluate  load the staged folder in onnxruntime-genai (exactly what a device loads), run the
              golden prompts greedily (their outputs become the references), measure speed; with a
              `task_score` function, score the task on the staged folder too (metric `task_score`,
              kept in the lineage's `task_scores` as "package" beside the trained models' scores)
    package   content-addressed blobs, manifest, Ed25519 signature
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from slmops_builder.convert import convert, stage, validate_search
from slmops_builder.evaluate import (
    DEFAULT_GOLDEN_PROMPTS,
    Evaluation,
    GoldenPromptSpec,
    evaluate_folder,
)
from slmops_builder.keys import load_private_key
from slmops_builder.lineage import package_lineage
from slmops_builder.packaging import PackageSpec, WrittenPackage, write_package
from slmops_builder.profiles import Profile, get_profile
from slmops_protos.package.v1 import manifest_pb2
from slmops_protos.providers import ort_provider_name

__all__ = [
    "DEFAULT_GOLDEN_PROMPTS",
    "BuildEvent",
    "GoldenPromptSpec",
    "ProgressFn",
    "build_package",
    "can_run_here",
    "check_name_version",
    "evaluate_folder",
    "min_memory_bytes",
    "step",
]

STEPS = ("convert", "stage", "evaluate", "package")
_MIB = 1024**2


@dataclass(frozen=True)
class BuildEvent:
    step: str  # one of STEPS (or of a recipe's steps)
    status: str  # "start" | "done"
    detail: str = ""
    seconds: float = 0.0
    target: str = ""  # a recipe's profile (or source) the step worked on


ProgressFn = Callable[[BuildEvent], None]


def _noop(_: BuildEvent) -> None:
    pass


def build_package(
    model_dir: Path,
    profile: Profile | str,
    name: str,
    version: str,
    key_path: Path,
    out_dir: Path,
    *,
    search: Mapping[str, object] | None = None,
    golden_prompts: Sequence[GoldenPromptSpec | str] | None = None,
    cache_dir: Path | None = None,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    security_version: int = 0,
    task_score: Callable[[Path], float] | None = None,
    task_scores: Mapping[str, float] | None = None,
) -> WrittenPackage:
    """Build and sign the package of `model_dir` for `profile` into `out_dir` (replaced atomically).
    `task_score(folder)` scores the staged package on a task; `task_scores` are the scores of the
    models it was trained from, for the lineage."""
    report = progress or _noop
    model_dir = Path(model_dir)
    prof = get_profile(profile) if isinstance(profile, str) else profile
    check_name_version(name, version)
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model folder at {model_dir} (no config.json; see 'slmops builder import')")
    key = load_private_key(Path(key_path))  # fail on a bad key before the slow part
    overrides = validate_search(search or {})
    prompts = [GoldenPromptSpec(p) if isinstance(p, str) else p for p in (golden_prompts or DEFAULT_GOLDEN_PROMPTS)]

    with step(report, "convert") as done:
        converted = convert(model_dir, prof, cache_dir=cache_dir, threads=threads)
        done(f"{'reused cached' if converted.cached else 'converted'} {converted.key[:12]}")

    with tempfile.TemporaryDirectory(prefix="slmops-stage-") as tmp:
        staged = Path(tmp) / "package"
        with step(report, "stage") as done:
            stage(converted.path, staged, name=f"{name}-{prof.name}", search=overrides)
            size = sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())
            done(f"{sum(1 for p in staged.rglob('*') if p.is_file())} files, {size / _MIB:.1f} MiB")

        with step(report, "evaluate") as done:
            if can_run_here(prof):
                evaluation = evaluate_folder(staged, prompts, threads=threads)
                if task_score is not None:
                    evaluation.metrics["task_score"] = task_score(staged)
                done(", ".join(f"{k}={v:.1f}" for k, v in evaluation.metrics.items()))
            else:  # e.g. a cuda variant built on a machine without a GPU: no references, no metrics
                evaluation = Evaluation(references=["" for _ in prompts])
                done(f"skipped: no {prof.execution_provider} execution provider on this machine")

        with step(report, "package") as done:
            spec = PackageSpec(
                name=name,
                version=version,
                profile=prof.to_pb(min_memory_bytes=min_memory_bytes(prof, size)),
                lineage=package_lineage(
                    model_dir,
                    prof,
                    recipe_sha256=_build_sha256(prof, overrides, converted.key),
                    task_scores=_with_package(task_scores, evaluation.metrics.get("task_score")),
                ),
                evaluation=manifest_pb2.Evaluation(metrics=evaluation.metrics, size_bytes=size),
                golden_prompts=[
                    manifest_pb2.GoldenPrompt(
                        prompt=p.prompt, reference=p.reference or ref, max_new_tokens=p.max_new_tokens
                    )
                    for p, ref in zip(prompts, evaluation.references, strict=True)
                ],
                security_version=security_version,
            )
            written = write_package(staged, spec, key, Path(out_dir))
            done(f"{written.package_id[:12]} -> {written.path}")
    return written


def _with_package(scores: Mapping[str, float] | None, package: float | None) -> dict[str, float]:
    return {**(scores or {}), **({"package": package} if package is not None else {})}


class step:
    """`with step(report, name, target) as done: ...; done(detail)` reports start and done events."""

    def __init__(self, report: ProgressFn, name: str, target: str = "") -> None:
        self.report, self.name, self.target, self.detail = report, name, target, ""

    def __enter__(self) -> Callable[[str], None]:
        self.start = time.monotonic()
        self.report(BuildEvent(self.name, "start", target=self.target))

        def done(detail: str) -> None:
            self.detail = detail

        return done

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.report(BuildEvent(self.name, "done", self.detail, time.monotonic() - self.start, self.target))


def min_memory_bytes(profile: Profile, size_bytes: int) -> int:
    """The least memory a device needs for a package of `size_bytes`: the profile's floor, or twice
    the package plus 128 MiB for the runtime, whichever is more."""
    return max(profile.min_memory_bytes, 2 * size_bytes + 128 * _MIB)


def check_name_version(name: str, version: str) -> None:
    """Refuse an empty or path-like package name and a version that is not MAJOR.MINOR.PATCH."""
    if not name or not all(c.isalnum() or c in "._-" for c in name) or name[0] in ".-":
        raise ValueError(f"bad package name {name!r}: use letters, digits, '.', '_' and '-'")
    core = version.split("+", 1)[0].split("-", 1)[0]
    parts = core.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"version {version!r} is not a semantic version (MAJOR.MINOR.PATCH)")


def _build_sha256(profile: Profile, search: Mapping[str, object], convert_key: str) -> str:
    """A single build's stand-in for a recipe's hash: its profile, search defaults and conversion."""
    recipe = json.dumps({"profile": profile.spec(), "search": dict(search), "convert": convert_key}, sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()


def can_run_here(profile: Profile) -> bool:
    """Whether this machine's onnxruntime offers the profile's execution provider."""
    import onnxruntime

    return ort_provider_name(profile.execution_provider) in onnxruntime.get_available_providers()
