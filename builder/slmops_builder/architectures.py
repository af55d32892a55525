"""The model architectures the builder takes, and what each is proven to build: the one table the
importer and the convert step read (tests/builder/test_architectures.py proves every cell of it).

Each architecture lists the GGUF `general.architecture` transformers loads it from (None where
transformers has no GGUF loader for it) and the conversion engines that build it: every listed
architecture builds with onnxruntime-genai's model builder (the `onnxruntime-genai` engine, through
the config translations of `engines/builder_shim.py`); the lossless GGUF engine reads llama blocks
only, and the Olive engine is proven on Llama only. `check_buildable` refuses an (architecture,
profile) pair outside the table before any long work (loading weights, converting), naming what
works; given the model folder, also a config the model builder's translations refuse
(`builder_shim.check_translatable`, e.g. a scaled Gemma 3 rope). `WITHDRAWN` holds the
architectures taken off the list, with the reason the refusal gives.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from slmops_builder.engines.builder_shim import TRANSLATED_ARCHITECTURES, UntranslatableConfig, check_translatable
from slmops_builder.profiles import PROFILES, Profile, get_profile

__all__ = [
    "ARCHITECTURES",
    "GGUF_ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "WITHDRAWN",
    "Architecture",
    "UnsupportedArchitectureError",
    "buildable_profiles",
    "check_buildable",
    "config_architecture",
    "folder_architecture",
    "profile_architectures",
]

_MODEL_BUILDER = "onnxruntime-genai"
_ALL_ENGINES = (_MODEL_BUILDER, "slmops-gguf-lossless", "olive")


@dataclass(frozen=True)
class Architecture:
    name: str  # the transformers class, as config.json's "architectures" names it
    gguf: str | None  # the GGUF general.architecture transformers loads it from; None: no GGUF loader
    engines: tuple[str, ...] = (_MODEL_BUILDER,)  # the conversion engines proven to build it


ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {
        a.name: a
        for a in (
            Architecture("LlamaForCausalLM", "llama", _ALL_ENGINES),
            # llama.cpp writes a Mistral GGUF as "llama": it imports as LlamaForCausalLM (the same
            # network without a sliding window); transformers' "mistral" GGUF path needs a gguf-py
            # that knows the name, which gguf 0.x does not.
            Architecture("MistralForCausalLM", None),
            Architecture("Qwen2ForCausalLM", "qwen2"),
            Architecture("Qwen3ForCausalLM", "qwen3"),
            Architecture("Phi3ForCausalLM", "phi3"),
            Architecture("GemmaForCausalLM", None),
            Architecture("Gemma2ForCausalLM", "gemma2"),
            Architecture("Gemma3ForCausalLM", "gemma3"),
            Architecture("GraniteForCausalLM", None),
        )
    }
)
# Architectures taken off the list, and why: refused with the reason.
WITHDRAWN: Mapping[str, str] = MappingProxyType(
    {
        "OlmoForCausalLM": "onnxruntime-genai 0.18's model builder builds OLMo's layer norms (mean and variance, "
        "no weights) as RMS norms, so its logits are not transformers'",
    }
)
SUPPORTED_ARCHITECTURES = frozenset(ARCHITECTURES)
# GGUF general.architecture -> the transformers class its import makes.
GGUF_ARCHITECTURES: Mapping[str, str] = MappingProxyType({a.gguf: a.name for a in ARCHITECTURES.values() if a.gguf})


class UnsupportedArchitectureError(ValueError):
    """An architecture off the table, or a profile it is not proven to build."""


def buildable_profiles(architecture: str) -> list[str]:
    """The profiles `architecture` builds with (those whose engine it is proven with)."""
    engines = ARCHITECTURES[architecture].engines
    return [name for name, p in PROFILES.items() if p.engine in engines]


def profile_architectures(profile: Profile) -> list[str]:
    """The architectures `profile` builds (those proven with its engine), sorted."""
    return sorted(a.name for a in ARCHITECTURES.values() if profile.engine in a.engines)


def check_buildable(
    architecture: str, profiles: Iterable[Profile | str] = (), *, model_dir: Path | None = None
) -> None:
    """Refuse an architecture off the table, or one of `profiles` it does not build, naming what works;
    with `model_dir` (its folder), also a config the model builder's translations refuse."""
    arch = ARCHITECTURES.get(architecture)
    if arch is None:
        raise UnsupportedArchitectureError(f"architecture {architecture!r} {_not_supported(architecture)}")
    for profile in profiles:
        prof = get_profile(profile) if isinstance(profile, str) else profile
        if prof.engine not in arch.engines:
            builds = profile_architectures(prof)
            raise UnsupportedArchitectureError(
                f"profile {prof.name!r} (engine {prof.engine}) does not build {architecture}; "
                f"{architecture} builds with: {', '.join(buildable_profiles(architecture))}; "
                f"{prof.name} builds: {', '.join(builds)}"
            )
        if model_dir is not None and prof.engine == _MODEL_BUILDER and architecture in TRANSLATED_ARCHITECTURES:
            try:
                check_translatable(model_dir)
            except UntranslatableConfig as exc:
                raise UnsupportedArchitectureError(
                    f"profile {prof.name!r} (engine {prof.engine}) cannot build this {architecture}: {exc}"
                ) from None


def config_architecture(config: Mapping[str, Any], where: object) -> str:
    """The first listed architecture of a config.json's "architectures"; refused naming the list."""
    names = config.get("architectures") or []
    listed = [a for a in names if a in ARCHITECTURES]
    if not listed:
        first = str(names[0]) if names else ""
        raise UnsupportedArchitectureError(f"{where}: architecture {names or '(none)'} {_not_supported(first)}")
    return str(listed[0])


def _not_supported(architecture: str) -> str:
    why = f" ({WITHDRAWN[architecture]})" if architecture in WITHDRAWN else ""
    return f"is not supported{why}; supported: {', '.join(sorted(ARCHITECTURES))}"


def folder_architecture(model_dir: Path) -> str:
    """`config_architecture` of a Hugging Face folder's config.json (ValueError when unreadable)."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read as JSON: {exc}") from exc
    return config_architecture(config, model_dir)
