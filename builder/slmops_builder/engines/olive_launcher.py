"""The launcher of `olive run`: `python -m slmops_builder.engines.olive_launcher <olive CLI args>`.

Olive 0.13 does not run against onnxruntime-genai 0.18 as shipped, so the olive engine
(`slmops_builder.engines.olive`) runs Olive through this launcher, which makes two adjustments, each
applied only when the installed onnxruntime-genai needs it:

1. `ModelBuilder.maybe_patch_quant` becomes a no-op when `onnxruntime_genai.models.quantized_model`
   does not exist. Olive imports that module for every onnxruntime-genai >= 0.9 to patch its
   quantized format in (plus `make_packed_matmul_int4`/`make_embedding`); 0.18 has no such module
   and reads Olive's format natively (`onnxruntime_genai/models/loaders/olive.py`). Without this:
   `ModuleNotFoundError: No module named 'onnxruntime_genai.models.quantized_model'`.
2. `onnxruntime_genai.models.builder.create_model` is wrapped to run `parse_extra_options` first
   when Olive calls it without (0.18 expects the caller to have loaded the Hugging Face details
   there). Without this: `Exception: Hugging Face details not found in extra_options. Please call
   `parse_extra_options` before `create_model`.`
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from typing import Any

__all__: list[str] = []


def _adjust_for_genai() -> None:
    """Make Olive 0.13's ModelBuilder pass work with the installed onnxruntime-genai (module doc)."""
    from olive.passes.onnx.model_builder import ModelBuilder

    if importlib.util.find_spec("onnxruntime_genai.models.quantized_model") is None:
        # Such onnxruntime-genai (0.18) reads Olive's quantized format itself (models/loaders/olive.py).
        ModelBuilder.maybe_patch_quant = staticmethod(lambda: None)

    import onnxruntime_genai.models.builder as mb

    parse = getattr(mb, "parse_extra_options", None)
    if parse is None or getattr(mb.create_model, "_slmops_wrapped", False):
        return
    create = mb.create_model

    @functools.wraps(create)
    def create_model(
        model_name: Any,
        input_path: Any,
        output_dir: Any,
        precision: Any,
        execution_provider: Any,
        cache_dir: Any,
        **extra: Any,
    ) -> Any:
        if "hf_details" not in extra:
            items = [f"{k}={v}" for k, v in extra.items()]
            parsed = parse(model_name, input_path, output_dir, precision, execution_provider, cache_dir, items)
            # Values Olive passed typed (not strings) and 0.18 left as text go back to their type.
            for key, value in extra.items():
                if not isinstance(value, str) and parsed.get(key) == str(value):
                    parsed[key] = value
            extra = parsed
        return create(model_name, input_path, output_dir, precision, execution_provider, cache_dir, **extra)

    create_model._slmops_wrapped = True  # type: ignore[attr-defined]
    mb.create_model = create_model


def _launch(argv: list[str]) -> None:
    _adjust_for_genai()
    from olive.cli.launcher import main

    main(argv, called_as_console_script=False)


if __name__ == "__main__":
    _launch(sys.argv[1:])
