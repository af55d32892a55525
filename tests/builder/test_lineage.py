"""Training lineage: a trained HF folder's slmops_training.json survives the import and becomes the
packages' Lineage.teacher and Lineage.dataset_sha256 (`package_lineage`, which both `slmops builder build` and
recipes call)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from slmops_builder import recipe_run
from slmops_builder.importer import (
    TRAINING_FILE,
    ModelImportError,
    import_model,
    read_source_info,
)
from slmops_builder.lineage import package_lineage
from slmops_builder.profiles import get_profile

TEACHER_SHA = hashlib.sha256(b"teacher").hexdigest()
DATA_SHA = [hashlib.sha256(b"train").hexdigest(), hashlib.sha256(b"validation").hexdigest()]
RECORD = {
    "kind": "distill",
    "teacher": "/models/teacher",
    "teacher_sha256": TEACHER_SHA,
    "base_model": "/runs/x/student-init",
    "dataset_sha256": DATA_SHA,
}


def _trained_folder(tiny_hf_model: Path, where: Path, record: object) -> Path:
    src = where / "trained"
    shutil.copytree(tiny_hf_model, src)
    (src / TRAINING_FILE).write_text(record if isinstance(record, str) else json.dumps(record))
    return src


@pytest.fixture
def imported(tiny_hf_model: Path, tmp_path: Path) -> Path:
    return import_model(_trained_folder(tiny_hf_model, tmp_path, RECORD), tmp_path / "imported").path


def test_import_keeps_the_training_record(imported: Path) -> None:
    info = read_source_info(imported)
    assert info is not None and info["training"] == RECORD


def test_import_without_a_training_record_has_none(tiny_hf_model: Path, tmp_path: Path) -> None:
    info = read_source_info(import_model(tiny_hf_model, tmp_path / "out").path)
    assert info is not None and "training" not in info


@pytest.mark.parametrize(
    ("record", "why"),
    [
        ("{not json", "not a valid training record"),
        ([1, 2], "not a JSON object"),
        ({**RECORD, "kind": 3}, '"kind"'),
        ({**RECORD, "dataset_sha256": "abc"}, "list of SHA-256 hex strings"),
        ({**RECORD, "dataset_sha256": ["xyz"]}, "list of SHA-256 hex strings"),
        ({**RECORD, "teacher": 7}, "'teacher' must be a string"),
        ({**RECORD, "teacher_sha256": "nothex"}, '"teacher_sha256"'),
    ],
)
def test_a_malformed_training_record_is_refused_naming_the_file(
    tiny_hf_model: Path, tmp_path: Path, record: object, why: str
) -> None:
    src = _trained_folder(tiny_hf_model, tmp_path, record)
    with pytest.raises(ModelImportError, match=TRAINING_FILE) as err:
        import_model(src, tmp_path / "out")
    assert str(src / TRAINING_FILE) in str(err.value) and why in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_build_lineage_carries_teacher_and_data_hashes(imported: Path, tiny_hf_model: Path, tmp_path: Path) -> None:
    lineage = package_lineage(imported, get_profile("cpu-int4"), recipe_sha256="")
    assert lineage.teacher == RECORD["teacher"]
    assert list(lineage.dataset_sha256) == DATA_SHA
    assert lineage.base_model.endswith("trained") and len(lineage.base_model_sha256) == 64
    # a trained folder built without an import: its own record
    finetuned = {"kind": "finetune", "base_model": "/b", "dataset_sha256": DATA_SHA[:1]}
    direct = package_lineage(
        _trained_folder(tiny_hf_model, tmp_path / "d", finetuned), get_profile("cpu-int4"), recipe_sha256=""
    )
    assert (direct.teacher, list(direct.dataset_sha256)) == ("", DATA_SHA[:1])
    # a model that was not trained: nothing
    plain = package_lineage(tiny_hf_model, get_profile("cpu-int4"), recipe_sha256="")
    assert (plain.teacher, list(plain.dataset_sha256)) == ("", [])


def test_recipe_package_lineage_carries_teacher_and_data_hashes(
    imported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_entry = tmp_path / "entry"
    cache_entry.mkdir()
    imported.rename(cache_entry / "model")  # the recipe's import step output: <entry>/model
    specs: list[Any] = []
    monkeypatch.setattr(recipe_run, "write_package", lambda staged, spec, key, out: specs.append(spec))
    loaded = SimpleNamespace(
        recipe=SimpleNamespace(name="tiny", version="1.0.0", parent_package="", security_version=0),
        source="x",
        sha256="0" * 64,
    )
    variant = recipe_run.VariantResult("cpu-int4", "onnxruntime-genai", "rtn", {}, [], size_bytes=1)
    recipe_run._package(loaded, variant, tmp_path, [], None, tmp_path / "out", cache_entry)  # type: ignore[arg-type]
    (spec,) = specs
    assert spec.lineage.teacher == RECORD["teacher"]
    assert list(spec.lineage.dataset_sha256) == DATA_SHA
    assert spec.lineage.recipe_sha256 == "0" * 64


def test_both_paths_record_the_engine_s_tools(imported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`slmops builder build` and a recipe write the same lineage: the olive engine's tools included."""
    olive = get_profile("cpu-int4-olive")
    built = package_lineage(imported, olive, recipe_sha256="1" * 64)
    cache_entry = tmp_path / "entry"
    cache_entry.mkdir()
    imported.rename(cache_entry / "model")
    specs: list[Any] = []
    monkeypatch.setattr(recipe_run, "write_package", lambda staged, spec, key, out: specs.append(spec))
    loaded = SimpleNamespace(
        recipe=SimpleNamespace(name="tiny", version="1.0.0", parent_package="", security_version=0),
        source="x",
        sha256="1" * 64,
    )
    variant = recipe_run.VariantResult(olive.name, olive.engine, olive.quantization_method, {}, [], size_bytes=1)
    recipe_run._package(loaded, variant, tmp_path, [], None, tmp_path / "out", cache_entry)  # type: ignore[arg-type]
    (spec,) = specs
    assert "olive-ai" in built.tool_versions and "onnxruntime-genai" in built.tool_versions
    assert spec.lineage == built
