"""The model builder, run with the builder's config translations:
`python -m slmops_builder.engines.builder_shim <model builder args>`.

The one place where a Hugging Face config as transformers 5 writes it is translated into what the
pinned onnxruntime-genai model builder (0.18) reads. The model builder loads the config itself
(`AutoConfig.from_pretrained` in its `get_hf_details`), so this launcher hands it an `AutoConfig`
whose `from_pretrained` returns the translated config, then runs the model builder's command line
unchanged. Only the builder's view changes: the model folder and the weights it loads stay as they
are. Translations (`translate_config`):

1. Gemma 3 (`Gemma3ForCausalLM`): transformers 5 writes `rope_parameters` per layer type,
   `{"full_attention": {...}, "sliding_attention": {...}}`; the model builder reads a flat
   `rope_parameters["rope_type"]` (KeyError 'rope_type' otherwise), `rope_theta` for the global
   layers' rotary cache and `rope_local_base_freq` for the sliding layers'. The full-attention
   parameters become the flat ones, the sliding layers' base becomes `rope_local_base_freq`.
   Only the default rope type is translated for both: the model builder builds the sliding
   layers' cache with the global layers' scaling, which is wrong for a scaled (linear) global
   rope, so such a config is refused (`UntranslatableConfig`) rather than built wrong.
   `check_translatable` is that refusal alone, on a model folder's config: the builder's
   pre-check (`architectures.check_buildable`) runs it before any weights are read.

What no config translation fixes takes the architecture off the builder's list instead
(`architectures.WITHDRAWN`).
"""

from __future__ import annotations

import runpy
import sys
import warnings
from pathlib import Path
from typing import Any

__all__ = ["TRANSLATED_ARCHITECTURES", "UntranslatableConfig", "check_translatable", "translate_config"]

# The architectures whose configs `translate_config` changes (or refuses).
TRANSLATED_ARCHITECTURES = frozenset({"Gemma3ForCausalLM"})


class UntranslatableConfig(ValueError):
    """A config the model builder would misread and that no translation here fixes."""


def _gemma3_rope(config: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(full, sliding) rope parameters of a Gemma 3 config written per layer type, None for any
    other config; `UntranslatableConfig` where the model builder would build them wrong."""
    params = getattr(config, "rope_parameters", None)
    architectures = getattr(config, "architectures", None) or []
    if "Gemma3ForCausalLM" not in architectures or not isinstance(params, dict) or "full_attention" not in params:
        return None
    full, sliding = params["full_attention"], params.get("sliding_attention", {})
    kinds = {name: p.get("rope_type", "default") for name, p in (("full", full), ("sliding", sliding))}
    if set(kinds.values()) != {"default"}:
        raise UntranslatableConfig(
            f"Gemma 3 rope types {kinds}: the model builder builds only the default rope type "
            "correctly for both attention kinds"
        )
    return full, sliding


def translate_config(config: Any) -> Any:
    """`config` (a transformers config object), changed in place where the model builder misreads it."""
    rope = _gemma3_rope(config)
    if rope is not None:
        full, sliding = rope
        config.rope_parameters = dict(full)
        config.rope_theta = full["rope_theta"]
        config.rope_local_base_freq = sliding.get("rope_theta", full["rope_theta"])
    return config


def check_translatable(model_dir: Path) -> None:
    """Refuse (`UntranslatableConfig`) the config of the Hugging Face folder `model_dir` where
    `translate_config` would: the config as transformers loads it (no weights are read)."""
    from transformers import AutoConfig

    _gemma3_rope(AutoConfig.from_pretrained(str(model_dir)))


class _TranslatingAutoConfig:
    """What the model builder gets as `transformers.AutoConfig`: the real one, translated."""

    @staticmethod
    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        from transformers.models.auto.configuration_auto import AutoConfig

        return translate_config(AutoConfig.from_pretrained(*args, **kwargs))


def main() -> None:
    # Importing the model builder once first: its imports replace the `transformers` module object
    # in sys.modules, so the patch goes on the one its `from transformers import AutoConfig` reads
    # when runpy runs it as __main__ (which warns that the module is already imported: expected).
    import onnxruntime_genai.models.builder  # noqa: F401

    sys.modules["transformers"].AutoConfig = _TranslatingAutoConfig  # type: ignore[attr-defined]
    sys.argv[0] = "onnxruntime_genai.models.builder"
    warnings.filterwarnings("ignore", message=".*found in sys.modules.*", category=RuntimeWarning)
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
