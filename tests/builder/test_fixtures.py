"""The shared fixtures in tests/conftest.py do what other components rely on."""

from __future__ import annotations

import json
from pathlib import Path

from slmops_builder.keys import load_public_key
from slmops_protos.manifests import read_package, verify_signed_manifest


def _unpack(pkg: Path, dest: Path) -> Path:
    signed, blobs = read_package(pkg)
    from slmops_protos.package.v1 import manifest_pb2

    manifest = manifest_pb2.Manifest.FromString(signed.manifest)
    for f in manifest.files:
        target = dest / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((blobs / f.sha256).read_bytes())
    return dest


def test_tiny_hf_model_loads_in_transformers(tiny_hf_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_hf_model))
    text = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model))
    assert model.config.num_hidden_layers == 2
    assert tok.eos_token == "<|im_end|>" and model.config.eos_token_id == tok.eos_token_id


def test_tiny_package_is_signed_and_generates(
    tiny_package_factory, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    import onnxruntime_genai as og

    pkg = tiny_package_factory("1.0.0")
    signed, _ = read_package(pkg)
    manifest = verify_signed_manifest(signed, [load_public_key(signing_key[1])])
    assert manifest.name == "tiny-llama" and manifest.version == "1.0.0"
    assert manifest.profile.name == "cpu-int4" and manifest.profile.quantization["block_size"] == "32"
    paths = {f.path for f in manifest.files}
    assert {"genai_config.json", "model.onnx", "tokenizer.json", "inference_model.json"} <= paths
    folder = _unpack(pkg, tmp_path / "unpacked")
    model = og.Model(og.Config(str(folder)))
    tok = og.Tokenizer(model)
    prompt = tok.apply_chat_template(json.dumps([{"role": "user", "content": "Hello"}]), add_generation_prompt=True)
    ids = tok.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 8, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    n = 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    assert n == 8


def test_versions_differing_in_search_share_blobs(tiny_package_factory, signing_key: tuple[Path, Path]) -> None:
    a = tiny_package_factory("1.0.0")
    b = tiny_package_factory("1.1.0", search={"temperature": 0.5, "do_sample": True})
    key = [load_public_key(signing_key[1])]
    ma = verify_signed_manifest(read_package(a)[0], key)
    mb = verify_signed_manifest(read_package(b)[0], key)
    fa = {f.path: f.sha256 for f in ma.files}
    fb = {f.path: f.sha256 for f in mb.files}
    assert fa.keys() == fb.keys()
    assert [p for p in fa if fa[p] != fb[p]] == ["genai_config.json"]
    search = json.loads((b / "blobs" / fb["genai_config.json"]).read_text())["search"]
    assert search["temperature"] == 0.5 and search["do_sample"] is True
