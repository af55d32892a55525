"""The builder's settings: flags override the environment, which overrides the defaults."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["BuilderSettings"]


def _default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


class BuilderSettings(BaseSettings):
    """`SLMOPS_CACHE_DIR` (step cache), `SLMOPS_BUILDER_THREADS` (threads for conversion and evaluation)."""

    model_config = SettingsConfigDict(env_prefix="SLMOPS_BUILDER_", extra="forbid", frozen=True)

    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "slmops" / "builder",
        validation_alias=AliasChoices("cache_dir", "SLMOPS_CACHE_DIR", "SLMOPS_BUILDER_CACHE_DIR"),
    )
    threads: int = Field(default_factory=_default_threads, ge=1, le=256)
