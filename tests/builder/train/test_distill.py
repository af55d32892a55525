"""Distillation on a tiny teacher: cached teacher answers with invalid ones counted, a layer-pruned
student trained with KL + CE whose loss falls, and the three-way evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmops_builder.cli import app
from slmops_builder.importer import folder_sha256
from slmops_builder.train.distill import DistillConfig, distill, evaluate_models, prune_layers, teacher_outputs
from slmops_builder.train.examples import dataset_sha256, write_jsonl
from slmops_builder.train.tasks import generate_splits


def test_teacher_outputs_are_cached_scored_and_invalid_ones_counted(trainable_tiny: Path, tmp_path: Path) -> None:
    examples = generate_splits(6, 0, 0, seed=11).train
    cache = tmp_path / "teacher.jsonl"
    first = teacher_outputs(trainable_tiny, examples, cache, batch_size=4, max_new_tokens=6)
    assert (first.total, first.invalid, len(first.examples), first.cached) == (6, 6, 0, False)
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [r["reference"] for r in rows] == [e.output for e in examples]
    assert all(not r["valid"] and not r["exact"] and r["mean_logprob"] < 0 for r in rows)
    again = teacher_outputs(trainable_tiny, examples, cache, batch_size=4, max_new_tokens=6)
    assert again.cached and again.total == 6
    changed = teacher_outputs(trainable_tiny, examples[:3], cache, batch_size=4, max_new_tokens=6)
    assert not changed.cached and changed.total == 3  # other inputs: the cache is rebuilt


def test_keep_exact_drops_the_answers_that_are_not_the_reference(trainable_tiny: Path, tmp_path: Path) -> None:
    examples = generate_splits(4, 0, 0, seed=14).train
    cache = tmp_path / "teacher.jsonl"
    teacher_outputs(trainable_tiny, examples, cache, batch_size=4, max_new_tokens=4)
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    wrong = json.dumps({**json.loads(examples[1].output), "room": "attic"})  # valid JSON, not the reference
    answers = [examples[0].output, wrong, "not json", examples[3].output]
    for row, answer in zip(rows, answers, strict=True):  # the cached answers, as a teacher might have written them
        row.update(teacher_output=answer, valid=answer != "not json", exact=answer == row["reference"])
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exact = teacher_outputs(trainable_tiny, examples, cache, max_new_tokens=4, keep="exact")
    assert exact.cached and [e.output for e in exact.examples] == [answers[0], answers[3]]
    assert exact.to_json() | {"path": "", "seconds": 0} == {
        "path": "", "total": 4, "valid": 3, "invalid": 1, "keep": "exact", "rejected": 1, "kept": 2,
        "cached": True, "seconds": 0, "teacher_exact_match": 0.5,
    }  # fmt: skip
    valid = teacher_outputs(trainable_tiny, examples, cache, max_new_tokens=4)
    assert [e.output for e in valid.examples] == [answers[0], wrong, answers[3]] and valid.rejected == 0
    assert valid.examples[0].prompt_messages == examples[0].prompt_messages


def test_distill_prunes_trains_with_kl_and_ce_and_evaluates(trainable_tiny: Path, tmp_path: Path) -> None:
    splits = generate_splits(16, 0, 2, seed=12)
    cfg = DistillConfig(keep_layers=1, max_steps=10, learning_rate=3e-3, batch_size=4, threads=1)
    result = distill(trainable_tiny, splits.train, tmp_path / "run", cfg)
    assert result.mode == "kl+ce" and result.steps == 10
    losses = [h["train_loss"] for h in result.history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    assert all(h["kl"] is not None and h["kl"] >= 0 for h in result.history)
    assert result.init_dir is not None
    assert json.loads((result.student_dir / "config.json").read_text())["num_hidden_layers"] == 1
    assert json.loads((result.init_dir / "slmops_pruned.json").read_text())["layers"] == [0]
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "run" / "distill.json").is_file()
    training = json.loads((result.student_dir / "slmops_training.json").read_text())
    assert training == {
        "kind": "distill",
        "teacher": str(trainable_tiny.resolve()),
        "teacher_sha256": folder_sha256(trainable_tiny),
        "base_model": str(result.init_dir.resolve()),
        "dataset_sha256": [dataset_sha256(splits.train)],
    }
    assert not (tmp_path / "run" / "student.partial").exists()
    models = {"teacher": trainable_tiny, "student": result.student_dir, "baseline": result.init_dir}
    table = evaluate_models(models, splits.test, max_new_tokens=4)
    assert set(table) == set(models)
    assert table["student"]["weights_mb"] < table["teacher"]["weights_mb"]
    assert table["student"]["weights_mb"] == table["baseline"]["weights_mb"]
    assert all(row["n"] == 2 and row["decode_s_per_response"] > 0 for row in table.values())
    with pytest.raises(ValueError, match=r"keep_layers must be in 1\.\.2"):
        prune_layers(trainable_tiny, 3, tmp_path / "x")


def test_cli_distill_refuses_an_unknown_keep_answers(trainable_tiny: Path, tmp_path: Path) -> None:
    write_jsonl(generate_splits(2, 0, 0, seed=15).train, tmp_path / "inputs.jsonl")
    args = ["distill", "-t", str(trainable_tiny), "-d", str(tmp_path / "inputs.jsonl"), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--keep-answers", "best"])
    assert result.exit_code == 1
    assert "--keep-answers must be valid or exact, not 'best'" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_distill_refuses_when_the_teacher_writes_nothing_valid(trainable_tiny: Path, tmp_path: Path) -> None:
    write_jsonl(generate_splits(3, 0, 0, seed=13).train, tmp_path / "inputs.jsonl")
    args = ["distill", "-t", str(trainable_tiny), "-d", str(tmp_path / "inputs.jsonl"), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "4", "--threads", "1"])
    assert result.exit_code == 1
    assert "teacher: 0 valid, 3 invalid (filtered) of 3" in result.output
    assert "no training examples" in result.output
