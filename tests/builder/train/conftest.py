"""Fixtures for the training tests: a trainable tiny model and two adapters trained on different answers.

- `trainable_tiny`   the session's tiny Llama with a freshly initialised lm_head (the shared fixture
                     zeroes the rows of single-byte and special tokens so that random weights print
                     words; such a model can never learn to write "{" or stop).
- `lora_settings`    their LoRA settings.
- `fixed_adapters`   {"paris": run, "hello": run}: short LoRA runs (finetune results) that teach the model
                     to answer every command with "The capital of France is Paris." / "Hello world."
                     (15 steps: enough to change the answers, not to learn them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

FIXED_ANSWERS = {"paris": "The capital of France is Paris.", "hello": "Hello world."}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def lora_settings() -> object:
    """The LoRA settings of `fixed_adapters` (rank 4, attention and MLP)."""
    from slmops_builder.train.runs import LoraSettings

    return LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=LORA_TARGETS)


@pytest.fixture(scope="session")
def trainable_tiny(tiny_hf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("trainable-tiny") / "model"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model))
    torch.manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.02)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_hf_model)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def fixed_adapters(
    trainable_tiny: Path, lora_settings: object, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    from slmops_builder.train.examples import Example
    from slmops_builder.train.finetune import finetune
    from slmops_builder.train.runs import FinetuneConfig, LoraSettings
    from slmops_builder.train.tasks import generate_splits

    inputs = [e.input for e in generate_splits(16, 0, 0, seed=3).train]
    assert isinstance(lora_settings, LoraSettings)
    lora = lora_settings
    runs: dict[str, object] = {}
    for name, answer in FIXED_ANSWERS.items():
        data = [Example.from_pair(text, answer) for text in inputs]
        cfg = FinetuneConfig(lora=lora, max_steps=15, learning_rate=3e-2, threads=1, save_every=100)
        runs[name] = finetune(trainable_tiny, data, tmp_path_factory.mktemp(f"lora-{name}") / "run", cfg)
    return runs
