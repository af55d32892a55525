"""`finetune --engine olive`: `olive finetune` (float32) trains a PEFT adapter into our layout.

Olive loads its training data with the `datasets` package (a builder dependency); where it is
missing the engine says so (tested by hiding it).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmops_builder.cli import app
from slmops_builder.train.examples import Example, write_jsonl
from slmops_builder.train.finetune import finetune
from slmops_builder.train.olive_engine import OliveEngineError, OliveUnsupported, olive_command, olive_refusals
from slmops_builder.train.runs import FinetuneConfig, LoraSettings
from slmops_builder.train.tasks import generate_splits

LORA = LoraSettings(r=4, alpha=8, dropout=0.05, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))


def _fake_model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def _cli_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "-m", str(model), "-d", str(data), "-o", str(out), "--engine", "olive", *extra]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--resume"], "--resume"),
        (["--patience", "2"], "--patience"),
        (["--eval-every", "5"], "--eval-every"),
        (["--save-every", "5"], "--save-every"),
        (["--qlora"], "--qlora"),
        (["--dropout", "0.1"], "--dropout 0.1"),
        (["--validation", "VAL"], "--validation"),
    ],
)
def test_cli_olive_refuses_what_it_cannot_honour(tmp_path: Path, extra: list[str], named: str) -> None:
    data = tmp_path / "train.jsonl"
    write_jsonl(generate_splits(4, 0, 0).train, data)
    extra = [str(data) if e == "VAL" else e for e in extra]
    out = tmp_path / "run"
    result = CliRunner().invoke(app, _cli_args(_fake_model(tmp_path), data, out, *extra))
    assert result.exit_code == 1, result.output
    assert "the olive engine cannot honour" in result.output and named in result.output
    assert "use --engine peft" in result.output
    assert not out.exists()


def test_olive_refusals_count_only_what_was_asked_for() -> None:
    assert olive_refusals(FinetuneConfig(engine="olive", lora=LORA, max_steps=3, threads=1)) == []
    assert olive_refusals(FinetuneConfig(engine="olive", lora=LORA, patience=0)) == []  # "never stop early"
    refused = olive_refusals(FinetuneConfig(engine="olive", lora=LORA, patience=2, save_every=5), resume=True)
    assert len(refused) == 3
    with pytest.raises(OliveUnsupported, match="--resume"):
        finetune(Path("nowhere"), [], Path("nowhere"), FinetuneConfig(engine="olive", lora=LORA), resume=True)


def test_olive_command_is_lora_in_float32(tmp_path: Path) -> None:
    cfg = FinetuneConfig(engine="olive", lora=LORA, max_steps=7, learning_rate=1e-3, batch_size=2, grad_accum=3)
    cmd = olive_command(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "o", tmp_path / "t", cfg)
    assert cmd[1:4] == ["-m", "olive", "finetune"]
    assert cmd[cmd.index("--method") + 1] == "lora" and cmd[cmd.index("--torch_dtype") + 1] == "float32"
    assert cmd[cmd.index("--target_modules") + 1] == "q_proj,k_proj,v_proj,o_proj"
    for flag, value in [("--max_steps", "7"), ("--learning_rate", "0.001"), ("--gradient_accumulation_steps", "3")]:
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[cmd.index("--per_device_train_batch_size") + 1] == "2"


def test_olive_without_datasets_names_what_is_missing(
    trainable_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    data = tmp_path / "train.jsonl"
    write_jsonl(generate_splits(4, 0, 0).train, data)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, _cli_args(trainable_tiny, data, out))
    assert result.exit_code == 1, result.output
    assert "the olive engine needs the datasets package" in result.output
    assert not out.exists()


def test_olive_failure_shows_its_output_and_leaves_no_adapter(
    trainable_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `olive finetune` failure: LoRA targets the model lacks."""
    monkeypatch.setattr("slmops_builder.train.olive_engine.check_olive", lambda: None)
    train = [Example.from_pair(e.input, e.output) for e in generate_splits(16, 0, 0, seed=3).train]
    bad = LoraSettings(r=4, alpha=8, target_modules=("no_such_proj",))
    cfg = FinetuneConfig(engine="olive", lora=bad, max_steps=2, max_length=64, threads=1)
    out = tmp_path / "run"
    with pytest.raises(OliveEngineError, match="olive finetune failed") as info:
        finetune(trainable_tiny, train, out, cfg)
    message = str(info.value)
    assert "exit code" in message and "no_such_proj" in message, message
    assert sorted(p.name for p in out.iterdir()) == ["olive.log"]  # no adapter/, no adapter.partial/


def test_cli_olive_trains_an_adapter_peft_loads(trainable_tiny: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train = generate_splits(16, 0, 0, seed=3).train
    write_jsonl(train, tmp_path / "train.jsonl")
    out = tmp_path / "run"
    args = _cli_args(trainable_tiny, tmp_path / "train.jsonl", out, "--r", "4", "--alpha", "8", "--threads", "1")
    args += ["--target-modules", "q_proj,k_proj,v_proj,o_proj", "--max-steps", "6", "--lr", "3e-2"]
    args += ["--batch-size", "2", "--max-length", "64", "--merge", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["engine"] == "olive"
    record = json.loads((out / "finetune.json").read_text())
    assert record["engine"] == "olive" and record["config"]["engine"] == "olive"
    assert "--torch_dtype" in record["olive_command"] and "float32" in record["olive_command"]
    assert len(record["train_sha256"]) == 64 and record["train_examples"] == len(train)
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == 4
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "slmops_training.json").is_file()
    assert not list(out.glob("*.partial"))

    ids = torch.tensor([list(range(3, 40))])
    base = AutoModelForCausalLM.from_pretrained(str(trainable_tiny), dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        after = tuned(ids).logits
    assert (after - before).abs().max().item() > 1e-3  # the adapter learned something (B is zero at init)
