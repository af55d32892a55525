"""A GGUF of a tiny Hugging Face model (`tiny_model.make_tiny_hf_model`), written with the `gguf`
library the way llama.cpp's convert_hf_to_gguf writes one, so transformers' GGUF loader (what
`slmops builder import` uses) reads it back: float32 tensors under llama.cpp's names
(`gguf.get_tensor_name_map`), the hyperparameters its loader maps to a config, and the byte-level
BPE tokenizer as `tokenizer.ggml.*` (model "gpt2": tokens, types, merges, special ids).

What llama.cpp changes in the tensors and transformers undoes on load is done here too: Llama's
q/k rows permuted for its rotary layout (Mistral is written as llama.cpp writes it: architecture
"llama", so it imports as LlamaForCausalLM), and the Gemmas' norm weights stored as 1 + w.
`GGUF_WRITABLE` lists the architectures (transformers class -> GGUF architecture) this writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["GGUF_WRITABLE", "write_tiny_gguf"]

GGUF_WRITABLE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
}
_GEMMAS = ("gemma2", "gemma3")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(hf: Path, out: Path) -> Path:
    """Write the model in the HF folder `hf` (one of `GGUF_WRITABLE`) as the float32 GGUF `out`."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((hf / "config.json").read_text())
    architecture = config["architectures"][0]
    arch = GGUF_WRITABLE[architecture]
    layers, heads, kv = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(f"tiny-{architecture.removesuffix('ForCausalLM').lower()}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("full_attention", rope).get("rope_theta", 10000.0)))
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch in _GEMMAS:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config["sliding_window"])
    _add_tokenizer(writer, hf, config)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    for name, w in load_file(str(hf / "model.safetensors")).items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        base, _, suffix = name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {name} in {arch}")
        w = w.astype(np.float32)
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            w = _permute(w, heads if base.endswith("q_proj") else kv)
        if arch in _GEMMAS and base.endswith("norm"):
            w = w + 1.0
        writer.add_tensor(f"{gguf_name}.{suffix}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_tokenizer(writer: object, hf: Path, config: dict[str, object]) -> None:
    import gguf

    assert isinstance(writer, gguf.GGUFWriter)
    tok = json.loads((hf / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    specials = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = {**vocab, **specials}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    writer.add_token_types([control if t in specials else normal for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(int(config["bos_token_id"]))  # type: ignore[call-overload]
    writer.add_eos_token_id(int(config["eos_token_id"]))  # type: ignore[call-overload]
    writer.add_pad_token_id(int(config["pad_token_id"]))  # type: ignore[call-overload]
    tok_cfg = json.loads((hf / "tokenizer_config.json").read_text())
    if tok_cfg.get("chat_template"):
        writer.add_chat_template(tok_cfg["chat_template"])
