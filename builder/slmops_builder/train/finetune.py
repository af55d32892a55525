"""LoRA fine-tuning: `finetune` runs the engine registered under `FinetuneConfig.engine`.

- "peft"   PEFT on transformers' Trainer (the default; `peft_engine`): checkpoints, exact resume, early
           stopping, CUDA/bf16, QLoRA on CUDA, several processes (torchrun, accelerate launch)
- "olive"  `olive finetune` in float32 (`olive_engine`): the same output layout, fewer options

Both write the run folder described in `slmops_builder.train.runs`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from slmops_builder.train.examples import Example
from slmops_builder.train.olive_engine import OLIVE
from slmops_builder.train.peft_engine import PEFT
from slmops_builder.train.runs import FinetuneConfig, FinetuneResult, ProgressFn, TrainingEngine

__all__ = ["TRAINING_ENGINES", "finetune"]

# engine name (FinetuneConfig.engine) -> engine
TRAINING_ENGINES: Mapping[str, TrainingEngine] = MappingProxyType({e.name: e for e in (PEFT, OLIVE)})


def finetune(
    base_model: Path,
    train: Sequence[Example],
    out_dir: Path,
    config: FinetuneConfig | None = None,
    *,
    validation: Sequence[Example] = (),
    resume: bool = False,
    merge: bool = False,
    progress: ProgressFn | None = None,
) -> FinetuneResult:
    """Train a LoRA adapter on `train` (chat examples) over the HF model in `base_model`, with the
    engine `config.engine` names."""
    cfg = config or FinetuneConfig()
    return TRAINING_ENGINES[cfg.engine].train(
        base_model, train, out_dir, cfg, validation=validation, resume=resume, merge=merge, progress=progress
    )
