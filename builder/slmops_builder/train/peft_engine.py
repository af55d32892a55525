"""The PEFT fine-tuning engine (`FinetuneConfig.engine == "peft"`): LoRA/QLoRA on transformers' Trainer.

A Trainer configuration (`trainer_setup`): AdamW, the warm-up then linear schedule, gradient
accumulation and clipping, mixed precision and the device, one process or several (torchrun /
accelerate launch: DDP, the global batch split across them). What is ours is a callback:
`BestAdapter` keeps the adapter of the lowest validation loss in out/adapter and stops after
`patience` evaluations without improvement. Checkpoints are Trainer's (`checkpoints/checkpoint-N/`;
its trainer_state.json is written last: a checkpoint without it is incomplete), resumed with
Trainer's `resume_from_checkpoint`; the data order is a pure function of (seed, position), so a
resumed run sees the same batches as an uninterrupted one, under any process count.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from slmops_builder.train.batches import encode_example
from slmops_builder.train.examples import Example
from slmops_builder.train.hf_models import check_qlora, load_causal_lm, load_tokenizer
from slmops_builder.train.run_output import finish_run
from slmops_builder.train.runs import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    FinetuneConfig,
    FinetuneResult,
    LoraSettings,
    ProgressFn,
)
from slmops_builder.train.trainer_setup import (
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

__all__ = ["PEFT", "PeftEngine", "latest_checkpoint", "train_peft"]

STATE_FILE = "trainer_state.json"  # Trainer writes it last into a checkpoint


class PeftEngine:
    name = "peft"

    def check(self, config: FinetuneConfig) -> None:
        device = resolve_device(config.device)
        resolve_precision(config.precision, device)
        per_process_batch(config.batch_size, world_size())
        if config.qlora:
            check_qlora()
            if device != "cuda":
                raise ValueError("--qlora trains on a CUDA GPU: drop --device cpu")

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
    """The last complete checkpoint of the run in `out_dir` (None: none)."""
    ckpts = sorted((Path(out_dir) / CHECKPOINTS_DIR).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [c for c in ckpts if (c / STATE_FILE).is_file()]
    return complete[-1] if complete else None


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
    from peft import LoraConfig, get_peft_model

    base_model, out_dir = Path(base_model), Path(out_dir)
    if not (base_model / "config.json").is_file():
        raise FileNotFoundError(f"{base_model} is not a model folder (no config.json)")
    if not train:
        raise ValueError("no training examples")
    PEFT.check(cfg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    start_ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and start_ckpt is None:
        raise FileNotFoundError(f"nothing to resume: no checkpoint under {out_dir / CHECKPOINTS_DIR}")
    if start_ckpt is not None:
        trained = _lora_of(start_ckpt)
        if trained != cfg.lora.model_copy(update={"target_modules": tuple(sorted(cfg.lora.target_modules))}):
            raise ValueError(f"cannot resume {start_ckpt}: it was trained with LoRA {trained}")
    taken = not resume and _has_content(out_dir)
    wait_for_everyone(device)  # every process looks before the main one writes, so all refuse alike
    if taken:
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
    encoded = [encode_example(tok, ex, cfg.max_length) for ex in train]
    val_encoded = [encode_example(tok, ex, cfg.max_length) for ex in list(validation)[: cfg.eval_examples]]

    stream_trainer, history_callback = trainer_classes()
    history = history_callback(progress)
    best = _best_adapter()(cfg, out_dir / ADAPTER_DIR)
    args = training_arguments(
        out_dir / CHECKPOINTS_DIR,
        cfg,
        device=device,
        precision=precision,
        grad_accum=cfg.grad_accum,
        eval_every=cfg.eval_every if val_encoded else None,
    )
    trainer = stream_trainer(
        model=model,
        args=args,
        train_dataset=stream_dataset(encoded, cfg.max_steps * cfg.grad_accum, cfg.batch_size, cfg.seed),
        eval_dataset=val_encoded or None,
        callbacks=[history, best],
        lr_factor=warmup_then_linear(cfg.warmup_steps, cfg.max_steps),
        pad_id=int(tok.pad_token_id),
    )
    trainer.train(resume_from_checkpoint=str(start_ckpt) if start_ckpt is not None else None)
    main = trainer.is_world_process_zero()
    if not val_encoded and main:
        _save_adapter(model, out_dir / ADAPTER_DIR)
    trainer.accelerator.wait_for_everyone()
    outcome: dict[str, Any] = {
        "steps": trainer.state.global_step,
        "resumed_from": int(start_ckpt.name.split("-")[1]) if start_ckpt is not None else 0,
        "stopped_early": best.stopped_early,
        "best_val_loss": best.best_val,
        "seconds": history.seconds(),
    }
    if not main:  # the main process writes the run's outputs
        return FinetuneResult(out_dir, out_dir / ADAPTER_DIR, None, history=history.rows, **outcome)
    return finish_run(base_model, out_dir, cfg, train, validation, history.rows, merge=merge, **outcome)


@lru_cache(maxsize=1)
def _best_adapter() -> Any:
    from transformers import TrainerCallback

    class BestAdapter(TrainerCallback):
        """Keeps the adapter of the lowest validation loss and stops after `patience` evaluations
        without improvement (saving a checkpoint there). Its state is rebuilt from Trainer's log
        (kept in the checkpoints) on resume."""

        def __init__(self, cfg: FinetuneConfig, adapter_dir: Path) -> None:
            self.cfg, self.adapter_dir = cfg, adapter_dir
            self.best_val: float | None = None
            self.bad_evals = 0
            self.stopped_early = False

        def _judge(self, val: float) -> bool:
            """Count one evaluation; True when it is the best so far."""
            if self.best_val is None or val < self.best_val - 1e-6:
                self.best_val, self.bad_evals = val, 0
                return True
            self.bad_evals += 1
            return False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            for entry in state.log_history:
                if "eval_loss" in entry:
                    self._judge(float(entry["eval_loss"]))

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self._judge(float(kwargs["metrics"]["eval_loss"])) and state.is_world_process_zero:
                _save_adapter(kwargs["model"], self.adapter_dir)
            if self.cfg.patience and self.bad_evals >= self.cfg.patience:
                self.stopped_early = True
                control.should_training_stop = control.should_save = True

    return BestAdapter


def _has_content(out_dir: Path) -> bool:
    """Whether `out_dir` holds anything but an empty checkpoints folder (which another process of
    this run may have made already)."""
    if not out_dir.is_dir():
        return False
    return any(p.name != CHECKPOINTS_DIR or any(p.iterdir()) for p in out_dir.iterdir())


def _lora_of(checkpoint: Path) -> LoraSettings:
    """The LoRA settings a checkpoint's adapter was trained with (its adapter_config.json)."""
    peft = json.loads((checkpoint / "adapter_config.json").read_text())
    return LoraSettings(
        r=peft["r"],
        alpha=peft["lora_alpha"],
        dropout=peft["lora_dropout"],
        target_modules=tuple(sorted(peft["target_modules"])),
    )


def _save_adapter(model: Any, adapter_dir: Path) -> None:
    tmp = adapter_dir.with_name(adapter_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)
