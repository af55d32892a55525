"""What the training engines built on transformers' `Trainer` share: device and precision, the
processes of a distributed run, the data stream, the schedule and the history/progress callback.

- Device: CUDA when present, else the CPU (`resolve_device`); precision: bf16 on a CUDA GPU that has
  it, else fp32 (`resolve_precision`); what a device cannot do is refused in one sentence.
- Processes: one, or several under `torchrun` / `accelerate launch` (they set WORLD_SIZE and RANK;
  DDP over gloo on the CPU, NCCL on GPUs). `batch_size` is always the GLOBAL batch: each process takes
  `batch_size // world_size` examples of every micro-batch, so a run's batches are the same whatever
  the process count, and a checkpoint resumes under another one. Only the main process writes outputs
  (`is_main_process`); `main_process_first` and `wait_for_everyone` order the processes around them.
- Data: `StreamDataset` lays the run's micro-batches end to end in `batches.epoch_order` order (a
  pure function of seed and position), read in sequence (`StreamTrainer`, which engines subclass for
  their loss and collator); Trainer's resume skips the batches already trained, and accelerate deals
  each process its consecutive share.
- Schedule: `warmup_then_linear` (warm-up, none for distillation, then linear decay to 10% at
  `max_steps`) as a LambdaLR.
- `HistoryCallback`: the rows {step, train_loss, val_loss, lr, seconds} of loss.csv (plus the figures
  an engine adds to its log), from Trainer's log (kept in its checkpoints, so a resumed run has its
  whole history), and ProgressEvents.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, get_args

from slmops_builder.train.batches import collate, epoch_order
from slmops_builder.train.runs import ProgressEvent, ProgressFn

if TYPE_CHECKING:
    from transformers import TrainingArguments

__all__ = [
    "DEVICES",
    "PRECISIONS",
    "Device",
    "Precision",
    "RunSettings",
    "is_main_process",
    "main_process_first",
    "per_process_batch",
    "resolve_device",
    "resolve_precision",
    "stream_dataset",
    "trainer_classes",
    "training_arguments",
    "wait_for_everyone",
    "warmup_then_linear",
    "world_size",
]

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
DEVICES: tuple[str, ...] = get_args(Device)
PRECISIONS: tuple[str, ...] = get_args(Precision)


def world_size() -> int:
    """The processes of this run (WORLD_SIZE, set by torchrun and accelerate launch; 1 without)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process writes the run's outputs (rank 0, or the only process)."""
    return os.environ.get("RANK", "0") == "0"


def per_process_batch(global_batch: int, processes: int) -> int:
    """Each process's share of a global micro-batch of `global_batch` examples."""
    if global_batch % processes:
        raise ValueError(
            f"batch size {global_batch} (the global batch) does not split across {processes} processes: "
            f"give a multiple of {processes}"
        )
    return global_batch // processes


def _state(device: str) -> Any:
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu")  # gloo on the CPU, NCCL on GPUs


def main_process_first(device: str) -> AbstractContextManager[None]:
    """A block the main process runs first, the others after it (one process: just the block)."""
    return cast(AbstractContextManager[None], _state(device).main_process_first())


def wait_for_everyone(device: str) -> None:
    """A barrier across the training processes (nothing with one)."""
    _state(device).wait_for_everyone()


def resolve_device(device: str) -> str:
    """Resolve `device` to "cuda" or "cpu": ("auto": CUDA when present), refused when CUDA is asked for and absent."""
    import torch

    if device not in DEVICES:
        raise ValueError(f"device must be {', '.join(DEVICES)}, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda needs a CUDA GPU and torch sees none: use cpu or auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_precision(precision: str, device: str) -> str:
    """Resolve `precision` on `device` (resolved) to "fp32", "bf16" or "fp16" (mixed precision over
    float32 weights): "auto" is bf16 on a CUDA GPU with bf16, else fp32 (fp16 autocast on a CPU, and
    bf16 on a GPU without it, are refused)."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be {', '.join(PRECISIONS)}, not {precision!r}")
    bf16_gpu = device == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if bf16_gpu else "fp32"
    if precision == "fp16" and device != "cuda":
        raise ValueError("precision fp16 needs a CUDA GPU: on the CPU use bf16 or fp32")
    if precision == "bf16" and device == "cuda" and not bf16_gpu:
        raise ValueError("precision bf16: this GPU has no bfloat16: use fp16 or fp32")
    return precision


def warmup_then_linear(warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """The LR factor at step s: (s+1)/warmup during the warm-up, then linear down to 0.1 at max_steps."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(max_steps - warmup_steps, 1)
        return max(0.1, 1.0 - (step - warmup_steps) / remaining)

    return factor


def stream_dataset(examples: Sequence[Any], micro_batches: int, batch_size: int, seed: int) -> Any:
    """The run's `micro_batches` global micro-batches of `batch_size` of `examples`, end to end
    (module doc)."""
    from torch.utils.data import Dataset

    n = len(examples)

    class StreamDataset(Dataset):
        def __len__(self) -> int:
            return micro_batches * batch_size

        def __getitem__(self, k: int) -> Any:
            epoch, pos = divmod(k, n)
            return examples[epoch_order(n, epoch, seed)[pos]]

    return StreamDataset()


class RunSettings(Protocol):
    """What `training_arguments` reads of an engine's settings (`FinetuneConfig`, `DistillConfig`)."""

    @property
    def max_steps(self) -> int: ...
    @property
    def learning_rate(self) -> float: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def save_every(self) -> int: ...
    @property
    def keep_checkpoints(self) -> int: ...


def training_arguments(
    out_dir: Path,
    run: RunSettings,
    *,
    device: str,
    precision: str,
    grad_accum: int = 1,
    eval_every: int | None = None,
    gradient_checkpointing: bool = False,
) -> TrainingArguments:
    """Trainer's arguments for `run`, whose checkpoints go to `out_dir` every `run.save_every` steps
    (0: none); `run.batch_size` the global batch, `device` and `precision` resolved, `eval_every` None:
    no validation. AdamW without weight decay, gradients clipped at 1.0, a log row every step."""
    from transformers import TrainingArguments

    processes = world_size()
    per_device = per_process_batch(run.batch_size, processes)
    return TrainingArguments(
        output_dir=str(out_dir),
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=gradient_checkpointing,
        max_steps=run.max_steps,
        learning_rate=run.learning_rate,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=grad_accum,
        seed=run.seed,
        data_seed=run.seed,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        save_strategy="steps" if run.save_every else "no",
        save_steps=run.save_every or 1,
        save_total_limit=run.keep_checkpoints,
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        log_level="warning",
        log_level_replica="error",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if device == "cpu" and processes > 1 else None,
    )


def _add_row(rows: list[dict[str, Any]], entry: dict[str, Any], extra: Sequence[str]) -> None:
    """Add Trainer's log entry to the history: a training row per step (with the `extra` figures an
    engine logs), its validation loss (logged after it) added to it."""
    step = int(entry["step"])
    if "loss" in entry:
        row = {"step": step, "train_loss": float(entry["loss"]), "val_loss": None, **{k: entry[k] for k in extra}}
        rows.append({**row, "lr": float(entry["learning_rate"]), "seconds": entry.get("seconds", 0.0)})
    elif "eval_loss" in entry and rows and rows[-1]["step"] == step:
        rows[-1]["val_loss"] = float(entry["eval_loss"])


def trainer_classes() -> tuple[Any, Any]:
    """(StreamTrainer, HistoryCallback): defined on first use, so that importing this module loads
    no transformers."""
    return _classes()


@lru_cache(maxsize=1)
def _classes() -> tuple[Any, Any]:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import PrinterCallback, Trainer, TrainerCallback

    class StreamTrainer(Trainer):
        """Trainer reading a `stream_dataset` in order, with a LambdaLR of `lr_factor` (such as
        `warmup_then_linear`), the batches padded with `pad_id` by `collator`."""

        def __init__(self, *args: Any, lr_factor: Callable[[int], float], pad_id: int, **kwargs: Any) -> None:
            kwargs["data_collator"] = self.collator(pad_id)
            super().__init__(*args, **kwargs)
            self.remove_callback(PrinterCallback)  # stdout is the CLI's (--json); HistoryCallback reports
            self._lr_factor = lr_factor

        def collator(self, pad_id: int) -> Callable[[list[Any]], dict[str, Any]]:
            """The stream's examples ((ids, labels) pairs) as a padded batch (`batches.collate`)."""
            return lambda batch: collate(batch, pad_id)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)  # type: ignore[arg-type]

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                target = optimizer if optimizer is not None else self.optimizer
                assert target is not None  # Trainer creates the optimizer first
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(target, self._lr_factor)
            return self.lr_scheduler

    class HistoryCallback(TrainerCallback):
        """Stamps each log row with the run's seconds so far (resumed runs go on counting), keeps the
        history (`rows`, with the `extra` figures of the engine's log) and reports ProgressEvents on
        the main process."""

        def __init__(self, progress: ProgressFn | None, extra: Sequence[str] = ()) -> None:
            self.progress = progress
            self.extra = tuple(extra)
            self.rows: list[dict[str, Any]] = []
            self._t0 = time.perf_counter()

        def seconds(self) -> float:
            return time.perf_counter() - self._t0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.rows = []
            for entry in state.log_history:
                _add_row(self.rows, entry, self.extra)
            done = self.rows[-1]["seconds"] if self.rows else 0.0
            self._t0 = time.perf_counter() - float(done)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if not state.log_history:
                return
            state.log_history[-1]["seconds"] = round(self.seconds(), 3)
            _add_row(self.rows, state.log_history[-1], self.extra)
            reported = logs is not None and ("loss" in logs or "eval_loss" in logs)
            if reported and self.rows and self.progress is not None and state.is_world_process_zero:
                row = self.rows[-1]
                self.progress(
                    ProgressEvent(row["step"], state.max_steps, row["train_loss"], row["val_loss"], row["seconds"])
                )

    return StreamTrainer, HistoryCallback
