"""LoRA fine-tuning with PEFT (CPU), with checkpoints, resume, early stopping and loss curves.

`FinetuneConfig.engine` picks the trainer: "peft" (this module's loop, the default) or "olive"
(`olive finetune` in float32, see slmops_builder.train.olive; same output layout, fewer options).

A small explicit training loop rather than the HF Trainer, so that what is saved is exactly what
is needed to resume bit-for-bit: the adapter, the optimizer and scheduler, the RNG states and the
loss history. The data order is a pure function of (seed, step), so a resumed run sees the same
batches as an uninterrupted one.

Output folder:
    adapter/            the best adapter (lowest validation loss; the last one without validation)
    merged/             base + adapter merged (only with `merge=True`), an HF folder for the profile build,
                        with slmops_training.json (base model, data hashes: the packages' lineage)
    checkpoints/step-N/ adapter + trainer_state.pt (the last `keep_checkpoints`)
    loss.csv, loss.png  the curves; finetune.json: the summary, config and data hashes
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from slmops_builder.importer import TRAINING_FILE
from slmops_builder.train.tasks import Example, dataset_sha256

if TYPE_CHECKING:
    import torch

__all__ = [
    "FinetuneConfig",
    "FinetuneEngine",
    "FinetuneResult",
    "LoraSettings",
    "ProgressEvent",
    "QLoRAUnavailable",
    "encode_example",
    "finetune",
    "latest_checkpoint",
    "load_causal_lm",
    "plot_losses",
]

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
SUMMARY_FILE = "finetune.json"
IGNORE_INDEX = -100


FinetuneEngine = Literal["peft", "olive"]


class QLoRAUnavailable(RuntimeError):
    """QLoRA was asked for but CUDA or bitsandbytes is missing."""


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(default=8, ge=1, le=256)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


class FinetuneConfig(BaseModel):
    """Everything that shapes a run (part of its summary and lineage)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: FinetuneEngine = Field(
        default="peft", description="peft: this module's loop; olive: `olive finetune` (float32, fewer options)"
    )
    lora: LoraSettings = LoraSettings()
    max_steps: int = Field(default=50, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_length: int = Field(default=256, ge=8)
    warmup_steps: int = Field(default=0, ge=0)
    gradient_checkpointing: bool = False
    eval_every: int = Field(default=10, ge=1)
    eval_examples: int = Field(default=64, ge=1)
    patience: int = Field(
        default=3, ge=0, description="evaluations without improvement before stopping; 0: never stop early"
    )
    save_every: int = Field(default=10, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    seed: int = 0
    threads: int | None = Field(default=None, ge=1)
    qlora: bool = False
    chat_template: str | None = None


@dataclass(frozen=True)
class ProgressEvent:
    step: int
    max_steps: int
    train_loss: float
    val_loss: float | None
    seconds: float


@dataclass
class FinetuneResult:
    out_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    steps: int
    resumed_from: int
    stopped_early: bool
    best_val_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    adapter_bytes: int = 0

    @property
    def loss_csv(self) -> Path:
        return self.out_dir / "loss.csv"

    @property
    def loss_png(self) -> Path:
        return self.out_dir / "loss.png"

    def to_json(self) -> dict[str, Any]:
        train = [h["train_loss"] for h in self.history if h.get("train_loss") is not None]
        return {
            "out_dir": str(self.out_dir),
            "adapter_dir": str(self.adapter_dir),
            "merged_dir": str(self.merged_dir) if self.merged_dir else None,
            "steps": self.steps,
            "resumed_from": self.resumed_from,
            "stopped_early": self.stopped_early,
            "best_val_loss": self.best_val_loss,
            "first_train_loss": train[0] if train else None,
            "last_train_loss": train[-1] if train else None,
            "adapter_bytes": self.adapter_bytes,
            "seconds": round(self.seconds, 2),
            "loss_csv": str(self.loss_csv),
            "loss_png": str(self.loss_png),
        }


def check_qlora() -> None:
    """Raise QLoRAUnavailable naming what is missing."""
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
        raise QLoRAUnavailable("QLoRA needs " + " and ".join(missing) + "; use plain LoRA (drop --qlora)")


def load_causal_lm(path: Path, *, qlora: bool = False) -> Any:
    """An HF causal LM in float32 (CPU), or 4-bit NF4 on CUDA for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    if not qlora:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    check_qlora()
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=quant, device_map={"": 0})
    return prepare_model_for_kbit_training(model)


def load_tokenizer(path: Path, chat_template: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if chat_template:
        tok.chat_template = chat_template
    if not tok.chat_template:
        raise ValueError(f"the tokenizer in {path} has no chat template; give one (--chat-template FILE)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def prompt_text(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))


def encode_example(tokenizer: Any, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): the chat-template prompt (labels masked) then the answer and eos.
    Prompt and answer are tokenized apart, as at inference (prompt tokens, then generated ones)."""
    prompt_ids = tokenizer(prompt_text(tokenizer, example.prompt_messages), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return ids, labels


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> list[int]:
    """The example indices of micro-batch `micro_step`: epochs of seeded permutations, so the order
    depends only on (seed, step) and a resumed run sees the same batches."""
    out = []
    for k in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        perm = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(perm)
        out.append(perm[pos])
    return out


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted((Path(out_dir) / CHECKPOINTS_DIR).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [c for c in ckpts if (c / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def _eval_loss(model: Any, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> float:
    import torch

    model.eval()
    total = 0.0
    tokens = 0
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            batch = collate(encoded[i : i + batch_size], pad_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            out = model(**batch)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(out.loss) * n
            tokens += n
    model.train()
    return total / max(tokens, 1)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def finetune(
    base_model: Path,
    train: Sequence[Example],
    out_dir: Path,
    config: FinetuneConfig | None = None,
    *,
    validation: Sequence[Example] = (),
    resume: bool = False,
    merge: bool = False,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> FinetuneResult:
    """Train a LoRA adapter on `train` (chat examples) over the HF model in `base_model`.
    With `config.engine == "olive"`, `olive finetune` trains it (slmops_builder.train.olive)."""
    cfg = config or FinetuneConfig()
    if cfg.engine == "olive":
        from slmops_builder.train.olive import finetune_olive

        return finetune_olive(
            base_model, train, out_dir, cfg, validation=validation, resume=resume, merge=merge, progress=progress
        )
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    base_model, out_dir = Path(base_model), Path(out_dir)
    if not (base_model / "config.json").is_file():
        raise FileNotFoundError(f"{base_model} is not a model folder (no config.json)")
    if not train:
        raise ValueError("no training examples")
    if cfg.qlora:
        check_qlora()
    start_ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and start_ckpt is None:
        raise FileNotFoundError(f"nothing to resume: no checkpoint under {out_dir / CHECKPOINTS_DIR}")
    if not resume and out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; pass resume to continue it or choose a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    tok = load_tokenizer(base_model, cfg.chat_template)
    model = load_causal_lm(base_model, qlora=cfg.qlora)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    encoded = [encode_example(tok, ex, cfg.max_length) for ex in train]
    val_encoded = [encode_example(tok, ex, cfg.max_length) for ex in list(validation)[: cfg.eval_examples]]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)

    def lr_lambda(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        remaining = max(cfg.max_steps - cfg.warmup_steps, 1)
        return max(0.1, 1.0 - (step - cfg.warmup_steps) / remaining)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    history: list[dict[str, Any]] = []
    step = 0
    best_val: float | None = None
    bad_evals = 0
    elapsed = 0.0
    if start_ckpt is not None:
        state = torch.load(start_ckpt / STATE_FILE, weights_only=False)
        if state["config"]["lora"] != cfg.lora.model_dump(mode="json"):
            raise ValueError(f"cannot resume {start_ckpt}: it was trained with LoRA {state['config']['lora']}")
        set_peft_model_state_dict(model, load_file(str(start_ckpt / "adapter_model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        step, best_val, bad_evals = state["step"], state["best_val"], state["bad_evals"]
        history, elapsed = state["history"], state["seconds"]
    resumed_from = step
    pad_id = int(tok.pad_token_id)
    stopped_early = False
    adapter_dir = out_dir / ADAPTER_DIR
    t0 = time.perf_counter() - elapsed

    def save_checkpoint() -> None:
        ckpt = out_dir / CHECKPOINTS_DIR / f"step-{step:06d}"
        tmp = ckpt.with_name(ckpt.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        torch.save(
            {
                "step": step,
                "best_val": best_val,
                "bad_evals": bad_evals,
                "history": history,
                "seconds": time.perf_counter() - t0,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "config": cfg.model_dump(mode="json"),
            },
            tmp / STATE_FILE,
        )
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
        for old in sorted(ckpt.parent.glob("step-*"))[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    while step < cfg.max_steps:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for j in range(cfg.grad_accum):
            idx = batch_indices(len(encoded), cfg.batch_size, step * cfg.grad_accum + j, cfg.seed)
            batch = {k: v.to(model.device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
            loss = model(**batch).loss / cfg.grad_accum
            loss.backward()
            total += loss.detach().item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        row: dict[str, Any] = {
            "step": step,
            "train_loss": total,
            "val_loss": None,
            "lr": scheduler.get_last_lr()[0],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if val_encoded and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            val = _eval_loss(model, val_encoded, pad_id, cfg.batch_size)
            row["val_loss"] = val
            if best_val is None or val < best_val - 1e-6:
                best_val, bad_evals = val, 0
                _save_adapter(model, tok, adapter_dir)
            else:
                bad_evals += 1
        history.append(row)
        if progress:
            progress(ProgressEvent(step, cfg.max_steps, total, row["val_loss"], row["seconds"]))
        if cfg.patience and bad_evals >= cfg.patience:
            stopped_early = True
        if step % cfg.save_every == 0 or step == cfg.max_steps or stopped_early:
            save_checkpoint()
        if stopped_early:
            break
    if not val_encoded:
        _save_adapter(model, tok, adapter_dir)
    return finish_run(
        base_model,
        out_dir,
        cfg,
        train,
        validation,
        history,
        merge=merge,
        steps=step,
        resumed_from=resumed_from,
        stopped_early=stopped_early,
        best_val_loss=best_val,
        seconds=time.perf_counter() - t0,
    )


def finish_run(
    base_model: Path,
    out_dir: Path,
    cfg: FinetuneConfig,
    train: Sequence[Example],
    validation: Sequence[Example],
    history: list[dict[str, Any]],
    *,
    merge: bool,
    steps: int,
    seconds: float,
    resumed_from: int = 0,
    stopped_early: bool = False,
    best_val_loss: float | None = None,
    extra: dict[str, Any] | None = None,
) -> FinetuneResult:
    """The end of a run, whichever engine trained out/adapter: the merged model (with its training
    record) when asked for, the loss curves when there is a history, the result and finetune.json."""
    adapter_dir = out_dir / ADAPTER_DIR
    merged_dir = None
    if merge:
        training = {
            "kind": "finetune",
            "base_model": str(base_model.resolve()),
            "dataset_sha256": [dataset_sha256(d) for d in (train, validation) if d],
        }
        merged_dir = merge_adapter(
            base_model, adapter_dir, out_dir / MERGED_DIR, chat_template=cfg.chat_template, training=training
        )
    if history:
        write_loss_csv(history, out_dir / "loss.csv")
        title = f"LoRA r={cfg.lora.r} on {base_model.name}" + (f" ({cfg.engine})" if cfg.engine != "peft" else "")
        plot_losses(history, out_dir / "loss.png", title=title)
    result = FinetuneResult(
        out_dir=out_dir,
        adapter_dir=adapter_dir,
        merged_dir=merged_dir,
        steps=steps,
        resumed_from=resumed_from,
        stopped_early=stopped_early,
        best_val_loss=best_val_loss,
        history=history,
        seconds=seconds,
        adapter_bytes=_dir_bytes(adapter_dir),
    )
    summary = {
        **result.to_json(),
        "engine": cfg.engine,
        "base_model": str(base_model.resolve()),
        "config": cfg.model_dump(mode="json"),
        "train_sha256": dataset_sha256(train),
        "validation_sha256": dataset_sha256(validation) if validation else None,
        "train_examples": len(train),
        **(extra or {}),
    }
    if not history:
        summary["loss_csv"] = summary["loss_png"] = None
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return result


def _save_adapter(model: Any, tokenizer: Any, adapter_dir: Path) -> None:
    tmp = adapter_dir.with_name(adapter_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)


def merge_adapter(
    base_model: Path,
    adapter_dir: Path,
    out: Path,
    *,
    chat_template: str | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write base + adapter merged into one HF folder (with the tokenizer) at `out`; `training`, the
    run's lineage record, goes into it as `TRAINING_FILE` (see slmops_builder.importer)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(base_model), str(adapter_dir)).merge_and_unload()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    load_tokenizer(base_model, chat_template).save_pretrained(str(tmp))
    if training is not None:
        write_training_record(tmp, training)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def write_training_record(folder: Path, record: dict[str, Any]) -> None:
    """Write a trained HF folder's lineage record (`TRAINING_FILE`, read back at import)."""
    (Path(folder) / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")


def write_loss_csv(history: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train_loss", "val_loss", "lr", "seconds"])
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in writer.fieldnames})


def plot_losses(history: Sequence[dict[str, Any]], path: Path, *, title: str = "loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train_loss"] for h in history], label="train", linewidth=1)
    val = [
        (h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None and math.isfinite(h["val_loss"])
    ]
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
