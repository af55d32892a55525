"""Distillation's stage 2 on transformers' `Trainer` (see `slmops_builder.train.distill`).

`DistillTrainer` is a Trainer whose `compute_loss` is the KD loss: KL divergence between the
temperature-softened teacher and student distributions at the answer positions (scaled by T^2; the
teacher's from `TeacherTargets`, computed once per example and kept in memory within a budget) mixed
with cross-entropy on the teacher's text, or that cross-entropy alone. Both are sums over the answer
tokens divided by the number of answer tokens of the whole global batch, times the process count
(DDP averages the gradients): the loss and its gradient are those of one process with the global
batch, whatever the number of processes. The last `qat_steps` steps run their forward and backward
passes on the int4 grid (`qat.QuantAwareWeights`, in `training_step`). The data order is that of
`batches.batch_indices` (a pure function of seed and step): a resumed run, under any process count,
sees the batches it would have seen. The optimizer and schedule are AdamW (no weight decay) with the
learning rate falling linearly to a tenth over the run, gradients clipped at norm 1.

The first section holds the generic Trainer plumbing (device and precision choice, TrainingArguments,
the global batch's split, the history callback), the rest the distillation's own parts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from transformers import Trainer, TrainerCallback

from slmops_builder.train.batches import IGNORE_INDEX, batch_indices, collate
from slmops_builder.train.runs import ProgressEvent

if TYPE_CHECKING:
    import torch
    from transformers import TrainingArguments

    from slmops_builder.train.qat import QuantAwareWeights

__all__ = [
    "Device",
    "DistillTrainer",
    "HistoryCallback",
    "KDCollator",
    "Precision",
    "SeededOrder",
    "TeacherTargets",
    "choose_device",
    "choose_precision",
    "history_rows",
    "is_main_process",
    "main_process_first",
    "per_process_batch",
    "training_arguments",
    "wait_for_everyone",
    "world_size",
]

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]

# ---------------------------------------------------------------------------------------------------
# Generic Trainer plumbing (the shared module for both training engines replaces this section)
# ---------------------------------------------------------------------------------------------------


def choose_device(device: Device) -> str:
    """ "cuda" or "cpu": auto takes CUDA when torch sees a GPU."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def choose_precision(precision: Precision, device: str) -> str:
    """ "fp32", "bf16" or "fp16" (mixed precision over float32 weights): auto takes bf16 on a GPU that
    supports it, fp16 on another GPU, fp32 on the CPU."""
    import torch

    bf16_ok = device == "cpu" or torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "fp32" if device == "cpu" else ("bf16" if bf16_ok else "fp16")
    if precision == "fp16" and device == "cpu":
        raise ValueError("--precision fp16 needs a CUDA device (on the CPU: fp32 or bf16)")
    if precision == "bf16" and not bf16_ok:
        raise ValueError("--precision bf16: this GPU does not support bfloat16 (use fp16)")
    return precision


def world_size() -> int:
    """The number of training processes (torchrun and accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_process_batch(global_batch: int, processes: int) -> int:
    """Each process's share of a global batch (refused when it does not split evenly)."""
    if global_batch % processes:
        raise ValueError(f"--batch-size {global_batch} (the global batch) does not split over {processes} processes")
    return global_batch // processes


def _state(device: str) -> Any:
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu")  # gloo on the CPU, NCCL on GPUs


def is_main_process(device: str) -> bool:
    """Whether this process writes the outputs (rank 0; the only one without torchrun)."""
    return bool(_state(device).is_main_process)


def main_process_first(device: str) -> AbstractContextManager[None]:
    """A block the main process runs first, the others after it (one process: just the block)."""
    return cast(AbstractContextManager[None], _state(device).main_process_first())


def wait_for_everyone(device: str) -> None:
    """A barrier across the training processes (nothing with one)."""
    _state(device).wait_for_everyone()


def training_arguments(
    out_dir: Path,
    *,
    device: str,
    precision: str,
    batch_size: int,
    max_steps: int,
    learning_rate: float,
    seed: int,
    save_every: int,
    keep_checkpoints: int,
    gradient_checkpointing: bool = False,
) -> TrainingArguments:
    """TrainingArguments for a run with checkpoints in `out_dir` (every `save_every` steps, 0: none),
    one log per step, `batch_size` the global batch, AdamW without weight decay, gradients clipped at 1."""
    from transformers import TrainingArguments

    processes = world_size()
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=per_process_batch(batch_size, processes),
        max_steps=max_steps,
        learning_rate=learning_rate,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=seed,
        logging_steps=1,
        save_strategy="steps" if save_every else "no",
        save_steps=save_every or 1,
        save_total_limit=keep_checkpoints,
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=gradient_checkpointing,
        ddp_backend="gloo" if device == "cpu" and processes > 1 else None,
        ddp_find_unused_parameters=False if processes > 1 else None,
        average_tokens_across_devices=False,
        remove_unused_columns=False,
        dataloader_pin_memory=device == "cuda",
        report_to="none",
        disable_tqdm=True,
        log_level="warning",
        log_level_replica="error",
    )


class HistoryCallback(TrainerCallback):
    """A ProgressEvent for each logged training step, on the main process only."""

    def __init__(self, progress: Callable[[ProgressEvent], None] | None) -> None:
        self.progress = progress

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        if self.progress is not None and state.is_world_process_zero and logs and "loss" in logs:
            seconds = float(logs.get("seconds", 0.0))
            self.progress(
                ProgressEvent(state.global_step, state.max_steps, logs["loss"], logs.get("eval_loss"), seconds)
            )


# ---------------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------------


class TeacherTargets:
    """The teacher's log-probabilities (at temperature T, over the student's tokens) at the answer
    positions of each example: computed for the examples of a batch, kept when they fit the budget."""

    def __init__(
        self, model: Any, teacher_ids: list[int] | None, temperature: float, budget_bytes: int, pad_id: int
    ) -> None:
        import torch

        self.model = model
        device = next(model.parameters()).device
        head = model.get_output_embeddings()
        rows = head.weight.shape[0]
        self.index = torch.tensor(teacher_ids if teacher_ids is not None else range(rows), dtype=torch.long)
        self.index = self.index.to(device)
        self.weight = head.weight.detach()[self.index]
        bias = getattr(head, "bias", None)
        self.bias = bias.detach()[self.index] if bias is not None else None
        self.temperature = temperature
        self.budget = budget_bytes
        self.pad_id = pad_id
        self.used = 0
        self.cache: dict[int, Any] = {}

    def __call__(self, indices: Sequence[int], encoded: Sequence[tuple[list[int], list[int]]]) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        device = self.index.device
        missing = [i for i in dict.fromkeys(indices) if i not in self.cache]
        fresh: dict[int, Any] = {}
        if missing:
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in missing], self.pad_id).items()}
            with torch.no_grad():
                hidden = self.model.base_model(
                    input_ids=self.index[batch["input_ids"]], attention_mask=batch["attention_mask"]
                ).last_hidden_state
                mask = batch["labels"][:, 1:] != IGNORE_INDEX  # positions that predict an answer token
                for row, i in enumerate(missing):
                    logits = F.linear(hidden[row, :-1][mask[row]], self.weight, self.bias).float()
                    fresh[i] = F.log_softmax(logits / self.temperature, -1)
            for i, value in fresh.items():
                size = value.numel() * value.element_size()
                if self.used + size <= self.budget:
                    self.cache[i] = value
                    self.used += size
        return torch.cat([self.cache[i] if i in self.cache else fresh[i] for i in indices])


class SeededOrder:
    """The example indices of the whole run in the order of `batch_indices` (a torch Sampler: the
    Trainer cuts it into per-process batches, batch k to process k mod N)."""

    def __init__(self, n: int, batch_size: int, steps: int, seed: int) -> None:
        self.n, self.batch_size, self.steps, self.seed = n, batch_size, steps, seed

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __iter__(self) -> Iterator[int]:
        for step in range(self.steps):
            yield from batch_indices(self.n, self.batch_size, step, self.seed)


class KDCollator:
    """Encoded examples ({"index", "input_ids", "labels"}) as a padded batch with their indices."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = collate([(f["input_ids"], f["labels"]) for f in features], self.pad_id)
        return {**batch, "index": torch.tensor([f["index"] for f in features], dtype=torch.long)}


class DistillTrainer(Trainer):
    """A Trainer with the KD loss, the seeded data order, the run's schedule and the QAT steps."""

    def __init__(
        self,
        *args: Any,
        encoded: Sequence[tuple[list[int], list[int]]],
        targets: TeacherTargets | None,
        temperature: float,
        kd_weight: float,
        qat: QuantAwareWeights | None,
        qat_from: int,
        **kwargs: Any,
    ) -> None:
        import torch

        super().__init__(*args, **kwargs)
        self.encoded = encoded
        self.targets = targets
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.qat = qat
        self.qat_from = qat_from
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.args.device)  # ce, kl, tokens since the last log
        self._started: float | None = None

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        args = self.args
        return SeededOrder(len(self.encoded), args.train_batch_size * args.world_size, args.max_steps, args.seed)

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        import torch

        if self.lr_scheduler is None:
            steps = self.args.max_steps
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or cast("torch.optim.Optimizer", self.optimizer), lambda s: max(0.1, 1.0 - s / steps)
            )
        return self.lr_scheduler

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self._started is None:  # the run's clock goes on from the checkpoint it resumed
            before = [e["seconds"] for e in self.state.log_history if "seconds" in e]
            self._started = time.perf_counter() - (before[-1] if before else 0.0)
        on_grid = self.qat is not None and self.state.global_step + 1 >= self.qat_from
        with self.qat.quantized() if on_grid and self.qat is not None else nullcontext():
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        import torch
        import torch.nn.functional as F

        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        mask = labels[:, 1:] != IGNORE_INDEX  # positions that predict an answer token
        s_logits = outputs.logits[:, :-1][mask].float()
        ce = F.cross_entropy(s_logits, labels[:, 1:][mask], reduction="sum")
        kl = torch.zeros((), device=ce.device)
        if self.targets is not None:
            t = self.temperature
            t_logp = self.targets(inputs["index"].tolist(), self.encoded)
            kl = F.kl_div(F.log_softmax(s_logits / t, -1), t_logp, log_target=True, reduction="sum") * t * t
        tokens = mask.sum().to(torch.float64)
        local = torch.stack([ce.detach().double(), kl.detach().double(), tokens])
        self._sums += local
        total = self._sum_across(tokens.clone())
        mixed = ce if self.targets is None else self.kd_weight * kl + (1 - self.kd_weight) * ce
        loss = mixed / total.float() * self.args.world_size
        return (loss, outputs) if return_outputs else loss

    def _sum_across(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the training processes."""
        return self.accelerator.reduce(tensor, reduction="sum") if self.args.world_size > 1 else tensor

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training step's log: the run's own figures join it
            sums = self._sum_across(self._sums.clone())
            self._sums.zero_()
            ce, kl, tokens = sums.tolist()
            logs["ce"] = ce / tokens
            logs["kl"] = kl / tokens if self.targets is not None else None  # type: ignore[assignment]
            logs["lr"] = float(cast(Any, self.lr_scheduler).get_last_lr()[0])
            logs["quantized"] = self.qat is not None and self.state.global_step >= self.qat_from
            logs["seconds"] = round(time.perf_counter() - (self._started or time.perf_counter()), 3)
        super().log(logs, start_time)


def history_rows(log_history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's history (one row per step) from the Trainer's log history."""
    return [
        {
            "step": e["step"],
            "train_loss": e["loss"],
            "val_loss": None,
            "ce": e["ce"],
            "kl": e["kl"],
            "lr": e["lr"],
            "quantized": e["quantized"],
            "seconds": e["seconds"],
        }
        for e in log_history
        if "ce" in e
    ]
