"""Distillation in two stages.

Stage 1 (`teacher_outputs`): the teacher (an HF folder) answers the task inputs, batched and greedy;
each answer is kept with the teacher's scores (mean token log-probability; exact match and field
accuracy against the reference when there is one) in a JSONL cache keyed by the teacher's weights,
the inputs and the generation settings. Answers the task's validity rule refuses (`scoring.TaskSpec`:
by default, those that are not a JSON object; for a free-text task, empty or overlong ones) are
filtered out and counted; with `keep="exact"`, so are valid answers that differ from their input's
reference (the teacher's mistakes are not taught; the count is `rejected`).

Stage 2 (`distill`): a student (by default a layer-pruned copy of the teacher: evenly spaced layers,
first and last kept; with `vocab_top`, its vocabulary trimmed to the task's tokens, see `vocab.py`)
learns the teacher's answers: KL divergence between temperature-softened teacher and student
distributions (scaled by T^2) plus cross-entropy on the teacher's text, when the student's tokens are
the teacher's (the same vocabulary or a trimmed copy of it: the teacher's logits are taken at the
student's tokens); cross-entropy on the teacher's text alone (sequence-level KD) otherwise. The
teacher's distributions at the answer positions are computed once per example and kept in memory
when they fit in `teacher_cache_mb`. The training runs on transformers' Trainer
(`distill_trainer.DistillTrainer`): on CUDA when present (bf16 where it supports it), in
several processes under torchrun or accelerate launch (`batch_size` is the global batch), with
checkpoints in out/checkpoints every `save_every` steps that a resumed run (`resume`, under any
process count) goes on from.
`evaluate_models` scores teacher, student and the undistilled student on held-out examples with the
task's scorer.
The student folder holds slmops_training.json (teacher, its weights' hash, data hash): the lineage
its packages carry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmops_builder.train.batches import encode_example
from slmops_builder.train.examples import Example, dataset_sha256
from slmops_builder.train.hf_models import load_tokenizer, prompt_text
from slmops_builder.train.qat import QuantAwareWeights
from slmops_builder.train.run_output import plot_losses, write_loss_csv, write_training_record
from slmops_builder.train.runs import ProgressEvent
from slmops_builder.train.scoring import TaskSpec
from slmops_builder.train.trainer_setup import (
    Device,
    Precision,
    is_main_process,
    per_process_batch,
    resolve_device,
    resolve_precision,
    stream_dataset,
    trainer_classes,
    training_arguments,
    wait_for_everyone,
    warmup_then_linear,
    world_size,
)
from slmops_builder.train.vocab import VOCAB_FILE, read_kept_ids, trim_vocab

__all__ = [
    "DistillConfig",
    "DistillResult",
    "KeepAnswers",
    "TeacherOutputs",
    "distill",
    "evaluate_models",
    "prune_layers",
    "teacher_outputs",
    "weights_bytes",
]

STUDENT_DIR = "student"
INIT_DIR = "student-init"
CHECKPOINTS_DIR = "checkpoints"
RUN_FILE = "run.json"  # in CHECKPOINTS_DIR: the settings and data its checkpoints belong to
# The settings a resumed run must share with its checkpoints (the others: where and how it runs).
_RUN_SHAPE = {
    "keep_layers", "max_steps", "learning_rate", "batch_size", "max_length", "temperature", "kd_weight", "seed",
    "vocab_top", "context_length", "qat_steps",
}  # fmt: skip

KeepAnswers = Literal["valid", "exact"]


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_layers: int = Field(default=8, ge=1, description="layers of the pruned student (ignored with a given student)")
    max_steps: int = Field(default=200, ge=1)
    learning_rate: float = Field(default=5e-4, gt=0)
    batch_size: int = Field(default=8, ge=1)
    max_length: int = Field(default=256, ge=8)
    temperature: float = Field(default=2.0, gt=0)
    kd_weight: float = Field(default=0.5, ge=0.0, le=1.0, description="weight of the KL term; 1 - it weights the CE")
    seed: int = 0
    threads: int | None = Field(default=None, ge=1)
    teacher_batch_size: int = Field(default=8, ge=1)
    max_new_tokens: int = Field(default=64, ge=1)
    vocab_top: int | None = Field(
        default=None,
        ge=0,
        description="trim the pruned student's vocabulary to the task's tokens plus the N most frequent "
        "(None: keep the teacher's)",
    )
    teacher_cache_mb: int = Field(default=2048, ge=0, description="memory for the teacher's distributions")
    context_length: int | None = Field(
        default=None, ge=8, description="the pruned student's context window (None: the teacher's)"
    )
    qat_steps: int = Field(
        default=0,
        ge=0,
        description="the last N steps train on the int4 weights of the cpu-int4 profile (RTN, block 32), "
        "and the student is saved on that grid (0: float training)",
    )
    save_every: int = Field(default=50, ge=0, description="steps between checkpoints (0: none)")
    keep_checkpoints: int = Field(default=1, ge=1, description="the checkpoints kept (the last ones)")
    resume: bool = Field(default=False, description="go on from the last checkpoint in out/checkpoints")
    device: Device = Field(default="auto", description="auto: CUDA when torch sees a GPU, else the CPU")
    precision: Precision = Field(
        default="auto",
        description="mixed precision over float32 weights; auto: bf16 on a CUDA GPU that has it, else fp32",
    )
    gradient_checkpointing: bool = Field(default=False, description="trade compute for memory")

    @model_validator(mode="after")
    def _fits_the_context(self) -> DistillConfig:
        if self.context_length is not None and self.max_length > self.context_length:
            raise ValueError(f"max_length {self.max_length} is longer than context_length {self.context_length}")
        if self.qat_steps > self.max_steps:
            raise ValueError(f"qat_steps {self.qat_steps} is more than max_steps {self.max_steps}")
        return self


@dataclass(frozen=True)
class TeacherOutputs:
    path: Path
    examples: list[Example]  # the kept answers, as training examples
    total: int
    invalid: int
    cached: bool
    seconds: float
    exact_match: float | None
    keep: KeepAnswers = "valid"
    rejected: int = 0  # valid answers dropped for differing from the reference (keep="exact")

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "total": self.total,
            "valid": self.total - self.invalid,
            "invalid": self.invalid,
            "keep": self.keep,
            "rejected": self.rejected,
            "kept": len(self.examples),
            "cached": self.cached,
            "seconds": round(self.seconds, 2),
            "teacher_exact_match": self.exact_match,
        }


@dataclass
class DistillResult:
    student_dir: Path
    init_dir: Path | None
    steps: int
    mode: str  # "kl+ce" or "sequence"
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0  # the checkpoint's step a resumed run went on from

    def to_json(self) -> dict[str, Any]:
        return {
            "student_dir": str(self.student_dir),
            "init_dir": str(self.init_dir) if self.init_dir else None,
            "steps": self.steps,
            "resumed_from": self.resumed_from,
            "mode": self.mode,
            "first_loss": self.history[0]["train_loss"] if self.history else None,
            "last_loss": self.history[-1]["train_loss"] if self.history else None,
            "seconds": round(self.seconds, 2),
        }


def _folder_hash(folder: Path) -> str:
    from slmops_builder.steps import file_hashes

    return hashlib.sha256(json.dumps(file_hashes(folder), sort_keys=True).encode()).hexdigest()


def teacher_outputs(
    teacher: Path,
    examples: Sequence[Example],
    cache_path: Path,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    threads: int | None = None,
    keep: KeepAnswers = "valid",
    task: TaskSpec | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TeacherOutputs:
    """Stage 1: the teacher's answers for `examples`; the answers `task`'s validity rule accepts are
    kept for the student (with `keep="exact"`, only those equal to their reference). Validity and
    scores are worked out again from the cached answers, so the cache outlives a change of rule."""
    import torch

    from slmops_builder.train.generation import generate_hf
    from slmops_builder.train.hf_models import load_causal_lm

    teacher, cache_path = Path(teacher), Path(cache_path)
    if not (teacher / "config.json").is_file():
        raise FileNotFoundError(f"the teacher must be a Hugging Face model folder; {teacher} has no config.json")
    key = hashlib.sha256(
        json.dumps(
            {"teacher": _folder_hash(teacher), "data": dataset_sha256(examples), "max_new_tokens": max_new_tokens},
            sort_keys=True,
        ).encode()
    ).hexdigest()
    meta_path = cache_path.with_name(cache_path.name + ".meta.json")
    spec = task or TaskSpec()
    t0 = time.perf_counter()
    cached = meta_path.is_file() and cache_path.is_file() and json.loads(meta_path.read_text()).get("key") == key
    if not cached:
        if threads:
            torch.set_num_threads(threads)
        tok = load_tokenizer(teacher)
        model = load_causal_lm(teacher)
        rows: list[dict[str, Any]] = []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            gen = generate_hf(
                model, tok, [ex.prompt_messages for ex in chunk], max_new_tokens=max_new_tokens, batch_size=batch_size
            )
            for ex, text, lp in zip(chunk, gen.texts, gen.token_logprobs, strict=True):
                rows.append(
                    {
                        "messages": ex.prompt_messages,
                        "reference": ex.output,
                        "teacher_output": text,
                        "mean_logprob": round(lp, 5),
                    }
                )
            if progress:
                progress(min(i + batch_size, len(examples)), len(examples))
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.name + ".partial")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _judged(rows, spec)))
        tmp.replace(cache_path)
        meta_path.write_text(json.dumps({"key": key, "teacher": str(teacher.resolve()), "rows": len(rows)}) + "\n")
    rows = _judged([json.loads(line) for line in cache_path.read_text().splitlines() if line.strip()], spec)
    valid = [r for r in rows if r["valid"]]
    kept = [r for r in valid if r["exact"]] if keep == "exact" else valid
    out = [
        Example(tuple([*r["messages"], {"role": "assistant", "content": r["teacher_output"]}]), "teacher") for r in kept
    ]
    exact = sum(r["exact"] for r in rows) / len(rows) if rows else None
    seconds = time.perf_counter() - t0
    invalid = len(rows) - len(valid)
    return TeacherOutputs(cache_path, out, len(rows), invalid, cached, seconds, exact, keep, len(valid) - len(kept))


def _judged(rows: list[dict[str, Any]], task: TaskSpec) -> list[dict[str, Any]]:
    """`rows` (teacher answers) with their validity, exact match and score under `task`."""
    for r in rows:
        s = task.score([r["teacher_output"]], [r["reference"]])
        r.update(valid=bool(s["valid"]), exact=bool(s["exact"]), score=s["score"])
    return rows


def prune_layers(teacher: Path, keep_layers: int, out: Path, *, context_length: int | None = None) -> Path:
    """An HF copy of `teacher` with `keep_layers` evenly spaced decoder layers (first and last kept)
    and, when given, a shorter context window (the int4 build's rotary tables shrink with it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(teacher))
    n = int(config.num_hidden_layers)
    if not 1 <= keep_layers <= n:
        raise ValueError(f"keep_layers must be in 1..{n}, not {keep_layers}")
    keep = (
        sorted({round(i * (n - 1) / max(keep_layers - 1, 1)) for i in range(keep_layers)}) if keep_layers > 1 else [0]
    )
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32)
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if context_length is not None:
        model.config.max_position_embeddings = context_length
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(teacher)).save_pretrained(str(tmp))
    (tmp / "slmops_pruned.json").write_text(json.dumps({"teacher": str(teacher), "layers": keep}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _teacher_ids(t_tok: Any, s_tok: Any, student: Path) -> tuple[bool, list[int] | None]:
    """(whether the student's tokens are the teacher's, the teacher's id of each student token): the
    same vocabulary gives (True, None), a trimmed copy of the teacher's (True, its kept ids)."""
    kept = read_kept_ids(student)
    if kept is None:
        return t_tok.get_vocab() == s_tok.get_vocab(), None
    if len(s_tok) != len(kept) or max(kept) >= len(t_tok):
        return False, None
    return t_tok.convert_ids_to_tokens(kept) == s_tok.convert_ids_to_tokens(list(range(len(kept)))), kept


def distill(
    teacher: Path,
    data: Sequence[Example],
    out: Path,
    config: DistillConfig | None = None,
    *,
    student: Path | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> DistillResult:
    """Stage 2: train the student on `data` (the teacher's answers) with KD (`DistillTrainer`); writes
    `out/student`. Under torchrun or accelerate launch, every process trains on its share of each
    global batch and the main one writes the outputs; with `config.resume`, the run goes on from its
    last checkpoint (under any process count)."""
    import torch

    from slmops_builder.train.distill_trainer import HISTORY_EXTRA, DistillTrainer, TeacherTargets
    from slmops_builder.train.hf_models import load_causal_lm

    cfg = config or DistillConfig()
    teacher, out = Path(teacher), Path(out)
    if not data:
        raise ValueError("no training examples (did the teacher produce only invalid answers?)")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    per_process_batch(cfg.batch_size, world_size())
    checkpoints = out / CHECKPOINTS_DIR
    run_key = {"config": cfg.model_dump(mode="json", include=_RUN_SHAPE), "data_sha256": dataset_sha256(data)}
    last = _last_checkpoint(checkpoints, run_key) if cfg.resume else None
    taken = last is None and out.exists() and any(out.iterdir())
    wait_for_everyone(device)  # every process looks before the main one writes, so all refuse alike
    if taken:
        raise FileExistsError(f"{out} is not empty")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    main = is_main_process()
    init_dir: Path | None = None
    t_tok = load_tokenizer(teacher)
    if student is None:
        init_dir = out / INIT_DIR
        if main and last is None:
            _student_init(teacher, t_tok, data, cfg, init_dir)
        wait_for_everyone(device)
        student = init_dir
    if main and last is None:
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / RUN_FILE).write_text(json.dumps(run_key, indent=2) + "\n")
    s_tok = load_tokenizer(student)
    pad_id = int(s_tok.pad_token_id)
    shared, teacher_ids = _teacher_ids(t_tok, s_tok, student)
    args = training_arguments(
        checkpoints, cfg, device=device, precision=precision, gradient_checkpointing=cfg.gradient_checkpointing
    )
    targets = None
    if shared and cfg.kd_weight > 0:
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if device == "cuda" else None
        teacher_model = load_causal_lm(teacher).to(args.device, dtype=half or torch.float32).eval()
        targets = TeacherTargets(teacher_model, teacher_ids, cfg.temperature, cfg.teacher_cache_mb * 2**20, pad_id)
    model = load_causal_lm(student)
    model.config.use_cache = False
    qat = QuantAwareWeights(model) if cfg.qat_steps else None
    encoded = [encode_example(s_tok, ex, cfg.max_length) for ex in data]
    examples = [{"index": i, "input_ids": ids, "labels": labels} for i, (ids, labels) in enumerate(encoded)]
    history = trainer_classes()[1](progress, HISTORY_EXTRA)
    trainer = DistillTrainer(
        model=model,
        args=args,
        train_dataset=stream_dataset(examples, cfg.max_steps, cfg.batch_size, cfg.seed),
        callbacks=[history],
        lr_factor=warmup_then_linear(0, cfg.max_steps),
        pad_id=pad_id,
        encoded=encoded,
        targets=targets,
        temperature=cfg.temperature,
        kd_weight=cfg.kd_weight,
        qat=qat,
        qat_from=cfg.max_steps - cfg.qat_steps + 1,
    )
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    mode = "kl+ce" if targets is not None else "sequence"
    result = DistillResult(out / STUDENT_DIR, init_dir, cfg.max_steps, mode, history.rows)
    result.resumed_from = _checkpoint_step(last) if last else 0
    if main:
        _save_student(model, s_tok, Path(student), teacher, data, cfg, qat, result.student_dir)
        write_loss_csv(history.rows, out / "loss.csv")
        plot_losses(history.rows, out / "loss.png", title=f"distillation ({'KL+CE' if targets is not None else 'CE'})")
    result.seconds = time.perf_counter() - t0
    if main:
        summary = {
            **result.to_json(),
            "teacher": str(teacher.resolve()),
            "config": cfg.model_dump(mode="json"),
            "data_sha256": dataset_sha256(data),
            "examples": len(data),
            "processes": world_size(),
            "resumed_from": result.resumed_from,
            "device": device,
            "precision": precision,
        }
        (out / "distill.json").write_text(json.dumps(summary, indent=2) + "\n")
    wait_for_everyone(device)
    return result


def _student_init(teacher: Path, t_tok: Any, data: Sequence[Example], cfg: DistillConfig, init_dir: Path) -> None:
    """The pruned (and with `vocab_top`, vocabulary-trimmed) copy of the teacher the student starts from."""
    if cfg.vocab_top is None:
        prune_layers(teacher, cfg.keep_layers, init_dir, context_length=cfg.context_length)
        return
    pruned = prune_layers(
        teacher, cfg.keep_layers, init_dir.with_name(INIT_DIR + "-all-tokens"), context_length=cfg.context_length
    )
    texts = [t for ex in data for t in (prompt_text(t_tok, ex.prompt_messages), ex.output)]
    trim_vocab(pruned, texts, init_dir, keep_top=cfg.vocab_top)
    shutil.copy2(pruned / "slmops_pruned.json", init_dir / "slmops_pruned.json")
    shutil.rmtree(pruned)


def _last_checkpoint(checkpoints: Path, run_key: dict[str, Any]) -> Path:
    """The checkpoint a resumed run goes on from: the last complete one (the Trainer writes its
    trainer_state.json last), refused when it is another run's."""
    found = checkpoints.glob("checkpoint-*/trainer_state.json")
    complete = [p.parent for p in found if p.parent.name.removeprefix("checkpoint-").isdigit()]
    if not complete:
        raise FileNotFoundError(f"nothing to resume: {checkpoints} holds no complete checkpoint")
    saved = json.loads((checkpoints / RUN_FILE).read_text()) if (checkpoints / RUN_FILE).is_file() else None
    if saved != run_key:
        raise ValueError(f"cannot resume: the checkpoints in {checkpoints} are another run's (settings or data differ)")
    return max(complete, key=_checkpoint_step)


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def _save_student(
    model: Any,
    s_tok: Any,
    student: Path,
    teacher: Path,
    data: Sequence[Example],
    cfg: DistillConfig,
    qat: QuantAwareWeights | None,
    student_dir: Path,
) -> None:
    """Write the trained student (on the int4 grid after QAT) with its tokenizer and training record."""
    from slmops_builder.importer import folder_sha256

    model.config.use_cache = True
    if qat is not None:
        qat.snap()  # the saved weights are the int4 ones it trained on
    tmp = student_dir.with_name(student_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    s_tok.save_pretrained(str(tmp))
    if (student / VOCAB_FILE).is_file():  # the student's tokens are still those of its trimmed start
        shutil.copy2(student / VOCAB_FILE, tmp / VOCAB_FILE)
    training = {
        "kind": "distill",
        "teacher": str(teacher.resolve()),
        "teacher_sha256": folder_sha256(teacher),
        "base_model": str(student.resolve()),
        "dataset_sha256": [dataset_sha256(data)],
    }
    if qat is not None:
        training["quantization_aware"] = qat.describe(cfg.qat_steps, cfg.max_steps)
    write_training_record(tmp, training)
    shutil.rmtree(student_dir, ignore_errors=True)  # a rerun into the same folder replaces its student
    tmp.rename(student_dir)


def weights_bytes(model_or_dir: Any) -> int:
    """Bytes of a torch model's parameters, or of the weight files (.onnx*, .safetensors) in a folder."""
    if isinstance(model_or_dir, str | Path):
        folder = Path(model_or_dir)
        files = [
            p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".data") or p.name.endswith(".onnx")
        ]
        return sum(p.stat().st_size for p in files)
    seen: set[int] = set()
    total = 0
    for p in model_or_dir.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def evaluate_models(
    models: dict[str, Path],
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 1,
    threads: int | None = None,
    task: TaskSpec | None = None,
) -> dict[str, dict[str, Any]]:
    """The task's score (`TaskSpec.score`: exact match and field accuracy among its figures), decode
    time per response and weights memory of HF folders on `examples`."""
    import torch

    from slmops_builder.train.generation import generate_hf
    from slmops_builder.train.hf_models import load_causal_lm

    if threads:
        torch.set_num_threads(threads)
    out: dict[str, dict[str, Any]] = {}
    prompts = [ex.prompt_messages for ex in examples]
    for name, path in models.items():
        tok = load_tokenizer(path)
        model = load_causal_lm(path)
        gen = generate_hf(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        out[name] = {
            **(task or TaskSpec()).score(gen.texts, [ex.output for ex in examples]),
            "decode_s_per_response": round(gen.seconds_per_response, 4),
            "weights_mb": round(weights_bytes(model) / 1e6, 2),
        }
        del model
    return out
