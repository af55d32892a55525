"""A recipe's plan: the steps a build runs, their step cache keys, and which the cache already holds.

The keys are the build's own (`slmops_builder.recipe_run` runs the steps under them): the import key
hashes the source, the importer's code and its tools; the evaluate key the converted variant, the
evaluation settings, the held-out text and tasks (with their schema, system prompt and scorer), the
evaluator's code, this host and its tools. A recipe with `[train]` has its training steps between
the import and the conversions (`slmops_builder.recipe_train`): the variants convert the trained model.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from slmops_builder import evaluate, importer
from slmops_builder.build import can_run_here
from slmops_builder.convert import convert_key
from slmops_builder.importer import bundled_smollm2_gguf, folder_sha256
from slmops_builder.profiles import get_profile
from slmops_builder.recipe_schema import LoadedRecipe, RecipeError
from slmops_builder.recipe_train import TEACHER_STEP, TRAIN_STEP, check_trainable, teacher_key, train_key, train_rows
from slmops_builder.steps import StepCache, tool_versions
from slmops_builder.train import scoring
from slmops_protos import __version__
from slmops_protos.manifests import sha256_file

__all__ = [
    "EVALUATE_STEP",
    "IMPORT_STEP",
    "RECIPE_STEPS",
    "PlannedStep",
    "check_runnable",
    "evaluate_key",
    "import_key",
    "plan_recipe",
    "progress_steps",
    "recipe_threads",
]

RECIPE_STEPS = ("import", TEACHER_STEP, TRAIN_STEP, "convert", "evaluate", "gate", "package", "report")
IMPORT_STEP = "import"
EVALUATE_STEP = "evaluate"
_IMPORT_TOOLS = ("transformers", "torch", "gguf", "safetensors")
_EVAL_TOOLS = ("onnxruntime-genai", "onnxruntime", "numpy")


@dataclass(frozen=True)
class PlannedStep:
    step: str
    target: str
    key: str | None  # None when it depends on an earlier step that has not run yet
    cached: bool

    def to_dict(self) -> dict[str, object]:
        return {"step": self.step, "target": self.target, "key": self.key, "cached": self.cached}


def _source_digest(source: str | Path) -> tuple[Path, str]:
    path = bundled_smollm2_gguf() if isinstance(source, str) else Path(source)
    return path, folder_sha256(path) if path.is_dir() else sha256_file(path)


def _code_sha256(module: ModuleType) -> str:
    """A step's own code is one of its inputs: a fix to it must not reuse what the old code made."""
    return sha256_file(Path(str(module.__file__)))


def import_key(source: str | Path) -> str:
    _, digest = _source_digest(source)
    tools = {**tool_versions(_IMPORT_TOOLS), "slmops-builder": __version__}
    return StepCache.key(IMPORT_STEP, {}, {"source": digest, "code": _code_sha256(importer)}, tools)


def evaluate_key(loaded: LoadedRecipe, convert_key_: str, threads: int) -> str:
    ev = loaded.recipe.evaluation
    params = {
        "search": loaded.recipe.search,
        "prompts": ev.golden_prompts,
        "max_new_tokens": ev.golden_max_new_tokens,
        "max_tokens": ev.max_tokens,
        "window": ev.window,
        "threads": threads,
        "host": [platform.machine(), platform.processor(), os.cpu_count()],
    }
    inputs = {
        "converted": convert_key_,
        "heldout": hashlib.sha256(loaded.heldout.encode()).hexdigest(),
        "tasks": hashlib.sha256(json.dumps([[t.input, t.output] for t in loaded.tasks]).encode()).hexdigest(),
        "code": _code_sha256(evaluate),
    }
    if loaded.task_schema is not None:  # absent otherwise: the keys of earlier builds stay valid
        inputs["task_schema"] = hashlib.sha256(loaded.task_schema.encode()).hexdigest()
    if ev.task_system is not None:  # likewise
        inputs["task_system"] = hashlib.sha256(ev.task_system.encode()).hexdigest()
    if ev.task_scorer is not None:  # likewise; the scorer's code is an input too
        scorer = json.dumps([ev.task_scorer, ev.task_pattern, _code_sha256(scoring)])
        inputs["task_scorer"] = hashlib.sha256(scorer.encode()).hexdigest()
    return StepCache.key(EVALUATE_STEP, params, inputs, {**tool_versions(_EVAL_TOOLS), "slmops-builder": __version__})


def check_runnable(loaded: LoadedRecipe) -> None:
    check_trainable(loaded)
    ref = loaded.recipe.reference
    gates = loaded.recipe.gates
    if ref and gates.max_ppl_ratio is not None and not can_run_here(get_profile(ref)):
        raise RecipeError(
            f"{loaded.path}: gates.reference: {ref} cannot be evaluated on this machine "
            f"(no {get_profile(ref).execution_provider} execution provider), so gates.max_ppl_ratio cannot be"
        )


def plan_recipe(
    loaded: LoadedRecipe, *, cache_dir: Path | None = None, threads: int | None = None
) -> list[PlannedStep]:
    """The steps a build would run and which of them the cache already holds (runs nothing)."""
    check_runnable(loaded)
    cache = StepCache(cache_dir)
    n = recipe_threads(loaded, threads)
    key = import_key(loaded.source)
    imported = cache.has(IMPORT_STEP, key)
    plan = [PlannedStep(IMPORT_STEP, str(loaded.source), key, imported)]
    model = cache.entry(IMPORT_STEP, key) / "model" if imported else None
    for step, target in train_rows(loaded):  # the training's keys need only the import's
        skey = teacher_key(loaded, key) if step == TEACHER_STEP else train_key(loaded, key, n)
        plan.append(PlannedStep(step, target, skey, cache.has(step, str(skey))))
    if loaded.recipe.train is not None:
        model = cache.entry(TRAIN_STEP, str(plan[-1].key)) / "model" if plan[-1].cached else None
    for name in loaded.variants:
        ckey = convert_key(model, get_profile(name))[0] if model is not None else None
        plan.append(PlannedStep("convert", name, ckey, ckey is not None and cache.has("convert", ckey)))
        ekey = evaluate_key(loaded, ckey, n) if ckey and can_run_here(get_profile(name)) else None
        plan.append(PlannedStep(EVALUATE_STEP, name, ekey, ekey is not None and cache.has(EVALUATE_STEP, ekey)))
    plan += [PlannedStep(s, "", None, False) for s in ("gate", "package", "report")]
    return plan


def recipe_threads(loaded: LoadedRecipe, threads: int | None) -> int:
    from slmops_builder.settings import BuilderSettings

    return threads or loaded.recipe.evaluation.threads or BuilderSettings().threads


def progress_steps(loaded: LoadedRecipe) -> list[tuple[str, str]]:
    """(step, target) rows a progress display shows for this recipe, in order."""
    rows = [(IMPORT_STEP, str(loaded.source)), *train_rows(loaded)]
    rows += [("convert", n) for n in loaded.variants]
    rows += [(EVALUATE_STEP, n) for n in loaded.variants]
    rows += [("gate", "")]
    rows += [("package", n) for n in loaded.recipe.variants]
    rows += [("report", "")]
    return rows
