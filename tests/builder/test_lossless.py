"""Lossless GGUF import: a tiny GGUF written here with the `gguf` package (Q4_1 and Q4_0 projections,
a Q8_0 lm_head), converted by the cpu-int4-gguf profiles; its ONNX weights must equal the GGUF's and its
logits the dequantized float32 model's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from slmops_builder.convert import convert
from slmops_builder.engines import ConversionError
from slmops_builder.lossless import BlockWeights, LosslessImportError, check_gguf, read_block_weights
from slmops_builder.profiles import get_profile
from slmops_protos.manifests import sha256_file

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_from(hf: Path, out_dir: Path, layer_types: tuple[Q, ...], head_type: Q) -> tuple[Path, Path]:
    """Quantize the HF folder's weights into a GGUF (layer i in layer_types[i]) and write the float32
    folder that is its dequantization (what the importer makes of it), with slmops_source.json."""
    from safetensors.numpy import load_file, save_file

    config = json.loads((hf / "config.json").read_text())
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    weights = load_file(str(hf / "model.safetensors"))
    path = out_dir / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    deq: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, qtype: Q, n_head: int | None = None) -> None:
        w = weights[hf_name].astype(np.float32)
        if n_head is not None:
            w = _permute(w, n_head)
        if qtype == Q.F32:
            writer.add_tensor(gguf_name, w)
            back = w
        else:
            raw = gguf.quants.quantize(w, qtype)
            writer.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=qtype)
            back = gguf.quants.dequantize(raw, qtype).reshape(w.shape)
        if n_head is not None:  # undo the permutation as transformers does
            back = back.reshape(n_head, back.shape[0] // n_head // 2, 2, -1).swapaxes(2, 1).reshape(back.shape)
        deq[hf_name] = back.astype(np.float32)

    add("token_embd.weight", "model.embed_tokens.weight", Q.F32)
    add("output.weight", "lm_head.weight", head_type)
    for i, qtype in enumerate(layer_types):
        for hf_part, gg in _GGUF_NAMES.items():
            n_head = heads if gg == "attn_q" else kv if gg == "attn_k" else None
            add(f"blk.{i}.{gg}.weight", f"model.layers.{i}.{hf_part}.weight", qtype, n_head)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    folder = out_dir / "hf"
    shutil.copytree(hf, folder)
    save_file({**weights, **deq}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    info = {"source": str(path), "source_path": str(path), "source_sha256": sha256_file(path)}
    (folder / "slmops_source.json").write_text(json.dumps(info))
    return path, folder


@pytest.fixture(scope="module")
def tiny_gguf(tiny_hf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _gguf_from(tiny_hf_model, tmp_path_factory.mktemp("tiny-gguf"), (Q.Q4_1, Q.Q4_0), Q.Q8_0)


def _logits(folder: Path, ids: list[int]) -> np.ndarray:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids))
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    return np.asarray(gen.get_output("logits"))[0].copy()


def _onnx_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every MatMulNBits of the model, dequantized: scales*(codes - zero points) + minima term."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        n, k, bits = a["N"], a["K"], a["bits"]
        b = inits[node.input[1]].reshape(n, k // 32, -1)
        codes = b if bits == 8 else np.stack([b & 15, b >> 4], axis=-1).reshape(n, k // 32, 32)
        zp = inits[node.input[3]]
        zp = zp.reshape(n, k // 32) if bits == 8 else np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, : k // 32]
        w = inits[node.input[2]][..., None] * (codes.astype(np.float32) - zp[..., None].astype(np.float32))
        minima = inits.get(node.input[1] + "_minima")
        if minima is not None:
            w = w + minima.T[..., None]
        out[node.name] = w.reshape(n, k)
    return out


def test_block_decoding_matches_gguf() -> None:
    """Codes, scales and minima decoded from llama.cpp blocks dequantize exactly as gguf does."""
    from slmops_builder.lossless import _decode

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 96)).astype(np.float32)
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        raw = gguf.quants.quantize(w, qtype)
        block = _decode(qtype.name, raw, 8, 96)
        assert isinstance(block, BlockWeights) and block.bits == (8 if qtype == Q.Q8_0 else 4)
        assert np.array_equal(block.dequantize(), gguf.quants.dequantize(raw, qtype).reshape(8, 96)), qtype.name


def test_lossless_weights_and_logits(tiny_gguf: tuple[Path, Path], tmp_path: Path) -> None:
    path, folder = tiny_gguf
    config = json.loads((folder / "config.json").read_text())
    types = check_gguf(path)
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["blk.1.ffn_down.weight"] == "Q4_0"
    cache = tmp_path / "cache"
    exact = convert(folder, get_profile("cpu-int4-gguf-exact"), cache_dir=cache, threads=1)
    record = json.loads((exact.path / "slmops_step.json").read_text())
    assert (record["engine"], record["quantization_method"]) == ("slmops-gguf-lossless", "lossless-gguf")
    assert "lossless import of" in (exact.path / "slmops_convert.log").read_text()

    # Every quantized weight of the graph is the GGUF's value, bit for bit.
    blocks = read_block_weights(path, config)
    onnx_w = _onnx_weights(exact.path)
    # qkv, o, gate_up, down per layer; the 8-bit lm_head as two exact 4-bit halves (float32 compute).
    assert len(onnx_w) == 2 * 4 + 2
    for i in range(2):
        want = {
            "qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
            "o_proj": ("self_attn", ("o_proj",)),
            "gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
            "down_proj": ("mlp", ("down_proj",)),
        }
        for node, (part, projs) in want.items():
            ref = np.concatenate([blocks[f"model.layers.{i}.{part}.{p}.weight"].dequantize() for p in projs])
            got = onnx_w[f"/model/layers.{i}/{'attn' if part == 'self_attn' else 'mlp'}/{node}/MatMul_Q4"]
            assert np.array_equal(got, ref), (i, node)
    head = onnx_w["/lm_head/MatMul_Q4"] + onnx_w["/lm_head/MatMul_Q4_lo"]
    assert np.array_equal(head, blocks["lm_head.weight"].dequantize())

    # Logits equal the dequantized float32 model's (float32 compute), here transformers' forward pass.
    import torch
    from transformers import AutoModelForCausalLM

    ids = list(range(3, 40))
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        ref_logits = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(_logits(exact.path, ids) - ref_logits).max() < 1e-3 * max(1.0, np.abs(ref_logits).max())
    # The fast profile: the same weights (an 8-bit lm_head), int8 activations; its logits stay close.
    fast = convert(folder, get_profile("cpu-int4-gguf"), cache_dir=cache, threads=1)
    fast_w = _onnx_weights(fast.path)
    assert np.array_equal(fast_w["/lm_head/MatMul_Q4"], head) and len(fast_w) == 2 * 4 + 1
    fast_err = np.abs(_logits(fast.path, ids) - ref_logits).mean()
    assert fast_err < 0.02 * np.abs(ref_logits).mean()
    # The mixed profile: the same weights again; down_proj alone computes in float32.
    mixed = convert(folder, get_profile("cpu-int4-gguf-mixed"), cache_dir=cache, threads=1)
    levels = _accuracy_levels(mixed.path)
    assert {n: lvl for n, lvl in levels.items() if lvl != 4} == {
        f"/model/layers.{i}/mlp/down_proj/MatMul_Q4": 1 for i in range(2)
    }
    assert all(np.array_equal(w, fast_w[n]) for n, w in _onnx_weights(mixed.path).items())
    assert '"float_compute": 2' in (mixed.path / "slmops_convert.log").read_text()
    assert np.abs(_logits(mixed.path, ids) - ref_logits).mean() < 0.02 * np.abs(ref_logits).mean()


def _accuracy_levels(folder: Path) -> dict[str, int]:
    import onnx
    from onnx import helper

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {
        n.name: next(helper.get_attribute_value(a) for a in n.attribute if a.name == "accuracy_level")
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    }


def test_gguf_without_4bit_blocks_is_refused(tiny_hf_model: Path, tmp_path: Path) -> None:
    path, folder = _gguf_from(tiny_hf_model, tmp_path, (Q.Q8_0, Q.Q4_1), Q.Q8_0)
    with pytest.raises(LosslessImportError, match=r"blk\.0\.attn_q\.weight \(Q8_0\)"):
        check_gguf(path)
    cache = tmp_path / "cache"
    with pytest.raises(ConversionError, match=r"cannot be imported losslessly.*Q4_0 or Q4_1"):
        convert(folder, get_profile("cpu-int4-gguf"), cache_dir=cache, threads=1)
    assert not (cache / "convert").exists() or not any((cache / "convert").iterdir())


def test_lossless_needs_a_gguf_source(tiny_hf_model: Path, tiny_gguf: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="needs a model imported from a GGUF"):
        convert(tiny_hf_model, get_profile("cpu-int4-gguf"), cache_dir=tmp_path / "c")
    # A GGUF changed after the import is refused, before any conversion.
    path, folder = tiny_gguf
    moved = tmp_path / "hf"
    shutil.copytree(folder, moved)
    copy = tmp_path / "changed.gguf"
    copy.write_bytes(path.read_bytes() + b"\0")
    info = json.loads((moved / "slmops_source.json").read_text())
    (moved / "slmops_source.json").write_text(json.dumps({**info, "source_path": str(copy)}))
    with pytest.raises(ConversionError, match="changed since"):
        convert(moved, get_profile("cpu-int4-gguf"), cache_dir=tmp_path / "c")


def test_folder_from_another_gguf_is_refused(tiny_hf_model: Path, tiny_gguf: tuple[Path, Path], tmp_path: Path) -> None:
    """The GGUF must be the one the folder's weights came from: a mismatch is an error, not a model."""
    from slmops_builder.lossless import rewrite

    path, _ = tiny_gguf
    with pytest.raises(LosslessImportError, match="differ from the model folder"):
        rewrite(tmp_path, path, tiny_hf_model)  # the original float weights, not the GGUF's


@pytest.mark.smollm2
def test_smollm2_lossless_package_generates(
    smollm2_hf_model: Path, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    """The real SmolLM2 GGUF (Q4_1 layers, Q8_0 embedding) as a signed cpu-int4-gguf-exact package that
    loads and answers as the float32 model does; the conversion is cached in .cache/builder."""
    import onnx
    import onnxruntime_genai as og

    from slmops_builder.build import build_package
    from slmops_builder.keys import load_public_key
    from slmops_builder.packaging import unpack_package, verify_package

    cache = Path(__file__).resolve().parents[2] / ".cache" / "builder"
    out = tmp_path / "pkg"
    build_package(
        smollm2_hf_model, "cpu-int4-gguf-exact", "smollm2-135m", "1.0.0", signing_key[0], out, cache_dir=cache
    )
    keys = [load_public_key(signing_key[1])]
    manifest = verify_package(out, keys).manifest
    assert manifest.profile.name == "cpu-int4-gguf-exact" and manifest.evaluation.size_bytes < 0.3 * 538e6
    folder = unpack_package(out, tmp_path / "unpacked", keys)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    heads = [n for n in graph.node if n.name == "/lm_head/MatMul_Q4"]
    assert heads and [a.i for a in heads[0].attribute if a.name == "bits"] == [4]  # the Q8_0 head's high half
    assert sum(1 for i in graph.initializer if i.name.endswith("_minima")) == 30 * 4  # Q4_1 minima per matmul

    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    chat = json.dumps([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 24)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    answer = tok.decode(gen.get_sequence(0)[len(ids) :])
    assert answer.strip() == "The capital of France is Paris.", answer  # the float32 model's greedy answer
