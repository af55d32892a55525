"""Every architecture the builder lists, proven: a tiny random model of each (made from its
transformers config) imported from its HF folder and from a GGUF (where transformers reads that
architecture from GGUF; refused with the list otherwise), converted for cpu-fp32, cpu-int8 and
cpu-int4, loaded in onnxruntime-genai and compared with transformers (`slmops_testing.architectures`;
benchmarks/architecture_matrix.py prints the same figures as a table). And the refusals: an
architecture off the list, and a profile an architecture does not build, before any long work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmops_builder.architectures import (
    ARCHITECTURES,
    GGUF_ARCHITECTURES,
    WITHDRAWN,
    UnsupportedArchitectureError,
    buildable_profiles,
    check_buildable,
)
from slmops_builder.convert import convert
from slmops_builder.importer import ModelImportError, import_model
from slmops_builder.profiles import PROFILES, get_profile
from slmops_testing.architectures import GREEDY_TOKENS, ArchitectureRow, measure_all
from slmops_testing.tiny_gguf import GGUF_WRITABLE

ARCHS = sorted(ARCHITECTURES)
# fp32 runs the same float math as transformers: measured differences are ~1e-7 of logits ~0.3-1.5.
FP32_TOLERANCE = 1e-4
# int8 weights (RTN, block 32): measured <= 0.02.
INT8_TOLERANCE = 0.05
# int4: a tiny random model's top two logits are often closer than int4's error, so tokens are
# compared per position (module doc of slmops_testing.architectures): measured 0.57-1.0 across the
# architectures (benchmarks/README.md), while a graph that computes the wrong thing agrees at ~0.0-0.02
# (measured on models whose reference was corrupted): more than half must agree.
INT4_TOP1 = 0.5
INT8_TOP1 = 0.9


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ArchitectureRow]:
    return measure_all(ARCHS, tmp_path_factory.mktemp("architectures"))


def _row(matrix: dict[str, ArchitectureRow], arch: str, *steps: str) -> ArchitectureRow:
    row = matrix[arch]
    failed = {s: row.errors[s] for s in steps if s in row.errors}
    assert not failed, failed
    return row


def test_every_architecture_has_a_tiny_model_and_gguf_where_transformers_reads_one() -> None:
    from slmops_testing.tiny_model import TINY_ARCHITECTURES

    assert set(TINY_ARCHITECTURES) == set(ARCHITECTURES) | set(WITHDRAWN)
    readable = {a.name for a in ARCHITECTURES.values() if a.gguf} | {"MistralForCausalLM"}
    assert set(GGUF_WRITABLE) == readable


@pytest.mark.parametrize("arch", ARCHS)
def test_import_from_hf_folder(matrix: dict[str, ArchitectureRow], arch: str) -> None:
    row = _row(matrix, arch, "import")
    assert row.imported_as == arch and row.imported is not None
    assert (row.imported / "model.safetensors").read_bytes() == (row.hf / "model.safetensors").read_bytes()


@pytest.mark.parametrize("arch", ARCHS)
def test_import_from_gguf(matrix: dict[str, ArchitectureRow], arch: str) -> None:
    row = _row(matrix, arch, "import-gguf")
    if arch not in GGUF_WRITABLE:
        # transformers has no GGUF loader for it: refused from the header alone, naming what loads.
        assert "is not supported" in row.gguf_refusal and ", ".join(sorted(GGUF_ARCHITECTURES)) in row.gguf_refusal
        return
    # A Mistral GGUF is written as llama.cpp writes it ("llama"): the same network as a Llama.
    assert row.gguf_imported_as == ("LlamaForCausalLM" if arch == "MistralForCausalLM" else arch)
    assert row.gguf_tokens_match, "the tokenizer read from the GGUF encodes the prompt differently"
    assert row.gguf_max_diff is not None and row.gguf_max_diff <= FP32_TOLERANCE


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_logits_equal_transformers(matrix: dict[str, ArchitectureRow], arch: str) -> None:
    row = _row(matrix, arch, "cpu-fp32")
    assert row.max_diff["cpu-fp32"] <= FP32_TOLERANCE, (row.max_diff, row.logit_scale)
    assert row.top1["cpu-fp32"] == 1.0 and row.greedy["cpu-fp32"] == 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_close_to_transformers(matrix: dict[str, ArchitectureRow], arch: str) -> None:
    row = _row(matrix, arch, "cpu-int8")
    assert row.max_diff["cpu-int8"] <= INT8_TOLERANCE, (row.max_diff, row.logit_scale)
    assert row.top1["cpu-int8"] >= INT8_TOP1


@pytest.mark.parametrize("arch", ARCHS)
def test_int4_generates_and_tokens_mostly_agree(matrix: dict[str, ArchitectureRow], arch: str) -> None:
    row = _row(matrix, arch, "cpu-int4")
    assert row.generated["cpu-int4"] == GREEDY_TOKENS
    assert row.top1["cpu-int4"] >= INT4_TOP1, row.top1
    # int4 is not the float model: its logits differ, but by far less than their spread.
    assert 0 < row.max_diff["cpu-int4"] < row.logit_scale


# -- refusals, before any long work ------------------------------------------------------------


def test_architecture_off_the_list_is_refused_naming_the_list(tmp_path: Path) -> None:
    from slmops_testing.tiny_model import make_tiny_hf_model

    # OLMo, taken off the list (the model builder builds it wrong), refused with the reason.
    src = make_tiny_hf_model(tmp_path / "olmo", architecture="OlmoForCausalLM")
    (src / "model.safetensors").write_bytes(b"never read")  # the refusal comes before the weights
    with pytest.raises(ModelImportError, match=r"OlmoForCausalLM.*is not supported \(.*as RMS norms") as err:
        import_model(src, tmp_path / "out", profiles=["cpu-int4"])
    assert "supported: " + ", ".join(sorted(ARCHITECTURES)) in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    with pytest.raises(UnsupportedArchitectureError, match=r"OlmoForCausalLM.*not supported"):
        convert(src, get_profile("cpu-int4"), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    # One the builder never listed.
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelImportError, match=r"\['GPTNeoXForCausalLM'\] is not supported; supported: Gemma2"):
        import_model(src, tmp_path / "out")


def test_profile_an_architecture_does_not_build_is_refused_before_the_import(tmp_path: Path) -> None:
    from slmops_testing.tiny_model import make_tiny_hf_model

    hf = make_tiny_hf_model(tmp_path / "gemma3", architecture="Gemma3ForCausalLM")
    (hf / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(ModelImportError, match=r"'cpu-int4-gguf'.*does not build Gemma3ForCausalLM") as err:
        import_model(hf, tmp_path / "out", profiles=["cpu-int4", "cpu-int4-gguf"])
    message = str(err.value)
    assert "Gemma3ForCausalLM builds with: " + ", ".join(buildable_profiles("Gemma3ForCausalLM")) in message
    assert "cpu-int4-gguf builds: LlamaForCausalLM" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(UnsupportedArchitectureError, match="does not build Gemma3ForCausalLM"):
        convert(hf, get_profile("cpu-int4-gptq"), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("written_by", ["transformers 5", "transformers 4"])
def test_a_scaled_gemma3_rope_is_refused_before_the_import(tmp_path: Path, written_by: str) -> None:
    """The model builder shim's refusal (`builder_shim.check_translatable`), before any weights are read:
    the rope as transformers 5 writes it (per layer type) and as transformers 4 did (`rope_scaling`)."""
    from typer.testing import CliRunner

    from slmops_builder.cli import app
    from slmops_testing.tiny_model import make_tiny_hf_model

    hf = make_tiny_hf_model(tmp_path / "gemma3", architecture="Gemma3ForCausalLM")
    cfg = json.loads((hf / "config.json").read_text())
    if written_by == "transformers 5":
        cfg["rope_parameters"]["full_attention"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    else:
        del cfg["rope_parameters"]
        cfg.update(rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=1e6, rope_local_base_freq=1e4)
    (hf / "config.json").write_text(json.dumps(cfg))
    (hf / "model.safetensors").write_bytes(b"never read")
    result = CliRunner().invoke(app, ["import", str(hf), "-o", str(tmp_path / "out"), "-p", "cpu-int4"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "'cpu-int4' (engine onnxruntime-genai) cannot build this Gemma3ForCausalLM" in output
    assert "Gemma 3 rope types {'full': 'linear', 'sliding': 'default'}" in output
    assert not (tmp_path / "out").exists()
    with pytest.raises(UnsupportedArchitectureError, match="Gemma 3 rope types"):
        convert(hf, get_profile("cpu-fp32"), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    imported = import_model(make_tiny_hf_model(tmp_path / "plain", architecture="Gemma3ForCausalLM"),
                            tmp_path / "ok", profiles=["cpu-int4"])  # fmt: skip
    assert imported.architecture == "Gemma3ForCausalLM"  # the default rope passes


def test_cli_import_refuses_a_profile_first(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from slmops_builder.cli import app
    from slmops_testing.tiny_model import make_tiny_hf_model

    hf = make_tiny_hf_model(tmp_path / "qwen3", architecture="Qwen3ForCausalLM")
    (hf / "model.safetensors").write_bytes(b"never read")
    result = CliRunner().invoke(app, ["import", str(hf), "-o", str(tmp_path / "out"), "-p", "cpu-int4-olive"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "'cpu-int4-olive' (engine olive) does not build Qwen3ForCausalLM" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_the_table() -> None:
    assert buildable_profiles("LlamaForCausalLM") == list(PROFILES)
    model_builder = [n for n, p in PROFILES.items() if p.engine == "onnxruntime-genai"]
    for arch in ARCHS:
        assert set(model_builder) <= set(buildable_profiles(arch))
        check_buildable(arch, ["cpu-fp32", "cpu-int8", "cpu-int4"])
    with pytest.raises(UnsupportedArchitectureError, match="'BertForMaskedLM' is not supported; supported: Gemma2"):
        check_buildable("BertForMaskedLM")
