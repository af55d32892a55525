"""End to end on the real SmolLM2-135M-Instruct: import from the bundled GGUF, convert to
cpu-int4, package, unpack, and chat with it in plain onnxruntime-genai."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmops_builder.keys import load_public_key
from slmops_builder.packaging import unpack_package, verify_package

pytestmark = pytest.mark.smollm2


def _chat(folder: Path, question: str, max_new_tokens: int = 32) -> str:
    import onnxruntime_genai as og

    cfg = og.Config(str(folder))
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1}}}}))
    model = og.Model(cfg)
    tok = og.Tokenizer(model)
    prompt = tok.apply_chat_template(json.dumps([{"role": "user", "content": question}]), add_generation_prompt=True)
    ids = tok.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    stream = tok.create_stream()
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(stream.decode(int(gen.get_next_tokens()[0])))
    return "".join(out)


def test_smollm2_import_keeps_tokenizer_and_lineage(smollm2_hf_model: Path) -> None:
    info = json.loads((smollm2_hf_model / "slmops_source.json").read_text())
    assert info["architecture"] == "LlamaForCausalLM"
    assert 130e6 < info["num_parameters"] < 140e6
    tok_cfg = json.loads((smollm2_hf_model / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>"
    config = json.loads((smollm2_hf_model / "config.json").read_text())
    assert "quantization_config" not in config


def test_smollm2_package_answers_sensibly(
    smollm2_package: Path, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    keys = [load_public_key(signing_key[1])]
    verified = verify_package(smollm2_package, keys)
    manifest = verified.manifest
    assert manifest.profile.name == "cpu-int4"
    assert 60e6 < manifest.evaluation.size_bytes < 150e6  # int4: ~90 MB, fp32 would be ~540 MB
    assert manifest.lineage.base_model_sha256 and manifest.lineage.tool_versions["onnxruntime-genai"]
    # The builder's own greedy answer to its golden prompt is already sensible.
    assert "paris" in manifest.golden_prompts[0].reference.lower()
    folder = unpack_package(smollm2_package, tmp_path / "unpacked", keys)
    answer = _chat(folder, "What is the capital of France?")
    assert "paris" in answer.lower(), answer
    answer = _chat(folder, "List three colors.", 48)
    assert sum(c in answer.lower() for c in ("red", "blue", "green", "yellow", "purple", "orange")) >= 2, answer
