"""A free-text task distilled end to end on the tiny model: the teacher's text answers kept by the
text rule, the given system prompt in every chat the models see, the student's cpu-int4 package built
and scored in onnxruntime-genai, its retention in the summary, --json, summary.json and the package's
lineage; and the package options refused before any long work."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from slmops_builder.cli import app
from slmops_builder.convert import convert
from slmops_builder.profiles import get_profile
from slmops_builder.train.batches import encode_example
from slmops_builder.train.examples import load_jsonl
from slmops_builder.train.hf_models import load_tokenizer
from slmops_builder.train.retention import package_score
from slmops_builder.train.scoring import TaskSpec
from slmops_protos.manifests import read_package
from slmops_protos.package.v1 import manifest_pb2
from slmops_testing.free_text_task import CITY_SYSTEM, write_city_task


def test_distill_a_free_text_task_and_score_its_package(
    trainable_tiny: Path, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    train, test = write_city_task(tmp_path / "data", 8, 3, seed=1)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [
        "distill", "-t", str(trainable_tiny), "-d", str(train), "--test", str(test), "-o", str(out),
        "--system", CITY_SYSTEM, "--scorer", "f1", "--valid", "text", "--max-new-tokens", "6",
        "--keep-layers", "1", "--max-steps", "3", "--batch-size", "4", "--threads", "1",
        "--package-profile", "cpu-int4", "--key", str(signing_key[0]), "--cache-dir", str(cache), "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # every non-empty text answer of the teacher is kept (the JSON rule would have kept none of them)
    assert summary["teacher_outputs"]["kept"] == summary["teacher_outputs"]["total"] == 8
    # the system prompt is in the chat the teacher answered and the student trained on
    rows = [json.loads(line) for line in (out / "teacher.jsonl").read_text().splitlines()]
    assert all(r["messages"][0] == {"role": "system", "content": CITY_SYSTEM} for r in rows)
    tok = load_tokenizer(trainable_tiny)
    held_out = load_jsonl(test, system=CITY_SYSTEM)
    ids, _ = encode_example(tok, held_out[0], 256)
    assert CITY_SYSTEM in tok.decode(ids)
    # the three float models and the package, scored with token F1 on the same 3 held-out examples
    assert {row["scorer"] for row in summary["evaluation"].values()} == {"f1"}
    retention = summary["retention"]
    scores = retention["scores"]
    assert set(scores) == {"teacher", "student", "package"} and retention["examples"] == 3
    assert scores["teacher"] == summary["evaluation"]["teacher"]["score"]
    assert scores["student"] == summary["evaluation"]["student"]["score"]
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    for name in ("teacher", "student"):
        want = round(scores["package"] / scores[name], 4) if scores[name] else None
        assert retention["retention"][f"package/{name}"] == want
    # the package's score is the int4 conversion's, scored again here
    converted = convert(out / "run" / "student", get_profile("cpu-int4"), cache_dir=cache)
    assert converted.cached
    spec = TaskSpec(scorer="f1", system=CITY_SYSTEM)
    assert scores["package"] == round(package_score(converted.path, held_out, spec, max_new_tokens=6), 4)
    # ... kept by the package: its lineage and evaluation
    signed, _ = read_package(Path(retention["package_path"]))
    manifest = manifest_pb2.Manifest.FromString(signed.manifest)
    assert dict(manifest.lineage.task_scores) == scores
    assert manifest.evaluation.metrics["task_score"] == scores["package"]
    assert manifest.lineage.teacher == str(trainable_tiny.resolve())
    assert json.loads((out / "summary.json").read_text())["retention"] == retention


def test_the_table_shows_the_retention(trainable_tiny: Path, signing_key: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = write_city_task(tmp_path / "data", 4, 2, seed=2)
    args = [
        "distill", "-t", str(trainable_tiny), "-d", str(train), "--test", str(test), "-o", str(tmp_path / "out"),
        "--scorer", "contains", "--max-new-tokens", "4", "--keep-layers", "1", "--max-steps", "1",
        "--threads", "1", "--package-profile", "cpu-int4", "--key", str(signing_key[0]),
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "retention: contains score on 2 held-out examples" in result.output
    assert "cpu-int4 package" in result.output


def test_package_options_are_refused_before_any_work(trainable_tiny: Path, tmp_path: Path) -> None:
    train, test = write_city_task(tmp_path / "data", 2, 1)
    base = ["distill", "-t", str(trainable_tiny), "-d", str(train), "-o", str(tmp_path / "out")]
    cases = {
        ("--package-profile", "cpu-int4"): "--package-profile needs --key (to sign the package) and --test",
        ("--package-profile", "cpu-int5", "--test", str(test), "--key", str(train)): "cpu-int5",
        ("--package-profile", "cpu-int4", "--test", str(test), "--key", str(train)): str(train),
        ("--scorer", "bleu"): "--scorer must be one of json, exact, contains, regex, f1, rouge_l, not 'bleu'",
        ("--scorer", "regex"): "need a pattern",
        ("--valid", "xml"): "--valid must be one of json, regex, text, not 'xml'",
    }
    for extra, message in cases.items():
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 1, (extra, result.output)
        assert message in result.output, (extra, result.output)
        assert not (tmp_path / "out").exists()
    finetune = ["finetune", "-m", str(trainable_tiny), "-d", str(train), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*finetune, "--package-profile", "cpu-int4"])
    assert result.exit_code == 1 and "add --merge" in result.output


def test_finetune_merge_scores_its_package(
    trainable_tiny: Path, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    train, test = write_city_task(tmp_path / "data", 8, 2, seed=3)
    args = [
        "finetune", "-m", str(trainable_tiny), "-d", str(train), "--test", str(test), "-o", str(tmp_path / "out"),
        "--merge", "--max-steps", "2", "--r", "4", "--threads", "1", "--system", CITY_SYSTEM, "--scorer", "rouge_l",
        "--package-profile", "cpu-int4", "--key", str(signing_key[0]), "--cache-dir", str(tmp_path / "cache"),
        "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    scores = summary["retention"]["scores"]
    assert set(scores) == {"base", "merged", "package"} and summary["retention"]["scorer"] == "rouge_l"
    assert scores["merged"] == summary["evaluation"]["merged"]["score"]
    signed, _ = read_package(Path(summary["retention"]["package_path"]))
    assert dict(manifest_pb2.Manifest.FromString(signed.manifest).lineage.task_scores) == scores
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["retention"] == summary["retention"]
