"""LoRA fine-tuning on a tiny model: loss falls, curves, checkpoints, exact resume, early stopping."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmops_builder.cli import app
from slmops_builder.train.examples import write_jsonl
from slmops_builder.train.finetune import finetune
from slmops_builder.train.peft_engine import latest_checkpoint
from slmops_builder.train.runs import FinetuneConfig, LoraSettings, ProgressEvent
from slmops_builder.train.tasks import generate_splits

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def test_cli_finetune_loss_falls_and_writes_curves(trainable_tiny: Path, tmp_path: Path) -> None:
    splits = generate_splits(32, 8, 8, seed=4)
    write_jsonl(splits.train, tmp_path / "train.jsonl")
    write_jsonl(splits.validation, tmp_path / "val.jsonl")
    out = tmp_path / "run"
    args = ["finetune", "-m", str(trainable_tiny), "-d", str(tmp_path / "train.jsonl"), "-o", str(out)]
    args += ["--validation", str(tmp_path / "val.jsonl"), "--r", "4", "--alpha", "8", "--dropout", "0"]
    args += ["--max-steps", "12", "--lr", "3e-2", "--eval-every", "4", "--save-every", "4", "--threads", "1"]
    args += ["--gradient-checkpointing", "--grad-accum", "2", "--batch-size", "2", "--merge", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 12 and not summary["stopped_early"]
    assert summary["last_train_loss"] < summary["first_train_loss"] - 0.3
    rows = list(csv.DictReader((out / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    vals = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(vals) == 3 and vals[-1] < vals[0]
    assert summary["best_val_loss"] == pytest.approx(min(vals))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-8"]
    record = json.loads((out / "finetune.json").read_text())
    assert record["config"]["lora"]["r"] == 4 and len(record["train_sha256"]) == 64
    training = json.loads((out / "merged" / "slmops_training.json").read_text())
    assert training == {
        "kind": "finetune",
        "base_model": str(trainable_tiny.resolve()),
        "dataset_sha256": [record["train_sha256"], record["validation_sha256"]],
    }


class _Crash(Exception):
    pass


def test_resume_continues_exactly_where_it_stopped(trainable_tiny: Path, tmp_path: Path) -> None:
    splits = generate_splits(24, 8, 0, seed=5)
    cfg = FinetuneConfig(
        lora=LORA, max_steps=6, learning_rate=2e-2, batch_size=3, eval_every=2, save_every=3, threads=1
    )
    straight = finetune(trainable_tiny, splits.train, tmp_path / "a", cfg, validation=splits.validation)

    def crash_at_5(event: ProgressEvent) -> None:
        if event.step == 5:
            raise _Crash  # after step 5's update, before its checkpoint: the last checkpoint is step 3

    with pytest.raises(_Crash):
        finetune(trainable_tiny, splits.train, tmp_path / "b", cfg, validation=splits.validation, progress=crash_at_5)
    assert latest_checkpoint(tmp_path / "b") == tmp_path / "b" / "checkpoints" / "checkpoint-3"
    with pytest.raises(FileExistsError, match="not empty"):
        finetune(trainable_tiny, splits.train, tmp_path / "b", cfg)
    resumed = finetune(trainable_tiny, splits.train, tmp_path / "b", cfg, validation=splits.validation, resume=True)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    for x, y in zip(straight.history, resumed.history, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert (x["val_loss"] is None) == (y["val_loss"] is None)
    assert resumed.best_val_loss == pytest.approx(straight.best_val_loss, rel=1e-5)
    other = cfg.model_copy(update={"lora": LoraSettings(r=2, alpha=4, dropout=0.0)})
    with pytest.raises(ValueError, match="cannot resume"):
        finetune(trainable_tiny, splits.train, tmp_path / "b", other, resume=True)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        finetune(trainable_tiny, splits.train, tmp_path / "c", cfg, resume=True)


def test_early_stopping_on_validation_loss(trainable_tiny: Path, tmp_path: Path) -> None:
    splits = generate_splits(8, 4, 0, seed=6)
    cfg = FinetuneConfig(lora=LORA, max_steps=50, learning_rate=1e-12, eval_every=1, patience=2, threads=1)
    result = finetune(trainable_tiny, splits.train, tmp_path / "run", cfg, validation=splits.validation)
    assert result.stopped_early and result.steps == 3  # best at step 1, no gain at steps 2 and 3
    assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "checkpoint-3"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_qlora_without_cuda_and_bitsandbytes_names_what_is_missing(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    write_jsonl(generate_splits(2, 0, 0).train, data)
    args = ["finetune", "-m", str(tmp_path), "-d", str(data), "-o", str(tmp_path / "run"), "--qlora"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "QLoRA needs" in result.output and "bitsandbytes" in result.output


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--device", "cuda"], "device cuda needs a CUDA GPU"),
        (["--precision", "fp16"], "precision fp16 needs a CUDA GPU"),
        (["--precision", "fp8"], "--precision must be auto, fp32, bf16, fp16, not 'fp8'"),
    ],
)
def test_device_and_precision_this_machine_lacks_are_refused(
    trainable_tiny: Path, tmp_path: Path, option: list[str], message: str
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: nothing to refuse")
    data = tmp_path / "d.jsonl"
    write_jsonl(generate_splits(2, 0, 0).train, data)
    args = ["finetune", "-m", str(trainable_tiny), "-d", str(data), "-o", str(tmp_path / "run"), *option]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output and not (tmp_path / "run").exists()


def test_device_and_precision_choice() -> None:
    import torch

    from slmops_builder.train.trainer_setup import resolve_device, resolve_precision

    assert resolve_device("cpu") == "cpu" and resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # CPU autocast has bf16
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bf16_autocast_trains_on_the_cpu(trainable_tiny: Path, tmp_path: Path) -> None:
    """--precision bf16 runs the forward in bf16 (autocast): the first loss moves off fp32's a little."""
    splits = generate_splits(16, 0, 0, seed=4)
    cfg = FinetuneConfig(lora=LORA, max_steps=2, learning_rate=3e-2, batch_size=4, threads=1)
    fp32 = finetune(trainable_tiny, splits.train, tmp_path / "fp32", cfg)
    bf16 = finetune(trainable_tiny, splits.train, tmp_path / "bf16", cfg.model_copy(update={"precision": "bf16"}))
    first32, first16 = fp32.history[0]["train_loss"], bf16.history[0]["train_loss"]
    assert first16 != first32 and first16 == pytest.approx(first32, rel=1e-2)
    assert json.loads((tmp_path / "bf16" / "finetune.json").read_text())["config"]["precision"] == "bf16"
