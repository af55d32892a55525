"""What a trained model keeps once it ships: build the target profile's package and score the task on it.

`package_retention` builds and signs the package of a trained HF folder (`build.build_package`: the
profile's conversion, cached; the staged package evaluated in onnxruntime-genai), scores the task
on the staged package with `generation.OrtGenerator` (greedy, the chat template applied as on a
device) and the task's scorer, and sets that score beside those of the models it came from (a
distillation's teacher and float student; a fine-tune's merged float model). The package's lineage
keeps every score (`Lineage.task_scores`); `Retention.to_json` adds their ratios.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops_builder.build import ProgressFn, build_package, can_run_here
from slmops_builder.profiles import get_profile
from slmops_builder.train.examples import Example
from slmops_builder.train.scoring import TaskSpec

__all__ = ["Retention", "check_profile", "package_retention", "package_score"]


@dataclass(frozen=True)
class Retention:
    profile: str
    package_path: Path
    package_id: str
    scores: dict[str, float]  # model -> task score; "package" is the built package's
    examples: int
    scorer: str

    def ratios(self) -> dict[str, float | None]:
        """The package's score over each other model's (None where that score is 0)."""
        p = self.scores["package"]
        return {
            f"package/{name}": (round(p / s, 4) if s else None) for name, s in self.scores.items() if name != "package"
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "package_path": str(self.package_path),
            "package_id": self.package_id,
            "scorer": self.scorer,
            "examples": self.examples,
            "scores": self.scores,
            "retention": self.ratios(),
        }


def check_profile(profile: str) -> None:
    """Refuse a profile that is unknown or whose execution provider this machine lacks (its package
    could not be scored here), before any training."""
    prof = get_profile(profile)
    if not can_run_here(prof):
        raise ValueError(
            f"profile {profile} needs the {prof.execution_provider} execution provider, which this machine "
            "lacks: its package cannot be scored here"
        )


def package_score(
    folder: Path, examples: Sequence[Example], task: TaskSpec, *, max_new_tokens: int = 64, threads: int = 1
) -> float:
    """The task's score of the onnxruntime-genai model in `folder` on `examples` (greedy)."""
    from slmops_builder.train.generation import OrtGenerator

    gen = OrtGenerator(folder, threads=threads).generate(
        [e.prompt_messages for e in examples], max_new_tokens=max_new_tokens
    )
    return float(task.score(gen.texts, [e.output for e in examples])["score"])


def package_retention(
    model_dir: Path,
    profile: str,
    examples: Sequence[Example],
    task: TaskSpec,
    scores: Mapping[str, float],
    *,
    key: Path,
    out: Path,
    name: str,
    version: str = "1.0.0",
    cache_dir: Path | None = None,
    threads: int = 1,
    max_new_tokens: int = 64,
    progress: ProgressFn | None = None,
) -> Retention:
    """Package `model_dir` for `profile` into `out`, score it on `examples`; `scores` are the task
    scores of the models it came from (see the module doc)."""
    if not examples:
        raise ValueError("no held-out examples to score the package on")
    check_profile(profile)
    measured: dict[str, float] = {}

    def score_staged(folder: Path) -> float:
        measured["package"] = package_score(folder, examples, task, max_new_tokens=max_new_tokens, threads=threads)
        return measured["package"]

    written = build_package(
        model_dir,
        profile,
        name,
        version,
        key,
        out,
        cache_dir=cache_dir,
        threads=threads,
        progress=progress,
        task_score=score_staged,
        task_scores=scores,
    )
    return Retention(
        profile,
        written.path,
        written.package_id,
        {**scores, "package": round(measured["package"], 4)},
        len(examples),
        task.scorer,
    )
