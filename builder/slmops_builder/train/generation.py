"""Greedy generation for the task, two ways: a Hugging Face model in torch (batched, left-padded) and
an onnxruntime-genai folder, optionally with a named LoRA adapter active per request."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops_builder.train.actions import Score, score
from slmops_builder.train.examples import Example

__all__ = ["Generations", "OrtGenerator", "evaluate_examples", "generate_hf"]


@dataclass(frozen=True)
class Generations:
    texts: list[str]
    seconds: float
    new_tokens: int
    token_logprobs: list[float]  # mean log-probability of each output's tokens (HF only; else empty)

    @property
    def seconds_per_response(self) -> float:
        return self.seconds / max(len(self.texts), 1)


def generate_hf(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> Generations:
    """Greedy outputs of `model` for chat `prompts`, in order, with each output's mean token logprob."""
    import torch

    from slmops_builder.train.hf_models import prompt_text

    tokenizer.padding_side = "left"
    texts: list[str] = []
    logprobs: list[float] = []
    new_tokens = 0
    model.eval()
    t0 = time.perf_counter()
    eos = tokenizer.eos_token_id
    for i in range(0, len(prompts), batch_size):
        chunk = [prompt_text(tokenizer, p) for p in prompts[i : i + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
                output_scores=True,
                return_dict_in_generate=True,
            )
        gen = out.sequences[:, enc["input_ids"].shape[1] :]
        steps = torch.stack(out.scores, dim=1).log_softmax(-1)  # [batch, steps, vocab]
        chosen = steps.gather(-1, gen[:, : steps.shape[1]].unsqueeze(-1)).squeeze(-1)
        for row in range(gen.shape[0]):
            ids = gen[row].tolist()
            n = ids.index(eos) + 1 if eos in ids else len(ids)
            new_tokens += n
            texts.append(tokenizer.decode(ids[:n], skip_special_tokens=True).strip())
            logprobs.append(float(chosen[row, :n].mean()) if n else 0.0)
    return Generations(texts, time.perf_counter() - t0, new_tokens, logprobs)


class OrtGenerator:
    """An onnxruntime-genai model with named adapters; `generate(prompts, adapter=name)`."""

    def __init__(self, model_dir: Path, *, adapters: Mapping[str, Path] | None = None, threads: int = 1) -> None:
        import onnxruntime_genai as og

        cfg = og.Config(str(model_dir))
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self._og = og
        self.model = og.Model(cfg)
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters = og.Adapters(self.model) if adapters else None
        for name, path in (adapters or {}).items():
            assert self.adapters is not None
            self.adapters.load(str(path), name)

    def generate(
        self, prompts: Sequence[Sequence[dict[str, str]]], *, adapter: str | None = None, max_new_tokens: int = 64
    ) -> Generations:
        og = self._og
        texts: list[str] = []
        new_tokens = 0
        t0 = time.perf_counter()
        for messages in prompts:
            prompt = self.tokenizer.apply_chat_template(json.dumps(list(messages)), add_generation_prompt=True)
            ids = self.tokenizer.encode(prompt)
            params = og.GeneratorParams(self.model)
            params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens, temperature=1.0)
            gen = og.Generator(self.model, params)
            if adapter is not None:
                if self.adapters is None:
                    raise ValueError(f"no adapters loaded; cannot activate {adapter!r}")
                gen.set_active_adapter(self.adapters, adapter)
            gen.append_tokens(ids)
            out: list[int] = []
            while not gen.is_done():
                gen.generate_next_token()
                out.append(int(gen.get_next_tokens()[0]))
            new_tokens += len(out)
            texts.append(self.tokenizer.decode(out).strip())
        return Generations(texts, time.perf_counter() - t0, new_tokens, [])


def evaluate_examples(texts: Sequence[str], examples: Sequence[Example]) -> Score:
    return score(list(texts), [ex.output for ex in examples])
