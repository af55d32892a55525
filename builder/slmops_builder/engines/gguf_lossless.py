"""The `slmops-gguf-lossless` engine: the model builder's int4 graph carrying the GGUF's own blocks.

The model builder writes the int4 graph; `slmops_builder.lossless.rewrite` then replaces its weights
with the GGUF's own 4-bit blocks. The GGUF is the one the model folder was imported from (its
`slmops_source.json`), checked against the recorded SHA-256 before the step cache is looked at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops_builder.engines.base import CONVERT_LOG, ConversionError
from slmops_builder.engines.model_builder import run_model_builder
from slmops_builder.source_info import read_source_info

if TYPE_CHECKING:
    from slmops_builder.profiles import Profile

__all__ = ["GGUF_LOSSLESS", "GgufLosslessEngine", "lossless_source"]


class GgufLosslessEngine:
    name: str = "slmops-gguf-lossless"
    methods: tuple[str, ...] = ("lossless-gguf",)
    exclusive_methods: tuple[str, ...] = ("lossless-gguf",)
    own_options: frozenset[str] = frozenset({"float_compute"})
    tools: tuple[str, ...] = ("gguf", "onnx", "numpy")

    def check_profile(self, profile: Profile) -> None:
        if (profile.precision, profile.execution_provider, profile.requires) != ("int4", "cpu", "gguf-4bit"):
            raise ValueError("lossless-gguf is a cpu int4 method and requires = 'gguf-4bit'")
        if "float_compute" in profile.quantization:
            _check_float_compute(profile)

    def key_params(self, model_dir: Path, profile: Profile) -> dict[str, Any]:
        from slmops_builder.lossless import FORMAT_VERSION

        info = read_source_info(model_dir) or {}
        return {"gguf_sha256": info.get("source_sha256", ""), "lossless_format": FORMAT_VERSION}

    def check_source(self, model_dir: Path, profile: Profile) -> None:
        lossless_source(model_dir, profile)

    def run(self, model_dir: Path, profile: Profile, out: Path, *, threads: int | None, timeout_s: float) -> None:
        from slmops_builder.lossless import LosslessImportError, rewrite

        gguf = Path(str((read_source_info(model_dir) or {})["source_path"]))  # checked by check_source
        run_model_builder(model_dir, profile, out, threads=threads, timeout_s=timeout_s)
        try:
            counts = rewrite(out, gguf, model_dir, float_compute=profile.float_compute)
        except LosslessImportError as exc:
            raise ConversionError(f"lossless import of {gguf.name} failed: {exc}") from None
        with (out / CONVERT_LOG).open("a") as log:
            log.write(f"lossless import of {gguf}: {json.dumps(counts, sort_keys=True)}\n")


GGUF_LOSSLESS = GgufLosslessEngine()


def _check_float_compute(profile: Profile) -> None:
    from slmops_builder.lossless import FLOAT_COMPUTE_PROJECTIONS

    if profile.quantization.get("accuracy_level") != "4":
        raise ValueError("option float_compute needs accuracy_level = '4' (the rest is float already)")
    names = profile.quantization["float_compute"].split(",")
    unknown = [n for n in names if n not in FLOAT_COMPUTE_PROJECTIONS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"float_compute must name distinct projections of {', '.join(FLOAT_COMPUTE_PROJECTIONS)} "
            f"(comma-separated), not {profile.quantization['float_compute']!r}"
        )


def lossless_source(model_dir: Path, profile: Profile) -> Path:
    """The GGUF `model_dir` was imported from, checked (same SHA-256, 4-bit projections) for `profile`."""
    from slmops_builder.lossless import LosslessImportError, check_gguf
    from slmops_protos.manifests import sha256_file

    info = read_source_info(model_dir)
    path = Path(str((info or {}).get("source_path", "")))
    if info is None or path.suffix.lower() != ".gguf":
        origin = "not imported by slmops" if info is None else f"imported from {info.get('source_path')}"
        raise ConversionError(
            f"profile {profile.name} needs a model imported from a GGUF with 4-bit blocks; {model_dir} was {origin}"
        )
    if not path.is_file():
        raise ConversionError(f"profile {profile.name}: the source GGUF {path} is gone; import the model again")
    if sha256_file(path) != info.get("source_sha256"):
        raise ConversionError(f"profile {profile.name}: {path} changed since {model_dir} was imported from it")
    try:
        check_gguf(path)
    except LosslessImportError as exc:
        raise ConversionError(f"profile {profile.name}: {exc}") from None
    return path
