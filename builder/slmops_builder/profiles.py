"""Hardware profiles: what a package variant is built for.

A profile is a frozen spec read from `profiles.toml` (next to this module) at import and validated
there: the execution provider, the precision, the quantization method and the engine that builds it,
the options the onnxruntime-genai model builder receives (as `--extra_options key=value`; the olive
engine's `gptq_*` options go to its Gptq pass instead), and the least memory a device needs to run a
small model built with it. The fleet matches a device's inventory against it; the convert step
runs the engine registered under its `engine` name (`slmops_builder.engines`), and each engine says
which methods and options it takes.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from types import MappingProxyType
from typing import Any

from slmops_builder.engines import CONVERSION_ENGINES, ConversionEngine
from slmops_protos.package.v1 import manifest_pb2

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "METHODS",
    "PROFILES",
    "Profile",
    "ProfileSpecError",
    "UnknownProfileError",
    "get_profile",
    "load_profiles",
    "profile_names",
]

_MIB = 1024**2
PRECISIONS = ("int4", "int8", "fp16", "fp32")
# The execution providers the builder writes graphs for: those of the contract's EXECUTION_PROVIDERS
# that onnxruntime-genai's model builder targets (a test checks they are the contract's names).
PROVIDERS = ("cpu", "cuda", "dml", "webgpu")
# Every engine's methods, "none" (float weights) included.
METHODS = tuple(dict.fromkeys(m for engine in CONVERSION_ENGINES.values() for m in engine.methods))
REQUIREMENTS = ("any", "gguf-4bit")
_FLOAT = ("fp16", "fp32")
_KEYS = frozenset(
    {"provider", "precision", "method", "engine", "min_memory_mb", "description", "options", "requires", "cpu_features"}
)
_REQUIRED = ("provider", "precision", "method", "engine", "min_memory_mb")


class UnknownProfileError(ValueError):
    """A profile name that is not one of the known profiles."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown hardware profile {name!r}; known profiles: {', '.join(profile_names())}")


class ProfileSpecError(ValueError):
    """A profile specification (profiles.toml or a Profile built in code) is invalid."""


@dataclass(frozen=True)
class Profile:
    """A hardware profile. `quantization` holds the model builder's extra options (strings)."""

    name: str
    execution_provider: str
    precision: str
    quantization: Mapping[str, str] = field(default_factory=dict)
    min_memory_bytes: int = 0
    description: str = ""
    method: str = ""  # "" picks the default: "none" for float precisions, "rtn" otherwise
    engine: str = "onnxruntime-genai"
    requires: str = "any"
    cpu_features: tuple[str, ...] = ()  # the device must report each (inventory cpu_features), e.g. "avx2"

    def __post_init__(self) -> None:
        where = f"profile {self.name}"
        if self.precision not in PRECISIONS:
            raise ProfileSpecError(f"{where}: precision {self.precision!r} not in {PRECISIONS}")
        if self.execution_provider not in PROVIDERS:
            raise ProfileSpecError(f"{where}: provider {self.execution_provider!r} not in {PROVIDERS}")
        method = self.method or ("none" if self.precision in _FLOAT else "rtn")
        if method not in METHODS:
            raise ProfileSpecError(f"{where}: method {method!r} not in {METHODS}")
        if (method == "none") != (self.precision in _FLOAT):
            raise ProfileSpecError(f"{where}: method {method!r} does not fit precision {self.precision}")
        engine = CONVERSION_ENGINES.get(self.engine)
        if engine is None:
            raise ProfileSpecError(f"{where}: engine {self.engine!r} not in {tuple(CONVERSION_ENGINES)}")
        _check_method(where, engine, method)
        if self.requires not in REQUIREMENTS:
            raise ProfileSpecError(f"{where}: requires {self.requires!r} not in {REQUIREMENTS}")
        if not isinstance(self.min_memory_bytes, int) or self.min_memory_bytes < 0:
            raise ProfileSpecError(f"{where}: min memory must be a non-negative integer")
        bad = [k for k, v in self.quantization.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ProfileSpecError(f"{where}: options must map strings to strings; fix {', '.join(map(str, bad))}")
        for key in self.quantization:
            owner = next((e for e in CONVERSION_ENGINES.values() if key in e.own_options), engine)
            if owner is not engine:
                raise ProfileSpecError(f"{where}: option {key} is for engine {owner.name} only")
        object.__setattr__(self, "method", method)
        try:
            engine.check_profile(self)
        except ValueError as exc:
            raise ProfileSpecError(f"{where}: {exc}") from None
        if any(not isinstance(f, str) or not f or f != f.strip().lower() for f in self.cpu_features):
            raise ProfileSpecError(f"{where}: cpu_features must be lower-case flag names like 'avx2'")
        object.__setattr__(self, "cpu_features", tuple(sorted(set(self.cpu_features))))
        # Freeze the options so a profile cannot change after it was hashed into a cache key.
        object.__setattr__(self, "quantization", MappingProxyType(dict(sorted(self.quantization.items()))))

    @property
    def float_compute(self) -> tuple[str, ...]:
        """Projections the lossless engine computes in float32 in an accuracy-level-4 model."""
        value = self.quantization.get("float_compute", "")
        return tuple(value.split(",")) if value else ()

    def spec(self) -> dict[str, Any]:
        """Everything that changes the converted model: part of the step cache key."""
        return {
            "name": self.name,
            "execution_provider": self.execution_provider,
            "precision": self.precision,
            "method": self.method,
            "engine": self.engine,
            "quantization": dict(self.quantization),
        }

    @property
    def quantization_method(self) -> str:
        """The manifest's `Lineage.quantization_method`: the method, "" for float weights."""
        return "" if self.method == "none" else self.method

    def builder_args(self) -> list[str]:
        """Arguments for `python -m onnxruntime_genai.models.builder` (besides -i/-o/-c)."""
        args = ["-p", self.precision, "-e", self.execution_provider]
        own = CONVERSION_ENGINES[self.engine].own_options
        options = [f"{k}={v}" for k, v in self.quantization.items() if k not in own]
        if options:
            args += ["--extra_options", *options]
        return args

    def to_pb(self, *, min_memory_bytes: int | None = None) -> manifest_pb2.HardwareProfile:
        pb = manifest_pb2.HardwareProfile(
            name=self.name,
            execution_provider=self.execution_provider,
            precision=self.precision,
            min_memory_bytes=self.min_memory_bytes if min_memory_bytes is None else min_memory_bytes,
        )
        pb.quantization.update(self.quantization)
        pb.cpu_features.extend(self.cpu_features)
        return pb


def _check_method(where: str, engine: ConversionEngine, method: str) -> None:
    """A method another engine owns goes with that engine only; an engine builds only its methods."""
    if method not in engine.methods and set(engine.methods) <= set(engine.exclusive_methods):
        raise ProfileSpecError(f"{where}: method {' or '.join(engine.methods)} goes with engine {engine.name} only")
    owner = next((e for e in CONVERSION_ENGINES.values() if method in e.exclusive_methods), engine)
    if owner is not engine:
        raise ProfileSpecError(f"{where}: method {method} goes with engine {owner.name} only")
    if method not in engine.methods:
        methods = " or ".join(engine.methods)
        raise ProfileSpecError(f"{where}: engine {engine.name} quantizes with {methods}, not {method!r}")


def load_profiles(text: str, *, source: str = "profiles.toml") -> Mapping[str, Profile]:
    """Parse and validate a profiles file; returns name -> Profile (read-only). Errors name the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileSpecError(f"{source}: not valid TOML: {exc}") from None
    extra = set(data) - {"profiles"}
    if extra or not isinstance(data.get("profiles"), dict) or not data["profiles"]:
        raise ProfileSpecError(f"{source}: expected only a non-empty [profiles] table (found {sorted(data)})")
    out: dict[str, Profile] = {}
    for name, body in data["profiles"].items():
        where = f"{source}: profiles.{name}"
        if not isinstance(body, dict):
            raise ProfileSpecError(f"{where} must be a table")
        unknown = sorted(set(body) - _KEYS)
        if unknown:
            raise ProfileSpecError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
        missing = [k for k in _REQUIRED if k not in body]
        if missing:
            raise ProfileSpecError(f"{where}: missing key(s) {', '.join(missing)}")
        options = body.get("options", {})
        if not isinstance(options, dict):
            raise ProfileSpecError(f"{where}.options must be a table of strings")
        memory = body["min_memory_mb"]
        if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
            raise ProfileSpecError(f"{where}.min_memory_mb must be a positive integer, not {memory!r}")
        try:
            out[name] = Profile(
                name,
                body["provider"],
                body["precision"],
                options,
                memory * _MIB,
                str(body.get("description", "")),
                method=body["method"],
                engine=body["engine"],
                requires=body.get("requires", "any"),
                cpu_features=_features(body.get("cpu_features", []), where),
            )
        except ProfileSpecError as exc:
            raise ProfileSpecError(f"{source}: {exc}") from None
    return MappingProxyType(out)


def _features(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(f, str) for f in value):
        raise ProfileSpecError(f"{where}.cpu_features must be a list of strings, not {value!r}")
    return tuple(value)


PROFILES: Mapping[str, Profile] = load_profiles(
    files("slmops_builder").joinpath("profiles.toml").read_text(encoding="utf-8")
)


def profile_names() -> list[str]:
    return list(PROFILES)


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfileError(name) from None
