"""Recipes with a `[train]` table: the recipe's model fine-tuned or distilled, then converted, evaluated
and signed from the trained folder, with the packages' lineage naming the training; a second run
reuses the training; bad tables refused with the key named before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmops_builder.cli import app
from slmops_builder.importer import folder_sha256
from slmops_builder.keys import load_public_key
from slmops_builder.packaging import verify_package
from slmops_builder.recipe_plan import plan_recipe
from slmops_builder.recipe_run import build_recipe
from slmops_builder.recipe_schema import RecipeError, load_recipe
from slmops_builder.train.examples import dataset_sha256, load_jsonl, write_jsonl
from slmops_builder.train.tasks import generate_splits

runner = CliRunner()

FINETUNE = """
[train]
kind = "finetune"
data = "train.jsonl"
validation = "validation.jsonl"
max_steps = 4
batch_size = 2
learning_rate = 3e-2
eval_every = 2
save_every = 2
[train.lora]
r = 4
alpha = 8
dropout = 0.0
"""

DISTILL = """
[train]
kind = "distill"
data = "inputs.jsonl"
keep_layers = 1
max_steps = {steps}
batch_size = 2
learning_rate = 3e-3
max_new_tokens = 4
teacher_batch_size = 4
"""


def _recipe(folder: Path, model: Path, train: str, profiles: str = '["cpu-fp32"]') -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.toml"
    path.write_text(
        f'name = "tiny-trained"\nversion = "1.0.0"\nmodel = "{model}"\nprofiles = {profiles}\noutput = "dist"\n'
        "[evaluation]\ngolden_max_new_tokens = 6\nmax_tokens = 256\nthreads = 1\n" + train
    )
    return path


def _plan(path: Path, cache: Path) -> dict[tuple[str, str], tuple[str | None, bool]]:
    return {(p.step, p.target): (p.key, p.cached) for p in plan_recipe(load_recipe(path), cache_dir=cache)}


def _converted_from(cache: Path) -> set[str]:
    """The folders the cache's conversions read (their entries' records)."""
    records = (cache / "convert").glob("*/slmops_step.json")
    return {json.loads(r.read_text())["model_dir"] for r in records}


def test_finetune_recipe_packages_the_merged_model_and_reuses_the_run(
    tiny_hf_model: Path, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    splits = generate_splits(8, 4, 0, seed=21)
    write_jsonl(splits.train, tmp_path / "train.jsonl")
    write_jsonl(splits.validation, tmp_path / "validation.jsonl")
    path = _recipe(tmp_path, tiny_hf_model, FINETUNE)
    cache = tmp_path / "cache"

    plan = _plan(path, cache)
    assert list(plan)[:3] == [("import", str(tiny_hf_model.resolve())), ("train", "finetune"), ("convert", "cpu-fp32")]
    assert plan[("train", "finetune")][0] and not plan[("train", "finetune")][1]
    assert plan[("convert", "cpu-fp32")] == (None, False)  # its input is the trained model: not made yet

    result = build_recipe(load_recipe(path), signing_key[0], cache_dir=cache)
    assert result.ok and not result.cached["train:finetune"]
    train_dirs = list((cache / "train").glob("*/model"))
    assert len(train_dirs) == 1 and _converted_from(cache) == {str(train_dirs[0].resolve())}
    manifest = verify_package(tmp_path / "dist" / "cpu-fp32", [load_public_key(signing_key[1])]).manifest
    lineage = manifest.lineage
    assert lineage.base_model == str(tiny_hf_model.resolve())
    assert lineage.base_model_sha256 == folder_sha256(tiny_hf_model)
    assert list(lineage.dataset_sha256) == [dataset_sha256(splits.train), dataset_sha256(splits.validation)]
    assert lineage.teacher == ""
    report = json.loads((tmp_path / "dist" / "report.json").read_text())
    assert report["train"]["kind"] == "finetune" and report["train"]["steps"] == 4
    assert report["train"]["last_loss"] < report["train"]["first_loss"]
    assert [s["step"] for s in report["steps"]][:2] == ["import", "train"]

    # Unchanged: every step is a hit, the CLI rebuilds from the cached run.
    assert all(cached for cached in (p[1] for p in _plan(path, cache).values() if p[0]))
    args = ["build", str(path), "--key", str(signing_key[0]), "--cache-dir", str(cache), "--json"]
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    steps = {(s["step"], s["target"]): s["cached"] for s in json.loads(again.output)["steps"]}
    assert steps[("train", "finetune")] and steps[("convert", "cpu-fp32")]
    rebuilt = verify_package(tmp_path / "dist" / "cpu-fp32", [load_public_key(signing_key[1])]).manifest
    assert list(rebuilt.files) == list(manifest.files) and rebuilt.lineage == lineage  # the same trained weights
    # A changed configuration or data is another run.
    path.write_text(path.read_text().replace("max_steps = 4", "max_steps = 5"))
    assert not _plan(path, cache)[("train", "finetune")][1]
    path.write_text(path.read_text().replace("max_steps = 5", "max_steps = 4"))
    write_jsonl(splits.train[:6], tmp_path / "train.jsonl")
    assert not _plan(path, cache)[("train", "finetune")][1]


def test_distill_recipe_packages_the_student_and_reuses_the_teacher_answers(
    tiny_hf_model: Path, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    inputs = generate_splits(6, 0, 0, seed=22).train
    write_jsonl(inputs, tmp_path / "inputs.jsonl")
    path = _recipe(tmp_path, tiny_hf_model, DISTILL.format(steps=3))
    cache = tmp_path / "cache"
    result = build_recipe(load_recipe(path), signing_key[0], cache_dir=cache)
    assert result.ok and not result.cached["teacher:inputs.jsonl"] and not result.cached["train:distill"]
    (student,) = (cache / "train").glob("*/model")
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 1  # the pruned student
    assert _converted_from(cache) == {str(student.resolve())}
    (run,) = (cache / "train").glob("*/run/distill.json")
    manifest = verify_package(tmp_path / "dist" / "cpu-fp32", [load_public_key(signing_key[1])]).manifest
    lineage = manifest.lineage
    assert lineage.teacher == lineage.base_model == str(tiny_hf_model.resolve())
    assert list(lineage.dataset_sha256) == [json.loads(run.read_text())["data_sha256"]]  # the teacher's answers
    assert lineage.dataset_sha256[0] != dataset_sha256(load_jsonl(tmp_path / "inputs.jsonl"))
    report = json.loads((tmp_path / "dist" / "report.json").read_text())
    assert report["train"]["kind"] == "distill" and report["train"]["steps"] == 3
    assert report["train"]["examples"] == 6  # every answer of the tiny model is valid text

    plan = _plan(path, cache)
    assert plan[("teacher", "inputs.jsonl")][1] and plan[("train", "distill")][1] and plan[("convert", "cpu-fp32")][1]
    # Another student configuration: the teacher's answers are reused, the student trained again.
    path.write_text(DISTILL.format(steps=4).join(path.read_text().split(DISTILL.format(steps=3))))
    again = build_recipe(load_recipe(path), signing_key[0], cache_dir=cache)
    assert again.cached["teacher:inputs.jsonl"] and not again.cached["train:distill"]
    assert again.training is not None and again.training["steps"] == 4


BASE = 'name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\n'


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('[train]\ndata = "d.jsonl"\n', "train.kind: must be 'finetune' or 'distill' (missing)"),
        ('[train]\nkind = "sft"\ndata = "d.jsonl"\n', "train.kind: must be 'finetune' or 'distill' (not 'sft')"),
        ('[train]\nkind = "finetune"\n', "train.data: Field required"),
        ('[train]\nkind = "finetune"\ndata = "d.jsonl"\nmax_stepz = 3\n', "unknown key 'train.max_stepz' (known: "),
        ('[train]\nkind = "finetune"\ndata = "d.jsonl"\nmax_steps = 0\n', "train.max_steps: Input should be greater"),
        ('[train]\nkind = "finetune"\ndata = "d.jsonl"\n[train.lora]\nrank = 4\n', "unknown key 'train.lora.rank'"),
        ('[train]\nkind = "distill"\ndata = "d.jsonl"\nvalidation = "d.jsonl"\n', "unknown key 'train.validation'"),
        ('[train]\nkind = "distill"\ndata = "d.jsonl"\nkeep_answers = "best"\n', "train.keep_answers: Input should"),
        ('[train]\nkind = "distill"\ndata = "d.jsonl"\nmax_steps = 2\nqat_steps = 3\n', "train: qat_steps 3 is more"),
        ('[train]\nkind = "distill"\ndata = "d.jsonl"\nstudent = "none"\n', "train.student: "),
        ('[train]\nkind = "finetune"\ndata = "none.jsonl"\n', "train.data: no data file at "),
        ('[train]\nkind = "finetune"\ndata = "bad.jsonl"\n', "train.data: "),
        ('[train]\nkind = "finetune"\ndata = "d.jsonl"\nvalidation = "bad.jsonl"\n', "train.validation: "),
        ("train = 3\n", "train: Input should be a valid dictionary"),
    ],
)
def test_bad_train_tables_fail_naming_the_key_before_any_work(
    table: str, expected: str, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    (tmp_path / "d.jsonl").write_text('{"input": "a", "output": "b"}\n')
    (tmp_path / "bad.jsonl").write_text('{"input": "a", "output": "b"}\nnot json\n')
    path = tmp_path / "recipe.toml"
    path.write_text(BASE + table)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert expected in str(info.value) and str(path) in str(info.value)
    if "bad.jsonl" in table:
        assert "line 2: not JSON" in str(info.value)
    cache = tmp_path / "cache"
    result = runner.invoke(app, ["build", str(path), "--key", str(signing_key[0]), "--cache-dir", str(cache)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert expected in " ".join(result.output.split()) and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "d.jsonl", "recipe.toml"]  # nothing written


def test_a_trained_model_cannot_be_packaged_as_the_source_gguf(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"input": "a", "output": "b"}\n')
    path = tmp_path / "recipe.toml"
    path.write_text(
        'name = "t"\nversion = "1.0.0"\nmodel = "smollm2"\nprofiles = ["cpu-int4-gguf"]\n'
        '[train]\nkind = "finetune"\ndata = "d.jsonl"\n'
    )
    with pytest.raises(RecipeError, match=r"profiles: cpu-int4-gguf package the source GGUF itself"):
        load_recipe(path)


def test_qlora_without_cuda_is_refused_before_any_work(signing_key: tuple[Path, Path], tmp_path: Path) -> None:
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):  # pragma: no cover - GPU machines
        pytest.skip("this machine runs QLoRA")
    (tmp_path / "d.jsonl").write_text('{"input": "a", "output": "b"}\n')
    path = tmp_path / "recipe.toml"
    path.write_text(BASE + '[train]\nkind = "finetune"\ndata = "d.jsonl"\nqlora = true\n')
    with pytest.raises(RecipeError, match=r"train\.qlora: .*(CUDA|bitsandbytes)"):
        plan_recipe(load_recipe(path), cache_dir=tmp_path / "cache")
    result = runner.invoke(app, ["build", str(path), "--key", str(signing_key[0]), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 1 and "train.qlora: " in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "recipe.toml"]


def test_a_teacher_with_no_answer_to_keep_fails_naming_the_data_and_packages_nothing(
    tiny_hf_model: Path, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    write_jsonl(generate_splits(3, 0, 0, seed=23).train, tmp_path / "inputs.jsonl")
    (tmp_path / "t.jsonl").write_text('{"input": "a", "output": "b"}\n')
    scorer = 'tasks = "t.jsonl"\ntask_scorer = "regex"\ntask_pattern = "[0-9]{40}"\n'  # no answer is 40 digits
    path = _recipe(tmp_path, tiny_hf_model, DISTILL.format(steps=2).replace("[train]", scorer + "[train]"))
    cache = tmp_path / "cache"
    with pytest.raises(RecipeError, match=r"train\.data: the teacher's 3 answers left nothing to learn \(3 invalid"):
        build_recipe(load_recipe(path), signing_key[0], cache_dir=cache)
    assert not (tmp_path / "dist").exists()
    assert not [p for p in (cache / "train").iterdir() if not p.name.endswith(".lock")]
    assert _plan(path, cache)[("teacher", "inputs.jsonl")][1]  # the answers are kept for the next try
