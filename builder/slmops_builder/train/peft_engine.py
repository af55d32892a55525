"""The PEFT fine-tuning engine (`FinetuneConfig.engine == "peft"`): LoRA/QLoRA in an explicit loop.

A small explicit training loop rather than the HF Trainer, so that what is saved is exactly what
is needed to resume bit-for-bit: the adapter, the optimizer and scheduler, the RNG states and the
loss history. The data order is a pure function of (seed, step) (`batches.batch_indices`), so a
resumed run sees the same batches as an uninterrupted one. Checkpoints: `checkpoints/step-N/`.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slmops_builder.train.batches import IGNORE_INDEX, batch_indices, collate, encode_example
from slmops_builder.train.examples import Example
from slmops_builder.train.hf_models import check_qlora, load_causal_lm, load_tokenizer
from slmops_builder.train.run_output import finish_run
from slmops_builder.train.runs import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    FinetuneConfig,
    FinetuneResult,
    ProgressEvent,
    ProgressFn,
)

__all__ = ["PEFT", "PeftEngine", "latest_checkpoint", "train_peft"]

STATE_FILE = "trainer_state.pt"


class PeftEngine:
    name = "peft"

    def check(self, config: FinetuneConfig) -> None:
        if config.qlora:
            check_qlora()

    def train(
        self,
        base_model: Path,
        train: Sequence[Example],
        out_dir: Path,
        config: FinetuneConfig,
        *,
        validation: Sequence[Example],
        resume: bool,
        merge: bool,
        progress: ProgressFn | None,
    ) -> FinetuneResult:
        return train_peft(
            base_model, train, out_dir, config, validation=validation, resume=resume, merge=merge, progress=progress
        )


PEFT = PeftEngine()


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


def train_peft(
    base_model: Path,
    train: Sequence[Example],
    out_dir: Path,
    cfg: FinetuneConfig,
    *,
    validation: Sequence[Example] = (),
    resume: bool = False,
    merge: bool = False,
    progress: ProgressFn | None = None,
) -> FinetuneResult:
    """Train a LoRA adapter on `train` (chat examples) over the HF model in `base_model` (module doc)."""
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


def _save_adapter(model: Any, tokenizer: Any, adapter_dir: Path) -> None:
    tmp = adapter_dir.with_name(adapter_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)
