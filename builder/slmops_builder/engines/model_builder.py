"""The `onnxruntime-genai` engine: onnxruntime-genai's model builder in a subprocess.

A subprocess, so the 1-3 GB the model builder takes are returned when it ends. It receives the
profile's precision, execution provider and options (RTN, k-quant, ...) as `--extra_options`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops_builder.engines.base import CONVERT_LOG, ConversionError, log_tail
from slmops_builder.steps import offline_env

if TYPE_CHECKING:
    from slmops_builder.profiles import Profile

__all__ = ["MODEL_BUILDER", "ModelBuilderEngine", "run_model_builder"]


class ModelBuilderEngine:
    name: str = "onnxruntime-genai"
    methods: tuple[str, ...] = ("rtn", "k_quant", "none")
    exclusive_methods: tuple[str, ...] = ()
    own_options: frozenset[str] = frozenset()
    tools: tuple[str, ...] = ()

    def check_profile(self, profile: Profile) -> None:
        pass

    def key_params(self, model_dir: Path, profile: Profile) -> dict[str, Any]:
        return {}

    def check_source(self, model_dir: Path, profile: Profile) -> None:
        pass

    def run(self, model_dir: Path, profile: Profile, out: Path, *, threads: int | None, timeout_s: float) -> None:
        run_model_builder(model_dir, profile, out, threads=threads, timeout_s=timeout_s)


MODEL_BUILDER = ModelBuilderEngine()


def run_model_builder(model_dir: Path, profile: Profile, out: Path, *, threads: int | None, timeout_s: float) -> None:
    """Run the model builder for `profile` into `out`; ConversionError with its log's tail on failure."""
    env = offline_env(threads or min(2, os.cpu_count() or 1))
    log_path = out / CONVERT_LOG
    with tempfile.TemporaryDirectory(prefix="slmops-mb-") as hf_cache, log_path.open("w") as log:
        cmd = [
            sys.executable,
            "-m",
            "slmops_builder.engines.builder_shim",
            "-i",
            str(model_dir.resolve()),
            "-o",
            str(out.resolve()),
            "-c",
            hf_cache,
            *profile.builder_args(),
        ]
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise ConversionError(f"model builder took longer than {timeout_s:.0f} s", log_tail(log_path)) from None
    if proc.returncode != 0:
        raise ConversionError(f"model builder failed (exit {proc.returncode}) for {profile.name}", log_tail(log_path))
    if not (out / "genai_config.json").is_file() or not any(out.glob("*.onnx")):
        raise ConversionError("model builder wrote no genai_config.json or .onnx model", log_tail(log_path))
