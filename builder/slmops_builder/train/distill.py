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
when they fit in `teacher_cache_mb`.
`evaluate_models` scores teacher, student and the undistilled student on held-out examples with the
task's scorer.
The student folder holds slmops_training.json (teacher, its weights' hash, data hash): the lineage
its packages carry.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmops_builder.train.batches import IGNORE_INDEX, batch_indices, collate, encode_example
from slmops_builder.train.examples import Example, dataset_sha256
from slmops_builder.train.hf_models import load_tokenizer, prompt_text
from slmops_builder.train.qat import QuantAwareWeights
from slmops_builder.train.run_output import plot_losses, write_loss_csv, write_training_record
from slmops_builder.train.runs import ProgressEvent
from slmops_builder.train.scoring import TaskSpec
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

    def to_json(self) -> dict[str, Any]:
        return {
            "student_dir": str(self.student_dir),
            "init_dir": str(self.init_dir) if self.init_dir else None,
            "steps": self.steps,
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


class _TeacherTargets:
    """The teacher's log-probabilities (at temperature T, over the student's tokens) at the answer
    positions of each example: computed for the examples of a batch, kept when they fit the budget."""

    def __init__(self, model: Any, teacher_ids: list[int] | None, temperature: float, budget_bytes: int) -> None:
        import torch

        self.model = model
        head = model.get_output_embeddings()
        rows = head.weight.shape[0]
        self.index = torch.tensor(teacher_ids if teacher_ids is not None else range(rows), dtype=torch.long)
        self.weight = head.weight.detach()[self.index]
        bias = getattr(head, "bias", None)
        self.bias = bias.detach()[self.index] if bias is not None else None
        self.temperature = temperature
        self.budget = budget_bytes
        self.used = 0
        self.cache: dict[int, Any] = {}

    def __call__(self, indices: Sequence[int], encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Any:
        import torch
        import torch.nn.functional as F

        missing = [i for i in dict.fromkeys(indices) if i not in self.cache]
        fresh: dict[int, Any] = {}
        if missing:
            batch = collate([encoded[i] for i in missing], pad_id)
            with torch.no_grad():
                hidden = self.model.base_model(
                    input_ids=self.index[batch["input_ids"]], attention_mask=batch["attention_mask"]
                ).last_hidden_state
                mask = batch["labels"][:, 1:] != IGNORE_INDEX  # positions that predict an answer token
                for row, i in enumerate(missing):
                    logits = F.linear(hidden[row, :-1][mask[row]], self.weight, self.bias)
                    fresh[i] = F.log_softmax(logits / self.temperature, -1)
            for i, value in fresh.items():
                size = value.numel() * value.element_size()
                if self.used + size <= self.budget:
                    self.cache[i] = value
                    self.used += size
        return torch.cat([self.cache[i] if i in self.cache else fresh[i] for i in indices])


def distill(
    teacher: Path,
    data: Sequence[Example],
    out: Path,
    config: DistillConfig | None = None,
    *,
    student: Path | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> DistillResult:
    """Stage 2: train the student on `data` (the teacher's answers) with KD; writes `out/student`."""
    import torch
    import torch.nn.functional as F

    from slmops_builder.train.hf_models import load_causal_lm

    cfg = config or DistillConfig()
    teacher, out = Path(teacher), Path(out)
    if not data:
        raise ValueError("no training examples (did the teacher produce only invalid answers?)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    init_dir: Path | None = None
    t_tok = load_tokenizer(teacher)
    if student is None:
        if cfg.vocab_top is None:
            init_dir = prune_layers(teacher, cfg.keep_layers, out / INIT_DIR, context_length=cfg.context_length)
        else:
            pruned = prune_layers(
                teacher, cfg.keep_layers, out / (INIT_DIR + "-all-tokens"), context_length=cfg.context_length
            )
            texts = [t for ex in data for t in (prompt_text(t_tok, ex.prompt_messages), ex.output)]
            init_dir = trim_vocab(pruned, texts, out / INIT_DIR, keep_top=cfg.vocab_top).path
            shutil.copy2(pruned / "slmops_pruned.json", init_dir / "slmops_pruned.json")
            shutil.rmtree(pruned)
        student = init_dir
    s_tok = load_tokenizer(student)
    shared, teacher_ids = _teacher_ids(t_tok, s_tok, student)
    targets = None
    if shared and cfg.kd_weight > 0:
        targets = _TeacherTargets(
            load_causal_lm(teacher).eval(), teacher_ids, cfg.temperature, cfg.teacher_cache_mb * 2**20
        )
    model = load_causal_lm(student)
    model.config.use_cache = False
    model.train()
    qat = QuantAwareWeights(model) if cfg.qat_steps else None
    qat_from = cfg.max_steps - cfg.qat_steps + 1
    encoded = [encode_example(s_tok, ex, cfg.max_length) for ex in data]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.1, 1.0 - s / cfg.max_steps))
    pad_id = int(s_tok.pad_token_id)
    temp = cfg.temperature
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for step in range(1, cfg.max_steps + 1):
        idx = batch_indices(len(encoded), cfg.batch_size, step - 1, cfg.seed)
        batch = collate([encoded[i] for i in idx], pad_id)
        on_grid = qat.quantized() if qat is not None and step >= qat_from else None
        with on_grid or nullcontext():
            outputs = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            )
            ce = outputs.loss
            loss = ce
            kl_value = None
            if targets is not None:
                t_logp = targets(idx, encoded, pad_id)
                mask = batch["labels"][:, 1:] != IGNORE_INDEX  # positions that predict an answer token
                s_sel = outputs.logits[:, :-1][mask] / temp
                kl = F.kl_div(F.log_softmax(s_sel, -1), t_logp, log_target=True, reduction="batchmean")
                kl = kl * temp * temp
                kl_value = kl.detach().item()
                loss = cfg.kd_weight * kl + (1 - cfg.kd_weight) * ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        row = {
            "step": step,
            "train_loss": loss.detach().item(),
            "val_loss": None,
            "ce": ce.detach().item(),
            "kl": kl_value,
            "lr": scheduler.get_last_lr()[0],
            "quantized": on_grid is not None,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        history.append(row)
        if progress:
            progress(ProgressEvent(step, cfg.max_steps, row["train_loss"], None, row["seconds"]))
    from slmops_builder.importer import folder_sha256

    student_dir = out / STUDENT_DIR
    model.config.use_cache = True
    if qat is not None:
        qat.snap()  # the saved weights are the int4 ones it trained on
    tmp = student_dir.with_name(student_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    s_tok.save_pretrained(str(tmp))
    if (Path(student) / VOCAB_FILE).is_file():  # the student's tokens are still those of its trimmed start
        shutil.copy2(Path(student) / VOCAB_FILE, tmp / VOCAB_FILE)
    training = {
        "kind": "distill",
        "teacher": str(teacher.resolve()),
        "teacher_sha256": folder_sha256(teacher),
        "base_model": str(Path(student).resolve()),
        "dataset_sha256": [dataset_sha256(data)],
    }
    if qat is not None:
        training["quantization_aware"] = qat.describe(cfg.qat_steps, cfg.max_steps)
    write_training_record(tmp, training)
    shutil.rmtree(student_dir, ignore_errors=True)  # a rerun into the same folder replaces its student
    tmp.rename(student_dir)
    write_loss_csv(history, out / "loss.csv")
    mode = "kl+ce" if targets is not None else "sequence"
    plot_losses(history, out / "loss.png", title=f"distillation ({'KL+CE' if targets is not None else 'CE'})")
    result = DistillResult(student_dir, init_dir, cfg.max_steps, mode, history)
    result.seconds = time.perf_counter() - t0
    summary = {
        **result.to_json(),
        "teacher": str(teacher.resolve()),
        "config": cfg.model_dump(mode="json"),
        "data_sha256": dataset_sha256(data),
        "examples": len(data),
    }
    (out / "distill.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result


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
