"""What this device is: the hardware inventory reported at enrollment and in every ReportedState."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


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
        providers=onnxruntime_providers(),
        cpu_features=cpu_features(),
        agent_version=__version__,
    )
