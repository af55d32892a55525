"""Distillation on transformers' Trainer across processes: `slmops builder distill` under
`torchrun --nproc_per_node 2` (DDP, gloo on the CPU) follows the one-process run's loss curve and
saves a student that scores like its one; a run killed after a checkpoint resumes in one process and
ends where the uninterrupted run ends; the settings a run refuses before it writes anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmops_builder.cli import app
from slmops_builder.train.distill import DistillConfig, TeacherOutputs, distill, evaluate_models, teacher_outputs
from slmops_builder.train.examples import write_jsonl
from slmops_builder.train.tasks import generate_splits

MAX_NEW_TOKENS = 4
# The loss of each step, two processes against one with the same global batch: the same examples,
# the same token-weighted mean; only the order of float sums differs (measured: ~1e-7).
LOSS_TOLERANCE = 1e-4


def _taught(teacher: Path, folder: Path, n: int, seed: int) -> tuple[Path, TeacherOutputs]:
    """Inputs in folder/inputs.jsonl and a stage-1 cache in folder/out/teacher.jsonl whose answers are
    the references (the tiny teacher writes no valid JSON): the CLI's stage 1 reads it."""
    examples = generate_splits(n, 0, 0, seed=seed).train
    write_jsonl(examples, folder / "inputs.jsonl")
    cache = folder / "out" / "teacher.jsonl"
    teacher_outputs(teacher, examples, cache, max_new_tokens=MAX_NEW_TOKENS)
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    for row in rows:
        row["teacher_output"] = row["reference"]
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage1 = teacher_outputs(teacher, examples, cache, max_new_tokens=MAX_NEW_TOKENS)
    assert stage1.cached and len(stage1.examples) == n
    return folder / "inputs.jsonl", stage1


def _cli_args(teacher: Path, inputs: Path, out: Path, steps: int, save_every: int) -> list[str]:
    return [
        "distill", "-t", str(teacher), "-d", str(inputs), "-o", str(out), "--keep-layers", "1",
        "--max-steps", str(steps), "--lr", "3e-3", "--batch-size", "4", "--threads", "1",
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--save-every", str(save_every), "--keep-checkpoints", "2",
    ]  # fmt: skip


def _config(steps: int) -> DistillConfig:
    """The CLI arguments above, as the one-process reference's settings."""
    return DistillConfig(keep_layers=1, max_steps=steps, learning_rate=3e-3, batch_size=4, threads=1, save_every=0)


def _torchrun(args: list[str], **popen: object) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*cmd, "-m", "slmops_cli.main", "builder", *args],
        env=env,
        text=True,
        **popen,  # type: ignore[call-overload]
    )


def _losses(out: Path) -> list[float]:
    lines = (out / "loss.csv").read_text().splitlines()[1:]
    return [float(line.split(",")[1]) for line in lines]


def test_two_processes_follow_one_and_save_a_student_that_scores_alike(trainable_tiny: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    inputs, stage1 = _taught(trainable_tiny, tmp_path, 16, seed=31)
    one = distill(trainable_tiny, stage1.examples, tmp_path / "one", _config(8))

    run = _torchrun(_cli_args(trainable_tiny, inputs, tmp_path / "out", 8, 0), stdout=subprocess.PIPE)
    stdout, _ = run.communicate(timeout=300)
    assert run.returncode == 0, stdout
    assert stdout.count("student: ") == 1  # one process printed (and wrote) the results
    two = tmp_path / "out" / "run"
    summary = json.loads((two / "distill.json").read_text())
    assert summary["processes"] == 2 and summary["mode"] == "kl+ce" and summary["steps"] == 8

    single = [h["train_loss"] for h in one.history]
    double = _losses(two)
    assert len(double) == len(single) == 8
    assert all(abs(a - b) <= LOSS_TOLERANCE * a for a, b in zip(single, double, strict=True)), (single, double)
    assert sum(double[-3:]) / 3 < sum(double[:3]) / 3 - 0.1  # it learned

    students = {"one": one.student_dir, "two": two / "student"}
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    logits = {}
    for name, folder in students.items():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits
    assert torch.allclose(logits["one"], logits["two"], atol=1e-4)
    held_out = generate_splits(0, 0, 3, seed=32).test
    scores = evaluate_models(students, held_out, max_new_tokens=MAX_NEW_TOKENS)
    drop = {"decode_s_per_response"}
    assert {k: v for k, v in scores["one"].items() if k not in drop} == {
        k: v for k, v in scores["two"].items() if k not in drop
    }


def test_a_run_killed_under_two_processes_resumes_in_one(trainable_tiny: Path, tmp_path: Path) -> None:
    inputs, stage1 = _taught(trainable_tiny, tmp_path, 16, seed=33)
    steps = 40
    out = tmp_path / "out"
    checkpoints = out / "run" / "checkpoints"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    run = _torchrun(_cli_args(trainable_tiny, inputs, out, steps, 5), **quiet)
    try:
        deadline = time.monotonic() + 300
        while not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
            assert run.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.05)
    finally:
        workers = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
        for pid in [*map(int, workers), run.pid]:  # the two workers (each in its own session), then torchrun
            os.kill(pid, signal.SIGKILL)
        run.wait()
    assert len(workers) == 2
    assert not (out / "run" / "student").exists()  # killed before the end

    resumed = CliRunner().invoke(app, [*_cli_args(trainable_tiny, inputs, out, steps, 5), "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    result = json.loads(resumed.stdout)["distill"]
    assert result["steps"] == steps and 5 <= result["resumed_from"] < steps
    whole = distill(trainable_tiny, stage1.examples, tmp_path / "whole", _config(steps))
    expected = [h["train_loss"] for h in whole.history]
    got = _losses(out / "run")  # the steps before the kill (from the checkpoint) and after it
    assert len(got) == steps
    off = [(i + 1, a, b) for i, (a, b) in enumerate(zip(expected, got, strict=True)) if abs(a - b) > LOSS_TOLERANCE * a]
    assert not off, off

    with pytest.raises(ValueError, match=r"cannot resume: the checkpoints in .* are another run's"):
        other = DistillConfig(**{**_config(steps).model_dump(), "resume": True, "learning_rate": 1e-3})
        distill(trainable_tiny, stage1.examples, out / "run", other)


def test_distill_refuses_before_writing(trainable_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = generate_splits(4, 0, 0, seed=34).train
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"nothing to resume: .* holds no complete checkpoint"):
        distill(trainable_tiny, data, out, DistillConfig(resume=True))
    with pytest.raises(ValueError, match="precision fp16 needs a CUDA GPU"):
        distill(trainable_tiny, data, out, DistillConfig(device="cpu", precision="fp16"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"batch size 3 \(the global batch\) does not split across 2 processes"):
        distill(trainable_tiny, data, out, DistillConfig(batch_size=3))
    assert not out.exists()
