"""What every conversion engine shares: the `ConversionEngine` protocol, its error and its log.

An engine turns a Hugging Face folder into an onnxruntime-genai folder for one hardware profile; the
registry (`slmops_builder.engines`) finds it by the profile's `engine` name. The convert step asks it
for what goes into the step cache key besides the profile (`key_params`, `tools`), lets it refuse a
model folder before the cache is looked at (`check_source`) and runs it (`run`); the package's lineage
records the versions of its `tools`. Profiles ask it which methods and options it takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from slmops_builder.profiles import Profile

__all__ = ["CONVERT_LOG", "ConversionEngine", "ConversionError", "log_tail"]

# The engine's output log, kept in the cache entry (never in a package).
CONVERT_LOG = "slmops_convert.log"


class ConversionError(RuntimeError):
    """The model builder failed; `log_tail` holds the end of its output."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message + (f"\n--- model builder output (tail) ---\n{log_tail}" if log_tail else ""))
        self.log_tail = log_tail


class ConversionEngine(Protocol):
    """A conversion engine, registered under the profile `engine` name it builds."""

    name: str
    # Quantization methods it builds with; `exclusive_methods`: those no other engine may use.
    methods: tuple[str, ...]
    exclusive_methods: tuple[str, ...]
    # Profile options it applies itself (not passed to the model builder).
    own_options: frozenset[str]
    # Distributions besides the model builder's whose versions key its cache entries and go into the lineage.
    tools: tuple[str, ...]

    def check_profile(self, profile: Profile) -> None:
        """Raise ValueError when the profile asks for what this engine cannot build."""

    def key_params(self, model_dir: Path, profile: Profile) -> dict[str, Any]:
        """What besides the profile and the model's files decides the output: part of the cache key."""

    def check_source(self, model_dir: Path, profile: Profile) -> None:
        """Raise ConversionError when `model_dir` cannot be converted (checked before the cache)."""

    def run(self, model_dir: Path, profile: Profile, out: Path, *, threads: int | None, timeout_s: float) -> None:
        """Convert `model_dir` into `out` (a fresh folder), writing its log to `out / CONVERT_LOG`."""


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file ("" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
