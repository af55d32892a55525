"""Quantization-aware training against the weights the `cpu-int4` profile writes.

The profile (onnxruntime-genai's model builder, RTN, symmetric, block 32) quantizes each block of 32
weights along a row's input dimension to `s*q`, q in -8..7, with `s = e / -8` where `e` is the block's
weight of largest magnitude (so `e` itself is exactly `-8*s`) and `q = clamp(round(w/s), -8, 7)`.
`int4_rtn` computes the same numbers in torch (tests/builder/train/test_qat.py checks them against
onnxruntime's own quantizer bit for bit), and on weights it has already quantized it is the
identity, so a model trained and saved on that grid converts to int4 without any further loss.

`QuantAwareWeights` trains on the grid with shadow weights (a straight-through estimator): before a
forward pass the quantized weights take the float ones' place, after the backward pass the float
ones come back and take the gradient computed at the quantized ones. `snap` writes the quantized
weights for good before the model is saved. The weights are those the profile quantizes: every
`nn.Linear` of the decoder layers and the lm_head (with a tied embedding, the one table both use).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["QAT_BLOCK_SIZE", "QuantAwareWeights", "int4_rtn"]

QAT_BLOCK_SIZE = 32  # the cpu-int4 profile's block_size


def int4_rtn(weight: Any, block_size: int = QAT_BLOCK_SIZE) -> Any:
    """`weight` ([out, in]) on the symmetric int4 grid of onnxruntime's RTN, blocks along `in`."""
    import torch

    rows, cols = weight.shape
    if cols % block_size:
        raise ValueError(f"a weight of {cols} inputs does not split into blocks of {block_size}")
    blocks = weight.detach().reshape(rows, cols // block_size, block_size)
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    scale = extreme / -8.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round(blocks / scale), -8, 7)
    return (codes * scale).reshape(rows, cols).to(weight.dtype)


class QuantAwareWeights:
    """The weights of `model` the int4 profile quantizes, trained on its grid (see the module doc)."""

    def __init__(self, model: Any, block_size: int = QAT_BLOCK_SIZE) -> None:
        import torch

        self.block_size = block_size
        params: dict[int, Any] = {}
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    params[id(module.weight)] = module.weight
        head = model.get_output_embeddings()
        params[id(head.weight)] = head.weight  # tied: the embedding's table too
        self.params = list(params.values())
        for p in self.params:
            if p.shape[1] % block_size:
                raise ValueError(f"a weight of shape {tuple(p.shape)} does not split into blocks of {block_size}")

    @contextmanager
    def quantized(self) -> Iterator[None]:
        """Within: the weights are on the int4 grid; after: the float weights are back, each with the
        gradient of what ran within (the straight-through estimator)."""
        import torch

        masters = [p.detach().clone() for p in self.params]
        self.snap()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, master in zip(self.params, masters, strict=True):
                    p.copy_(master)

    def snap(self) -> None:
        """Put the weights on the int4 grid for good (before saving)."""
        import torch

        with torch.no_grad():
            for p in self.params:
                p.copy_(int4_rtn(p, self.block_size))

    def describe(self, steps: int, of: int) -> str:
        """What the training record says of it (its values are strings)."""
        return f"int4 RTN symmetric block {self.block_size} (cpu-int4), the last {steps} of {of} steps"
