"""Olive as a conversion engine (profile engine `olive`): `olive run` in a subprocess.

The workflow is written from the profile: for method `rtn` one `ModelBuilder` pass (int4, the
profile's options as the model builder's extra options); for method `gptq` Olive's `Gptq` pass
first (group size = the profile's `block_size`, calibrated on the builder's own
`data/calibration.txt`, never on `data/heldout.txt`, the perplexity text), then `ModelBuilder`,
which reads Olive's quantized checkpoint (`quant_method: olive`) and repacks it into MatMulNBits.
Olive's cache, its output and the Hugging Face cache it hands the model builder live in a temporary
folder; only the onnxruntime-genai folder is moved into `out`, in the model-builder engine's layout
(Olive's own extras, `config.json`, `model_config.json` and `generation_config.json`, are left out).

Olive 0.13 does not run against onnxruntime-genai 0.18 as shipped, so Olive runs through a launcher
(`python -m slmops_builder.olive_convert <olive args>`) that makes two adjustments, each applied
only when the installed onnxruntime-genai needs it:

1. `ModelBuilder.maybe_patch_quant` becomes a no-op when `onnxruntime_genai.models.quantized_model`
   does not exist. Olive imports that module for every onnxruntime-genai >= 0.9 to patch its
   quantized format in (plus `make_packed_matmul_int4`/`make_embedding`); 0.18 has no such module
   and reads Olive's format natively (`onnxruntime_genai/models/loaders/olive.py`). Without this:
   `ModuleNotFoundError: No module named 'onnxruntime_genai.models.quantized_model'`.
2. `onnxruntime_genai.models.builder.create_model` is wrapped to run `parse_extra_options` first
   when Olive calls it without (0.18 expects the caller to have loaded the Hugging Face details
   there). Without this: `Exception: Hugging Face details not found in extra_options. Please call
   `parse_extra_options` before `create_model`.`

The profile's options go to the model builder through the pass's `extra_options` under their
0.18 names (`block_size`, `accuracy_level`, ...): the pass's typed `int4_block_size`,
`int4_accuracy_level`, ... fields are the older names, which 0.18 silently ignores.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

from slmops_builder.convert import CONVERT_LOG, ConversionError, _tail
from slmops_builder.profiles import GPTQ_OPTIONS, Profile
from slmops_builder.steps import offline_env

__all__ = [
    "LAUNCHER_VERSION",
    "OLIVE_TOOLS",
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
_GPTQ_DEFAULTS = {"gptq_sym": "false", "gptq_damp_percent": "0.01", "gptq_samples": "128", "gptq_seq_len": "256"}
_ERROR_LINE = re.compile(r"^(?:[\w.]+(?:Error|Exception|Exit)|Exception)\b.*:", re.MULTILINE)


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
        cmd = [sys.executable, "-m", "slmops_builder.olive_convert", "run", "--config", str(config_path)]
        cmd += ["--disable_telemetry"]
        log.write("$ " + " ".join(cmd) + "\n" + json.dumps(config, indent=2) + "\n")
        log.flush()
        try:
            proc = subprocess.run(
                cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            raise ConversionError(f"olive took longer than {timeout_s:.0f} s", _tail(log_path)) from None
        log.flush()
        result = work / "olive-out"
        if proc.returncode != 0 or not (result / "genai_config.json").is_file():
            why = f"exit {proc.returncode}" if proc.returncode else "no genai_config.json in its output"
            failure = _failure_line(log_path.read_text(errors="replace"))
            raise ConversionError(
                f"olive failed ({why}) for {profile.name}" + (f": {failure}" if failure else ""), _tail(log_path)
            )
        for src in sorted(result.iterdir()):
            if src.name not in OLIVE_EXTRAS and src.name != CONVERT_LOG:
                shutil.move(str(src), out / src.name)
    if not (out / "genai_config.json").is_file() or not any(out.glob("*.onnx")):
        raise ConversionError("olive wrote no genai_config.json or .onnx model", _tail(log_path))


# --- the launcher: `python -m slmops_builder.olive_convert <olive CLI args>` ------------------------


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
