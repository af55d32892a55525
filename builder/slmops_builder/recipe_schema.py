"""A build recipe's schema: one TOML file -> a signed, evaluated, gated package per hardware profile.

A recipe (unknown keys are refused, with the key named):

    name = "smollm2-135m-instruct"       # package name
    version = "1.0.0"                    # semantic version
    model = "smollm2"                    # "smollm2" (bundled), a .gguf file or an HF folder
    profiles = ["cpu-int4", "cpu-int8", "cpu-fp32"]
    fallback = ["cpu-int4", "cpu-int8", "cpu-fp32"]   # optional: package only the first that passes
    output = "dist/smollm2"              # replaced by each build; relative paths: to the recipe file
    parent_package = ""                  # optional: the package id this release follows
    security_version = 0                 # optional: devices refuse packages below the highest committed

    [search]                             # optional generation defaults written into genai_config.json
    temperature = 0.7

    [evaluation]                         # every key optional
    heldout = "heldout.txt"              # text for perplexity [default: the builder's bundled prose]
    golden_prompts = ["What is the capital of France?"]
    golden_max_new_tokens = 24
    tasks = "tasks.jsonl"                # {"input": ..., "output": ...} per line: metric task_accuracy
    task_schema = "action.schema.json"   # optional: answers held to this JSON Schema (outputs must be JSON)
    task_system = "Reply in one word."   # optional: the system prompt of the task's chats [default: none]
    task_scorer = "f1"                   # optional: json, exact, contains, regex, f1 or rouge_l (see
                                         # train.scoring) [default: exact; json with a task_schema]
    task_pattern = "[A-Z][a-z]+"         # the regex the answers of task_scorer = "regex" match in full
    max_tokens = 1024                    # perplexity: tokens scored, window per generator
    window = 512
    threads = 2

    [gates]                              # every gate optional; see slmops_builder.gates
    reference = "cpu-fp32"               # ratios are relative to it [default: cpu-fp32 if in profiles]
    max_ppl_ratio = 1.05
    min_decode_tps = 100

    [train]                              # optional: train first, then convert the trained model
    kind = "finetune"                    # "finetune": LoRA, merged into the model; "distill": a student
    data = "train.jsonl"                 # {"input", "output"} or {"messages"} per line (train.examples);
                                         # records without a system prompt get evaluation.task_system
    validation = "validation.jsonl"      # finetune only, optional: early stopping, best adapter
    max_steps = 50                       # every other key: a FinetuneConfig field (train.runs), with
    [train.lora]                         # [train.lora]; for distill, a DistillConfig field (train.distill)
    r = 8                                # and keep_answers ("valid" | "exact"), student (an HF folder
                                         # [default: the recipe's model, layer-pruned])

The plan (`slmops_builder.recipe_plan`) and the build (`slmops_builder.recipe_run`) take the
`LoadedRecipe` that `load_recipe` returns.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmops_builder.build import check_name_version
from slmops_builder.convert import validate_search
from slmops_builder.evaluate import TaskExample, heldout_text, load_tasks, task_scorer
from slmops_builder.gates import Gates
from slmops_builder.importer import BUNDLED_SOURCES
from slmops_builder.profiles import get_profile
from slmops_builder.train.distill import DistillConfig, KeepAnswers
from slmops_builder.train.examples import Example, load_jsonl
from slmops_builder.train.runs import FinetuneConfig
from slmops_builder.train.scoring import SCORERS, TaskSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DistillStep",
    "EvaluationConfig",
    "FinetuneStep",
    "LoadedRecipe",
    "Recipe",
    "RecipeError",
    "TrainStep",
    "load_recipe",
]


class RecipeError(ValueError):
    """A recipe that cannot be built: the message names the file and the key."""


class EvaluationConfig(BaseModel):
    """The `[evaluation]` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    heldout: Path | None = None
    golden_prompts: list[str] = Field(default_factory=lambda: ["What is the capital of France?"], min_length=1)
    golden_max_new_tokens: int = Field(default=24, ge=1, le=4096)
    tasks: Path | None = None
    task_schema: Path | None = None
    task_system: str | None = Field(default=None, min_length=1)
    task_scorer: str | None = None
    task_pattern: str | None = None
    max_tokens: int = Field(default=1024, ge=2)
    window: int = Field(default=512, ge=2)
    threads: int | None = Field(default=None, ge=1, le=256)

    @field_validator("task_scorer")
    @classmethod
    def _known_scorer(cls, name: str | None) -> str | None:
        if name is not None and name not in SCORERS:
            raise ValueError(f"must be one of {', '.join(SCORERS)}, not {name!r}")
        return name

    @model_validator(mode="after")
    def _scorer_pattern(self) -> EvaluationConfig:
        if self.task_scorer == "regex" and self.task_pattern is None:
            raise ValueError('task_scorer = "regex" needs task_pattern (the regex answers must match in full)')
        if self.task_pattern is not None and self.task_scorer != "regex":
            raise ValueError('task_pattern is the pattern of task_scorer = "regex"; set that or drop it')
        try:
            self.task_spec()
        except ValidationError as exc:  # the pattern is not a regular expression
            raise ValueError(f"task_pattern: {str(exc.errors()[0]['msg']).removeprefix('Value error, ')}") from None
        return self

    def task_spec(self) -> TaskSpec:
        """The task's scorer (`evaluate.task_scorer`: the default follows `task_schema`)."""
        schema = None if self.task_schema is None else str(self.task_schema)
        return task_scorer(self.task_scorer, self.task_pattern, schema)


class FinetuneStep(FinetuneConfig):
    """`[train]` with kind = "finetune": its data, and the `FinetuneConfig` of the run."""

    kind: Literal["finetune"]
    data: Path
    validation: Path | None = None

    def config(self) -> FinetuneConfig:
        """The run's configuration: the keys given (an engine refuses only what was asked for)."""
        return FinetuneConfig(
            **{k: getattr(self, k) for k in self.model_fields_set & FinetuneConfig.model_fields.keys()}
        )


class DistillStep(DistillConfig):
    """`[train]` with kind = "distill": the inputs the teacher (the recipe's model) answers, which of
    its answers the student learns, the student, and the `DistillConfig` of the run."""

    kind: Literal["distill"]
    data: Path
    keep_answers: KeepAnswers = "valid"
    student: Path | None = None

    def config(self) -> DistillConfig:
        """The run's configuration: the keys given."""
        return DistillConfig(**{k: getattr(self, k) for k in self.model_fields_set & DistillConfig.model_fields.keys()})


TrainStep = Annotated[FinetuneStep | DistillStep, Field(discriminator="kind")]
_TRAIN_KINDS: dict[str, type[BaseModel]] = {"finetune": FinetuneStep, "distill": DistillStep}


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
    security_version: int = Field(default=0, ge=0)  # devices refuse packages below the highest committed
    search: dict[str, bool | int | float] = Field(default_factory=dict)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    gates: Gates = Field(default_factory=Gates)
    train: TrainStep | None = None

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
        for key in ("task_system", "task_scorer"):
            if getattr(self.evaluation, key) is not None and self.evaluation.tasks is None:
                raise ValueError(f"evaluation.{key} needs a task set: set evaluation.tasks")
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
    task_schema: str | None = None  # the JSON Schema text the task's answers are held to
    train_data: tuple[Example, ...] = ()  # [train]'s data (a distillation's: the teacher's inputs)
    train_validation: tuple[Example, ...] = ()
    student: Path | None = None  # a distillation's given student folder

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
    if needs_gguf and recipe.train is not None:
        raise RecipeError(
            f"{path}: profiles: {', '.join(needs_gguf)} package the source GGUF itself, not a trained model; "
            "drop them or the [train] table"
        )
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
    task_schema = _task_schema(path, base, ev.task_schema, tasks)
    train, validation, student = _train_inputs(path, base, recipe)
    return LoadedRecipe(
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        recipe=recipe,
        source=source,
        output=base / recipe.output,
        heldout=text,
        heldout_name=held_name,
        tasks=tuple(tasks),
        task_schema=task_schema,
        train_data=train,
        train_validation=validation,
        student=student,
    )


def _train_inputs(
    path: Path, base: Path, recipe: Recipe
) -> tuple[tuple[Example, ...], tuple[Example, ...], Path | None]:
    """[train]'s data and validation examples (with the evaluation's system prompt) and student folder."""
    step = recipe.train
    if step is None:
        return (), (), None
    system = recipe.evaluation.task_system

    def examples(key: str, file: Path | None) -> tuple[Example, ...]:
        if file is None:
            return ()
        try:
            return tuple(load_jsonl(base / file, system=system))
        except (FileNotFoundError, ValueError) as exc:  # DatasetError names every bad line
            raise RecipeError(f"{path}: train.{key}: {exc}") from None

    data = examples("data", step.data)
    if isinstance(step, DistillStep):
        student = None
        if step.student is not None:
            student = (base / step.student).expanduser().resolve()
            if not (student / "config.json").is_file():
                raise RecipeError(
                    f"{path}: train.student: {student} is not a Hugging Face model folder (no config.json)"
                )
        return data, (), student
    return data, examples("validation", step.validation), None


def _task_schema(path: Path, base: Path, schema_path: Path | None, tasks: list[TaskExample]) -> str | None:
    """The task schema's text: a JSON object, for a task set whose every output is JSON."""
    if schema_path is None:
        return None
    where = f"{path}: evaluation.task_schema"
    if not tasks:
        raise RecipeError(f"{where} needs a task set: set evaluation.tasks")
    try:
        text = (base / schema_path).read_text(encoding="utf-8")
        schema = json.loads(text)
    except FileNotFoundError:
        raise RecipeError(f"{where}: {base / schema_path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecipeError(f"{where}: {base / schema_path} is not a JSON file: {exc}") from None
    if not isinstance(schema, dict):
        raise RecipeError(f"{where}: a JSON Schema is an object; got {type(schema).__name__}")
    for n, t in enumerate(tasks, 1):
        try:
            json.loads(t.output)
        except json.JSONDecodeError:
            raise RecipeError(f"{where}: task {n}'s output is not JSON, so it cannot be held to a schema") from None
    return text


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    parts = list(err["loc"])
    model: type[BaseModel] = Recipe
    within = parts  # the key's path inside `model`
    if parts[:1] == ["train"]:
        if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
            given = err["input"].get("kind") if isinstance(err["input"], dict) else None
            got = "missing" if given is None else f"not {given!r}"
            return f"train.kind: must be {' or '.join(repr(k) for k in _TRAIN_KINDS)} ({got})"
        if len(parts) > 1 and parts[1] in _TRAIN_KINDS:  # the union's tag, not a key of the recipe
            model = _TRAIN_KINDS[str(parts.pop(1))]
            within = parts[1:]
    loc = ".".join(str(p) for p in parts)
    if err["type"] == "extra_forbidden":
        return f"unknown key {loc!r} (known: {', '.join(_known_keys(model, within))})"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _known_keys(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    for part in loc[:-1]:
        info = model.model_fields.get(str(part))
        ann = info.annotation if info else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
    return sorted(model.model_fields)
