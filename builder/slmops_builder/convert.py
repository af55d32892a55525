"""Convert a Hugging Face folder to an onnxruntime-genai folder for one hardware profile.

The model's architecture must build with the profile (`architectures.check_buildable`, checked
before the cache is looked at). The conversion runs the engine registered under the profile's
engine name (`slmops_builder.engines`: the model builder, the lossless GGUF import, Olive); the
manifest's lineage takes `Profile.engine` and `Profile.quantization_method`, and the cache entry's
record holds both.

The output is kept in the step cache: the same weights, profile and tool versions are converted
once (the key adds what the engine says decides its output, and its tools' versions). `stage` then
makes the package's folder from a cache entry (hard links for unchanged files, fresh files for what
it rewrites), so the cache is never modified: generation defaults (`search`), Foundry Local's
`inference_model.json`, and the chat template copied into `tokenizer_config.json` for tokenizers
that read it only there.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slmops_builder.architectures import check_buildable, folder_architecture
from slmops_builder.engines import CONVERT_LOG, get_engine
from slmops_builder.importer import SOURCE_FILE
from slmops_builder.profiles import Profile
from slmops_builder.steps import ENTRY_FILE, StepCache, StepResult, file_hashes, tool_versions

__all__ = [
    "SEARCH_OPTIONS",
    "convert",
    "convert_key",
    "inference_model_json",
    "parse_search_overrides",
    "stage",
    "validate_search",
]

CONVERT_STEP = "convert"
# Files of a cache entry that are the cache's own, not the model's.
_NOT_MODEL = frozenset({ENTRY_FILE, CONVERT_LOG})
# onnxruntime-genai's search options and their types.
SEARCH_OPTIONS: Mapping[str, type] = {
    "do_sample": bool,
    "early_stopping": bool,
    "past_present_share_buffer": bool,
    "max_length": int,
    "min_length": int,
    "num_beams": int,
    "num_return_sequences": int,
    "no_repeat_ngram_size": int,
    "top_k": int,
    "random_seed": int,
    "temperature": float,
    "top_p": float,
    "repetition_penalty": float,
    "length_penalty": float,
    "diversity_penalty": float,
}


def convert_key(model_dir: Path, profile: Profile) -> tuple[str, dict[str, Any]]:
    """The step cache key of converting `model_dir` for `profile`, and what went into it."""
    engine = get_engine(profile.engine)
    inputs = file_hashes(model_dir, exclude=frozenset({SOURCE_FILE}))
    tools = {**tool_versions(), **tool_versions(engine.tools)}
    params: dict[str, Any] = {"profile": profile.spec(), **engine.key_params(model_dir, profile)}
    return StepCache.key(CONVERT_STEP, params, inputs, tools), {"params": params, "inputs": inputs, "tools": tools}


def convert(
    model_dir: Path,
    profile: Profile,
    *,
    cache_dir: Path | None = None,
    threads: int | None = None,
    timeout_s: float = 3600,
) -> StepResult:
    """Convert (or reuse) `model_dir` for `profile`; returns the read-only cache entry."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json); run 'slmops builder import'")
    check_buildable(folder_architecture(model_dir), [profile], model_dir=model_dir)
    engine = get_engine(profile.engine)
    engine.check_source(model_dir, profile)
    key, record = convert_key(model_dir, profile)

    def produce(out: Path) -> None:
        engine.run(model_dir, profile, out, threads=threads, timeout_s=timeout_s)

    lineage = {"engine": profile.engine, "quantization_method": profile.quantization_method}
    return StepCache(cache_dir).run(
        CONVERT_STEP, key, produce, record={"model_dir": str(model_dir.resolve()), **lineage, **record}
    )


def stage(
    converted: Path,
    stage_dir: Path,
    *,
    name: str,
    search: Mapping[str, object] | None = None,
) -> Path:
    """Make the package's folder in `stage_dir` (must not exist) from a converted cache entry."""
    converted = Path(converted)
    stage_dir = Path(stage_dir)
    if stage_dir.exists():
        raise FileExistsError(f"staging folder {stage_dir} exists")
    overrides = validate_search(search or {})
    stage_dir.mkdir(parents=True)
    for src in sorted(converted.rglob("*")):
        if not src.is_file() or src.name in _NOT_MODEL:
            continue
        dst = stage_dir / src.relative_to(converted)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    genai = json.loads((stage_dir / "genai_config.json").read_text())
    if overrides:
        genai.setdefault("search", {}).update(overrides)
        _rewrite(stage_dir / "genai_config.json", json.dumps(genai, indent=4) + "\n")
    template = _chat_template(stage_dir)
    tok_cfg_path = stage_dir / "tokenizer_config.json"
    if template and tok_cfg_path.is_file():
        tok_cfg = json.loads(tok_cfg_path.read_text())
        if not tok_cfg.get("chat_template"):
            tok_cfg["chat_template"] = template
            _rewrite(tok_cfg_path, json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    _rewrite(stage_dir / "inference_model.json", json.dumps(inference_model_json(name, template), indent=2) + "\n")
    return stage_dir


def _rewrite(path: Path, text: str) -> None:
    """Replace a (possibly hard-linked, read-only) file with a new one, never writing through the link."""
    path.unlink(missing_ok=True)
    path.write_text(text)


def _chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        value = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(value, str):
            return value
    return None


def validate_search(search: Mapping[str, object]) -> dict[str, object]:
    """Check generation defaults against onnxruntime-genai's search options; returns typed values."""
    out: dict[str, object] = {}
    for key, value in search.items():
        kind = SEARCH_OPTIONS.get(key)
        if kind is None:
            raise ValueError(f"unknown search option {key!r}; known: {', '.join(sorted(SEARCH_OPTIONS))}")
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"search option {key} must be true or false, not {value!r}")
            out[key] = value
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"search option {key} must be an integer, not {value!r}")
            out[key] = value
        else:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"search option {key} must be a number, not {value!r}")
            out[key] = float(value)
    if "max_length" in out and int(out["max_length"]) <= 0:  # type: ignore[call-overload]
        raise ValueError("search option max_length must be positive")
    return out


def parse_search_overrides(items: list[str]) -> dict[str, object]:
    """Parse CLI `key=value` items into typed search options (`true`, `0.7`, `64`)."""
    raw: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"search override {item!r} is not key=value")
        kind = SEARCH_OPTIONS.get(key)
        if kind is None:
            raise ValueError(f"unknown search option {key!r}; known: {', '.join(sorted(SEARCH_OPTIONS))}")
        text = text.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                raw[key] = text.lower() in ("true", "1", "yes")
            elif kind is int:
                raw[key] = int(text)
            else:
                raw[key] = float(text)
        except ValueError:
            raise ValueError(f"search option {key} expects {kind.__name__}, got {text!r}") from None
    return validate_search(raw)


_SENTINEL = "\u2063SLMOPS_CONTENT\u2063"
_CHATML = {
    "system": "<|im_start|>system\n{Content}<|im_end|>\n",
    "user": "<|im_start|>user\n{Content}<|im_end|>\n",
    "assistant": "<|im_start|>assistant\n{Content}<|im_end|>\n",
    "prompt": "<|im_start|>user\n{Content}<|im_end|>\n<|im_start|>assistant\n",
}


def inference_model_json(name: str, chat_template: str | None) -> dict[str, Any]:
    """Foundry Local's `inference_model.json`: the model name and a prompt template per role.

    Each role's template is the chat template rendered for one message whose content is a
    sentinel, with what the template adds around other messages (a default system prompt,
    say) taken away; falls back to ChatML when the template cannot be rendered that way.
    """
    template = _CHATML
    if chat_template:
        try:
            template = _prompt_template(chat_template)
        except Exception:
            template = _CHATML
    return {"Name": name, "PromptTemplate": dict(template)}


def _prompt_template(chat_template: str) -> dict[str, str]:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    tmpl = env.from_string(chat_template)

    def render(messages: list[dict[str, str]], gen: bool = False) -> str:
        return str(tmpl.render(messages=messages, add_generation_prompt=gen, bos_token="", eos_token="", tools=None))

    sys_msg = {"role": "system", "content": "S"}
    base = render([sys_msg])

    def part(role: str, gen: bool = False) -> str:
        full = render([sys_msg, {"role": role, "content": _SENTINEL}], gen)
        if not full.startswith(base):
            raise ValueError("template output is not incremental")
        return full[len(base) :]

    out = {
        "system": render([{"role": "system", "content": _SENTINEL}]),
        "user": part("user"),
        "assistant": part("assistant"),
        "prompt": part("user", gen=True),
    }
    for key, value in out.items():
        if value.count(_SENTINEL) != 1:
            raise ValueError(f"template for {key} does not hold the content once")
        out[key] = value.replace(_SENTINEL, "{Content}")
    return out
