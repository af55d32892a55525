"""Build recipes: one TOML file -> a signed, evaluated, gated package per hardware profile.

A recipe (unknown keys are refused, with the key named):

    name = "smollm2-135m-instruct"       # package name
    version = "1.0.0"                    # semantic version
    model = "smollm2"                    # "smollm2" (bundled), a .gguf file or an HF folder
    profiles = ["cpu-int4", "cpu-int8", "cpu-fp32"]
    fallback = ["cpu-int4", "cpu-int8", "cpu-fp32"]   # optional: package only the first that passes
    output = "dist/smollm2"              # replaced by each build; relative paths: to the recipe file
    parent_package = ""                  # optional: the package id this release follows

    [search]                             # optional generation defaults written into genai_config.json
    temperature = 0.7

    [evaluation]                         # every key optional
    heldout = "heldout.txt"              # text for perplexity [default: the builder's bundled prose]
    golden_prompts = ["What is the capital of France?"]
    golden_max_new_tokens = 24
    tasks = "tasks.jsonl"                # {"input": ..., "output": ...} per line: exact-match accuracy
    max_tokens = 1024                    # perplexity: tokens scored, window per generator
    window = 512
    threads = 2

    [gates]                              # every gate optional; see slmops_builder.gates
    reference = "cpu-fp32"               # ratios are relative to it [default: cpu-fp32 if in profiles]
    max_ppl_ratio = 1.05
    min_decode_tps = 100

Steps (each cached in the StepCache by a hash of its step, parameters, inputs and tools, so an
unchanged step is reused): import (the source into an fp32 HF folder), convert (per variant),
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

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmops_builder import evaluate, importer
from slmops_builder.build import (
    BuildEvent,
    ProgressFn,
    can_run_here,
    check_name_version,
    min_memory_bytes,
    step,
)
from slmops_builder.convert import convert, convert_key, stage, validate_search
from slmops_builder.evaluate import (
    Evaluation,
    GoldenPromptSpec,
    TaskExample,
    evaluate_variant,
    folder_size_bytes,
    heldout_text,
    load_tasks,
)
from slmops_builder.gates import GateResult, Gates, check_gates
from slmops_builder.importer import (
    BUNDLED_SOURCES,
    add_training_lineage,
    bundled_smollm2_gguf,
    folder_sha256,
    import_model,
    read_source_info,
)
from slmops_builder.keys import load_private_key
from slmops_builder.packaging import PackageSpec, WrittenPackage, write_package
from slmops_builder.profiles import get_profile
from slmops_builder.steps import CONVERT_TOOLS, StepCache, StepResult, tool_versions
from slmops_protos import __version__
from slmops_protos.manifests import sha256_file
from slmops_protos.package.v1 import manifest_pb2

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "RECIPE_STEPS",
    "REPORT_FILE",
    "EvaluationConfig",
    "LoadedRecipe",
    "PlannedStep",
    "Recipe",
    "RecipeError",
    "RecipeResult",
    "VariantResult",
    "build_recipe",
    "load_recipe",
    "plan_recipe",
    "progress_steps",
]

RECIPE_STEPS = ("import", "convert", "evaluate", "gate", "package", "report")
REPORT_FILE = "report.json"
PLOT_FILE = "report.png"
IMPORT_STEP = "import"
EVALUATE_STEP = "evaluate"
_IMPORT_TOOLS = ("transformers", "torch", "gguf", "safetensors")
_EVAL_TOOLS = ("onnxruntime-genai", "onnxruntime", "numpy")
_MIB = 1024**2


class RecipeError(ValueError):
    """A recipe that cannot be built: the message names the file and the key."""


class EvaluationConfig(BaseModel):
    """The `[evaluation]` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    heldout: Path | None = None
    golden_prompts: list[str] = Field(default_factory=lambda: ["What is the capital of France?"], min_length=1)
    golden_max_new_tokens: int = Field(default=24, ge=1, le=4096)
    tasks: Path | None = None
    max_tokens: int = Field(default=1024, ge=2)
    window: int = Field(default=512, ge=2)
    threads: int | None = Field(default=None, ge=1, le=256)


class Recipe(BaseModel):
    """A build recipe (see the module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    model: str = "smollm2"
    profiles: list[str] = Field(default_factory=list)
    fallback: list[str] = Field(default_factory=list)
    output: Path = Path("dist")
    parent_package: str = ""
    search: dict[str, bool | int | float] = Field(default_factory=dict)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    gates: Gates = Field(default_factory=Gates)

    @field_validator("profiles", "fallback")
    @classmethod
    def _known_profiles(cls, names: list[str]) -> list[str]:
        for n in names:
            get_profile(n)  # UnknownProfileError (a ValueError) lists the known names
        if len(set(names)) != len(names):
            raise ValueError("a profile is listed twice")
        return names

    @field_validator("parent_package")
    @classmethod
    def _package_id(cls, value: str) -> str:
        if value and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
            raise ValueError("must be a package id (64 lowercase hex digits)")
        return value

    @field_validator("search")
    @classmethod
    def _search(cls, value: dict[str, Any]) -> dict[str, Any]:
        return validate_search(value)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        check_name_version(self.name, self.version)
        if not self.profiles and not self.fallback:
            raise ValueError("no profiles: set 'profiles' (or 'fallback')")
        missing = [p for p in self.fallback if self.profiles and p not in self.profiles]
        if missing:
            raise ValueError(f"fallback profile(s) {missing} are not in profiles")
        if self.gates.reference is not None:
            get_profile(self.gates.reference)
        if self.gates.needs_reference() and self.reference is None:
            gate = next(g for g in ("max_ppl_ratio", "max_size_ratio") if getattr(self.gates, g) is not None)
            raise ValueError(
                f"gates.{gate} needs a reference variant: add 'cpu-fp32' to profiles or set gates.reference"
            )
        if self.gates.min_task_accuracy is not None and self.evaluation.tasks is None:
            raise ValueError("gates.min_task_accuracy needs a task set: set evaluation.tasks")
        return self

    @property
    def variants(self) -> list[str]:
        """The profiles to package, in order (`profiles`, else `fallback`)."""
        return list(self.profiles or self.fallback)

    @property
    def reference(self) -> str | None:
        """The variant ratios are relative to: `gates.reference`, else cpu-fp32 when built."""
        if self.gates.reference is not None:
            return self.gates.reference
        return "cpu-fp32" if "cpu-fp32" in self.variants else None


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe with its paths resolved and its data read."""

    path: Path
    sha256: str  # of the recipe file's bytes
    recipe: Recipe
    source: str | Path  # "smollm2" or a path
    output: Path
    heldout: str
    heldout_name: str
    tasks: tuple[TaskExample, ...]

    @property
    def variants(self) -> list[str]:
        """Everything converted and evaluated: the recipe's variants plus the reference."""
        names = self.recipe.variants
        ref = self.recipe.reference
        return names + ([ref] if ref and ref not in names else [])


def load_recipe(path: Path) -> LoadedRecipe:
    """Read and validate a recipe; resolve its paths against its folder; read its data files."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except OSError as exc:
        raise RecipeError(f"recipe {path} cannot be read: {exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{path}: {_describe(exc)}") from None
    base = path.parent
    source: str | Path
    if recipe.model in BUNDLED_SOURCES:
        source = recipe.model
    else:
        source = (base / recipe.model).expanduser().resolve()
        if not source.exists():
            raise RecipeError(f"{path}: model: {source} not found")
    from_gguf = isinstance(source, str) or source.suffix.lower() == ".gguf"
    needs_gguf = [n for n in recipe.variants if get_profile(n).requires == "gguf-4bit"]
    if needs_gguf and not from_gguf:
        raise RecipeError(f"{path}: profiles: {', '.join(needs_gguf)} need a GGUF model source, not {source}")
    ev = recipe.evaluation
    if ev.heldout is not None:
        held = base / ev.heldout
        try:
            text = held.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"{path}: evaluation.heldout: {held} not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path}: evaluation.heldout: {held} cannot be read as UTF-8 text: {exc}") from None
        held_name = str(held)
    else:
        text, held_name = heldout_text(), "slmops_builder/data/heldout.txt"
    tasks: list[TaskExample] = []
    if ev.tasks is not None:
        try:
            tasks = load_tasks(base / ev.tasks)
        except (FileNotFoundError, ValueError) as exc:
            raise RecipeError(f"{path}: evaluation.tasks: {exc}") from None
    return LoadedRecipe(
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        recipe=recipe,
        source=source,
        output=base / recipe.output,
        heldout=text,
        heldout_name=held_name,
        tasks=tuple(tasks),
    )


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key {loc!r} (known: {', '.join(_known_keys(err['loc']))})"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _known_keys(loc: Sequence[int | str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        info = model.model_fields.get(str(part))
        ann = info.annotation if info else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
    return sorted(model.model_fields)


# --- planning ---------------------------------------------------------------------------------------


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


def _import_key(source: str | Path) -> str:
    _, digest = _source_digest(source)
    tools = {**tool_versions(_IMPORT_TOOLS), "slmops-builder": __version__}
    return StepCache.key(IMPORT_STEP, {}, {"source": digest, "code": _code_sha256(importer)}, tools)


def _evaluate_key(loaded: LoadedRecipe, convert_key_: str, threads: int) -> str:
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
    return StepCache.key(EVALUATE_STEP, params, inputs, {**tool_versions(_EVAL_TOOLS), "slmops-builder": __version__})


def _check_runnable(loaded: LoadedRecipe) -> None:
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
    _check_runnable(loaded)
    cache = StepCache(cache_dir)
    n = _threads(loaded, threads)
    key = _import_key(loaded.source)
    imported = cache.has(IMPORT_STEP, key)
    plan = [PlannedStep(IMPORT_STEP, str(loaded.source), key, imported)]
    for name in loaded.variants:
        ckey = convert_key(cache.entry(IMPORT_STEP, key) / "model", get_profile(name))[0] if imported else None
        plan.append(PlannedStep("convert", name, ckey, ckey is not None and cache.has("convert", ckey)))
        ekey = _evaluate_key(loaded, ckey, n) if ckey and can_run_here(get_profile(name)) else None
        plan.append(PlannedStep(EVALUATE_STEP, name, ekey, ekey is not None and cache.has(EVALUATE_STEP, ekey)))
    plan += [PlannedStep(s, "", None, False) for s in ("gate", "package", "report")]
    return plan


def _threads(loaded: LoadedRecipe, threads: int | None) -> int:
    from slmops_builder.settings import BuilderSettings

    return threads or loaded.recipe.evaluation.threads or BuilderSettings().threads


# --- building ---------------------------------------------------------------------------------------


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

    @property
    def ok(self) -> bool:
        """Every requested profile (and the fallback chain, as one) produced a package."""
        r = self.recipe.recipe
        chain = set(r.fallback)
        singles = [v for v in self.variants if v.profile in r.variants and v.profile not in chain]
        chain_ok = not chain or any(v.verdict == "packaged" for v in self.variants if v.profile in chain)
        return chain_ok and all(v.verdict == "packaged" for v in singles)

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
    _check_runnable(loaded)
    cache = StepCache(cache_dir)
    n = _threads(loaded, threads)
    cached: dict[str, bool] = {}

    with step(report, IMPORT_STEP, str(loaded.source)) as done:
        imported = cache.run(
            IMPORT_STEP,
            _import_key(loaded.source),
            lambda tmp: _import(loaded.source, tmp / "model"),
            record={"source": str(loaded.source)},
        )
        cached[f"{IMPORT_STEP}:{loaded.source}"] = imported.cached
        done(f"{'reused cached' if imported.cached else 'imported'} {imported.key[:12]}")
    model_dir = imported.path / "model"

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
                    ekey = _evaluate_key(loaded, converted[name].key, n)
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
            _gate(variants, ref_name, recipe, {v.profile: can_run_here(get_profile(v.profile)) for v in variants})
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
                    written = _package(loaded, v, staged[v.profile], prompts, key, tmp_out / v.profile, imported.path)
                    v.package_id = written.package_id
                    v.package_path = str(out_dir / v.profile)
                    packages.append(written)
                    done(f"{written.package_id[:12]}")
            result = RecipeResult(loaded, out_dir, ref_name, variants, events, cached, [])
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


def _import(source: str | Path, out: Path) -> None:
    import_model(source, out)


def _evaluate(loaded: LoadedRecipe, folder: Path, prompts: list[GoldenPromptSpec], threads: int, out: Path) -> None:
    ev = loaded.recipe.evaluation
    result = evaluate_variant(
        folder,
        prompts,
        text=loaded.heldout,
        tasks=loaded.tasks,
        threads=threads,
        max_tokens=ev.max_tokens,
        window=ev.window,
    )
    (out / "evaluation.json").write_text(json.dumps({"metrics": result.metrics, "references": result.references}))


def _metrics_line(metrics: dict[str, float]) -> str:
    keys = ("perplexity", "decode_tps", "ttft_ms", "peak_rss_mb", "task_accuracy")
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def _gate(variants: list[VariantResult], ref_name: str | None, recipe: Recipe, runnable: dict[str, bool]) -> None:
    ref = next((v for v in variants if v.profile == ref_name), None)
    for v in variants:
        if ref is not None:
            if "perplexity" in v.metrics and "perplexity" in ref.metrics:
                v.metrics["ppl_ratio"] = v.metrics["perplexity"] / ref.metrics["perplexity"]
            v.metrics["size_ratio"] = v.size_bytes / ref.size_bytes
        why = "not measured" if runnable[v.profile] else "not measured: this machine cannot run the variant"
        v.gates = check_gates(recipe.gates.thresholds(), v.metrics, unmeasured=why)
    chain = recipe.fallback
    chosen = next((v.profile for v in variants if v.profile in chain and v.passed), None) if chain else None
    for v in variants:
        failed = "; ".join(g.reason for g in v.gates if not g.passed)
        if v.profile not in recipe.variants:
            v.verdict, v.reason = "reference only", "the gates' reference; not in profiles"
        elif not v.passed:
            v.verdict, v.reason = "failed gates", failed
        elif chain and v.profile in chain and v.profile != chosen:
            v.verdict, v.reason = "not selected", f"fallback chose {chosen}, earlier in {chain}"
        else:
            v.verdict, v.reason = "packaged", "; ".join(g.reason for g in v.gates) or "no gates"


def _package(
    loaded: LoadedRecipe,
    v: VariantResult,
    staged: Path,
    prompts: list[GoldenPromptSpec],
    key: Any,
    out: Path,
    imported: Path,
) -> WrittenPackage:
    recipe = loaded.recipe
    prof = get_profile(v.profile)
    info = read_source_info(imported / "model") or {}
    lineage = manifest_pb2.Lineage(
        base_model=str(info.get("source", loaded.source)),
        base_model_sha256=str(info.get("source_sha256", "")),
        recipe_sha256=loaded.sha256,
        parent_package_id=recipe.parent_package,
        engine=v.engine,
        quantization_method=v.method,
    )
    lineage.tool_versions.update(tool_versions((*CONVERT_TOOLS, "torch")))
    add_training_lineage(lineage, imported / "model", info)
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
    )
    return write_package(staged, spec, key, out)


def progress_steps(loaded: LoadedRecipe) -> list[tuple[str, str]]:
    """(step, target) rows a progress display shows for this recipe, in order."""
    rows = [(IMPORT_STEP, str(loaded.source))]
    rows += [("convert", n) for n in loaded.variants]
    rows += [(EVALUATE_STEP, n) for n in loaded.variants]
    rows += [("gate", "")]
    rows += [("package", n) for n in loaded.recipe.variants]
    rows += [("report", "")]
    return rows
