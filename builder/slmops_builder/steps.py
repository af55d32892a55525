"""A content-addressed cache of builder step outputs.

A step's output folder is named by the SHA-256 of (step name, parameters, input file hashes,
tool versions): an unchanged step finds its folder and is not run again. Outputs are written to
a temporary sibling and renamed into place under a lock, so a crash or a concurrent build never
leaves a half-written entry, and entry files are made read-only so nobody edits the cache by
accident (callers copy or hard-link what they change into a staging folder).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from slmops_protos.manifests import sha256_file

__all__ = [
    "ENTRY_FILE",
    "StepCache",
    "StepResult",
    "default_cache_dir",
    "file_hashes",
    "offline_env",
    "tool_versions",
]

ENTRY_FILE = "slmops_step.json"


def default_cache_dir() -> Path:
    """`SLMOPS_CACHE_DIR`, else ~/.cache/slmops/builder (read when called, never at import)."""
    from slmops_builder.settings import BuilderSettings

    return BuilderSettings().cache_dir.expanduser()


def offline_env(threads: int | None, **extra: str) -> dict[str, str]:
    """The environment of a tool the builder runs in a subprocess (model builder, Olive): this one's,
    offline for the Hugging Face libraries, OpenMP/MKL limited to `threads` (None: left alone), plus `extra`."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return {**env, **extra}


CONVERT_TOOLS = ("onnxruntime-genai", "onnxruntime", "transformers", "onnx-ir")


def tool_versions(names: tuple[str, ...] = CONVERT_TOOLS) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def file_hashes(folder: Path, *, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (names in `exclude` skipped)."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in exclude
    }


@dataclass(frozen=True)
class StepResult:
    path: Path  # the cache entry's output folder (read-only: do not modify)
    key: str
    cached: bool  # True when the output was reused, False when the step ran now
    seconds: float  # how long the step ran (now, or when it first ran)


class StepCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    @staticmethod
    def key(step: str, params: Mapping[str, Any], inputs: Mapping[str, str], tools: Mapping[str, str]) -> str:
        blob = json.dumps(
            {"step": step, "params": params, "inputs": inputs, "tools": tools}, sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def entry(self, step: str, key: str) -> Path:
        return self.root / step / key

    def has(self, step: str, key: str) -> bool:
        """Whether (step, key) is in the cache (a complete entry), without running anything."""
        return self._lookup(self.entry(step, key), key) is not None

    def run(
        self,
        step: str,
        key: str,
        produce: Callable[[Path], None],
        *,
        record: Mapping[str, Any] | None = None,
    ) -> StepResult:
        """Return the cached output of (step, key), or call `produce(tmp_dir)` to make it."""
        entry = self.entry(step, key)
        found = self._lookup(entry, key)
        if found is not None:
            return found
        entry.parent.mkdir(parents=True, exist_ok=True)
        with self._lock(entry):
            found = self._lookup(entry, key)  # another process may have made it meanwhile
            if found is not None:
                return found
            if entry.exists():  # an entry without its record: a leftover of a crash
                _rmtree(entry)
            for stale in entry.parent.glob(f"{key}.tmp-*"):  # a killed run's (we hold the lock)
                _rmtree(stale)
            tmp = entry.with_name(f"{key}.tmp-{os.getpid()}")
            tmp.mkdir()
            start = time.monotonic()
            try:
                produce(tmp)
                seconds = time.monotonic() - start
                info = {"step": step, "key": key, "seconds": round(seconds, 3), "created_unix": time.time()}
                info.update(record or {})
                (tmp / ENTRY_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
                _make_read_only(tmp)
                os.replace(tmp, entry)
            except BaseException:
                _rmtree(tmp)
                raise
        return StepResult(entry, key, False, seconds)

    def _lookup(self, entry: Path, key: str) -> StepResult | None:
        record = entry / ENTRY_FILE
        if not record.is_file():
            return None
        try:
            info = json.loads(record.read_text())
        except ValueError:
            return None
        if info.get("key") != key:
            return None
        return StepResult(entry, key, True, float(info.get("seconds", 0.0)))

    @contextmanager
    def _lock(self, entry: Path) -> Iterator[None]:
        lock_path = entry.with_name(entry.name + ".lock")
        with lock_path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _make_read_only(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
