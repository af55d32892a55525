"""The model builder's config translations (engines/builder_shim.py) on real transformers configs;
tests/builder/test_architectures.py builds and checks the Gemma 3 they make buildable."""

from __future__ import annotations

import pytest

from slmops_builder.engines.builder_shim import UntranslatableConfig, translate_config


def _gemma3(**kwargs: object):  # type: ignore[no-untyped-def]
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(num_hidden_layers=6, **kwargs)
    config.architectures = ["Gemma3ForCausalLM"]
    return config


def test_gemma3_rope_per_layer_type_becomes_what_the_model_builder_reads() -> None:
    config = _gemma3()
    assert set(config.rope_parameters) == {"full_attention", "sliding_attention"}  # as transformers 5 writes it
    assert translate_config(config) is config
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1_000_000.0}
    assert (config.rope_theta, config.rope_local_base_freq) == (1_000_000.0, 10_000.0)
    assert translate_config(config).rope_parameters == {"rope_type": "default", "rope_theta": 1_000_000.0}


def test_scaled_gemma3_rope_is_refused_not_built_wrong() -> None:
    rope = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }
    with pytest.raises(UntranslatableConfig, match="'full': 'linear'"):
        translate_config(_gemma3(rope_parameters=rope))


def test_other_configs_are_left_alone() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig()
    config.architectures = ["LlamaForCausalLM"]
    before = config.to_dict()
    assert translate_config(config).to_dict() == before
