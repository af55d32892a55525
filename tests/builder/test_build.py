"""build_package end to end on the tiny model: convert, stage, evaluate, sign; reuse of the step cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmops_builder.build import BuildEvent, GoldenPromptSpec, build_package, evaluate_folder
from slmops_builder.importer import folder_sha256, import_model
from slmops_builder.keys import KeyFileError, load_public_key
from slmops_builder.packaging import unpack_package, verify_package
from slmops_protos.manifests import PackageError


def test_build_reuses_the_conversion(tiny_hf_model: Path, signing_key: tuple[Path, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    events: list[BuildEvent] = []
    first = build_package(
        tiny_hf_model,
        "cpu-int4",
        "tiny",
        "1.0.0",
        signing_key[0],
        tmp_path / "v1",
        cache_dir=cache,
        threads=1,
        progress=events.append,
    )
    assert [(e.step, e.status) for e in events] == [
        (s, st) for s in ("convert", "stage", "evaluate", "package") for st in ("start", "done")
    ]
    assert events[1].detail.startswith("converted")
    entries = [p for p in (cache / "convert").iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1
    created = entries[0].stat().st_mtime_ns

    events.clear()
    second = build_package(
        tiny_hf_model,
        "cpu-int4",
        "tiny",
        "1.0.1",
        signing_key[0],
        tmp_path / "v2",
        cache_dir=cache,
        threads=1,
        search={"top_k": 3},
        progress=events.append,
    )
    assert events[1].detail.startswith("reused cached")
    assert events[1].seconds < 2  # no model builder subprocess (it alone takes ~5 s)
    assert [p for p in (cache / "convert").iterdir() if not p.name.endswith(".lock")] == entries
    assert entries[0].stat().st_mtime_ns == created
    f1 = {f.path: f.sha256 for f in first.manifest.files}
    f2 = {f.path: f.sha256 for f in second.manifest.files}
    assert {p for p in f1 if f1[p] != f2[p]} == {"genai_config.json"}
    assert first.manifest.lineage.recipe_sha256 != second.manifest.lineage.recipe_sha256


def test_package_contents_and_lineage(
    tiny_hf_model: Path, signing_key: tuple[Path, Path], builder_cache_dir: Path, tmp_path: Path
) -> None:
    imported = import_model(tiny_hf_model, tmp_path / "imported")
    written = build_package(
        imported.path,
        "cpu-int4",
        "tiny",
        "2.0.0",
        signing_key[0],
        tmp_path / "pkg",
        cache_dir=builder_cache_dir,
        threads=1,
        golden_prompts=["Hello", GoldenPromptSpec("Name a colour.", 5, reference="red")],
    )
    m = written.manifest
    assert m.lineage.base_model_sha256 == folder_sha256(tiny_hf_model)  # from slmops_source.json
    assert m.lineage.base_model == str(tiny_hf_model.resolve())
    assert set(m.lineage.tool_versions) >= {"onnxruntime-genai", "transformers", "onnxruntime"}
    assert m.lineage.engine == "onnxruntime-genai" and m.lineage.quantization_method == "rtn"
    assert m.evaluation.size_bytes == sum(f.size for f in m.files)
    assert m.evaluation.metrics["decode_tps"] > 0 and "ttft_ms" in m.evaluation.metrics
    assert m.profile.min_memory_bytes >= 256 * 1024**2
    assert [g.prompt for g in m.golden_prompts] == ["Hello", "Name a colour."]
    assert m.golden_prompts[1].reference == "red" and m.golden_prompts[1].max_new_tokens == 5
    # The reference of "Hello" is what the unpacked package generates greedily on its own.
    folder = unpack_package(written.path, tmp_path / "unpacked", [load_public_key(signing_key[1])])
    again = evaluate_folder(folder, [GoldenPromptSpec("Hello", m.golden_prompts[0].max_new_tokens)], threads=1)
    assert again.references == [m.golden_prompts[0].reference] and again.references[0].strip()
    inference = json.loads((folder / "inference_model.json").read_text())
    assert inference["Name"] == "tiny-cpu-int4" and "{Content}" in inference["PromptTemplate"]["prompt"]


def test_fp32_profile(
    tiny_hf_model: Path, signing_key: tuple[Path, Path], builder_cache_dir: Path, tmp_path: Path
) -> None:
    written = build_package(
        tiny_hf_model,
        "cpu-fp32",
        "tiny",
        "1.0.0",
        signing_key[0],
        tmp_path / "pkg",
        cache_dir=builder_cache_dir,
        threads=1,
    )
    assert written.manifest.profile.precision == "fp32"
    data = next(f for f in written.manifest.files if f.path.endswith(".onnx.data") or f.path == "model.onnx")
    assert data.size > 0
    verify_package(written.path, [load_public_key(signing_key[1])])


def test_bad_inputs_fail_before_converting(tiny_hf_model: Path, signing_key: tuple[Path, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = (tiny_hf_model, "cpu-int4", "tiny", "1.0.0")
    with pytest.raises(KeyFileError):
        build_package(*args, tmp_path / "nokey", tmp_path / "pkg", cache_dir=cache)
    with pytest.raises(ValueError, match="semantic version"):
        build_package(tiny_hf_model, "cpu-int4", "tiny", "1.0", signing_key[0], tmp_path / "pkg", cache_dir=cache)
    with pytest.raises(ValueError, match="bad package name"):
        build_package(tiny_hf_model, "cpu-int4", "../x", "1.0.0", signing_key[0], tmp_path / "pkg", cache_dir=cache)
    with pytest.raises(ValueError, match="unknown hardware profile"):
        build_package(tiny_hf_model, "tpu-int4", "tiny", "1.0.0", signing_key[0], tmp_path / "pkg", cache_dir=cache)
    with pytest.raises(ValueError, match="unknown search option"):
        build_package(*args, signing_key[0], tmp_path / "pkg", cache_dir=cache, search={"x": 1})
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        build_package(tmp_path, "cpu-int4", "tiny", "1.0.0", signing_key[0], tmp_path / "pkg", cache_dir=cache)
    assert not cache.exists() and not (tmp_path / "pkg").exists()


def test_failed_build_keeps_the_previous_package(
    tiny_package_factory, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tiny_package_factory("1.0.0", out=tmp_path / "pkg")
    before = sorted(p.name for p in (out / "blobs").iterdir())
    with pytest.raises(ValueError):
        tiny_package_factory("1.0.1", search={"temperature": "hot"}, out=out)
    assert sorted(p.name for p in (out / "blobs").iterdir()) == before
    assert verify_package(out, [load_public_key(signing_key[1])]).manifest.version == "1.0.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    with pytest.raises(PackageError):
        verify_package(tmp_path, [load_public_key(signing_key[1])])


def test_cuda_variant_builds_without_a_gpu(
    tiny_hf_model: Path, signing_key: tuple[Path, Path], builder_cache_dir: Path, tmp_path: Path
) -> None:
    import onnxruntime

    events: list[BuildEvent] = []
    written = build_package(
        tiny_hf_model,
        "cuda-fp16",
        "tiny",
        "1.0.0",
        signing_key[0],
        tmp_path / "pkg",
        cache_dir=builder_cache_dir,
        threads=1,
        progress=events.append,
    )
    genai = json.loads(
        (
            tmp_path / "pkg" / "blobs" / next(f.sha256 for f in written.manifest.files if f.path == "genai_config.json")
        ).read_text()
    )
    assert "cuda" in json.dumps(genai["model"]["decoder"]["session_options"]["provider_options"])
    assert written.manifest.profile.execution_provider == "cuda"
    evaluate = next(e for e in events if e.step == "evaluate" and e.status == "done")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert evaluate.detail.startswith("skipped: no cuda")
        assert not written.manifest.evaluation.metrics and written.manifest.golden_prompts[0].reference == ""
    else:  # pragma: no cover - GPU machines
        assert written.manifest.evaluation.metrics["decode_tps"] > 0
