"""A recipe's training (its `[train]` table): the recipe's model fine-tuned or distilled before conversion.

Steps, cached in the StepCache like the rest of the recipe (see `slmops_builder.recipe_run`):

- teacher (distill only): the imported model answers `[train].data` (`distill.teacher_outputs`);
  keyed by the import, the inputs, the generation settings and the training code, so a new student
  configuration reuses the answers.
- train: `finetune.finetune` (merged into the model) or `distill.distill` (on the answers the task's
  validity rule and `keep_answers` keep, see `distill.teacher_outputs`); keyed by the import or the
  teacher's answers, the data, the configuration (with the threads it runs on), the kept answers'
  rule, a given student's files, the training code and its tools. The entry's `model/` is the
  trained HF folder every variant is converted from; `run/` the run's curves and summary (without its
  checkpoints: a run killed midway starts again); `summary.json` what the report shows of it (the
  teacher step's: how many answers).

Lineage: `model/` gets the import's `SOURCE_FILE` (the recipe's model and its SHA-256) with the run's
training record under "training", the teacher and base model named as the import names the
recipe's model: the packages' Lineage has that model as base, the teacher (distill) and the data's
hashes (`lineage.package_lineage`), beside the recipe's hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

from slmops_builder import train as train_package
from slmops_builder.build import ProgressFn, step
from slmops_builder.importer import SOURCE_FILE, folder_sha256, read_source_info, read_training_file
from slmops_builder.recipe_schema import DistillStep, FinetuneStep, LoadedRecipe, RecipeError
from slmops_builder.steps import StepCache, StepResult, tool_versions
from slmops_builder.train.distill import DistillConfig, TeacherOutputs, distill, teacher_outputs
from slmops_builder.train.examples import dataset_sha256
from slmops_builder.train.runs import CHECKPOINTS_DIR, FinetuneConfig
from slmops_protos import __version__
from slmops_protos.manifests import sha256_file

__all__ = [
    "SUMMARY_FILE",
    "TEACHER_STEP",
    "TRAIN_STEP",
    "check_trainable",
    "run_training",
    "teacher_key",
    "train_config",
    "train_key",
    "train_rows",
]

TRAIN_STEP = "train"
TEACHER_STEP = "teacher"
SUMMARY_FILE = "summary.json"  # in the teacher and train steps' entries: what the report shows
_TOOLS = ("torch", "transformers", "peft", "accelerate", "trl", "safetensors")


def train_config(loaded: LoadedRecipe, threads: int) -> FinetuneConfig | DistillConfig:
    """`[train]`'s configuration as the run gets it: its threads, else the recipe's."""
    assert loaded.recipe.train is not None
    cfg = loaded.recipe.train.config()
    return cfg.model_copy(update={"threads": cfg.threads or threads})


def train_rows(loaded: LoadedRecipe) -> list[tuple[str, str]]:
    """(step, target) of the training steps, in order (none without `[train]`)."""
    spec = loaded.recipe.train
    if spec is None:
        return []
    return ([(TEACHER_STEP, str(spec.data))] if isinstance(spec, DistillStep) else []) + [(TRAIN_STEP, spec.kind)]


def check_trainable(loaded: LoadedRecipe) -> None:
    """Refuse, before any work, a fine-tuning this machine cannot run (QLoRA without CUDA)."""
    spec = loaded.recipe.train
    if isinstance(spec, FinetuneStep):
        from slmops_builder.train.finetune import TRAINING_ENGINES
        from slmops_builder.train.hf_models import QLoRAUnavailable

        try:
            TRAINING_ENGINES[spec.engine].check(spec.config())
        except QLoRAUnavailable as exc:
            raise RecipeError(f"{loaded.path}: train.qlora: {exc}") from None


def _code_sha256() -> str:
    """The training code's hash (every module of `slmops_builder.train`): a fix must not reuse old runs."""
    folder = Path(str(train_package.__file__)).parent
    files = {p.name: sha256_file(p) for p in sorted(folder.glob("*.py"))}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _tools() -> dict[str, str]:
    return {**tool_versions(_TOOLS), "slmops-builder": __version__}


def teacher_key(loaded: LoadedRecipe, import_key: str) -> str | None:
    """The teacher step's key (None for a recipe that does not distill)."""
    spec = loaded.recipe.train
    if not isinstance(spec, DistillStep):
        return None
    params = {"max_new_tokens": spec.max_new_tokens, "batch_size": spec.teacher_batch_size}
    inputs = {"teacher": import_key, "data": dataset_sha256(loaded.train_data), "code": _code_sha256()}
    return StepCache.key(TEACHER_STEP, params, inputs, _tools())


def train_key(loaded: LoadedRecipe, import_key: str, threads: int) -> str:
    spec = loaded.recipe.train
    assert spec is not None
    params: dict[str, Any] = {"kind": spec.kind, "config": train_config(loaded, threads).model_dump(mode="json")}
    inputs = {"model": import_key, "data": dataset_sha256(loaded.train_data), "code": _code_sha256()}
    if loaded.train_validation:
        inputs["validation"] = dataset_sha256(loaded.train_validation)
    if isinstance(spec, DistillStep):
        inputs["teacher_answers"] = str(teacher_key(loaded, import_key))
        params["keep_answers"] = spec.keep_answers
        params["task"] = loaded.recipe.evaluation.task_spec().model_dump(mode="json")
        if loaded.student is not None:
            inputs["student"] = folder_sha256(loaded.student)
    return StepCache.key(TRAIN_STEP, params, inputs, _tools())


def run_training(
    loaded: LoadedRecipe,
    cache: StepCache,
    imported: StepResult,
    threads: int,
    report: ProgressFn,
    cached: dict[str, bool],
) -> StepResult:
    """Run (or reuse) the recipe's training on the imported model; returns the train step's entry,
    whose `model/` the variants are converted from. Records in `cached` which steps were reused."""
    spec = loaded.recipe.train
    assert spec is not None
    model_dir = imported.path / "model"
    answers: Path | None = None
    if isinstance(spec, DistillStep):
        tkey = str(teacher_key(loaded, imported.key))
        with step(report, TEACHER_STEP, str(spec.data)) as done:
            made = cache.run(
                TEACHER_STEP,
                tkey,
                partial(_teacher_answers, loaded, model_dir, threads),
                record={"data": str(spec.data)},
            )
            cached[f"{TEACHER_STEP}:{spec.data}"] = made.cached
            summary = json.loads((made.path / SUMMARY_FILE).read_text())
            done(f"{'reused cached' if made.cached else 'answered'} {tkey[:12]}: {summary['answers']} answers")
        answers = made.path / "teacher.jsonl"
    with step(report, TRAIN_STEP, spec.kind) as done:
        key = train_key(loaded, imported.key, threads)
        produce = partial(_train, loaded, model_dir, answers, train_config(loaded, threads))
        trained = cache.run(TRAIN_STEP, key, produce, record={"kind": spec.kind, "data": str(spec.data)})
        cached[f"{TRAIN_STEP}:{spec.kind}"] = trained.cached
        summary = json.loads((trained.path / SUMMARY_FILE).read_text())
        losses = f"loss {summary['first_loss']:.4g} -> {summary['last_loss']:.4g}"
        done(f"{'reused cached' if trained.cached else 'trained'} {key[:12]}: {summary['steps']} steps, {losses}")
    return trained


def _teacher_answers(loaded: LoadedRecipe, teacher: Path, threads: int, out: Path) -> None:
    stage1 = _stage1(loaded, teacher, out / "teacher.jsonl", threads)
    (out / SUMMARY_FILE).write_text(json.dumps({"answers": stage1.total}) + "\n")


def _stage1(loaded: LoadedRecipe, teacher: Path, answers: Path, threads: int | None) -> TeacherOutputs:
    spec = loaded.recipe.train
    assert isinstance(spec, DistillStep)
    return teacher_outputs(
        teacher,
        loaded.train_data,
        answers,
        batch_size=spec.teacher_batch_size,
        max_new_tokens=spec.max_new_tokens,
        threads=threads,
        keep=spec.keep_answers,
        task=loaded.recipe.evaluation.task_spec(),
    )


def _train(
    loaded: LoadedRecipe, base: Path, answers: Path | None, cfg: FinetuneConfig | DistillConfig, out: Path
) -> None:
    if isinstance(cfg, FinetuneConfig):
        from slmops_builder.train.finetune import finetune

        result = finetune(base, loaded.train_data, out / "run", cfg, validation=loaded.train_validation, merge=True)
        assert result.merged_dir is not None
        shutil.rmtree(out / "run" / CHECKPOINTS_DIR, ignore_errors=True)
        trained, run = result.merged_dir, result.to_json()
        summary = {
            "kind": "finetune",
            "steps": run["steps"],
            "stopped_early": run["stopped_early"],
            "best_val_loss": run["best_val_loss"],
            "first_loss": run["first_train_loss"],
            "last_loss": run["last_train_loss"],
            "adapter_bytes": run["adapter_bytes"],
        }
    else:
        assert answers is not None
        stage1 = _stage1(loaded, base, answers, cfg.threads)
        if not stage1.examples:
            rejected = f", {stage1.rejected} not their reference" if stage1.keep == "exact" else ""
            raise RecipeError(
                f"{loaded.path}: train.data: the teacher's {stage1.total} answers left nothing to learn "
                f"({stage1.invalid} invalid under the evaluation's task scorer{rejected})"
            )
        result_d = distill(base, stage1.examples, out / "run", cfg, student=loaded.student)
        trained, run = result_d.student_dir, result_d.to_json()
        summary = {"kind": "distill", "mode": run["mode"], "steps": run["steps"], "answers": stage1.total}
        summary |= {"invalid": stage1.invalid, "rejected": stage1.rejected, "examples": len(stage1.examples)}
        summary |= {"first_loss": run["first_loss"], "last_loss": run["last_loss"]}
    os.replace(trained, out / "model")
    _write_lineage(loaded, base, out / "model")
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def _write_lineage(loaded: LoadedRecipe, imported: Path, trained: Path) -> None:
    """The trained folder's SOURCE_FILE: the import's source, with the run's training record in which
    the recipe's model (as the import names it) stands for the cache folders the run read."""
    from slmops_builder.train.run_output import write_training_record

    info = read_source_info(imported) or {}
    record = read_training_file(trained)
    if record is None:  # the public training functions always write one
        raise RuntimeError(f"{trained} has no training record")
    source = str(info.get("source", loaded.source))
    if record.get("teacher"):
        record["teacher"] = source
    record["base_model"] = str(loaded.student) if loaded.student is not None else source
    write_training_record(trained, record)
    lineage = {k: info[k] for k in ("source", "source_sha256", "architecture") if k in info}
    (trained / SOURCE_FILE).write_text(json.dumps({**lineage, "training": record}, indent=2) + "\n")
