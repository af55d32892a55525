"""Several LoRA adapters on one onnxruntime-genai base: per-request switching, PEFT parity (fp32 and
int4 with dequantized training weights), export checks, and signed adapter packages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from peft import PeftModel
from typer.testing import CliRunner

from slmops_builder.cli import app
from slmops_builder.train.adapters import (
    AdapterBase,
    AdapterExportError,
    build_adapter_base,
    dequantize_base,
    export_adapter,
    package_adapter,
    package_adapter_base,
)
from slmops_builder.train.generation import OrtGenerator, generate_hf
from slmops_builder.train.hf_models import load_causal_lm, load_tokenizer, prompt_text
from slmops_builder.train.runs import LoraSettings
from slmops_builder.train.tasks import generate_splits


@pytest.fixture(scope="module")
def fp32_base(
    trainable_tiny: Path, lora_settings: LoraSettings, builder_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AdapterBase:
    out = tmp_path_factory.mktemp("lora-base-fp32") / "base"
    return build_adapter_base(
        trainable_tiny, lora_settings, out, precision="fp32", cache_dir=builder_cache_dir, threads=1
    )


@pytest.fixture(scope="module")
def int4_base(
    trainable_tiny: Path, lora_settings: LoraSettings, builder_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AdapterBase:
    out = tmp_path_factory.mktemp("lora-base-int4") / "base"
    return build_adapter_base(
        trainable_tiny, lora_settings, out, precision="int4", cache_dir=builder_cache_dir, threads=1
    )


def _prompt_ids(model_dir: Path, text: str) -> list[int]:
    tok = load_tokenizer(model_dir)
    msgs = [{"role": "user", "content": text}]
    return list(tok(prompt_text(tok, msgs), add_special_tokens=False)["input_ids"])


def _ort_logits(base: Path, ids: list[int], adapter: Path | None) -> np.ndarray:
    import onnxruntime_genai as og

    model = og.Model(str(base))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 2)
    gen = og.Generator(model, params)
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter), "x")
        gen.set_active_adapter(adapters, "x")
    gen.append_tokens(ids)
    return np.asarray(gen.get_logits())[0, -1]


def _hf_logits(model_dir: Path, ids: list[int], adapter_dir: Path | None) -> np.ndarray:
    import torch
    from peft import PeftModel

    model: Any = load_causal_lm(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def test_adapters_switch_per_request_and_match_peft(
    fp32_base: AdapterBase,
    fixed_adapters: dict[str, Any],
    lora_settings: LoraSettings,
    trainable_tiny: Path,
    tmp_path: Path,
) -> None:
    files = {}
    for name, run in fixed_adapters.items():
        info = export_adapter(run.adapter_dir, fp32_base, tmp_path / f"{name}.onnx_adapter")
        assert (
            info["parameters"] == len(fp32_base.inputs) == 2 * 2 * len(lora_settings.target_modules)
            and info["rank"] == 4
        )
        files[name] = tmp_path / f"{name}.onnx_adapter"
    gen = OrtGenerator(fp32_base.path, adapters=files)
    prompts = [e.prompt_messages for e in generate_splits(0, 0, 2, seed=9).test]
    outputs = {}
    for adapter in ("paris", None, "hello", "paris", "hello"):
        texts = gen.generate(prompts, adapter=adapter, max_new_tokens=8).texts
        if adapter in outputs:
            assert texts == outputs[adapter]  # switching back gives the same answers
        outputs[adapter] = texts
    # each adapter changes the answers, differently, and each matches PEFT's greedy answer
    assert len({tuple(t) for t in outputs.values()}) == 3
    tok = load_tokenizer(trainable_tiny)
    for name, run in fixed_adapters.items():
        peft_model = PeftModel.from_pretrained(load_causal_lm(trainable_tiny), str(run.adapter_dir))
        assert generate_hf(peft_model, tok, prompts, max_new_tokens=8).texts == outputs[name], name

    ids = _prompt_ids(trainable_tiny, "dim the kitchen lights to 30% in ten minutes")
    for name, run in fixed_adapters.items():
        ours, peft = _ort_logits(fp32_base.path, ids, files[name]), _hf_logits(trainable_tiny, ids, run.adapter_dir)
        assert np.abs(ours - peft).max() < 1e-4, name
    plain = _ort_logits(fp32_base.path, ids, None)
    assert np.abs(plain - _hf_logits(trainable_tiny, ids, None)).max() < 1e-4  # zero defaults: the plain base


def test_int4_base_keeps_lora_in_float_and_matches_peft_on_dequantized_weights(
    int4_base: AdapterBase,
    fixed_adapters: dict[str, Any],
    lora_settings: LoraSettings,
    trainable_tiny: Path,
    tmp_path: Path,
) -> None:
    graph = onnx.load(str(int4_base.path / "model.onnx"), load_external_data=False).graph
    lora_nodes = [n for n in graph.node if "/lora_" in n.name]
    assert len(lora_nodes) == 2 * 2 * len(lora_settings.target_modules) and {n.op_type for n in lora_nodes} == {
        "MatMul"
    }
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(
        onnx.helper.get_attribute_value(a) == 1 for n in nbits for a in n.attribute if a.name == "accuracy_level"
    )
    rank_dims = [d.dim_param for i in graph.input if ".lora_" in i.name for d in i.type.tensor_type.shape.dim]
    assert rank_dims.count("lora_rank") == len(lora_nodes)

    deq = dequantize_base(trainable_tiny, int4_base.path, tmp_path / "deq")
    ids = _prompt_ids(trainable_tiny, "turn off the hallway fan in half an hour")
    assert np.abs(_ort_logits(int4_base.path, ids, None) - _hf_logits(deq, ids, None)).max() < 1e-4
    fp32 = _hf_logits(trainable_tiny, ids, None)
    assert np.abs(_hf_logits(deq, ids, None) - fp32).max() > 1e-3  # the int4 weights really differ
    run = fixed_adapters["hello"]
    adapter = tmp_path / "hello.onnx_adapter"
    export_adapter(run.adapter_dir, int4_base, adapter)
    assert np.abs(_ort_logits(int4_base.path, ids, adapter) - _hf_logits(deq, ids, run.adapter_dir)).max() < 1e-4


def test_a_tied_int4_base_dequantizes_to_a_tied_copy(
    trainable_tiny: Path, lora_settings: LoraSettings, builder_cache_dir: Path, tmp_path: Path
) -> None:
    """A tied model's int4 graph looks its embeddings up in lm_head's int4 table: the copy keeps one
    table, dequantized, for both, and so computes the int4 base's logits (with float embeddings and an
    int4 lm_head it was off by ~0.04 on this model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(trainable_tiny))
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    tied = tmp_path / "tied"
    model.save_pretrained(str(tied))
    AutoTokenizer.from_pretrained(str(trainable_tiny)).save_pretrained(str(tied))
    base = build_adapter_base(tied, lora_settings, tmp_path / "base", precision="int4", cache_dir=builder_cache_dir)
    ops = {n.op_type for n in onnx.load(str(base.path / "model.onnx"), load_external_data=False).graph.node}
    assert "GatherBlockQuantized" in ops  # the shared int4 table this test is about

    deq = dequantize_base(tied, base.path, tmp_path / "deq")
    assert json.loads((deq / "config.json").read_text())["tie_word_embeddings"] is True
    copy = load_causal_lm(deq)
    assert copy.lm_head.weight.data_ptr() == copy.model.embed_tokens.weight.data_ptr()
    ids = _prompt_ids(tied, "turn off the hallway fan in half an hour")
    assert np.abs(_ort_logits(base.path, ids, None) - _hf_logits(deq, ids, None)).max() < 1e-4
    assert np.abs(_hf_logits(deq, ids, None) - _hf_logits(tied, ids, None)).max() > 1e-3


def test_export_checks_the_adapter_against_the_base(
    fp32_base: AdapterBase, trainable_tiny: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    # another rank on the same base: allowed (the rank dimension is symbolic) and still exact
    model = get_peft_model(load_causal_lm(trainable_tiny), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj",
                           "v_proj"], init_lora_weights=False))  # fmt: skip
    model.save_pretrained(str(tmp_path / "r2"))
    export_adapter(tmp_path / "r2", fp32_base.path, tmp_path / "r2.onnx_adapter")
    ids = _prompt_ids(trainable_tiny, "lock the front door")
    ours = _ort_logits(fp32_base.path, ids, tmp_path / "r2.onnx_adapter")
    assert np.abs(ours - _hf_logits(trainable_tiny, ids, tmp_path / "r2")).max() < 1e-4
    assert np.abs(ours - _hf_logits(trainable_tiny, ids, None)).max() > 1e-3

    bad = get_peft_model(load_causal_lm(trainable_tiny), LoraConfig(r=2, target_modules=["lm_head"]))
    bad.save_pretrained(str(tmp_path / "head"))
    with pytest.raises(AdapterExportError, match="unexpected tensor"):
        export_adapter(tmp_path / "head", fp32_base, tmp_path / "head.onnx_adapter")
    with pytest.raises(AdapterExportError, match="not a PEFT adapter"):
        export_adapter(tmp_path, fp32_base, tmp_path / "x.onnx_adapter")
    with pytest.raises(AdapterExportError, match="not an adapter-ready base"):
        export_adapter(tmp_path / "r2", trainable_tiny, tmp_path / "x.onnx_adapter")


def test_adapter_packages_are_small_signed_and_bound_to_their_base(
    fp32_base: AdapterBase,
    fixed_adapters: dict[str, Any],
    lora_settings: LoraSettings,
    signing_key: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    from slmops_builder.keys import load_public_key
    from slmops_builder.packaging import verify_package

    key, pub = signing_key
    base_pkg = package_adapter_base(fp32_base, name="tiny-lora-base", version="1.0.0", key=key, out=tmp_path / "base")
    assert base_pkg.manifest.kind == "model" and base_pkg.manifest.profile.name == "cpu-fp32"
    assert base_pkg.manifest.profile.quantization["lora_targets"] == ",".join(lora_settings.target_modules)
    run = fixed_adapters["hello"]
    args = ["adapter-export", "-a", str(run.adapter_dir), "-b", str(fp32_base.path)]
    args += ["-o", str(tmp_path / "hello.onnx_adapter"), "--package", str(tmp_path / "hello-pkg")]
    args += ["--base-package", str(base_pkg.path), "--key", str(key), "--version", "0.1.0", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["package"]["base_package_id"] == base_pkg.package_id
    verified = verify_package(tmp_path / "hello-pkg", [load_public_key(pub)])
    m = verified.manifest
    assert m.kind == "adapter" and m.name == "hello" and m.lineage.parent_package_id == base_pkg.package_id
    assert [(a.name, a.base_package_id, a.path) for a in m.adapters] == [
        ("hello", base_pkg.package_id, "hello.onnx_adapter")
    ]
    assert [f.path for f in m.files] == ["hello.onnx_adapter"] and len(m.lineage.dataset_sha256) == 1
    assert m.evaluation.size_bytes < 0.2 * base_pkg.manifest.evaluation.size_bytes
    with pytest.raises(ValueError, match="not a model"):
        package_adapter(tmp_path / "hello.onnx_adapter", adapter_name="x", name="x", version="1.0.0",
                        base_package=tmp_path / "hello-pkg", key=key, out=tmp_path / "x")  # fmt: skip
