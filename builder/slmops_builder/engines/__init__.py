"""Conversion engines, registered by the profile `engine` name they build (see `base.ConversionEngine`).

- `onnxruntime-genai`     onnxruntime-genai's model builder (`model_builder`)
- `slmops-gguf-lossless`  the model builder's int4 graph carrying a GGUF's own 4-bit blocks (`gguf_lossless`)
- `olive`                 `olive run`: its ModelBuilder pass (RTN) or Gptq then ModelBuilder (`olive`)

A new engine is one module with a `ConversionEngine` and one line in `CONVERSION_ENGINES`. Importing
this package is cheap: the engines load their tools inside `run`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from slmops_builder.engines.base import CONVERT_LOG, ConversionEngine, ConversionError
from slmops_builder.engines.gguf_lossless import GGUF_LOSSLESS
from slmops_builder.engines.model_builder import MODEL_BUILDER
from slmops_builder.engines.olive import OLIVE

__all__ = ["CONVERSION_ENGINES", "CONVERT_LOG", "ConversionEngine", "ConversionError", "get_engine"]

# engine name -> engine, in the order profiles list them.
CONVERSION_ENGINES: Mapping[str, ConversionEngine] = MappingProxyType(
    {engine.name: engine for engine in (MODEL_BUILDER, GGUF_LOSSLESS, OLIVE)}
)


def get_engine(name: str) -> ConversionEngine:
    """The engine registered under `name`; ValueError naming the known ones."""
    try:
        return CONVERSION_ENGINES[name]
    except KeyError:
        raise ValueError(f"engine {name!r} not in {tuple(CONVERSION_ENGINES)}") from None
