"""The end of a fine-tuning run, whichever engine trained out/adapter (layout: `slmops_builder.train.runs`):
the merged model with its training record, the loss curves, the result and finetune.json.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slmops_builder.importer import TRAINING_FILE
from slmops_builder.train.examples import Example, dataset_sha256
from slmops_builder.train.hf_models import load_causal_lm, load_tokenizer
from slmops_builder.train.runs import ADAPTER_DIR, MERGED_DIR, SUMMARY_FILE, FinetuneConfig, FinetuneResult

__all__ = ["finish_run", "merge_adapter", "plot_losses", "write_loss_csv", "write_training_record"]


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


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
