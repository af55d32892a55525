"""What every fine-tuning engine shares: its settings, progress events, result, output layout and protocol.

An engine (`slmops_builder.train.finetune.TRAINING_ENGINES`: PEFT, Olive) trains a LoRA adapter into
`out/adapter/` of a run folder; `slmops_builder.train.run_output.finish_run` then writes the rest of it:

    adapter/            the best adapter (lowest validation loss; the last one without validation)
    merged/             base + adapter merged (only with `merge=True`), an HF folder for the profile build,
                        with slmops_training.json (base model, data hashes: the packages' lineage)
    checkpoints/checkpoint-N/  Trainer's checkpoints (the PEFT engine's, the last `keep_checkpoints`):
                        adapter, optimizer, scheduler, RNG states, trainer_state.json, finetune_config.json
    loss.csv, loss.png  the curves; finetune.json: the summary, config and data hashes
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from slmops_builder.train.examples import Example

__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINTS_DIR",
    "MERGED_DIR",
    "SUMMARY_FILE",
    "FinetuneConfig",
    "FinetuneEngine",
    "FinetuneResult",
    "LoraSettings",
    "ProgressEvent",
    "ProgressFn",
    "TrainingEngine",
]

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
CHECKPOINTS_DIR = "checkpoints"
SUMMARY_FILE = "finetune.json"

# The registered engines' names (`slmops_builder.train.finetune.TRAINING_ENGINES`).
FinetuneEngine = Literal["peft", "olive"]


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
        default="peft",
        description="peft: PEFT on transformers' Trainer; olive: `olive finetune` (float32, fewer options)",
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
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: CUDA when present, else CPU")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 on a CUDA GPU that has it, else fp32"
    )


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


ProgressFn = Callable[[ProgressEvent], None]


class TrainingEngine(Protocol):
    """A fine-tuning engine, registered under its `FinetuneConfig.engine` name."""

    name: str

    def check(self, config: FinetuneConfig) -> None:
        """Raise when this machine lacks what `config` needs (before any data is read)."""

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
        """Train `out_dir/adapter` and finish the run (`run_output.finish_run`)."""
