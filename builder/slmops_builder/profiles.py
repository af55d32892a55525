"""Hardware profiles: what a package variant is built for.

A profile is a frozen spec: the execution provider, the precision and the quantization options the
onnxruntime-genai model builder receives (as `--extra_options key=value`), and the least memory a
device needs to run a small model built with it. The fleet matches a device's inventory against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from slmops_protos.package.v1 import manifest_pb2

__all__ = ["PROFILES", "Profile", "UnknownProfileError", "get_profile", "profile_names"]

_MIB = 1024**2
_PRECISIONS = ("int4", "int8", "fp16", "fp32")
_PROVIDERS = ("cpu", "cuda", "dml", "webgpu")


class UnknownProfileError(ValueError):
    """A profile name that is not one of the known profiles."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown hardware profile {name!r}; known profiles: {', '.join(profile_names())}")


@dataclass(frozen=True)
class Profile:
    """A hardware profile. `quantization` holds the model builder's extra options (strings)."""

    name: str
    execution_provider: str
    precision: str
    quantization: Mapping[str, str] = field(default_factory=dict)
    min_memory_bytes: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if self.precision not in _PRECISIONS:
            raise ValueError(f"profile {self.name}: precision {self.precision!r} not in {_PRECISIONS}")
        if self.execution_provider not in _PROVIDERS:
            raise ValueError(f"profile {self.name}: provider {self.execution_provider!r} not in {_PROVIDERS}")
        # Freeze the options so a profile cannot change after it was hashed into a cache key.
        object.__setattr__(self, "quantization", MappingProxyType(dict(sorted(self.quantization.items()))))

    def spec(self) -> dict[str, Any]:
        """Everything that changes the converted model: part of the step cache key."""
        return {
            "name": self.name,
            "execution_provider": self.execution_provider,
            "precision": self.precision,
            "quantization": dict(self.quantization),
        }

    def builder_args(self) -> list[str]:
        """Arguments for `python -m onnxruntime_genai.models.builder` (besides -i/-o/-c)."""
        args = ["-p", self.precision, "-e", self.execution_provider]
        if self.quantization:
            args += ["--extra_options", *(f"{k}={v}" for k, v in self.quantization.items())]
        return args

    def to_pb(self, *, min_memory_bytes: int | None = None) -> manifest_pb2.HardwareProfile:
        pb = manifest_pb2.HardwareProfile(
            name=self.name,
            execution_provider=self.execution_provider,
            precision=self.precision,
            min_memory_bytes=self.min_memory_bytes if min_memory_bytes is None else min_memory_bytes,
        )
        pb.quantization.update(self.quantization)
        return pb


PROFILES: Mapping[str, Profile] = MappingProxyType(
    {
        p.name: p
        for p in (
            Profile(
                "cpu-int4",
                "cpu",
                "int4",
                {"block_size": "32", "accuracy_level": "4"},
                256 * _MIB,
                "CPU, int4 weights (RTN, block 32), int8 activations in MatMul (accuracy level 4)",
            ),
            Profile(
                "cpu-int8",
                "cpu",
                "int8",
                {"block_size": "32", "accuracy_level": "4"},
                384 * _MIB,
                "CPU, int8 weights (RTN, block 32)",
            ),
            Profile("cpu-fp32", "cpu", "fp32", {}, 1024 * _MIB, "CPU, float32: the reference, largest and slowest"),
            Profile("cuda-fp16", "cuda", "fp16", {}, 512 * _MIB, "NVIDIA GPU, float16"),
            Profile(
                "cuda-int4",
                "cuda",
                "int4",
                {"block_size": "32", "accuracy_level": "4"},
                256 * _MIB,
                "NVIDIA GPU, int4 weights (RTN, block 32)",
            ),
        )
    }
)


def profile_names() -> list[str]:
    return list(PROFILES)


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfileError(name) from None
