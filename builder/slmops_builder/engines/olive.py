"""The `olive` engine: `olive run` in a subprocess.

The workflow is written from the profile: for method `rtn` one `ModelBuilder` pass (int4, the
profile's options as the model builder's extra options); for method `gptq` Olive's `Gptq` pass
first (group size = the profile's `block_size`, calibrated on the builder's own
`data/calibration.txt`, never on `data/heldout.txt`, the perplexity text), then `ModelBuilder`,
which reads Olive's quantized checkpoint (`quant_method: olive`) and repacks it into MatMulNBits.
Olive's cache, its output and the Hugging Face cache it hands the model builder live in a temporary
folder; only the onnxruntime-genai folder is moved into `out`, in the model-builder engine's layout
(Olive's own extras, `config.json`, `model_config.json` and `generation_config.json`, are left out).

Olive 0.13 does not run against onnxruntime-genai 0.18 as shipped, so Olive runs through a launcher
(`python -m slmops_builder.engines.olive_launcher <olive args>`, see there).

The profile's options go to the model builder through the pass's `extra_options` under their
0.18 names (`block_size`, `accuracy_level`, ...): the pass's typed `int4_block_size`,
`int4_accuracy_level`, ... fields are the older names, which 0.18 silently ignores.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from slmops_builder.engines.base import CONVERT_LOG, ConversionError, log_tail
from slmops_builder.steps import offline_env

if TYPE_CHECKING:
    from slmops_builder.profiles import Profile

__all__ = [
    "GPTQ_OPTIONS",
    "LAUNCHER_VERSION",
    "OLIVE",
    "OLIVE_TOOLS",
    "OliveEngine",
    "calibration_text",
    "check_disjoint",
    "olive_config",
    "olive_key_params",
    "run_olive",
]

# Bump when the launcher's adjustments or the workflow written change what Olive produces.
LAUNCHER_VERSION = 1
OLIVE_TOOLS = ("olive-ai", "torch", "datasets")
# Files Olive writes next to the model that the model builder does not: not part of our layout.
OLIVE_EXTRAS = frozenset({"config.json", "model_config.json", "generation_config.json"})
# The options of Olive's Gptq pass (the rest of a profile's options goes to the model builder).
GPTQ_OPTIONS: Mapping[str, type] = MappingProxyType(
    {"gptq_sym": bool, "gptq_damp_percent": float, "gptq_samples": int, "gptq_seq_len": int}
)
_GPTQ_GROUP_SIZES = (16, 32, 64, 128, 256)
_GPTQ_DEFAULTS = {"gptq_sym": "false", "gptq_damp_percent": "0.01", "gptq_samples": "128", "gptq_seq_len": "256"}
_ERROR_LINE = re.compile(r"^(?:[\w.]+(?:Error|Exception|Exit)|Exception)\b.*:", re.MULTILINE)


class OliveEngine:
    name: str = "olive"
    # Its ModelBuilder pass quantizes with RTN; its Gptq pass calibrates first.
    methods: tuple[str, ...] = ("rtn", "gptq")
    exclusive_methods: tuple[str, ...] = ("gptq",)
    own_options: frozenset[str] = frozenset(GPTQ_OPTIONS)
    tools: tuple[str, ...] = OLIVE_TOOLS

    def check_profile(self, profile: Profile) -> None:
        if (profile.precision, profile.execution_provider, profile.requires) != ("int4", "cpu", "any"):
            raise ValueError(
                f"engine olive builds cpu int4 only (requires = 'any'); "
                f"not {profile.execution_provider} {profile.precision} (requires = {profile.requires!r})"
            )
        for key, value in profile.quantization.items():
            kind = GPTQ_OPTIONS.get(key)
            if kind is None:
                if key.startswith("gptq_"):
                    raise ValueError(f"unknown option {key}; known: {', '.join(GPTQ_OPTIONS)}")
                continue
            if profile.method != "gptq":
                raise ValueError(f"option {key} is for method gptq only")
            if not _parses(value, kind):
                raise ValueError(f"option {key} must be a {kind.__name__} (as a string), not {value!r}")
        block = profile.quantization.get("block_size", "32")
        if profile.method == "gptq" and (not block.isdigit() or int(block) not in _GPTQ_GROUP_SIZES):
            raise ValueError("gptq's group size (block_size) must be 16, 32, 64, 128 or 256")

    def key_params(self, model_dir: Path, profile: Profile) -> dict[str, Any]:
        return olive_key_params(profile)

    def check_source(self, model_dir: Path, profile: Profile) -> None:
        pass

    def run(self, model_dir: Path, profile: Profile, out: Path, *, threads: int | None, timeout_s: float) -> None:
        run_olive(model_dir, profile, out, threads=threads, timeout_s=timeout_s)


OLIVE = OliveEngine()


def _parses(text: str, kind: type) -> bool:
    if kind is bool:
        return text in ("true", "false")
    try:
        value = kind(text)
    except ValueError:
        return False
    return bool(value > 0) if kind is int else bool(value >= 0)


def calibration_text() -> str:
    """GPTQ's calibration text: neutral prose written for the builder, disjoint from heldout.txt."""
    return files("slmops_builder").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def _shingles(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def check_disjoint(calibration: str, heldout: str, n: int = 8) -> None:
    """Raise ValueError when the calibration text shares any run of `n` words with the held-out text."""
    shared = _shingles(calibration, n) & _shingles(heldout, n)
    if shared:
        example = " ".join(sorted(shared)[0])
        raise ValueError(f"the calibration text shares {len(shared)} {n}-word runs with the held-out text: {example!r}")


def _options(profile: Profile) -> tuple[dict[str, str], dict[str, str]]:
    """(the model builder's extra options, the GPTQ options with defaults) of an olive profile."""
    builder = {k: v for k, v in profile.quantization.items() if k not in GPTQ_OPTIONS}
    gptq = {**_GPTQ_DEFAULTS, **{k: v for k, v in profile.quantization.items() if k in GPTQ_OPTIONS}}
    return builder, gptq


def olive_key_params(profile: Profile) -> dict[str, Any]:
    """What besides the profile decides an olive conversion: part of the step cache key."""
    params: dict[str, Any] = {"olive_launcher": LAUNCHER_VERSION}
    if profile.method == "gptq":
        params["calibration_sha256"] = hashlib.sha256(calibration_text().encode()).hexdigest()
    return params


def olive_config(model_dir: Path, profile: Profile, work: Path, calibration_file: Path | None) -> dict[str, Any]:
    """The `olive run` workflow for `profile` (Olive's cache and output under `work`)."""
    builder, gptq = _options(profile)
    passes: dict[str, Any] = {}
    config: dict[str, Any] = {
        "input_model": {"type": "HfModel", "model_path": str(model_dir.resolve())},
        "systems": {
            "local_system": {
                "type": "LocalSystem",
                "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}],
            }
        },
        "host": "local_system",
        "target": "local_system",
        "cache_dir": str(work / "olive-cache"),
        "output_dir": str(work / "olive-out"),
        "log_severity_level": 1,
        "no_artifacts": True,
    }
    if profile.method == "gptq":
        if calibration_file is None:
            raise ValueError("gptq needs a calibration file")
        config["data_configs"] = [
            {
                "name": "calibration",
                "type": "HuggingfaceContainer",
                "load_dataset_config": {"data_name": "text", "data_files": str(calibration_file), "split": "train"},
                "pre_process_data_config": {
                    "strategy": "join",
                    "max_seq_len": int(gptq["gptq_seq_len"]),
                    "max_samples": int(gptq["gptq_samples"]),
                    "add_special_tokens": False,
                },
            }
        ]
        passes["gptq"] = {
            "type": "Gptq",
            "bits": 4,
            "group_size": int(builder.get("block_size", "32")),
            "sym": gptq["gptq_sym"] == "true",
            "damp_percent": float(gptq["gptq_damp_percent"]),
            "data_config": "calibration",
        }
    passes["builder"] = {"type": "ModelBuilder", "precision": profile.precision, "extra_options": builder}
    config["passes"] = passes
    return config


def _check_olive(profile: Profile) -> None:
    needs = [("olive", "olive-ai")] + ([("datasets", "datasets")] if profile.method == "gptq" else [])
    missing = [f"{dist} (pip install {dist})" for mod, dist in needs if importlib.util.find_spec(mod) is None]
    if missing:
        raise ConversionError(f"profile {profile.name} uses the olive engine, which needs " + " and ".join(missing))


def _failure_line(log: str) -> str:
    """The last exception line of Olive's output (its traceback's last line), or ""."""
    found = _ERROR_LINE.findall(log)
    if not found:
        return ""
    line_start = log.rfind(found[-1])
    return log[line_start:].splitlines()[0].strip()


def run_olive(model_dir: Path, profile: Profile, out: Path, *, threads: int | None, timeout_s: float) -> None:
    """Convert `model_dir` for an olive `profile` into `out` (a fresh folder) with `olive run`."""
    _check_olive(profile)
    log_path = out / CONVERT_LOG
    with tempfile.TemporaryDirectory(prefix="slmops-olive-") as tmp_name, log_path.open("w") as log:
        work = Path(tmp_name)
        calibration = None
        if profile.method == "gptq":
            from slmops_builder.evaluate import heldout_text

            text = calibration_text()
            check_disjoint(text, heldout_text())
            calibration = work / "calibration.txt"
            calibration.write_text(text, encoding="utf-8")
        config = olive_config(model_dir, profile, work, calibration)
        config_path = work / "olive_config.json"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        env = offline_env(
            threads or min(2, os.cpu_count() or 1),
            HF_HOME=str(work / "hf"),  # the model builder's cache_dir is Olive's HF_HUB_CACHE
            HF_DATASETS_CACHE=str(work / "hf-datasets"),
            OLIVE_DISABLE_TELEMETRY="1",
        )
        cmd = [sys.executable, "-m", "slmops_builder.engines.olive_launcher", "run", "--config", str(config_path)]
        cmd += ["--disable_telemetry"]
        log.write("$ " + " ".join(cmd) + "\n" + json.dumps(config, indent=2) + "\n")
        log.flush()
        try:
            proc = subprocess.run(
                cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            raise ConversionError(f"olive took longer than {timeout_s:.0f} s", log_tail(log_path)) from None
        log.flush()
        result = work / "olive-out"
        if proc.returncode != 0 or not (result / "genai_config.json").is_file():
            why = f"exit {proc.returncode}" if proc.returncode else "no genai_config.json in its output"
            failure = _failure_line(log_path.read_text(errors="replace"))
            raise ConversionError(
                f"olive failed ({why}) for {profile.name}" + (f": {failure}" if failure else ""), log_tail(log_path)
            )
        for src in sorted(result.iterdir()):
            if src.name not in OLIVE_EXTRAS and src.name != CONVERT_LOG:
                shutil.move(str(src), out / src.name)
    if not (out / "genai_config.json").is_file() or not any(out.glob("*.onnx")):
        raise ConversionError("olive wrote no genai_config.json or .onnx model", log_tail(log_path))
