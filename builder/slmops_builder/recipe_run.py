"""Building a recipe: import, (train,) convert, evaluate, gate, package and report.

Steps (each cached in the StepCache by a hash of its step, parameters, inputs and tools, so an
unchanged step is reused): import (the source into an fp32 HF folder), with a `[train]` table the
training (`slmops_builder.recipe_train`: the variants are then built from the trained model and
their lineage names its teacher and data), convert (per variant),
evaluate (per variant: in a fresh onnxruntime-genai process, see `slmops_builder.evaluate`), then
gate, package and report, which always run. The reference variant is built and evaluated even when
it is not in `profiles` (then it is not packaged).

Decisions:
- A gate that can never be evaluated for the recipe (a ratio gate without a reference, task accuracy
  without a task set, a reference this machine cannot run) is a `RecipeError` when the recipe is
  loaded or planned, before any work. A metric that one variant lacks at run time (a CUDA variant on
  a machine without CUDA is not evaluated) fails that variant's gate, with the reason in the report.
- Every variant is converted and evaluated before anything is packaged; packages and the report are
  written into a temporary sibling of `output`, which then replaces `output`. An error at any step
  leaves the previous output as it was and no partial package.
- With `fallback`, every fallback profile is still evaluated (the report shows them all), and only
  the first that passes its gates is packaged (the seed's int4 -> int8 -> fp16 policy).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from slmops_builder.build import BuildEvent, ProgressFn, can_run_here, min_memory_bytes, step
from slmops_builder.convert import convert, stage
from slmops_builder.evaluate import Evaluation, GoldenPromptSpec, evaluate_variant, folder_size_bytes
from slmops_builder.gates import GateResult, gate_variants
from slmops_builder.importer import import_model
from slmops_builder.keys import load_private_key
from slmops_builder.lineage import package_lineage
from slmops_builder.packaging import PackageSpec, WrittenPackage, write_package
from slmops_builder.profiles import get_profile
from slmops_builder.recipe_plan import (
    EVALUATE_STEP,
    IMPORT_STEP,
    check_runnable,
    evaluate_key,
    import_key,
    recipe_threads,
)
from slmops_builder.recipe_schema import LoadedRecipe, RecipeError
from slmops_builder.recipe_train import SUMMARY_FILE, run_training
from slmops_builder.steps import StepCache, StepResult
from slmops_protos.package.v1 import manifest_pb2

__all__ = ["PLOT_FILE", "REPORT_FILE", "RecipeResult", "VariantResult", "build_recipe"]

REPORT_FILE = "report.json"
PLOT_FILE = "report.png"
_MIB = 1024**2


@dataclass
class VariantResult:
    profile: str
    engine: str
    method: str
    metrics: dict[str, float]
    references: list[str]
    gates: list[GateResult] = field(default_factory=list)
    verdict: str = ""  # "packaged" | "failed gates" | "not selected" | "reference only"
    reason: str = ""
    package_id: str = ""
    package_path: str = ""
    size_bytes: int = 0

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_dict(self) -> dict[str, object]:
        return {
            "profile": self.profile,
            "engine": self.engine,
            "method": self.method,
            "size_bytes": self.size_bytes,
            "metrics": self.metrics,
            "gates": [g.to_dict() for g in self.gates],
            "passed": self.passed,
            "verdict": self.verdict,
            "reason": self.reason,
            "package_id": self.package_id,
            "package_path": self.package_path,
        }


@dataclass
class RecipeResult:
    recipe: LoadedRecipe
    output: Path
    reference: str | None
    variants: list[VariantResult]
    steps: list[BuildEvent]
    cached: dict[str, bool]  # "step:target" -> reused from the cache
    packages: list[WrittenPackage]
    training: dict[str, Any] | None = None  # the train step's summary (a recipe with [train])

    @property
    def ok(self) -> bool:
        """Every requested profile (and the fallback chain, as one) produced a package."""
        r = self.recipe.recipe
        chain = set(r.fallback)
        singles = [v for v in self.variants if v.profile in r.variants and v.profile not in chain]
        chain_ok = not chain or any(v.verdict == "packaged" for v in self.variants if v.profile in chain)
        return chain_ok and all(v.verdict == "packaged" for v in singles)

    def _task(self) -> dict[str, object] | None:
        """What the variants' `task_accuracy` measures: the task set's size and its scorer."""
        if not self.recipe.tasks:
            return None
        spec = self.recipe.recipe.evaluation.task_spec()
        return {"examples": len(self.recipe.tasks), "scorer": spec.scorer, "pattern": spec.pattern}

    def to_dict(self) -> dict[str, object]:
        r = self.recipe.recipe
        return {
            "recipe": str(self.recipe.path),
            "recipe_sha256": self.recipe.sha256,
            "name": r.name,
            "version": r.version,
            "output": str(self.output),
            "reference": self.reference,
            "fallback": r.fallback,
            "gates": r.gates.thresholds(),
            "heldout": self.recipe.heldout_name,
            "task": self._task(),
            "train": self.training,
            "ok": self.ok,
            "steps": [
                {
                    "step": e.step,
                    "target": e.target,
                    "seconds": round(e.seconds, 3),
                    "cached": self.cached.get(f"{e.step}:{e.target}", False),
                    "detail": e.detail,
                }
                for e in self.steps
            ],
            "variants": [v.to_dict() for v in self.variants],
            "plot": PLOT_FILE,
        }


def build_recipe(
    loaded: LoadedRecipe,
    key_path: Path,
    *,
    cache_dir: Path | None = None,
    threads: int | None = None,
    output: Path | None = None,
    progress: ProgressFn | None = None,
) -> RecipeResult:
    """Run the recipe (see the module doc). Raises on errors, leaving the previous output as it was;
    gate failures are not errors: they are in the result (and its report)."""
    from slmops_builder.report import write_plot

    events: list[BuildEvent] = []

    def report(event: BuildEvent) -> None:
        if event.status == "done":
            events.append(event)
        if progress is not None:
            progress(event)

    recipe = loaded.recipe
    out_dir = Path(output) if output is not None else loaded.output
    _check_output(out_dir)
    key = load_private_key(Path(key_path))  # a bad key fails before the slow part
    check_runnable(loaded)
    cache = StepCache(cache_dir)
    n = recipe_threads(loaded, threads)
    cached: dict[str, bool] = {}

    with step(report, IMPORT_STEP, str(loaded.source)) as done:
        imported = cache.run(
            IMPORT_STEP,
            import_key(loaded.source),
            lambda tmp: _import(loaded.source, tmp / "model", loaded.variants),
            record={"source": str(loaded.source)},
        )
        cached[f"{IMPORT_STEP}:{loaded.source}"] = imported.cached
        done(f"{'reused cached' if imported.cached else 'imported'} {imported.key[:12]}")
    built_from = imported  # the entry whose model/ the variants are converted from
    training = None
    if recipe.train is not None:
        built_from = run_training(loaded, cache, imported, n, report, cached)
        training = json.loads((built_from.path / SUMMARY_FILE).read_text())
    model_dir = built_from.path / "model"

    converted: dict[str, StepResult] = {}
    for name in loaded.variants:
        with step(report, "convert", name) as done:
            entry = convert(model_dir, get_profile(name), cache_dir=cache.root, threads=n)
            converted[name] = entry
            cached[f"convert:{name}"] = entry.cached
            done(f"{'reused cached' if entry.cached else 'converted'} {entry.key[:12]}")

    prompts = [GoldenPromptSpec(p, recipe.evaluation.golden_max_new_tokens) for p in recipe.evaluation.golden_prompts]
    with tempfile.TemporaryDirectory(prefix="slmops-recipe-") as tmp_root:
        staged: dict[str, Path] = {}
        variants: list[VariantResult] = []
        for name in loaded.variants:
            prof = get_profile(name)
            folder = stage(
                converted[name].path, Path(tmp_root) / name, name=f"{recipe.name}-{name}", search=recipe.search
            )
            staged[name] = folder
            with step(report, EVALUATE_STEP, name) as done:
                if can_run_here(prof):
                    ekey = evaluate_key(loaded, converted[name].key, n)
                    measured = cache.run(
                        EVALUATE_STEP,
                        ekey,
                        partial(_evaluate, loaded, folder, prompts, n),
                        record={"profile": name},
                    )
                    cached[f"{EVALUATE_STEP}:{name}"] = measured.cached
                    ev = json.loads((measured.path / "evaluation.json").read_text())
                    evaluation = Evaluation(references=list(ev["references"]), metrics=dict(ev["metrics"]))
                    done(("reused cached: " if measured.cached else "") + _metrics_line(evaluation.metrics))
                else:
                    evaluation = Evaluation(
                        references=["" for _ in prompts], metrics={"size_mb": folder_size_bytes(folder) / _MIB}
                    )
                    done(f"skipped: no {prof.execution_provider} execution provider on this machine")
            variants.append(
                VariantResult(
                    name,
                    prof.engine,
                    prof.quantization_method,
                    evaluation.metrics,
                    evaluation.references,
                    size_bytes=folder_size_bytes(folder),
                )
            )

        ref_name = recipe.reference
        with step(report, "gate", "") as done:
            gate_variants(
                variants,
                reference=ref_name,
                thresholds=recipe.gates.thresholds(),
                to_package=recipe.variants,
                fallback=recipe.fallback,
                runnable={v.profile: can_run_here(get_profile(v.profile)) for v in variants},
            )
            done(", ".join(f"{v.profile} {'pass' if v.passed else 'FAIL'}" for v in variants))

        tmp_out = out_dir.with_name(out_dir.name + f".partial-{os.getpid()}")
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir(parents=True)
        packages: list[WrittenPackage] = []
        try:
            for v in variants:
                if v.verdict != "packaged":
                    continue
                with step(report, "package", v.profile) as done:
                    written = _package(loaded, v, staged[v.profile], prompts, key, tmp_out / v.profile, built_from.path)
                    v.package_id = written.package_id
                    v.package_path = str(out_dir / v.profile)
                    packages.append(written)
                    done(f"{written.package_id[:12]}")
            result = RecipeResult(loaded, out_dir, ref_name, variants, events, cached, [], training)
            with step(report, "report", "") as done:
                write_plot(result.to_dict(), tmp_out / PLOT_FILE)
                done(f"{out_dir / REPORT_FILE}, {out_dir / PLOT_FILE}")
            (tmp_out / REPORT_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_out, out_dir)
        except BaseException:
            shutil.rmtree(tmp_out, ignore_errors=True)
            raise
    result.packages = [WrittenPackage(out_dir / p.path.name, p.package_id, p.manifest, p.blob_bytes) for p in packages]
    return result


def _check_output(out_dir: Path) -> None:
    """Refuse to replace a folder that is not an earlier build's output (it would be deleted)."""
    if out_dir.exists() and (
        not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / REPORT_FILE).is_file())
    ):
        raise RecipeError(
            f"output {out_dir} exists and is not a recipe build's output (no {REPORT_FILE}); choose another"
        )


def _import(source: str | Path, out: Path, profiles: list[str]) -> None:
    import_model(source, out, profiles=profiles)  # refuses a profile the model does not build, first


def _evaluate(loaded: LoadedRecipe, folder: Path, prompts: list[GoldenPromptSpec], threads: int, out: Path) -> None:
    ev = loaded.recipe.evaluation
    result = evaluate_variant(
        folder,
        prompts,
        text=loaded.heldout,
        tasks=loaded.tasks,
        task_schema=loaded.task_schema,
        task_system=ev.task_system,
        task_scorer=ev.task_spec(),
        threads=threads,
        max_tokens=ev.max_tokens,
        window=ev.window,
    )
    (out / "evaluation.json").write_text(json.dumps({"metrics": result.metrics, "references": result.references}))


def _metrics_line(metrics: dict[str, float]) -> str:
    keys = ("perplexity", "decode_tps", "ttft_ms", "peak_rss_mb", "task_accuracy")
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def _package(
    loaded: LoadedRecipe,
    v: VariantResult,
    staged: Path,
    prompts: list[GoldenPromptSpec],
    key: Any,
    out: Path,
    entry: Path,
) -> WrittenPackage:
    """`entry`: the import's or the training's cache entry, whose model/ was converted."""
    recipe = loaded.recipe
    prof = get_profile(v.profile)
    lineage = package_lineage(
        entry / "model", prof, recipe_sha256=loaded.sha256, parent_package_id=recipe.parent_package
    )
    metrics = {k: val for k, val in v.metrics.items() if k != "size_mb"}
    spec = PackageSpec(
        name=recipe.name,
        version=recipe.version,
        profile=prof.to_pb(min_memory_bytes=min_memory_bytes(prof, v.size_bytes)),
        lineage=lineage,
        evaluation=manifest_pb2.Evaluation(metrics=metrics, size_bytes=v.size_bytes),
        golden_prompts=[
            manifest_pb2.GoldenPrompt(prompt=p.prompt, reference=ref, max_new_tokens=p.max_new_tokens)
            for p, ref in zip(prompts, v.references, strict=True)
        ],
        security_version=recipe.security_version,
    )
    return write_package(staged, spec, key, out)
