"""Hugging Face models and tokenizers for training: float32 (Trainer places them), or 4-bit NF4 on CUDA (QLoRA).

Every heavy import (torch, transformers, peft) happens inside the functions.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["QLoRAUnavailable", "check_qlora", "load_causal_lm", "load_tokenizer", "prompt_text"]


class QLoRAUnavailable(RuntimeError):
    """QLoRA was asked for but CUDA or bitsandbytes is missing."""


def check_qlora() -> None:
    """Raise QLoRAUnavailable naming what is missing."""
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
        raise QLoRAUnavailable("QLoRA needs " + " and ".join(missing) + "; use plain LoRA (drop --qlora)")


def load_causal_lm(path: Path, *, qlora: bool = False) -> Any:
    """An HF causal LM in float32 (CPU), or 4-bit NF4 on CUDA for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    if not qlora:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    check_qlora()
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    # each process of a distributed run on its own GPU (LOCAL_RANK: torchrun, accelerate launch)
    gpu = int(os.environ.get("LOCAL_RANK", "0"))
    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=quant, device_map={"": gpu})
    return prepare_model_for_kbit_training(model)


def load_tokenizer(path: Path, chat_template: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if chat_template:
        tok.chat_template = chat_template
    if not tok.chat_template:
        raise ValueError(f"the tokenizer in {path} has no chat template; give one (--chat-template FILE)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def prompt_text(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))
