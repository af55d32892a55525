"""Chat examples as training batches: token ids with the prompt masked, padded batches, and the
data order (a pure function of seed and step, so a resumed run sees the same batches).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from slmops_builder.train.examples import Example
from slmops_builder.train.hf_models import prompt_text

if TYPE_CHECKING:
    import torch

__all__ = ["IGNORE_INDEX", "collate", "encode_example", "epoch_order"]

IGNORE_INDEX = -100


def encode_example(tokenizer: Any, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): the chat-template prompt (labels masked) then the answer and eos.
    Prompt and answer are tokenized apart, as at inference (prompt tokens, then generated ones)."""
    prompt_ids = tokenizer(prompt_text(tokenizer, example.prompt_messages), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return ids, labels


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@lru_cache(maxsize=8)
def epoch_order(n: int, epoch: int, seed: int) -> tuple[int, ...]:
    """The example indices of a run's epoch `epoch` (the run: epochs end to end, cut into batches), a
    seeded permutation: the order depends only on (seed, position), so a resumed run sees the same
    batches."""
    perm = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(perm)
    return tuple(perm)
