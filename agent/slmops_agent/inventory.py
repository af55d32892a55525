"""What this device is: the hardware inventory reported at enrollment and in every ReportedState."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmops_agent.layout import write_atomic

# CPU flags worth telling the fleet about (it picks a variant by them); everything else is noise.
_INTERESTING_FLAGS = (
    "sse4_1",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    # arm (/proc/cpuinfo "Features")
    "neon",
    "asimd",
    "asimddp",
    "fphp",
    "asimdhp",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
)


@dataclass(frozen=True)
class Inventory:
    os: str
    arch: str
    cpu_count: int
    memory_bytes: int
    disk_free_bytes: int
    providers: list[str] = field(default_factory=list)
    cpu_features: list[str] = field(default_factory=list)
    agent_version: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """CPU feature flags from /proc/cpuinfo ("flags" on x86, "Features" on arm), where present."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    found = [f for f in _INTERESTING_FLAGS if f in flags]
    if "asimd" in flags and "neon" not in found:
        found.append("neon")  # arm64 calls NEON "asimd"
    return found


log = logging.getLogger(__name__)

PROVIDERS_CACHE = "providers.json"  # in the state folder
_PROBE = "import json, onnxruntime; print(json.dumps(onnxruntime.get_available_providers()))"


def onnxruntime_providers(cache: Path | None = None) -> list[str]:
    """onnxruntime's execution providers here. Importing onnxruntime (and numpy with it) would hold
    ~40 MiB in an agent that serves no model yet, so a child process asks, once per installed
    onnxruntime: the answer is kept in `cache`, keyed by the package's place and its modification
    time (an upgrade asks again)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        return []
    package = Path(spec.origin).parent
    key = f"{package}:{package.stat().st_mtime_ns}"
    try:
        kept = json.loads(cache.read_text()) if cache is not None else None
        if isinstance(kept, dict) and kept.get("key") == key and isinstance(kept.get("providers"), list):
            return [str(p) for p in kept["providers"]]
    except (OSError, ValueError):
        pass  # none yet, or unreadable: ask again
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
        providers = [str(p) for p in json.loads(out.stdout)]
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        log.warning("cannot list onnxruntime's execution providers: %s", exc)
        return []
    if cache is not None:
        try:
            write_atomic(cache, json.dumps({"key": key, "providers": providers}).encode())
        except OSError as exc:
            log.warning("cannot keep the execution providers in %s: %s", cache, exc)
    return providers


def collect_inventory(state_dir: Path) -> Inventory:
    import psutil

    from slmops_protos import __version__

    probe = state_dir if state_dir.exists() else Path(os.path.expanduser("~"))
    return Inventory(
        os=f"{platform.system().lower()} {platform.release()}",
        arch=platform.machine().lower(),
        cpu_count=os.cpu_count() or 1,
        memory_bytes=int(psutil.virtual_memory().total),
        disk_free_bytes=int(shutil.disk_usage(probe).free),
        providers=onnxruntime_providers(state_dir / PROVIDERS_CACHE if state_dir.is_dir() else None),
        cpu_features=cpu_features(),
        agent_version=__version__,
    )
