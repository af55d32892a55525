"""The tests' tiny models: a 2-layer model with a trained BPE tokenizer, written as a Hugging Face
folder in seconds (the shared fixtures in tests/conftest.py and benchmarks/crash_bench.py build the
Llama; the architecture matrix builds one of each of `TINY_ARCHITECTURES`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_PROFILE = "cpu-int4"
TINY_NAME = "tiny-llama"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "Hello world. The quick brown fox jumps over the lazy dog.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "You are a helpful assistant. Answer the user's question briefly.",
    "system user assistant: one two three four five six seven eight nine ten.",
    "Small language models run on edge devices with ONNX Runtime.",
]


# Per architecture: its transformers config class and what it sets besides the shared sizes: values
# off the defaults where the architecture has a knob the converter must honour (Granite's multipliers),
# a sliding window shorter than `architectures.PROMPT` for the Gemmas (Mistral's must not be: see
# benchmarks/README.md), tied embeddings for the Gemmas as the released ones have, and 6 layers for
# Gemma 3, whose default layer pattern (what its GGUF import gets) is 5 sliding then 1 full attention.
# Soft-capping, Gemma's query scaling and Qwen 3's head size (128, as in every released Qwen 3) stay at
# their defaults: transformers does not read them from a GGUF.
TINY_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", {"head_dim": 16, "sliding_window": None}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {}),
    "Phi3ForCausalLM": ("Phi3Config", {"original_max_position_embeddings": None}),
    "GemmaForCausalLM": ("GemmaConfig", {"head_dim": 16, "tie_word_embeddings": True}),
    "Gemma2ForCausalLM": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8, "tie_word_embeddings": True}),
    "Gemma3ForCausalLM": (
        "Gemma3TextConfig",
        {"head_dim": 16, "sliding_window": 8, "tie_word_embeddings": True, "num_hidden_layers": 6},
    ),
    "GraniteForCausalLM": (
        "GraniteConfig",
        {"embedding_multiplier": 4.0, "logits_scaling": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.125},
    ),
    "OlmoForCausalLM": ("OlmoConfig", {}),
}


def make_tiny_hf_model(out: Path, *, seed: int = 0, context: int = 256, architecture: str = "LlamaForCausalLM") -> Path:
    """Write a tiny model of `architecture` (one of `TINY_ARCHITECTURES`; 2 layers, hidden 64,
    4 heads, 2 kv heads, `context` positions) and a trained BPE tokenizer."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in specials}
    tok_cfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    special_map = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    torch.manual_seed(seed)
    config_class, extra = TINY_ARCHITECTURES[architecture]
    extra = {k: context if k == "original_max_position_embeddings" else v for k, v in extra.items()}
    shared = {
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": context,
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|im_end|>"],
        "tie_word_embeddings": False,
    }
    config = getattr(transformers, config_class)(**(shared | extra))
    config.architectures = [architecture]
    model = getattr(transformers, architecture)(config)
    # Random weights would mostly pick single-byte tokens, whose sequences are not valid UTF-8.
    # Zero their output rows (and the specials'): their logit is then 0 while some merged word
    # scores above it, so greedy output is a readable (if senseless) run of corpus words that
    # never hits eos early.
    with torch.no_grad():
        for token, index in tok.get_vocab().items():
            if len(token) == 1 or token in specials:
                model.lm_head.weight[index] = 0.0
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(str(out))
    return out
