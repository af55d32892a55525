"""LoRA fine-tuning in several processes (torchrun and accelerate launch, DDP over gloo on the CPU):
the same curve and adapter as one process with the same global batch, and a resume under another
process count; and two hosts (network namespaces the test makes, one process each) that train as one.

Tolerance: the loss is the global token mean (Trainer gathers the token count of every process's
share of a step), so two processes compute the single process's gradient up to float32 summation
order (observed ~1e-7 relative); 1e-4 relative on 6 steps leaves room for that order to compound
through Adam while any real difference (a wrong share of the data, a mis-scaled loss, a lost step:
several percent) fails.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from slmops_builder.train.examples import Example, write_jsonl
from slmops_builder.train.finetune import finetune
from slmops_builder.train.runs import FinetuneConfig, FinetuneResult, LoraSettings
from slmops_builder.train.tasks import TaskSplits, generate_splits
from slmops_testing.netns import HostNetwork, NetnsUnavailable

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
REL = 1e-4


def _config(max_steps: int) -> FinetuneConfig:
    return FinetuneConfig(
        lora=LORA, max_steps=max_steps, learning_rate=3e-2, batch_size=4, eval_every=2, save_every=3, threads=1
    )


def _cli(model: Path, data: Path, val: Path, out: Path, max_steps: int) -> list[str]:
    """`builder finetune` with _config(max_steps), in long options (torchrun takes --r for its own --r...)."""
    args = ["builder", "finetune", "--model", str(model), "--data", str(data), "--validation", str(val)]
    args += ["--out", str(out), "--lora-r", "4", "--alpha", "8", "--dropout", "0", "--max-steps", str(max_steps)]
    return [*args, "--lr", "3e-2", "--batch-size", "4", "--eval-every", "2", "--save-every", "3", "--threads", "1"]


def _launch(launcher: Sequence[str], cli: Sequence[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", *launcher, "-m", "slmops_cli", *cli, "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "loss.csv").open()))


def _same_curve(a: Sequence[dict[str, object]], b: Sequence[dict[str, object]]) -> None:
    assert [int(str(x["step"])) for x in a] == [int(str(y["step"])) for y in b]
    for x, y in zip(a, b, strict=True):
        assert float(str(x["train_loss"])) == pytest.approx(float(str(y["train_loss"])), rel=REL)
        assert (x["val_loss"] in (None, "")) == (y["val_loss"] in (None, ""))
        if x["val_loss"] not in (None, ""):
            assert float(str(x["val_loss"])) == pytest.approx(float(str(y["val_loss"])), rel=REL)


def _adapter_scores(base: Path, adapter: Path, examples: Sequence[Example]) -> tuple[list[str], float]:
    """(greedy answers, mean token loss on the examples' answers) of base + adapter."""
    import torch
    from peft import PeftModel

    from slmops_builder.train.batches import collate, encode_example
    from slmops_builder.train.generation import generate_hf
    from slmops_builder.train.hf_models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(base)
    model = PeftModel.from_pretrained(load_causal_lm(base), str(adapter)).eval()
    with torch.no_grad():
        loss = float(model(**collate([encode_example(tok, ex, 256) for ex in examples], tok.pad_token_id)).loss)
    answers = generate_hf(model, tok, [ex.prompt_messages for ex in examples], max_new_tokens=8).texts
    return answers, loss


@dataclass
class _Runs:
    """A one-process run in `one`, and the CLI for the same run into `two`."""

    splits: TaskSplits
    one: FinetuneResult
    two: Path
    cli: list[str]


def _one_process_run(model: Path, tmp_path: Path) -> _Runs:
    splits = generate_splits(32, 8, 0, seed=4)
    write_jsonl(splits.train, tmp_path / "train.jsonl")
    write_jsonl(splits.validation, tmp_path / "val.jsonl")
    one = finetune(model, splits.train, tmp_path / "one", _config(6), validation=splits.validation)
    two = tmp_path / "two"
    return _Runs(splits, one, two, _cli(model, tmp_path / "train.jsonl", tmp_path / "val.jsonl", two, 6))


def _two_processes_matched_one(model: Path, runs: _Runs) -> None:
    """Two processes ran (an RNG state each), one wrote the outputs: the one-process curve and adapter."""
    assert sorted(p.name for p in (runs.two / "checkpoints" / "checkpoint-6").glob("rng_state*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    summary = json.loads((runs.two / "finetune.json").read_text())
    assert summary["steps"] == 6 and summary["config"]["batch_size"] == 4
    _same_curve(runs.one.history, _rows(runs.two))
    assert summary["best_val_loss"] == pytest.approx(runs.one.best_val_loss, rel=REL)
    answers_one, loss_one = _adapter_scores(model, runs.one.adapter_dir, runs.splits.validation[:4])
    answers_two, loss_two = _adapter_scores(model, runs.two / "adapter", runs.splits.validation[:4])
    assert answers_two == answers_one
    assert loss_two == pytest.approx(loss_one, rel=REL)


def test_torchrun_two_processes_match_one(trainable_tiny: Path, tmp_path: Path) -> None:
    runs = _one_process_run(trainable_tiny, tmp_path)
    _launch(["torch.distributed.run", "--standalone", "--nproc_per_node", "2"], runs.cli)
    _two_processes_matched_one(trainable_tiny, runs)


def test_two_hosts_train_as_one(trainable_tiny: Path, tmp_path: Path) -> None:
    """`torchrun --nnodes 2`, one process on each of two hosts (namespaces joined by a bridge, each
    host seeing the other only at its own address; gloo over their `eth0`): the single process's
    curve and adapter. The output folder is one both hosts see, as a shared volume would be."""
    runs = _one_process_run(trainable_tiny, tmp_path)
    try:
        net = HostNetwork.create(2)
    except NetnsUnavailable as exc:
        pytest.skip(f"network namespaces are refused here: {exc}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    launcher += ["--master_addr", net.hosts[0].address, "--master_port", "29500"]
    nodes: list[subprocess.Popen[str]] = []
    try:
        for rank, host in enumerate(net.hosts):
            cmd = [*host.prefix, *launcher, "--node_rank", str(rank), "-m", "slmops_cli", *runs.cli, "--json"]
            with (tmp_path / f"node{rank}.log").open("w") as log:  # files: a full pipe would stall a node
                nodes.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env))
        for rank, node in enumerate(nodes):
            assert node.wait(timeout=300) == 0, (tmp_path / f"node{rank}.log").read_text()[-3000:]
    finally:
        for node in nodes:
            node.kill()
        net.remove()
    _two_processes_matched_one(trainable_tiny, runs)


def test_a_run_resumes_under_another_process_count(trainable_tiny: Path, tmp_path: Path) -> None:
    """Three steps under `accelerate launch` with two processes, then three more in one process; and
    three in one process, then three more under torchrun with two: both give the curve of the same
    stop and resume done in one process all along."""
    splits = generate_splits(32, 8, 0, seed=4)
    write_jsonl(splits.train, tmp_path / "train.jsonl")
    write_jsonl(splits.validation, tmp_path / "val.jsonl")
    one = tmp_path / "one"
    finetune(trainable_tiny, splits.train, one, _config(3), validation=splits.validation)
    straight = finetune(trainable_tiny, splits.train, one, _config(6), validation=splits.validation, resume=True)
    two = tmp_path / "two"
    cli = _cli(trainable_tiny, tmp_path / "train.jsonl", tmp_path / "val.jsonl", two, 3)
    launcher = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    _launch(launcher, cli)
    assert (two / "checkpoints" / "checkpoint-3" / "rng_state_1.pth").is_file()
    resumed = finetune(trainable_tiny, splits.train, two, _config(6), validation=splits.validation, resume=True)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    _same_curve(straight.history, resumed.history)
    assert resumed.best_val_loss == pytest.approx(straight.best_val_loss, rel=REL)

    grown = tmp_path / "grown"
    finetune(trainable_tiny, splits.train, grown, _config(3), validation=splits.validation)
    cli = _cli(trainable_tiny, tmp_path / "train.jsonl", tmp_path / "val.jsonl", grown, 6)
    _launch(["torch.distributed.run", "--standalone", "--nproc_per_node", "2"], [*cli, "--resume"])
    summary = json.loads((grown / "finetune.json").read_text())
    assert summary["resumed_from"] == 3 and summary["steps"] == 6
    assert (grown / "checkpoints" / "checkpoint-6" / "rng_state_1.pth").is_file()
    _same_curve(straight.history, _rows(grown))


def test_batch_not_divisible_by_the_processes_is_refused(
    trainable_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before anything is read or written (the check needs only WORLD_SIZE, as torchrun sets it)."""
    from typer.testing import CliRunner

    from slmops_builder.cli import app

    write_jsonl(generate_splits(8, 0, 0, seed=4).train, tmp_path / "train.jsonl")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["finetune", "--model", str(trainable_tiny), "--data", str(tmp_path / "train.jsonl")]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run"), "--batch-size", "3"])
    assert result.exit_code == 1
    assert "batch size 3 (the global batch) does not split across 2 processes: give a multiple of 2" in result.output
    assert not (tmp_path / "run").exists()
